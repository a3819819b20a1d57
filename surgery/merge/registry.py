"""The merge-method registry: every method is one pure function on float32 tensors, registered by name.

A method receives a :class:`TensorMerge` — the base tensor (None for base-free methods), the other models' tensors
and the parameters resolved for this tensor — and returns the merged float32 tensor. It never opens a file::

    @register("my_method", uses_base=True, parameters={"weight", "lambda"})
    def my_method(x: TensorMerge) -> torch.Tensor:
        return x.base + x.lambda_ * sum(w * (m - x.base) for w, m in zip(x.weight, x.models))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from surgery.errors import BadInput


@dataclass
class TensorMerge:
    """One tensor's inputs and parameters. Per-model lists follow ``models``' order.

    Tensors arrive in their stored dtype (often bf16, possibly memory-mapped: never modify them in place); methods
    compute in float32, either chunk by chunk or after :meth:`as_float32`."""

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    weight: list[float]
    density: list[float]
    gamma: list[float]
    epsilon: list[float]
    lambda_: float = 1.0
    t: float = 0.5
    scale: float | None = None
    normalize: bool | None = None  # None: the method's default
    rescale: str | None = "l1"  # DARE / DELLA rescale: "l1" (mergekit), "inverse" (1/p, the papers), or None
    eta: float = 0.4  # STAR: share of the spectrum kept
    rank: float | None = None  # SVD methods: a fixed rank instead of the eta rule / the full rank
    mu: float = 0.1  # LoRE: singular-value threshold, relative to the largest singular value
    is_matrix: bool = False  # a 2-D weight, not an embedding or router (arch.NOT_DECOMPOSED_KINDS): SVD decomposes it
    generator: torch.Generator | None = None
    out_dtype: torch.dtype = torch.float32  # what chunked methods write their result in

    def as_float32(self) -> "TensorMerge":
        """The same inputs converted to float32 whole (for methods that do not work in chunks)."""
        def f32(tensor):
            return None if tensor is None else tensor.to(torch.float32)

        return replace(self, base=f32(self.base), models=[f32(m) for m in self.models])


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[[TensorMerge], torch.Tensor]
    uses_base: bool
    parameters: frozenset[str]
    min_models: int = 1  # models other than the base
    max_models: int | None = None
    summary: str = ""
    random: bool = False

    def check_model_count(self, count: int) -> None:
        """BadInput unless ``count`` non-base models suit this method."""
        base_note = " besides the base" if self.uses_base else ""
        if count < self.min_models:
            raise BadInput(f"--method {self.name}: needs at least {self.min_models} model(s){base_note}, got {count}")
        if self.max_models is not None and count > self.max_models:
            raise BadInput(f"--method {self.name}: takes at most {self.max_models} model(s){base_note}, got {count}")


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, uses_base: bool, parameters: set[str], min_models: int = 1,
             max_models: int | None = None, random: bool = False):
    """Decorator adding a method to :data:`METHODS`; its docstring's first line is the ``--help`` summary."""

    def decorate(function: Callable[[TensorMerge], torch.Tensor]):
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        METHODS[name] = MergeMethod(name, function, uses_base, frozenset(parameters), min_models, max_models,
                                    summary, random)
        return function

    return decorate


def get_method(name: str) -> MergeMethod:
    from surgery.merge import methods, spectral  # noqa: F401  (register the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise BadInput(f"--method {name!r}: unknown merge method (known: {', '.join(sorted(METHODS))})") from None


