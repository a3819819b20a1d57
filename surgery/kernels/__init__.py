"""Triton kernels, each with a torch reference.

* :mod:`surgery.kernels.svd_projection` -- batched projection onto top-k singular subspaces
  (``project(u, x, v)`` = u @ (uᵀ @ x @ v) @ vᵀ) and low-rank reconstruction (``reconstruct(u, s, v)``), for
  SVD-based merging ([merge-svd-aim] issue). Triton on CUDA, the torch reference elsewhere.
* A fused dequantize-matmul kernel: not implemented yet, see the project's [quantize] issue.
"""
