"""Triton kernels, each with a torch reference (batched SVD projection, fused dequantize-matmul).

Not implemented yet: see the project's [merge-svd-aim] and [quantize] issues.
"""
