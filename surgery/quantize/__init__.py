"""Data-free quantization (RTN, HQQ-style, self-calibrated) into loader-native formats.

Not implemented yet: see the project's [quantize] issue.
"""
