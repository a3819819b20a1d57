"""Seeded sampling: text the model writes itself, so calibration needs no data set and nothing is downloaded::

    ids = sampled_ids(model, start=1, pad=2, tokens=128, seed=0)             # (8, 17): temperature 1, no truncation
    text = self_generated_text("org/model", max_tokens=2048, seed=0)        # decoded, blank-line separated
    token = sample_next(logits, generator)                                  # one seeded multinomial draw per row
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from typing import Iterator

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint
from surgery.runtime.model import loaded_model, opened
from surgery.runtime.text import load_tokenizer

SEQUENCES = 8  # sampled in parallel: a decode step costs about the same for 1 or 8 sequences on a CPU


@contextmanager
def seeded(seed: int, device: str | None = None) -> Iterator[None]:
    """Seed torch's generators for the duration, restoring the caller's random state afterwards.

    Args:
        seed: the seed.
        device: the device sampled on, whose generator is restored with the CPU's; None restores every CUDA
            device's.

    Returns:
        A context manager::

            with seeded(0, "cpu"):
                ids = model.generate(prompt, do_sample=True)
    """
    if device is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
        return
    accelerators = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=accelerators):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(model, start: int, pad: int, *, sequences: int, new_tokens: int, seed: int,
           device: str | None = None) -> torch.Tensor:
    """``sequences`` samples of exactly ``new_tokens`` tokens from the token ``start``, generated in one batch
    (temperature 1, no top-k or top-p), seeded: the same ids for the same weights and seed.

    Args:
        model: a causal LM with its weights.
        start: the first token of every sequence.
        pad: the pad token generate needs.
        sequences: sequences sampled together.
        new_tokens: tokens generated after ``start``.
        seed: the seed.
        device: where the model runs (None: the CPU, every device's random state restored).

    Returns:
        (sequences, new_tokens + 1) token ids, ``start`` first::

            ids = sample(model, 1, 2, sequences=8, new_tokens=16, seed=0)
    """
    prompt = torch.full((sequences, 1), start, dtype=torch.long, device=device or "cpu")
    with seeded(seed, device):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=pad)


def sampled_ids(model, start: int, pad: int, tokens: int, seed: int, sequences: int = SEQUENCES) -> torch.Tensor:
    """About ``tokens`` ids the model samples from ``start``, in ``sequences`` parallel sequences (CPU).

    Args:
        model: a causal LM with its weights.
        start: the first token.
        pad: the pad token.
        tokens: tokens wanted in all.
        seed: the seed.
        sequences: sequences sampled together.

    Returns:
        (sequences, max(2, ceil(tokens / sequences)) + 1) token ids::

            ids = sampled_ids(model, bos, eos, tokens=128, seed=0)
    """
    length = max(2, math.ceil(tokens / sequences))
    return sample(model, start, pad, sequences=sequences, new_tokens=length, seed=seed)


def start_and_pad(tokenizer) -> tuple[int | None, int | None]:
    """The token self-generated text starts from (BOS, else EOS) and the pad token (EOS, else the start).

    Args:
        tokenizer: a transformers tokenizer.

    Returns:
        (start, pad); None where the tokenizer has neither token::

            start, pad = start_and_pad(tokenizer)
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return start, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start


@torch.no_grad()
def self_generated_ids(model, tokenizer, tokens: int, seed: int, sequences: int = 4) -> torch.Tensor:
    """Ids the model samples from its BOS token (else EOS), seeded.

    Args:
        model: a causal LM with its weights.
        tokenizer: its tokenizer.
        tokens: tokens wanted in all.
        seed: the seed.
        sequences: sequences sampled together.

    Returns:
        (sequences, max(2, ceil(tokens / sequences)) + 1) token ids::

            held_out = self_generated_ids(model, tokenizer, tokens=256, seed=7)
    """
    start, pad = start_and_pad(tokenizer)
    if start is None:
        raise BadInput("the tokenizer has no BOS or EOS token to start self-generated text from")
    return sampled_ids(model, start, pad, tokens, seed, sequences)


def self_generated_text(source: str | Checkpoint, *, max_tokens: int, seed: int = 0, device: str = "cpu",
                        sequences: int = SEQUENCES) -> str:
    """Calibration text written by the model itself: ``sequences`` samples from its BOS token, generated in one
    batch, ``ceil(max_tokens / sequences)`` new tokens each, joined by blank lines. This loads the whole model once
    (float32), unlike the layer-by-layer runs.

    Args:
        source: a model source or an open checkpoint.
        max_tokens: tokens wanted in all.
        seed: same seed → same text.
        device: where the model runs.
        sequences: sequences sampled together.

    Returns:
        The text::

            text = self_generated_text("HuggingFaceTB/SmolLM2-135M", max_tokens=2048, seed=0)
    """
    if max_tokens <= 0:
        raise BadInput(f"calibration: max_tokens ({max_tokens}) must be positive")
    with opened(source) as checkpoint:
        tokenizer = load_tokenizer(checkpoint)
        start, pad = start_and_pad(tokenizer)
        if start is None:
            raise BadInput(f"{source}: the tokenizer has no BOS or EOS token to start self-generated text from")
        model = loaded_model(checkpoint, device)
        output = sample(model, start, pad, sequences=sequences, new_tokens=math.ceil(max_tokens / sequences),
                        seed=seed, device=device)
    texts = tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)
    return "\n\n".join(text.strip() for text in texts)


def sample_next(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from softmax(``logits``) (float32, on the CPU) with ``generator``.

    Args:
        logits: (rows, vocab) next-token logits.
        generator: a seeded CPU generator.

    Returns:
        (rows, 1) token ids on the CPU::

            token = sample_next(model(ids).logits[:, -1], torch.Generator().manual_seed(0))
    """
    return torch.multinomial(torch.softmax(logits.float().cpu(), dim=-1), 1, generator=generator)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's ``seed`` and the tensor's name: the same for a tensor whatever order the
    tensors are computed in (merges' DARE masks, moe's noise).

    Args:
        seed: the run's seed.
        name: the tensor's name.

    Returns:
        A seed for ``torch.Generator().manual_seed``.

    Example: ``torch.Generator().manual_seed(tensor_seed(0, "model.layers.0.mlp.up_proj.weight"))``
    """
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)
