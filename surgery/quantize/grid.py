"""Group-wise integer grids: round-to-nearest parameters, HQQ refinement, quantize and dequantize.

A weight W (out, in) is cut into groups of ``group_size`` consecutive input columns; each row of each group has a
scale and (asymmetric) an integer zero point. Values live on the signed grid q ∈ [−2^(b−1), 2^(b−1) − 1], as
compressed-tensors stores them, and dequantize to ``(q − zero) · scale``::

    scheme = Scheme(bits=4, group_size=128, symmetric=True)
    grid = rtn(weight, scheme)              # Grid(q int8 (out, in), scale (out, in/g), zero int8 (out, in/g))
    grid = hqq(weight, scheme)              # same grid, parameters refined by half-quadratic optimisation
    approx = grid.dequantize()              # float32 (out, in)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.errors import BadInput


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    # GPTQ v1 stores zero − 1 unsigned, so the lowest zero point cannot be written: keep zeros above it.
    v1_zeros: bool = False

    @property
    def zero_min(self) -> int:
        return self.qmin + 1 if self.v1_zeros else self.qmin

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """BadInput unless ``shape`` is a 2-D weight whose input dimension the group size divides."""
        if len(shape) != 2:
            raise BadInput(f"tensor {name!r}: only 2-D weights can be quantized, got shape {tuple(shape)}")
        if shape[1] % self.group_size:
            raise BadInput(f"tensor {name!r}: --group-size {self.group_size} does not divide its input dimension "
                           f"{shape[1]} (choose a divisor, or --ignore this module)")


@dataclass
class Grid:
    """Quantized values, per-group scales (float32) and integer zero points (all zeros when symmetric)."""

    q: torch.Tensor      # int8 (out, in)
    scale: torch.Tensor  # float32 (out, groups)
    zero: torch.Tensor   # int8 (out, groups)
    scheme: Scheme

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.scheme.group_size)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, columns = weight.shape
    return weight.float().reshape(rows, columns // group_size, group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q − zero) · scale`` per group, in float32."""
    rows, columns = q.shape
    grouped = q.float().reshape(rows, -1, group_size) - zero.float().unsqueeze(-1)
    return (grouped * scale.float().unsqueeze(-1)).reshape(rows, columns)


def quantize_with(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """q = clamp(round(W / scale) + zero) on the scheme's grid, int8."""
    grouped = _grouped(weight, scheme.group_size)
    q = torch.round(grouped / scale.unsqueeze(-1)) + zero.float().unsqueeze(-1)
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(weight.shape)


def rtn_parameters(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of round-to-nearest, as compressed-tensors computes them: symmetric
    scale = amax / ((qmax − qmin) / 2); asymmetric scale = (max − min) / (qmax − qmin) over a range that includes
    0, zero = clamp(qmin − round(min / scale))."""
    grouped = _grouped(weight, scheme.group_size)
    levels = scheme.qmax - scheme.qmin
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        scale = grouped.abs().amax(-1) / (levels / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    low = grouped.amin(-1).clamp(max=0)
    high = grouped.amax(-1).clamp(min=0)
    scale = (high - low) / levels
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    zero = (scheme.qmin - torch.round(low / scale)).clamp(scheme.zero_min, scheme.qmax)
    return scale, zero.to(torch.int8)


def representable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale rounded to the dtype it is stored in (so quantizing with it matches what loaders see)."""
    return scale.to(dtype).float()


def rtn(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.float32) -> Grid:
    scale, zero = rtn_parameters(weight, scheme)
    scale = representable_scale(scale, scale_dtype)
    return Grid(quantize_with(weight, scale, zero, scheme), scale, zero, scheme)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-threshold of HQQ: sign(x) · relu(|x| − |x|^(p−1) / β)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


def hqq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.float32, *, iterations: int = 20,
        beta: float = 10.0, kappa: float = 1.01, p: float = 0.7) -> Grid:
    """HQQ (mobiusml/hqq) constrained to a loader-native grid.

    HQQ alternates a sparse (lp, p < 1) estimate of the quantization error W_e with a closed-form update of the
    parameters against the target W − W_e. The original moves a float zero point; stock loaders only read integer
    zero points (asymmetric) or none (symmetric), so here the closed-form step updates the scale (least squares per
    group) and, asymmetric only, the zero point, which is rounded to the integer grid at every step. Starts from
    RTN, keeps the parameters with the lowest mean |W − W_r| seen, and stops when that stops falling.
    """
    group = scheme.group_size
    target = _grouped(weight, group)
    scale, zero = rtn_parameters(weight, scheme)
    scale = representable_scale(scale, scale_dtype)
    zero_f = zero.float()

    def reconstruct(scale, zero_f):
        q = (torch.round(target / scale.unsqueeze(-1)) + zero_f.unsqueeze(-1)).clamp(scheme.qmin, scheme.qmax)
        return q, (q - zero_f.unsqueeze(-1)) * scale.unsqueeze(-1)

    q, approx = reconstruct(scale, zero_f)
    best_error = (target - approx).abs().mean(-1)
    best_scale, best_zero = scale.clone(), zero_f.clone()
    previous = float(best_error.mean())
    for _ in range(iterations):
        sparse_error = _shrink_lp(target - approx, beta, p)
        goal = target - sparse_error
        centred = q - zero_f.unsqueeze(-1)
        denominator = (centred * centred).sum(-1)
        fitted = (centred * goal).sum(-1) / denominator.clamp_min(1e-12)
        scale = torch.where((denominator > 0) & (fitted > 0), fitted, scale)
        scale = representable_scale(scale, scale_dtype)
        if not scheme.symmetric:
            zero_f = torch.round((q - goal / scale.unsqueeze(-1)).mean(-1)).clamp(scheme.zero_min, scheme.qmax)
        q, approx = reconstruct(scale, zero_f)
        error = (target - approx).abs().mean(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_f, best_zero)
        beta *= kappa
        current = float(error.mean())
        if current >= previous:
            break
        previous = current
    zero = best_zero.to(torch.int8)
    return Grid(quantize_with(weight, best_scale, zero, scheme), best_scale, zero, scheme)
