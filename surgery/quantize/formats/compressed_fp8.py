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
from surgery.quantize.formats.base import Encoded, Fit, Plan, QuantFormat
from surgery.quantize.formats.compressed_tensors import compressed_tensors_config, quantization_entry
from surgery.quantize.grid import Scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


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

    def _expand(self, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Per-block (or per-channel) scales → one per weight."""
        if not self.block:
            return scale.expand(shape)
        return scale.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)[:shape[0], :shape[1]]

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        if self.block:
            rows, columns = self._scale_shape(weight.shape)
            padded = torch.zeros(rows * self.block, columns * self.block)
            padded[:weight.shape[0], :weight.shape[1]] = weight.abs()
            amax = padded.reshape(rows, self.block, columns, self.block).amax(dim=(1, 3))
        else:
            amax = weight.abs().amax(dim=1, keepdim=True)
        stored = (amax / FP8_MAX).to(plan.dtype)
        # an all-zero channel or block: any scale decodes its zeros; compressed-tensors writes its dtype's eps
        stored = torch.where(stored == 0, torch.finfo(plan.dtype).eps, stored)
        scale = self._expand(stored.float(), weight.shape)
        q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return Encoded({"weight": q, "weight_scale": stored}, weight, q.float() * scale)

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

    def _weights(self, ckpt: Checkpoint) -> dict | None:
        quant = (ckpt.config or {}).get("quantization_config") or {}
        if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "float-quantized":
            return None
        weights = next(iter(quant.get("config_groups", {}).values()), {}).get("weights") or {}
        return weights if weights.get("num_bits") == 8 and weights.get("type") == "float" else None

    def reads(self, ckpt: Checkpoint) -> bool:
        weights = self._weights(ckpt)
        return weights is not None and (weights.get("strategy") == "block") == bool(self.block)

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        return Scheme(8, self.block or 0, True)

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".weight") for name, info in ckpt.tensors.items()
                if name.endswith(".weight") and info.dtype == FP8 and f"{name}_scale" in ckpt.tensors]

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        q = ckpt.get(f"{module}.weight").float()
        return q * self._expand(ckpt.get(f"{module}.weight_scale").float(), q.shape)


FP8_DYNAMIC = FloatFP8("fp8-dynamic", "FP8_DYNAMIC", block=None)
FP8_BLOCK = FloatFP8("fp8-block", "FP8_BLOCK", block=128)

__all__ = ["FP8_BLOCK", "FP8_DYNAMIC", "FloatFP8", "RoundToNearestOnly"]
