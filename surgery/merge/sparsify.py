"""Sparsification of task vectors: magnitude top-k (TIES), Bernoulli drop (DARE), outlier trimming (breadcrumbs),
rank-based keep probabilities (DELLA). Pure tensor functions; ``density`` is always the fraction KEPT.

Magnitude selection is the hot spot of TIES: instead of sorting every tensor (what makes naive merges slow), the k-th
largest magnitude is found by a two-pass radix select on the float bit patterns (:func:`kth_largest_magnitude`),
which gives the same threshold as a sort in linear time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _counts_at_or_above(counts: torch.Tensor) -> torch.Tensor:
    return counts.flip(0).cumsum(0).flip(0)


def kth_largest_magnitude(magnitudes: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Threshold bits and how many elements lie strictly above it, for the k-th largest of ``magnitudes``.

    ``magnitudes`` is a flat non-negative float32 tensor; its int32 bit patterns order exactly as the values do, so
    a 16-bit histogram of the high half finds the bucket of the k-th largest, and a second histogram of the low half
    inside that bucket finds the exact value.

    Args:
        magnitudes: flat non-negative float32 values.
        k: which largest to find (1 = the maximum); at least 1, at most ``magnitudes.numel()``.

    Returns:
        (the threshold's int32 bit pattern as a 0-d tensor, how many values are strictly greater).

    Example: ``kth_largest_magnitude(torch.tensor([3., 1., 2., 5.]), 2)``   # (bits of 3.0, 1)
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


@dataclass(frozen=True)
class MagnitudeCut:
    """Where the top-k by magnitude ends: entries whose magnitude exceeds ``threshold`` are kept, and of the
    ``ties_total`` entries exactly at it, the first ``ties_kept`` in memory order."""

    threshold: float
    ties_kept: int
    ties_total: int

    def keep(self, magnitudes: torch.Tensor, ties_seen: int = 0) -> tuple[torch.Tensor, int]:
        """Keep-mask (float32 ones and zeros) for a consecutive run of float32 ``magnitudes`` that follows
        ``ties_seen`` tied entries; returns the mask and the tied entries seen after this run.

        Comparisons write float32 (``out=``): this is the hot loop of TIES, and bool-producing comparisons are
        several times slower on CPU."""
        keep = torch.gt(magnitudes, self.threshold, out=torch.empty_like(magnitudes))
        if self.ties_kept == 0:
            return keep, ties_seen
        ties = torch.eq(magnitudes, self.threshold, out=torch.empty_like(magnitudes))
        if self.ties_kept == self.ties_total:
            return keep.add_(ties), ties_seen
        count = int(torch.count_nonzero(ties))  # not a float sum: a whole tensor may exceed 2**24 entries
        budget = max(0, self.ties_kept - ties_seen)
        if count > budget:
            flat = ties.view(-1)
            flat[flat.bool().nonzero()[budget:, 0]] = 0
        return keep.add_(ties), ties_seen + count


SAMPLE_SIZE = 1 << 16
CHUNK = 1 << 18  # elements per step of the chunked loops: small enough to stay in cache


def magnitudes_of(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor| as a flat float32 tensor.

    Args:
        tensor: any tensor.

    Returns:
        Its absolute values, float32, flattened.

    Example: ``magnitudes_of(torch.tensor([[-1., 2.]]))``   # tensor([1., 2.])
    """
    return tensor.abs().to(torch.float32).reshape(-1)


def chunk_slices(numel: int, size: int = CHUNK) -> list[slice]:
    """Consecutive slices covering ``range(numel)``, ``size`` elements each (the last may be shorter).

    Args:
        numel: the flattened tensor's element count.
        size: elements per slice (default :data:`CHUNK`).

    Returns:
        The slices, in order; none when ``numel`` is 0.

    Example: ``chunk_slices(5, 2)``   # [slice(0, 2), slice(2, 4), slice(4, 5)]
    """
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size)]


def _count(flags: torch.Tensor) -> int:
    """How many ones a float32 0/1 tensor of at most ``CHUNK`` entries holds (exact: float32 sums integers
    exactly up to 2**24)."""
    return int(flags.sum())


def magnitude_cut(magnitudes_in: Callable[[slice], torch.Tensor], numel: int, k: int) -> MagnitudeCut:
    """The cut keeping the ``k`` largest magnitudes, as a sort would place it; ``magnitudes_in(slice)`` gives the
    float32 magnitudes of any stretch of the flattened tensor.

    A strided sample brackets the k-th largest value; one pass over chunks counts the entries above the bracket and
    collects the (few) inside it, which locates the cut exactly. If the bracket misses, a radix select decides.

    Args:
        magnitudes_in: gives the float32 magnitudes of a slice of the flattened tensor.
        numel: the flattened tensor's element count.
        k: how many of the largest magnitudes to keep (1 to ``numel``).

    Returns:
        The :class:`MagnitudeCut` (threshold and how many entries exactly at it are kept).

    Example: ``magnitude_cut(magnitudes.__getitem__, magnitudes.numel(), k).keep(magnitudes)``
    """
    if numel > 4 * SAMPLE_SIZE:
        step = numel // SAMPLE_SIZE
        sample = magnitudes_in(slice(0, numel, step)).sort().values
        position = (1 - k / numel) * (sample.numel() - 1)
        margin = int(6 * (sample.numel() * (k / numel) * (1 - k / numel)) ** 0.5) + 32
        low = float(sample[max(0, int(position) - margin)])
        high = float(sample[min(sample.numel() - 1, int(position) + margin + 1)])
        above, inside = 0, []
        for part in chunk_slices(numel):
            magnitudes = magnitudes_in(part)
            over = torch.gt(magnitudes, high, out=torch.empty_like(magnitudes))
            above += _count(over)
            within = torch.ge(magnitudes, low, out=torch.empty_like(magnitudes)).sub_(over)
            inside.append(magnitudes[within.bool()])
        candidates = torch.cat(inside)
        wanted = k - above
        if 0 < wanted <= candidates.numel():
            threshold = candidates.kthvalue(candidates.numel() - wanted + 1).values
            greater = above + int(torch.count_nonzero(candidates > threshold))
            return MagnitudeCut(float(threshold), k - greater, int(torch.count_nonzero(candidates == threshold)))
    magnitudes = magnitudes_in(slice(0, numel))
    threshold_bits, greater = kth_largest_magnitude(magnitudes, k)
    threshold = threshold_bits.view(torch.float32)
    return MagnitudeCut(float(threshold), k - greater, int(torch.count_nonzero(magnitudes == threshold)))


def top_k_mask(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest |values|; among equal magnitudes at the cut, the first in memory order win.

    Args:
        tensor: any tensor.
        k: how many entries to keep (all when ``k >= tensor.numel()``, none when ``k <= 0``).

    Returns:
        A bool tensor shaped like ``tensor``, True where an entry is kept.

    Example: ``top_k_mask(torch.tensor([1., -3., 2.]), 2)``   # tensor([False, True, True])
    """
    if k >= tensor.numel():
        return torch.ones_like(tensor, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    magnitudes = magnitudes_of(tensor)
    return magnitude_cut(magnitudes.__getitem__, magnitudes.numel(), k).keep(magnitudes)[0].bool().reshape(tensor.shape)


def kept_count(numel: int, density: float) -> int:
    """How many entries TIES keeps: at least one, ``int(density · n)`` otherwise (mergekit's rule).

    Args:
        numel: the tensor's element count.
        density: the fraction kept (all at 1 or more, none at 0 or less).

    Returns:
        The count of entries kept.

    Example: ``kept_count(10, 0.25)``   # 2 (and kept_count(10, 0.01) is 1)
    """
    return numel if density >= 1 else (0 if density <= 0 or numel == 0 else max(1, int(density * numel)))


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled so its L1 norm equals ``original``'s (mergekit's default DARE/DELLA rescale).

    Args:
        original: the task vector before dropping.
        kept: what is left of it after dropping.
        eps: below this L1 norm (of either) ``kept`` is returned unscaled.

    Returns:
        ``kept`` times ``|original|₁ / |kept|₁``.

    Example: ``rescale_l1(torch.tensor([1., 1., 2.]), torch.tensor([0., 1., 0.]))``   # tensor([0., 4., 0.])
    """
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (at least one), zero the rest (TIES).

    Args:
        delta: a task vector.
        density: the fraction kept (``delta`` itself at 1 or more).

    Returns:
        ``delta`` with the entries not kept zeroed.

    Example: ``magnitude(torch.tensor([1., -3., 2.]), 0.5)``   # tensor([0., -3., 0.])
    """
    if density >= 1:
        return delta
    return delta * top_k_mask(delta, kept_count(delta.numel(), density))


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); rescale ``"l1"`` (mergekit) or ``"inverse"`` (1/p, paper).

    Args:
        delta: a task vector.
        density: the probability of keeping each entry (``delta`` itself at 1 or more, zeros at 0 or less).
        generator: the seeded generator the mask is drawn from.
        rescale: ``"l1"``, ``"inverse"`` or None (no rescale).

    Returns:
        The dropped (and rescaled) task vector, shaped like ``delta``.

    Example: ``bernoulli(torch.ones(4), 0.5, torch.Generator().manual_seed(0), "inverse")``   # entries 0 or 2
    """
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
    """Breadcrumbs: drop the largest ``gamma`` fraction and the smallest entries, keeping ``density`` of them.

    Args:
        delta: a task vector.
        density: the fraction kept (``delta`` itself at 1 or more).
        gamma: the fraction of largest-magnitude entries dropped.

    Returns:
        ``delta`` with the dropped entries zeroed.

    Example: ``magnitude_outliers(torch.arange(1., 11.), 0.5, 0.1)``   # keeps 5 to 9
    """
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
    """DELLA: keep probabilities from density − ε (smallest) to density + ε (largest) by magnitude rank per row.

    Args:
        delta: a task vector (a 0-d or 1-d one counts as one row).
        density: the mean keep probability (``delta`` itself at 1 or more, zeros at 0 or less).
        epsilon: the spread of keep probabilities; density ± epsilon must stay inside (0, 1) (else BadInput).
        generator: the seeded generator the mask is drawn from.
        rescale: ``"l1"``, ``"inverse"`` (1/p per entry) or None (no rescale).

    Returns:
        The sampled (and rescaled) task vector, shaped like ``delta``.

    Example: ``rank_sampling(torch.arange(1., 11.), 0.5, 0.1, torch.Generator().manual_seed(0), "l1")``
    """
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
