"""llama.cpp's K-quant blocks, vectorised over blocks (numpy; the scale search and rounding in torch, which is
three times faster at it; the ``gguf`` package only dequantizes them)::

    data = quantize_k(weight_rows, "Q4_K")    # float32 (rows, columns), columns a multiple of 256 → uint8 bytes
    approx = dequantize_k(data, "Q4_K")       # what gguf.quants.dequantize (and llama.cpp) read back

A super-block holds 256 weights. Q4_K / Q5_K: 8 sub-blocks of 32, each x = d·sc·q − dmin·m with q 4 or 5 bits
unsigned and the sub-block's scale sc and min m 6-bit integers under the block's fp16 d and dmin (packed in 12
bytes as llama.cpp's get_scale_min_k4 reads them). Q6_K: 16 sub-blocks of 16, x = d·sc·(q − 32) with q 6 bits
and sc an int8.

Each sub-block's scale (and min) is searched as llama.cpp's reference quantizer does (make_qkx2_quants for Q4_K /
Q5_K, make_qx_quants for Q6_K), with fewer candidates: a few reciprocal scales around levels / range, for each the
values they round to and the weighted least-squares scale (and min) for those values, the least weighted error
winning. Then the scales and mins are rounded to the block's 6- or 8-bit grid and every value to the nearest level
of the grid those rounded numbers make. On heavy-tailed 1024 × 4096 weights (one core) this lowers the relative
error from plain min/max by 6.5 % (Q4_K: 0.0985 → 0.0921), 3.7 % (Q5_K) and 2.5 % (Q6_K), about nine tenths of
what llama.cpp's full candidate lists gain, at 45-55 M weights/s against 15-20 M/s for the full lists
(``python benchmarks/kquant_bench.py``).

With an importance matrix (``quantize_k(w, kind, importance)``, ``--imatrix``: one weight per input column) the
searches weigh each value as llama.cpp's ``*_impl`` quantizers do, Q4_K / Q5_K's super-block scales are searched
for the 6-bit ones (make_qp_quants), and llama.cpp's blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1) are written by the same
searches instead of gguf's rounding.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


# (rmin, rdelta, steps) of the reciprocal scales tried per sub-block: (levels + rmin + rdelta·i) / range, i = 0..steps.
# llama.cpp's make_qkx2_quants tries 21 (Q4_K: −1, 0.1, 20) and 16 (Q5_K: −0.5, 0.1, 15); the same span in 4 steps
# keeps nine tenths of the error it gains over plain min/max at a fifth of the cost (see the module docstring).
SEARCH = {15: (-1.0, 2 / 3, 3), 31: (-0.5, 0.5, 3)}
SEARCH_CHUNK = 8192


def _searched_scales_and_mins(sub: np.ndarray, levels: int,
                              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (rows of ``sub``) the scale and (positive) min of x ≈ scale·q − min, q ∈ [0, levels], as
    llama.cpp's make_qkx2_quants finds them: weights w = rms(x) + |x| (or ``weights``, one per value); for each
    reciprocal scale of :data:`SEARCH` the values q it rounds to and the weighted least-squares scale and min for
    them (the min kept ≥ 0); the candidate with the least Σ w (scale·q − min − x)² wins. In torch, a chunk of
    sub-blocks at a time (it stays in cache; numpy's temporaries made this three times slower)."""
    scales, mins = np.empty(len(sub), np.float32), np.empty(len(sub), np.float32)
    for start in range(0, len(sub), SEARCH_CHUNK):
        chunk = torch.from_numpy(sub[start:start + SEARCH_CHUNK])
        weight = None if weights is None else torch.from_numpy(weights[start:start + SEARCH_CHUNK])
        scale, minimum = _search_chunk(chunk, levels, weight)
        scales[start:start + len(chunk)], mins[start:start + len(chunk)] = scale.numpy(), minimum.numpy()
    return scales, mins


def _search_chunk(x: torch.Tensor, levels: int,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if weight is None:
        weight = (x * x).mean(-1, keepdim=True).sqrt_() + x.abs()
    low = x.amin(-1).clamp_(max=0.0)
    span = x.amax(-1) - low
    flat = span <= 0
    span = torch.where(flat, 1.0, span)
    weighted = weight * x
    sum_w, sum_x, sum_xx = weight.sum(-1), weighted.sum(-1), (weighted * x).sum(-1)
    shifted = x - low[:, None]
    rmin, rdelta, steps = SEARCH[levels]
    best_error = torch.full_like(sum_w, float("inf"))
    best_scale, best_offset = span / levels, low  # plain min/max where no fit is solvable; offset = −min
    for step in range(steps + 1):
        reciprocal = (levels + rmin + rdelta * step) / span
        q = torch.round(shifted * reciprocal[:, None]).clamp_(0, levels)
        wq = weight * q
        sum_q, sum_qq, sum_xq = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sum_w * sum_qq - sum_q * sum_q
        solvable = det > 1e-4 * sum_w * sum_qq  # relative: float32 cancellation leaves constant blocks a tiny det
        safe = torch.where(solvable, det, 1.0)
        scale = (sum_w * sum_xq - sum_x * sum_q) / safe
        offset = (sum_qq * sum_x - sum_q * sum_xq) / safe
        positive = offset > 0  # llama.cpp keeps the offset ≤ 0 and refits the scale alone
        scale = torch.where(positive, sum_xq / sum_qq.clamp_min(1e-30), scale)
        offset = torch.where(positive, 0.0, offset)
        scale, offset = torch.where(solvable, scale, best_scale), torch.where(solvable, offset, best_offset)
        # Σ w (s·q + o − x)², expanded over the sums
        error = (scale * scale * sum_qq + offset * offset * sum_w + sum_xx + 2 * scale * offset * sum_q
                 - 2 * scale * sum_xq - 2 * offset * sum_x)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_offset = torch.where(better, scale, best_scale), torch.where(better, offset, best_offset)
    return torch.where(flat, 0.0, best_scale), -torch.where(flat, low, best_offset)


def _scales_and_mins(blocks: np.ndarray, levels: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per super-block d, dmin (fp16 values) and the 6-bit sc, m of its 8 sub-blocks of 32. With ``importance``
    (one per value) as llama.cpp's quantize_row_q4_K_impl: the search weighs each value by importance ·
    √(σ² + x²), σ² twice the super-block's mean x², and d, dmin are searched for the 6-bit sc, m weighted by their
    sub-blocks' summed weights (:func:`_weighted_super_scale`)."""
    weights = None
    if importance is not None:
        sigma2 = 2 * (blocks * blocks).mean(axis=-1, keepdims=True)
        weights = (importance * np.sqrt(sigma2 + blocks * blocks)).astype(np.float32).reshape(-1, 32)
    scale, minimum = _searched_scales_and_mins(blocks.reshape(-1, 32), levels, weights)
    scale, minimum = scale.reshape(len(blocks), 8), minimum.reshape(len(blocks), 8)
    if weights is not None:
        summed = weights.reshape(len(blocks), 8, 32).sum(axis=-1)
        (d, sc), (dmin, m) = _weighted_super_scale(scale, summed), _weighted_super_scale(minimum, summed)
        return _fp16(d), _fp16(dmin), sc, m
    d, dmin = _fp16(scale.max(axis=-1) / 63), _fp16(minimum.max(axis=-1) / 63)
    safe_d, safe_dmin = np.where(d > 0, d, 1.0)[:, None], np.where(dmin > 0, dmin, 1.0)[:, None]
    sc = np.clip(np.rint(scale / safe_d), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(minimum / safe_dmin), 0, 63).astype(np.uint8)
    return d, dmin, sc, m


def _weighted_super_scale(values: np.ndarray, weights: np.ndarray, top: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``values`` (≥ 0) a step d and integers L ∈ [0, top] with values ≈ d·L, as llama.cpp's
    make_qp_quants: reciprocal steps (top + i/10) / max for i = 0, −4..4, the least Σ w (v − L/reciprocal)²
    winning, then d the weighted least-squares step for those L (1 / reciprocal where the weights are all 0).
    llama.cpp then moves single L's while that improves the fit; this does not."""
    peak = values.max(axis=-1)
    safe = np.where(peak > 0, peak, 1.0)[:, None]
    best_error = np.full(len(values), np.inf, dtype=np.float32)
    best_levels = np.zeros(values.shape, dtype=np.float32)
    best_reciprocal = np.ones(len(values), dtype=np.float32)
    for tenths in (0, -4, -3, -2, -1, 1, 2, 3, 4):
        reciprocal = (top + tenths / 10) / safe
        levels = np.clip(np.rint(values * reciprocal), 0, top)
        error = (weights * (values - levels / reciprocal) ** 2).sum(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_levels = np.where(better[:, None], levels, best_levels)
        best_reciprocal = np.where(better, reciprocal[:, 0], best_reciprocal)
    weighted = weights * best_levels
    sum_ll, sum_lv = (weighted * best_levels).sum(axis=-1), (weighted * values).sum(axis=-1)
    step = np.where(sum_ll > 0, sum_lv / np.where(sum_ll > 0, sum_ll, 1.0), 1 / best_reciprocal)
    return np.where(peak > 0, step, 0.0).astype(np.float32), best_levels.astype(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes get_scale_min_k4 reads: bytes 0-3 sc[0:4] | sc[4:8] high bits, 4-7 m[0:4] | m[4:8] high bits,
    8-11 the low nibbles of sc[4:8] and m[4:8]."""
    packed = np.empty((len(sc), 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return packed


def _unsigned_values(blocks, d, dmin, sc, m, levels):
    """q = round((x + dmin·m) / (d·sc)) on [0, levels] per sub-block of 32 (0 where the step is 0)."""
    step = torch.from_numpy((d[:, None] * sc).reshape(len(blocks), 8, 1))
    offset = torch.from_numpy((dmin[:, None] * m).reshape(len(blocks), 8, 1))
    q = torch.from_numpy(blocks).reshape(len(blocks), 8, 32).add(offset).div_(torch.where(step > 0, step, 1.0))
    q = q.round_().clamp_(0, levels).mul_(step > 0)
    return q.to(torch.uint8).numpy().reshape(len(blocks), QK_K)


def _q4_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    d, dmin, sc, m = _scales_and_mins(blocks, 15, importance)
    q = _unsigned_values(blocks, d, dmin, sc, m, 15).reshape(len(blocks), 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(blocks), 128)  # per 64: low nibbles the first 32
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), _pack_scales(sc, m), qs], axis=1)


def _q5_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    d, dmin, sc, m = _scales_and_mins(blocks, 31, importance)
    q = _unsigned_values(blocks, d, dmin, sc, m, 31).reshape(len(blocks), 4, 2, 32)
    low = q & 0x0F
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(len(blocks), 128)
    high = (q >> 4).reshape(len(blocks), 8, 32)  # bit j of qh[l]: the fifth bit of sub-block j's value l
    qh = np.zeros((len(blocks), 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), _pack_scales(sc, m), qh, qs],
                          axis=1)


# Q6_K: the tenths of a level added to 32 in the reciprocal scales tried (llama.cpp's make_qx_quants tries
# −9..9; these three keep nine tenths of its gain).
SIGNED_SEARCH = (-6, 0, 6)


def _searched_signed_scales(sub: np.ndarray, weights: np.ndarray | None = None, half: int = 32) -> np.ndarray:
    """Per sub-block (row of ``sub``) the scale of x ≈ scale·q, q ∈ [−half, half − 1], as llama.cpp's
    make_qx_quants (rmse_type 1) finds it: for each reciprocal −(half + t/10)/extreme of :data:`SIGNED_SEARCH`
    (extreme: the signed value of largest |x|, so it lands near −half) the values q it rounds to and the weighted
    least-squares scale for them under weights x² (or ``weights``); the candidate explaining most (max
    (Σ w x q)² / Σ w q²) wins."""
    scales = np.empty(len(sub), np.float32)
    rows = 2 * SEARCH_CHUNK * 16 // sub.shape[1]
    for start in range(0, len(sub), rows):
        chunk = torch.from_numpy(sub[start:start + rows])
        weight = None if weights is None else torch.from_numpy(weights[start:start + rows])
        scales[start:start + len(chunk)] = _signed_search_chunk(chunk, weight, half)
    return scales


def _signed_search_chunk(x: torch.Tensor, weight: torch.Tensor | None = None, half: int = 32) -> np.ndarray:
    extreme = x.gather(1, x.abs().argmax(-1, keepdim=True)).squeeze(1)
    safe = torch.where(extreme != 0, extreme, 1.0)
    if weight is None:
        weight = x * x
    best_score, best_scale = torch.full_like(extreme, -1.0), extreme / -half
    for tenths in SIGNED_SEARCH:
        q = torch.round(x * (-(half + tenths / 10) / safe)[:, None]).clamp_(-half, half - 1)
        wq = weight * q
        sum_xq, sum_qq = (wq * x).sum(-1), (wq * q).sum(-1)
        score = torch.where(sum_qq > 0, sum_xq * sum_xq / sum_qq.clamp_min(1e-30), -1.0)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sum_xq / sum_qq.clamp_min(1e-30), best_scale)
    return torch.where(extreme != 0, best_scale, 0.0).numpy()


def _q6_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """With ``importance``, the search weighs each value by it alone (llama.cpp's quantize_row_q6_K_impl)."""
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, 16)
    scale = _searched_signed_scales(blocks.reshape(-1, 16), weights).reshape(n, 16)
    peak = np.take_along_axis(scale, np.abs(scale).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    d = _fp16(peak / -128.0)
    safe_d = np.where(d != 0, d, 1.0)[:, None]
    sc = np.clip(np.rint(scale / safe_d), -128, 127).astype(np.int8)
    step = (d[:, None] * sc).reshape(n, 16, 1)
    q = np.where(step != 0, np.clip(np.rint(sub / np.where(step != 0, step, 1.0)), -32, 31), 0)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # per 128: four rows of 32
    ql = np.concatenate([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                         (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=-1).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=1)


ENCODERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# ------------------------------------------------------------------------- blocks of 32 under an importance matrix

def _row_weights(weight: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """llama.cpp's weights for the blocks of 32 (quantize_row_q4_0_impl and its kin): importance · √(σ² + x²), σ² the
    row's mean x²; (rows · columns / 32, 32)."""
    sigma2 = (weight * weight).mean(axis=-1, keepdims=True)
    return (importance[None, :] * np.sqrt(sigma2 + weight * weight)).astype(np.float32).reshape(-1, 32)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1's qh: bit j of a little-endian uint32 is value j's fifth bit, as 4 bytes per block."""
    bits = (q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=-1).astype("<u4").view(np.uint8).reshape(len(q), 4)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Byte j: value j's low four bits, value j + 16's above them."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _symmetric_blocks(blocks: np.ndarray, weights: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 d and unsigned q = round(x / d) + half ∈ [0, 2·half − 1] per block, d searched (make_qx_quants)."""
    d = _fp16(_searched_signed_scales(blocks, weights, half))
    q = np.clip(np.rint(blocks / np.where(d != 0, d, 1.0)[:, None]), -half, half - 1) * (d != 0)[:, None]
    return d, (q + half).astype(np.uint8)


def _q4_0(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    d, q = _symmetric_blocks(blocks, weights, 8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), _nibbles(q)], axis=1)


def _q5_0(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    d, q = _symmetric_blocks(blocks, weights, 16)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), _high_bits(q), _nibbles(q)], axis=1)


def _asymmetric_blocks(blocks: np.ndarray, weights: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """fp16 d and m (= −min ≤ 0) and q = round((x − m) / d) ∈ [0, levels] per block, by the asymmetric search
    (make_qkx2/3_quants' weighted least squares)."""
    scale, minimum = _searched_scales_and_mins(blocks, levels, weights)
    d, m = _fp16(scale), _fp16(-minimum)
    q = np.clip(np.rint((blocks - m[:, None]) / np.where(d > 0, d, 1.0)[:, None]), 0, levels) * (d > 0)[:, None]
    return d, m, q.astype(np.uint8)


def _q5_1(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """x = d·q + m, q ∈ [0, 31]."""
    d, m, q = _asymmetric_blocks(blocks, weights, 31)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           m.astype(np.float16).view(np.uint8).reshape(-1, 2), _high_bits(q), _nibbles(q)], axis=1)


def _q4_1(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """x = d·q + m, q ∈ [0, 15] (Q5_1's search at 4 bits)."""
    d, m, q = _asymmetric_blocks(blocks, weights, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           m.astype(np.float16).view(np.uint8).reshape(-1, 2), _nibbles(q)], axis=1)


WEIGHTED_BLOCKS = {"Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20), "Q5_0": (_q5_0, 22), "Q5_1": (_q5_1, 24)}
IMPORTANCE_KINDS = (*ENCODERS, *WEIGHTED_BLOCKS)  # what an importance matrix changes; Q8_0 ignores it, as llama.cpp


def quantize_k(weight: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``weight``'s rows in K-quant blocks (any kind of :data:`IMPORTANCE_KINDS` with ``importance``).

    Args:
        weight: float (rows, columns), columns a multiple of 256 (of 32 for Q4_0 / Q4_1 / Q5_0 / Q5_1).
        kind: "Q4_K", "Q5_K" or "Q6_K"; with ``importance`` also "Q4_0", "Q4_1", "Q5_0" or "Q5_1".
        importance: optional (columns,) non-negative weights of the input columns (an importance matrix: the mean
            squared activation each column sees): the scales are searched to lower Σ importance · (x − x̂)² rather
            than the plain error, as llama.cpp's quantizers do with ``--imatrix``.

    Returns:
        uint8 (rows, columns / block · bytes per block), as GGUF stores the tensor.

    Example: ``quantize_k(np.random.randn(4, 512).astype(np.float32), "Q6_K").shape   # (4, 420)``
    """
    rows, columns = weight.shape
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if kind in WEIGHTED_BLOCKS:
        if importance is None:
            raise ValueError(f"quantize_k: {kind} is written by gguf.quants without an importance matrix")
        encode, size = WEIGHTED_BLOCKS[kind]
        importance = np.asarray(importance, dtype=np.float32)
        return encode(weight.reshape(-1, 32), _row_weights(weight, importance)).reshape(rows, columns // 32 * size)
    blocks = weight.reshape(-1, QK_K)
    if importance is None:
        return ENCODERS[kind](blocks).reshape(rows, columns // QK_K * BYTES[kind])
    spread = np.broadcast_to(np.asarray(importance, dtype=np.float32)[None, :], weight.shape).reshape(-1, QK_K)
    return ENCODERS[kind](blocks, spread).reshape(rows, columns // QK_K * BYTES[kind])


def dequantize_k(data: np.ndarray, kind: str) -> np.ndarray:
    """The weights K-quant bytes stand for, through the ``gguf`` package's own decoder.

    Args:
        data: uint8 (rows, bytes) from :func:`quantize_k`.
        kind: a GGML type name ("Q4_K", "Q5_K", "Q6_K", "Q4_0", ...).

    Returns:
        float32 (rows, columns).

    Example: ``dequantize_k(quantize_k(weight, "Q4_K"), "Q4_K")``
    """
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


__all__ = ["BYTES", "IMPORTANCE_KINDS", "QK_K", "dequantize_k", "quantize_k"]
