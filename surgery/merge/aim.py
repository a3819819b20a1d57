"""Activation statistics for AIM, activation-informed merging (arXiv 2502.02421).

AIM protects the input channels a base model relies on most: for every module with a weight except embeddings
(linear layers, norms, lm_head) it needs a_j = Σ_blocks mean_tokens |x_j| over the module's input x, measured on the
BASE model over calibration text cut into blocks of up to 512 tokens. A merge then pulls each weight back towards
the base in proportion to its input channel's activity::

    from surgery.merge.aim import CalibrateConfig, aim_factors, apply_aim, calibrate, load_stats

    calibrate(CalibrateConfig("base-model", "base.aim.safetensors", calibration="notes.txt"))   # or no text
    stats = load_stats("base.aim.safetensors")
    factors = aim_factors(stats["model.layers.0.mlp.down_proj.weight"], omega=0.4)   # r_j ∈ [ω, 1]
    weight = apply_aim(base_weight, merged_weight, factors)                          # W0 + (W − W0) ⊙ r

Statistics are computed one decoder layer at a time by the model runtime (:func:`surgery.runtime.streamed_model`,
whose docstring says how: transformers' own forward of the decoder, each piece loaded just before it runs and freed
right after) with an input hook on every weighted module (:func:`surgery.runtime.input_hooks`). Memory is therefore
the largest of one decoder layer and the embedding, plus the activations of one batch; all blocks of the same length
are run together (up to ``batch_tokens``), so each layer is read once per batch. The lm_head is never run: its input
is the decoder's output, recorded under ``lm_head.weight`` even when the checkpoint ties it to the embedding (and
stores no such tensor).

Computation is in float32 whatever the checkpoint's dtype. Any source :func:`surgery.io.open_checkpoint` accepts
works if it has a config and a tokenizer: a model directory, a Hub repo id, or a ``.gguf`` file (dequantized
tensors, and the tokenizer transformers rebuilds from the GGUF vocabulary). Functions that take a ``source`` also
take an already open :class:`~surgery.io.Checkpoint`, so :func:`calibrate` opens (and parses) it once.
Self-generated calibration text (:func:`surgery.runtime.self_generated_text`) is the exception to the one-layer
memory bound: generating loads the whole model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, natural_key
from surgery.io.writer import write_tensor_file
from surgery.runtime import (calibration_blocks, check_device, equal_length_batches, input_hooks, load_tokenizer,
                             opened, self_generated_text, streamed_model)
from surgery.runtime.text import BLOCK_SIZE

FORMAT = "surgery-aim-stats/1"
BATCH_TOKENS = 8192  # tokens run through a layer at once; bounds the activation memory


# ---------------------------------------------------------------------------------------------------------------
# Statistics


class _InputStats:
    """Σ_blocks mean_tokens |x| of the input of every hooked module, keyed by its weight's name; for the experts of
    a 3-D tensor the checkpoint stores (gpt-oss), one row per expert: (experts, inputs, 1)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.experts: dict[str, int] = {}  # 3-D tensor name → its experts

    def add(self, name: str, inputs: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        # Batch first, channels last; everything between (tokens, and heads for q/k norms) is averaged.
        magnitudes = inputs.detach().abs().float().reshape(inputs.shape[0], -1, inputs.shape[-1])
        per_block = magnitudes.mean(dim=1).sum(dim=0).double()
        if expert is not None:
            self.experts[name] = experts
            name = f"{name}#{expert}"
        if name in self.sums:
            self.sums[name] += per_block
        else:
            self.sums[name] = per_block

    def adder(self, name: str) -> Callable[[torch.Tensor], None]:
        return lambda inputs: self.add(name, inputs)

    def result(self) -> dict[str, torch.Tensor]:
        result = {name: total.float().cpu() for name, total in self.sums.items() if "#" not in name}
        for name, experts in self.experts.items():
            rows = [self.sums.get(f"{name}#{expert}") for expert in range(experts)]
            width = next(row for row in rows if row is not None).numel()
            result[name] = torch.stack([row.float().cpu() if row is not None else torch.zeros(width)
                                        for row in rows]).unsqueeze(-1)
        return result


def collect_activation_stats(source: str | Checkpoint, blocks: list[torch.Tensor], *, device: str = "cpu",
                             batch_tokens: int = BATCH_TOKENS) -> dict[str, torch.Tensor]:
    """AIM statistics of the base model ``source``, run one decoder layer at a time.

    Args:
        source: the base model, or its open checkpoint.
        blocks: 1-D token id blocks (:func:`surgery.runtime.calibration_blocks`).
        device: where the layers run.
        batch_tokens: tokens run through a layer at once.

    Returns:
        Weight name → float32 Σ_blocks mean_tokens |input|, one value per input channel, for every module with a
        weight except embeddings::

            stats = collect_activation_stats("base-model", blocks)
            stats["model.layers.0.self_attn.q_proj.weight"].shape      # (hidden_size,)
            stats["lm_head.weight"]                                    # the decoder's output, also when tied
    """
    from surgery.layout import ModelLayout

    blocks = [block for block in blocks if block.numel() > 0]
    if not blocks:
        raise BadInput("calibration: no tokens to compute activation statistics from")
    stats = _InputStats()
    with opened(source) as checkpoint, streamed_model(checkpoint, device) as model:
        layout = ModelLayout.build(checkpoint.config)
        renamed, fused = layout.sources(checkpoint.tensors) if layout is not None else ({}, {})
        decoder = model.get_decoder()
        names = {id(module): name for name, module in model.named_modules()}
        weighted = [names[id(module)] for module in decoder.modules()
                    if not isinstance(module, nn.Embedding) and module._parameters.get("weight") is not None]
        experts = [(names[id(module)], module) for module in decoder.modules()
                   if f"{names[id(module)]}.gate_up_proj" in fused]
        stored = [(names[id(module)], module) for module in decoder.modules()
                  if f"{names[id(module)]}.gate_up_proj" in checkpoint.tensors]  # gpt-oss: 3-D in the checkpoint
        output = model.get_output_embeddings()
        hooks = [module.register_forward_pre_hook(_expert_inputs(stats, fused, name), with_kwargs=True)
                 for name, module in experts]
        hooks += [module.register_forward_pre_hook(_stored_expert_inputs(stats, name), with_kwargs=True)
                  for name, module in stored]
        try:
            with input_hooks(model, {name: stats.adder(f"{name}.weight") for name in weighted}), torch.no_grad():
                for batch in equal_length_batches(blocks, batch_tokens):
                    hidden = decoder(input_ids=batch.to(device), use_cache=False).last_hidden_state
                    if output is not None:
                        stats.add(f"{names[id(output)]}.weight", hidden)
        finally:
            for hook in hooks:
                hook.remove()
    # keyed by the checkpoint's names, which the merge's tensors have (Mixtral's block_sparse_moe, llava's...)
    return {renamed.get(name, name): value for name, value in stats.result().items()}


def _expert_inputs(stats: "_InputStats", fused: dict, name: str):
    """A pre-hook on a fused MoE experts module adding each expert's statistics under its checkpoint tensors'
    names: its routed tokens' hidden states for its gate and up projections, act(gate) * up for its down projection
    (where the module's layout gives it: :func:`surgery.runtime.experts.expert_intermediate`)."""
    from surgery.runtime.experts import expert_intermediate, routed_inputs

    gate_up, down = fused[f"{name}.gate_up_proj"], fused.get(f"{name}.down_proj")

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for expert, routed in routed_inputs(module, args, kwargs):
            for pattern in gate_up:
                stats.add(pattern[expert], routed.unsqueeze(0))
            intermediate = expert_intermediate(module, expert, routed) if len(gate_up) == 2 else None
            if intermediate is not None and down is not None:
                stats.add(down[0][expert], intermediate.unsqueeze(0))

    return record


def _stored_expert_inputs(stats: "_InputStats", name: str):
    """A pre-hook on an experts module whose 3-D tensors the checkpoint stores as they are (gpt-oss: each expert's
    matrix is (inputs, outputs)): one row of statistics per expert, for ``gate_up_proj`` and ``down_proj``."""
    from surgery.runtime.experts import expert_intermediate, routed_inputs

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        experts = module.gate_up_proj.shape[0]
        for expert, routed in routed_inputs(module, args, kwargs):
            stats.add(f"{name}.gate_up_proj", routed.unsqueeze(0), expert, experts)
            intermediate = expert_intermediate(module, expert, routed)
            if intermediate is not None:
                stats.add(f"{name}.down_proj", intermediate.unsqueeze(0), expert, experts)

    return record


def compute_stats(source: str | Checkpoint, *, calibration: str | Path | None = None, max_tokens: int = 2048,
                  seed: int = 0, device: str = "cpu",
                  progress: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The AIM statistics of ``source`` and their metadata.

    Args:
        source: the base model, or its open checkpoint.
        calibration: a UTF-8 text file; None: text the model generates itself from ``seed``.
        max_tokens: calibration tokens used.
        seed: seed of the self-generated text.
        device: where the model runs.
        progress: called with a line before each stage.

    Returns:
        (weight name → statistics in natural order, the metadata :func:`calibrate` stores)::

            stats, metadata = compute_stats("base-model", calibration="notes.txt")
            metadata["tokens"]       # "2048"
    """
    report = progress or (lambda line: None)
    text = _read_text(Path(calibration)) if calibration is not None else None
    with opened(source) as checkpoint:
        if text is None:
            report(f"calibration: generating {max_tokens} tokens of text with {checkpoint.source}")
            text = self_generated_text(checkpoint, max_tokens=max_tokens, seed=seed, device=device)
        blocks = calibration_blocks(load_tokenizer(checkpoint), text, max_tokens, BLOCK_SIZE)
        report(f"calibration: running {len(blocks)} block(s) through {checkpoint.source}, one layer at a time")
        stats = collect_activation_stats(checkpoint, blocks, device=device)
    tokens = sum(block.numel() for block in blocks)
    metadata = {"format": FORMAT, "source": str(getattr(source, "source", source)), "tokens": str(tokens),
                "blocks": str(len(blocks)), "block_size": str(BLOCK_SIZE), "seed": str(seed),
                "calibration": str(calibration) if calibration is not None else "self-generated"}
    return {name: stats[name] for name in sorted(stats, key=natural_key)}, metadata


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``surgery calibrate`` computes, checked when made (BadInput with the command's messages).

    Args:
        source: the base model of the merges the statistics are for.
        output: the statistics file to write (.safetensors, replaced atomically if it exists).
        calibration: UTF-8 calibration text file; None: text the base generates itself.
        max_tokens: calibration tokens used (at least 1).
        seed: seed of the self-generated text.
        device: cpu, cuda or cuda:N.

    Example::

        config = CalibrateConfig("base-model", "base.aim.safetensors", calibration="notes.txt", max_tokens=2048)
    """

    source: str
    output: str | Path
    calibration: str | Path | None = None
    max_tokens: int = 2048
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadInput(f"--max-tokens {self.max_tokens}: must be at least 1")
        check_device(self.device)


@dataclass(frozen=True)
class CalibrateResult:
    """What :func:`calibrate` wrote: the file, its tokens and blocks, the modules with statistics, and the time."""

    output: str
    tokens: int
    blocks: int
    modules: int
    seconds: float

    def summary(self) -> dict:
        """What ``surgery calibrate --json`` prints::

            calibrate(config).summary()    # {"output": ..., "tokens": 2048, "blocks": 4, "modules": 211, ...}
        """
        return asdict(self)


def calibrate(config: CalibrateConfig, *, progress: Callable[[str], None] | None = None) -> CalibrateResult:
    """Compute the AIM statistics of ``config.source`` and write them to ``config.output``.

    Args:
        config: what to calibrate and where to write it.
        progress: called with a line before each stage.

    Returns:
        The result::

            calibrate(CalibrateConfig("base-model", "base.aim.safetensors", calibration="notes.txt")).tokens
    """
    began = time.perf_counter()
    stats, metadata = compute_stats(config.source, calibration=config.calibration, max_tokens=config.max_tokens,
                                    seed=config.seed, device=config.device, progress=progress)
    write_tensor_file(config.output, stats, metadata)
    return CalibrateResult(str(config.output), int(metadata["tokens"]), int(metadata["blocks"]), len(stats),
                           round(time.perf_counter() - began, 3))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: calibration text file not found") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: calibration text is not UTF-8") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read the calibration text ({err.strerror})") from None


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    """Statistics written by :func:`calibrate`: weight name → float32 per-input-channel activity.

    Args:
        path: the AIM statistics file (safetensors with the AIM format tag).

    Returns:
        The statistics by weight name, in natural order; BadInput when the file is missing or not AIM statistics.

    Example::

        stats = load_stats("base.aim.safetensors")
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such AIM statistics file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise BadInput(f"{path}: not an AIM statistics file (no '{FORMAT}' format tag; make one with "
                               f"calibrate)")
            return {name: handle.get_tensor(name).float() for name in sorted(handle.keys(), key=natural_key)}
    except (SafetensorError, OSError) as err:
        raise BadInput(f"{path}: not an AIM statistics file ({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------------------------
# The AIM rule


def aim_factors(stats: torch.Tensor, omega: float) -> torch.Tensor:
    """r_j = 1 − (a_j / max a)(1 − ω) ∈ [ω, 1]: the most active input channel keeps only ω of the change, a silent
    one all of it. All-zero statistics give r = 1 (the merge unchanged).

    Args:
        stats: one weight's per-input-channel activity a (from :func:`load_stats`); (experts, inputs, 1) for a 3-D
            experts tensor, each expert its own peak.
        omega: ω, the share of the change the most active channel keeps, in [0, 1] (else BadInput).

    Returns:
        The float32 factors r, shaped like ``stats``.

    Example::

        aim_factors(torch.tensor([2.0, 1.0, 0.0]), omega=0.4)    # tensor([0.4, 0.7, 1.0])
    """
    if not 0.0 <= omega <= 1.0:
        raise BadInput(f"AIM omega {omega}: must be between 0 and 1")
    stats = stats.float()
    if stats.ndim == 3:  # per expert
        peak = stats.amax(dim=(1, 2), keepdim=True)
        return torch.where(peak > 0, 1.0 - stats / peak.clamp(min=1e-30) * (1.0 - omega), torch.ones_like(stats))
    peak = stats.max() if stats.numel() else torch.tensor(0.0)
    if peak <= 0:
        return torch.ones_like(stats)
    return 1.0 - (stats / peak) * (1.0 - omega)


def fits_factors(factors: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether AIM factors of shape ``factors`` scale a weight of shape ``weight``.

    Args:
        factors: the factors' shape: one per input channel (the last dimension of a 1-D or 2-D weight; (experts,
            inputs, 1) for a 3-D experts tensor stored (experts, inputs, outputs)).
        weight: the weight's shape.

    Returns:
        True when they fit.

    Example::

        fits_factors((64,), (128, 64))           # True
        fits_factors((4, 64, 1), (4, 64, 256))   # True
    """
    factors, weight = tuple(factors), tuple(weight)
    if len(weight) == 3:
        return factors == (*weight[:2], 1)
    return len(weight) in (1, 2) and factors == weight[-1:]


def apply_aim(base: torch.Tensor, merged: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """W0 + (W − W0) ⊙ r in float32, r over the input channels (the last dimension of a 2-D weight, elementwise for
    a 1-D norm weight, the middle one of a 3-D experts tensor stored (experts, inputs, outputs)).

    Args:
        base: the base weight W0 (1-D, 2-D, or 3-D experts).
        merged: the merged weight W, shaped like ``base`` (else BadInput).
        factors: r, one per input channel (``base.shape[-1]`` of them; (experts, inputs, 1) for 3-D; else BadInput).

    Returns:
        The float32 weight with AIM applied.

    Example::

        weight = apply_aim(base_weight, merged_weight, aim_factors(stats[name], omega=0.4))
    """
    if base.shape != merged.shape:
        raise BadInput(f"AIM: base shape {tuple(base.shape)} and merged shape {tuple(merged.shape)} differ")
    if not fits_factors(factors.shape, base.shape):
        raise BadInput(f"AIM: {factors.numel()} channel factors do not fit a weight of shape {tuple(base.shape)}")
    base32 = base.float()
    return base32 + (merged.float() - base32) * factors.float().to(base.device)
