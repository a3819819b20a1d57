"""Data-free quantization (RTN, HQQ-style, self-calibrated) into loader-native formats, and its verification::

    from surgery.quantize import quantize, verify
    quantize("org/model", "model-w4", bits=4, group_size=128, scheme="sym", method="hqq")
    report = verify("model-w4", reference="org/model")   # per-layer errors, end-to-end KL and top-1

Modules: grid.py (RTN and HQQ on integer grids), groups.py (group sizes per module where the request does not
divide), formats.py (compressed-tensors pack-quantized, GPTQ v1), gguf_format.py (GGUF Q4_0 / Q8_0, llama family),
selfcal.py (data-free self-calibration: self-generated text, disagreement-margin selection, GPTQ on the format's
grid), engine.py (the streaming command), verify.py (per-layer and end-to-end checks).
"""

from surgery.quantize.engine import quantize
from surgery.quantize.verify import verify

__all__ = ["quantize", "verify"]
