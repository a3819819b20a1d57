"""Merges that choose, entry by entry, which task-vector entries reach the output, with mergekit 0.1.5's names and
parameters: ``sce`` (select the entries the models disagree on most, weight each model by its task vector's energy,
erase sign conflicts), ``ram`` / ``ramplus_tl`` (Reinforced Agent Merging: entries only one model changed are kept
whole, shared ones averaged; the plus variant boosts models whose changes are mostly shared), ``nearswap`` (take
the other model's value where it is within t of the base's) and ``arcee_fusion`` (keep the changes whose size times
the row's softmax KL divergence is an outlier).

Notation: base θ0, models θi, task vectors δi = θi − θ0. Math is float32; where mergekit samples (arcee_fusion's
quantiles of tensors over a million entries, drawn unseeded) these compute the exact value, and where it breaks ties
arbitrarily (sce's top-k) the first entries in memory order win::

    surgery merge base a b --method sce --select-topk 0.1
    surgery merge base tuned --method nearswap --t 0.0001
"""

from __future__ import annotations

import torch

from surgery.merge.params import INT8_MASK, Parameter
from surgery.merge.registry import TensorMerge, register
from surgery.merge.sparsify import top_k_mask

SELECT_TOPK = Parameter("select_topk", float, 1.0, "sce: fraction of entries kept, those whose task vectors vary "
                        "most across the models (1: all).", low=0, high=1)
RAM_EPSILON = Parameter("epsilon", float, 1e-5, "ram, ramplus_tl: |δ| above this counts as a change (1e-5).", low=0,
                        high=1)
RAM_R = Parameter("r", float, 0.1, "ramplus_tl: boost of a model's unique changes per unit of its shared/unique "
                  "ratio (0.1).", low=0, high=1e3)
RAM_ALPHA = Parameter("alpha", float, 0.2, "ramplus_tl: cap of the shared/unique ratio (0.2).", low=0, high=1e3)
NEARSWAP_T = Parameter("t", float, None, "nearswap: distance below which the other model's value is taken "
                       "(required; e.g. 0.0001).", low=0, high=1, low_open=True, required=True)


def _task_vectors(x: TensorMerge) -> torch.Tensor:
    """δi stacked, float32, shape (models, *tensor)."""
    base = x.base.to(torch.float32)
    return torch.stack([model.to(torch.float32) - base for model in x.models])


@register("sce", uses_base=True, parameters=[SELECT_TOPK, INT8_MASK])
def sce(x: TensorMerge) -> torch.Tensor:
    """SCE: keep the entries of highest variance across the models, weight by task-vector energy, erase conflicts.

    Select: the ``select_topk`` fraction of the entries with nonzero variance of δ across the models (all at 1).
    Calculate: model i's weight is mean(δi²) over the selected entries, normalised to sum 1 (uniform when the
    energies sum below 1e-6). Erase: an entry of δi counts only where its sign is the elected one (the sign of
    Σ δi, + at 0). The result is θ0 + Σ wi mi δi / max(Σ wi mi, 1e-6), mi the erase masks.

    Args:
        x: the tensor's base, models and resolved parameters.

    Returns:
        The merged float32 tensor.

    Example: ``sce(TensorMerge("w", base, [a, b], {"select_topk": 0.5}))``
    """
    base = x.base.to(torch.float32)
    deltas = _task_vectors(x)
    fraction = x.value("select_topk")
    if fraction < 1:
        variance = deltas.var(dim=0, unbiased=False)
        kept = int(int(torch.count_nonzero(variance)) * fraction)
        deltas *= top_k_mask(variance, kept).to(torch.float32)
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = (deltas.sign() == elected).to(torch.float32)
    energies = deltas.square().reshape(len(x.models), -1).mean(dim=1)
    total = float(energies.sum())
    weights = torch.full_like(energies, 1 / len(x.models)) if abs(total) < 1e-6 else energies / total
    weights = weights.reshape(-1, *([1] * base.dim())) * agrees
    return base + (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _ram_parts(x: TensorMerge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(δ with entries at most epsilon zeroed, the changed-entry masks, how many models changed each entry)."""
    deltas = _task_vectors(x)
    changed = deltas.abs() > x.value("epsilon")
    deltas *= changed
    return deltas, changed, changed.sum(dim=0)


@register("ram", uses_base=True, parameters=[RAM_EPSILON])
def ram(x: TensorMerge) -> torch.Tensor:
    """RAM: an entry only one model changed (|δ| > epsilon) keeps that change, a shared one the changes' mean.

    θ0 + Σ δi·[|δi| > ε] / max(count, 1), count = how many models changed the entry.

    Args:
        x: the tensor's base, models and resolved parameters.

    Returns:
        The merged float32 tensor.

    Example: ``ram(TensorMerge("w", base, [a, b], {"epsilon": 1e-5}))``
    """
    deltas, _, counts = _ram_parts(x)
    return x.base.to(torch.float32) + deltas.sum(dim=0) / counts.clamp(min=1)


@register("ramplus_tl", uses_base=True, parameters=[RAM_R, RAM_ALPHA, RAM_EPSILON])
def ramplus_tl(x: TensorMerge) -> torch.Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique changes scaled by 1 + r·min(shared/unique, alpha).

    shared and unique count model i's changed entries that other models changed too, and that only it changed
    (unique floored at epsilon), within this tensor.

    Args:
        x: the tensor's base, models and resolved parameters.

    Returns:
        The merged float32 tensor.

    Example: ``ramplus_tl(TensorMerge("w", base, [a, b], {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}))``
    """
    deltas, changed, counts = _ram_parts(x)
    shared, unique = counts > 1, counts == 1
    flat_changed = changed.reshape(len(x.models), -1)
    ratio = (flat_changed & shared.reshape(-1)).sum(dim=1) / (flat_changed & unique.reshape(-1)).sum(dim=1).clamp(
        min=x.value("epsilon"))
    boost = (1 + x.value("r") * ratio.clamp(min=0, max=x.value("alpha"))).reshape(-1, *([1] * x.base.dim()))
    merged = (deltas * unique * boost).sum(dim=0) + (deltas * shared).sum(dim=0) / counts.clamp(min=1)
    return x.base.to(torch.float32) + merged


@register("nearswap", uses_base=True, parameters=[NEARSWAP_T], max_models=1)
def nearswap(x: TensorMerge) -> torch.Tensor:
    """NearSwap: move each entry to the other model's value by min(1, t / |θ1 − θ0|): all the way where they are
    within t.

    Args:
        x: the tensor's base, one model and resolved parameters (``t`` required).

    Returns:
        The merged float32 tensor.

    Example: ``nearswap(TensorMerge("w", base, [a], {"t": 1e-4}))``
    """
    base, other = x.base.to(torch.float32), x.models[0].to(torch.float32)
    share = (x.value("t") / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return share * other + (1 - share) * base


def _lower_quantiles(values: torch.Tensor, fractions: tuple[float, ...]) -> list[float]:
    """The sorted values at index floor(q·(n − 1)) for each fraction q (mergekit's quantile rule, no interpolation)."""
    flat = values.reshape(-1)
    return [float(flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values) for q in fractions]


@register("arcee_fusion", uses_base=True, parameters=[], max_models=1)
def arcee_fusion(x: TensorMerge) -> torch.Tensor:
    """Arcee Fusion: keep the changes whose importance |δ| · KL(softmax θ1 ‖ softmax θ0) (per row) is an upper
    outlier: at least median + 1.5 · (q3 − q1) of the tensor's importances.

    Args:
        x: the tensor's base, one model (no parameters).

    Returns:
        The merged float32 tensor.

    Example: ``arcee_fusion(TensorMerge("w", base, [a]))``
    """
    base, other = x.base.to(torch.float32), x.models[0].to(torch.float32)
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    q1, median, q3 = _lower_quantiles(importance, (0.25, 0.5, 0.75))
    kept = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * kept
