"""``surgery extract-lora``: a fine-tune's change to its base as a PEFT LoRA adapter, one module at a time.

For every ``nn.Linear`` weight of the decoder layers the task matrix Δ = W_finetuned − W_base is factored by a
seeded randomised SVD (an exact one for small matrices) into ``lora_B @ lora_A`` (√σ on both sides), with a fixed
rank or, with ``energy``, the smallest rank keeping that fraction of ‖Δ‖²_F (capped at ``max_rank``). Ranks and
alphas go into PEFT's ``rank_pattern`` / ``alpha_pattern``, so the scale α/r is 1 for every module::

    from surgery.adapters.lora import ExtractLoraConfig, extract_lora
    result = extract_lora(ExtractLoraConfig("org/tuned", base="org/base", output="tuned-lora", energy=0.9))
    result.ranks["model.layers.0.self_attn.q_proj"], result.max_relative_error

Tensors the fine-tune changed that a LoRA cannot carry (norms, biases, embeddings, routers) are listed in the
result and the card, never silently dropped from the account.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.arch import NOT_DECOMPOSED_KINDS, Architecture
from surgery.cards import model_name
from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.loader_check import check_peft
from surgery.io.writer import check_output_available

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
EXACT_BELOW = 1024  # matrices with a side this short or shorter get an exact SVD
OVERSAMPLE = 8
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class ExtractLoraConfig:
    """What ``surgery extract-lora FINETUNED --base BASE -o OUTPUT`` does.

    ``rank`` fixes every module's rank; ``energy`` (0 to 1] instead keeps per module the smallest rank whose
    singular values hold that fraction of the task matrix's squared Frobenius norm, at most ``max_rank``. ``seed``
    seeds the randomised SVD (same inputs and seed → identical bytes). ``embeddings`` adds the input embedding's
    change as an embedding LoRA; ``save_modules`` names modules (a module path or its last parts: ``lm_head``,
    ``norm``, ``input_layernorm``) whose fine-tuned tensors are saved whole, as PEFT's modules_to_save.

    Example: ``ExtractLoraConfig("tuned", base="base", output="lora", rank=16)``
    """

    finetuned: str
    base: str
    output: str | Path
    rank: int | None = None
    energy: float | None = None
    max_rank: int = 256
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    embeddings: bool = False  # the input embedding's change as PEFT's lora_embedding_A/B (same rank rule)
    save_modules: tuple[str, ...] = ()  # modules saved whole (PEFT's modules_to_save): norms, lm_head...

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_modules", tuple(self.save_modules))
        for module in self.save_modules:
            if not isinstance(module, str) or not module or module.startswith(".") or module.endswith("."):
                raise BadInput(f"--save-module {module!r}: a module name (lm_head, norm, input_layernorm...)")
        if (self.rank is None) == (self.energy is None):
            raise BadInput("extract-lora: give --rank R or --energy E (one of them)")
        check_rank_rule(self.rank, self.energy, self.max_rank, self.device)


def check_rank_rule(rank: int | None, energy: float | None, max_rank: int, device: str) -> None:
    """BadInput (the CLI's wording) unless the rank rule and device are usable.

    Args:
        rank: a fixed rank, or None.
        energy: the share of the squared norm to keep, or None.
        max_rank: the cap of ``energy``'s ranks.
        device: where the SVDs run.

    Example: ``check_rank_rule(16, None, 256, "cpu")``
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise BadInput(f"--rank {rank!r}: must be a whole number of at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise BadInput(f"--energy {energy!r}: must be in (0, 1]")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise BadInput(f"--max-rank {max_rank!r}: must be a whole number of at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")


@dataclass
class ExtractLoraResult:
    """What was written: the adapter directory, each module's rank, the share of ‖Δ‖² kept and the relative error
    ‖Δ − BA‖_F / ‖Δ‖_F (worst module), and the changed tensors a LoRA cannot carry (name → relative change)."""

    output: str
    ranks: dict[str, int]
    kept_energy: float  # over all modules: Σ kept σ² / Σ ‖Δ‖²
    max_relative_error: float
    not_carried: dict[str, float] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)  # target modules the fine-tune left as they were
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """What ``--json`` prints."""
        return {"output": self.output, "modules": len(self.ranks), "ranks": self.ranks,
                "kept_energy": self.kept_energy, "max_relative_error": self.max_relative_error,
                "not_carried": self.not_carried, "unchanged": self.unchanged, "files": self.files,
                "seconds": round(self.seconds, 3)}


def singular_triplets(delta: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The top ``count`` singular triplets (U, S, Vᵀ) of ``delta``: exact for a matrix with a side of at most
    :data:`EXACT_BELOW`, else a randomised range finder (Halko et al.: Gaussian sketch with :data:`OVERSAMPLE`
    extra columns, :data:`POWER_ITERATIONS` QR-stabilised power iterations) drawn from ``generator``.

    Args:
        delta: a float32 matrix.
        count: how many triplets (at most its shorter side).
        generator: the seeded generator of the sketch.

    Returns:
        (U of shape (m, count), S of shape (count,), Vᵀ of shape (count, n)).

    Example: ``u, s, vt = singular_triplets(delta, 16, torch.Generator().manual_seed(0))``
    """
    rows, columns = delta.shape
    count = min(count, rows, columns)
    if min(rows, columns) <= EXACT_BELOW or count + OVERSAMPLE >= min(rows, columns):
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :count], s[:count], vt[:count]
    sketch = torch.randn(columns, count + OVERSAMPLE, generator=generator).to(delta.device)
    basis = torch.linalg.qr(delta @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(delta @ torch.linalg.qr(delta.T @ basis).Q).Q
    u, s, vt = torch.linalg.svd(basis.T @ delta, full_matrices=False)
    return (basis @ u)[:, :count], s[:count], vt[:count]


def chosen_rank(singular_values: torch.Tensor, total_energy: float, energy: float, cap: int) -> int:
    """The smallest rank whose squared singular values reach ``energy`` of ``total_energy``, at most ``cap``.

    Args:
        singular_values: the largest singular values, descending.
        total_energy: the matrix's squared Frobenius norm (all its singular values squared).
        energy: the fraction to keep, (0, 1].
        cap: the largest rank allowed.

    Returns:
        The rank (all of ``singular_values`` when even they fall short).

    Example: ``chosen_rank(torch.tensor([3., 2., 1.]), 14.0, 0.9, 8)``   # 2 (13/14 ≥ 0.9)
    """
    reached = torch.cumsum(singular_values.double() ** 2, 0) >= energy * total_energy * (1 - 1e-12)
    hits = torch.nonzero(reached)
    return min(cap, int(hits[0]) + 1 if len(hits) else len(singular_values))


@dataclass(frozen=True)
class Factors:
    """A task matrix Δ as ``lora_B @ lora_A`` of ``rank`` (√σ on both sides), with ‖Δ − BA‖_F / ‖Δ‖_F and the
    σ² kept."""

    lora_b: torch.Tensor
    lora_a: torch.Tensor
    rank: int
    relative_error: float
    kept_squares: float

    def tensors(self, module: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The factors under PEFT's names for ``module``, on the CPU in ``dtype``."""
        return {f"base_model.model.{module}.lora_A.weight": self.lora_a.to("cpu", dtype).contiguous(),
                f"base_model.model.{module}.lora_B.weight": self.lora_b.to("cpu", dtype).contiguous()}


def factored(delta: torch.Tensor, norm: float, generator: torch.Generator, *, rank: int | None, energy: float | None,
             cap: int) -> Factors:
    """``delta`` factored at a fixed ``rank``, or at the smallest rank keeping ``energy`` of its squared norm (at
    most ``cap``).

    Args:
        delta: a nonzero float32 task matrix.
        norm: its Frobenius norm.
        generator: seeds the randomised SVD.
        rank: the rank (or None, with ``energy``).
        energy: the fraction of ‖Δ‖² to keep (or None, with ``rank``).
        cap: the largest rank ``energy`` may choose.

    Returns:
        The :class:`Factors`.

    Example: ``factored(delta, float(delta.norm()), torch.Generator().manual_seed(0), rank=8, energy=None, cap=256)``
    """
    u, s, vt = singular_triplets(delta, rank or cap, generator)
    chosen = min(rank or chosen_rank(s, norm ** 2, energy, cap), len(s))
    root = s[:chosen].sqrt()
    lora_b, lora_a = u[:, :chosen] * root, root[:, None] * vt[:chosen]
    return Factors(lora_b, lora_a, chosen, float((delta - lora_b @ lora_a).norm()) / norm,
                   float((s[:chosen].double() ** 2).sum()))


def peft_lora_config(base: str, ranks: dict[str, int]) -> dict:
    """PEFT's ``adapter_config.json`` for LoRA factors of these ranks, each module's α its rank (scale 1).

    Args:
        base: the base model's source (recorded as base_model_name_or_path).
        ranks: module name → its LoRA's rank.

    Returns:
        The config as a dict (``json_bytes`` writes it).

    Example: ``peft_lora_config("org/base", {"model.layers.0.self_attn.q_proj": 8})["rank_pattern"]``
    """
    from surgery.adapters.output import base_model_reference

    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_reference(base),
            "r": max(ranks.values()), "lora_alpha": max(ranks.values()), "target_modules": sorted(ranks),
            "rank_pattern": ranks, "alpha_pattern": ranks, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
            "inference_mode": True}


def _saved_module(name: str, save_modules: tuple[str, ...]) -> str | None:
    """The ``save_modules`` entry whose module holds tensor ``name`` (its path is the entry or ends with it)."""
    module = name.rsplit(".", 1)[0]
    return next((entry for entry in save_modules if module == entry or module.endswith("." + entry)), None)


def _targets(arch: Architecture, name: str, shape) -> bool:
    """An nn.Linear weight of a decoder layer of the language model (what PEFT's LoRA wraps)."""
    role = arch.role(name)
    return (name.endswith(".weight") and len(shape) == 2 and role.linear and role.layer is not None
            and role.part == "text" and role.experts is None and role.kind not in NOT_DECOMPOSED_KINDS)


def extract_lora(config: ExtractLoraConfig) -> ExtractLoraResult:
    """Write ``config.finetuned`` − ``config.base`` as a PEFT LoRA adapter (atomically, checked by PEFT).

    Args:
        config: the models, the rank rule and the output.

    Returns:
        The :class:`ExtractLoraResult`.

    Example: ``extract_lora(ExtractLoraConfig("tuned", base="base", output="lora", energy=0.95)).ranks``
    """
    from surgery.adapters.output import json_bytes, write_adapter

    started = time.perf_counter()
    check_output_available(config.output, config.force)
    generator = torch.Generator().manual_seed(config.seed)
    with open_checkpoint(config.base) as base, open_checkpoint(config.finetuned) as tuned:
        arch = Architecture.from_config(base.config)
        tensors, ranks, not_carried, unchanged, saved = {}, {}, {}, [], set()
        kept = total = 0.0
        worst = 0.0
        for name in sorted(tuned.tensors):
            spec = tuned.tensors[name]
            if name not in base.tensors:
                not_carried[name] = 1.0
                continue
            if tuple(base.tensors[name].shape) != tuple(spec.shape):
                raise BadInput(f"{config.finetuned}: tensor {name!r} is {list(spec.shape)}, the base's "
                               f"{list(base.tensors[name].shape)}")
            delta = (tuned.get(name).to(config.device, torch.float32)
                     - base.get(name).to(config.device, torch.float32))
            norm = float(delta.norm())
            saved_as = _saved_module(name, config.save_modules)
            if saved_as is not None:
                if _targets(arch, name, spec.shape):
                    raise BadInput(f"--save-module {saved_as}: {name!r} is a Linear layer the LoRA covers")
                tensors[f"base_model.model.{name}"] = tuned.get(name).contiguous()
                saved.add(saved_as)
                continue
            if config.embeddings and arch.role(name).kind == "embedding" and norm > 0:
                if arch.tie_word_embeddings:
                    raise BadInput(f"--embeddings: {config.base} ties lm_head to the embedding, which a LoRA of "
                                   "the embedding changes only once merged; use --save-module with its module")
                module = name.removesuffix(".weight")
                factors = factored(delta.T, norm, generator, rank=config.rank, energy=config.energy,
                                   cap=config.max_rank)  # PEFT's embedding delta is (B @ A)ᵀ
                worst, kept, total = max(worst, factors.relative_error), kept + factors.kept_squares, total + norm ** 2
                ranks[module] = factors.rank
                tensors[f"base_model.model.{module}.lora_embedding_A"] = factors.lora_a.to("cpu").contiguous()
                tensors[f"base_model.model.{module}.lora_embedding_B"] = factors.lora_b.to("cpu").contiguous()
                continue
            if not _targets(arch, name, spec.shape):
                if norm > 0:
                    not_carried[name] = norm / max(float(base.get(name).float().norm()), 1e-12)
                continue
            module = name.removesuffix(".weight")
            if norm == 0:
                unchanged.append(module)
                continue
            factors = factored(delta, norm, generator, rank=config.rank, energy=config.energy, cap=config.max_rank)
            worst = max(worst, factors.relative_error)
            kept += factors.kept_squares
            total += norm ** 2
            ranks[module] = factors.rank
            dtype = spec.dtype if spec.dtype.is_floating_point and spec.dtype.itemsize <= 4 else torch.float32
            tensors |= factors.tensors(module, dtype)
        if not ranks:
            raise BadInput(f"{config.finetuned}: no Linear weight of its decoder layers differs from "
                           f"{config.base}'s: nothing to extract")
        missing = sorted(set(config.save_modules) - saved)
        if missing:
            raise BadInput(f"--save-module {missing[0]}: {config.finetuned} has no tensor of a module so named")
        peft_config = peft_lora_config(config.base, ranks)
        peft_config["modules_to_save"] = sorted(saved) or None
        kept_energy = kept / total
        recipe = {"method": "extract-lora", "finetuned": config.finetuned, "base": config.base, "rank": config.rank,
                  "energy": config.energy, "max_rank": config.max_rank, "seed": config.seed,
                  "embeddings": config.embeddings, "save_modules": sorted(config.save_modules)}
        measurements = {"modules": len(ranks), "kept_energy": round(kept_energy, 6),
                        "max_relative_error": round(worst, 6), "ranks": ranks,
                        "not_carried": {k: round(v, 6) for k, v in not_carried.items()}}
        body = _card_body(config, ranks, kept_energy, worst, not_carried)
        files = write_adapter(
            config.output, base, tensors_file=WEIGHTS_FILE, tensors=tensors,
            files={CONFIG_FILE: json_bytes(peft_config)}, recipe=recipe, measurements=measurements,
            method="lora", library="peft", title=f"{model_name(config.finetuned)}: LoRA extracted against "
                                                  f"{model_name(config.base)}",
            body=body, force=config.force, check=lambda staging: check_peft(staging, base.config))
    return ExtractLoraResult(str(config.output), ranks, kept_energy, worst, not_carried, unchanged, files,
                             time.perf_counter() - started)


def _card_body(config: ExtractLoraConfig, ranks: dict[str, int], kept_energy: float, worst: float,
               not_carried: dict[str, float]) -> str:
    rule = f"rank {config.rank}" if config.rank else f"the smallest rank keeping {config.energy:g} of each " \
                                                     f"module's squared norm (at most {config.max_rank})"
    lines = [f"A PEFT LoRA adapter holding what `{config.finetuned}` changed in `{config.base}`'s Linear "
             f"layers, extracted by [surgery](https://pypi.org/project/surgery/) with {rule}: {len(ranks)} modules, "
             f"ranks {min(ranks.values())}-{max(ranks.values())}, {kept_energy:.4f} of the change's squared norm "
             f"kept, worst module's relative error {worst:.4f}.",
             "", "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, ADAPTER_DIR)"
             "\n```"]
    if config.embeddings:
        lines += ["", "The input embedding's change is an embedding LoRA (PEFT's lora_embedding_A/B)."]
    if config.save_modules:
        lines += ["", "Saved whole, as PEFT's modules_to_save: " + ", ".join(f"`{m}`" for m in config.save_modules)
                  + "."]
    if not_carried:
        shown = ", ".join(f"`{name}` ({change:.2g})" for name, change in sorted(not_carried.items())[:20])
        more = f" and {len(not_carried) - 20} more" if len(not_carried) > 20 else ""
        lines += ["", f"Not in the adapter (a LoRA cannot hold them; relative change in brackets): {shown}{more}. "
                      "Base + adapter keeps the base's values there."]
    return "\n".join(lines)
