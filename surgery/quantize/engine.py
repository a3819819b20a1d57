"""``surgery quantize``: stream a checkpoint through a weight quantizer into a loader-native format.

    from surgery.quantize import quantize
    quantize("HuggingFaceTB/SmolLM2-135M", "smol-w4", bits=4, group_size=128, scheme="sym", method="hqq",
             format="compressed-tensors")

Linear weights inside the decoder layers (attention and MLP projections) are quantized; embeddings, norms and
biases are copied; ``lm_head`` is ignored by default (``ignore`` takes module names, a trailing part of them such as
``mlp.down_proj``, or ``re:REGEX``). One input tensor is quantized at a time; its small side tensors (scales, zero
points) wait in memory until the writer asks for them. Where the group size does not divide a module's input
dimension, groups.py picks the fallback (compressed-tensors: a second config group at 64 or 32 for those modules;
GPTQ: one smaller power of two for all) and the summary, the manifest and a log line say so.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from surgery.arch import PROJECTION_KINDS, Architecture
from surgery.errors import BadInput
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, require_finite
from surgery.io.loader_check import check_gguf, check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, check_output_available
from surgery.output import Card, OutputRecord, write_output
from surgery.quantize import gguf_format
from surgery.quantize.formats import FORMATS, scale_dtype
from surgery.quantize.grid import Grid, Scheme, hqq, rtn
from surgery.quantize.groups import assign_group_sizes, fallback_targets

log = logging.getLogger(__name__)

METHODS = ("rtn", "hqq", "selfcal")
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
            from surgery.quantize.selfcal import resolve

            self.selfcal = resolve(self.selfcal)
        if self.format == "gguf":
            if self.scheme != "sym":
                raise BadInput("--format gguf --scheme asym: only the symmetric Q4_0 / Q8_0 blocks are written")
            return Scheme(self.bits, gguf_format.BLOCK, True)
        if self.format not in FORMATS:
            raise BadInput(f"--format {self.format!r}: expected compressed-tensors, gptq or gguf")
        return Scheme(self.bits, self.group_size, self.scheme == "sym", v1_zeros=self.format == "gptq")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": gguf_format.BLOCK if self.format == "gguf" else self.group_size, "scheme": self.scheme, "method": self.method,
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
    schemes: dict[str, Scheme]  # module → its grid (group sizes may differ, see groups.py)
    fallbacks: dict[int, list[str]]  # fallback group size → config targets (empty when the request fits all)
    specs: list[TensorInfo]
    config: dict
    dtype: torch.dtype
    source_of: dict[str, str]  # output tensor name → module it belongs to (quantized ones only)


def select_modules(ckpt: Checkpoint, options: Options) -> tuple[dict[str, TensorInfo], set[str], torch.dtype]:
    """The Linear modules to quantize (name → weight info), the Linear modules left alone, and the model dtype."""
    arch = Architecture.from_config(ckpt.config)
    modules, ignored_linear = {}, set()
    dtypes = [info.dtype for info in ckpt.tensors.values() if info.dtype in FLOAT_DTYPES]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    for name, info in ckpt.tensors.items():
        kind = arch.role(name).kind
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and len(info.shape) == 2 and (kind in PROJECTION_KINDS or kind == "lm_head")
        if linear and info.dtype in FLOAT_DTYPES and not _ignored(module, options.ignore):
            modules[module] = info
        elif linear:
            ignored_linear.add(module)
    if not modules:
        raise BadInput(f"{ckpt.source}: no Linear weights to quantize (all ignored, or no decoder layers found)")
    return modules, ignored_linear, dtype


def plan_quantization(ckpt: Checkpoint, options: Options, scheme: Scheme) -> Plan:
    if not ckpt.config:
        raise BadInput(f"{ckpt.source}: has no config.json, so the quantized model could not be loaded")
    fmt = FORMATS[options.format]
    modules, ignored_linear, dtype = select_modules(ckpt, options)
    sizes = assign_group_sizes({module: info.shape[1] for module, info in modules.items()}, scheme.group_size,
                               options.format)
    schemes = {module: replace(scheme, group_size=size) for module, size in sizes.items()}
    for module, info in modules.items():
        schemes[module].check(info.name, info.shape)
    fallbacks = fallback_targets(sizes, scheme.group_size) if options.format == "compressed-tensors" else {}
    specs, source_of = [], {}
    for name, info in ckpt.tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in modules:
            for spec in fmt.specs(module, info.shape, schemes[module], dtype):
                specs.append(spec)
                source_of[spec.name] = module
        else:
            specs.append(info)
    if "lm_head" not in modules:
        ignored_linear.add("lm_head")  # a tied or ignored lm_head is still a Linear the loader must skip
    config = dict(ckpt.config)
    global_scheme = next(iter(schemes.values())) if options.format == "gptq" else scheme
    config["quantization_config"] = fmt.config(global_scheme, sorted(ignored_linear), dtype, fallbacks)
    return Plan(modules, schemes, fallbacks, specs, config, dtype, source_of)


def group_size_note(plan: Plan) -> dict:
    """What the summary and manifest say about group sizes: the sizes used and how many modules each."""
    used: dict[int, int] = {}
    for scheme in plan.schemes.values():
        used[scheme.group_size] = used.get(scheme.group_size, 0) + 1
    note = {"group_sizes": {str(size): used[size] for size in sorted(used, reverse=True)}}
    if plan.fallbacks:
        note["group_size_fallbacks"] = {str(size): targets for size, targets in plan.fallbacks.items()}
    return note


class _Quantizer:
    """``load(name)`` for the writer: quantizes a module on first request and keeps its other output tensors until
    they are asked for."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, options: Options, scheme: Scheme,
                 quantize_module: Callable[[str, torch.Tensor, Scheme], Grid]):
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
            return require_finite(self.ckpt.get(name), self.ckpt.source, name)
        weight = require_finite(self.ckpt.get(f"{module}.weight"), self.ckpt.source, f"{module}.weight").float()
        grid = self.quantize_module(module, weight, self.plan.schemes[module])
        error = float((weight - grid.dequantize()).pow(2).sum())
        norm = float(weight.pow(2).sum())
        self.error_sq += error
        self.norm_sq += norm
        self.per_module[module] = (error / norm) ** 0.5 if norm else 0.0
        tensors = {f"{module}.{local}": t for local, t in self.fmt.encode(grid, self.plan.dtype).items()}
        result = tensors.pop(name)
        self.waiting.update(tensors)
        return result


def compute_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device: cpu or cuda[:N] (BadInput naming --device otherwise). Whether CUDA is there is
    the caller's check (the CLI's ``--device`` check, shared with merge and the others)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device}: expected cpu or cuda (cuda:N for another GPU)")
    return parsed


def grid_function(options: Options, stored: torch.dtype,
                  device: torch.device = torch.device("cpu")) -> Callable[[str, torch.Tensor, Scheme], Grid]:
    """``fit(module, weight, scheme)`` for the method, run on ``device`` and returned on the CPU; scales are rounded
    to ``stored``, the dtype they are written in. selfcal's grids are computed beforehand (:func:`_self_calibrated`),
    not here."""
    method = hqq if options.method == "hqq" else rtn
    return lambda module, weight, scheme: method(weight.to(device), scheme, stored).to("cpu")


def _self_calibrated(ckpt: Checkpoint, options: Options, schemes: dict[str, Scheme], stored: torch.dtype,
                     device: torch.device):
    """selfcal.py's grids for every module (computed before the output is streamed; they are small), served by a
    ``fit(module, weight, scheme)`` that hands each one out once, and the calibration report."""
    from surgery.quantize.selfcal import self_calibrate

    grids, report = self_calibrate(ckpt, schemes, options.selfcal, options.seed, stored, device)
    return (lambda module, weight, scheme: grids.pop(module)), report


def _card_body(options: Options, ckpt: Checkpoint, measurements: dict) -> str:
    return "\n".join([
        f"`{ckpt.source}` quantized by `surgery quantize` to {options.bits}-bit integers, group size "
        f"{options.to_dict()['group_size']}, {'symmetric' if options.scheme == 'sym' else 'asymmetric'}, method "
        f"`{options.method}`, format `{options.format}`.", "",
        f"- ignored modules: {', '.join(sorted(options.ignore)) or 'none'}",
        f"- quantized Linear modules: {measurements['modules']}",
        f"- group sizes used (modules each): {measurements['group_sizes']}",
        f"- weight-space relative error (all quantized weights): {measurements['weight_relative_error']:.4f}",
        "", "Reproduce with `surgery quantize` and the recipe in `surgery.json`.",
    ])


def _check_options_apply(method: str, format: str, group_size: int | None, seed: int | None,
                         selfcal: dict) -> None:
    """BadInput naming an option that the method or format would ignore (nothing is dropped silently)."""
    if method != "selfcal":
        flags = {"sequences": "--calibration-sequences", "rounds": "--rounds"}
        given = ["--seed"] * (seed is not None) + [flags.get(key, f"selfcal {key}") for key, value in selfcal.items()
                                                   if value is not None]
        if given:
            raise BadInput(f"{given[0]}: applies only to --method selfcal (the method is {method})")
    if format == "gguf" and group_size not in (None, gguf_format.BLOCK):
        raise BadInput(f"--group-size {group_size}: GGUF's Q4_0 / Q8_0 blocks are {gguf_format.BLOCK} weights")


def quantize(source: str | Path, output: str | Path, *, bits: int = 4, group_size: int | None = None,
             scheme: str = "sym", method: str = "rtn", format: str = "compressed-tensors",
             ignore: list[str] | None = None, seed: int | None = None, selfcal: dict | None = None,
             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
             progress: Callable[[int], None] = lambda nbytes: None, device: str = "cpu") -> dict:
    """Quantize ``source`` into ``output`` (atomically). Returns a summary with the measurements.

    ``group_size`` defaults to 128 (GGUF: its blocks of 32); ``seed`` and ``selfcal`` (its parameters) apply to
    ``method="selfcal"`` only. ``device`` (cpu, cuda, cuda:N) is where the per-tensor grids are fitted (rtn, hqq;
    selfcal's GPTQ rounding); tensors are read and written on the CPU. rtn writes the same bytes on any device; it
    is not part of the recipe in surgery.json."""
    selfcal = dict(selfcal or {})
    _check_options_apply(method, format, group_size, seed, selfcal)
    options = Options(bits, 128 if group_size is None else group_size, scheme, method, format,
                      list(ignore if ignore is not None else ["lm_head"]), 0 if seed is None else seed, selfcal)
    grid_scheme = options.check()
    device = compute_device(device)
    check_output_available(output, force)
    started = time.perf_counter()
    with open_checkpoint(source) as ckpt:
        if options.format == "gguf":
            return _quantize_to_gguf(ckpt, options, output, force, progress, started, device)
        plan = plan_quantization(ckpt, options, grid_scheme)
        record = OutputRecord("quantize", [ckpt])
        note = group_size_note(plan)
        if len(note["group_sizes"]) > 1 or str(options.group_size) not in note["group_sizes"]:
            log.warning("--group-size %d does not divide every quantized module's input dimension; group sizes used "
                        "(modules each): %s", options.group_size, note["group_sizes"])
        stored = scale_dtype(FORMATS[options.format], plan.dtype)
        quantize_module = grid_function(options, stored, device)
        calibration = {}
        if options.method == "selfcal":
            quantize_module, calibration = _self_calibrated(ckpt, options, plan.schemes, stored, device)
        quantizer = _Quantizer(ckpt, plan, options, grid_scheme, quantize_module)

        def measurements() -> dict:
            return {"modules": len(plan.modules), **note,
                    "weight_relative_error": round((quantizer.error_sq / quantizer.norm_sq) ** 0.5, 6),
                    **({"selfcal": calibration} if calibration else {})}

        def files() -> dict[str, bytes]:
            aux = dict(ckpt.auxiliary_files())
            measured = measurements()
            card = Card(f"{ckpt.source}, {bits}-bit {method}", "quantized", f"quantize-{method}",
                        _card_body(options, ckpt, measured))
            return aux | record.files(options.to_dict(), card, measured)

        result = write_checkpoint(output, plan.specs, quantizer, config=plan.config, files=files,
                                  max_shard_size=max_shard_size, force=force, progress=progress,
                                  check=lambda staging: check_transformers(staging, [ckpt.path]))
    return {"output": str(result.directory), **options.to_dict(), **measurements(),
            "shards": len(result.shards), "total_bytes": result.total_size,
            "seconds": round(time.perf_counter() - started, 2), "per_module": quantizer.per_module}


def _quantize_to_gguf(ckpt: Checkpoint, options: Options, output: str | Path, force: bool,
                      progress: Callable[[int], None], started: float, device: torch.device) -> dict:
    """``--format gguf``: one ``model-Q4_0.gguf`` / ``model-Q8_0.gguf`` (gguf_format.py) beside the manifest and card,
    in one atomic directory."""
    if not ckpt.config:
        raise BadInput(f"{ckpt.source}: has no config.json, so no GGUF hyperparameters could be written")
    gguf_format.check_source(ckpt.config, ckpt.source)
    modules, _, _ = select_modules(ckpt, options)
    for module, info in modules.items():
        if info.shape[1] % gguf_format.BLOCK:
            raise BadInput(f"{module}: input dimension {info.shape[1]} is not a multiple of GGUF's block of 32 "
                           f"(--ignore this module)")
    record = OutputRecord("quantize", [ckpt])
    fit = grid_function(options, torch.float16, device)  # rtn: llama.cpp's own quantizer, on the CPU
    calibration = {}
    if options.method == "selfcal":  # GPTQ on the Q4_0 / Q8_0 grid (symmetric blocks of 32, float16 scales)
        grid_scheme = Scheme(options.bits, gguf_format.BLOCK, True)
        fit, calibration = _self_calibrated(ckpt, options, {module: grid_scheme for module in modules}, torch.float16,
                                            device)
    heads = ckpt.config["num_attention_heads"]
    kv_heads = ckpt.config.get("num_key_value_heads") or heads
    totals = {"error_sq": 0.0, "norm_sq": 0.0}
    per_module = {}

    def calibrated_blocks(module: str, weight: torch.Tensor):
        """The selfcal grid (HF row order) in llama.cpp's row order, as blocks: kept as is (GPTQ trades weight
        error for output error, so no per-block choice against llama.cpp's reference)."""
        grid = fit(module, weight, None)
        rows = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}
        for suffix, count in rows.items():
            if module.endswith(suffix):
                grid = Grid(*(gguf_format.permute_for_llama_cpp(t, count) for t in (grid.q, grid.scale, grid.zero)),
                            grid.scheme)
        return gguf_format.encode_blocks(grid)

    def quantize_module(module: str, weight: torch.Tensor):
        if options.method == "selfcal":
            data = calibrated_blocks(module, weight)
        else:
            data = gguf_format.quantize_weight(weight, options.bits, options.method,
                                               lambda w, scheme: fit(module, w, scheme))
        error = float((gguf_format.dequantize_bytes(data, options.bits) - weight).pow(2).sum())
        norm = float(weight.pow(2).sum())
        totals["error_sq"] += error
        totals["norm_sq"] += norm
        per_module[module] = (error / norm) ** 0.5 if norm else 0.0
        return data

    name = gguf_format.file_name(options.bits)
    measured = {}

    def write(staging: Path) -> dict:
        gguf_format.write_gguf(staging / name, ckpt, set(modules), options.bits, quantize_module,
                               Path(str(ckpt.source)).name, progress)
        measured.update({"modules": len(modules), "group_sizes": {str(gguf_format.BLOCK): len(modules)},
                         "gguf_file": name, "weight_relative_error": round((totals["error_sq"] / totals["norm_sq"])
                                                                           ** 0.5, 6),
                         **({"selfcal": calibration} if calibration else {})})
        return measured

    write_output(output, record, write, recipe=options.to_dict(), force=force,
                 check=lambda staging: check_gguf(staging / name),
                 card=lambda measured: Card(f"{ckpt.source}, {options.bits}-bit {options.method} (GGUF)",
                                            "quantized", f"quantize-{options.method}",
                                            _card_body(options, ckpt, measured)))
    total = (Path(output).expanduser().absolute() / name).stat().st_size
    return {"output": str(Path(output).absolute()), **options.to_dict(), **measured, "shards": 1,
            "total_bytes": total, "seconds": round(time.perf_counter() - started, 2), "per_module": per_module}
