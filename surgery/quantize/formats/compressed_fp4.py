"""compressed-tensors FP4 weights, activations left in the model dtype: the presets ``NVFP4A16`` (FP8 E4M3 scales
per 16 values under one float32 global scale) and ``MXFP4A16`` (power-of-two E8M0 scales per 32)::

    surgery quantize SRC -o OUT --preset NVFP4A16           # = --format nvfp4a16
    surgery quantize SRC -o OUT --preset MXFP4A16           # = --format mxfp4a16

``weight_packed`` uint8 (out, in/2): two FP4 E2M1 codes a byte, the even input in the low nibble. NVFP4:
``weight_scale`` float8_e4m3fn (out, in/16) = (group amax / 6) · global, rounded to E4M3, and
``weight_global_scale`` float32 (1,) = 448 · 6 / amax, the amax taken over the modules vLLM fuses into one matrix
(q/k/v of an attention, gate/up of an MLP or of one expert) so that they share it; w ≈ q · scale / global. MXFP4:
``weight_scale`` uint8 (out, in/32), the biased exponent e of 2^(e − 127), chosen as compressed-tensors does (the
group amax rounded to the nearest power of two at E2M1's precision, over 4). Values round to the nearest E2M1 value,
ties to the even code (surgery/quantize/microscaling.py). Method rtn only.
"""

from __future__ import annotations

import torch

from surgery.arch import Architecture
from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo, largest_magnitude
from surgery.quantize.formats.base import Encoded, Fit, Plan, encode_rows, module_tensors, require_dtypes
from surgery.quantize.formats.compressed_fp8 import FP8, FP8_MAX, RoundToNearestOnly
from surgery.quantize.formats.compressed_tensors import compressed_tensors_config, quantization_entry
from surgery.quantize.grid import Scheme
from surgery.quantize.microscaling import E8M0_BIAS, e2m1_codes, e2m1_values

FP4_MAX = 6.0
# projections loaders fuse into one matrix, which must then share one global scale
FUSED_KINDS = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "mlp_gate": "gate_up", "mlp_up": "gate_up"}


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Two FP4 codes a byte, as compressed-tensors packs them.

    Args:
        codes: uint8 codes (out, in), ``in`` even.

    Returns:
        uint8 (out, in / 2): input 2i in the low nibble of byte i, 2i + 1 in the high.

    Example: ``pack_pairs(torch.tensor([[1, 2]], dtype=torch.uint8))   # tensor([[33]])``
    """
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """The codes :func:`pack_pairs` packed.

    Args:
        packed: uint8 (out, in / 2).

    Returns:
        uint8 codes (out, in).

    Example: ``torch.equal(unpack_pairs(pack_pairs(codes)), codes)   # True``
    """
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def mx_exponents(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' MXFP4 scale exponents.

    Args:
        amax: the groups' largest magnitudes.

    Returns:
        float32 unbiased exponents: amax rounded to a power of two at E2M1's one mantissa bit (1.75·2^k
        and up round to 2^(k+1)), minus 2 (E2M1's largest exponent); 0 for all-zero groups, as there.

    Example: ``mx_exponents(torch.tensor([1.7, 1.75, 0.0]))   # tensor([-2., -1., 0.])``
    """
    bits = amax.float().view(torch.int32)
    rounded = ((bits + (1 << 21)) & 0x7F800000).view(torch.float32)  # float32's 23-bit mantissa, E2M1's one bit
    exponent = torch.floor(torch.log2(rounded)) - 2
    return torch.where(amax > 0, exponent, 0.0).clamp(-E8M0_BIAS, E8M0_BIAS)


class PackedFP4(RoundToNearestOnly):
    bits = (4,)
    reads_inputs = True
    stored_names = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")

    def __init__(self, name: str, preset: str, group: int):
        self.name, self.preset, self.default_group_size = name, preset, group
        self.compression = "nvfp4-pack-quantized" if self.nvfp4 else "mxfp4-pack-quantized"
        if self.nvfp4:  # checked with transformers 5.24 and compressed-tensors 0.20.1: logits far off
            self.loads_per_expert = False
            self.per_expert_problem = "fills without their global scales (--preset MXFP4A16 writes them too)"

    @property
    def nvfp4(self) -> bool:
        return self.preset.startswith("NV")

    def check_group_size(self, group_size: int) -> None:
        if group_size != self.default_group_size:
            raise BadInput(f"--format {self.name} --group-size {group_size}: {self.preset} groups are "
                           f"{self.default_group_size} values")

    def grid_words(self, bits: int, group_size: int, symmetric: bool) -> str:
        scales = "FP8 E4M3 scales per 16 under a global scale" if self.nvfp4 else "E8M0 power-of-two scales per 32"
        return f"{self.preset}: FP4 E2M1 weights with {scales}, activations in the model dtype"

    def check_dtype(self, ckpt: Checkpoint, dtype: torch.dtype) -> None:
        if dtype != torch.bfloat16:  # checked with compressed-tensors 0.20.1
            raise BadInput(f"{ckpt.source}: --preset {self.preset} needs a bfloat16 model, not "
                           f"{str(dtype).removeprefix('torch.')}: compressed-tensors decodes FP4 weights to bfloat16, "
                           f"which the model's other layers would not multiply with (surgery convert --dtype "
                           f"bfloat16 first)")

    def check_shape(self, name: str, shape: tuple[int, ...], scheme: Scheme) -> None:
        if len(shape) != 2 or shape[1] % self.default_group_size:
            raise BadInput(f"tensor {name!r}: {self.preset} needs a 2-D weight whose input dimension is a multiple "
                           f"of {self.default_group_size}, got shape {tuple(shape)} (--ignore this module)")

    def specs(self, module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        out, inp = shape
        specs = [TensorInfo(f"{module}.weight_packed", torch.uint8, (out, inp // 2)),
                 TensorInfo(f"{module}.weight_scale", FP8 if self.nvfp4 else torch.uint8,
                            (out, inp // self.default_group_size))]
        if self.nvfp4:
            specs.append(TensorInfo(f"{module}.weight_global_scale", torch.float32, (1,)))
        return specs

    def prepare(self, ckpt: Checkpoint, plan: Plan) -> None:
        """NVFP4: each module's global scale, from the amax of the modules fused with it (each weight read once)."""
        if not self.nvfp4:
            return
        arch, amax, fused = Architecture.from_config(ckpt.config), {}, {}
        for module, info in plan.modules.items():
            amax[module] = largest_magnitude(ckpt.get(info.name))  # in chunks: no whole float32 copy
            kind = FUSED_KINDS.get(arch.role(info.name).kind)
            fused[module] = (module.rpartition(".")[0], kind) if kind else module
        peak: dict = {}
        for module, key in fused.items():
            peak[key] = max(peak.get(key, 0.0), amax[module])
        # in float32, as compressed-tensors computes it; an all-zero group keeps 1
        plan.extra["global_scale"] = {
            module: float(torch.tensor(FP8_MAX * FP4_MAX) / torch.tensor(peak[key])) if peak[key] > 0 else 1.0
            for module, key in fused.items()}

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        """Row by row: every group's scale is its own (NVFP4's global scale, the module's, is from prepare())."""
        return encode_rows(lambda rows: self._encode_rows(plan, module, rows), weight,
                           per_module=("weight_global_scale",))

    def _encode_rows(self, plan: Plan, module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor]:
        out, inp = weight.shape
        group = self.default_group_size
        amax = weight.reshape(out, -1, group).abs().amax(dim=-1)
        if self.nvfp4:
            global_scale = torch.tensor([plan.extra["global_scale"][module]], dtype=torch.float32)
            stored = (amax / FP4_MAX * global_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            stored = torch.where(stored.float() == 0, 0.125, stored.float()).to(FP8)  # compressed-tensors' eps
            scale = stored.float() / global_scale
            tensors = {"weight_scale": stored, "weight_global_scale": global_scale}
        else:
            exponent = mx_exponents(amax)
            scale = torch.exp2(exponent)
            tensors = {"weight_scale": (exponent + E8M0_BIAS).to(torch.uint8)}
        expanded = scale.repeat_interleave(group, dim=1)
        codes = e2m1_codes(weight / expanded)
        return {"weight_packed": pack_pairs(codes), **tensors}, e2m1_values(codes).mul_(expanded)

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict:
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "tensor_group" if self.nvfp4 else "group", "group_size": self.default_group_size,
                   "scale_dtype": "torch.float8_e4m3fn" if self.nvfp4 else "torch.uint8",
                   "zp_dtype": "torch.float8_e4m3fn" if self.nvfp4 else "torch.uint8", "observer": "minmax"}
        return compressed_tensors_config(self.compression, [quantization_entry(["Linear"], weights)], ignore)

    # ------------------------------------------------------------------------------------------- reading

    def reads(self, ckpt: Checkpoint) -> bool:
        quant = (ckpt.config or {}).get("quantization_config") or {}
        return quant.get("quant_method") == "compressed-tensors" and quant.get("format") == self.compression

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        return Scheme(4, self.default_group_size, True)

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".weight_packed") for name in ckpt.tensors if name.endswith(".weight_packed")]

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        out, half = ckpt.tensors[f"{module}.weight_packed"].shape
        return out, half * 2

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        tensors = module_tensors(ckpt, module)
        require_dtypes(tensors, {"weight_packed": torch.uint8, "weight_scale": FP8 if self.nvfp4 else torch.uint8,
                                 **({"weight_global_scale": "float"} if self.nvfp4 else {})})
        codes, stored = unpack_pairs(tensors["weight_packed"]), tensors["weight_scale"]
        if self.nvfp4:
            scale = stored.float() / tensors["weight_global_scale"].float()
        else:
            if bool((stored == 255).any()):
                raise ValueError("weight_scale holds the E8M0 scale 255, which is NaN")
            scale = torch.exp2(stored.float() - E8M0_BIAS)
        return e2m1_values(codes) * scale.repeat_interleave(self.default_group_size, dim=1)


NVFP4A16 = PackedFP4("nvfp4a16", "NVFP4A16", group=16)
MXFP4A16 = PackedFP4("mxfp4a16", "MXFP4A16", group=32)

__all__ = ["MXFP4A16", "NVFP4A16", "PackedFP4", "mx_exponents", "pack_pairs", "unpack_pairs"]
