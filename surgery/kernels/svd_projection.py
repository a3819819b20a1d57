"""Batched projection onto top-k singular subspaces, and low-rank reconstruction: Triton kernels, torch reference.

Usage::

    import torch
    from surgery.kernels.svd_projection import project, reconstruct

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # delta: (B, m, n)
    u, s, v = u[..., :k], s[..., :k], vh[..., :k, :].mT             # (B, m, k), (B, k), (B, n, k)

    kept = project(u, x, v)         # u @ (uᵀ @ x @ v) @ vᵀ: x on the top-k subspaces; x's dtype
    low_rank = reconstruct(u, s, v)  # u @ diag(s) @ vᵀ; u's dtype unless out_dtype=...

    project(u[0], x[0], v[0])       # unbatched: (m, k), (m, n), (n, k) -> (m, n)
    project(u, x, v, backend="torch")  # "auto" (default), "torch" or "triton"

``backend="auto"`` runs the Triton kernels when every tensor is a float16/bfloat16 CUDA tensor and triton imports
(float32 goes to cuBLAS, whose float32 GEMMs beat the kernels' non-tensor-core float32 dots), else the torch
reference (:func:`project_reference`, :func:`reconstruct_reference`: float32 math, cast at the end).
``backend="triton"`` insists; on CPU it needs ``TRITON_INTERPRET=1`` in the environment before this module is
imported (triton picks the interpreter when a kernel is decorated, i.e. at import).

How :func:`project` runs on the GPU, for x of shape (B, m, n) and rank k:

1. ``y = x @ v`` (B, m, k) -- a Triton kernel that reads x exactly once: each program owns a block of rows and
   streams across n. When k needs several accumulator chunks, the programs of one row block are launched side
   by side, so the repeated reads of that block come from L2.
2. ``w = u @ (uᵀ @ y)`` (B, m, k) -- two small cuBLAS matmuls (k x k core), negligible next to x.
3. ``out = w @ vᵀ`` (B, m, n) -- a Triton GEMM with inner dimension k that writes x's dtype.

The bytes that matter are one read of x and one write of the output; the torch chain
``u @ ((uᵀ @ x) @ v) @ vᵀ`` moves them too, so the kernels win only by running those two passes closer to the
memory bandwidth (``benchmarks/svd_projection_bench.py`` measures it). :func:`reconstruct` is step 3 alone, with
s applied to u's columns inside the kernel.

Precision: every GEMM accumulates in float32. For float16/bfloat16 x, the GEMM operands and the intermediates y
and w are in x's dtype, as in the torch chain run in that dtype; float32 x stays float32 throughout (TF32 only
if ``torch.backends.cuda.matmul.allow_tf32`` is set). Supported dtypes: float16, bfloat16, float32.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels do not ship triton; the torch backend still works
    triton = tl = None

__all__ = ["project", "reconstruct", "project_reference", "reconstruct_reference", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Read once, at import, like triton.jit, which picks the interpreter when a kernel is decorated.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# In the interpreter (triton 3.9) tl.dot on bfloat16 operands multiplies the raw uint16 bit patterns numpy holds
# bfloat16 in, so there the kernels upcast dot operands to float32. tests/test_kernels_svd.py pins the bug.
_UPCAST_DOT_OPERANDS = _INTERPRETING


# ----------------------------------------------------------------------------------------------- public API


def project(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``u @ (uᵀ @ x @ v) @ vᵀ``: x projected onto the column spaces of u (left) and v (right).

    Shapes (B, m, k), (B, m, n), (B, n, k) -> (B, m, n), or unbatched (m, k), (m, n), (n, k) -> (m, n). u and v
    are meant to have orthonormal columns (top-k singular vectors). Returns x's dtype; float32 accumulation::

        kept = project(u, x, v)                    # Triton on CUDA, torch elsewhere
        kept = project(u, x, v, backend="torch")   # always the reference
    """
    _check_project_shapes(u, x, v)
    if _choose_backend(backend, (u, x, v), x.dtype) == "torch":
        return project_reference(u, x, v)
    return _batched(_project_triton, u, x, v)


def reconstruct(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``u @ diag(s) @ vᵀ``: the rank-k matrix of singular vectors u, v and singular values s.

    Shapes (B, m, k), (B, k), (B, n, k) -> (B, m, n), or unbatched (m, k), (k,), (n, k) -> (m, n). The result
    has ``out_dtype`` (default: u's dtype); float32 accumulation::

        low_rank = reconstruct(u, s, v, out_dtype=torch.bfloat16)
    """
    _check_reconstruct_shapes(u, s, v)
    out_dtype = out_dtype or u.dtype
    if _choose_backend(backend, (u, s, v), out_dtype) == "torch":
        return reconstruct_reference(u, s, v, out_dtype=out_dtype)
    return _batched(lambda u3, s2, v3: _times_vt(u3, v3, out_dtype, scale=s2), u, s, v)


def project_reference(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`project` in plain torch: float32 math, cast to x's dtype at the end."""
    _check_project_shapes(u, x, v)
    u32, v32 = u.float(), v.float()
    core = u32.mT @ x.float() @ v32  # (.., k, k)
    return (u32 @ core @ v32.mT).to(x.dtype)


def reconstruct_reference(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`reconstruct` in plain torch: float32 math, cast to ``out_dtype`` (default u's dtype) at the end."""
    _check_reconstruct_shapes(u, s, v)
    scaled = u.float() * s.float().unsqueeze(-2)
    return (scaled @ v.float().mT).to(out_dtype or u.dtype)


# ------------------------------------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _dims(*sizes) -> str:
    """``(2, 70, k)``: a shape with symbolic sizes, for messages."""
    return "(" + ", ".join(map(str, sizes)) + ("," if len(sizes) == 1 else "") + ")"


def _check_project_shapes(u, x, v) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"project: x must be (m, n) or (batch, m, n), got shape {_shape(x)}")
    if u.ndim != x.ndim or v.ndim != x.ndim:
        raise ValueError(f"project: u, x, v must all be batched (3-D) or all unbatched (2-D), got shapes "
                         f"{_shape(u)}, {_shape(x)}, {_shape(v)}")
    *batch, m, n = x.shape
    if tuple(u.shape[:-1]) != (*batch, m):
        raise ValueError(f"project: x has shape {_shape(x)}, so u must be {_dims(*batch, m, 'k')}, got {_shape(u)}")
    if tuple(v.shape[:-1]) != (*batch, n):
        raise ValueError(f"project: x has shape {_shape(x)}, so v must be {_dims(*batch, n, 'k')}, got {_shape(v)}")
    if u.shape[-1] != v.shape[-1] or u.shape[-1] == 0:
        raise ValueError(f"project: u and v need the same rank k >= 1, got u {_shape(u)} and v {_shape(v)}")


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


def _project_triton(u, x, v):
    compute_dtype = x.dtype
    y = _rows_times_v(x, v, compute_dtype)  # the one pass over x
    u = u.to(compute_dtype)
    w = u @ (u.mT @ y)
    return _times_vt(w, v, x.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: only float32 operands care; follow torch's TF32 switch like cuBLAS does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _rows_times_v(x: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ v`` for x (B, m, n), v (B, n, k) -> (B, m, k) in ``out_dtype``, reading x once."""
    batch, m, n = x.shape
    rank = v.shape[-1]
    y = torch.empty((batch, m, rank), dtype=out_dtype, device=x.device)

    def grid(meta):
        return (batch * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(rank, meta["BLOCK_K"]),)

    _rows_times_v_kernel[grid](
        x, v, y, m, n, rank, *x.stride(), *v.stride(), *y.stride(),
        UPCAST_DOT=_UPCAST_DOT_OPERANDS, INPUT_PRECISION=_dot_precision(x.dtype))
    return y


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

# y = x @ v streams x: big row blocks keep the rereads of v (from L2) small; BLOCK_K is the accumulator width.
_ROWS_TIMES_V_TILES = [
    (128, 64, 128, 8, 3),
    (256, 64, 128, 8, 3),
    (64, 64, 128, 4, 4),
    (128, 64, 256, 8, 3),
]
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


@_autotuned(_ROWS_TIMES_V_TILES, key=["m", "n", "rank"])
def _rows_times_v_kernel(
        x_ptr, v_ptr, y_ptr, m, n, rank,
        stride_xb, stride_xm, stride_xn, stride_vb, stride_vn, stride_vk, stride_yb, stride_ym, stride_yk,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: rows [BLOCK_M] x rank chunk [BLOCK_K] of y = x @ v, looping over n."""
    # The rank chunk varies fastest, so the programs that share a row block of x run together (L2 hits).
    pid = tl.program_id(0)
    rank_chunks = tl.cdiv(rank, BLOCK_K)
    per_matrix = tl.cdiv(m, BLOCK_M) * rank_chunks
    b = (pid // per_matrix).to(tl.int64)
    tile = pid % per_matrix
    row_start = ((tile // rank_chunks) * BLOCK_M).to(tl.int64)  # int64 bases: matrices may pass 2^31 elements
    k_start = (tile % rank_chunks) * BLOCK_K
    rows, ks, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)

    x_ptrs = (x_ptr + b * stride_xb + row_start * stride_xm) + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    v_ptrs = (v_ptr + b * stride_vb + k_start * stride_vk) + cols[:, None] * stride_vn + ks[None, :] * stride_vk
    row_ok = rows < m - row_start
    k_ok = ks < rank - k_start
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        col_ok = cols < n - start
        x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        v_tile = tl.load(v_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(x_tile, v_tile.to(x_tile.dtype), acc, UPCAST_DOT, INPUT_PRECISION)
        x_ptrs += BLOCK_N * stride_xn
        v_ptrs += BLOCK_N * stride_vn

    y_ptrs = (y_ptr + b * stride_yb + row_start * stride_ym + k_start * stride_yk) + rows[:, None] * stride_ym \
        + ks[None, :] * stride_yk
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


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
