"""``surgery quantize``: stream a checkpoint through a weight quantizer into a registered format.

    from surgery.quantize import QuantizeConfig, quantize
    result = quantize(QuantizeConfig("HuggingFaceTB/SmolLM2-135M", "smol-w4", bits=4, group_size=128,
                                     method="hqq", format="compressed-tensors"))
    result.summary()["weight_relative_error"]

Linear weights inside the decoder layers (attention and MLP projections) are quantized; embeddings, norms and
biases are copied; ``lm_head`` is ignored by default (``ignore`` takes module names, a trailing part of them such as
``mlp.down_proj``, or ``re:REGEX``). One input tensor is quantized at a time; its small side tensors (scales, zero
points) wait in memory until the writer asks for them. The method (surgery.quantize.methods) fits each grid; the
format (surgery.quantize.formats) decides group sizes where the request does not divide a module (the summary, the
manifest and a log line say so), lays out the tensors and writes the output: the same path, and the same error
accounting, for every format.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from surgery.arch import PROJECTION_KINDS, Architecture
from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, require_finite
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, check_output_available
from surgery.memory import TrimAbove, release_freed_memory
from surgery.cards import model_name
from surgery.output import Card, OutputRecord
from surgery.quantize.formats import FORMATS, format_named
from surgery.quantize.formats.base import Fit, NonFiniteWeight, Plan, QuantFormat
from surgery.quantize.grid import Scheme
from surgery.quantize.methods import METHODS, QuantMethod, method_named
from surgery.quantize.presets import preset_options

log = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UNSET_DEFAULTS = {"scheme": "sym", "format": "compressed-tensors"}  # what neither option nor preset set
METHOD_OPTIONS = ("seed", "calibration_sequences", "rounds")  # QuantizeConfig fields only some methods take
IMATRIX_OPTIONS = ("seed", "calibration_sequences")  # what --imatrix takes of them
FORMAT_OPTIONS = ("gguf_type",)  # QuantizeConfig fields only some formats take (their ``options``)


def compute_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device: cpu or cuda[:N] (BadInput naming --device otherwise). Whether CUDA is there is
    the caller's check (the CLI's ``--device`` check, shared with merge and the others).

    Args:
        device: "cpu", "cuda" or "cuda:N".

    Returns:
        The torch device.

    Example::

        compute_device("cuda:1")   # device(type='cuda', index=1)
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device}: expected cpu or cuda (cuda:N for another GPU)")
    return parsed


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``surgery quantize`` is asked to do, validated on construction (BadInput with the CLI's message).

    ``preset``: a compressed-tensors scheme name (W4A16, FP8_DYNAMIC, NVFP4A16... surgery/quantize/presets.py)
    that sets ``format``, ``bits``, ``scheme`` and ``group_size`` (given too, they must agree: BadInput otherwise);
    without one, sym, compressed-tensors and 4 bits (or the one width the format writes: FP8's 8). ``group_size`` None: the format's default (128; GGUF: its blocks
    of 32). ``seed``, ``calibration_sequences`` and
    ``rounds`` apply to ``method="selfcal"`` only (given otherwise: BadInput). ``device`` (cpu, cuda, cuda:N) is
    where the per-tensor grids are fitted; rtn writes the same bytes on any device, so it is not part of the recipe.

    Example::

        config = QuantizeConfig("org/model", "model-w4", bits=4, method="hqq", ignore=("lm_head",))
        config.recipe()["group_size"]   # 128
    """

    source: str | Path
    output: str | Path
    bits: int | None = None
    group_size: int | None = None
    scheme: str | None = None
    method: str = "rtn"
    format: str | None = None
    preset: str | None = None
    gguf_type: str | None = None
    ignore: tuple[str, ...] = ("lm_head", "vision", "projector")
    seed: int | None = None
    calibration_sequences: int | None = None
    rounds: int | None = None
    imatrix: bool = False
    device: str = "cpu"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    force: bool = False

    def __post_init__(self):
        ignore = self.ignore.split(",") if isinstance(self.ignore, str) else self.ignore  # "lm_head,mlp.down_proj"
        object.__setattr__(self, "ignore", tuple(part.strip() for part in ignore if part.strip()))
        chosen = preset_options(self.preset) if self.preset is not None else {}
        for option, value in chosen.items():
            given = getattr(self, option)
            if given is not None and given != value:
                raise BadInput(f"--preset {self.preset} --{option.replace('_', '-')} {given}: the preset sets "
                               f"{value}")
            object.__setattr__(self, option, value)
        if self.preset is not None:
            object.__setattr__(self, "preset", self.preset.upper())
        if self.format is None and self.gguf_type is not None:
            object.__setattr__(self, "format", "gguf")
        for option, default in UNSET_DEFAULTS.items():
            if getattr(self, option) is None:
                object.__setattr__(self, option, default)
        fmt = FORMATS.get(self.format)
        if fmt is not None:
            for option, value in self.format_options().items():
                if value is not None and option not in fmt.options:
                    owners = " or ".join(name for name, other in FORMATS.items() if option in other.options)
                    raise BadInput(f"--{option.replace('_', '-')}: applies only to --format {owners} (the format "
                                   f"is {self.format})")
            object.__setattr__(self, "bits", fmt.resolve_bits(self.bits, self.format_options()))
        if self.bits is None:  # the format's bits when it writes one width (fp8-dynamic: 8), else 4
            object.__setattr__(self, "bits", 4 if fmt is None or 4 in fmt.bits else fmt.bits[0])
        self.check()

    def check(self) -> None:
        """BadInput naming the first option that is out of range or that the method or format would ignore."""
        taken = METHODS[self.method].options if self.method in METHODS else ()
        taken = (*taken, *IMATRIX_OPTIONS) if self.imatrix else taken
        for option in METHOD_OPTIONS:
            if getattr(self, option) is not None and option not in taken:
                owners = " or ".join(name for name, method in METHODS.items() if option in method.options)
                also = " or --imatrix" if option in IMATRIX_OPTIONS else ""
                raise BadInput(f"--{option.replace('_', '-')}: applies only to --method {owners}{also} (the method "
                               f"is {self.method})")
        fmt = FORMATS.get(self.format)
        if fmt is not None and self.group_size is not None:
            fmt.check_group_size(self.group_size)  # a fixed group size is named before anything else
        if self.bits not in (4, 8) and not any(self.format_options().values()):
            raise BadInput(f"--bits {self.bits}: expected 4 or 8")
        size = self.group_size if self.group_size is not None else fmt.default_group_size if fmt else 128
        if size < 8 or size % 8:
            raise BadInput(f"--group-size {size}: expected a positive multiple of 8 (e.g. 32, 64, 128)")
        if self.scheme not in ("sym", "asym"):
            raise BadInput(f"--scheme {self.scheme!r}: expected sym or asym")
        self.quant_method.check(self)
        fmt = self.quant_format
        fmt.check_method(self.method)
        if self.gguf_type not in (None, "Q4_0", "Q8_0") and self.method != "rtn":
            raise BadInput(f"--gguf-type {self.gguf_type} --method {self.method}: K-quant mixes are written by "
                           f"rounding to nearest (rtn) only")
        if self.imatrix:
            self.check_imatrix()
        fmt.check_scheme(self.scheme)
        if self.bits not in fmt.bits:
            raise BadInput(f"--format {fmt.name} --bits {self.bits}: it writes {' or '.join(map(str, fmt.bits))} bits")
        compute_device(self.device)

    def check_imatrix(self) -> None:
        """BadInput where ``--imatrix`` does not apply: it weighs round-to-nearest's scales in the integer formats
        (compressed-tensors, GPTQ, GGUF's blocks), and GGUF's Q8_0 ignores it (as llama.cpp's does)."""
        from surgery.quantize.imatrix import resolve

        if not self.quant_format.takes_importance:
            owners = ", ".join(name for name, fmt in FORMATS.items() if fmt.takes_importance)
            raise BadInput(f"--imatrix: applies only to --format {owners} (the format is {self.format})")
        if self.method != "rtn":
            raise BadInput(f"--imatrix --method {self.method}: the importance matrix weighs round-to-nearest's "
                           f"scales (method rtn); {self.method} fits its own")
        if self.format == "gguf" and self.bits == 8:
            raise BadInput("--imatrix: Q8_0 blocks are rounded to nearest whatever the importance (as llama.cpp "
                           "does); use it with Q4_0 or a K-quant mix")
        resolve({"sequences": self.calibration_sequences})

    def imatrix_parameters(self) -> dict | None:
        """imatrix.py's resolved parameters (None without ``--imatrix``)."""
        from surgery.quantize.imatrix import resolve

        return resolve({"sequences": self.calibration_sequences}) if self.imatrix else None

    def format_options(self) -> dict:
        """The fields of FORMAT_OPTIONS (options only some formats take), by name."""
        return {option: getattr(self, option) for option in FORMAT_OPTIONS}

    @property
    def quant_format(self) -> QuantFormat:
        """The registered format object ``format`` names."""
        return format_named(self.format)

    @property
    def quant_method(self) -> QuantMethod:
        """The registered method object ``method`` names."""
        return method_named(self.method)

    @property
    def resolved_group_size(self) -> int:
        """``group_size``, or the format's default."""
        return self.quant_format.default_group_size if self.group_size is None else self.group_size

    def grid_scheme(self) -> Scheme:
        """The requested grid, as the format fits it."""
        return self.quant_format.scheme(self.bits, self.resolved_group_size, self.scheme == "sym")

    def recipe(self) -> dict:
        """Everything that decides the output bytes (recorded in surgery.json)."""
        return {"bits": self.bits, "group_size": self.resolved_group_size, "scheme": self.scheme,
                "method": self.method, "format": self.format, "ignore": sorted(self.ignore),
                "seed": self.seed or 0, **({"preset": self.preset} if self.preset else {}),
                **{option: value for option, value in self.format_options().items() if value is not None},
                **({"imatrix": self.imatrix_parameters()} if self.imatrix else {}),
                **self.quant_method.recipe(self)}


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` wrote and measured. ``per_module``: module → weight relative error."""

    output: str
    recipe: dict
    measurements: dict
    shards: int
    total_bytes: int
    seconds: float
    per_module: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What ``surgery quantize --json`` prints.

        Returns:
            output, the recipe, the measurements, shards, total_bytes and seconds.

        Example::

            quantize(config).summary()["modules"]   # 14
        """
        return {"output": self.output, **self.recipe, **self.measurements, "shards": self.shards,
                "total_bytes": self.total_bytes, "seconds": self.seconds}


PARTS = ("vision", "projector")  # --ignore words naming a part of a multimodal model rather than a module
NEVER_QUANTIZED = {"router", "norm", "embedding", "position_embedding", "attn_sink"}
# Linear subclasses whose model transformers cannot load quantized, and why (checked with transformers 5.24).
UNLOADABLE_LINEAR = {
    "FalconLinear": "transformers' falcon initialises every FalconLinear through its .weight, which a quantized "
                    "module does not have, so no quantized falcon checkpoint loads",
}


def _ignored(module: str, part: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], module):
                return True
        elif pattern in PARTS and part == pattern or module == pattern or module.endswith("." + pattern):
            return True
    return False


@dataclass(frozen=True)
class Selection:
    """What :func:`select_modules` picks: ``modules`` to quantize (name → weight info), the Linear modules the loader
    must leave alone (``ignored``), the model ``dtype`` and the ``per_expert`` modules among ``modules``
    (transformers fuses them into one tensor per layer as it loads, so they share one grid)."""

    modules: dict[str, TensorInfo]
    ignored: set[str]
    dtype: torch.dtype
    per_expert: frozenset[str] = frozenset()


def select_modules(ckpt: Checkpoint, ignore: tuple[str, ...], fused_experts: bool = False) -> Selection:
    """The modules to quantize: the weights of the model's Linear projections (transformers' model for the config
    says which) and its per-expert MoE projections; never routers, norms or embeddings. ``fused_experts``: the 3-D
    expert tensors the checkpoint stores instead (gpt-oss's, each its own "module"), and no Linear weight.

    Args:
        ckpt: the source checkpoint.
        ignore: module names, trailing parts of them, ``re:REGEX``, or ``vision`` / ``projector`` (those parts of
            a vision-language model).
        fused_experts: select the checkpoint's 3-D expert tensors (the format's ``quantizes``).

    Returns:
        The :class:`Selection`.

    Example::

        select_modules(ckpt, ("lm_head", "vision", "projector")).modules   # name → TensorInfo
    """
    arch = Architecture.from_config(ckpt.config)
    modules, ignored_linear, per_expert, fused = {}, set(), set(), []
    dtypes = [info.dtype for info in ckpt.tensors.values() if info.dtype in FLOAT_DTYPES]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    for name, info in ckpt.tensors.items():
        role = arch.role(name)
        module = name.removesuffix(".weight")
        if arch.holds_every_expert(name, info.shape):
            if not fused_experts:
                fused.append(name)
            elif info.dtype in FLOAT_DTYPES and not _ignored(name, role.part, ignore):
                modules[name] = info
            continue
        if fused_experts:
            if name.endswith(".weight") and role.linear:
                ignored_linear.add(module)
            continue
        projection = role.kind in PROJECTION_KINDS or role.kind == "lm_head"
        candidate = name.endswith(".weight") and len(info.shape) == 2 and role.kind not in NEVER_QUANTIZED and \
            projection and (role.linear or role.expert is not None)
        if candidate and info.dtype in FLOAT_DTYPES and not _ignored(module, role.part, ignore):
            cls = arch.layout.module_class(name) if arch.layout is not None else None
            if cls in UNLOADABLE_LINEAR:
                raise BadInput(f"{ckpt.source}: {module} is a {cls}: {UNLOADABLE_LINEAR[cls]}")
            modules[module] = info
            if role.expert is not None:
                per_expert.add(module)
        elif name.endswith(".weight") and role.linear:
            ignored_linear.add(module)
    if not modules and fused_experts:
        raise BadInput(f"{ckpt.source}: no 3-D MoE expert tensors to quantize (all ignored?)")
    if not modules:
        raise BadInput(f"{ckpt.source}: no Linear weights to quantize (all ignored, or the model's projections are "
                       f"not nn.Linear modules, such as GPT-2's Conv1D, which quantized loaders do not replace)")
    if fused:
        log.warning("%d fused MoE expert tensors (every expert in one 3-D tensor, such as %s) stay in %s: the "
                    "loaders of this format quantize Linear modules only (--format mxfp4 quantizes gpt-oss's)",
                    len(fused), fused[0], str(dtype).removeprefix("torch."))
    return Selection(modules, ignored_linear, dtype, frozenset(per_expert))


def plan_quantization(ckpt: Checkpoint, config: QuantizeConfig) -> Plan:
    """The modules, their grids, the output specs and the config, as ``config``'s format lays them out.

    Args:
        ckpt: the source checkpoint.
        config: the validated config.

    Returns:
        The plan.

    Example::

        plan_quantization(ckpt, QuantizeConfig(src, out, group_size=64)).fallbacks   # {32: ["re:..."]}
    """
    fmt, scheme = config.quant_format, config.grid_scheme()
    fmt.check_source(ckpt)
    selection = select_modules(ckpt, config.ignore, fused_experts=fmt.quantizes == "fused experts")
    modules, ignored_linear, dtype = selection.modules, selection.ignored, selection.dtype
    fmt.check_dtype(ckpt, dtype)
    if selection.per_expert and not fmt.loads_per_expert:
        raise BadInput(f"{ckpt.source}: --format {fmt.name} cannot hold MoE experts (such as "
                       f"{min(selection.per_expert)}): transformers loads them into one fused tensor per layer, which "
                       f"its {fmt.name} loader {fmt.per_expert_problem}; --format compressed-tensors writes them")
    sizes = fmt.group_sizes({module: info.shape[1] for module, info in modules.items()}, scheme.group_size,
                            together=selection.per_expert)
    schemes = {module: replace(scheme, group_size=size) for module, size in sizes.items()}
    for module, info in modules.items():
        fmt.check_shape(info.name, info.shape, schemes[module])
    # the config names modules as transformers' model does (llava's checkpoint has language_model.model.layers...,
    # the model model.language_model.layers...); per-expert modules keep their checkpoint names
    loader = Architecture.from_config(ckpt.config).loader_module
    fallbacks = fmt.fallbacks({loader(module): size for module, size in sizes.items()}, scheme.group_size,
                              always=frozenset(map(loader, selection.per_expert)))
    plan = Plan(modules, schemes, fallbacks, [], dict(ckpt.config), dtype, {}, options=config.format_options())
    fmt.prepare(ckpt, plan)
    module_of = {info.name: module for module, info in modules.items()}
    for name, info in ckpt.tensors.items():
        module = module_of.get(name)
        if module is not None:
            for spec in fmt.module_specs(plan, module, info.shape):
                plan.specs.append(spec)
                plan.source_of[spec.name] = module
        else:
            plan.specs.append(info)
    if "lm_head" not in modules:
        ignored_linear.add("lm_head")  # a tied or ignored lm_head is still a Linear the loader must skip
    entry = fmt.quantization_config(schemes, scheme, sorted(set(map(loader, ignored_linear))), dtype, fallbacks)
    if entry is not None:
        plan.config["quantization_config"] = entry
    return plan


def group_size_note(plan: Plan) -> dict:
    """What the summary and manifest say about group sizes: the sizes used and how many modules each.

    Args:
        plan: the plan.

    Returns:
        ``{"group_sizes": {size: modules}}``, and ``group_size_fallbacks`` where the format names them.

    Example::

        group_size_note(plan)   # {"group_sizes": {"128": 30, "64": 180}, "group_size_fallbacks": {...}}
    """
    used: dict[int, int] = {}
    for scheme in plan.schemes.values():
        used[scheme.group_size] = used.get(scheme.group_size, 0) + 1
    note = {"group_sizes": {str(size): used[size] for size in sorted(used, reverse=True)}}
    if plan.fallbacks:
        note["group_size_fallbacks"] = {str(size): targets for size, targets in plan.fallbacks.items()}
    return note


# How many bytes of a module's encoded tensors may wait for the writer. safetensors orders data by element size,
# so a module's small tensors of a wider dtype (FP8's scales) are asked for long before its packed values: held
# for every module, those would be the whole output in memory. Past this budget they are encoded again instead.
WAITING_BYTES = 64 << 20
# How far freed memory may pile up before it is given back, when modules are fitted a chunk of rows at a time.
TRIM_BUDGET = 64 << 20


class _Quantizer:
    """``load(name)`` for the format's writer: quantizes a module on first request (the format encodes the
    method's grid), measures its weight error once, and keeps its other output tensors until they are asked for
    while they fit :data:`WAITING_BYTES` (else encodes the module again when they are; methods whose grids are
    precomputed keep them all). Tensors the plan alone determines (``planned_tensors``) need no encoding."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, fmt: QuantFormat, method: QuantMethod, fit: Fit):
        self.ckpt, self.plan, self.fmt, self.method, self.fit = ckpt, plan, fmt, method, fit
        self.waiting: dict[str, Any] = {}
        self.waiting_bytes = 0
        self.error_sq = self.norm_sq = 0.0
        self.per_module: dict[str, float] = {}
        self.trim = TrimAbove(TRIM_BUDGET)

    def __call__(self, name: str) -> Any:
        if name in self.waiting:
            tensor = self.waiting.pop(name)
            self.waiting_bytes -= tensor.nbytes
            return tensor
        module = self.plan.source_of.get(name)
        if module is None:
            return require_finite(self.ckpt.get(name), self.ckpt.source, name)
        local = name[len(module) + 1:]
        planned = self.fmt.planned_tensors(self.plan, module)
        if local in planned:
            return planned[local]
        source = self.plan.modules[module].name
        try:
            encoded = self.fmt.encode(self.plan, module, self.ckpt.get(source), self.fit, self.method)
        except NonFiniteWeight:
            raise BadInput(f"{self.ckpt.source}: tensor {source!r} contains NaN or Inf") from None
        if module not in self.per_module:
            error, norm = encoded.error_sq, encoded.norm_sq
            self.error_sq += error
            self.norm_sq += norm
            self.per_module[module] = (error / norm) ** 0.5 if norm else 0.0
        tensors = {self.fmt.tensor_name(module, local): t for local, t in encoded.tensors.items()
                   if local not in planned}
        by_rows = encoded.by_rows
        del encoded
        if by_rows:
            self.trim()  # chunk temporaries are small: give memory back only past a budget
        else:
            release_freed_memory()  # surgery/memory.py: else freed whole-module copies stay resident, fragmented
        result = tensors.pop(name)
        held = sum(tensor.nbytes for tensor in tensors.values())
        if self.method.precomputed or self.waiting_bytes + held <= WAITING_BYTES:
            self.waiting.update(tensors)
            self.waiting_bytes += held
        return result


def _importance(ckpt: Checkpoint, plan: Plan, config: QuantizeConfig) -> tuple[dict, dict]:
    """``--imatrix``'s importance per quantized module (by its checkpoint name) and the report; modules it has none
    for (fused experts, other modules outside the decoder layers and the lm_head) are counted in the report and
    named in a warning."""
    from surgery.quantize.imatrix import importance_matrix

    loader = Architecture.from_config(ckpt.config).loader_module
    named = {loader(module): module for module in plan.modules}  # the model's names → the checkpoint's
    measured, report = importance_matrix(ckpt, list(named), config.imatrix_parameters(), config.seed or 0)
    importance = {named[name]: values for name, values in measured.items()}
    without = sorted(set(plan.modules) - set(importance))
    if without:
        log.warning("--imatrix: %d quantized modules have no importance (not an nn.Linear of the decoder layers "
                    "or the lm_head, such as %s) and are rounded as without it", len(without), without[0])
    return importance, {**report, "without_importance": len(without)}


def _importance_weighted(fit: Fit, importance: dict, stored: torch.dtype, device: torch.device) -> Fit:
    """``fit`` with the grids of modules that have an importance searched under it (weighted_grid.py); GGUF's
    blocks read ``plan.importance`` themselves."""
    from surgery.quantize.weighted_grid import weighted_grid

    def weighted(module: str, weight: torch.Tensor, scheme: Scheme):
        if module not in importance:
            return fit(module, weight, scheme)
        return weighted_grid(weight.to(device), scheme, importance[module], stored).to("cpu")
    return weighted


def _card_body(config: QuantizeConfig, ckpt: Checkpoint, measurements: dict) -> str:
    grid = config.quant_format.grid_words(config.bits, config.resolved_group_size, config.scheme == "sym")
    return "\n".join([
        f"`{ckpt.source}` quantized by `surgery quantize` to {grid}, method `{config.method}`, format "
        f"`{config.format}`.", "",
        f"- ignored modules: {', '.join(sorted(config.ignore)) or 'none'}",
        f"- quantized weights: {measurements['modules']}",
        f"- group sizes used (modules each): {measurements['group_sizes']}",
        f"- weight-space relative error (all quantized weights): {measurements['weight_relative_error']:.4f}",
        *([f"- importance matrix (`--imatrix`): each block's scales searched to lower the error weighted by the "
           f"mean squared input of its columns, measured on {measurements['importance_matrix']['tokens']} tokens "
           f"the model wrote itself ({measurements['importance_matrix']['sequences']} sequences, seed "
           f"{config.seed or 0}); no calibration data"] if "importance_matrix" in measurements else []),
        "", "Reproduce with `surgery quantize` and the recipe in `surgery.json`.",
    ])


def quantize(config: QuantizeConfig, *, progress: Callable[[int], None] | None = None) -> QuantizeResult:
    """Quantize ``config.source`` into ``config.output`` (atomically), through the config's method and format.

    Args:
        config: the validated QuantizeConfig.
        progress: called with the bytes written as the output is streamed.

    Returns:
        The :class:`QuantizeResult` (``summary()``: what ``--json`` prints).

    Example::

        quantize(QuantizeConfig("org/model", "model-w4", group_size=64)).summary()["group_sizes"]
    """
    progress = progress or (lambda nbytes: None)
    fmt, method = config.quant_format, config.quant_method
    device = compute_device(config.device)
    check_output_available(config.output, config.force)
    started = time.perf_counter()
    with open_checkpoint(config.source) as ckpt:
        plan = plan_quantization(ckpt, config)
        record = OutputRecord("quantize", [ckpt])
        note = group_size_note(plan)
        requested = config.resolved_group_size
        if len(note["group_sizes"]) > 1 or str(requested) not in note["group_sizes"]:
            log.warning("--group-size %d does not divide every quantized module's input dimension; group sizes used "
                        "(modules each): %s", requested, note["group_sizes"])
        fit, calibration = method.prepare(ckpt, plan.schemes, config, fmt.scale_dtype(plan.dtype), device)
        importance_report = None
        if config.imatrix:
            plan.importance, importance_report = _importance(ckpt, plan, config)
            plan.extra["imatrix"] = importance_report
            fit = _importance_weighted(fit, plan.importance, fmt.scale_dtype(plan.dtype), device)
        quantizer = _Quantizer(ckpt, plan, fmt, method, fit)

        def measurements() -> dict:
            return {"modules": len(plan.modules), **note, **fmt.plan_extra(plan),
                    "weight_relative_error": round((quantizer.error_sq / quantizer.norm_sq) ** 0.5, 6),
                    **({method.name: calibration} if calibration else {}),
                    **({"importance_matrix": importance_report} if importance_report else {})}

        def files() -> dict[str, bytes]:
            measured = measurements()
            card = Card(f"{model_name(ckpt.source)}, {config.preset or f'{config.bits}-bit'} {config.method}"
                        f"{fmt.card_title_note}", "quantized",
                        f"quantize-{config.method}", _card_body(config, ckpt, measured))
            return record.files(config.recipe(), card, measured)

        written = fmt.write(config.output, ckpt, plan, quantizer, files, max_shard_size=config.max_shard_size,
                            force=config.force, progress=progress)
    return QuantizeResult(str(written.directory), config.recipe(), measurements(), written.shards,
                          written.total_bytes, round(time.perf_counter() - started, 2), quantizer.per_module)
