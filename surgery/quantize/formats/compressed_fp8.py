"""compressed-tensors ``float-quantized``: FP8 E4M3 weights with dynamic FP8 activations, the presets
``FP8_DYNAMIC`` (one scale per output channel, activations per token) and ``FP8_BLOCK`` (one scale per 128×128
weight block as DeepSeek-V3 ships, activations per group of 128)::

    surgery quantize SRC -o OUT --preset FP8_DYNAMIC        # = --format fp8-dynamic
    surgery quantize SRC -o OUT --preset FP8_BLOCK          # = --format fp8-block

``weight`` float8_e4m3fn (out, in) and ``weight_scale`` in the model dtype, (out, 1) or (⌈out/128⌉, ⌈in/128⌉) (the
last blocks may be partial), with ``weight ≈ q · scale``: scale = amax / 448 over the channel or block, q = the
weight / scale rounded to E4M3 (as compressed-tensors' own compressor rounds it). The activations are quantized by
the loader at run time (transformers + compressed-tensors, vLLM), so nothing about them is stored. Method rtn only.
"""

from __future__ import annotations

import math

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.quantize.formats.base import Encoded, Fit, Plan, QuantFormat, encode_rows
from surgery.quantize.formats.compressed_tensors import compressed_tensors_config, quantization_entry
from surgery.quantize.grid import Scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def expand_scales(scale: torch.Tensor, shape: tuple[int, int], block: int | None) -> torch.Tensor:
    """One scale per weight, from scales per block or per output channel.

    Args:
        scale: (⌈out/block⌉, ⌈in/block⌉) block scales (the last blocks may be partial), or (out, 1) / (1, 1).
        shape: the weight's (out, in).
        block: the block size; 0 or None for per-channel (or per-tensor) scales.

    Returns:
        The scales expanded to ``shape``.

    Example: ``expand_scales(torch.ones(1, 1), (100, 64), 128).shape   # (100, 64)``
    """
    if not block:
        return scale.expand(shape)
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:shape[0], :shape[1]]


class RoundToNearestOnly(QuantFormat):
    """What the float formats share: symmetric, rtn only, a layout that fixes the group size."""

    schemes = ("sym",)
    preset = ""  # the compressed-tensors preset it writes (the model card and messages name it)

    def check_method(self, method: str) -> None:
        if method != "rtn":
            raise BadInput(f"--format {self.name} --method {method}: it writes rtn only ({self.preset}'s scale rule)")

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        return {module: self.default_group_size for module in inputs}


class FloatFP8(RoundToNearestOnly):
    bits = (8,)
    reads_inputs = True
    stored_names = ("weight_scale", "weight_scale_inv", "input_scale", "weight_zero_point")
    default_group_size = 128

    def __init__(self, name: str, preset: str, block: int | None):
        self.name, self.preset, self.block = name, preset, block

    def check_group_size(self, group_size: int) -> None:
        raise BadInput(f"--format {self.name} --group-size {group_size}: {self.preset} has "
                       f"{'128×128 weight blocks' if self.block else 'one scale per output channel'}, no groups")

    def grid_words(self, bits: int, group_size: int, symmetric: bool) -> str:
        weights = f"{self.block}×{self.block} blocks" if self.block else "output channel"
        activations = f"groups of {self.block}" if self.block else "token"
        return (f"{self.preset}: FP8 E4M3 weights with one scale per {weights}, FP8 activations quantized per "
                f"{activations} at run time")

    def check_shape(self, name: str, shape: tuple[int, ...], scheme: Scheme) -> None:
        if len(shape) != 2:
            raise BadInput(f"tensor {name!r}: only 2-D weights can be quantized, got shape {tuple(shape)}")
        if self.block and shape[1] % self.block:  # the loaders quantize its inputs in groups of the block
            raise BadInput(f"tensor {name!r}: {self.preset} quantizes its inputs in groups of {self.block}, which do "
                           f"not divide its input dimension {shape[1]} (--ignore this module, or FP8_DYNAMIC)")

    def _scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        out, inp = shape
        return (math.ceil(out / self.block), math.ceil(inp / self.block)) if self.block else (out, 1)

    def specs(self, module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        return [TensorInfo(f"{module}.weight", FP8, tuple(shape)),
                TensorInfo(f"{module}.weight_scale", dtype, self._scale_shape(shape))]

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        """Row by row (blocks of 128 rows): every channel's or block's scale is its own."""
        return encode_rows(lambda rows: self._encode_rows(rows, plan.dtype), weight, self.block or 1)

    def _encode_rows(self, weight: torch.Tensor, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.block:
            rows, columns = self._scale_shape(weight.shape)
            padded = torch.zeros(rows * self.block, columns * self.block)
            padded[:weight.shape[0], :weight.shape[1]] = weight.abs()
            amax = padded.reshape(rows, self.block, columns, self.block).amax(dim=(1, 3))
        else:
            amax = weight.abs().amax(dim=1, keepdim=True)
        stored = (amax / FP8_MAX).to(dtype)
        # an all-zero channel or block: any scale decodes its zeros; compressed-tensors writes its dtype's eps
        stored = torch.where(stored == 0, torch.finfo(dtype).eps, stored)
        scale = expand_scales(stored.float(), weight.shape, self.block)
        q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return {"weight": q, "weight_scale": stored}, q.float().mul_(scale)

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict:
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        weights = {**fp8, "strategy": "block" if self.block else "channel", "dynamic": False, "group_size": None,
                   "block_structure": [self.block, self.block] if self.block else None, "observer": "minmax"}
        activations = {**fp8, "strategy": "group" if self.block else "token", "dynamic": True,
                       "group_size": self.block, "block_structure": None, "observer": None}
        return compressed_tensors_config("float-quantized", [quantization_entry(["Linear"], weights, activations)],
                                         ignore)

    # ------------------------------------------------------------------------------------------- reading
    # Besides compressed-tensors' float-quantized (strategy tensor, channel or block), the block instance reads
    # DeepSeek-V3's own FP8 layout (quant_method fp8, weight_block_size; weight_scale_inv, multiplied like a scale).

    def _stored_block(self, ckpt: Checkpoint) -> int | None:
        """The block size ``ckpt`` declares, 0 for per-channel or per-tensor scales, None: not this layout."""
        quant = (ckpt.config or {}).get("quantization_config") or {}
        if quant.get("quant_method") == "fp8" and isinstance(quant.get("weight_block_size"), list):
            rows, columns = quant["weight_block_size"]
            if rows != columns:
                raise BadInput(f"{ckpt.source}: FP8 weight_block_size {[rows, columns]}: only square blocks are read")
            return int(rows)
        if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "float-quantized":
            return None
        weights = next(iter((quant.get("config_groups") or {}).values()), {}).get("weights") or {}
        if weights.get("num_bits") != 8 or weights.get("type") != "float":
            return None
        if weights.get("strategy") == "block":
            rows, columns = weights.get("block_structure") or (128, 128)
            if rows != columns:
                raise BadInput(f"{ckpt.source}: FP8 block_structure {[rows, columns]}: only square blocks are read")
            return int(rows)
        return 0

    def reads(self, ckpt: Checkpoint) -> bool:
        block = self._stored_block(ckpt)
        return block is not None and bool(block) == bool(self.block)

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        return Scheme(8, self._stored_block(ckpt) or 0, True)

    def _scale_name(self, ckpt: Checkpoint, module: str) -> str:
        name = f"{module}.weight_scale"
        return name if name in ckpt.tensors else f"{module}.weight_scale_inv"

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".weight") for name, info in ckpt.tensors.items()
                if name.endswith(".weight") and info.dtype == FP8
                and (f"{name}_scale" in ckpt.tensors or f"{name}_scale_inv" in ckpt.tensors)]

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        return tuple(ckpt.tensors[f"{module}.weight"].shape)

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        q, scale = ckpt.get(f"{module}.weight").float(), ckpt.get(self._scale_name(ckpt, module))
        if not scale.is_floating_point():
            raise ValueError(f"its scale is {str(scale.dtype).removeprefix('torch.')}, expected a float dtype")
        scale = scale.float()
        block = self._stored_block(ckpt)
        if block:
            rows, columns = math.ceil(q.shape[0] / block), math.ceil(q.shape[1] / block)
            if tuple(scale.shape) != (rows, columns):
                raise ValueError(f"scales of shape {tuple(scale.shape)} for blocks of {block}: expected "
                                 f"{(rows, columns)}")
        return q * expand_scales(scale.reshape(-1, 1) if scale.numel() == 1 else scale, q.shape, block)


FP8_DYNAMIC = FloatFP8("fp8-dynamic", "FP8_DYNAMIC", block=None)
FP8_BLOCK = FloatFP8("fp8-block", "FP8_BLOCK", block=128)

__all__ = ["FP8_BLOCK", "FP8_DYNAMIC", "FloatFP8", "RoundToNearestOnly", "expand_scales"]
