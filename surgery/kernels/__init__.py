"""Triton kernels, each with a torch reference (Triton on CUDA, the reference elsewhere).

* :mod:`surgery.kernels.svd_projection` -- low-rank reconstruction ``reconstruct(u, s, v)`` = u @ diag(s) @ vᵀ,
  for SVD-based merging (:mod:`surgery.merge.spectral`).
* :mod:`surgery.kernels.dequant_matmul` -- ``x @ dequantize(W)ᵀ`` read straight from compressed-tensors
  ``pack-quantized`` int4/int8 weights (``dequant_matmul(x, packed, scale, bits=4, group_size=128)``).
"""
