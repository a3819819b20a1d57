"""``surgery merge-lora``: LoRA adapters of one base merged in adapter space, into one PEFT LoRA of bounded rank.

Each adapter's change to a module is its task matrix Δi = scale_i · B_i A_i (zero where it has no factors for the
module). The merge method sees the Δi as task vectors over a zero base, exactly as ``surgery merge`` sees
model − base — task arithmetic, TIES, DARE, DELLA, breadcrumbs and TSV depend on their inputs only through the task
vectors, so the result is the change the same merge of the applied models would make — and the merged change is
factored again by a seeded randomised SVD: by default at the sum of the inputs' ranks for the module (exact for task
arithmetic: a sum of rank-r_i terms has rank ≤ Σ r_i), or at ``rank`` / the smallest rank keeping ``energy`` of the
merged change's squared norm. Embedding LoRAs merge the same way (their Δ is (B A)ᵀ); tensors an adapter saves
whole (modules_to_save: lm_head, norms) merge as full weights against the base's, and stay whole. Nothing but one
module's Δi is in memory at a time, and no merged model is written::

    from surgery.adapters.lora_merge import MergeLoraConfig, merge_lora
    from surgery.merge.job import build_recipe
    recipe = build_recipe(["code-lora", "math-lora"], method="ties", base="org/base", density=0.5)
    result = merge_lora(MergeLoraConfig(recipe, output="merged-lora"))
    result.ranks, result.max_relative_error
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from surgery.adapters.lora import CONFIG_FILE, WEIGHTS_FILE, check_rank_rule, factored, peft_lora_config
from surgery.arch import Architecture
from surgery.cards import model_name
from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.lora_input import LoraApplied
from surgery.io.writer import check_output_available
from surgery.merge.engine import resolved_parameters
from surgery.merge.job import build_recipe, check_parameters, options_with_parameters
from surgery.merge.recipe import Recipe
from surgery.merge.registry import TensorMerge, get_method
from surgery.runtime.sampling import tensor_seed

ADAPTER_SPACE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                         "della", "della_linear", "tsv")


@dataclass(frozen=True)
class MergeLoraConfig:
    """What ``surgery merge-lora ADAPTER... --base BASE -o OUTPUT`` does.

    ``recipe``: the method, its parameters and the adapters as its models (``recipe.base`` the model they adapt);
    ``rank`` fixes every module's output rank, ``energy`` keeps per module the smallest rank holding that fraction of
    the merged change's squared norm (at most ``max_rank``); neither: the sum of the inputs' ranks.

    Example: ``MergeLoraConfig(build_recipe(["a", "b"], method="ties", base="base"), output="merged", rank=16)``
    """

    recipe: Recipe
    output: str | Path
    rank: int | None = None
    energy: float | None = None
    max_rank: int = 256
    device: str = "cpu"
    force: bool = False

    def __post_init__(self) -> None:
        if self.recipe.method not in ADAPTER_SPACE_METHODS:
            raise BadInput(f"--method {self.recipe.method}: adapter-space merging takes "
                           f"{', '.join(ADAPTER_SPACE_METHODS)} (methods that see only the task vectors)")
        if not self.recipe.base:
            raise BadInput("merge-lora: --base names the model the adapters were trained on")
        if len(self.recipe.models) < 1 or self.recipe.slices:
            raise BadInput("merge-lora: give one or more adapters (no slices)")
        if self.rank is not None and self.energy is not None:
            raise BadInput("merge-lora: give --rank R or --energy E, not both")
        check_rank_rule(self.rank, self.energy, self.max_rank, self.device)
        check_parameters(self.recipe)

    @classmethod
    def from_options(cls, adapters: Sequence[str] = (), *, base: str, output: str | Path,
                     method: str = "task_arithmetic", weights: str | Sequence[float] | None = None,
                     seed: int | None = None, rank: int | None = None, energy: float | None = None,
                     max_rank: int = 256, device: str = "cpu", force: bool = False,
                     **parameters: Any) -> "MergeLoraConfig":
        """What ``surgery merge-lora ADAPTER... --base BASE -o OUTPUT [options]`` runs (a pipeline's merge-lora step:
        its keys).

        Args:
            adapters: the PEFT LoRA adapter directories.
            base, output, rank, energy, max_rank, device, force: the fields.
            method, weights, seed: the recipe's, as for ``surgery merge``.
            **parameters: merge parameter values by name or alias (``density=0.5``).

        Returns:
            The checked :class:`MergeLoraConfig`.

        Example: ``MergeLoraConfig.from_options(["a", "b"], base="base", output="out", method="ties", density=0.5)``
        """
        recipe = build_recipe(adapters, method=method, base=base, weights=weights, parameters=parameters, seed=seed)
        return cls(recipe, output, rank=rank, energy=energy, max_rank=max_rank, device=device, force=force)


def option_types() -> dict[str, Any]:
    """Every option :meth:`MergeLoraConfig.from_options` takes → its type (a pipeline step's keys are these).

    Returns:
        e.g. ``{"adapters": Sequence[str], "base": str, ..., "density": float, "alpha": float, ...}``.

    Example: ``option_types()["rank"]``
    """
    return options_with_parameters(MergeLoraConfig.from_options)


@dataclass
class MergeLoraResult:
    """What was written: the adapter directory, each module's rank and the relative error of its factoring,
    ‖Δ − BA‖_F / ‖Δ‖_F (the worst module's), and the merged modules whose change came out zero (not written)."""

    output: str
    ranks: dict[str, int]
    max_relative_error: float
    zero: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """What ``--json`` prints."""
        return {"output": self.output, "modules": len(self.ranks), "ranks": self.ranks,
                "max_relative_error": self.max_relative_error, "zero": self.zero, "files": self.files}


def _opened_adapters(base, recipe: Recipe) -> list[LoraApplied]:
    adapters = []
    for entry in recipe.models:
        applied = LoraApplied(base, Path(entry.model), f"{recipe.base}+{entry.model}")
        conv1d = [name for name, (_, _, _, flipped) in applied.deltas.items()
                  if flipped and name not in applied.embeddings]
        if conv1d:
            raise BadInput(f"{entry.model}: LoRA of {conv1d[0]!r} is a Conv1D (fan_in_fan_out) factor pair; "
                           "adapter-space merging takes Linear and embedding modules")
        adapters.append(applied)
    return adapters


def merge_lora(config: MergeLoraConfig) -> MergeLoraResult:
    """Merge the recipe's adapters in adapter space and write the result as one PEFT LoRA (atomically, checked by
    PEFT). See the module's docstring.

    Args:
        config: the recipe, the rank rule and the output.

    Returns:
        The :class:`MergeLoraResult`.

    Example: ``merge_lora(MergeLoraConfig(build_recipe(["a", "b"], method="task_arithmetic", base="base"), "out"))``
    """
    from surgery.adapters.output import json_bytes, write_adapter
    from surgery.io.loader_check import check_peft

    recipe = config.recipe
    method = get_method(recipe.method)
    check_output_available(config.output, config.force)
    with open_checkpoint(recipe.base) as base:
        adapters = _opened_adapters(base, recipe)
        names = sorted({name for adapter in adapters for name in adapter.deltas})
        arch = Architecture.from_config(base.config)
        layers = arch.num_layers or 1

        def merged_tensor(name: str, base_tensor: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
            layer = arch.role(name).layer or 0  # gradients run over the layers, as in surgery merge
            generator = torch.Generator(device=config.device).manual_seed(tensor_seed(recipe.seed, name))
            result = method.function(TensorMerge(
                name=name, base=base_tensor, models=models, is_matrix=base_tensor.ndim == 2,
                parameters=resolved_parameters(method, recipe, recipe.models, {}, name,
                                               layer / (layers - 1) if layers > 1 else 1.0),
                generator=generator))
            if not torch.isfinite(result).all():
                raise BadInput(f"tensor {name!r}: the {method.name} merge of the adapters gives NaN or Inf")
            return result

        tensors, ranks, zero, worst = {}, {}, [], 0.0
        for name in names:
            shape = tuple(base.tensors[name].shape)
            merged = merged_tensor(name, torch.zeros(shape, device=config.device),
                                   [adapter.delta(name).to(config.device) if name in adapter.deltas
                                    else torch.zeros(shape, device=config.device) for adapter in adapters])
            module = name.removesuffix(".weight")
            norm = float(merged.norm())
            if norm == 0:
                zero.append(module)
                continue
            embedding = any(name in adapter.embeddings for adapter in adapters)
            summed = sum(adapter.ranks[name] for adapter in adapters if name in adapter.deltas)
            factors = factored(merged.T if embedding else merged, norm,  # PEFT's embedding delta is (B @ A)ᵀ
                               torch.Generator().manual_seed(tensor_seed(recipe.seed, module)),
                               rank=config.rank or (None if config.energy else summed), energy=config.energy,
                               cap=config.max_rank)
            ranks[module], worst = factors.rank, max(worst, factors.relative_error)
            if embedding:
                tensors[f"base_model.model.{module}.lora_embedding_A"] = factors.lora_a.to("cpu").contiguous()
                tensors[f"base_model.model.{module}.lora_embedding_B"] = factors.lora_b.to("cpu").contiguous()
            else:
                tensors |= factors.tensors(module, torch.float32)
        for name in sorted({name for adapter in adapters for name in adapter.replaced}):  # modules_to_save
            own = base.get(name)
            if name in names:  # PEFT's saved copy of a LoRA target's own weights (save_embedding_layers)
                changed = next((adapter for adapter in adapters if name in adapter.replaced
                                and not torch.equal(adapter.saved(name), own)), None)
                if changed is not None:
                    raise BadInput(f"{changed.adapter_dir}: saves changed base weights under the LoRA of {name!r} "
                                   "(a resized vocabulary?), which adapter-space merging does not merge")
                continue
            merged = merged_tensor(name, own.to(config.device), [
                (adapter.saved(name) if name in adapter.replaced else own).to(config.device) for adapter in adapters])
            tensors[f"base_model.model.{name}"] = merged.to("cpu", own.dtype).contiguous()
        saved = sorted({module for adapter in adapters
                        for module in adapter.adapter_config.get("modules_to_save") or []})
        if not ranks:
            raise BadInput(f"the {method.name} merge of the adapters changes no module: nothing to write")
        measurements = {"modules": len(ranks), "ranks": ranks, "max_relative_error": round(worst, 6), "zero": zero}
        files = write_adapter(
            config.output, base, tensors_file=WEIGHTS_FILE, tensors=tensors,
            files={CONFIG_FILE: json_bytes(peft_lora_config(recipe.base, ranks)
                                           | {"modules_to_save": saved or None})},
            recipe={"command": "merge-lora", **recipe.to_dict(), "rank": config.rank, "energy": config.energy,
                    "max_rank": config.max_rank},
            measurements=measurements, method="lora", library="peft",
            title=f"A {method.name} merge of {len(adapters)} LoRA adapter(s) of {model_name(recipe.base)}",
            body=_card_body(config, ranks, worst), force=config.force,
            check=lambda staging: check_peft(staging, base.config))
    return MergeLoraResult(str(config.output), ranks, worst, zero, files)


def _card_body(config: MergeLoraConfig, ranks: dict[str, int], worst: float) -> str:
    recipe = config.recipe
    rule = (f"rank {config.rank}" if config.rank else
            f"the smallest rank keeping {config.energy:g} of each merged change's squared norm" if config.energy else
            "the sum of the inputs' ranks")
    lines = [f"A PEFT LoRA adapter of `{model_name(recipe.base)}`: the **{recipe.method}** merge of "
             f"{len(recipe.models)} LoRA adapter(s), computed in adapter space by "
             f"[surgery](https://pypi.org/project/surgery/) and factored at {rule}: {len(ranks)} modules, ranks "
             f"{min(ranks.values())}-{max(ranks.values())}, worst module's relative error {worst:.4f}.", ""]
    lines += [f"- adapter: `{model_name(entry.model)}`" for entry in recipe.models]
    lines += ["", "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, ADAPTER_DIR)"
              "\n```"]
    return "\n".join(lines)
