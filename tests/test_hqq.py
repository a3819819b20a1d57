"""hqq (surgery/quantize/grid.py) against a plain reference written here: one group at a time, every step, the same
half-quadratic update, acceptance rule and stopping rule. The library steps all groups at once and drops the
groups that reached a fixed point; neither may change a grid."""

from __future__ import annotations

import pytest
import torch


def planted_weight(rows: int = 48, columns: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weights (std 0.02, bfloat16 values) with outliers planted in some groups: mild ones (±0.3) and
    super weights (±5), large enough that the lp shrink, not only the least-squares fit, moves their groups."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    spots = torch.randint(0, rows * columns, (40,), generator=generator)
    signs = torch.randint(0, 2, (40,), generator=generator) * 2 - 1
    weight.view(-1)[spots[:30]] = 0.3 * signs[:30]
    weight.view(-1)[spots[30:]] = 5.0 * signs[30:]
    return weight.to(torch.bfloat16).float()


def reference_rtn(group: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' round-to-nearest scale and zero of one group (zero from the unrounded scale)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = group.abs().max() / ((qmax - qmin) / 2)
        return (scale if scale > 0 else torch.tensor(1.0)), torch.tensor(0.0)
    low, high = group.min().clamp(max=0), group.max().clamp(min=0)
    scale = (high - low) / (qmax - qmin)
    scale = scale if scale > torch.finfo(torch.float32).tiny else torch.tensor(1.0)
    return scale, (qmin - torch.round(low / scale)).clamp(qmin, qmax)


def reference_hqq(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                  iterations: int = 20, beta: float = 10.0, kappa: float = 1.01, p: float = 0.7):
    """(q, scale, zero) of HQQ on the integer grid, a loop over groups at every step."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows, columns = weight.shape
    groups = [weight[row, start:start + group_size] for row in range(rows) for start in range(0, columns, group_size)]

    def reconstruct(group, scale, zero):
        q = (torch.round(group / scale) + zero).clamp(qmin, qmax)
        return q, (q - zero) * scale

    states = []  # per group: [scale, zero, q, approx]
    for group in groups:
        scale, zero = reference_rtn(group, bits, symmetric)
        scale = scale.to(scale_dtype).float()
        states.append([scale, zero, *reconstruct(group, scale, zero)])
    best = [(scale, zero, ((group - approx) ** 2).sum(), (group - approx).abs().max())
            for group, (scale, zero, _, approx) in zip(groups, states)]

    def mean_error():
        return float(torch.cat([(group - state[3]).abs() for group, state in zip(groups, states)]).mean())

    previous = mean_error()
    for _ in range(iterations):
        for number, (group, state) in enumerate(zip(groups, states)):
            scale, zero, q, approx = state
            error = group - approx
            shrunk = torch.sign(error) * torch.relu(error.abs() - error.abs().clamp_min(1e-12).pow(p - 1) / beta)
            goal = group - shrunk
            centred = q - zero
            denominator = (centred * centred).sum()
            fitted = (centred * goal).sum() / denominator.clamp_min(1e-12)
            if denominator > 0 and fitted > 0:
                scale = fitted.to(scale_dtype).float()
            if not symmetric:
                zero = torch.round((q - goal / scale).mean()).clamp(qmin, qmax)
            q, approx = reconstruct(group, scale, zero)
            states[number] = [scale, zero, q, approx]
            squared, largest = ((group - approx) ** 2).sum(), (group - approx).abs().max()
            if squared < best[number][2] and largest <= best[number][3]:
                best[number] = (scale, zero, squared, best[number][3])
        beta *= kappa
        current = mean_error()
        if current >= previous:
            break
        previous = current
    scales = torch.stack([scale for scale, *_ in best]).reshape(rows, -1)
    zeros = torch.stack([zero for _, zero, *_ in best]).reshape(rows, -1)
    q = torch.cat([reconstruct(group, scale, zero)[0] for group, (scale, zero, *_) in zip(groups, best)])
    return q.reshape(rows, columns), scales, zeros


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_matches_a_per_group_reference(symmetric, scale_dtype):
    from surgery.quantize.grid import Scheme, hqq, rtn

    weight = planted_weight()
    scheme = Scheme(4, 64, symmetric)
    grid = hqq(weight, scheme, scale_dtype)
    want_q, want_scale, want_zero = reference_hqq(weight, 4, 64, symmetric, scale_dtype)
    assert torch.equal(grid.q.long(), want_q.long())
    assert torch.equal(grid.zero.long(), want_zero.long())
    torch.testing.assert_close(grid.scale, want_scale, rtol=1e-6, atol=0)
    # the planted weight exercises what it is meant to: HQQ moved many groups, and not every group
    moved = grid.scale != rtn(weight, scheme, scale_dtype).scale
    assert 0.2 < moved.float().mean() < 1.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_matches_the_reference_where_the_shrink_moves_groups(symmetric):
    """β = 100 puts the lp shrink's threshold (~0.02) among the errors of the groups with mild outliers, and κ = 1.3
    changes it quickly, so a group whose parameters held for one step may move again at the next: the library
    must keep such groups stepping."""
    from surgery.quantize.grid import Scheme, hqq

    weight = planted_weight(seed=1)
    options = {"iterations": 20, "beta": 100.0, "kappa": 1.3, "p": 0.7}
    grid = hqq(weight, Scheme(4, 64, symmetric), torch.bfloat16, **options)
    want_q, want_scale, want_zero = reference_hqq(weight, 4, 64, symmetric, torch.bfloat16, **options)
    assert torch.equal(grid.q.long(), want_q.long())
    assert torch.equal(grid.zero.long(), want_zero.long())
    torch.testing.assert_close(grid.scale, want_scale, rtol=1e-6, atol=0)
