"""gpt-oss's MXFP4 checkpoints (``quantization_config.quant_method: mxfp4``, as OpenAI ships gpt-oss) read as the
model transformers builds from them: each ``<name>_blocks`` / ``<name>_scales`` pair is the tensor ``<name>``,
(experts, inputs, outputs) in the config's dtype (bfloat16 unless it says otherwise), decoded when it is read; the
config loses its ``quantization_config``. So merge, quantize and moe take gpt-oss as it is published (extend
opens it raw: it copies the tensors as stored)::

    with open_checkpoint("openai/gpt-oss-20b") as ckpt:          # wrapped by open_checkpoint
        ckpt.get("model.layers.0.mlp.experts.down_proj").dtype    # torch.bfloat16

``open_checkpoint(source, raw=True)`` (verify) sees the stored tensors instead.
"""

from __future__ import annotations

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, DecodedView, TensorInfo, natural_key

PAIR = ("_blocks", "_scales")


def is_mxfp4(config: dict | None) -> bool:
    """Whether ``config`` declares gpt-oss's MXFP4 quantization.

    Args:
        config: a config.json's content, or None.

    Returns:
        True when its ``quantization_config.quant_method`` is ``mxfp4``.

    Example: ``is_mxfp4({"quantization_config": {"quant_method": "mxfp4"}})   # True``
    """
    quantization = (config or {}).get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"


class DequantizedMXFP4(DecodedView):
    """``inner`` with its MXFP4 pairs decoded (see the module docstring); BadInput on opening for a pair that is
    incomplete or not gpt-oss's layout."""

    def __init__(self, inner: Checkpoint):
        super().__init__(inner)
        self.pairs: dict[str, tuple[str, str]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, info in inner.tensors.items():
            if name.endswith(PAIR[1]):
                if name.removesuffix(PAIR[1]) + PAIR[0] not in inner.tensors:
                    raise BadInput(f"{self.source}: MXFP4 tensor {name!r} has no "
                                   f"{name.removesuffix(PAIR[1]) + PAIR[0]!r}")
                continue
            if not name.endswith(PAIR[0]):
                tensors[name] = info
                continue
            base = name.removesuffix(PAIR[0])
            tensors[base] = TensorInfo(base, self.dtype, self._decoded_shape(base), info.file)
            self.pairs[base] = (name, base + PAIR[1])
        self.tensors = {name: tensors[name] for name in sorted(tensors, key=natural_key)}

    def _decoded_shape(self, base: str) -> tuple[int, int, int]:
        blocks, scales = self.inner.tensors[base + PAIR[0]], self.inner.tensors.get(base + PAIR[1])
        if scales is None:
            raise BadInput(f"{self.source}: MXFP4 tensor {base + PAIR[0]!r} has no {base + PAIR[1]!r}")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or len(blocks.shape) != 4 \
                or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
            raise BadInput(f"{self.source}: MXFP4 tensors {base + PAIR[0]!r} {blocks.dtype} {tuple(blocks.shape)} "
                           f"and {base + PAIR[1]!r} {scales.dtype} {tuple(scales.shape)} are not gpt-oss's layout "
                           f"(uint8 (experts, outputs, blocks, 16) and uint8 (experts, outputs, blocks))")
        experts, outputs, blocks_per_row, _ = blocks.shape
        return experts, blocks_per_row * 32, outputs

    def get(self, name: str) -> torch.Tensor:
        if name not in self.pairs:
            return self.inner.get(name)
        from surgery.quantize.microscaling import decode_experts

        blocks, scales = self.pairs[name]
        exponents = self.inner.get(scales)
        if bool((exponents == 255).any()):
            raise BadInput(f"{self.source}: tensor {scales!r} holds the E8M0 scale 255, which is NaN")
        decoded = decode_experts(self.inner.get(blocks), exponents, self.dtype)
        if not bool(torch.isfinite(decoded).all()):
            raise BadInput(f"{self.source}: tensor {scales!r} scales values past the range of {self.dtype}")
        return decoded
