"""Low-rank reconstruction from singular factors: a Triton kernel, and its torch reference.

Usage::

    import torch
    from surgery.kernels.svd_projection import reconstruct

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # delta: (B, m, n)
    u, s, v = u[..., :k], s[..., :k], vh[..., :k, :].mT             # (B, m, k), (B, k), (B, n, k)

    low_rank = reconstruct(u, s, v)                       # u @ diag(s) @ vᵀ; u's dtype unless out_dtype=...
    reconstruct(u[0], s[0], v[0])                         # unbatched: (m, k), (k,), (n, k) -> (m, n)
    reconstruct(u, s, v, backend="torch")                 # "auto" (default), "torch" or "triton"

SVD-based merges (:mod:`surgery.merge.spectral`) rebuild each task matrix's truncation with it.

``backend="auto"`` runs the Triton kernel when every tensor is a float16/bfloat16 CUDA tensor and triton imports
(float32 goes to cuBLAS, whose float32 GEMMs beat the kernel's non-tensor-core float32 dots), else the torch
reference (:func:`reconstruct_reference`: float32 math, cast at the end). ``backend="triton"`` insists; on CPU it
needs ``TRITON_INTERPRET=1`` in the environment before this module is imported (triton picks the interpreter when a
kernel is decorated, i.e. at import).

The kernel is one GEMM with inner dimension k, ``out = (u * s) @ vᵀ``, s applied to u's columns inside it: the
bytes that matter are the one write of the output (``benchmarks/svd_projection_bench.py`` measures it).

Precision: the GEMM accumulates in float32, its operands are in the output dtype. Supported dtypes: float16,
bfloat16, float32.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels do not ship triton; the torch backend still works
    triton = tl = None

__all__ = ["reconstruct", "reconstruct_reference", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Read once, at import, like triton.jit, which picks the interpreter when a kernel is decorated.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# In the interpreter (triton 3.9) tl.dot on bfloat16 operands multiplies the raw uint16 bit patterns numpy holds
# bfloat16 in, so there the kernels upcast dot operands to float32. tests/test_kernels_svd.py pins the bug.
_UPCAST_DOT_OPERANDS = _INTERPRETING


# ----------------------------------------------------------------------------------------------- public API


def reconstruct(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``u @ diag(s) @ vᵀ``: the rank-k matrix of singular vectors u, v and singular values s.

    Args:
        u: left singular vectors, (B, m, k) or unbatched (m, k).
        s: singular values, (B, k) or (k,).
        v: right singular vectors, (B, n, k) or (n, k).
        out_dtype: the result's dtype (default: u's).
        backend: "auto", "torch" or "triton".

    Returns:
        (B, m, n) or (m, n), accumulated in float32.

    Example::

        low_rank = reconstruct(u, s, v, out_dtype=torch.bfloat16)
    """
    _check_reconstruct_shapes(u, s, v)
    out_dtype = out_dtype or u.dtype
    if _choose_backend(backend, (u, s, v), out_dtype) == "torch":
        return reconstruct_reference(u, s, v, out_dtype=out_dtype)
    return _batched(lambda u3, s2, v3: _times_vt(u3, v3, out_dtype, scale=s2), u, s, v)


def reconstruct_reference(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`reconstruct` in plain torch: float32 math, cast to ``out_dtype`` (default u's dtype) at the end.

    Args:
        u: the left factors (B, m, k), or (m, k) unbatched.
        s: the singular values (B, k), or (k,).
        v: the right factors (B, n, k), or (n, k) (vh's rows transposed).
        out_dtype: the output dtype; None keeps u's.

    Returns:
        ``u @ diag(s) @ vᵀ``: (B, m, n), or (m, n).

    Example: ``reconstruct_reference(u, s, v, out_dtype=torch.bfloat16)   # (B, m, n) bfloat16``
    """
    _check_reconstruct_shapes(u, s, v)
    scaled = u.float() * s.float().unsqueeze(-2)
    return (scaled @ v.float().mT).to(out_dtype or u.dtype)


# ------------------------------------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _dims(*sizes) -> str:
    """``(2, 70, k)``: a shape with symbolic sizes, for messages."""
    return "(" + ", ".join(map(str, sizes)) + ("," if len(sizes) == 1 else "") + ")"


def _check_reconstruct_shapes(u, s, v) -> None:
    if u.ndim not in (2, 3):
        raise ValueError(f"reconstruct: u must be (m, k) or (batch, m, k), got shape {_shape(u)}")
    if v.ndim != u.ndim or s.ndim != u.ndim - 1:
        raise ValueError(f"reconstruct: expected u (batch, m, k), s (batch, k), v (batch, n, k) or u (m, k), "
                         f"s (k,), v (n, k), got shapes {_shape(u)}, {_shape(s)}, {_shape(v)}")
    *batch, _, k = u.shape
    if _shape(s) != (*batch, k) or _shape(v)[:-2] != tuple(batch) or v.shape[-1] != k or k == 0:
        raise ValueError(f"reconstruct: u has shape {_shape(u)}, so s must be {_dims(*batch, k)} and v "
                         f"{_dims(*batch, 'n', k)} with k >= 1, got s {_shape(s)} and v {_shape(v)}")


def _choose_backend(backend: str, tensors, out_dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    problem = _triton_problem(tensors, out_dtype)
    if backend == "auto":  # float32 operands: cuBLAS (the kernels' float32 dots have no tensor cores without TF32)
        on_cuda = all(t.device.type == "cuda" for t in tensors)
        half = all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
        return "triton" if problem is None and on_cuda and half else "torch"
    if problem is not None:
        raise ValueError(f"backend='triton' cannot run here: {problem}")
    return "triton"


def _triton_problem(tensors, out_dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take these tensors, or None if they can."""
    if triton is None:
        return "triton is not installed"
    unsupported = {t.dtype for t in tensors} - set(KERNEL_DTYPES) | {out_dtype} - set(KERNEL_DTYPES)
    if unsupported:
        return f"dtype {', '.join(sorted(map(str, unsupported)))} (the kernels take float16, bfloat16, float32)"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    device = devices.pop()
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRETING):
        return None
    return f"tensors on {device} (the kernels need CUDA, or TRITON_INTERPRET=1 set before import for CPU)"


# ----------------------------------------------------------------------------------------- triton path


def _batched(run, *tensors):
    """Run ``run`` on 3-D tensors; unbatched inputs get a batch of one and lose it again."""
    if tensors[0].ndim == 3:
        return run(*tensors)
    return run(*(t.unsqueeze(0) for t in tensors)).squeeze(0)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: only float32 operands care; follow torch's TF32 switch like cuBLAS does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _times_vt(w: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype, scale: torch.Tensor | None = None):
    """``w @ vᵀ`` (or ``(w * scale) @ vᵀ``) for w (B, m, k), v (B, n, k), scale (B, k) -> (B, m, n)."""
    batch, m, rank = w.shape
    n = v.shape[1]
    out = torch.empty((batch, m, n), dtype=out_dtype, device=w.device)
    scale_strides = scale.stride() if scale is not None else (0, 0)

    def grid(meta):
        return (batch * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _times_vt_kernel[grid](
        w, v, scale, out, m, n, rank, *w.stride(), *v.stride(), *scale_strides, *out.stride(),
        HAS_SCALE=scale is not None, UPCAST_DOT=_UPCAST_DOT_OPERANDS, INPUT_PRECISION=_dot_precision(out_dtype))
    return out


# ------------------------------------------------------------------------------------------ tile configs


def _configs(candidates):
    """``triton.Config`` objects from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in candidates]


def _fit_block_k(configs, named_args, **_):
    """Autotune pruning: BLOCK_K no wider than the rank padded to a power of two (>= 16, tl.dot's minimum)."""
    widest = max(16, triton.next_power_of_2(named_args["rank"]))
    fitted = {}
    for config in configs:
        kwargs = {**config.kwargs, "BLOCK_K": min(config.kwargs["BLOCK_K"], widest)}
        key = (tuple(sorted(kwargs.items())), config.num_warps, config.num_stages)
        fitted.setdefault(key, triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages))
    return list(fitted.values())


# The interpreter runs one small config (no autotuning there), so that small test matrices still cross every
# block edge: several row/column blocks, ragged tails, and several rank chunks once k > 16.
_INTERPRETER_TILES = [(32, 32, 16, 4, 1)]

# out = w @ vᵀ writes the output: square-ish output tiles, inner dimension (the rank) in BLOCK_K steps.
_TIMES_VT_TILES = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]


def _autotuned(tiles, key):
    def decorate(kernel):
        if triton is None:
            return kernel
        chosen = _INTERPRETER_TILES if _INTERPRETING else tiles
        return triton.autotune(configs=_configs(chosen), key=key,
                               prune_configs_by={"early_config_prune": _fit_block_k})(triton.jit(kernel))
    return decorate


def _jit(function):
    return function if triton is None else triton.jit(function)


# ---------------------------------------------------------------------------------------------- kernels


@_jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@_autotuned(_TIMES_VT_TILES, key=["m", "n", "rank", "HAS_SCALE"])
def _times_vt_kernel(
        w_ptr, v_ptr, s_ptr, out_ptr, m, n, rank,
        stride_wb, stride_wm, stride_wk, stride_vb, stride_vn, stride_vk, stride_sb, stride_sk,
        stride_ob, stride_om, stride_on,
        HAS_SCALE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: an output tile [BLOCK_M, BLOCK_N] of out = (w * s) @ vᵀ, looping over the rank."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(n, BLOCK_N)
    per_matrix = tl.cdiv(m, BLOCK_M) * col_blocks
    b = (pid // per_matrix).to(tl.int64)
    tile = pid % per_matrix
    row_start = ((tile // col_blocks) * BLOCK_M).to(tl.int64)  # int64 bases: matrices may pass 2^31 elements
    col_start = ((tile % col_blocks) * BLOCK_N).to(tl.int64)
    rows, cols, ks = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)

    w_ptrs = (w_ptr + b * stride_wb + row_start * stride_wm) + rows[:, None] * stride_wm + ks[None, :] * stride_wk
    vt_ptrs = (v_ptr + b * stride_vb + col_start * stride_vn) + ks[:, None] * stride_vk \
        + cols[None, :] * stride_vn  # a vᵀ tile
    row_ok = rows < m - row_start
    col_ok = cols < n - col_start
    dot_dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, rank, BLOCK_K):
        k_ok = ks < rank - start
        w_tile = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        vt_tile = tl.load(vt_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_SCALE:
            s = tl.load(s_ptr + b * stride_sb + (start + ks) * stride_sk, mask=k_ok, other=0.0)
            w_tile = w_tile.to(tl.float32) * s.to(tl.float32)[None, :]
        acc = _dot(w_tile.to(dot_dtype), vt_tile.to(dot_dtype), acc, UPCAST_DOT, INPUT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        vt_ptrs += BLOCK_K * stride_vk

    out_ptrs = (out_ptr + b * stride_ob + row_start * stride_om + col_start * stride_on) \
        + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(dot_dtype), mask=row_ok[:, None] & col_ok[None, :])
