"""The built-in merge methods, with mergekit's names and parameter meanings (density = fraction KEPT).

Notation: base θ0, other models θi, task vectors δi = θi − θ0, weights wi, global scale λ.

Deliberate differences from mergekit 0.1.5, all documented in ``surgery merge --help``:
- math is always float32 (mergekit subtracts in the configured dtype, so a bf16 config loses precision);
- random masks (DARE, DELLA) come from a generator seeded by ``--seed`` and the tensor name, so the same seed gives
  identical bytes; ``--dare-rescale inverse`` gives the papers' exact 1/p rescale instead of the L1 default;
- among entries of exactly equal magnitude at the TIES cut, the first in memory order are kept (a sort's order is
  arbitrary there).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from surgery.merge import sparsify
from surgery.merge.params import DENSITY, EPSILON, GAMMA, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, SCALE, T, WEIGHT
from surgery.merge.registry import TensorMerge, register

TASK_VECTOR_PARAMETERS = [WEIGHT, LAMBDA, NORMALIZE, INT8_MASK]


def _stacked_weights(x: TensorMerge, like: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(x.per_model("weight"), dtype=torch.float32, device=like.device)
    return weights.reshape(-1, *([1] * like.dim()))


DeltaSource = Callable[[int, slice, torch.Tensor], torch.Tensor]


def _combine_task_vectors(x: TensorMerge, delta_of: DeltaSource, sign_consensus: bool,
                          normalize_default: bool) -> torch.Tensor:
    """θ0 + λ · (Σ wi δi, over entries agreeing with the elected sign when ``sign_consensus``), divided by the
    summed weights (of the agreeing entries) when normalizing.

    Works through the flattened tensor in cache-sized chunks; ``delta_of(i, chunk, base_chunk)`` gives model i's
    (sparsified) float32 task vector on that chunk as a fresh tensor.
    """
    base = x.base.reshape(-1)
    out = torch.empty(base.shape, dtype=x.out_dtype, device=base.device)
    normalize = normalize_default if x.value("normalize") is None else x.value("normalize")
    weight_sum = torch.tensor(sum(x.per_model("weight")), dtype=torch.float32, device=base.device)
    if weight_sum.abs() < 1e-8:
        weight_sum.fill_(1)
    for part in sparsify.chunk_slices(base.numel()):
        base_chunk = base[part].to(torch.float32)
        weighted = [delta_of(i, part, base_chunk).mul_(w) for i, w in enumerate(x.per_model("weight"))]
        mixed = weighted[0].clone()
        for delta in weighted[1:]:
            mixed += delta
        if sign_consensus:
            # elected sign s = +1 where Σ wi δi ≥ 0, else −1; an entry agrees when wi δi · s > 0, and then
            # max(wi δi · s, 0) · s is wi δi (else 0). Comparisons write float32 masks: bool ones are far slower.
            scratch = torch.empty_like(mixed)
            elected = torch.ge(mixed, 0, out=torch.empty_like(mixed)).mul_(2).sub_(1)
            mixed.zero_()
            divisor = torch.zeros_like(mixed)
            for w, delta in zip(x.per_model("weight"), weighted):
                delta.mul_(elected)
                divisor.add_(torch.gt(delta, 0, out=scratch), alpha=w)
                mixed += delta.clamp_(min=0)
            mixed *= elected
            divisor += torch.eq(divisor, 0, out=scratch)  # no agreeing entry: divide by 1
        else:
            divisor = weight_sum
        if normalize:
            mixed /= divisor
        out[part] = mixed.mul_(x.value("lambda")).add_(base_chunk)
    return out.reshape(x.base.shape)


def _plain_deltas(x: TensorMerge) -> DeltaSource:
    models = [m.reshape(-1) for m in x.models]
    return lambda i, part, base_chunk: models[i][part].to(torch.float32) - base_chunk


def _precomputed(deltas: list[torch.Tensor]) -> DeltaSource:
    flat = [d.reshape(-1) for d in deltas]
    return lambda i, part, base_chunk: flat[i][part].clone()


def _deltas(x: TensorMerge) -> list[torch.Tensor]:
    """Whole float32 task vectors (for sparsifications that need the whole tensor at once)."""
    base = x.base.to(torch.float32)
    return [model.to(torch.float32) - base for model in x.models]


@register("linear", uses_base=False, parameters=[WEIGHT, NORMALIZE], min_models=2)
def linear(x: TensorMerge) -> torch.Tensor:
    """Weighted average Σ wi θi / Σ wi of all models (no base).

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor, shaped like the inputs.

    Example: ``linear(TensorMerge("w", None, [a, b], {"weight": [0.7, 0.3]}))``
    """
    x = x.as_float32()
    weights = _stacked_weights(x, x.models[0])
    total = (torch.stack(x.models) * weights).sum(dim=0)
    normalize = True if x.value("normalize") is None else x.value("normalize")
    return total / weights.sum() if normalize else total


@register("task_arithmetic", uses_base=True, parameters=TASK_VECTOR_PARAMETERS)
def task_arithmetic(x: TensorMerge) -> torch.Tensor:
    """θ0 + λ Σ wi δi.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``task_arithmetic(TensorMerge("w", base, [a, b], {"weight": [1.0, 1.0], "lambda": 0.5}))``
    """
    return _combine_task_vectors(x, _plain_deltas(x), sign_consensus=False, normalize_default=False)


@register("ties", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY])
def ties(x: TensorMerge) -> torch.Tensor:
    """TIES: keep the top-density |δi|, elect signs, weighted disjoint mean, times λ (the long-to-short method).

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``ties(TensorMerge("w", base, [a, b], {"weight": [1.0, 1.0], "density": [0.2, 0.2]}))``
    """
    plain = _plain_deltas(x)
    base = x.base.reshape(-1)
    numel = base.numel()

    def magnitudes(i: int, part: slice) -> torch.Tensor:
        return plain(i, part, base[part].to(torch.float32)).abs_()

    cuts = [None if p >= 1 else sparsify.magnitude_cut(lambda part, i=i: magnitudes(i, part), numel,
                                                       sparsify.kept_count(numel, p))
            for i, p in enumerate(x.per_model("density"))]
    ties_seen = [0] * len(cuts)

    def trimmed(i: int, part: slice, base_chunk: torch.Tensor) -> torch.Tensor:
        delta = plain(i, part, base_chunk)
        if cuts[i] is not None:
            keep, ties_seen[i] = cuts[i].keep(delta.abs(), ties_seen[i])
            delta *= keep
        return delta

    return _combine_task_vectors(x, trimmed, sign_consensus=True, normalize_default=True)


def _dare(x: TensorMerge) -> list[torch.Tensor]:
    return [sparsify.bernoulli(d, p, x.generator, x.value("rescale"))
            for d, p in zip(_deltas(x), x.per_model("density"))]


@register("dare_linear", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, RESCALE], random=True)
def dare_linear(x: TensorMerge) -> torch.Tensor:
    """DARE: drop δ entries with probability 1 − density, rescale, then task arithmetic.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`),
            with a seeded ``generator`` (``gen = torch.Generator().manual_seed(0)``) for the random masks.

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``dare_linear(TensorMerge("w", base, [a], {"density": [0.3]}, generator=gen))``
    """
    return _combine_task_vectors(x, _precomputed(_dare(x)), sign_consensus=False, normalize_default=False)


@register("dare_ties", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, RESCALE], random=True)
def dare_ties(x: TensorMerge) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint mean.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`),
            with a seeded ``generator`` (``gen = torch.Generator().manual_seed(0)``) for the random masks.

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``dare_ties(TensorMerge("w", base, [a, b], {"density": [0.3, 0.3]}, generator=gen))``
    """
    return _combine_task_vectors(x, _precomputed(_dare(x)), sign_consensus=True, normalize_default=False)


def _breadcrumbs(x: TensorMerge) -> list[torch.Tensor]:
    return [sparsify.magnitude_outliers(d, p, g)
            for d, p, g in zip(_deltas(x), x.per_model("density"), x.per_model("gamma"))]


@register("breadcrumbs", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, GAMMA])
def breadcrumbs(x: TensorMerge) -> torch.Tensor:
    """Model Breadcrumbs: drop the top gamma and the smallest |δ| entries (keeping density), task arithmetic.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``breadcrumbs(TensorMerge("w", base, [a], {"density": [0.9], "gamma": [0.01]}))``
    """
    return _combine_task_vectors(x, _precomputed(_breadcrumbs(x)), sign_consensus=False, normalize_default=False)


@register("breadcrumbs_ties", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, GAMMA])
def breadcrumbs_ties(x: TensorMerge) -> torch.Tensor:
    """Breadcrumbs trimming with TIES sign election.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``breadcrumbs_ties(TensorMerge("w", base, [a, b], {"density": [0.9, 0.9], "gamma": [0.01, 0.01]}))``
    """
    return _combine_task_vectors(x, _precomputed(_breadcrumbs(x)), sign_consensus=True, normalize_default=False)


def _della(x: TensorMerge) -> list[torch.Tensor]:
    return [sparsify.rank_sampling(d, p, e, x.generator, x.value("rescale"))
            for d, p, e in zip(_deltas(x), x.per_model("density"), x.per_model("epsilon"))]


@register("della", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, EPSILON, RESCALE],
          random=True)
def della(x: TensorMerge) -> torch.Tensor:
    """DELLA: keep probabilities density ± epsilon by magnitude rank, rescale, TIES sign election.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`),
            with a seeded ``generator`` (``gen = torch.Generator().manual_seed(0)``) for the random masks.

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``della(TensorMerge("w", base, [a, b], {"density": [0.5, 0.5], "epsilon": [0.1, 0.1]}, generator=gen))``
    """
    return _combine_task_vectors(x, _precomputed(_della(x)), sign_consensus=True, normalize_default=True)


@register("della_linear", uses_base=True, parameters=TASK_VECTOR_PARAMETERS + [DENSITY, EPSILON, RESCALE],
          random=True)
def della_linear(x: TensorMerge) -> torch.Tensor:
    """DELLA sampling and rescale, then task arithmetic.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`),
            with a seeded ``generator`` (``gen = torch.Generator().manual_seed(0)``) for the random masks.

    Returns:
        The merged tensor in ``x.out_dtype``, shaped like the base.

    Example: ``della_linear(TensorMerge("w", base, [a], {"density": [0.5], "epsilon": [0.1]}, generator=gen))``
    """
    return _combine_task_vectors(x, _precomputed(_della(x)), sign_consensus=False, normalize_default=False)


@register("slerp", uses_base=True, parameters=[T], max_models=1)
def slerp(x: TensorMerge, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1); lerp when nearly colinear.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).
        dot_threshold: above this |cosine| between the two, interpolate linearly instead.
        eps: norms below this count as 1 (no division by zero).

    Returns:
        The merged float32 tensor, shaped like the inputs.

    Example: ``slerp(TensorMerge("w", base, [a], {"t": 0.5}))``
    """
    x = x.as_float32()
    v0, v1, t = x.base, x.models[0], x.value("t")
    if v0.numel() == 0:
        return v0
    norm0, norm1 = v0.norm(), v1.norm()
    norm0 = norm0 if norm0 > eps else torch.ones_like(norm0)
    norm1 = norm1 if norm1 > eps else torch.ones_like(norm1)
    dot = float(((v0 / norm0) * (v1 / norm1)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


@register("model_stock", uses_base=True, parameters=[], min_models=2)
def model_stock(x: TensorMerge) -> torch.Tensor:
    """Model Stock: t = N·cos / (1 + (N − 1)·cos) from the mean pairwise cosine of the δi; θ0 + t (mean θi − θ0).

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor, shaped like the inputs.

    Example: ``model_stock(TensorMerge("w", base, [a, b]))``
    """
    x = x.as_float32()
    deltas = [d.reshape(-1) for d in _deltas(x)]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            cosines.append(float(((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-6)).clamp(-1, 1)))
    cosine = sum(cosines) / len(cosines)
    count = len(deltas)
    denominator = 1 + (count - 1) * cosine
    t = 0.0 if abs(denominator) < 1e-6 else count * cosine / denominator
    average = sum(x.models) / count
    return t * average + (1 - t) * x.base


@register("passthrough", uses_base=False, parameters=[SCALE], max_models=1)
def passthrough(x: TensorMerge) -> torch.Tensor:
    """Copy the single model's tensors, optionally multiplied by scale.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The model's tensor as stored (no scale) or multiplied by scale in float32.

    Example: ``passthrough(TensorMerge("w", None, [a], {"scale": 0.5}))``
    """
    scale = x.value("scale")
    return x.models[0] if scale is None else x.models[0].to(torch.float32) * scale
