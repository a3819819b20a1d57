"""The merge driver: opens the inputs, checks they fit together, and streams merged tensors to the writer.

Memory is one tensor per input model (plus the method's work) at a time; the output appears atomically::

    from surgery.merge import MergeJob, ModelEntry, Recipe, merge
    recipe = Recipe("ties", [ModelEntry("org/short"), ModelEntry("org/long")], parameters={"density": 0.2})
    merge(MergeJob(recipe, "out"))

Vocabulary rule: the output keeps the tokenizer source's vocabulary (the base's by default, a model's, or the
``union`` of all); embedding and lm_head rows are matched by token, and a model lacking a token gets a stand-in row
that adds no task vector (see :mod:`surgery.merge.vocab`).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from surgery.arch import NOT_DECOMPOSED_KINDS, Architecture, with_layer_index
from surgery.convert import output_config
from surgery.errors import BadInput
from surgery.io import open_checkpoint, plan_shards, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, natural_key, parse_dtype
from surgery.io.loader_check import check_transformers
from surgery.io.writer import WriteResult, check_output_available, write_shard_file
from surgery.merge.chat_template import resolve_template, with_chat_template
from surgery.merge.check import check_merge, check_section
from surgery.merge.job import MergeJob, check_parameters
from surgery.merge.params import resolve_value
from surgery.merge.sparsify import chunk_slices
from surgery.merge.recipe import ModelEntry, Recipe, Slice, recipe_json
from surgery.merge.registry import MergeMethod, TensorMerge, get_method
from surgery.merge.vocab import TOKENIZER_FILES, VocabularyPlan, VocabularySource, align_rows, plan_vocabulary
from surgery.output import Card, OutputRecord
from surgery.runtime.sampling import tensor_seed

VOCAB_ROLES = {"embedding", "lm_head"}
log = logging.getLogger(__name__)


@dataclass
class SliceInputs:
    """One output slice, opened: its base and other models, where each one's layers start, how many layers."""

    base: Checkpoint | None
    base_start: int
    models: list[Checkpoint]
    entries: list[ModelEntry]  # the recipe's entry (parameters, layer range) for each of ``models``
    length: int
    parameters: dict

    @property
    def reference(self) -> tuple[Checkpoint, int]:
        return (self.base, self.base_start) if self.base else (self.models[0], self.entries[0].layer_range[0])


@dataclass
class MergeInputs:
    """The opened checkpoints of a recipe, slice by slice (a ``models`` recipe is one slice of all layers)."""

    method: MergeMethod
    slices: list[SliceInputs]
    checkpoints: list[Checkpoint]  # each input once, base first
    auxiliary: dict[str, dict[str, bytes]]  # source → its tokenizer and generation files
    vocabulary: VocabularyPlan | None  # None when the models have no embedding
    tokenizer_source: Checkpoint  # whose auxiliary files the output carries (the base's for union)
    modules: str = "text"  # the recipe's: the parts of a vision-language model merged
    routers: str = "merge"  # the recipe's: MoE routers merged, or the base's

    @property
    def reference(self) -> Checkpoint:
        return self.slices[0].reference[0]

    @property
    def base(self) -> Checkpoint | None:
        return self.slices[0].base


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its spec, the slice it comes from, the input tensor names and the layer position t."""

    spec: TensorInfo
    part: SliceInputs
    base_name: str | None
    model_names: list[str]
    t: float

    def inputs(self) -> list[tuple[Checkpoint, str]]:
        pairs = [(self.part.base, self.base_name)] if self.part.base else []
        return pairs + list(zip(self.part.models, self.model_names))


def _layer_count(ckpt: Checkpoint) -> int:
    arch = Architecture.from_config(ckpt.config)
    if arch.num_layers is not None:
        return arch.num_layers
    layers = [arch.role(name).layer for name in ckpt.tensors]
    return max((layer for layer in layers if layer is not None), default=-1) + 1


def _as_slices(recipe: Recipe, method: MergeMethod) -> list[Slice]:
    """The recipe's slices; a ``models`` recipe becomes one slice, base first, of every layer."""
    if recipe.slices:
        return recipe.slices
    entries = list(recipe.models)
    base = recipe.base
    if method.uses_base and base is None:
        base, entries = entries[0].model, entries[1:]
    if not method.uses_base and not method.optional_base and base is not None:
        raise BadInput(f"--base: method {method.name!r} does not use a base model")
    return [Slice(([ModelEntry(base)] if base else []) + entries, base=base)]


def _open_slice(number: int, part: Slice, recipe: Recipe, method: MergeMethod, opened) -> SliceInputs:
    where = f"slice {number}" if recipe.slices else "merge"
    sources = [replace(e, layer_range=e.layer_range or (0, _layer_count(opened(e.model)))) for e in part.sources]
    for entry in sources:
        count = _layer_count(opened(entry.model))
        if entry.layer_range[1] > count:
            raise BadInput(f"{where}: layer_range {list(entry.layer_range)} of {entry.model} goes past its "
                           f"{count} layers")
    lengths = {end - start for start, end in (entry.layer_range for entry in sources)}
    if len(lengths) > 1:
        counts = ", ".join(f"{e.model} {e.layer_range[1] - e.layer_range[0]}"
                           + (f" (layers {e.layer_range[0]}-{e.layer_range[1]})" if recipe.slices else "")
                           for e in sources)
        raise BadInput(f"{where}: every source needs the same number of layers; layers per model: {counts}")
    base_name = part.base or recipe.base
    base_index = None
    if method.uses_base or (method.optional_base and base_name is not None):
        if base_name is None or not recipe.slices:
            base_index = 0
        else:
            base_index = next((i for i, e in enumerate(sources) if e.model == base_name), None)
            if base_index is None:
                raise BadInput(f"{where}: the base {base_name} is not among its sources")
    elif part.base:
        raise BadInput(f"{where}: method {method.name!r} does not use a base model")
    others = [e for i, e in enumerate(sources) if i != base_index]
    method.check_model_count(len(others))
    base_entry = sources[base_index] if base_index is not None else None
    return SliceInputs(
        base=opened(base_entry.model) if base_entry else None,
        base_start=base_entry.layer_range[0] if base_entry else 0,
        models=[opened(e.model) for e in others], entries=others, length=lengths.pop(),
        parameters=part.parameters)


def open_inputs(recipe: Recipe, stack: ExitStack) -> MergeInputs:
    """Open every checkpoint of ``recipe`` once (closed with ``stack``); check method, counts, ranges, parameters.

    Args:
        recipe: the recipe to merge.
        stack: the ``ExitStack`` that closes the opened checkpoints.

    Returns:
        The :class:`MergeInputs`: method, slices, checkpoints (base first), auxiliary files, vocabulary plan and
        tokenizer source; BadInput for a bad method, parameter, tokenizer source or chat template.

    Example::

        with ExitStack() as stack:
            inputs = open_inputs(load_recipe("recipe.yaml"), stack)
    """
    method = get_method(recipe.method)
    check_parameters(recipe, method)
    opened: dict[str, Checkpoint] = {}

    def open_once(source: str) -> Checkpoint:
        if source not in opened:
            opened[source] = stack.enter_context(open_checkpoint(source))
        return opened[source]

    slices = [_open_slice(n, part, recipe, method, open_once) for n, part in enumerate(_as_slices(recipe, method))]
    checkpoints = list(dict.fromkeys(
        ([p.base for p in slices if p.base]) + [c for p in slices for c in p.models]))
    source_name = recipe.tokenizer_source
    names = [c.source for c in checkpoints]
    if source_name not in ("base", "union") and source_name not in names:
        raise BadInput(f"tokenizer_source {source_name!r}: expected base, union or one of the merged models")
    reference = slices[0].reference[0]
    tokenizer_source = reference if source_name in ("base", "union") else checkpoints[names.index(source_name)]
    auxiliary = {c.source: c.auxiliary_files() for c in checkpoints}
    if recipe.chat_template:
        resolve_template(recipe.chat_template, list(auxiliary.values()), "chat_template")
    arch = Architecture.from_config(reference.config)
    rows = {c.source: _embedding_rows(c, Architecture.from_config(c.config)) for c in checkpoints}
    vocabulary = None
    if all(count is not None for count in rows.values()):
        sources = [VocabularySource(c.source, auxiliary[c.source], rows[c.source]) for c in checkpoints]
        vocabulary = plan_vocabulary(sources, source_name, reference.source,
                                     pad_to_multiple_of=recipe.pad_to_multiple_of)
    return MergeInputs(method, slices, checkpoints, auxiliary, vocabulary, tokenizer_source, recipe.modules,
                       recipe.routers)


def copied_from_base(inputs: MergeInputs, arch: Architecture, name: str) -> bool:
    """Whether the output keeps tensor ``name`` as the base (the first model, for methods without one) has it: a
    vision-language model's parts outside ``modules``, and MoE routers with ``routers: base``.

    Args:
        inputs: the opened inputs (their recipe's modules and routers).
        arch: the reference model's architecture.
        name: an output tensor name.

    Returns:
        True when the tensor is copied.

    Example: ``copied_from_base(inputs, arch, "vision_tower.encoder.layers.0.mlp.fc1.weight")   # True by default``
    """
    role = arch.role(name)
    if inputs.modules != "all" and (role.part == "text") != (inputs.modules == "text"):
        return True
    return role.kind == "router" and inputs.routers == "base"


def _embedding_rows(ckpt: Checkpoint, arch: Architecture) -> int | None:
    """Rows of the token embedding (or of the lm_head when there is no embedding)."""
    for kind in ("embedding", "lm_head"):
        names = [name for name in ckpt.tensors if arch.role(name).kind == kind]
        if names:
            return ckpt.tensors[names[0]].shape[0]
    return None


def _identity(ckpt: Checkpoint) -> tuple:
    config = ckpt.config or {}
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _tensor_name_in(ckpt: Checkpoint, name: str, arch: Architecture) -> str | None:
    """The name holding ``name``'s data in ``ckpt``: itself, or the embedding for a tied lm_head."""
    if name in ckpt.tensors:
        return name
    own = Architecture.from_config(ckpt.config)
    if arch.role(name).kind == "lm_head" and own.tie_word_embeddings:
        embeddings = [n for n in ckpt.tensors if own.role(n).kind == "embedding"]
        return embeddings[0] if len(embeddings) == 1 else None
    return None


def _layer_names(ckpt: Checkpoint, arch: Architecture, layer: int) -> list[str]:
    return [name for name in ckpt.tensors if arch.role(name).layer == layer]


def _check_and_spec(inputs: MergeInputs, arch: Architecture, out_name: str, pairs: list[tuple[Checkpoint, str]],
                    dtype: torch.dtype | None) -> TensorInfo:
    """The output spec of one tensor, after checking each input has it in a compatible shape."""
    reference, reference_name = pairs[0]
    info = reference.tensors[reference_name]
    shape = info.shape
    vocab = arch.role(out_name).kind in VOCAB_ROLES and inputs.vocabulary is not None
    if vocab:
        shape = (inputs.vocabulary.rows, *shape[1:])
    for ckpt, name in pairs:
        held = _tensor_name_in(ckpt, name, arch)
        if held is None:
            part = arch.role(out_name).part
            hint = f" (the {part} of a vision-language model: --modules text merges the language model only)" \
                if part != "text" else ""
            raise BadInput(f"{ckpt.source}: tensor {name!r} is missing (present in {reference.source}){hint}")
        other = ckpt.tensors[held].shape
        if other != info.shape and not (vocab and other[1:] == info.shape[1:]):
            raise BadInput(f"tensor {name!r}: shape {info.shape} in {reference.source} but {other} in "
                           f"{ckpt.source}")
    out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    return TensorInfo(out_name, out_dtype, shape)


def plan_tensors(inputs: MergeInputs, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Every output tensor and where it comes from, after checking architectures, names and shapes.

    Tensors outside the decoder layers come from the first slice (embeddings) or the last (the rest: final norm,
    lm_head); decoder layers follow slice by slice, renumbered from 0. The layer position t (for gradients) runs
    from 0 to 1 over each slice's layers (1 for a single-layer slice), 0 outside the layers, as in mergekit.

    Args:
        inputs: the opened inputs, from :func:`open_inputs`.
        dtype: the output dtype of floating-point tensors (None: each tensor keeps its stored dtype).

    Returns:
        The :class:`PlannedTensor` list in natural name order; BadInput for mismatched architectures, missing
        tensors or shapes.

    Example: ``specs = [planned.spec for planned in plan_tensors(open_inputs(recipe, stack), torch.bfloat16)]``
    """
    reference = inputs.reference
    arch = Architecture.from_config(reference.config)
    text_names = _other_wrappings(inputs, arch)
    experts = {ckpt.source: Architecture.from_config(ckpt.config).experts_summary().get("experts_per_layer")
               for ckpt in inputs.checkpoints}
    if len(set(experts.values())) > 1:
        raise BadInput("experts per MoE layer differ (" + ", ".join(f"{source}: {count}" for source, count in
                                                                   experts.items())
                       + "): experts are merged one to one, expert i with expert i, so every model needs as many")

    def name_in(ckpt: Checkpoint, name: str) -> str:
        """``name`` (the reference's) as ``ckpt`` calls it: itself, or its language-model counterpart."""
        if ckpt.source not in text_names:
            return name
        return text_names[ckpt.source].get(arch.text_key(name) or "", name)

    def planned(part: SliceInputs, out_name: str, rename, t: float) -> PlannedTensor:
        base_name = name_in(part.base, rename(part.base_start)) if part.base else None
        model_names = [name_in(ckpt, rename(entry.layer_range[0])) for ckpt, entry in zip(part.models, part.entries)]
        if copied_from_base(inputs, arch, out_name):  # only the base (or the first model) is read
            model_names = [] if part.base else model_names[:1]
        pairs = ([(part.base, base_name)] if part.base else []) + list(zip(part.models, model_names))
        return PlannedTensor(_check_and_spec(inputs, arch, out_name, pairs, dtype), part, base_name, model_names, t)

    plan = []
    for name in reference.tensors:
        if arch.role(name).layer is None:
            part = inputs.slices[0] if arch.role(name).kind == "embedding" else inputs.slices[-1]
            plan.append(planned(part, name, lambda start, name=name: name, 0.0))
    out_layer = 0
    for part in inputs.slices:
        ckpt, start = part.reference
        for index in range(part.length):
            t = index / (part.length - 1) if part.length > 1 else 1.0
            for name in _layer_names(ckpt, arch, start + index):
                rename = lambda first, name=name, index=index: with_layer_index(name, first + index)
                plan.append(planned(part, with_layer_index(name, out_layer), rename, t))
            out_layer += 1
    return sorted(plan, key=lambda p: natural_key(p.spec.name))


def _other_wrappings(inputs: MergeInputs, arch: Architecture) -> dict[str, dict[str, str]]:
    """For each input whose architecture is not the reference's but wraps the same language model (a
    vision-language model and its text-only fine-tune, either way round): its tensor names by language-model
    position (:meth:`Architecture.text_key`). BadInput for any other mismatch."""
    reference = inputs.reference
    names = {}
    for ckpt in inputs.checkpoints:
        if _identity(ckpt) == _identity(reference):
            continue
        other = Architecture.from_config(ckpt.config)
        if other.text_model_type != arch.text_model_type or arch.layout is None or other.layout is None:
            raise BadInput(f"architecture mismatch: {reference.source} is {_identity(reference)[0]} "
                           f"{list(_identity(reference)[1])}, {ckpt.source} is {_identity(ckpt)[0]} "
                           f"{list(_identity(ckpt)[1])}")
        names[ckpt.source] = {key: name for name in ckpt.tensors if (key := other.text_key(name)) is not None}
    return names



def aim_factors_for(recipe: Recipe, inputs: MergeInputs, plan: list[PlannedTensor],
                    device: str) -> dict[str, torch.Tensor]:
    """Output tensor name → AIM factors r (per input channel), from the recipe's stats file or from calibrating the
    base now. Empty when the recipe has no ``aim``.

    Args:
        recipe: the recipe (its ``aim`` settings and ``seed``).
        inputs: the opened inputs (AIM needs one base and no slices, else BadInput).
        plan: the output tensors, from :func:`plan_tensors`.
        device: where calibration runs (``"cpu"``, ``"cuda"``).

    Returns:
        The factors by output tensor name (only tensors with statistics); BadInput when no tensor has any.

    Example: ``aim_factors_for(recipe, inputs, plan_tensors(inputs, None), "cpu")``
    """
    from surgery.merge import aim

    settings = recipe.aim
    if settings is None:
        return {}
    if recipe.slices or inputs.base is None:
        raise BadInput(f"aim: needs one base model and no slices (method {inputs.method.name!r}"
                       + (", slices" if recipe.slices else ", no base") + ")")
    if settings["stats"]:
        stats, where = aim.load_stats(settings["stats"]), settings["stats"]
    else:
        stats, _ = aim.compute_stats(inputs.base, calibration=settings["calibration"],
                                     max_tokens=settings["max_tokens"], seed=recipe.seed, device=device)
        where = f"the statistics of {inputs.base.source}"
    factors = {}
    for planned in plan:
        name = planned.spec.name
        if name in stats:
            if not aim.fits_factors(stats[name].shape, planned.spec.shape):
                raise BadInput(f"{where}: tensor {name!r} has {tuple(stats[name].shape)} statistics for shape "
                               f"{planned.spec.shape} (statistics of another model?)")
            factors[name] = aim.aim_factors(stats[name], settings["omega"])
    if not factors:
        raise BadInput(f"{where}: no statistics for any tensor of {inputs.base.source} (statistics of another model?)")
    arch = Architecture.from_config(inputs.base.config)
    experts = [p.spec.name for p in plan if p.spec.name not in factors and not p.spec.name.endswith("bias") and
               (arch.role(p.spec.name).expert is not None or arch.role(p.spec.name).experts is not None)]
    if experts:  # statistics come from nn.Linear inputs; transformers runs MoE experts as fused tensors
        log.warning("aim: %d MoE expert tensors (such as %s) have no activation statistics and are merged without "
                    "AIM", len(experts), experts[0])
    return factors


def resolved_parameters(method: MergeMethod, recipe: Recipe, entries: list[ModelEntry], slice_parameters: dict,
                        name: str, t: float) -> dict:
    """The method's parameters for one tensor: the first setting that applies (a model entry's for a per-model
    one, then the slice's, then the recipe's), else the declared default; per-model ones as a list in ``entries``'
    order.

    Args:
        method: the merge method.
        recipe: the recipe (its global parameters; ``finish`` reads it).
        entries: the recipe entries of the tensor's non-base models.
        slice_parameters: the slice's parameters ({} without slices).
        name: the output tensor's name (for filters).
        t: its layer position in [0, 1] (for gradients).

    Returns:
        Parameter name → value, what :class:`TensorMerge` carries.

    Example: ``resolved_parameters(get_method("ties"), recipe, recipe.models, {}, "model.layers.0.mlp.up_proj.weight", 0.0)``
    """
    globals_ = [slice_parameters, recipe.parameters]

    def value(parameter, setting_sources):
        for settings in setting_sources:
            if parameter.name in settings:
                resolved = resolve_value(settings[parameter.name], name, t)
                if resolved is not None:
                    return resolved
        return parameter.default

    values = {}
    for parameter in method.parameters:
        if parameter.per_model:
            values[parameter.name] = [value(parameter, [entry.parameters, *globals_]) for entry in entries]
        else:
            values[parameter.name] = value(parameter, globals_)
        if parameter.finish is not None:
            values[parameter.name] = parameter.finish(values[parameter.name], recipe)
        if parameter.required and values[parameter.name] is None:
            raise BadInput(f"tensor {name!r}: no setting of parameter {parameter.name!r} applies to it "
                           f"(method {method.name!r} needs one)")
    return values


class TensorMerger:
    """Computes one merged output tensor at a time (the ``load`` callback handed to the writer)."""

    def __init__(self, recipe: Recipe, inputs: MergeInputs, plan: list[PlannedTensor], device: str,
                 aim_factors: dict[str, torch.Tensor] | None = None):
        self.recipe, self.inputs, self.device = recipe, inputs, torch.device(device)
        self.aim_factors = aim_factors or {}
        self.arch = Architecture.from_config(inputs.reference.config)
        self.plan = {planned.spec.name: planned for planned in plan}

    def _read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        """The tensor as stored (no float32 copy: methods convert chunk by chunk)."""
        return ckpt.get(_tensor_name_in(ckpt, name, self.arch)).to(self.device)

    def _check_finite(self, planned: PlannedTensor, result: torch.Tensor) -> None:
        """NaN/Inf in any input reaches the output, so one check of the output suffices; on failure, find the input."""
        flat = result.reshape(-1)
        if all(torch.isfinite(flat[part]).all() for part in chunk_slices(flat.numel())):
            return
        for ckpt, name in planned.inputs():
            held = _tensor_name_in(ckpt, name, self.arch)
            if not torch.isfinite(ckpt.get(held)).all():
                raise BadInput(f"{ckpt.source}: tensor {held!r} contains NaN or Inf")
        raise BadInput(f"tensor {planned.spec.name!r}: the {self.inputs.method.name} merge produced NaN or Inf from "
                       "finite inputs (check the weights and parameters)")

    def _parameters(self, planned: PlannedTensor) -> dict:
        return resolved_parameters(self.inputs.method, self.recipe, planned.part.entries, planned.part.parameters,
                                   planned.spec.name, planned.t)

    def pieces(self, merge_input: TensorMerge) -> list[TensorMerge]:
        """What the method merges separately: the tensor, or on a fused MoE tensor (every expert stacked along dim
        0) each expert, so that expert i's task vector is model i's expert i minus the base's and SVD methods
        decompose each expert's matrix, exactly as for experts stored one tensor each."""
        if self.arch.role(merge_input.name).experts is None or merge_input.models[0].ndim < 2:
            return [merge_input]
        return [replace(merge_input, base=None if merge_input.base is None else merge_input.base[index],
                        models=[model[index] for model in merge_input.models],
                        is_matrix=merge_input.models[0].ndim == 3)
                for index in range(merge_input.models[0].shape[0])]  # gpt-oss's per-expert biases (experts, out) too

    def merge_input(self, name: str) -> TensorMerge | None:
        """The method's input for output tensor ``name``: the tensors read (rows matched by token for the
        vocabulary), the parameters resolved for it, its seeded generator; None for a tensor copied from the base."""
        planned = self.plan[name]
        if copied_from_base(self.inputs, self.arch, name):
            return None
        tensors = [self._read(ckpt, input_name) for ckpt, input_name in planned.inputs()]
        vocabulary = self.inputs.vocabulary
        if self.arch.role(name).kind in VOCAB_ROLES and vocabulary is not None:
            indices = [vocabulary.index[ckpt.source] for ckpt, _ in planned.inputs()]
            tensors = align_rows(tensors, [None if i is None else i.to(self.device) for i in indices],
                                 vocabulary.rows, base_position=0 if planned.part.base else None)
        base, models = (tensors[0], tensors[1:]) if planned.part.base else (None, tensors)
        generator = None
        if self.inputs.method.random:
            generator = torch.Generator(device=self.device).manual_seed(tensor_seed(self.recipe.seed, name))
        dtype = planned.spec.dtype if planned.spec.dtype.is_floating_point and name not in self.aim_factors \
            else torch.float32
        return TensorMerge(
            name=name, base=base, models=models, parameters=self._parameters(planned),
            is_matrix=len(planned.spec.shape) == 2 and self.arch.role(name).kind not in NOT_DECOMPOSED_KINDS,
            generator=generator, out_dtype=dtype,
        )

    def merged(self, merge_input: TensorMerge) -> torch.Tensor:
        """The method (then AIM, when its factors are given) on one tensor's input."""
        pieces = self.pieces(merge_input)
        if len(pieces) == 1 and pieces[0] is merge_input:
            result = self.inputs.method.function(merge_input)
        else:
            result = torch.stack([self.inputs.method.function(piece) for piece in pieces])
        factors = self.aim_factors.get(merge_input.name)
        if factors is not None:
            from surgery.merge.aim import apply_aim

            result = apply_aim(merge_input.base, result, factors.to(self.device))
        return result

    def __call__(self, name: str) -> torch.Tensor:
        planned = self.plan[name]
        merge_input = self.merge_input(name)
        if merge_input is None:
            ckpt, input_name = planned.inputs()[0]  # the base (the first model for methods without one)
            return self._read(ckpt, input_name).to(planned.spec.dtype)
        result = self.merged(merge_input)
        self._check_finite(planned, result)
        return result


@dataclass
class MergeResult:
    """What :func:`merge` wrote: the writer's result and the recipe merged."""

    write: WriteResult
    recipe: Recipe
    check: dict | None = None  # --check's report (surgery.merge.check.check_merge)

    def summary(self) -> dict:
        """What ``surgery merge --json`` prints.

        Returns:
            output directory, method, shard count, total bytes, the files written, and ``check`` with --check.

        Example: ``merge(job).summary()["shards"]``
        """
        return {"output": str(self.write.directory), "method": self.recipe.method, "shards": len(self.write.shards),
                "total_bytes": self.write.total_size, "files": self.write.files} \
            | ({"check": self.check} if self.check is not None else {})


def _output_config(inputs: MergeInputs, specs: list[TensorInfo], dtype: torch.dtype | None) -> dict | None:
    """The reference model's config with the output dtype, vocabulary size and (for slices) layer count."""
    config = output_config(inputs.reference.config, dtype)
    if not config:
        return None
    config = dict(config)
    arch = Architecture.from_config(config)
    embedding = [s for s in specs if arch.role(s.name).kind == "embedding"]
    if embedding and "vocab_size" in config:
        config["vocab_size"] = embedding[0].shape[0]
    layers = [(part.reference, index) for part in inputs.slices for index in range(part.length)]
    for text in [config] + ([dict(config["text_config"])] if isinstance(config.get("text_config"), dict) else []):
        if "num_hidden_layers" in text:
            text["num_hidden_layers"] = len(layers)
        if isinstance(text.get("layer_types"), list):  # per-layer attention kinds follow the layers they came from
            text["layer_types"] = [_layer_types(ckpt)[start + index] for (ckpt, start), index in layers]
        if text is not config:
            config["text_config"] = text
    return config


def _layer_types(ckpt: Checkpoint) -> list:
    config = ckpt.config or {}
    return (config.get("text_config") or config).get("layer_types")


def _card_body(recipe: Recipe, inputs: MergeInputs) -> str:
    method = inputs.method
    lines = [f"Merged with [surgery](https://pypi.org/project/surgery/) using **{method.name}**: {method.summary}", ""]
    if recipe.aim:
        lines[0] += (f" Then AIM (activation-informed merging, ω = {recipe.aim['omega']}): each weight's change is "
                     "scaled down on the input channels the base model uses most.")
    if inputs.base:
        lines.append(f"- base: `{inputs.base.source}`")
    lines += [f"- model: `{ckpt.source}`" for ckpt in inputs.checkpoints if ckpt is not inputs.base]
    lines += ["", "Recipe (reproduce with `surgery merge --recipe surgery.json -o OUT`):", "", "```json",
              recipe_json(recipe), "```"]
    return "\n".join(lines)


def plan_merge(job: MergeJob) -> dict:
    """What :func:`merge` would do with ``job``, without computing or writing anything (``--dry-run``).

    Args:
        job: the merge job.

    Returns:
        The plan ``surgery merge --dry-run --json`` prints: output, method, base, models, parameters, slices,
        vocabulary, tensor / byte / shard counts, dtype, seed, aim.

    Example: ``plan_merge(MergeJob.from_options(["a", "b"], method="ties", output="out"))["shards"]``
    """
    recipe = job.recipe
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack)
        specs = [planned.spec for planned in plan_tensors(inputs, dtype)]
        shards = plan_shards(specs, job.max_shard_size)
        entries = [entry for part in inputs.slices for entry in part.entries]
        return {
            "output": job.output, "method": inputs.method.name, "base": inputs.base.source if inputs.base else None,
            "models": [c.source for c in inputs.checkpoints if c is not inputs.base],
            "parameters": recipe.parameters,
            "per_model_parameters": {e.model: e.parameters for e in entries if e.parameters},
            "slices": [{"base": [part.base.source, part.base_start] if part.base else None,
                        "models": [[c.source, e.layer_range[0]] for c, e in zip(part.models, part.entries)],
                        "layers": part.length} for part in inputs.slices] if recipe.slices else None,
            "vocabulary_rows": inputs.vocabulary.rows if inputs.vocabulary else None,
            "vocabulary_note": inputs.vocabulary.note if inputs.vocabulary else None,
            "reindexed_vocabulary": sorted(name for name, index in inputs.vocabulary.index.items() if index is not None)
            if inputs.vocabulary else [],
            "tensors": len(specs), "total_bytes": sum(s.nbytes for s in specs), "shards": len(shards),
            "dtype": recipe.dtype or "as the inputs", "seed": recipe.seed, "aim": recipe.aim,
        }


def merge(job: MergeJob, *, progress: Callable[[int], None] | None = None) -> MergeResult:
    """Merge per ``job.recipe`` into ``job.output`` (atomically), with a model card and a ``surgery.json`` manifest.

    ``job.executor == "ray"`` computes and writes the shards as tasks on a Ray cluster (``job.ray_address``, or a new
    local one), see :mod:`surgery.executors.ray_tasks`; the output's bytes are the same.

    Args:
        job: the checked merge job (:meth:`MergeJob.from_options` builds it from the CLI's options).
        progress: receives the bytes of each tensor (or shard, with Ray) as it is written.

    Returns:
        The :class:`MergeResult`.

    Example::

        merge(MergeJob(Recipe("ties", [ModelEntry("a"), ModelEntry("b")], parameters={"density": 0.2}), "out"))
    """
    recipe, output, device = job.recipe, job.output, job.device
    progress = progress or (lambda nbytes: None)
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    check_output_available(output, job.force)
    with ExitStack() as stack:
        if job.executor == "ray":
            from surgery.executors.ray_tasks import RayShards, ray_connection, task_device

            ray = stack.enter_context(ray_connection(job.ray_address))
        inputs = open_inputs(recipe, stack)
        plan = plan_tensors(inputs, dtype)
        specs = [planned.spec for planned in plan]
        record = OutputRecord("merge", inputs.checkpoints)
        aim_factors = aim_factors_for(recipe, inputs, plan, device)
        merger = TensorMerger(recipe, inputs, plan, device, aim_factors)
        shards = None
        if job.executor == "ray":
            shard_task = ShardTask(recipe, task_device(device), aim_factors)
            shards = RayShards(ray, shard_task, device, progress)

        checked: dict = {}  # --check's report, once measured

        def record_files() -> dict[str, bytes]:
            vocabulary, report = inputs.vocabulary, checked.get("report")
            card = Card(f"A {inputs.method.name} merge", "merge", inputs.method.name,
                        _card_body(recipe, inputs) + check_section(report))
            measurements = ({"vocabulary": {"rows": vocabulary.rows, "tokens": vocabulary.tokens,
                                            "note": vocabulary.note}} if vocabulary else {}) \
                | ({"check": report} if report else {})
            return record.files(recipe.to_dict(), card, measurements or None)

        def files() -> dict[str, bytes]:
            aux = dict(inputs.auxiliary[inputs.tokenizer_source.source])
            if inputs.vocabulary is not None and inputs.vocabulary.tokenizer_files:  # a union tokenizer
                aux = {n: d for n, d in aux.items() if n not in TOKENIZER_FILES} | inputs.vocabulary.tokenizer_files
            aux = with_chat_template(aux, recipe.chat_template, list(inputs.auxiliary.values()), "chat_template")
            return aux | record_files()

        def check(staging: Path) -> None:
            check_transformers(staging, list(inputs.checkpoints))
            if job.check:  # measured on the complete output, then the card and manifest say what was measured
                checked["report"] = check_merge(staging, list(inputs.checkpoints), reference=inputs.reference,
                                                base=inputs.base, seed=recipe.seed or 0)
                for name, content in record_files().items():
                    (staging / name).write_bytes(content)

        with _cpu_workers(merger.device) as workers:
            result = write_checkpoint(output, specs, merger, config=_output_config(inputs, specs, dtype),
                                      files=files, max_shard_size=job.max_shard_size, force=job.force,
                                      progress=progress, workers=workers, write_shards=shards, check=check)
    return MergeResult(result, recipe, checked.get("report"))


@dataclass(frozen=True)
class ShardTask:
    """One output shard's work, picklable for a Ray task: open the inputs, plan the merge again (checking it plans
    the driver's tensors), merge and write the shard's tensors."""

    recipe: Recipe
    device: str
    aim_factors: dict[str, torch.Tensor]

    def __call__(self, path: str, header: bytes, order: list[TensorInfo], after_header: Callable[[], None]) -> int:
        """Write the shard file at ``path`` (its ``header``, then ``order``'s tensors); returns the bytes written."""
        dtype = parse_dtype(self.recipe.dtype) if self.recipe.dtype else None
        with ExitStack() as stack:
            inputs = open_inputs(self.recipe, stack)
            plan = plan_tensors(inputs, dtype)
            planned = {p.spec.name: p.spec for p in plan}
            if any(planned.get(spec.name) != spec for spec in order):
                raise RuntimeError(f"{Path(path).name}: this worker planned other tensors than the driver "
                                   "(do all nodes see the same inputs?)")
            merger = TensorMerger(self.recipe, inputs, plan, self.device, self.aim_factors)
            write_shard_file(path, header, order, merger, after_header=after_header)
        return sum(spec.nbytes for spec in order)


@contextmanager
def _cpu_workers(device: torch.device) -> Iterator[int]:
    """On CPU, merge one tensor per core with one torch thread each: the chunked loops are many small operations,
    and per-operation thread fan-out costs more than it gains (it collapses when another process is busy)."""
    if device.type != "cpu":
        yield 1
        return
    workers = merge_workers(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(threads)


def merge_workers(device: torch.device) -> int:
    """How many tensors a merge on ``device`` computes at once: one per core on CPU (see :func:`_cpu_workers`).

    Args:
        device: where the merge runs.

    Returns:
        The worker count.

    Example: ``merge_workers(torch.device("cpu"))``
    """
    return 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
