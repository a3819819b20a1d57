"""The merge driver: opens the inputs, checks they fit together, and streams merged tensors to the writer.

Memory is one tensor per input model (plus the method's work) at a time; the output appears atomically::

    from surgery.merge import Recipe, ModelEntry, merge
    recipe = Recipe("ties", [ModelEntry("org/short"), ModelEntry("org/long")], parameters={"density": 0.2})
    merge(recipe, "out")

Vocabulary rule: the output keeps the tokenizer source's vocabulary (the base's by default). Each model's
embedding and lm_head rows are cut or padded to that many rows, padding with the tokenizer source's rows, so a token
a model does not know contributes no task vector.
"""

from __future__ import annotations

import os
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from surgery.arch import Architecture
from surgery.convert import output_config
from surgery.errors import BadInput
from surgery.io import open_checkpoint, plan_shards, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, parse_dtype
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available
from surgery.merge.params import layer_position, resolve_value
from surgery.merge.sparsify import chunk_slices
from surgery.merge.recipe import Recipe, recipe_json
from surgery.merge.registry import MergeMethod, TensorMerge, get_method
from surgery.provenance import hash_inputs_in_background, manifest_bytes, model_card_bytes

DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "t": 0.5,
            "scale": None, "normalize": None, "rescale": True}
PER_MODEL = {"weight", "density", "gamma", "epsilon"}
VOCAB_ROLES = {"embedding", "lm_head"}
DARE_RESCALES = {"l1", "inverse", "none"}


@dataclass
class MergeInputs:
    """The opened checkpoints of a recipe: the base (None for base-free methods) and the other models."""

    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]
    entries: list  # the recipe's ModelEntry for each of `models`
    tokenizer_source: Checkpoint

    @property
    def reference(self) -> Checkpoint:
        return self.base or self.models[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models


def _check_parameters(recipe: Recipe, method: MergeMethod) -> None:
    given = {("global", key) for key in recipe.parameters}
    given |= {(entry.model, key) for entry in recipe.models for key in entry.parameters}
    for where, key in sorted(given):
        if key not in method.parameters:
            accepted = ", ".join(sorted(method.parameters)) or "none"
            raise BadInput(f"parameter {key!r} ({where}) does not apply to method {method.name!r} "
                           f"(it takes: {accepted})")
    if recipe.dare_rescale not in DARE_RESCALES:
        raise BadInput(f"--dare-rescale {recipe.dare_rescale!r}: expected l1, inverse or none")


def open_inputs(recipe: Recipe, stack: ExitStack) -> MergeInputs:
    """Open every checkpoint of ``recipe`` (closed with ``stack``) and check method, counts and parameters."""
    method = get_method(recipe.method)
    _check_parameters(recipe, method)
    entries = list(recipe.models)
    base_source = recipe.base
    if method.uses_base and base_source is None:
        base_source, entries = entries[0].model, entries[1:]
    if not method.uses_base and base_source is not None:
        raise BadInput(f"--base: method {method.name!r} does not use a base model")
    method.check_model_count(len(entries))
    base = stack.enter_context(open_checkpoint(base_source)) if base_source else None
    models = [stack.enter_context(open_checkpoint(entry.model)) for entry in entries]
    source_name = recipe.tokenizer_source
    if source_name == "base":
        tokenizer_source = base or models[0]
    else:
        matches = [c for c in ([base] if base else []) + models if c.source == source_name]
        if not matches:
            raise BadInput(f"tokenizer_source {source_name!r}: expected 'base' or one of the merged models")
        tokenizer_source = matches[0]
    return MergeInputs(method, base, models, entries, tokenizer_source)


def _identity(ckpt: Checkpoint) -> tuple:
    config = ckpt.config or {}
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _tensor_name_in(ckpt: Checkpoint, name: str, arch: Architecture) -> str | None:
    """The name holding ``name``'s data in ``ckpt``: itself, or the embedding for a tied lm_head."""
    if name in ckpt.tensors:
        return name
    if arch.role(name).kind == "lm_head" and Architecture.from_config(ckpt.config).tie_word_embeddings:
        embeddings = [n for n in ckpt.tensors if arch.role(n).kind == "embedding"]
        return embeddings[0] if len(embeddings) == 1 else None
    return None


def plan_tensors(inputs: MergeInputs, dtype: torch.dtype | None) -> list[TensorInfo]:
    """Output tensors (names, dtypes, shapes) after checking every input has each one in a compatible shape."""
    reference = inputs.reference
    arch = Architecture.from_config(reference.config)
    for ckpt in inputs.all:
        if _identity(ckpt) != _identity(reference):
            raise BadInput(f"architecture mismatch: {reference.source} is {_identity(reference)[0]} "
                           f"{list(_identity(reference)[1])}, {ckpt.source} is {_identity(ckpt)[0]} "
                           f"{list(_identity(ckpt)[1])}")
    specs = []
    for name, info in reference.tensors.items():
        shape = info.shape
        vocab = arch.role(name).kind in VOCAB_ROLES
        if vocab:
            source_name = _tensor_name_in(inputs.tokenizer_source, name, arch)
            if source_name is not None:
                shape = (inputs.tokenizer_source.tensors[source_name].shape[0], *shape[1:])
        for ckpt in inputs.all:
            held = _tensor_name_in(ckpt, name, arch)
            if held is None:
                raise BadInput(f"{ckpt.source}: tensor {name!r} is missing (present in {reference.source})")
            other = ckpt.tensors[held].shape
            if other != info.shape and not (vocab and other[1:] == info.shape[1:]):
                raise BadInput(f"tensor {name!r}: shape {info.shape} in {reference.source} but {other} in "
                               f"{ckpt.source}")
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        specs.append(TensorInfo(name, out_dtype, shape))
    return specs


def _seed_for(seed: int, name: str) -> int:
    """A per-tensor seed: the same for a tensor whatever order tensors are merged in."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


class TensorMerger:
    """Computes one merged output tensor at a time (the ``load`` callback handed to the writer)."""

    def __init__(self, recipe: Recipe, inputs: MergeInputs, specs: list[TensorInfo], device: str):
        self.recipe, self.inputs, self.device = recipe, inputs, torch.device(device)
        self.arch = Architecture.from_config(inputs.reference.config)
        self.shapes = {spec.name: spec.shape for spec in specs}
        self.dtypes = {spec.name: spec.dtype if spec.dtype.is_floating_point else torch.float32 for spec in specs}

    def _read(self, ckpt: Checkpoint, name: str, rows: int | None = None) -> torch.Tensor:
        """The tensor as stored (no float32 copy: methods convert chunk by chunk), cut or padded to ``rows``."""
        held = _tensor_name_in(ckpt, name, self.arch)
        tensor = ckpt.get(held).to(self.device)
        if rows is not None and tensor.shape[0] != rows:
            if tensor.shape[0] > rows:
                tensor = tensor[:rows]
            else:
                fill = self._read(self.inputs.tokenizer_source, name)
                tensor = torch.cat([tensor, fill[tensor.shape[0]:].to(tensor.dtype)])
        return tensor

    def _check_finite(self, name: str, result: torch.Tensor) -> None:
        """NaN/Inf in any input reaches the output, so one check of the output suffices; on failure, find the input."""
        flat = result.reshape(-1)
        if all(torch.isfinite(flat[part]).all() for part in chunk_slices(flat.numel())):
            return
        for ckpt in self.inputs.all:
            held = _tensor_name_in(ckpt, name, self.arch)
            if not torch.isfinite(ckpt.get(held)).all():
                raise BadInput(f"{ckpt.source}: tensor {held!r} contains NaN or Inf")
        raise BadInput(f"tensor {name!r}: the {self.inputs.method.name} merge produced NaN or Inf from finite inputs "
                       "(check the weights and parameters)")

    def _value(self, key: str, setting_sources: list[dict], name: str, t: float):
        for settings in setting_sources:
            if key in settings:
                value = resolve_value(settings[key], name, t)
                if value is not None:
                    return value
        return DEFAULTS[key]

    def __call__(self, name: str) -> torch.Tensor:
        role = self.arch.role(name)
        rows = self.shapes[name][0] if role.kind in VOCAB_ROLES else None
        base = self._read(self.inputs.base, name, rows) if self.inputs.base else None
        models = [self._read(ckpt, name, rows) for ckpt in self.inputs.models]
        t = layer_position(role.layer, self.arch.num_layers)
        globals_ = self.recipe.parameters
        per_model = {key: [self._value(key, [entry.parameters, globals_], name, t) for entry in self.inputs.entries]
                     for key in PER_MODEL}
        rescale = self._value("rescale", [globals_], name, t)
        generator = None
        if self.inputs.method.random:
            generator = torch.Generator(device=self.device).manual_seed(_seed_for(self.recipe.seed, name))
        merge_input = TensorMerge(
            name=name, base=base, models=models, weight=per_model["weight"], density=per_model["density"],
            gamma=per_model["gamma"], epsilon=per_model["epsilon"],
            lambda_=self._value("lambda", [globals_], name, t), t=self._value("t", [globals_], name, t),
            scale=self._value("scale", [globals_], name, t), normalize=self._value("normalize", [globals_], name, t),
            rescale=None if not rescale or self.recipe.dare_rescale == "none" else self.recipe.dare_rescale,
            generator=generator, out_dtype=self.dtypes[name],
        )
        result = self.inputs.method.function(merge_input)
        self._check_finite(name, result)
        return result


@dataclass
class MergeResult:
    write: WriteResult
    recipe: Recipe


def _output_config(inputs: MergeInputs, specs: list[TensorInfo], dtype: torch.dtype | None) -> dict | None:
    """The reference model's config with the output dtype and the output vocabulary size."""
    config = output_config(inputs.reference.config, dtype)
    if not config:
        return None
    config = dict(config)
    arch = Architecture.from_config(config)
    embedding = [s for s in specs if arch.role(s.name).kind == "embedding"]
    if embedding and "vocab_size" in config:
        config["vocab_size"] = embedding[0].shape[0]
    return config


def _card_body(recipe: Recipe, inputs: MergeInputs) -> str:
    method = inputs.method
    lines = [f"Merged with [surgery](https://pypi.org/project/surgery/) using **{method.name}**: {method.summary}", ""]
    if inputs.base:
        lines.append(f"- base: `{inputs.base.source}`")
    lines += [f"- model: `{ckpt.source}`" for ckpt in inputs.models]
    lines += ["", "Recipe (reproduce with `surgery merge --recipe surgery.json -o OUT`):", "", "```json",
              recipe_json(recipe), "```"]
    return "\n".join(lines)


def plan_merge(recipe: Recipe, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """What :func:`merge` would do, without computing or writing anything."""
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack)
        specs = plan_tensors(inputs, dtype)
        shards = plan_shards(specs, max_shard_size)
        return {
            "method": inputs.method.name, "base": inputs.base.source if inputs.base else None,
            "models": [c.source for c in inputs.models], "parameters": recipe.parameters,
            "per_model_parameters": {e.model: e.parameters for e in inputs.entries if e.parameters},
            "tensors": len(specs), "total_bytes": sum(s.nbytes for s in specs), "shards": len(shards),
            "dtype": recipe.dtype or "as the inputs", "seed": recipe.seed,
        }


def merge(recipe: Recipe, output: str | Path, *, device: str = "cpu",
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
          progress: Callable[[int], None] = lambda nbytes: None) -> MergeResult:
    """Merge per ``recipe`` into ``output`` (atomically), with a model card and a ``surgery.json`` manifest."""
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")
    check_output_available(output, force)
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack)
        specs = plan_tensors(inputs, dtype)
        hashes = hash_inputs_in_background(inputs.all)
        merger = TensorMerger(recipe, inputs, specs, device)

        def files() -> dict[str, bytes]:
            aux = inputs.tokenizer_source.auxiliary_files()
            aux["surgery.json"] = manifest_bytes("merge", recipe.to_dict(), hashes.result())
            aux["README.md"] = model_card_bytes(
                title=f"A {inputs.method.name} merge", relation="merge",
                method=inputs.method.name, checkpoints=inputs.all, body=_card_body(recipe, inputs))
            return aux

        with _cpu_workers(merger.device) as workers:
            result = write_checkpoint(output, specs, merger, config=_output_config(inputs, specs, dtype),
                                      files=files, max_shard_size=max_shard_size, force=force, progress=progress,
                                      workers=workers)
    return MergeResult(result, recipe)


@contextmanager
def _cpu_workers(device: torch.device) -> Iterator[int]:
    """On CPU, merge one tensor per core with one torch thread each: the chunked loops are many small operations,
    and per-operation thread fan-out costs more than it gains (it collapses when another process is busy)."""
    if device.type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, min(threads, os.cpu_count() or 1))
    finally:
        torch.set_num_threads(threads)
