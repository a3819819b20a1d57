"""Integer grids searched under an importance matrix: ``--imatrix`` for compressed-tensors and GPTQ outputs.

Each group's scale (and, asymmetric, integer zero point) is chosen to lower Σ_j w_j (x_j − x̂_j)², with llama.cpp's
weights w_j = importance_j · √(σ² + x_j²) (importance: the mean squared input of column j, surgery/quantize/imatrix.py;
σ² the row's mean x²), instead of the plain squared error::

    grid = weighted_grid(weight, Scheme(4, 128, symmetric=False), importance, torch.float16)

Candidates: round-to-nearest's own parameters, and for each step of :data:`LEVEL_STEPS` the scale
range / (levels + step), the values it rounds to, and the weighted least-squares scale (asymmetric: scale and
offset, the offset then rounded to an integer zero point and the scale refitted for it) for those values. Every
candidate is judged by the weighted error of the grid the format stores (scales rounded to their dtype, values
rounded to nearest), so no group ends worse than under rtn. Deterministic; on the weight's device.
"""

from __future__ import annotations

import torch

from surgery.quantize.grid import Grid, Scheme, _grouped, _quantize_with, _representable_scale, rtn

LEVEL_STEPS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)  # added to the level count in range / (levels + step)


def _weights(weight: torch.Tensor, importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups, group_size) llama.cpp weights: importance · √(σ² + x²), σ² the row's mean x²."""
    x = _grouped(weight, group_size)
    sigma2 = (x * x).mean(dim=(1, 2), keepdim=True)
    return importance.float().reshape(1, -1, group_size) * torch.sqrt(sigma2 + x * x)


def _weighted_error(x: torch.Tensor, w: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Per group Σ w (x − (q − zero)·scale)² with q the stored grid's values for (scale, zero)."""
    q = _quantize_with(weight, scale, zero, scheme).float().reshape(x.shape)
    approx = (q - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1)
    return (w * (x - approx) ** 2).sum(-1)


def _fitted(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scheme: Scheme,
            fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares (scale, integer zero) for values ``q`` held: symmetric x ≈ s·q; asymmetric
    x ≈ s·q + c jointly, zero = round(−c / s) clamped, then s refitted for that zero. ``fallback`` where unsolvable."""
    if scheme.symmetric:
        wq = w * q
        sum_qq, sum_xq = (wq * q).sum(-1), (wq * x).sum(-1)
        scale = torch.where(sum_qq > 0, sum_xq / sum_qq.clamp_min(1e-30), fallback)
        scale = torch.where(scale > 0, scale, fallback)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    sum_w, sum_q, sum_x = w.sum(-1), (w * q).sum(-1), (w * x).sum(-1)
    sum_qq, sum_xq = (w * q * q).sum(-1), (w * q * x).sum(-1)
    det = sum_w * sum_qq - sum_q * sum_q
    solvable = det > 1e-4 * sum_w * sum_qq  # relative: constant groups leave a float32 det of rounding noise
    safe = torch.where(solvable, det, torch.ones_like(det))
    scale = torch.where(solvable, (sum_w * sum_xq - sum_x * sum_q) / safe, fallback)
    scale = torch.where(scale > 0, scale, fallback)
    offset = torch.where(solvable, (sum_qq * sum_x - sum_q * sum_xq) / safe, torch.zeros_like(scale))
    zero = torch.round(-offset / scale).clamp(scheme.zero_min, scheme.qmax)
    shifted = q - zero.unsqueeze(-1)
    ws = w * shifted
    sum_ss, sum_xs = (ws * shifted).sum(-1), (ws * x).sum(-1)
    refit = torch.where(sum_ss > 0, sum_xs / sum_ss.clamp_min(1e-30), scale)
    return torch.where(refit > 0, refit, scale), zero.to(torch.int8)


@torch.no_grad()
def weighted_grid(weight: torch.Tensor, scheme: Scheme, importance: torch.Tensor,
                  scale_dtype: torch.dtype = torch.float32) -> Grid:
    """The grid of ``scheme`` for ``weight`` whose parameters lower the importance-weighted error.

    Args:
        weight: the 2-D weight (out, in); ``scheme.group_size`` divides ``in``.
        scheme: bits, group size and symmetry.
        importance: (in,) non-negative weights of the input columns (mean squared activations).
        scale_dtype: the dtype the scales are stored in; candidates are judged with scales rounded to it.

    Returns:
        The :class:`Grid` (int8 values, float32 scales, int8 zero points), never worse than :func:`rtn`'s in the
        weighted error of any group.

    Example: ``weighted_grid(torch.randn(64, 256), Scheme(4, 128), torch.rand(256)).dequantize()``
    """
    weight = weight.float()
    x, w = _grouped(weight, scheme.group_size), _weights(weight, importance.to(weight.device), scheme.group_size)
    base = rtn(weight, scheme, scale_dtype)
    best_scale, best_zero = base.scale, base.zero
    best_error = _weighted_error(x, w, weight, best_scale, best_zero, scheme)
    levels = scheme.qmax - scheme.qmin
    if scheme.symmetric:
        span = x.abs().amax(-1) * 2
    else:
        span = x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)
    low = x.amin(-1).clamp(max=0)
    for step in LEVEL_STEPS:
        raw = (span / (levels + step)).clamp_min(torch.finfo(torch.float32).tiny)
        if scheme.symmetric:
            zero = torch.zeros_like(best_zero)
        else:
            zero = (scheme.qmin - torch.round(low / raw)).clamp(scheme.zero_min, scheme.qmax).to(torch.int8)
        q = _quantize_with(weight, raw, zero, scheme).float().reshape(x.shape)
        scale, zero = _fitted(x, w, q, scheme, raw)
        scale = _representable_scale(scale, scale_dtype)
        scale = torch.where(scale > 0, scale, best_scale)
        error = _weighted_error(x, w, weight, scale, zero, scheme)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return Grid(_quantize_with(weight, best_scale, best_zero, scheme), best_scale, best_zero, scheme)


__all__ = ["LEVEL_STEPS", "weighted_grid"]
