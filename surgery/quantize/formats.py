"""Loader-native layouts of a quantized Linear: compressed-tensors ``pack-quantized`` and GPTQ v1.

Each format turns one module's :class:`~surgery.quantize.grid.Grid` into the tensors its loader reads, and back::

    fmt = FORMATS["compressed-tensors"]
    specs = fmt.specs("model.layers.0.mlp.up_proj", (out, in), scheme, torch.bfloat16)  # planned TensorInfos
    tensors = fmt.encode(grid, torch.bfloat16)         # local name ("weight_packed", ...) → tensor
    q, scale, zero = fmt.decode(tensors, scheme)       # the grid again (tests and verify use this)

compressed-tensors: weight_packed int32 (out, in·b/32): q + 2^(b−1), LSB-first along the input dim;
weight_scale (out, in/g) in the model dtype; weight_shape int64 [out, in]; asymmetric also weight_zero_point int32
(ceil(out·b/32), in/g), zero + 2^(b−1) packed along dim 0. GPTQ v1: qweight int32 (in·b/32, out), qzeros int32
(in/g, out·b/32) holding unsigned zero − 1, scales float16 (in/g, out), g_idx int32 (in,) = i // g.
"""

from __future__ import annotations

import math

import torch

from surgery.io.checkpoint import TensorInfo
from surgery.quantize.grid import Grid, Scheme


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values (any int dtype, last dim a multiple of 32/bits) → int32, LSB-first along the
    last dim."""
    per_word = 32 // bits
    rows = values.shape[:-1]
    fields = values.to(torch.int64).reshape(*rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (fields << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words → unsigned values (int32), LSB-first along the last dim (inverse of :func:`pack`)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*words.shape[:-1], -1).to(torch.int32)


def _pad_rows(values: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -values.shape[0] % multiple
    return torch.cat([values, values.new_zeros(extra, *values.shape[1:])]) if extra else values


class CompressedTensors:
    name = "compressed-tensors"

    @staticmethod
    def specs(module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        out, inp = shape
        groups = inp // scheme.group_size
        specs = [TensorInfo(f"{module}.weight_packed", torch.int32, (out, inp * scheme.bits // 32)),
                 TensorInfo(f"{module}.weight_scale", dtype, (out, groups)),
                 TensorInfo(f"{module}.weight_shape", torch.int64, (2,))]
        if not scheme.symmetric:
            specs.append(TensorInfo(f"{module}.weight_zero_point", torch.int32,
                                    (math.ceil(out * scheme.bits / 32), groups)))
        return specs

    @staticmethod
    def encode(grid: Grid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        scheme, offset = grid.scheme, 1 << (grid.scheme.bits - 1)
        tensors = {"weight_packed": pack(grid.q.to(torch.int32) + offset, scheme.bits),
                   "weight_scale": grid.scale.to(dtype),
                   "weight_shape": torch.tensor(grid.q.shape, dtype=torch.int64)}
        if not scheme.symmetric:
            zero = _pad_rows(grid.zero.to(torch.int32) + offset, 32 // scheme.bits)
            tensors["weight_zero_point"] = pack(zero.T, scheme.bits).T.contiguous()
        return tensors

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], scheme: Scheme) -> tuple[torch.Tensor, ...]:
        offset = 1 << (scheme.bits - 1)
        out, _ = (int(v) for v in tensors["weight_shape"])
        q = unpack(tensors["weight_packed"], scheme.bits) - offset
        scale = tensors["weight_scale"].float()
        if scheme.symmetric:
            zero = torch.zeros_like(scale, dtype=torch.int32)
        else:
            zero = unpack(tensors["weight_zero_point"].T, scheme.bits).T[:out] - offset
        return q, scale, zero

    @staticmethod
    def config(scheme: Scheme, ignore: list[str], dtype: torch.dtype,
               fallbacks: dict[int, list[str]] | None = None) -> dict:
        """``fallbacks``: group size → targets (names or ``re:`` regexes) of modules the main size does not divide;
        each becomes another config group, which compressed-tensors prefers over the ``Linear`` class target."""
        def group(targets: list[str], group_size: int) -> dict:
            return {"targets": targets, "input_activations": None, "output_activations": None, "weights": {
                "num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": "group",
                "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}}

        # Fallback groups come first: compressed-tensors matches each module against the targets in config order
        # (and warns about targets that never came first), though it applies name and regex matches before Linear.
        members = [(list(targets), size) for size, targets in (fallbacks or {}).items()]
        members.append((["Linear"], scheme.group_size))
        groups = {f"group_{index}": group(targets, size) for index, (targets, size) in enumerate(members)}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": groups, "ignore": ignore}


class GPTQ:
    name = "gptq"

    @staticmethod
    def specs(module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        out, inp = shape
        groups = inp // scheme.group_size
        return [TensorInfo(f"{module}.qweight", torch.int32, (inp * scheme.bits // 32, out)),
                TensorInfo(f"{module}.qzeros", torch.int32, (groups, math.ceil(out * scheme.bits / 32))),
                TensorInfo(f"{module}.scales", torch.float16, (groups, out)),
                TensorInfo(f"{module}.g_idx", torch.int32, (inp,))]

    @staticmethod
    def encode(grid: Grid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        bits, offset = grid.scheme.bits, 1 << (grid.scheme.bits - 1)
        out, inp = grid.q.shape
        unsigned_zero = grid.zero.to(torch.int32) + offset - 1  # v1 stores zero − 1
        padded = torch.cat([unsigned_zero.T, unsigned_zero.new_zeros(unsigned_zero.shape[1], -out % (32 // bits))],
                           dim=1)
        return {"qweight": pack(grid.q.to(torch.int32) + offset, bits).T.contiguous(),
                "qzeros": pack(padded & ((1 << bits) - 1), bits),
                "scales": grid.scale.T.to(torch.float16).contiguous(),
                "g_idx": torch.arange(inp, dtype=torch.int32) // grid.scheme.group_size}

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], scheme: Scheme) -> tuple[torch.Tensor, ...]:
        offset = 1 << (scheme.bits - 1)
        scale = tensors["scales"].float().T
        out = scale.shape[0]
        q = unpack(tensors["qweight"].T, scheme.bits) - offset
        zero = (unpack(tensors["qzeros"], scheme.bits)[:, :out].T + 1) - offset
        return q, scale, zero

    @staticmethod
    def config(scheme: Scheme, ignore: list[str], dtype: torch.dtype,
               fallbacks: dict[int, list[str]] | None = None) -> dict:
        """One group size for all modules (``scheme``'s; groups.py has already lowered it where needed)."""
        config = {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size, "desc_act": False,
                  "sym": scheme.symmetric, "checkpoint_format": "gptq", "true_sequential": True,
                  "static_groups": False, "damp_percent": 0.01, "lm_head": "lm_head" not in ignore}
        return config


FORMATS = {fmt.name: fmt for fmt in (CompressedTensors, GPTQ)}


def scale_dtype(fmt, dtype: torch.dtype) -> torch.dtype:
    """The dtype the format stores scales in (GPTQ: float16; compressed-tensors: the model's)."""
    return torch.float16 if fmt is GPTQ else dtype


__all__ = ["FORMATS", "CompressedTensors", "GPTQ", "pack", "unpack", "scale_dtype"]
