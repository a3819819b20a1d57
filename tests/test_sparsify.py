"""The radix-select top-k against a plain sort, including ties, zeros and tiny tensors."""

from __future__ import annotations

import pytest
import torch

from surgery.merge.sparsify import magnitude, magnitude_outliers, top_k_mask


@pytest.mark.parametrize("size,k", [(1, 1), (10, 3), (1000, 1), (1000, 999), (65537, 13107), (300_000, 60_000)])
def test_top_k_matches_sort(size, k):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size))
    mask = top_k_mask(values, k)
    expected = torch.zeros(size, dtype=torch.bool)
    expected[values.abs().argsort(descending=True)[:k]] = True
    assert torch.equal(mask, expected)


def test_ties_at_the_cut_keep_the_first_entries():
    values = torch.tensor([0.5, -2.0, 0.5, 0.0, -0.5, 3.0, 0.5])
    assert top_k_mask(values, 4).tolist() == [True, True, True, False, False, True, False]
    assert top_k_mask(torch.zeros(5), 2).tolist() == [True, True, False, False, False]


def test_extreme_magnitudes_order_correctly():
    values = torch.tensor([1e-38, -3e38, 1e-45, 7.0, -1e-20, 0.0])  # denormals, huge, zero
    expected = [False, True, False, True, True, False]
    assert top_k_mask(values, 3).tolist() == expected


def test_magnitude_density_and_outliers():
    values = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    kept = magnitude(values, 0.25) != 0
    assert kept.sum() == int(0.25 * values.numel())
    assert values.abs()[kept].min() >= values.abs()[~kept].max()
    trimmed = magnitude_outliers(values, 0.5, 0.1) != 0
    ranks = values.abs().reshape(-1).argsort().argsort().reshape(values.shape)  # 0 = smallest
    n = values.numel()
    bottom = n - int(0.5 * n) - int(0.1 * n)
    assert torch.equal(trimmed, (ranks >= bottom) & (ranks < bottom + int(0.5 * n)))


def test_many_ties_from_bfloat16_deltas_match_a_stable_sort():
    """bf16 checkpoints give task vectors with few distinct magnitudes: thousands of entries tie at the cut."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(700_000, generator=generator).bfloat16().float()
    tuned = (base + 0.01 * torch.randn(700_000, generator=generator)).bfloat16().float()
    delta = tuned - base
    k = int(0.2 * delta.numel())
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[delta.abs().argsort(descending=True, stable=True)[:k]] = True
    magnitudes = delta.abs()
    assert int((magnitudes == magnitudes[expected].min()).sum()) > 100  # the cut does fall among ties
    assert torch.equal(top_k_mask(delta, k), expected)


def test_chunked_ties_equals_whole_tensor_formula():
    from surgery.merge.methods import ties
    from surgery.merge.registry import TensorMerge

    generator = torch.Generator().manual_seed(4)
    base = torch.randn(1000, 700, generator=generator).bfloat16().float()
    models = [(base + 0.01 * torch.randn(base.shape, generator=generator)).bfloat16().float() for _ in range(2)]
    weights, densities = [1.0, 0.7], [0.2, 0.3]
    merged = ties(TensorMerge("t", base, models, {"weight": weights, "density": densities, "lambda": 0.9}))

    kept = []
    for model, weight, density in zip(models, weights, densities):
        delta = (model - base).reshape(-1)
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[delta.abs().argsort(descending=True, stable=True)[: int(density * delta.numel())]] = True
        kept.append(delta * mask * weight)
    stacked = torch.stack(kept)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = base.reshape(-1) + 0.9 * (stacked * agree).sum(0) / divisor
    torch.testing.assert_close(merged.reshape(-1), expected, rtol=1e-6, atol=1e-7)
