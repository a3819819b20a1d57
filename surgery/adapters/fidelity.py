"""How well an adapter stands in for its prompt: next-token KL against the model run with the real prompt::

    report = evaluate(AdapterEvalConfig("HuggingFaceTB/SmolLM2-135M-Instruct", "persona-ntk", "persona.txt"))
    report.kl_adapter, report.kl_no_prompt, report.top1_adapter

On held-out queries (``--queries FILE``, or ``count`` continuations of the prompt that the model samples itself
with a seed distinct from the one training uses), at every query position: KL(with prompt ‖ with adapter), the same
for the model without any prompt, and how often the most likely next token agrees with the prompted model's. The
sizes compare the adapter's tensors with the prompt's KV cache in the model's dtype. Works for prefix (PEFT) and
NTK-attention adapters.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from surgery.adapters import ntk_attention, prefix
from surgery.adapters.config import AdapterEvalConfig, Fidelity
from surgery.adapters.prompts import (
    HELD_OUT, Queries, cache_layers, file_queries, plain_logprobs, prefill, prompt_ids, query_seed, read_text,
    self_generated_queries, with_prompt_logprobs,
)
from surgery.errors import BadInput
from surgery.runtime import mean_kl, top1_agreement

log = logging.getLogger(__name__)


def _adapter_kind(directory: str | Path) -> str:
    """"prefix" or "ntk" from the files in ``directory``; BadInput for anything else."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"{directory}: no such adapter directory")
    if prefix.is_prefix_adapter(directory):
        return "prefix"
    if (directory / ntk_attention.CONFIG_FILE).is_file():
        return "ntk"
    raise BadInput(f"{directory}: neither a prefix adapter ({prefix.CONFIG_FILE} with peft_type PREFIX_TUNING) nor "
                   f"an NTK-attention adapter ({ntk_attention.CONFIG_FILE})")


@torch.no_grad()
def compare(model, adapter_dir: str | Path, ids: torch.Tensor, queries: Queries) -> dict:
    """The fidelity figures of the adapter in ``adapter_dir`` for the prompt ``ids`` on ``queries``.

    The queries go a batch at a time, so memory holds a few batches' log-probabilities whatever their number.

    Args:
        model: the loaded base model.
        adapter_dir: a prefix or NTK-attention adapter directory.
        ids: the prompt's token ids [1, m].
        queries: the held-out queries.

    Returns:
        ``adapter``, ``kind``, ``queries``, ``positions``, ``kl_adapter``, ``kl_no_prompt``, ``top1_adapter``,
        ``top1_no_prompt`` (means over the queries' positions), ``prompt_tokens``, ``adapter_bytes``,
        ``prompt_kv_cache_bytes`` and ``seconds``.

    Example:
        ``compare(model, "persona-ntk", prompt_ids(tokenizer, text), queries)["kl_adapter"]``
    """
    kind = _adapter_kind(adapter_dir)
    started = time.perf_counter()
    prompt_cache, _ = prefill(model, ids)
    itemsize = next(model.parameters()).dtype.itemsize
    if kind == "prefix":
        cache, tokens = prefix.load_prefix_cache(adapter_dir, model)
        if tokens != ids.shape[1]:
            log.warning("%s holds %d tokens but the prompt has %d: was it made from another prompt?", adapter_dir,
                        tokens, ids.shape[1])
        adapter_bytes = sum(layer.numel() * itemsize for pair in cache_layers(cache) for layer in pair)

        def adapted(part: Queries) -> torch.Tensor:
            return with_prompt_logprobs(model, cache, part)
    else:
        adapter = ntk_attention.NTKAdapter.load(adapter_dir)
        ntk_attention.check_compatible(adapter, model, str(adapter_dir))
        adapter_bytes = adapter.nbytes

        def adapted(part: Queries) -> torch.Tensor:
            ntk_attention.apply(model, adapter)
            try:
                return plain_logprobs(model, part)
            finally:
                ntk_attention.remove(model)
    sums = dict.fromkeys(("kl_adapter", "kl_no_prompt", "top1_adapter", "top1_no_prompt"), 0.0)
    for part in queries.batches():
        reference = with_prompt_logprobs(model, prompt_cache, part)
        positions = int(part.mask.sum())
        for name, other in (("adapter", adapted(part)), ("no_prompt", plain_logprobs(model, part))):
            sums[f"kl_{name}"] += float(mean_kl(reference, other, part.mask)) * positions
            sums[f"top1_{name}"] += top1_agreement(reference, other, part.mask) * positions
    positions = int(queries.mask.sum())
    geometry = prefix.kv_geometry(model) if kind == "prefix" else ntk_attention.model_geometry(model)
    per_token = 2 * geometry["num_layers"] * geometry["num_key_value_heads"] * geometry["head_dim"] * itemsize
    return {
        "adapter": str(adapter_dir), "kind": kind, "queries": len(queries), "positions": positions,
        **{name: total / positions for name, total in sums.items()},
        "prompt_tokens": ids.shape[1], "adapter_bytes": adapter_bytes,
        "prompt_kv_cache_bytes": per_token * ids.shape[1],
        "seconds": time.perf_counter() - started,
    }


def held_out_queries(model, tokenizer, ids: torch.Tensor, queries_file: str | Path | None, *, count: int,
                     length: int, seed: int) -> Queries:
    """``queries_file``'s texts, or ``count`` × ``length`` continuations sampled with the held-out seed.

    Args:
        model: the loaded base model (samples the continuations).
        tokenizer: its tokenizer.
        ids: the prompt's token ids [1, m].
        queries_file: a file of query texts, or None to sample them.
        count: continuations sampled.
        length: tokens per query (texts are cut to it).
        seed: the user's seed (its HELD_OUT stream is used).

    Returns:
        The :class:`Queries`.

    Example:
        ``queries = held_out_queries(model, tokenizer, ids, None, count=16, length=64, seed=0)``
    """
    if queries_file is not None:
        return file_queries(tokenizer, queries_file, length)
    return self_generated_queries(model, ids, count=count, length=length, seed=query_seed(seed, HELD_OUT))


def evaluate(config: AdapterEvalConfig, *, progress: Callable[[str], None] | None = None) -> Fidelity:
    """Load ``config.model`` and measure (:func:`compare`) the adapter ``config.adapter`` against the prompt in
    ``config.prompt_file``.

    Args:
        config: the model, adapter, prompt and held-out queries (checked when made).
        progress: called with a line before each stage.

    Returns:
        The figures::

            evaluate(AdapterEvalConfig("org/model", "persona-ntk", "persona.txt")).kl_adapter
    """
    from surgery.evaluation import load_model

    report = progress or (lambda line: None)
    text = read_text(config.prompt_file, "--prompt-file")
    kind = _adapter_kind(config.adapter)
    model, tokenizer = load_model(config.model, config.device)
    (prefix.kv_geometry if kind == "prefix" else ntk_attention.model_geometry)(model)  # the family is supported
    ids = prompt_ids(tokenizer, text)
    queries = held_out_queries(model, tokenizer, ids, config.queries, count=config.count, length=config.length,
                               seed=config.seed)
    report(f"eval: {kind} adapter on {len(queries)} queries")
    return Fidelity(model=config.model, prompt_file=str(config.prompt_file),
                    **compare(model, config.adapter, ids, queries))
