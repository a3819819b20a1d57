"""Activation statistics for AIM, activation-informed merging (arXiv 2502.02421).

AIM protects the input channels a base model relies on most: for every module with a weight except embeddings
(linear layers, norms, lm_head) it needs a_j = Σ_blocks mean_tokens |x_j| over the module's input x, measured on the
BASE model over calibration text cut into blocks of up to 512 tokens. A merge then pulls each weight back towards
the base in proportion to its input channel's activity::

    from surgery.merge.aim import aim_factors, apply_aim, calibrate, load_stats

    calibrate("base-model", "base.aim.safetensors", calibration="notes.txt")   # or no text: self-generated
    stats = load_stats("base.aim.safetensors")
    factors = aim_factors(stats["model.layers.0.mlp.down_proj.weight"], omega=0.4)   # r_j ∈ [ω, 1]
    weight = apply_aim(base_weight, merged_weight, factors)                          # W0 + (W − W0) ⊙ r

Statistics are computed one decoder layer at a time (:func:`streamed_model`): the model is built by transformers
(``AutoModelForCausalLM.from_config``) with every parameter on the meta device but its buffers for real, so the
values transformers computes at construction (rotary frequencies, gemma's embedding scale) are exact. (Building it
all on meta and re-creating the rotary module afterwards would miss buffers kept inside weighted modules, such as
gemma3's ``embed_scale``.) Each child of
the decoder that holds parameters (the embedding, every decoder layer, the final norm) gets forward hooks that load
its weights from the checkpoint just before it runs and put them back on meta right after, and transformers' own
forward of the decoder is run unchanged, so family details (embedding scaling, sliding windows, ``layer_types``,
q/k norms) are exactly transformers'. Memory is therefore the largest of one decoder layer and the embedding, plus
the activations of one batch; all blocks of the same length are run together (up to ``batch_tokens``), so each
layer is read once per batch. The lm_head is never run: its input is the decoder's output, recorded under
``lm_head.weight`` even when the checkpoint ties it to the embedding (and stores no such tensor).

Computation is in float32 whatever the checkpoint's dtype. Any source :func:`surgery.io.open_checkpoint` accepts
works if it has a config and a tokenizer: a model directory, a Hub repo id, or a ``.gguf`` file (dequantized
tensors, and the tokenizer transformers rebuilds from the GGUF vocabulary). Functions that take a ``source`` also
take an already open :class:`~surgery.io.Checkpoint`, so :func:`calibrate` opens (and parses) it once.
Self-generated calibration text is the exception to the one-layer memory bound: generating loads the whole model.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint, natural_key
from surgery.io.writer import write_tensor_file

FORMAT = "surgery-aim-stats/1"
BLOCK_SIZE = 512
BATCH_TOKENS = 8192  # tokens run through a layer at once; bounds the activation memory
GENERATED_SEQUENCES = 8


# ---------------------------------------------------------------------------------------------------------------
# Calibration text


def calibration_blocks(tokenizer, text: str, max_tokens: int, block_size: int = BLOCK_SIZE) -> list[torch.Tensor]:
    """The first ``max_tokens`` tokens of ``text`` as 1-D id blocks of up to ``block_size`` tokens.

    When the tokenizer starts a text with its BOS token (gemma's do), every block starts with it too::

        blocks = calibration_blocks(tokenizer, Path("notes.txt").read_text(), max_tokens=2048)
        [len(block) for block in blocks]      # [512, 512, 512, 512]
    """
    ids = list(tokenizer(text)["input_ids"])
    prefix = [ids[0]] if ids and ids[0] == tokenizer.bos_token_id else []
    body = ids[len(prefix):]
    if max_tokens <= len(prefix) or block_size <= len(prefix):
        raise BadInput(f"calibration: max_tokens ({max_tokens}) and block_size ({block_size}) must exceed "
                       f"{len(prefix)}")
    if not body:
        raise BadInput("calibration: the text gives no tokens")
    step = block_size - len(prefix)
    blocks, total = [], 0
    for start in range(0, len(body), step):
        block = (prefix + body[start:start + step])[:max_tokens - total]
        if len(block) <= len(prefix):
            break
        blocks.append(torch.tensor(block, dtype=torch.long))
        total += len(block)
    return blocks


def self_generated_text(source: str | Checkpoint, *, max_tokens: int, seed: int = 0, device: str = "cpu",
                        sequences: int = GENERATED_SEQUENCES) -> str:
    """Calibration text written by the model itself: ``sequences`` samples from its BOS token, generated in one
    batch, ``max_tokens / sequences`` new tokens each, joined by blank lines. Same seed → same text; nothing is
    downloaded. This loads the whole model once (float32), unlike the statistics::

        text = self_generated_text("HuggingFaceTB/SmolLM2-135M", max_tokens=2048, seed=0)
    """
    if max_tokens <= 0:
        raise BadInput(f"calibration: max_tokens ({max_tokens}) must be positive")
    with _opened(source) as checkpoint:
        tokenizer = load_tokenizer(checkpoint)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise BadInput(f"{source}: the tokenizer has no BOS or EOS token to start self-generated text from")
        model = _build_model(checkpoint.config, checkpoint.source, device)
        _Loader(model, checkpoint, device).load(model)
        new_tokens = math.ceil(max_tokens / sequences)
        prompt = torch.full((sequences, 1), start, dtype=torch.long, device=device)
        with _seeded(seed, device), torch.no_grad():
            output = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
            )
    texts = tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)
    return "\n\n".join(text.strip() for text in texts)


@contextmanager
def _opened(source: str | Checkpoint) -> Iterator[Checkpoint]:
    """An already open checkpoint as is (left open), or ``source`` opened for the duration."""
    if isinstance(source, Checkpoint):
        yield source
    else:
        with open_checkpoint(source) as checkpoint:
            yield checkpoint


@contextmanager
def _seeded(seed: int, device: str) -> Iterator[None]:
    """Seed torch's generators for the duration, restoring the caller's random state afterwards."""
    accelerators = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=accelerators):
        torch.manual_seed(seed)
        yield


def load_tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer, built by transformers from the files the checkpoint carries (for a GGUF file,
    the files transformers rebuilds from its vocabulary)."""
    from transformers import AutoTokenizer

    files = checkpoint.auxiliary_files()
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "vocab.txt") for name in files):
        raise BadInput(f"{checkpoint.source}: no tokenizer files, so calibration text cannot be tokenized")
    with tempfile.TemporaryDirectory(prefix="surgery-tokenizer-") as scratch:
        for name, content in files.items():
            (Path(scratch) / name).write_bytes(content)
        if checkpoint.config is not None:
            (Path(scratch) / "config.json").write_text(json.dumps(checkpoint.config))
        try:
            return AutoTokenizer.from_pretrained(scratch)
        except (OSError, ValueError) as err:
            raise BadInput(f"{checkpoint.source}: transformers cannot load its tokenizer "
                           f"({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------------------------
# The model, one piece in memory at a time


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device while their buffers are computed for real.

    The same trick as accelerate's ``init_empty_weights(include_buffers=False)``: each parameter is moved to meta
    as it is registered, so the initialisation that follows in the module's constructor costs nothing. accelerate's
    version re-wraps a parameter registered again by ``tie_weights``, so a tied lm_head stops being the embedding
    (tests/test_aim.py, qwen2, fails with it); this one keeps an already-meta parameter as the same object.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a meta parameter may be a tie: keep it the same object
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_model(config: dict | None, source: str, device: str) -> nn.Module:
    """transformers' causal LM for ``config``, parameters on meta, buffers on ``device``."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not config or config.get("model_type") not in CONFIG_MAPPING:
        raise BadInput(f"{source}: needs a config.json with a model_type transformers knows")
    try:
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        with torch.device(device), _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (ValueError, KeyError) as err:
        raise BadInput(f"{source}: transformers cannot build a causal LM from its config "
                       f"({str(err).splitlines()[0]})") from None
    leftover = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if leftover:
        raise BadInput(f"{source}: buffer {leftover[0]!r} could not be computed outside the meta device")
    return model.eval()


def _decoder(model: nn.Module, source: str) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise BadInput(f"{source}: {type(model).__name__} has no decoder with a list of layers to run one by one")
    return decoder


class _Loader:
    """Puts checkpoint tensors into (and takes them out of) a module of a meta-built model.

    Tied parameters (one Parameter under several names) are loaded from whichever of their names the checkpoint
    stores, so a tied lm_head finds the embedding.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: str):
        self.checkpoint = checkpoint
        self.device = device
        self.module_names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        self.stored_name = {}
        for names in aliases.values():
            stored = next((name for name in names if name in checkpoint.tensors), names[0])
            self.stored_name.update({name: stored for name in names})

    def _prefix(self, module: nn.Module) -> str:
        name = self.module_names[id(module)]
        return f"{name}." if name else ""

    def load(self, module: nn.Module) -> None:
        """Materialise every parameter of ``module`` (float32, on the device) from the checkpoint."""
        prefix = self._prefix(module)
        loaded: dict[int, nn.Parameter] = {}
        for local, param in list(module.named_parameters(remove_duplicate=False)):
            if id(param) not in loaded:
                loaded[id(param)] = nn.Parameter(self._read(prefix + local, param.shape), requires_grad=False)
            _set_parameter(module, local, loaded[id(param)])

    def _read(self, name: str, shape: torch.Size) -> torch.Tensor:
        stored = self.stored_name[name]
        if stored not in self.checkpoint.tensors:
            raise BadInput(f"{self.checkpoint.source}: tensor {name!r} is missing (the model built from its config "
                           f"needs it)")
        tensor = self.checkpoint.get(stored)
        if tuple(tensor.shape) != tuple(shape):
            raise BadInput(f"{self.checkpoint.source}: tensor {stored!r} has shape {tuple(tensor.shape)}, the "
                           f"config implies {tuple(shape)}")
        return tensor.to(self.device, torch.float32)

    @staticmethod
    def free(module: nn.Module) -> None:
        """Put every parameter of ``module`` back on the meta device."""
        for local, param in list(module.named_parameters(remove_duplicate=False)):
            if not param.is_meta:
                _set_parameter(module, local, nn.Parameter(torch.empty_like(param, device="meta"),
                                                           requires_grad=False))


def _set_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = value


def _streamed_pieces(model: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """The modules loaded one at a time: each decoder layer, the decoder's other children with parameters (the
    embedding, the final norm), and the lm_head."""
    pieces = []
    for child in decoder.children():
        if child is decoder.layers:
            pieces.extend(child)
        elif any(True for _ in child.parameters()):
            pieces.append(child)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        pieces.append(output)
    return pieces


@contextmanager
def streamed_model(source: str | Checkpoint, device: str = "cpu") -> Iterator[nn.Module]:
    """transformers' causal LM for ``source`` whose parameters stay on the meta device except while a piece runs:
    the embedding, each decoder layer, the final norm and the lm_head are loaded from the checkpoint by a forward
    pre-hook and freed by a forward hook. Run the decoder for hidden states (running the whole model also works, at
    the cost of the lm_head's logits)::

        with streamed_model("path/to/model") as model:
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    """
    with _opened(source) as checkpoint:
        model = _build_model(checkpoint.config, checkpoint.source, device)
        loader = _Loader(model, checkpoint, device)
        handles = []
        for piece in _streamed_pieces(model, _decoder(model, checkpoint.source)):
            handles.append(piece.register_forward_pre_hook(lambda module, args: loader.load(module)))
            handles.append(piece.register_forward_hook(lambda module, args, output: loader.free(module)))
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
            loader.free(model)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


class _InputStats:
    """Σ_blocks mean_tokens |x| of the input of every hooked module, keyed by its weight's name."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, inputs: torch.Tensor) -> None:
        # Batch first, channels last; everything between (tokens, and heads for q/k norms) is averaged.
        magnitudes = inputs.detach().abs().float().reshape(inputs.shape[0], -1, inputs.shape[-1])
        per_block = magnitudes.mean(dim=1).sum(dim=0).double()
        if name in self.sums:
            self.sums[name] += per_block
        else:
            self.sums[name] = per_block

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else next(value for value in kwargs.values() if torch.is_tensor(value))
            self.add(name, inputs)

        return record

    def result(self) -> dict[str, torch.Tensor]:
        return {name: total.float().cpu() for name, total in self.sums.items()}


def _batches(blocks: list[torch.Tensor], batch_tokens: int) -> list[torch.Tensor]:
    """Blocks of equal length stacked together (no padding needed), up to ``batch_tokens`` tokens a batch."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for block in blocks:
        by_length.setdefault(block.numel(), []).append(block.reshape(-1))
    batches = []
    for length, same in by_length.items():
        per_batch = max(1, batch_tokens // length)
        batches.extend(torch.stack(same[start:start + per_batch]) for start in range(0, len(same), per_batch))
    return batches


def collect_activation_stats(source: str | Checkpoint, blocks: list[torch.Tensor], *, device: str = "cpu",
                             batch_tokens: int = BATCH_TOKENS) -> dict[str, torch.Tensor]:
    """AIM statistics of the base model ``source``: weight name → float32 Σ_blocks mean_tokens |input|, one value
    per input channel, for every module with a weight except embeddings. Run one decoder layer at a time::

        stats = collect_activation_stats("base-model", blocks)
        stats["model.layers.0.self_attn.q_proj.weight"].shape      # (hidden_size,)
        stats["lm_head.weight"]                                    # the decoder's output, also when tied
    """
    blocks = [block for block in blocks if block.numel() > 0]
    if not blocks:
        raise BadInput("calibration: no tokens to compute activation statistics from")
    stats = _InputStats()
    with streamed_model(source, device) as model:
        names = {id(module): name for name, module in model.named_modules()}
        decoder = model.get_decoder()
        for module in decoder.modules():
            if isinstance(module, nn.Embedding) or module._parameters.get("weight") is None:
                continue
            module.register_forward_pre_hook(stats.hook(f"{names[id(module)]}.weight"), with_kwargs=True)
        output = model.get_output_embeddings()
        with torch.no_grad():
            for batch in _batches(blocks, batch_tokens):
                hidden = decoder(input_ids=batch.to(device), use_cache=False).last_hidden_state
                if output is not None:
                    stats.add(f"{names[id(output)]}.weight", hidden)
    return stats.result()


def compute_stats(source: str | Checkpoint, *, calibration: str | Path | None = None, max_tokens: int = 2048,
                  seed: int = 0, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The AIM statistics of ``source`` and their metadata, from the UTF-8 file ``calibration`` or, without one,
    from text the model generates itself from ``seed`` (see :func:`calibrate`)."""
    text = _read_text(Path(calibration)) if calibration is not None else None
    with _opened(source) as checkpoint:
        if text is None:
            text = self_generated_text(checkpoint, max_tokens=max_tokens, seed=seed, device=device)
        blocks = calibration_blocks(load_tokenizer(checkpoint), text, max_tokens, BLOCK_SIZE)
        stats = collect_activation_stats(checkpoint, blocks, device=device)
    tokens = sum(block.numel() for block in blocks)
    metadata = {"format": FORMAT, "source": str(getattr(source, "source", source)), "tokens": str(tokens),
                "blocks": str(len(blocks)), "block_size": str(BLOCK_SIZE), "seed": str(seed),
                "calibration": str(calibration) if calibration is not None else "self-generated"}
    return {name: stats[name] for name in sorted(stats, key=natural_key)}, metadata


def calibrate(source: str, output_path: str | Path, *, calibration: str | Path | None = None,
              max_tokens: int = 2048, seed: int = 0, device: str = "cpu") -> dict:
    """Compute the AIM statistics of ``source`` and write them to ``output_path`` (a .safetensors file, replaced
    atomically if it exists). The calibration text is the UTF-8 file ``calibration``, or, without one, text the
    model generates itself from ``seed``. Returns a summary::

        calibrate("base-model", "base.aim.safetensors", calibration="notes.txt", max_tokens=2048)
        # {"tokens": 2048, "blocks": 4, "modules": 211, "seconds": 12.3, ...}
    """
    began = time.perf_counter()
    stats, metadata = compute_stats(source, calibration=calibration, max_tokens=max_tokens, seed=seed, device=device)
    write_tensor_file(output_path, stats, metadata)
    return {"output": str(output_path), "tokens": int(metadata["tokens"]), "blocks": int(metadata["blocks"]),
            "modules": len(stats), "seconds": round(time.perf_counter() - began, 3)}


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
    """Statistics written by :func:`calibrate`: weight name → float32 per-input-channel activity::

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
    one all of it. All-zero statistics give r = 1 (the merge unchanged)::

        aim_factors(torch.tensor([2.0, 1.0, 0.0]), omega=0.4)    # tensor([0.4, 0.7, 1.0])
    """
    if not 0.0 <= omega <= 1.0:
        raise BadInput(f"AIM omega {omega}: must be between 0 and 1")
    stats = stats.float()
    peak = stats.max() if stats.numel() else torch.tensor(0.0)
    if peak <= 0:
        return torch.ones_like(stats)
    return 1.0 - (stats / peak) * (1.0 - omega)


def apply_aim(base: torch.Tensor, merged: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """W0 + (W − W0) ⊙ r in float32, r over the input channels (the last dimension of a 2-D weight, elementwise for
    a 1-D norm weight)::

        weight = apply_aim(base_weight, merged_weight, aim_factors(stats[name], omega=0.4))
    """
    if base.shape != merged.shape:
        raise BadInput(f"AIM: base shape {tuple(base.shape)} and merged shape {tuple(merged.shape)} differ")
    if base.ndim not in (1, 2) or factors.ndim != 1 or factors.numel() != base.shape[-1]:
        raise BadInput(f"AIM: {factors.numel()} channel factors do not fit a weight of shape {tuple(base.shape)}")
    base32 = base.float()
    return base32 + (merged.float() - base32) * factors.float().to(base.device)
