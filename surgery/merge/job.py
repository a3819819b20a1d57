"""A merge job: the recipe and where and how to write it, built from the options ``surgery merge`` takes — the same
constructor, checks and messages for the CLI, ``surgery sweep``, pipeline steps and API callers::

    from surgery.merge import MergeJob, merge
    job = MergeJob.from_options(["org/short", "org/long"], method="ties", density=0.2, output="out")
    merge(job)

A pipeline step ``merge: {models: [a, b], method: ties, density: 0.2, output: out}`` is
``MergeJob.from_options(**step)``; :func:`build_recipe` is the recipe part alone (``surgery sweep`` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from surgery.errors import BadInput
from surgery.executors import check_executor
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE
from surgery.merge.recipe import (DARE_RESCALES, MODULE_CHOICES, ROUTER_CHOICES, ModelEntry, Recipe, aim_settings,
                                  checked_choice, load_recipe)
from surgery.merge.registry import PARAMETERS, MergeMethod, aliases, get_method
from surgery.merge.vocab import check_pad_to_multiple_of


def check_parameters(recipe: Recipe, method: MergeMethod | None = None) -> None:
    """BadInput unless every parameter the recipe sets applies to its method and has allowed values, wherever it is
    set (globally, per model, per slice), and its ``dare_rescale`` is known.

    Args:
        recipe: the recipe to check.
        method: its method (default: looked up by name, BadInput when unknown).

    Example: ``check_parameters(Recipe("slerp", [ModelEntry("a"), ModelEntry("b")], parameters={"t": 2}))``
    (BadInput: parameter t 2 (global): must be in [0, 1])
    """
    method = method or get_method(recipe.method)
    given = [("global", key, value) for key, value in recipe.parameters.items()]
    entries = recipe.models + [source for part in recipe.slices or [] for source in part.sources]
    given += [(entry.model, key, value) for entry in entries for key, value in entry.parameters.items()]
    given += [(f"slice {number}", key, value) for number, part in enumerate(recipe.slices or [])
              for key, value in part.parameters.items()]
    taken = {parameter.name: parameter for parameter in method.parameters}
    for where, key, value in sorted(given, key=lambda item: item[:2]):
        if key not in taken:
            accepted = ", ".join(sorted(taken)) or "none"
            raise BadInput(f"parameter {key!r} ({where}) does not apply to method {method.name!r} "
                           f"(it takes: {accepted})")
        taken[key].check(value, where)
    for name, parameter in taken.items():
        if parameter.required and all(key != name for _, key, _ in given):
            raise BadInput(f"method {method.name!r} needs parameter {name!r} ({parameter.help})")
    if recipe.dare_rescale not in DARE_RESCALES:
        raise BadInput(f"--dare-rescale {recipe.dare_rescale!r}: expected l1, inverse or none")


def _weights(value: str | Sequence[float] | None) -> list[float] | None:
    """--weights as "W1,W2,..." (the CLI) or a list of numbers (a pipeline step, an API caller)."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = ",".join(map(str, value))
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise BadInput(f"--weights {value!r}: expected comma-separated numbers") from None


def _parameter_values(values: Mapping[str, Any], method: MergeMethod) -> dict[str, Any]:
    """The given parameters by their names for ``method`` (``alpha`` → ``lambda``, but ramplus_tl's own ``alpha``),
    unset (None) ones left out."""
    names = {**aliases(), **aliases(method)}
    chosen: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            raise BadInput(f"{key!r}: not an option of merge nor a merge parameter "
                           f"(parameters: {', '.join(sorted(names))})")
        if value is None:
            continue
        if names[key] in chosen:
            raise BadInput(f"--{key}: parameter {names[key]} is given twice")
        chosen[names[key]] = value
    return chosen


def build_recipe(models: Sequence[str] = (), *, method: str | None = None, base: str | None = None,
                 weights: str | Sequence[float] | None = None, parameters: Mapping[str, Any] | None = None,
                 seed: int | None = None, dtype: str | None = None, dare_rescale: str | None = None,
                 tokenizer_source: str | None = None, pad_to_multiple_of: int | None = None,
                 modules: str | None = None, routers: str | None = None, recipe: str | Path | None = None,
                 aim: bool = False, omega: float | None = None,
                 calibration: str | None = None, stats: str | None = None, max_tokens: int | None = None,
                 **parameter_values: Any) -> Recipe:
    """The recipe ``surgery merge`` builds from its options: a recipe file's, or the models, with the options given
    overriding it. Without ``base`` the first model is the base of a method that uses one.

    Args:
        models: model sources (not with ``recipe``).
        method: the merge method (required without ``recipe``; overrides the recipe's).
        base: the base model (without ``recipe``).
        weights: one weight per non-base model, "W1,W2,..." or a list.
        parameters: global parameter values by name or alias (``{"lambda": 1.0, "density": 0.2}``).
        seed, dtype, dare_rescale, tokenizer_source, pad_to_multiple_of, modules, routers: the recipe's fields,
            when given.
        recipe: a recipe file (our YAML, a mergekit config, an earlier output's surgery.json).
        aim: apply AIM; ``omega``, ``calibration``, ``stats``, ``max_tokens`` are its settings (only with it).
        **parameter_values: more global parameter values by name or alias (``density=0.2``, ``alpha=0.5``).

    Returns:
        The :class:`~surgery.merge.recipe.Recipe`; BadInput (one line, the CLI's wording) for a bad combination.

    Example: ``build_recipe(["base", "ft"], method="ties", density=0.2, weights="0.7")``
    """
    if recipe:
        built = load_recipe(recipe)
        if models:
            raise BadInput("--recipe: give the models in the recipe, not on the command line")
    else:
        if not models:
            raise BadInput("no models given (pass MODEL... or --recipe FILE)")
        if method is None:
            raise BadInput("--method is required without --recipe")
        built = Recipe(method=method, models=[ModelEntry(m) for m in models], base=base)
    if method is not None:
        built.method = method
    first_is_base = built.base is None and get_method(built.method).uses_base
    non_base = len(built.models) - (1 if first_is_base else 0)
    weight_list = _weights(weights)
    if weight_list is not None and built.slices:
        raise BadInput("--weights: this recipe has slices; give the weights in it, per source")
    if weight_list is not None:
        if len(weight_list) != non_base:
            raise BadInput(f"--weights: {len(weight_list)} value(s) for {non_base} non-base model(s)")
        for entry, value in zip(built.models[len(built.models) - non_base:], weight_list):
            entry.parameters["weight"] = value
    built.parameters.update(_parameter_values({**(parameters or {}), **parameter_values}, get_method(built.method)))
    for field, value in (("seed", seed), ("dtype", dtype), ("dare_rescale", dare_rescale),
                         ("tokenizer_source", tokenizer_source)):
        if value is not None:
            setattr(built, field, value)
    for field, value, choices in (("modules", modules, MODULE_CHOICES), ("routers", routers, ROUTER_CHOICES)):
        if value is not None:
            setattr(built, field, checked_choice(value, f"--{field}", choices))
    if pad_to_multiple_of is not None:
        built.pad_to_multiple_of = check_pad_to_multiple_of(pad_to_multiple_of, "--pad-to-multiple-of")
    aim_options = {"omega": omega, "calibration": calibration, "stats": stats, "max_tokens": max_tokens}
    chosen = {key: value for key, value in aim_options.items() if value is not None}
    if chosen and not aim:
        raise BadInput(f"--{next(iter(chosen)).replace('_', '-')}: applies only with --aim")
    if aim:
        built.aim = aim_settings({**(built.aim or {}), **chosen}, "--aim")
    return built


@dataclass(frozen=True)
class MergeJob:
    """A checked merge: the recipe, the output directory and how to write it.

    Fields are ``surgery merge``'s options: ``output`` (``-o``, written atomically), ``device`` (cpu, cuda),
    ``max_shard_size``, ``force`` (replace an existing output), ``executor`` (local, ray), ``ray_address`` and
    ``check`` (measure the merge against its parents before it appears: :mod:`surgery.merge.check`).
    Construction checks the executor, the device and the recipe's parameters (BadInput, the CLI's messages).

    Example::

        MergeJob(Recipe("ties", [ModelEntry("a"), ModelEntry("b")], parameters={"density": 0.2}), "out")
    """

    recipe: Recipe
    output: str | Path
    device: str = "cpu"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    executor: str = "local"
    ray_address: str | None = None
    check: bool = False

    def __post_init__(self) -> None:
        check_executor(self.executor, self.ray_address)
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BadInput(f"--device {self.device}: no CUDA device is available")
        check_parameters(self.recipe)

    @classmethod
    def from_options(cls, models: Sequence[str] = (), *, output: str | Path, device: str = "cpu",
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                     executor: str = "local", ray_address: str | None = None, check: bool = False,
                     **recipe_options: Any) -> "MergeJob":
        """The job ``surgery merge MODELS... [options] -o OUTPUT`` runs (a pipeline's merge step: its keys).

        Args:
            models: model sources (or ``recipe=FILE``).
            output: the output directory.
            device, max_shard_size, force, executor, ray_address, check: how to write it (the fields).
            **recipe_options: :func:`build_recipe`'s options: method, base, weights, parameters, seed, dtype,
                dare_rescale, tokenizer_source, pad_to_multiple_of, modules, routers, recipe, aim, omega,
                calibration, stats, max_tokens, and parameter values by name or alias (``density=0.2``, ``alpha=0.5``).

        Returns:
            The checked :class:`MergeJob`.

        Example: ``MergeJob.from_options(["base", "ft"], method="dare_ties", density=0.3, seed=1, output="out")``
        """
        return cls(build_recipe(models, **recipe_options), output, device=device, max_shard_size=max_shard_size,
                   force=force, executor=executor, ray_address=ray_address, check=check)


def option_types() -> dict[str, Any]:
    """Every option :meth:`MergeJob.from_options` takes → its type (a pipeline step's keys are these).

    Returns:
        e.g. ``{"models": Sequence[str], "output": str | Path, ..., "density": float, "alpha": float, ...}``:
        the job's fields, :func:`build_recipe`'s options, and each merge parameter by name and alias.

    Example: ``option_types()["normalize"] is bool``
    """
    return options_with_parameters(MergeJob.from_options, build_recipe)


def options_with_parameters(*functions) -> dict[str, Any]:
    """The keyword options of ``functions`` (the first's type winning) and every merge parameter by name and alias,
    each → its type: what a pipeline step of a command built on a merge recipe may set.

    Args:
        *functions: the constructors the step's keys go to.

    Returns:
        Option name → type.

    Example: ``options_with_parameters(MergeLoraConfig.from_options)["density"] is float``
    """
    import inspect
    import typing

    from surgery.merge import builtin  # noqa: F401  (the built-in methods declare their parameters)

    types: dict[str, Any] = {}
    for function in functions:
        hints = typing.get_type_hints(function)
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name != "parameters":
                types.setdefault(name, hints.get(name, Any))
    for alias, name in aliases().items():
        types[alias] = PARAMETERS[name].kind
    return types
