"""compressed-tensors ``pack-quantized`` (vLLM; transformers + compressed-tensors)::

    fmt = CompressedTensors()
    specs = fmt.specs("model.layers.0.mlp.up_proj", (out, in), scheme, torch.bfloat16)  # planned TensorInfos
    tensors = fmt.encode_grid(grid, torch.bfloat16)    # local name ("weight_packed", ...) → tensor
    q, scale, zero = fmt.decode(tensors, scheme)       # the grid again (verify uses this)

weight_packed int32 (out, in·b/32): q + 2^(b−1), LSB-first along the input dim; weight_scale (out, in/g) in the
model dtype; weight_shape int64 [out, in]; asymmetric also weight_zero_point int32 (ceil(out·b/32), in/g),
zero + 2^(b−1) packed along dim 0. Where the group size does not divide a module, it goes to a second config group
at 64 or 32 (groups.py), which verify reads back per module.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from surgery.arch import Architecture
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.quantize.formats.base import Plan, QuantFormat, module_tensors, require_dtypes
from surgery.quantize.packing import pack, pad_rows, unpack, unsigned_fields
from surgery.quantize.grid import Grid, Scheme
from surgery.quantize.groups import fallback_targets, group_size_of, per_module_group_sizes


def _quant(ckpt: Checkpoint) -> dict:
    return (ckpt.config or {}).get("quantization_config") or {}


def quantization_entry(targets: list[str], weights: dict, input_activations: dict | None = None) -> dict:
    """One compressed-tensors config group.

    Args:
        targets: module names, ``re:`` regexes or class names (``Linear``) it applies to.
        weights: its weight quantization args.
        input_activations: its activation args (None: activations unquantized).

    Returns:
        The group's dict, as config.json holds it.

    Example: ``quantization_entry(["Linear"], {"num_bits": 8, "type": "float", ...})["targets"]   # ["Linear"]``
    """
    return {"targets": targets, "weights": weights, "input_activations": input_activations,
            "output_activations": None}


def compressed_tensors_config(compression: str, groups: list[dict], ignore: list[str]) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint.

    Args:
        compression: its format (pack-quantized, float-quantized, nvfp4-pack-quantized...).
        groups: its config groups (:func:`quantization_entry`), in the order compressed-tensors matches them.
        ignore: the Linear modules left unquantized.

    Returns:
        The config entry.

    Example: ``compressed_tensors_config("float-quantized", [quantization_entry(["Linear"], w)], ["lm_head"])``
    """
    return {"quant_method": "compressed-tensors", "format": compression, "quantization_status": "compressed",
            "config_groups": {f"group_{index}": group for index, group in enumerate(groups)}, "ignore": ignore}


class CompressedTensors(QuantFormat):
    name = "compressed-tensors"
    takes_importance = True
    reads_inputs = True
    stored_names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        return per_module_group_sizes(inputs, requested, together)

    def fallbacks(self, sizes: dict[str, int], requested: int,
                  always: frozenset[str] = frozenset()) -> dict[int, list[str]]:
        return fallback_targets(sizes, requested, always)

    def specs(self, module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        out, inp = shape
        groups = inp // scheme.group_size
        specs = [TensorInfo(f"{module}.weight_packed", torch.int32, (out, inp * scheme.bits // 32)),
                 TensorInfo(f"{module}.weight_scale", dtype, (out, groups)),
                 TensorInfo(f"{module}.weight_shape", torch.int64, (2,))]
        if not scheme.symmetric:
            specs.append(TensorInfo(f"{module}.weight_zero_point", torch.int32,
                                    (math.ceil(out * scheme.bits / 32), groups)))
        return specs

    def planned_tensors(self, plan: Plan, module: str) -> dict[str, torch.Tensor]:
        return {"weight_shape": torch.tensor(plan.modules[module].shape, dtype=torch.int64)}

    def encode_grid(self, grid: Grid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        scheme, offset = grid.scheme, 1 << (grid.scheme.bits - 1)
        tensors = {"weight_packed": pack(unsigned_fields(grid.q, scheme.bits), scheme.bits),
                   "weight_scale": grid.scale.to(dtype),
                   "weight_shape": torch.tensor(grid.q.shape, dtype=torch.int64)}
        if not scheme.symmetric:
            zero = pad_rows(grid.zero.to(torch.int32) + offset, 32 // scheme.bits)
            tensors["weight_zero_point"] = pack(zero.T, scheme.bits).T.contiguous()
        return tensors

    def decode(self, tensors: dict[str, torch.Tensor], scheme: Scheme) -> tuple[torch.Tensor, ...]:
        require_dtypes(tensors, {"weight_packed": torch.int32, "weight_scale": "float", "weight_shape": torch.int64,
                                 **({} if scheme.symmetric else {"weight_zero_point": torch.int32})})
        offset = 1 << (scheme.bits - 1)
        out, _ = (int(v) for v in tensors["weight_shape"])
        q = unpack(tensors["weight_packed"], scheme.bits) - offset
        scale = tensors["weight_scale"].float()
        if scheme.symmetric:
            zero = torch.zeros_like(scale, dtype=torch.int32)
        else:
            zero = unpack(tensors["weight_zero_point"].T, scheme.bits).T[:out] - offset
        return q, scale, zero

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict:
        """``fallbacks``: group size → targets (names or ``re:`` regexes) of modules the main size does not divide;
        each becomes another config group, which compressed-tensors prefers over the ``Linear`` class target."""
        def group(targets: list[str], group_size: int) -> dict:
            return quantization_entry(targets, {
                "num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": "group",
                "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"})

        # Fallback groups come first: compressed-tensors matches each module against the targets in config order
        # (and warns about targets that never came first), though it applies name and regex matches before Linear.
        members = [(list(targets), size) for size, targets in (fallbacks or {}).items()]
        members.append((["Linear"], scheme.group_size))
        return compressed_tensors_config("pack-quantized", [group(targets, size) for targets, size in members],
                                         ignore)

    def reads(self, ckpt: Checkpoint) -> bool:
        quant = _quant(ckpt)
        return quant.get("quant_method") == "compressed-tensors" and quant.get("format") == "pack-quantized"

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        groups = _quant(ckpt)["config_groups"].values()
        weights = next((g for g in groups if "Linear" in g["targets"]), next(iter(groups)))["weights"]
        return Scheme(weights["num_bits"], weights["group_size"], weights["symmetric"])

    def module_scheme(self, ckpt: Checkpoint, module: str, default: Scheme) -> Scheme:
        loader_name = Architecture.from_config(ckpt.config).loader_module(module)  # what the config targets
        size = group_size_of(loader_name, _quant(ckpt)["config_groups"])
        if size is None:  # strategy channel (llm-compressor's W8A8 and others): one group per row
            size = self.decoded_shape(ckpt, module)[1]
        return replace(default, group_size=size)

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        return tuple(int(size) for size in ckpt.get(f"{module}.weight_shape"))

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".weight_packed") for name in ckpt.tensors if name.endswith(".weight_packed")]

    def matmul(self, ckpt: Checkpoint, module: str, x: torch.Tensor, approx: torch.Tensor, scheme: Scheme,
               backend: str) -> torch.Tensor:
        """The fused dequantize-matmul kernel reading the packed tensors (Triton on CUDA, torch on CPU)."""
        from surgery.kernels.dequant_matmul import dequant_matmul

        tensors = module_tensors(ckpt, module)
        device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
        zero = tensors.get("weight_zero_point")
        return dequant_matmul(x.to(device), tensors["weight_packed"].to(device), tensors["weight_scale"].to(device),
                              None if zero is None else zero.to(device), bits=scheme.bits,
                              group_size=scheme.group_size, backend=backend).cpu().float()
