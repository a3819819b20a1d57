"""MXFP4 in gpt-oss's own layout (``--format mxfp4``): the fused MoE expert tensors as OpenAI ships gpt-oss, the
rest of the model as it is. transformers (its ``Mxfp4`` quantizer: kernels on GPU, dequantized to bf16 on CPU) and
vLLM load it; it is the only quantized layout they read for gpt-oss's 3-D experts::

    surgery quantize gpt-oss-finetune -o gpt-oss-finetune-mxfp4 --format mxfp4

Each expert tensor of shape (experts, inputs, outputs) — ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``
— is stored as ``<name>_blocks`` uint8 (experts, outputs, inputs / 32, 16) and ``<name>_scales`` uint8 (experts,
outputs, inputs / 32): each output row's inputs in blocks of 32 FP4 E2M1 values with one E8M0 scale (see
surgery/quantize/microscaling.py). Attention, router, embeddings and lm_head stay in the model's dtype, as in
OpenAI's release; the biases too. Method rtn only (the spec's scale rule).
"""

from __future__ import annotations

import weakref

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.io.mxfp4_input import is_mxfp4
from surgery.quantize.formats.base import Encoded, Fit, Plan, QuantFormat, finite_float
from surgery.quantize.grid import Scheme
from surgery.quantize.microscaling import (BLOCK, E8M0_BIAS, decode_experts, mxfp4_dequantize, mxfp4_quantize,
                                           pack_fp4, unpack_fp4)

# what OpenAI's gpt-oss config leaves unconverted (vLLM reads the list; transformers converts experts only)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


class MXFP4(QuantFormat):
    name = "mxfp4"
    bits = (4,)
    schemes = ("sym",)
    default_group_size = BLOCK
    model_types = ("gpt_oss",)
    card_title_note = " (MXFP4)"
    quantizes = "fused experts"
    _held = None  # (weak reference to a checkpoint, tensor, its _blocks, its _scales): see decoded_weight

    def check_group_size(self, group_size: int) -> None:
        if group_size != BLOCK:
            raise BadInput(f"--format mxfp4 --group-size {group_size}: MXFP4 blocks are {BLOCK} values")

    def check_method(self, method: str) -> None:
        if method != "rtn":
            raise BadInput(f"--format mxfp4 --method {method}: it writes rtn only (the MXFP4 spec's scale rule)")

    def grid_words(self, bits: int, group_size: int, symmetric: bool) -> str:
        return f"MXFP4 (FP4 E2M1 values, one power-of-two E8M0 scale per {BLOCK})"

    def check_source(self, ckpt: Checkpoint) -> None:
        super().check_source(ckpt)
        model_type = ckpt.config.get("model_type")
        if model_type not in self.model_types:
            raise BadInput(f"{ckpt.source}: --format mxfp4 writes gpt-oss's fused experts (model_type gpt_oss), "
                           f"not {model_type!r}; --format compressed-tensors quantizes this model")

    def check_shape(self, name: str, shape: tuple[int, ...], scheme: Scheme) -> None:
        if len(shape) != 3 or shape[1] % BLOCK:
            raise BadInput(f"tensor {name!r}: MXFP4 needs (experts, inputs, outputs) with inputs a multiple of "
                           f"{BLOCK}, got shape {tuple(shape)}")

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        return {module: BLOCK for module in inputs}

    def tensor_name(self, module: str, local: str) -> str:
        return f"{module}_{local}"

    def specs(self, module: str, shape: tuple[int, ...], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        experts, inputs, outputs = shape
        return [TensorInfo(f"{module}_blocks", torch.uint8, (experts, outputs, inputs // BLOCK, BLOCK // 2)),
                TensorInfo(f"{module}_scales", torch.uint8, (experts, outputs, inputs // BLOCK))]

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        weight = finite_float(weight)
        experts, inputs, outputs = weight.shape
        blocks = torch.empty(experts, outputs, inputs // BLOCK, BLOCK // 2, dtype=torch.uint8)
        scales = torch.empty(experts, outputs, inputs // BLOCK, dtype=torch.uint8)
        approx = torch.empty_like(weight)
        for expert in range(experts):  # one expert's temporaries at a time (gpt-oss-120b: 128 of them)
            codes, exponents = mxfp4_quantize(weight[expert].T)  # blocks run along each output's inputs
            blocks[expert], scales[expert] = pack_fp4(codes), (exponents + E8M0_BIAS).to(torch.uint8)
            approx[expert] = mxfp4_dequantize(codes, exponents).T
        return Encoded.compared({"blocks": blocks, "scales": scales}, weight, approx)

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict:
        return {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}

    # ------------------------------------------------------------------------------------------- reading

    def reads(self, ckpt: Checkpoint) -> bool:
        return is_mxfp4(ckpt.config)

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        return Scheme(4, BLOCK, True)

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        """One per expert matrix: ``<tensor>.<expert>`` (``model.layers.0.mlp.experts.down_proj.3``)."""
        return [f"{name.removesuffix('_blocks')}.{expert}" for name, info in ckpt.tensors.items()
                if name.endswith("_blocks") for expert in range(info.shape[0])]

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        """Expert ``module`` (``<tensor>.<expert>``) as a Linear weight: float32 (outputs, inputs). The stored pair
        of the last tensor asked for is kept, since its experts are asked for one after another."""
        tensor, _, expert = module.rpartition(".")
        held = self._held
        if held is None or held[0]() is not ckpt or held[1] != tensor:
            held = self._held = (weakref.ref(ckpt), tensor, ckpt.get(f"{tensor}_blocks"),
                                 ckpt.get(f"{tensor}_scales"))
        blocks, scales = held[2][int(expert)], held[3][int(expert)]
        return mxfp4_dequantize(unpack_fp4(blocks), scales.to(torch.int32) - E8M0_BIAS)

    def decoded_parameters(self, ckpt: Checkpoint):
        """``(tensor name, float32 (experts, inputs, outputs))`` of every quantized expert tensor."""
        for name in ckpt.tensors:
            if name.endswith("_blocks"):
                tensor = name.removesuffix("_blocks")
                yield tensor, decode_experts(ckpt.get(name), ckpt.get(f"{tensor}_scales"))


__all__ = ["MXFP4"]
