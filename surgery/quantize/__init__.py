"""Data-free quantization (RTN, HQQ-style, self-calibrated) into loader-native formats, and its verification::

    from surgery.quantize import QuantizeConfig, VerifyConfig, quantize, verify
    quantize(QuantizeConfig("org/model", "model-w4", bits=4, group_size=128, scheme="sym", method="hqq"))
    report = verify(VerifyConfig("model-w4", reference="org/model")).summary()   # per-layer errors, KL, top-1

Modules: grid.py (RTN and HQQ on integer grids), methods.py (the registered methods: rtn, hqq, selfcal),
formats/ (the registered formats, one module each: compressed-tensors, GPTQ v1, GGUF Q4_0 / Q8_0, MXFP4), presets.py,
packing.py (integers packed into int32 words),
groups.py (group sizes per module where the request does not divide), selfcal.py (data-free self-calibration),
engine.py (QuantizeConfig and the streaming command, one path for every format), verify.py (per-layer and
end-to-end checks, for every format).
"""

from surgery.quantize.engine import QuantizeConfig, QuantizeResult, quantize
from surgery.quantize.verify import VerifyConfig, VerifyResult, verify

__all__ = ["QuantizeConfig", "QuantizeResult", "VerifyConfig", "VerifyResult", "quantize", "verify"]
