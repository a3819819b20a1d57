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

    def to(self, device: str | torch.device) -> "Grid":
        """The same grid with its tensors on ``device``."""
        return Grid(self.q.to(device), self.scale.to(device), self.zero.to(device), self.scheme)


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
    """Round-to-nearest on ``weight``'s device (exact arithmetic: the same grid on any device)."""
    scale, zero = rtn_parameters(weight, scheme)
    scale = representable_scale(scale, scale_dtype)
    return Grid(quantize_with(weight, scale, zero, scheme), scale, zero, scheme)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-threshold of HQQ: sign(x) · relu(|x| − |x|^(p−1) / β)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


class _BestParameters:
    """Per group, the best parameters seen, judged by the error of the grid the format stores.

    A candidate replaces the best where it lowers the group's squared error ‖W − W_r‖² *and* no weight of the
    group errs by more than RTN's largest error there. The second condition stops HQQ from clipping outliers: its lp
    objective (p < 1) treats a group's few largest weights as a sparse error it may give up, and shrinking the scale
    until they saturate lowers the group's mean |error|. In LLM down projections those weights meet activations
    thousands of times larger than the rest (SmolLM2-135M layer 11: 5.875 at input channel 1229, activations up
    to ~3000; HQQ's scale halved and it became 2.68), so the layer's output error grows fivefold while its weight
    error falls."""

    def __init__(self, target: torch.Tensor, approx: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.target = target
        self.error, self.ceiling = self._errors(approx)
        self.scale, self.zero = scale.clone(), zero.clone()

    def _errors(self, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: the sum of squared errors and the largest absolute error."""
        difference = self.target - approx
        return difference.pow(2).sum(-1), difference.abs().amax(-1)

    def offer(self, approx: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        error, largest = self._errors(approx)
        better = (error < self.error) & (largest <= self.ceiling)
        self.error = torch.where(better, error, self.error)
        self.scale = torch.where(better, scale, self.scale)
        self.zero = torch.where(better, zero, self.zero)


def _reconstruct(target: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped ``(q, (q − zero) · scale)`` of ``target`` (float zero, integer-valued)."""
    q = (torch.round(target / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(scheme.qmin, scheme.qmax)
    return q, (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def _half_quadratic_step(target: torch.Tensor, q: torch.Tensor, approx: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, beta: float,
                         p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One HQQ update: the sparse error W_e = shrink_lp(W − W_r), then the parameters fitted to W − W_e: the scale
    by least squares per group (rounded to its stored dtype), the zero point (asymmetric only) rounded to the
    integer grid."""
    goal = target - _shrink_lp(target - approx, beta, p)
    centred = q - zero.unsqueeze(-1)
    denominator = (centred * centred).sum(-1)
    fitted = (centred * goal).sum(-1) / denominator.clamp_min(1e-12)
    scale = representable_scale(torch.where((denominator > 0) & (fitted > 0), fitted, scale), scale_dtype)
    if not scheme.symmetric:
        zero = torch.round((q - goal / scale.unsqueeze(-1)).mean(-1)).clamp(scheme.zero_min, scheme.qmax)
    return scale, zero


def hqq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.float32, *, iterations: int = 20,
        beta: float = 10.0, kappa: float = 1.01, p: float = 0.7) -> Grid:
    """HQQ (mobiusml/hqq) constrained to a loader-native grid. Runs on ``weight``'s device.

    HQQ alternates a sparse (lp, p < 1) estimate of the quantization error W_e with a closed-form update of the
    parameters against the target W − W_e. The original moves a float zero point; stock loaders only read integer
    zero points (asymmetric) or none (symmetric), so here the closed-form step updates the scale (least squares per
    group) and, asymmetric only, the zero point, which is rounded to the integer grid at every step. Starts from
    RTN and stops when the mean |W − W_r| stops falling. Per group it keeps RTN's parameters unless a step lowered
    the squared error without any weight erring more than under RTN (:class:`_BestParameters`), so per group it is
    never worse than RTN in either sense.
    """
    target = _grouped(weight, scheme.group_size)
    scale, zero = rtn_parameters(weight, scheme)
    scale, zero_f = representable_scale(scale, scale_dtype), zero.float()
    q, approx = _reconstruct(target, scale, zero_f, scheme)
    best = _BestParameters(target, approx, scale, zero_f)
    previous = float((target - approx).abs().mean())
    for _ in range(iterations):
        scale, zero_f = _half_quadratic_step(target, q, approx, scale, zero_f, scheme, scale_dtype, beta, p)
        q, approx = _reconstruct(target, scale, zero_f, scheme)
        best.offer(approx, scale, zero_f)
        beta *= kappa
        current = float((target - approx).abs().mean())
        if current >= previous:
            break
        previous = current
    zero = best.zero.to(torch.int8)
    return Grid(quantize_with(weight, best.scale, zero, scheme), best.scale, zero, scheme)
