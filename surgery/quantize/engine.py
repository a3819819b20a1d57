"""``surgery quantize``: stream a checkpoint through a weight quantizer into a loader-native format.

    from surgery.quantize import quantize
    quantize("HuggingFaceTB/SmolLM2-135M", "smol-w4", bits=4, group_size=128, scheme="sym", method="hqq",
             format="compressed-tensors")

Linear weights inside the decoder layers (attention and MLP projections) are quantized; embeddings, norms and
biases are copied; ``lm_head`` is ignored by default (``ignore`` takes module names, a trailing part of them such as
``mlp.down_proj``, or ``re:REGEX``). One input tensor is quantized at a time; its small side tensors (scales, zero
points) wait in memory until the writer asks for them. A group size that does not divide a quantized module's input
dimension is an error (BadInput): silently falling back to another group size would write a different format than
asked for, so ignore that module or pick a divisor.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from surgery.arch import Architecture
from surgery.errors import BadInput
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, check_output_available
from surgery.provenance import hash_inputs_in_background, manifest_bytes, model_card_bytes
from surgery.quantize.formats import FORMATS, scale_dtype
from surgery.quantize.grid import Grid, Scheme, hqq, rtn

METHODS = ("rtn", "hqq", "selfcal")
QUANTIZED_KINDS = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up", "mlp_down",
                   "mlp_gate_up"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Options:
    """Everything that decides the output bytes (recorded in surgery.json)."""

    bits: int = 4
    group_size: int = 128
    scheme: str = "sym"
    method: str = "rtn"
    format: str = "compressed-tensors"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    seed: int = 0
    selfcal: dict = field(default_factory=dict)

    def check(self) -> Scheme:
        if self.bits not in (4, 8):
            raise BadInput(f"--bits {self.bits}: expected 4 or 8")
        if self.group_size < 8 or self.group_size % 8:
            raise BadInput(f"--group-size {self.group_size}: expected a positive multiple of 8 (e.g. 32, 64, 128)")
        if self.scheme not in ("sym", "asym"):
            raise BadInput(f"--scheme {self.scheme!r}: expected sym or asym")
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method == "selfcal":
            raise BadInput("--method selfcal: not implemented yet (use rtn or hqq)")
        if self.format == "gguf":
            raise BadInput("--format gguf: not implemented yet (use compressed-tensors or gptq)")
        if self.format not in FORMATS:
            raise BadInput(f"--format {self.format!r}: expected compressed-tensors or gptq")
        return Scheme(self.bits, self.group_size, self.scheme == "sym", v1_zeros=self.format == "gptq")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "scheme": self.scheme, "method": self.method,
                "format": self.format, "ignore": sorted(self.ignore), "seed": self.seed,
                **({"selfcal": self.selfcal} if self.method == "selfcal" else {})}


def _ignored(module: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


@dataclass
class Plan:
    """Which weights are quantized (module name → input TensorInfo), the output specs and the config."""

    modules: dict[str, TensorInfo]
    specs: list[TensorInfo]
    config: dict
    dtype: torch.dtype
    source_of: dict[str, str]  # output tensor name → module it belongs to (quantized ones only)


def plan_quantization(ckpt: Checkpoint, options: Options, scheme: Scheme) -> Plan:
    if not ckpt.config:
        raise BadInput(f"{ckpt.source}: has no config.json, so the quantized model could not be loaded")
    fmt = FORMATS[options.format]
    arch = Architecture.from_config(ckpt.config)
    modules, ignored_linear, specs, source_of = {}, set(), [], {}
    dtypes = [info.dtype for info in ckpt.tensors.values() if info.dtype in FLOAT_DTYPES]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    for name, info in ckpt.tensors.items():
        kind = arch.role(name).kind
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and len(info.shape) == 2 and (kind in QUANTIZED_KINDS or kind == "lm_head")
        if linear and info.dtype in FLOAT_DTYPES and not _ignored(module, options.ignore):
            scheme.check(name, info.shape)
            modules[module] = info
            for spec in fmt.specs(module, info.shape, scheme, dtype):
                specs.append(spec)
                source_of[spec.name] = module
        else:
            if linear:
                ignored_linear.add(module)
            specs.append(info)
    if not modules:
        raise BadInput(f"{ckpt.source}: no Linear weights to quantize (all ignored, or no decoder layers found)")
    if "lm_head" not in modules:
        ignored_linear.add("lm_head")  # a tied or ignored lm_head is still a Linear the loader must skip
    config = dict(ckpt.config)
    config["quantization_config"] = fmt.config(scheme, sorted(ignored_linear), dtype)
    return Plan(modules, specs, config, dtype, source_of)


class _Quantizer:
    """``load(name)`` for the writer: quantizes a module on first request and keeps its other output tensors until
    they are asked for."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, options: Options, scheme: Scheme,
                 quantize_module: Callable[[str, torch.Tensor], Grid]):
        self.ckpt, self.plan, self.options, self.scheme = ckpt, plan, options, scheme
        self.fmt = FORMATS[options.format]
        self.quantize_module = quantize_module
        self.waiting: dict[str, torch.Tensor] = {}
        self.error_sq = self.norm_sq = 0.0
        self.per_module: dict[str, float] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.waiting:
            return self.waiting.pop(name)
        module = self.plan.source_of.get(name)
        if module is None:
            return self.ckpt.get(name)
        weight = self.ckpt.get(f"{module}.weight").float()
        grid = self.quantize_module(module, weight)
        error = float((weight - grid.dequantize()).pow(2).sum())
        norm = float(weight.pow(2).sum())
        self.error_sq += error
        self.norm_sq += norm
        self.per_module[module] = (error / norm) ** 0.5 if norm else 0.0
        tensors = {f"{module}.{local}": t for local, t in self.fmt.encode(grid, self.plan.dtype).items()}
        result = tensors.pop(name)
        self.waiting.update(tensors)
        return result


def grid_function(options: Options, scheme: Scheme, dtype: torch.dtype) -> Callable[[str, torch.Tensor], Grid]:
    stored = scale_dtype(FORMATS[options.format], dtype)
    if options.method == "hqq":
        return lambda module, weight: hqq(weight, scheme, stored)
    return lambda module, weight: rtn(weight, scheme, stored)


def _card_body(options: Options, ckpt: Checkpoint, measurements: dict) -> str:
    return "\n".join([
        f"`{ckpt.source}` quantized by `surgery quantize` to {options.bits}-bit integers, group size "
        f"{options.group_size}, {'symmetric' if options.scheme == 'sym' else 'asymmetric'}, method "
        f"`{options.method}`, format `{options.format}`.", "",
        f"- ignored modules: {', '.join(sorted(options.ignore)) or 'none'}",
        f"- quantized Linear modules: {measurements['modules']}",
        f"- weight-space relative error (all quantized weights): {measurements['weight_relative_error']:.4f}",
        "", "Reproduce with `surgery quantize` and the recipe in `surgery.json`.",
    ])


def quantize(source: str | Path, output: str | Path, *, bits: int = 4, group_size: int = 128, scheme: str = "sym",
             method: str = "rtn", format: str = "compressed-tensors", ignore: list[str] | None = None,
             seed: int = 0, selfcal: dict | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
             force: bool = False, progress: Callable[[int], None] = lambda nbytes: None) -> dict:
    """Quantize ``source`` into ``output`` (atomically). Returns a summary with the measurements."""
    options = Options(bits, group_size, scheme, method, format, list(ignore if ignore is not None else ["lm_head"]),
                      seed, dict(selfcal or {}))
    grid_scheme = options.check()
    check_output_available(output, force)
    started = time.perf_counter()
    with open_checkpoint(source) as ckpt:
        plan = plan_quantization(ckpt, options, grid_scheme)
        hashes = hash_inputs_in_background([ckpt])
        quantize_module = grid_function(options, grid_scheme, plan.dtype)
        quantizer = _Quantizer(ckpt, plan, options, grid_scheme, quantize_module)

        def measurements() -> dict:
            return {"modules": len(plan.modules),
                    "weight_relative_error": round((quantizer.error_sq / quantizer.norm_sq) ** 0.5, 6)}

        def files() -> dict[str, bytes]:
            aux = dict(ckpt.auxiliary_files())
            measured = measurements()
            aux["surgery.json"] = manifest_bytes("quantize", options.to_dict(), hashes.result(), measured)
            aux["README.md"] = model_card_bytes(
                title=f"{ckpt.source}, {bits}-bit {method}", relation="quantized", method=f"quantize-{method}",
                checkpoints=[ckpt], body=_card_body(options, ckpt, measured))
            return aux

        result = write_checkpoint(output, plan.specs, quantizer, config=plan.config, files=files,
                                  max_shard_size=max_shard_size, force=force, progress=progress)
    return {"output": str(result.directory), **options.to_dict(), **measurements(),
            "shards": len(result.shards), "total_bytes": result.total_size,
            "seconds": round(time.perf_counter() - started, 2), "per_module": quantizer.per_module}
