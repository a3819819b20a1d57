"""``x @ dequantize(W)ᵀ`` reading compressed-tensors ``pack-quantized`` weights directly: Triton kernel, torch reference.

Usage::

    from surgery.kernels.dequant_matmul import dequant_matmul
    y = dequant_matmul(x, packed, scale, zero_packed=None, bits=4, group_size=128)   # x (M, K) -> (M, N)
    y = dequant_matmul(x, packed, scale, bits=4, group_size=128, backend="torch")     # the reference

``packed`` is weight_packed int32 (N, K·bits/32), values q + 2^(bits−1) LSB-first along K; ``scale`` is
weight_scale (N, K/group_size); ``zero_packed`` (asymmetric) is weight_zero_point int32 (ceil(N·bits/32),
K/group_size), packed along N. Weights dequantize to (q − zero)·scale.

``backend="auto"`` runs the kernel for CUDA tensors when triton imports, the torch reference otherwise
(:func:`dequant_matmul_reference`: unpack, dequantize to float32, matmul, cast to x's dtype). ``backend="triton"``
on CPU needs ``TRITON_INTERPRET=1`` set before this module is imported. The kernel tiles N and M, walks K in
blocks, unpacks each weight tile in registers (shift and mask), applies the group's scale and zero, and accumulates
a float32 ``tl.dot``; the int4 weights are read once per M tile, so at decode sizes (M ≤ 16) once.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["dequant_matmul", "dequant_matmul_reference", "unpack_weight"]

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's bf16 tl.dot is broken in triton 3.9 (see surgery/kernels/svd_projection.py): upcast there.
_UPCAST_DOT_OPERANDS = _INTERPRETING


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, zero_packed: torch.Tensor | None, bits: int,
                  group_size: int) -> torch.Tensor:
    """The float32 weight (N, K) of a pack-quantized Linear.

    Args:
        packed: ``weight_packed``, int32 (N, K·bits/32).
        scale: ``weight_scale`` (N, K/group_size).
        zero_packed: ``weight_zero_point``, int32 (ceil(N·bits/32), K/group_size), or None when symmetric.
        bits: 4 or 8.
        group_size: the input columns sharing a scale.

    Returns:
        ``(q − zero)·scale``, float32 (N, K).

    Example: ``unpack_weight(packed, scale, None, 4, 128)   # float32 (N, K)``
    """
    per_word, mask, offset = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    q = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & mask).reshape(packed.shape[0], -1).float() - offset
    n, k = q.shape
    if zero_packed is None:
        zero = torch.zeros_like(scale, dtype=torch.float32)
    else:
        z = (zero_packed.to(torch.int64).T.unsqueeze(-1) >> shifts) & mask  # (groups, words, per_word)
        zero = z.reshape(zero_packed.shape[1], -1)[:, :n].T.float() - offset
    grouped = q.reshape(n, k // group_size, group_size) - zero.unsqueeze(-1)
    return (grouped * scale.float().unsqueeze(-1)).reshape(n, k)


def dequant_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             zero_packed: torch.Tensor | None = None, *, bits: int = 4,
                             group_size: int = 128) -> torch.Tensor:
    """The torch reference of :func:`dequant_matmul`: unpack, dequantize to float32, matmul, cast to x's dtype.

    Args:
        x: the inputs (M, K).
        packed: ``weight_packed``, int32 (N, K·bits/32).
        scale: ``weight_scale`` (N, K/group_size).
        zero_packed: ``weight_zero_point`` (asymmetric), or None.
        bits: 4 or 8.
        group_size: the input columns sharing a scale.

    Returns:
        ``x @ Wᵀ`` (M, N) in x's dtype.

    Example: ``dequant_matmul_reference(x, packed, scale, bits=4, group_size=128)``
    """
    weight = unpack_weight(packed, scale, zero_packed, bits, group_size)
    return (x.float() @ weight.T).to(x.dtype)


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_packed: torch.Tensor | None = None,
                   *, bits: int = 4, group_size: int = 128, backend: str = "auto") -> torch.Tensor:
    """``x @ dequantize(W)ᵀ`` straight from the packed weights (the module docstring has the layout).

    Args:
        x: the inputs (M, K).
        packed: ``weight_packed``, int32 (N, K·bits/32).
        scale: ``weight_scale`` (N, K/group_size).
        zero_packed: ``weight_zero_point`` (asymmetric), or None.
        bits: 4 or 8.
        group_size: the input columns sharing a scale.
        backend: ``"auto"`` (the kernel for CUDA tensors when triton imports), ``"torch"`` or ``"triton"``.

    Returns:
        (M, N) in x's dtype; ValueError on mismatched shapes or an unavailable backend.

    Example: ``y = dequant_matmul(x, packed, scale, zero_packed=None, bits=4, group_size=128)``
    """
    if x.ndim != 2 or packed.ndim != 2 or x.shape[1] != packed.shape[1] * 32 // bits:
        raise ValueError(f"dequant_matmul: x (M, K) and packed (N, K·{bits}/32) expected, got {tuple(x.shape)} and "
                         f"{tuple(packed.shape)}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend {backend!r}: expected auto, torch or triton")
    if backend == "auto":
        backend = "triton" if triton is not None and x.is_cuda else "torch"
    if backend == "torch":
        return dequant_matmul_reference(x, packed, scale, zero_packed, bits=bits, group_size=group_size)
    if triton is None:
        raise ValueError("dequant_matmul: triton is not installed")
    if not x.is_cuda and not _INTERPRETING:
        raise ValueError("dequant_matmul: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    return _triton(x, packed, scale, zero_packed, bits, group_size)


def _triton(x, packed, scale, zero_packed, bits, group_size):
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if _INTERPRETING else 64
    block_k = min(group_size, 64 if _INTERPRETING else 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    asym = zero_packed is not None
    zeros = zero_packed if asym else packed  # any pointer; unused when symmetric
    _kernel[grid](
        x, packed, scale, zeros, out, m, n, k,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
        BITS=bits, GROUP=group_size, ASYM=asym, UPCAST=_UPCAST_DOT_OPERANDS or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


if triton is not None:
    @triton.jit
    def _kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                stride_om, stride_on,
                BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        n_ok = rows_n < N
        m_ok = rows_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_ok = k < K
            words = tl.load(w_ptr + rows_n[:, None] * stride_wn + (k // PER_WORD)[None, :] * stride_wk,
                            mask=n_ok[:, None] & k_ok[None, :], other=0)
            q = ((words >> ((k % PER_WORD) * BITS)[None, :]) & MASK).to(tl.float32)
            group = k0 // GROUP  # BLOCK_K divides GROUP: one group per tile
            s = tl.load(s_ptr + rows_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            if ASYM:
                zw = tl.load(z_ptr + (rows_n // PER_WORD) * stride_zn + group * stride_zg, mask=n_ok, other=0)
                z = ((zw >> ((rows_n % PER_WORD) * BITS)) & MASK).to(tl.float32)
            else:
                z = tl.full((BLOCK_N,), OFFSET, tl.float32)
            w = (q - z[:, None]) * s[:, None]  # (BLOCK_N, BLOCK_K)
            a = tl.load(x_ptr + rows_m[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
        tl.store(out_ptr + rows_m[:, None] * stride_om + rows_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
