"""What prompt adapters share: reading the prompt and query files, prefilling a prompt into a KV cache, queries the
model writes itself after the prompt, and the next-token distributions of the model run with the real prompt::

    ids = prompt_ids(tokenizer, read_text("system.txt", "--prompt-file"))
    cache, _ = prefill(model, ids)                               # DynamicCache of the prompt, positions 0..m-1
    queries = self_generated_queries(model, ids, count=16, length=64, seed=0)
    reference = with_prompt_logprobs(model, cache, queries)      # [16, 64, vocab], float32

Queries are token sequences without special tokens, right-padded into one batch (``Queries``); the positions that
count are the ``mask``. Right padding needs no attention mask in a causal model: real tokens never see the pads.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import BadInput
from surgery.runtime import cache_kwargs, sample_next

BATCH = 8  # queries per forward pass where a pass over all of them would hold too much
GENERATION_CHUNK = 64  # continuations sampled together (each holds a copy of the prompt's KV cache)
TRAINING, HELD_OUT = 0, 1  # the two streams of self-generated queries: one seed never gives both


def query_seed(seed: int, stream: int) -> int:
    """The generator seed of ``stream`` (TRAINING or HELD_OUT) for the user's ``seed``.

    Args:
        seed: the user's seed.
        stream: TRAINING (0) or HELD_OUT (1).

    Returns:
        ``2 * seed + stream``: the two streams of one seed never meet those of another.

    Example:
        ``query_seed(3, HELD_OUT)``   # 7
    """
    return 2 * seed + stream


@dataclass
class Queries:
    """``ids`` [count, length] right-padded with 0, ``mask`` [count, length] True at real tokens."""

    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_lists(cls, sequences: list[list[int]]) -> "Queries":
        length = max(len(sequence) for sequence in sequences)
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        mask = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :len(sequence)] = True
        return cls(ids, mask)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batches(self, size: int = BATCH):
        for start in range(0, len(self), size):
            yield Queries(self.ids[start:start + size], self.mask[start:start + size])

    def subset(self, rows: torch.Tensor) -> "Queries":
        return Queries(self.ids[rows], self.mask[rows])


def read_text(path: str | Path, option: str) -> str:
    """A UTF-8 text file; BadInput naming ``option`` when it is missing or unreadable.

    Args:
        path: the file.
        option: the command-line option that named it, for the error message.

    Returns:
        The file's text.

    Example:
        ``read_text("system.txt", "--prompt-file")``
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{option} {path}: cannot read it as UTF-8 text ({err})") from None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        The hex digest.

    Example:
        ``recipe["prompt_sha256"] = file_sha256("persona.txt")``
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prompt_ids(tokenizer, text: str, option: str = "--prompt-file") -> torch.Tensor:
    """[1, m] token ids of the prompt, with the special tokens the tokenizer adds at the start (BOS...).

    Args:
        tokenizer: the model's tokenizer.
        text: the prompt (BadInput when it is empty).
        option: the command-line option that named it, for the error message.

    Returns:
        A long tensor [1, m].

    Example:
        ``ids = prompt_ids(tokenizer, read_text("system.txt", "--prompt-file"))``
    """
    ids = tokenizer(text)["input_ids"]
    if not text.strip() or not ids:
        raise BadInput(f"{option}: the prompt is empty")
    return torch.tensor([ids], dtype=torch.long)


def _read_texts(path: str | Path, option: str) -> list[str]:
    """Texts of a file: one per line of a ``.jsonl`` file (``{"text": ...}``), otherwise one per paragraph
    (separated by blank lines)."""
    content = read_text(path, option)
    if str(path).endswith(".jsonl"):
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise BadInput(f"{option} {path}: line {number} is not a JSON object with a \"text\"") from None
    else:
        texts = [part.strip() for part in content.replace("\r\n", "\n").split("\n\n")]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise BadInput(f"{option} {path}: no text in it")
    return texts


def file_queries(tokenizer, path: str | Path, max_length: int, option: str = "--queries",
                 special_tokens: bool = False) -> Queries:
    """The texts of ``path`` tokenized (without special tokens unless asked), each cut to ``max_length`` tokens.

    A ``.jsonl`` file holds one ``{"text": ...}`` per line; any other file one text per paragraph (separated by
    blank lines).

    Args:
        tokenizer: the model's tokenizer.
        path: the file of texts.
        max_length: tokens kept of each text.
        option: the command-line option that named it, for the error message.
        special_tokens: add the tokenizer's special tokens.

    Returns:
        The :class:`Queries` (BadInput when no text has any token).

    Example:
        ``queries = file_queries(tokenizer, "queries.jsonl", 64)``
    """
    sequences = []
    for text in _read_texts(path, option):
        ids = tokenizer(text, add_special_tokens=special_tokens)["input_ids"][:max_length]
        if ids:
            sequences.append(ids)
    if not sequences:
        raise BadInput(f"{option} {path}: no tokens in it")
    return Queries.from_lists(sequences)


def prefill(model, ids: torch.Tensor, start: int = 0):
    """The KV cache (and last logits) of ``ids`` [1, m] placed at positions start..start+m−1.

    Args:
        model: a causal LM.
        ids: [1, m] prompt ids.
        start: the first position.

    Returns:
        (DynamicCache of the prompt, float32 logits [1, vocab] after its last token)::

            cache, logits = prefill(model, prompt_ids(tokenizer, text))
    """
    from transformers import DynamicCache

    positions = torch.arange(start, start + ids.shape[1], device=model.device)[None]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids.to(model.device), position_ids=positions, **cache_kwargs(model, cache)).logits
    return cache, logits[:, -1].float()


def expanded(cache, batch: int):
    """A copy of a batch-1 cache repeated ``batch`` times (the forward pass then appends to the copy).

    Args:
        cache: a batch-1 DynamicCache (:func:`prefill`).
        batch: the rows wanted.

    Returns:
        The repeated copy; ``cache`` is unchanged.

    Example:
        ``model(ids, **cache_kwargs(model, expanded(cache, len(ids))))``
    """
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return copied


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, tokens, head_dim].

    Args:
        cache: a transformers DynamicCache.

    Returns:
        One (keys, values) pair per layer (the cache's own tensors, not copies).

    Example:
        ``keys, values = cache_layers(prefill(model, ids)[0])[0]``
    """
    return [(layer.keys, layer.values) for layer in cache.layers]


@contextmanager
def shared_prompt(model, cache):
    """A context within which ``model`` runs every row of a batch after the prompt of the batch-1 ``cache``.

    The prompt (positions 0..m−1) is not copied per row when NTK-attention supports the model's family (exact, up to
    float rounding); inputs then need position_ids from m on.

    Args:
        model: a causal LM.
        cache: the prompt's batch-1 KV cache (:func:`prefill`).

    Yields:
        m, or None for other families (then repeat the cache).

    Example::

        with shared_prompt(model, cache) as offset:
            logits = model(ids, position_ids=torch.arange(offset, offset + ids.shape[1])[None]).logits
    """
    from surgery.adapters import ntk_attention

    if model.config.model_type not in ntk_attention.FAMILIES:
        yield None
        return
    layers = cache_layers(cache)
    ntk_attention.apply_prompt(model, [(keys[0], values[0]) for keys, values in layers])
    try:
        yield layers[0][0].shape[2]
    finally:
        ntk_attention.remove(model)


def _positions(start: int, rows: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)[None].expand(rows, length)


@torch.no_grad()
def self_generated_queries(model, ids: torch.Tensor, *, count: int, length: int, seed: int,
                           chunk: int = GENERATION_CHUNK) -> Queries:
    """``count`` continuations of the prompt ``ids``, ``length`` tokens each, sampled from the model (temperature
    1, no truncation, :func:`surgery.runtime.sample_next`) with a generator seeded by ``seed``, ``chunk`` at a time:
    what the model expects after the prompt, and nothing is downloaded. Same seed → same queries.

    Args:
        model: a causal LM.
        ids: [1, m] prompt ids.
        count: continuations.
        length: tokens each.
        seed: the generator's seed.
        chunk: continuations sampled together.

    Returns:
        The queries (all positions real)::

            queries = self_generated_queries(model, ids, count=16, length=64, seed=0)
    """
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    prompt_cache, prompt_logits = prefill(model, ids)
    parts = []
    with shared_prompt(model, prompt_cache) as offset:
        for start in range(0, count, chunk):
            rows = min(chunk, count - start)
            cache = expanded(prompt_cache, rows) if offset is None else DynamicCache(config=model.config)
            logits = prompt_logits.expand(rows, -1)
            tokens = []
            for step in range(length):
                token = sample_next(logits, generator)
                tokens.append(token)
                if step + 1 < length:
                    forward = cache_kwargs(model, cache)
                    if offset is not None:
                        forward["position_ids"] = _positions(offset + step, rows, 1, model.device)
                    logits = model(token.to(model.device), **forward).logits[:, -1]
            parts.append(torch.cat(tokens, dim=1))
    ids = torch.cat(parts)
    return Queries(ids, torch.ones_like(ids, dtype=torch.bool))


@torch.no_grad()
def with_prompt_logprobs(model, cache, queries: Queries, batch: int = BATCH, shared: bool = False) -> torch.Tensor:
    """Next-token log-probabilities of the model run on prompt + query.

    Args:
        model: a causal LM.
        cache: the prompt's batch-1 KV cache (:func:`prefill`).
        queries: the queries.
        batch: queries per forward pass.
        shared: through :func:`shared_prompt` (no copy of the cache per row) where the family allows.

    Returns:
        [count, length, vocab] float32 log-probabilities on the CPU::

            reference = with_prompt_logprobs(model, cache, queries)
    """
    rows = []
    with (shared_prompt(model, cache) if shared else nullcontext()) as offset:
        for part in queries.batches(batch):
            ids = part.ids.to(model.device)
            if offset is None:
                logits = model(ids, **cache_kwargs(model, expanded(cache, len(part)))).logits
            else:
                logits = model(ids, position_ids=_positions(offset, *ids.shape, model.device)).logits
            rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


@torch.no_grad()
def plain_logprobs(model, queries: Queries, batch: int = BATCH, **forward) -> torch.Tensor:
    """Next-token log-probabilities of the model run on the queries alone.

    Args:
        model: a causal LM.
        queries: the queries.
        batch: queries per forward pass.
        **forward: passed on to every forward call of the model.

    Returns:
        [count, length, vocab] float32 log-probabilities on the CPU.

    Example:
        ``plain = plain_logprobs(model, queries)``
    """
    rows = []
    for part in queries.batches(batch):
        logits = model(part.ids.to(model.device), **forward).logits
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)
