"""Sparsification of task vectors: magnitude top-k (TIES), Bernoulli drop (DARE), outlier trimming (breadcrumbs),
rank-based keep probabilities (DELLA). Pure tensor functions; ``density`` is always the fraction KEPT.

Magnitude selection is the hot spot of TIES: instead of sorting every tensor (what makes naive merges slow), the k-th
largest magnitude is found by a two-pass radix select on the float bit patterns (:func:`kth_largest_magnitude`),
which gives the same threshold as a sort in linear time.
"""

from __future__ import annotations

import torch


def _counts_at_or_above(counts: torch.Tensor) -> torch.Tensor:
    return counts.flip(0).cumsum(0).flip(0)


def kth_largest_magnitude(magnitudes: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Threshold bits and how many elements lie strictly above it, for the k-th largest of ``magnitudes``.

    ``magnitudes`` is a flat non-negative float32 tensor; its int32 bit patterns order exactly as the values do, so
    a 16-bit histogram of the high half finds the bucket of the k-th largest, and a second histogram of the low half
    inside that bucket finds the exact value. Returns (threshold as int32 bits, count strictly greater).
    """
    bits = magnitudes.view(torch.int32)
    high = bits >> 16
    above = _counts_at_or_above(torch.bincount(high, minlength=1 << 15))
    bucket = int(torch.nonzero(above >= k).max())
    greater_high = int(above[bucket + 1]) if bucket + 1 < above.numel() else 0
    low = bits[high == bucket] & 0xFFFF
    above_low = _counts_at_or_above(torch.bincount(low, minlength=1 << 16))
    low_value = int(torch.nonzero(above_low >= k - greater_high).max())
    greater = greater_high + (int(above_low[low_value + 1]) if low_value + 1 < above_low.numel() else 0)
    return torch.tensor((bucket << 16) | low_value, dtype=torch.int32), greater


def top_k_mask(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest |values|; among equal magnitudes at the cut, the first in memory order win."""
    flat = tensor.reshape(-1).abs().to(torch.float32)
    if k >= flat.numel():
        return torch.ones_like(tensor, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    threshold, greater = kth_largest_magnitude(flat.cpu() if flat.device.type != "cpu" else flat, k)
    bits = flat.view(torch.int32)
    threshold = threshold.to(flat.device)
    mask = bits > threshold
    ties = bits == threshold
    needed = k - greater
    if int(ties.sum()) > needed:  # keep only the first `needed` of the tied elements
        ties &= ties.cumsum(0) <= needed
    return (mask | ties).reshape(tensor.shape)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled so its L1 norm equals ``original``'s (mergekit's default DARE/DELLA rescale)."""
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (at least one), zero the rest (TIES)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return delta * top_k_mask(delta, k)


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); rescale ``"l1"`` (mergekit) or ``"inverse"`` (1/p, paper)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    kept = delta * keep
    if rescale == "l1":
        return rescale_l1(delta, kept)
    if rescale == "inverse":
        return kept / density
    return kept


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction and the smallest entries, keeping ``density`` of them."""
    if density >= 1:
        return delta
    count = delta.numel()
    target = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - target - top)
    # the kept entries are ranks [bottom, bottom + target) in ascending magnitude
    keep_from_top = top_k_mask(delta, count - bottom)
    drop_top = top_k_mask(delta, count - bottom - target)
    return delta * (keep_from_top & ~drop_top)


def rank_sampling(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                  rescale: str | None) -> torch.Tensor:
    """DELLA: keep probabilities from density − ε (smallest) to density + ε (largest) by magnitude rank per row."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        from surgery.errors import BadInput

        raise BadInput(f"--epsilon {epsilon}: density ± epsilon must stay inside (0, 1) (density {density})")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    span = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values)
    normalized = ((ranks - ranks.min(dim=1, keepdim=True).values) / span).clamp(0, 1)
    probabilities = (density - epsilon) + normalized * 2 * epsilon
    keep = torch.rand(probabilities.shape, generator=generator, device=delta.device) < probabilities
    kept = (rows * keep).reshape(delta.shape)
    if rescale == "l1":
        return rescale_l1(delta, kept)
    if rescale == "inverse":
        return kept / probabilities.reshape(delta.shape)
    return kept
