"""GPTQ v1 (``checkpoint_format: gptq``): qweight int32 (in·b/32, out), qzeros int32 (in/g, out·b/32) holding
unsigned zero − 1, scales float16 (in/g, out), g_idx int32 (in,) = i // g. One group size in the config: where the
request does not divide every module, groups.py lowers it for all::

    fmt = GPTQ()
    tensors = fmt.encode_grid(grid, torch.bfloat16)    # {"qweight", "qzeros", "scales", "g_idx"}
"""

from __future__ import annotations

import math

import torch

from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.quantize.formats.base import Plan, QuantFormat, module_tensors, require_dtypes
from surgery.quantize.packing import pack, unpack, unsigned_fields
from surgery.quantize.grid import Grid, Scheme
from surgery.quantize.groups import one_group_size


class GPTQ(QuantFormat):
    name = "gptq"
    takes_importance = True
    reads_inputs = True
    stored_names = ("qweight", "qzeros", "scales", "g_idx")
    loads_per_expert = False  # transformers' GPTQ loader replaces Linear modules only; MoE experts are fused tensors

    def scheme(self, bits: int, group_size: int, symmetric: bool) -> Scheme:
        """v1 stores zero − 1 unsigned, so the grid keeps zero points above the lowest."""
        return Scheme(bits, group_size, symmetric, v1_zeros=True)

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float16

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        return one_group_size(inputs, requested)

    def specs(self, module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        out, inp = shape
        groups = inp // scheme.group_size
        return [TensorInfo(f"{module}.qweight", torch.int32, (inp * scheme.bits // 32, out)),
                TensorInfo(f"{module}.qzeros", torch.int32, (groups, math.ceil(out * scheme.bits / 32))),
                TensorInfo(f"{module}.scales", torch.float16, (groups, out)),
                TensorInfo(f"{module}.g_idx", torch.int32, (inp,))]

    def planned_tensors(self, plan: Plan, module: str) -> dict[str, torch.Tensor]:
        columns = plan.modules[module].shape[1]
        return {"g_idx": torch.arange(columns, dtype=torch.int32) // plan.schemes[module].group_size}

    def encode_grid(self, grid: Grid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        bits, offset = grid.scheme.bits, 1 << (grid.scheme.bits - 1)
        out, inp = grid.q.shape
        unsigned_zero = grid.zero.to(torch.int32) + offset - 1  # v1 stores zero − 1
        padded = torch.cat([unsigned_zero.T, unsigned_zero.new_zeros(unsigned_zero.shape[1], -out % (32 // bits))],
                           dim=1)
        return {"qweight": pack(unsigned_fields(grid.q, bits), bits).T.contiguous(),
                "qzeros": pack(padded & ((1 << bits) - 1), bits),
                "scales": grid.scale.T.to(torch.float16).contiguous(),
                "g_idx": torch.arange(inp, dtype=torch.int32) // grid.scheme.group_size}

    def decode(self, tensors: dict[str, torch.Tensor], scheme: Scheme) -> tuple[torch.Tensor, ...]:
        offset = 1 << (scheme.bits - 1)
        scale = tensors["scales"].float().T
        out = scale.shape[0]
        q = unpack(tensors["qweight"].T, scheme.bits) - offset
        zero = (unpack(tensors["qzeros"], scheme.bits)[:, :out].T + int(scheme.v1_zeros)) - offset
        return q, scale, zero

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        bits = self.stored_scheme(ckpt).bits
        if bits not in (2, 4, 8):
            raise ValueError(f"{bits}-bit GPTQ is not read (2, 4 or 8 bits)")
        rows, out = ckpt.tensors[f"{module}.qweight"].shape
        return out, rows * 32 // bits

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        """Each input column through its group in ``g_idx`` (act-order checkpoints permute them)."""
        scheme = self.stored_scheme(ckpt)
        tensors = module_tensors(ckpt, module)
        require_dtypes(tensors, {"qweight": torch.int32, "qzeros": torch.int32, "scales": "float"})
        q, scale, zero = self.decode(tensors, scheme)
        columns = q.shape[1]
        if "g_idx" in tensors and tensors["g_idx"].dtype not in (torch.int32, torch.int64):
            raise ValueError(f"g_idx is {str(tensors['g_idx'].dtype).removeprefix('torch.')}, expected int32")
        group = tensors["g_idx"].long() if "g_idx" in tensors else torch.arange(columns) // scheme.group_size
        if tuple(group.shape) != (columns,) or int(group.min()) < 0 or int(group.max()) >= scale.shape[1]:
            raise ValueError(f"g_idx of shape {tuple(group.shape)} does not map {columns} inputs to "
                             f"{scale.shape[1]} groups")
        return (q - zero[:, group]).float() * scale[:, group]

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict:
        """One group size for all modules (groups.py has already lowered it where needed)."""
        used = next(iter(schemes.values()))
        return {"quant_method": "gptq", "bits": used.bits, "group_size": used.group_size, "desc_act": False,
                "sym": used.symmetric, "checkpoint_format": "gptq", "true_sequential": True,
                "static_groups": False, "damp_percent": 0.01, "lm_head": "lm_head" not in ignore}

    def reads(self, ckpt: Checkpoint) -> bool:
        return ((ckpt.config or {}).get("quantization_config") or {}).get("quant_method") == "gptq"

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        """GPTQ v2 (``checkpoint_format: gptq_v2``) stores the zero points themselves; group size −1: one group."""
        quant = ckpt.config["quantization_config"]
        group_size = quant["group_size"]
        if group_size == -1:
            module = self.quantized_modules(ckpt)[0]
            group_size = ckpt.tensors[f"{module}.qweight"].shape[0] * 32 // quant["bits"]
        return Scheme(quant["bits"], group_size, quant.get("sym", True),
                      v1_zeros=quant.get("checkpoint_format", "gptq") != "gptq_v2")

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".qweight") for name in ckpt.tensors if name.endswith(".qweight")]
