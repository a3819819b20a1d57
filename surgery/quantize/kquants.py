"""llama.cpp's K-quant blocks written in numpy, vectorised over blocks (the ``gguf`` package only dequantizes
them)::

    data = quantize_k(weight_rows, "Q4_K")    # float32 (rows, columns), columns a multiple of 256 → uint8 bytes
    approx = dequantize_k(data, "Q4_K")       # what gguf.quants.dequantize (and llama.cpp) read back

A super-block holds 256 weights. Q4_K / Q5_K: 8 sub-blocks of 32, each x = d·sc·q − dmin·m with q 4 or 5 bits
unsigned and the sub-block's scale sc and min m 6-bit integers under the block's fp16 d and dmin (packed in 12
bytes as llama.cpp's get_scale_min_k4 reads them). Q6_K: 16 sub-blocks of 16, x = d·sc·(q − 32) with q 6 bits
and sc an int8. Rounding is to nearest: per sub-block the range [min(x, 0), max(x)] (Q4_K, Q5_K) or the signed
extreme mapped to −32 (Q6_K), its scale and min then rounded to the block's 6- or 8-bit grid, and the values to
the grid those rounded numbers make, so each weight errs at most half a step of the scale it is stored with.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def _scales_and_mins(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per super-block d, dmin (fp16 values) and the 6-bit sc, m of its 8 sub-blocks of 32."""
    sub = blocks.reshape(len(blocks), 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    high = np.maximum(sub.max(axis=-1), low)
    scale, minimum = (high - low) / levels, -low
    d, dmin = _fp16(scale.max(axis=-1) / 63), _fp16(minimum.max(axis=-1) / 63)
    safe_d, safe_dmin = np.where(d > 0, d, 1.0)[:, None], np.where(dmin > 0, dmin, 1.0)[:, None]
    sc = np.clip(np.rint(scale / safe_d), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(minimum / safe_dmin), 0, 63).astype(np.uint8)
    return d, dmin, sc, m


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes get_scale_min_k4 reads: bytes 0-3 sc[0:4] | sc[4:8] high bits, 4-7 m[0:4] | m[4:8] high bits,
    8-11 the low nibbles of sc[4:8] and m[4:8]."""
    packed = np.empty((len(sc), 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return packed


def _unsigned_values(blocks, d, dmin, sc, m, levels):
    step = (d[:, None] * sc).reshape(len(blocks), 8, 1)
    offset = (dmin[:, None] * m).reshape(len(blocks), 8, 1)
    safe = np.where(step > 0, step, 1.0)
    q = np.rint((blocks.reshape(len(blocks), 8, 32) + offset) / safe)
    return np.where(step > 0, np.clip(q, 0, levels), 0).astype(np.uint8).reshape(len(blocks), QK_K)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m = _scales_and_mins(blocks, 15)
    q = _unsigned_values(blocks, d, dmin, sc, m, 15).reshape(len(blocks), 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(blocks), 128)  # per 64: low nibbles the first 32
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), _pack_scales(sc, m), qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m = _scales_and_mins(blocks, 31)
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


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    extreme = np.take_along_axis(sub, np.abs(sub).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = extreme / -32.0  # the signed extreme lands on −32, so all 64 levels are used
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


def quantize_k(weight: np.ndarray, kind: str) -> np.ndarray:
    """``weight``'s rows in K-quant blocks.

    Args:
        weight: float (rows, columns), columns a multiple of 256.
        kind: "Q4_K", "Q5_K" or "Q6_K".

    Returns:
        uint8 (rows, columns / 256 · bytes per block), as GGUF stores the tensor.

    Example: ``quantize_k(np.random.randn(4, 512).astype(np.float32), "Q6_K").shape   # (4, 420)``
    """
    rows, columns = weight.shape
    blocks = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, QK_K)
    return ENCODERS[kind](blocks).reshape(rows, columns // QK_K * BYTES[kind])


def dequantize_k(data: np.ndarray, kind: str) -> np.ndarray:
    """The weights K-quant bytes stand for, through the ``gguf`` package's own decoder.

    Args:
        data: uint8 (rows, bytes) from :func:`quantize_k`.
        kind: "Q4_K", "Q5_K" or "Q6_K".

    Returns:
        float32 (rows, columns).

    Example: ``dequantize_k(quantize_k(weight, "Q4_K"), "Q4_K")``
    """
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


__all__ = ["BYTES", "QK_K", "dequantize_k", "quantize_k"]
