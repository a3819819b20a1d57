"""Quantized checkpoints read as the model they stand for: compressed-tensors (pack-quantized integers,
float-quantized FP8 per tensor, channel or block, NVFP4 and MXFP4 pack-quantized), DeepSeek-V3-style FP8
(``quant_method: fp8``, ``weight_scale_inv`` per 128×128 block: DeepSeek-V3/R1, Qwen3-FP8), GPTQ (v1 and v2,
act-order ``g_idx`` included) and AutoAWQ's GEMM layout. Each quantized module is one ``<module>.weight`` in the
config's dtype (bfloat16 unless it names float32 or float16), decoded by the format that reads it
(surgery/quantize/formats) when it is read; the stored side tensors (packed values, scales, zero points, activation
scales) are not listed, and the config loses its ``quantization_config``. So merge, quantize, moe and convert take
such checkpoints as they are published::

    with open_checkpoint("deepseek-ai/DeepSeek-V3") as ckpt:      # wrapped by open_checkpoint
        ckpt.get("model.layers.3.mlp.experts.0.up_proj.weight").dtype   # torch.bfloat16

``open_checkpoint(source, raw=True)`` (verify, extend) sees the stored tensors instead.
"""

from __future__ import annotations

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, DecodedView, TensorInfo, natural_key


# what only a quantized checkpoint holds: its tensors are not the weights, so they are never read as such
QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale_inv", ".qweight", ".qzeros")
DECODE_ERRORS = (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError, StopIteration)


def input_format(ckpt: Checkpoint):
    """The registered quantization format that reads ``ckpt`` as an input.

    Args:
        ckpt: a checkpoint as its reader gives it.

    Returns:
        The format, or None (not quantized, or a format its reader decodes itself, such as GGUF); BadInput for a
        checkpoint holding quantized tensors none of them reads (its quantization_config missing, unknown or
        malformed).

    Example: ``input_format(SafetensorsCheckpoint("m", path)).name   # "fp8-block" for DeepSeek-V3``
    """
    from surgery.quantize.formats import FORMATS

    quantization = (ckpt.config or {}).get("quantization_config")
    try:
        fmt = next((fmt for fmt in FORMATS.values() if fmt.reads_inputs and fmt.reads(ckpt)), None) \
            if isinstance(quantization, dict) else None
    except DECODE_ERRORS as err:
        raise BadInput(f"{ckpt.source}: its quantization_config is malformed ({type(err).__name__}: {err})") from None
    if fmt is None:
        quantized = next((name for name, info in ckpt.tensors.items() if name.endswith(QUANTIZED_SUFFIXES)
                          or info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
                          or info.dtype == torch.int8 and name.endswith(".weight")), None)
        if quantized is not None:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            raise BadInput(f"{ckpt.source}: tensor {quantized!r} is quantized, but its config.json's "
                           f"quantization_config ({'quant_method ' + repr(method) if method else 'missing'}) is not "
                           f"one this tool decodes (compressed-tensors, fp8, gptq, awq, mxfp4)")
    return fmt


class DecodedQuantized(DecodedView):
    """``inner`` with each quantized module's stored tensors replaced by its decoded ``weight`` (see the module
    docstring); BadInput on opening for a module whose stored tensors are missing, and on reading for values that
    do not decode to a finite weight of the declared shape."""

    def __init__(self, inner: Checkpoint, fmt):
        super().__init__(inner)
        self.fmt = fmt
        self.modules: dict[str, str] = {}  # decoded weight name → module
        modules = fmt.quantized_modules(inner)
        if not modules:
            raise BadInput(f"{self.source}: its quantization_config says {fmt.name}, but it holds no quantized "
                           f"modules")
        try:
            fmt.stored_scheme(inner)
        except DECODE_ERRORS as err:
            raise BadInput(f"{self.source}: its {fmt.name} quantization_config is malformed "
                           f"({type(err).__name__}: {err})") from None
        quantized, stored_in = set(modules), {}  # module → a file holding its tensors
        tensors: dict[str, TensorInfo] = {}
        for name, info in inner.tensors.items():
            module, _, local = name.rpartition(".")
            if module in quantized and local != "bias":  # its stored side: packed values, scales, zero points...
                stored_in.setdefault(module, info.file)
                continue
            if local in fmt.stored_names or info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise BadInput(f"{self.source}: tensor {name!r} is part of a {fmt.name} module whose other stored "
                               f"tensors are missing or malformed")
            tensors[name] = info
        for module in modules:
            try:
                shape = fmt.decoded_shape(inner, module)
            except DECODE_ERRORS as err:
                raise BadInput(f"{self.source}: {fmt.name} module {module!r} cannot be decoded: its stored tensors "
                               f"are incomplete or malformed ({type(err).__name__}: {err})") from None
            name = f"{module}.weight"
            tensors[name] = TensorInfo(name, self.dtype, tuple(int(size) for size in shape), stored_in.get(module))
            self.modules[name] = module
        self.tensors = {name: tensors[name] for name in sorted(tensors, key=natural_key)}

    def get(self, name: str) -> torch.Tensor:
        module = self.modules.get(name)
        if module is None:
            return self.inner.get(name)
        try:
            decoded = self.fmt.decoded_weight(self.inner, module)
        except DECODE_ERRORS as err:
            raise BadInput(f"{self.source}: {self.fmt.name} module {module!r} cannot be decoded "
                           f"({type(err).__name__}: {err})") from None
        if tuple(decoded.shape) != self.tensors[name].shape:
            raise BadInput(f"{self.source}: {self.fmt.name} module {module!r} decodes to shape "
                           f"{tuple(decoded.shape)}, its stored tensors declare {self.tensors[name].shape}")
        decoded = decoded.to(self.dtype)
        if not bool(torch.isfinite(decoded).all()):
            raise BadInput(f"{self.source}: {self.fmt.name} module {module!r} decodes to NaN or values past the "
                           f"range of {str(self.dtype).removeprefix('torch.')}")
        return decoded


__all__ = ["DecodedQuantized", "input_format"]
