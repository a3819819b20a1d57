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
    """``(q − zero) · scale`` per group, in float32.

    Args:
        q: the integer values (out, in).
        scale: the per-group scales (out, in / group_size).
        zero: the per-group integer zero points (out, in / group_size).
        group_size: the consecutive input columns sharing a scale.

    Returns:
        The dequantized weight, float32 (out, in).

    Example: ``dequantize(grid.q, grid.scale, grid.zero, 128)   # the same as grid.dequantize()``
    """
    rows, columns = q.shape
    grouped = q.to(torch.float32, copy=True).reshape(rows, -1, group_size)  # a copy: changed in place below
    if zero.any():
        grouped.sub_(zero.float().unsqueeze(-1))
    return grouped.mul_(scale.float().unsqueeze(-1)).reshape(rows, columns)


def _quantize_with(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """q = clamp(round(W / scale) + zero) on the scheme's grid, int8."""
    grouped = _grouped(weight, scheme.group_size)
    q = torch.div(grouped, scale.unsqueeze(-1)).round_()
    if zero.any():
        q.add_(zero.float().unsqueeze(-1))
    return q.clamp_(scheme.qmin, scheme.qmax).to(torch.int8).reshape(weight.shape)


def _rtn_parameters(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of round-to-nearest, as compressed-tensors computes them: symmetric
    scale = amax / ((qmax − qmin) / 2); asymmetric scale = (max − min) / (qmax − qmin) over a range that includes
    0, zero = clamp(qmin − round(min / scale))."""
    grouped = _grouped(weight, scheme.group_size)
    levels = scheme.qmax - scheme.qmin
    tiny = torch.finfo(torch.float32).tiny
    low, high = grouped.amin(-1), grouped.amax(-1)  # no |W| copy (torch.aminmax measured 13× slower than both)
    if scheme.symmetric:
        scale = torch.maximum(low.neg_(), high) / (levels / 2)  # = amax |W|
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = (high - low) / levels
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    zero = (scheme.qmin - torch.round(low / scale)).clamp(scheme.zero_min, scheme.qmax)
    return scale, zero.to(torch.int8)


def _representable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale rounded to the dtype it is stored in (so quantizing with it matches what loaders see)."""
    return scale.to(dtype).float()


def rtn(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.float32) -> Grid:
    """Round-to-nearest on ``weight``'s device (exact arithmetic: the same grid on any device).

    Args:
        weight: the 2-D weight (out, in); ``scheme.group_size`` divides ``in``.
        scheme: bits, group size and symmetry.
        scale_dtype: the dtype the scales are stored in; they are rounded to it before quantizing.

    Returns:
        The :class:`Grid`: int8 values, float32 scales, int8 zero points.

    Example: ``rtn(torch.randn(64, 256), Scheme(bits=4, group_size=128)).dequantize()   # float32 (64, 256)``
    """
    scale, zero = _rtn_parameters(weight, scheme)
    scale = _representable_scale(scale, scale_dtype)
    return Grid(_quantize_with(weight, scale, zero, scheme), scale, zero, scheme)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-threshold of HQQ: sign(x) · relu(|x| − |x|^(p−1) / β)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


def _untouched_below(beta: float, p: float) -> float:
    """A magnitude under which :func:`_shrink_lp` is exactly 0 with a wide margin: there |x|^(p−1)/β ≥ 2|x|, so
    float rounding cannot make |x| − |x|^(p−1)/β positive. 0 (everything is touched) for p ≥ 2::

        _untouched_below(10.0, 0.7)   # ≈ 0.100: 4-bit errors of LLM weights (~0.01) are far below it
    """
    return (2 * beta) ** (-1 / (2 - p)) if p < 2 else 0.0


def _errors(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, from |W − W_r|: the sum of squared errors and the largest absolute error."""
    return magnitude.pow(2).sum(-1), magnitude.amax(-1)


class _BestParameters:
    """Per group, the best parameters seen, judged by the error of the grid the format stores.

    A candidate replaces the best where it lowers the group's squared error ‖W − W_r‖² *and* no weight of the
    group errs by more than RTN's largest error there. The second condition stops HQQ from clipping outliers: its lp
    objective (p < 1) treats a group's few largest weights as a sparse error it may give up, and shrinking the scale
    until they saturate lowers the group's mean |error|. In LLM down projections those weights meet activations
    thousands of times larger than the rest (SmolLM2-135M layer 11: 5.875 at input channel 1229, activations up
    to ~3000; HQQ's scale halved and it became 2.68), so the layer's output error grows fivefold while its weight
    error falls.

    Groups are rows of the flattened (rows · groups, group_size) layout; :meth:`offer` takes candidates for some
    of them by index::

        best = _BestParameters(*_errors((target - approx).abs()), scale, zero)      # RTN's: the ceiling
        best.offer(index, *_errors(magnitude), scale[index], zero[index])
    """

    def __init__(self, error: torch.Tensor, largest: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.error, self.ceiling = error.clone(), largest.clone()
        self.scale, self.zero = scale.clone(), zero.clone()

    def offer(self, index: torch.Tensor, error: torch.Tensor, largest: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor) -> None:
        better = (error < self.error[index]) & (largest <= self.ceiling[index])
        chosen = index[better]
        self.error[chosen] = error[better]
        self.scale[chosen] = scale[better]
        self.zero[chosen] = zero[better]


def _values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Grouped ``(q − zero) · scale`` (float zero; symmetric: ``q · scale``)."""
    if scheme.symmetric:
        return q * scale.unsqueeze(-1)
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def _reconstruct(target: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped ``(q, (q − zero) · scale)`` of ``target`` (float zero, integer-valued; ignored when symmetric)."""
    q = torch.round(target / scale.unsqueeze(-1))
    if not scheme.symmetric:
        q += zero.unsqueeze(-1)
    q.clamp_(scheme.qmin, scheme.qmax)
    return q, _values(q, scale, zero, scheme)


def _fit_parameters(goal: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's closed-form step against ``goal`` = W − W_e with the values ``q`` held: the scale by least squares
    per group (rounded to its stored dtype; kept where the fit is degenerate or not positive), the zero point
    (asymmetric only) rounded to the integer grid."""
    centred = q if scheme.symmetric else q - zero.unsqueeze(-1)
    denominator = (centred * centred).sum(-1)
    fitted = (centred * goal).sum(-1) / denominator.clamp_min(1e-12)
    scale = _representable_scale(torch.where((denominator > 0) & (fitted > 0), fitted, scale), scale_dtype)
    if not scheme.symmetric:
        zero = torch.round((q - goal / scale.unsqueeze(-1)).mean(-1)).clamp(scheme.zero_min, scheme.qmax)
    return scale, zero


class _ActiveGroups:
    """The groups HQQ is still moving, compacted: ``index`` into the flattened (rows · groups) order, and for each
    its target W, values q, scale, zero and largest |W − W_r|, all as of the last step.

    A group whose step left its scale and zero as they were, and whose errors stay below
    :func:`_untouched_below` for every β still to come, is at a fixed point: the next step sees the same q and
    goal W (its sparse error is 0) and so returns the same parameters. :meth:`settle` drops such groups, so each
    step costs only the groups still moving::

        active = _ActiveGroups(target, scale, zero, scheme, torch.bfloat16)
        magnitude = active.reconstruct()                     # RTN's |W − W_r|
        unchanged, magnitude = active.step(beta=10.0, p=0.7)
        active.settle(unchanged & (active.largest < _untouched_below(12.0, 0.7)))
    """

    def __init__(self, target: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                 scale_dtype: torch.dtype):
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.index = torch.arange(target.shape[0], device=target.device)
        self.target, self.scale, self.zero = target, scale, zero

    def reconstruct(self) -> torch.Tensor:
        """q, the squared and largest errors from the current scale and zero; returns |W − W_r|."""
        self.q, approx = _reconstruct(self.target, self.scale, self.zero, self.scheme)
        magnitude = (self.target - approx).abs()
        self.error, self.largest = _errors(magnitude)
        return magnitude

    def __len__(self) -> int:
        return self.index.numel()

    def step(self, beta: float, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One HQQ update of every active group. Returns where its scale and zero came back unchanged, and the
        new |W − W_r|."""
        scale, zero = _fit_parameters(self.target, self.q, self.scale, self.zero, self.scheme, self.scale_dtype)
        # The sparse error W_e is 0 in a group unless its largest error passes the shrink's threshold; only
        # those groups are fitted again, to W − W_e.
        touched = (self.largest > _untouched_below(beta, p)).nonzero().squeeze(1)
        if touched.numel():
            target, q = self.target.index_select(0, touched), self.q.index_select(0, touched)
            old_scale, old_zero = self.scale.index_select(0, touched), self.zero.index_select(0, touched)
            goal = target - _shrink_lp(target - _values(q, old_scale, old_zero, self.scheme), beta, p)
            fitted_scale, fitted_zero = _fit_parameters(goal, q, old_scale, old_zero, self.scheme, self.scale_dtype)
            scale.index_copy_(0, touched, fitted_scale)
            if not self.scheme.symmetric:
                zero.index_copy_(0, touched, fitted_zero)
        unchanged = (scale == self.scale) & (zero == self.zero)
        self.scale, self.zero = scale, zero
        return unchanged, self.reconstruct()

    def settle(self, settled: torch.Tensor) -> None:
        """Drop the groups where ``settled`` is True."""
        if bool(settled.any()):
            moving = (~settled).nonzero().squeeze(1)
            for name in ("index", "target", "q", "scale", "zero", "largest"):
                setattr(self, name, getattr(self, name).index_select(0, moving))


def _betas(beta: float, kappa: float, iterations: int) -> list[float]:
    """β of each step: multiplied by κ after every step."""
    betas = []
    for _ in range(iterations):
        betas.append(beta)
        beta *= kappa
    return betas


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

    All groups step at once; a group that reached a fixed point leaves the active set (:class:`_ActiveGroups`),
    which changes no result. On SmolLM2 about half the groups still moving settle at each step, so the later steps
    cost little; the lp shrink's power is only evaluated in groups whose errors are large enough for it to matter.

    Args:
        weight: the 2-D weight (out, in); ``scheme.group_size`` divides ``in``.
        scheme: bits, group size and symmetry.
        scale_dtype: the dtype the scales are stored in; they are rounded to it at every step.
        iterations: the most refinement steps.
        beta: the starting penalty of the half-quadratic split.
        kappa: the factor ``beta`` grows by at each step.
        p: the lp norm of the sparse error estimate (p < 1).

    Returns:
        The refined :class:`Grid` (the same layout as :func:`rtn`'s).

    Example: ``hqq(weight, Scheme(bits=4, group_size=64, symmetric=False), torch.bfloat16, iterations=10)``
    """
    size = scheme.group_size
    target = _grouped(weight, size).reshape(-1, size)
    scale, zero = _rtn_parameters(weight, scheme)
    scale, zero = _representable_scale(scale, scale_dtype).reshape(-1), zero.float().reshape(-1)
    active = _ActiveGroups(target, scale, zero, scheme, scale_dtype)
    magnitude = active.reconstruct()  # |W − W_r| of every group, for the stopping rule
    best = _BestParameters(active.error, active.largest, scale, zero)
    previous = float(magnitude.mean())
    betas = _betas(beta, kappa, iterations)
    for number, beta in enumerate(betas):
        unchanged, moved = active.step(beta, p)
        best.offer(active.index, active.error, active.largest, active.scale, active.zero)
        magnitude.index_copy_(0, active.index, moved)
        current = float(magnitude.mean())
        if current >= previous or number + 1 == len(betas):
            break
        previous = current
        active.settle(unchanged & (active.largest < _untouched_below(max(betas[number + 1:]), p)))
        if not len(active):
            break
    rows = weight.shape[0]
    scale, zero = best.scale.reshape(rows, -1), best.zero.reshape(rows, -1).to(torch.int8)
    return Grid(_quantize_with(weight, scale, zero, scheme), scale, zero, scheme)
