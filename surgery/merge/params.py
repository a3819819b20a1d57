"""Merge parameters: their declarations (name, type, default, per-model or global, allowed values, help, CLI flags)
and their values as recipes write them, resolved per tensor (filters and per-layer gradients).

A method lists the :class:`Parameter` declarations it takes where it is registered
(:func:`surgery.merge.registry.register`); recipe validation, the ``surgery merge`` flags and the ``surgery sweep``
grid keys are derived from them. The shared ones are declared here once; a method with a parameter of its own
declares it in its own file::

    BETA = Parameter("beta", float, 0.5, "my_method: how far to go (0.5).", low=0, high=1)

A parameter value is a number, a list of numbers (a gradient, interpolated over the decoder layers: layer i of n
sits at t = i / (n − 1), the only layer of a one-layer slice at 1, tensors outside the layers at 0), or a list of
``{filter, value}`` conditions where the first whose filter is a substring of the tensor name (or is absent / ``*``)
applies — mergekit's conventions::

    resolve_value([{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}], "model.layers.3.mlp.up_proj.weight",
                  t=0.5)   # → 0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from surgery.errors import BadInput

MAX_MAGNITUDE = 1e6  # far beyond any useful weight or scale, and far from float32 overflow


@dataclass(frozen=True)
class Parameter:
    """One merge parameter, declared once.

    ``kind`` is float, int or bool; numbers must lie within [low, high] (an open end excluded). ``per_model``
    parameters get one value per model (a model entry's value overrides the slice's and the global one).
    With ``cli``, ``surgery merge`` sets its global value with ``--NAME`` and ``--ALIAS`` for each alias
    (``--NAME/--no-NAME`` for a bool); without, only recipes set it. A ``required`` one has no
    default: a recipe must set it. ``finish`` turns the resolved
    value into what the method receives, given the recipe (e.g. rescale → the recipe's ``dare_rescale`` mode).

    Example::

        DENSITY = Parameter("density", float, 1.0, "Fraction of task-vector entries KEPT.", per_model=True,
                            low=0, high=1, low_open=True)
        DENSITY.check(0.2, "global")       # fine; 1.5 raises BadInput "must be in (0, 1]"
    """

    name: str
    kind: type
    default: Any
    help: str
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    aliases: tuple[str, ...] = ()
    cli: bool = True  # a `surgery merge` option (else recipes only)
    finish: Callable[[Any, Any], Any] | None = None
    required: bool = False  # no default: a recipe that does not set it is refused

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed for this parameter.

        Args:
            value: one value (a gradient point or a filter's value), as a recipe gives it.

        Returns:
            The reason (e.g. ``"must be in (0, 1]"``), or None when ``value`` is allowed.

        Example: ``DENSITY.problem(0) == "must be in (0, 1]"``
        """
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be finite"
        if self.kind is int and value != int(value):
            return "must be a whole number"
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if low_ok and high_ok:
            return None
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"must be in {left}{low}, {high}{right}"

    def check(self, setting: Any, where: str) -> None:
        """BadInput naming the parameter and ``where`` unless every value ``setting`` can take is allowed.

        Args:
            setting: the parameter's setting as a recipe writes it (scalar, gradient, filters).
            where: where it is set, for the message ("global", a model, "slice 2").

        Example::

            DENSITY.check([0.2, 0.5], "global")      # fine
            DENSITY.check(1.5, "global")             # BadInput: parameter density 1.5 (global): must be in (0, 1]
        """
        for value in setting_values(setting, self.name, where):
            problem = self.problem(value)
            if problem:
                raise BadInput(f"parameter {self.name} {value!r} ({where}): {problem}")

    def parse(self, text: str, option: str) -> Any:
        """A value of this parameter from its text form (a ``--grid`` value).

        Args:
            text: e.g. ``"0.2"``, ``"8"``, ``"true"``.
            option: the option named in the error message.

        Returns:
            A bool for a bool parameter, an int for a whole number of an int parameter, else a float.

        Example: ``RANK.parse("8", "--grid") == 8``
        """
        if self.kind is bool:
            if text.lower() not in ("true", "false"):
                raise BadInput(f"{option}: {self.name}={text!r} is not true or false")
            return text.lower() == "true"
        try:
            number = float(text)
        except ValueError:
            raise BadInput(f"{option}: {self.name}={text!r} is not a number") from None
        return int(number) if self.kind is int and number == int(number) else number


def _dare_mode(on: Any, recipe: Any) -> str | None:
    """DARE / DELLA rescale: the recipe's ``dare_rescale`` mode ("l1", "inverse"), None when off."""
    return None if not on or recipe.dare_rescale == "none" else recipe.dare_rescale


WEIGHT = Parameter("weight", float, 1.0, "Weight of a model (per model; the CLI's --weights).", per_model=True,
                   low=-MAX_MAGNITUDE, high=MAX_MAGNITUDE, cli=False)
LAMBDA = Parameter("lambda", float, 1.0, "Scale of the merged task vector.", low=-MAX_MAGNITUDE, high=MAX_MAGNITUDE,
                   aliases=("alpha",))
DENSITY = Parameter("density", float, 1.0, "Fraction of task-vector entries KEPT.", per_model=True, low=0, high=1,
                    low_open=True)  # the fraction kept: 0 would keep nothing
T = Parameter("t", float, 0.5, "slerp: 0 gives the base, 1 the other model.", low=0, high=1)
GAMMA = Parameter("gamma", float, 0.01, "breadcrumbs: top fraction dropped (0.01).", per_model=True, low=0, high=1,
                  high_open=True)
EPSILON = Parameter("epsilon", float, 0.15, "della: keep-probability spread (0.15).", per_model=True, low=0, high=1,
                    high_open=True)
ETA = Parameter("eta", float, 0.4, "star / svd with one model: share of each task matrix's spectrum kept (0.4).",
                low=0, high=1, low_open=True)
RANK = Parameter("rank", int, None, "star, tsv, svd: a fixed rank instead of the eta rule (star) or the full rank "
                                    "split over the tasks (tsv).", low=1)
MU = Parameter("mu", float, 0.1, "lore: singular-value threshold relative to the largest one (0.1).", low=0, high=1)
NORMALIZE = Parameter("normalize", bool, None, "Divide by the summed weights (method default).")
SCALE = Parameter("scale", float, None, "passthrough: multiply the tensors by this.", low=-MAX_MAGNITUDE,
                  high=MAX_MAGNITUDE, cli=False)
RESCALE = Parameter("rescale", bool, True, "DARE / DELLA: rescale the kept entries (how: --dare-rescale).",
                    cli=False, finish=_dare_mode)
# mergekit's option to hold masks as int8 to save memory; accepted so its configs run, without effect on the result
INT8_MASK = Parameter("int8_mask", bool, None, "mergekit's int8 masks (accepted, no effect).", cli=False)


def setting_values(setting: Any, key: str, where: str) -> Iterator[Any]:
    """Every value ``setting`` can take (gradient points, each filter's value).

    Args:
        setting: a parameter's setting as a recipe writes it.
        key, where: the parameter and where it is set, for the message.

    Returns:
        An iterator over the values; BadInput if ``setting`` is not of a shape parameters take: a scalar, a list of
        numbers, or a list of {filter, value}.

    Example: ``list(setting_values([{"filter": "mlp", "value": [0.1, 0.3]}, {"value": 0.5}], "density", "global"))``
    is ``[0.1, 0.3, 0.5]``
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise BadInput(f"parameter {key!r} ({where}): an empty list")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            yield from setting
            return
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition or set(condition) - {"filter", "value"}:
                raise BadInput(f"parameter {key!r} ({where}): {condition!r} is not a number or a "
                               "{filter, value} entry")
            if condition.get("filter") is not None and not isinstance(condition["filter"], str):
                raise BadInput(f"parameter {key!r} ({where}): filter {condition['filter']!r} must be a string")
            if isinstance(condition["value"], dict):
                raise BadInput(f"parameter {key!r} ({where}): a filter's value must be a number or a gradient")
            yield from setting_values(condition["value"], key, where)
        return
    yield setting


def resolve_value(setting: Any, tensor_name: str, t: float) -> Any:
    """The value ``setting`` takes for one tensor.

    Args:
        setting: a parameter's setting (scalar, gradient, {filter, value} list).
        tensor_name: the output tensor's name (filters are substrings of it).
        t: the tensor's layer position in [0, 1] (gradients are interpolated at it).

    Returns:
        The value (numbers as float), or None when no filter matches.

    Example: ``resolve_value([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", t=0.25) == 0.25``
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, str)) or setting is None:
        return setting
    if isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            position = t * (len(setting) - 1)
            low = int(position)
            high = min(len(setting) - 1, low + 1)
            fraction = position - low
            return (1 - fraction) * float(setting[low]) + fraction * float(setting[high])
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition:
                raise BadInput(f"parameter value {condition!r}: expected a number, a list of numbers, "
                               "or {filter, value} entries")
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return resolve_value(condition["value"], tensor_name, t)
        return None
    raise BadInput(f"parameter value {setting!r}: expected a number, a list of numbers, or {{filter, value}} entries")



# the shared declarations, in the order ``surgery merge --help`` lists their flags and recipes apply them
SHARED = (WEIGHT, LAMBDA, DENSITY, T, GAMMA, EPSILON, NORMALIZE, ETA, RANK, MU, SCALE, RESCALE, INT8_MASK)
