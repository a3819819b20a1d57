"""The merge-method registry: every method is one pure function on float32 tensors, registered by name with the
parameters it takes (:class:`~surgery.merge.params.Parameter` declarations).

A method receives a :class:`TensorMerge` — the base tensor (None for base-free methods), the other models' tensors
and the parameters resolved for this tensor — and returns the merged float32 tensor. It never opens a file. A method
with a parameter of its own is one file: declare the parameter, register the method, import the file::

    BETA = Parameter("beta", float, 0.5, "my_method: share of the change kept (0.5).", low=0, high=1)

    @register("my_method", uses_base=True, parameters=[WEIGHT, BETA])
    def my_method(x: TensorMerge) -> torch.Tensor:
        \"\"\"θ0 + β Σ wi (θi − θ0).\"\"\"
        return x.base + x.value("beta") * sum(w * (m - x.base) for w, m in zip(x.per_model("weight"), x.models))

The recipe then accepts ``beta``, ``surgery merge`` has ``--beta`` and ``surgery sweep --grid beta=...`` parses.
Two methods may declare a parameter of the same name differently (mergekit's ``epsilon`` is della's per-model
spread and ram's global threshold) as long as its type is the same; each method gets its own declaration's default,
range and scope, and a name one method declares wins over another parameter's alias (``alpha`` is ``lambda``'s
other name, but ramplus_tl's own ``alpha``). The built-in methods are registered by :mod:`surgery.merge.builtin`
(imported by ``surgery.merge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch

from surgery.errors import BadInput
from surgery.merge.params import SHARED, Parameter


@dataclass
class TensorMerge:
    """One tensor's inputs and the method's parameters resolved for it.

    Tensors arrive in their stored dtype (often bf16, possibly memory-mapped: never modify them in place); methods
    compute in float32, either chunk by chunk or after :meth:`as_float32`. ``parameters`` maps a parameter's name
    to its value (a list, one per model in ``models``' order, for a per-model parameter); an absent one takes its
    declared default.

    Example::

        x = TensorMerge("w", base, [model], {"weight": [1.0], "lambda": 0.5})
        x.value("lambda"), x.per_model("weight")        # 0.5, [1.0]
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    is_matrix: bool = False  # a 2-D weight, not an embedding or router (arch.NOT_DECOMPOSED_KINDS): SVD decomposes it
    generator: torch.Generator | None = None
    out_dtype: torch.dtype = torch.float32  # what chunked methods write their result in

    def value(self, name: str) -> Any:
        """A global parameter's value for this tensor.

        Args:
            name: a declared parameter's name (``"lambda"``, ``"eta"``...).

        Returns:
            The resolved value, or the declared default when none was given.

        Example: ``x.value("eta")``
        """
        if name in self.parameters:
            return self.parameters[name]
        return PARAMETERS[name].default

    def per_model(self, name: str) -> list:
        """A per-model parameter's values for this tensor, one per model of ``models``.

        Args:
            name: a declared per-model parameter's name (``"weight"``, ``"density"``...).

        Returns:
            The resolved values, or the declared default for every model when none was given.

        Example: ``x.per_model("weight")``
        """
        if name in self.parameters:
            return self.parameters[name]
        return [PARAMETERS[name].default] * len(self.models)

    def as_float32(self) -> "TensorMerge":
        """The same inputs converted to float32 whole (for methods that do not work in chunks).

        Returns:
            A copy whose base and models are float32.

        Example: ``x = x.as_float32()``
        """
        def f32(tensor):
            return None if tensor is None else tensor.to(torch.float32)

        return replace(self, base=f32(self.base), models=[f32(m) for m in self.models])


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, whether it uses a base, the parameters it takes, how many models."""

    name: str
    function: Callable[[TensorMerge], torch.Tensor]
    uses_base: bool
    parameters: tuple[Parameter, ...]
    min_models: int = 1  # models other than the base
    max_models: int | None = None
    summary: str = ""
    random: bool = False
    optional_base: bool = False  # uses a base only when one is named (nuslerp, multislerp)

    @property
    def parameter_names(self) -> frozenset[str]:
        """The names of the parameters this method takes (the recipe keys it accepts)."""
        return frozenset(parameter.name for parameter in self.parameters)

    def check_model_count(self, count: int) -> None:
        """BadInput unless ``count`` non-base models suit this method.

        Args:
            count: models other than the base.

        Example: ``get_method("slerp").check_model_count(2)``   # BadInput: takes at most 1 model(s)
        """
        base_note = " besides the base" if self.uses_base or self.optional_base else ""
        if count < self.min_models:
            raise BadInput(f"--method {self.name}: needs at least {self.min_models} model(s){base_note}, got {count}")
        if self.max_models is not None and count > self.max_models:
            raise BadInput(f"--method {self.name}: takes at most {self.max_models} model(s){base_note}, got {count}")


METHODS: dict[str, MergeMethod] = {}
PARAMETERS: dict[str, Parameter] = {p.name: p for p in SHARED}  # every parameter name, by its first declaration
DECLARATIONS: dict[str, list[Parameter]] = {p.name: [p] for p in SHARED}  # every declaration of each name


def register(name: str, *, uses_base: bool | str, parameters: Iterable[Parameter], min_models: int = 1,
             max_models: int | None = None, random: bool = False):
    """Decorator adding a method to :data:`METHODS` and its parameters to :data:`PARAMETERS`.

    Args:
        name: the method's name (``--method NAME``, a recipe's ``method``).
        uses_base: True when it merges task vectors relative to a base model (the first model is the base when
            none is named), False when it takes none, ``"optional"`` when it uses a base only if one is named.
        parameters: the :class:`~surgery.merge.params.Parameter` declarations it takes.
        min_models, max_models: how many models besides the base it merges.
        random: whether it draws random masks (it then gets a seeded ``generator``).

    Returns:
        The decorator; the function's docstring's first line is the ``--help`` summary. The function it returns
        fills the parameters a caller leaves out with this method's declared defaults.

    Example::

        @register("my_method", uses_base=True, parameters=[WEIGHT, BETA])
        def my_method(x: TensorMerge) -> torch.Tensor: ...
    """
    parameters = tuple(parameters)
    spellings = [spelled for parameter in parameters for spelled in (parameter.name, *parameter.aliases)]
    repeated = sorted({spelled for spelled in spellings if spellings.count(spelled) > 1})
    if repeated:
        raise ValueError(f"merge method {name!r}: {repeated[0]!r} names two of its parameters")
    kinds = {spelled: PARAMETERS[known].kind for spelled, known in aliases().items()}
    for parameter in parameters:
        for spelled in (parameter.name, *parameter.aliases):
            if kinds.get(spelled, parameter.kind) is not parameter.kind:
                raise ValueError(f"merge method {name!r}: {spelled!r} already names a parameter of another type")

    def decorate(function: Callable[[TensorMerge], torch.Tensor]):
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        for parameter in parameters:
            PARAMETERS.setdefault(parameter.name, parameter)
            declared = DECLARATIONS.setdefault(parameter.name, [])
            if parameter not in declared:
                declared.append(parameter)

        def with_defaults(x: TensorMerge) -> torch.Tensor:
            missing = {p.name: [p.default] * len(x.models) if p.per_model else p.default
                       for p in parameters if p.name not in x.parameters}
            return function(replace(x, parameters={**missing, **x.parameters}) if missing else x)

        with_defaults.__doc__, with_defaults.__name__ = function.__doc__, function.__name__
        METHODS[name] = MergeMethod(name, with_defaults, uses_base is True, parameters, min_models, max_models,
                                    summary, random, optional_base=uses_base == "optional")
        return with_defaults

    return decorate


def aliases(method: MergeMethod | None = None) -> dict[str, str]:
    """Every name a parameter goes by (its name and its aliases) → its name; a declared name wins over an alias.

    Args:
        method: only the parameters this method takes (default: every declared parameter).

    Returns:
        e.g. ``{"lambda": "lambda", "alpha": "lambda", "density": "density", ...}``

    Example: ``aliases()["alpha"] == "lambda"``, ``aliases(get_method("ramplus_tl"))["alpha"] == "alpha"``
    """
    if method is None:
        declared = [parameter for same_name in DECLARATIONS.values() for parameter in same_name]
    else:
        declared = list(method.parameters)
    names = {alias: parameter.name for parameter in declared for alias in parameter.aliases}
    names.update({parameter.name: parameter.name for parameter in declared})
    return names


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Args:
        name: a method's name.

    Returns:
        Its :class:`MergeMethod`; BadInput listing the known methods when there is none.

    Example: ``get_method("ties").uses_base``
    """
    try:
        return METHODS[name]
    except KeyError:
        raise BadInput(f"--method {name!r}: unknown merge method (known: {', '.join(sorted(METHODS))})") from None
