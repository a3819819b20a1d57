"""Merge methods (task arithmetic, TIES, DARE, SLERP, SVD-based, AIM): one registered pure function per file.

Not implemented yet: see the project's [merge-core] and [merge-svd-aim] issues.
"""
