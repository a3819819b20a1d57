"""The ``surgery adapter prefix`` and ``surgery adapter ntk`` commands as library calls::

    from surgery.adapters import NTKAdapterConfig, PrefixAdapterConfig, make_ntk_adapter, make_prefix_adapter

    make_prefix_adapter(PrefixAdapterConfig("HuggingFaceTB/SmolLM2-135M-Instruct", "persona.txt", "persona-prefix"))
    make_ntk_adapter(NTKAdapterConfig("HuggingFaceTB/SmolLM2-135M-Instruct", "persona-ntk", prompt_file="persona.txt",
                                      steps=100))
    make_ntk_adapter(NTKAdapterConfig("org/model", "task-ntk", train_file="task.jsonl", steps=500, lr=1e-3))

Each returns an :class:`~surgery.adapters.config.AdapterResult` (what was written, the figures measured, the
seconds taken) and writes its directory atomically with ``surgery.json`` and a model card. Same inputs and seed →
identical bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from surgery.adapters import ntk, ntk_attention, prefix
from surgery.adapters.config import AdapterResult, NTKAdapterConfig, PrefixAdapterConfig
from surgery.adapters.output import base_model_reference, json_bytes, write_adapter
from surgery.adapters.prompts import (
    TRAINING, file_queries, file_sha256, prefill, prompt_ids, query_seed, read_text, self_generated_queries,
    with_prompt_logprobs,
)
from surgery.cards import model_name
from surgery.errors import BadInput, CheckFailed
from surgery.io import open_checkpoint
from surgery.io.loader_check import check_peft
from surgery.io.writer import check_output_available

TRAIN_MAX_LENGTH = 256
LEAST_SQUARES_QUERIES = 128  # queries the least squares is fitted on (its cost and memory grow with them)
MEASURED_QUERIES = 16  # training queries on which the KL before and after distillation is reported
VALIDATION_QUERIES = 32  # queries kept out of training to choose when distillation stops


def _load(source: str, families: tuple[str, ...], what: str, device: str, loaded: tuple | None):
    """The opened checkpoint (for provenance), the model and its tokenizer (``loaded`` when given); the family is
    checked first."""
    from surgery.evaluation import load_model

    checkpoint = open_checkpoint(source)
    try:
        model_type = (checkpoint.config or {}).get("model_type")
        if model_type not in families:
            raise BadInput(f"{source}: model type {model_type!r}: {what} supports {', '.join(families)}")
        model, tokenizer = loaded or load_model(source, device)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint, model, tokenizer


def _check_length(model, tokens: int, extra: int, source: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and tokens + extra > limit:
        raise BadInput(f"--prompt-file: {tokens} prompt tokens + {extra} query tokens exceed {source}'s "
                       f"{limit} positions")


def _check_ntk_adapter(staging: Path) -> None:
    """The NTK-attention loader (ntk_attention.NTKAdapter.load) reads the written adapter."""
    try:
        ntk_attention.NTKAdapter.load(staging)
    except BadInput as err:
        raise CheckFailed(f"the written adapter would not load: {err}") from None


def make_prefix_adapter(config: PrefixAdapterConfig, *, progress: Callable[[str], None] | None = None,
                        loaded: tuple | None = None) -> AdapterResult:
    """Prefill the prompt and write its KV cache as a PEFT prefix-tuning adapter.

    Args:
        config: the source, prompt and output (checked when made).
        progress: called with a line before each stage.
        loaded: the (model, tokenizer) of ``config.source`` when already in memory.

    Returns:
        What was written::

            make_prefix_adapter(PrefixAdapterConfig("org/model", "persona.txt", "persona-prefix")).files
    """
    started = time.perf_counter()
    source, prompt_file, output, force = config.source, config.prompt_file, config.output, config.force
    report = progress or (lambda line: None)
    check_output_available(output, force)
    text = read_text(prompt_file, "--prompt-file")
    checkpoint, model, tokenizer = _load(source, prefix.FAMILIES, "prefix adapters", config.device, loaded)
    with checkpoint:
        ids = prompt_ids(tokenizer, text)
        report(f"prefix: prefilling {ids.shape[1]} prompt tokens")
        _check_length(model, ids.shape[1], 1, source)
        embeddings = prefix.prefix_tensors(model, ids)
        geometry = prefix.kv_geometry(model)
        recipe = {"method": "prefix", "source": source, "prompt_file": str(prompt_file),
                  "prompt_sha256": file_sha256(prompt_file)}
        measurements = {"prompt_tokens": ids.shape[1], "adapter_bytes": embeddings.numel() * embeddings.itemsize}
        body = (f"A PEFT prefix-tuning adapter for `{source}` made by [surgery](https://pypi.org/project/surgery/) "
                f"from a {ids.shape[1]}-token prompt: its KV cache (keys after RoPE, positions 0..{ids.shape[1] - 1})"
                ", so that the model with the adapter gives the logits of the model run on prompt + query.\n\n"
                "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(model, ADAPTER_DIR)\n```")
        files = write_adapter(
            output, checkpoint, tensors_file=prefix.WEIGHTS_FILE, tensors={"prompt_embeddings": embeddings},
            files={prefix.CONFIG_FILE: json_bytes(prefix.prefix_config(geometry, ids.shape[1],
                                                                         base_model_reference(source)))},
            recipe=recipe, measurements=measurements, method="prefix-tuning", library="peft",
            title=f"{model_name(source)}: prefix adapter", body=body, force=force,
            check=lambda staging: check_peft(staging, checkpoint.config))
    return AdapterResult(str(output), "prefix", measurements, files, time.perf_counter() - started)


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def make_ntk_adapter(config: NTKAdapterConfig, *, progress: Callable[[str], None] | None = None,
                     loaded: tuple | None = None) -> AdapterResult:
    """An NTK-attention adapter distilled from ``config.prompt_file`` (``exact_tokens`` per layer and KV head kept
    exactly, then for the rest closed form, least squares and at most ``steps`` of validated KL distillation on
    ``queries`` or ``count`` self-generated queries of ``length`` tokens), or trained from noise on ``train_file``
    by next-token loss (``steps`` minibatches of ``batch`` texts).

    Args:
        config: the source, the prompt or task data, the training settings and the output (checked when made).
        progress: called with a line before each stage.
        loaded: the (model, tokenizer) of ``config.source`` when already in memory.

    Returns:
        What was written and the figures measured::

            make_ntk_adapter(NTKAdapterConfig("org/model", "persona-ntk", prompt_file="persona.txt")).measurements
    """
    started = time.perf_counter()
    source, output, prompt_file, train_file = config.source, config.output, config.prompt_file, config.train_file
    queries_file, steps, lr, batch, seed = config.queries, config.steps, config.lr, config.batch, config.seed
    count, length, exact_tokens = config.count, config.length, config.exact_tokens
    least_squares, force, report = config.least_squares, config.force, progress or (lambda line: None)
    check_output_available(output, force)
    text = read_text(prompt_file, "--prompt-file") if prompt_file is not None else None
    checkpoint, model, tokenizer = _load(source, ntk_attention.FAMILIES, "NTK-attention", config.device, loaded)
    with checkpoint:
        recipe = {"method": "ntk", "source": source, "steps": steps, "lr": lr, "batch": batch, "seed": seed}
        settings = {"base_model_name_or_path": base_model_reference(source)}
        if text is not None:
            ids = prompt_ids(tokenizer, text)
            _check_length(model, ids.shape[1], length, source)
            recipe.update(prompt_file=str(prompt_file), prompt_sha256=file_sha256(prompt_file),
                          exact_tokens=exact_tokens, least_squares=least_squares)
            if queries_file is not None:
                queries = file_queries(tokenizer, queries_file, length)
                recipe.update(queries_file=str(queries_file), queries_sha256=file_sha256(queries_file))
            else:
                queries = self_generated_queries(model, ids, count=count, length=length,
                                                 seed=query_seed(seed, TRAINING))
                recipe.update(queries="self-generated", count=count, length=length)
            settings["prompt_tokens"] = ids.shape[1]
            report(f"ntk: distilling {ids.shape[1]} prompt tokens on {len(queries)} queries")
            adapter, measurements = _distil_prompt(model, ids, queries, steps=steps, lr=lr, batch=batch,
                                                   seed=seed, exact_tokens=exact_tokens,
                                                   least_squares=least_squares, config=settings)
        else:
            data = file_queries(tokenizer, train_file, TRAIN_MAX_LENGTH, option="--train-file", special_tokens=True)
            recipe.update(train_file=str(train_file), train_sha256=file_sha256(train_file),
                          max_length=TRAIN_MAX_LENGTH)
            report(f"ntk: training on {len(data)} texts")
            adapter, measurements = _train_on_task(model, data, steps=steps, lr=lr, batch=batch, seed=seed,
                                                   config=settings)
        sizes = ntk.sizes(adapter, settings.get("prompt_tokens"), next(model.parameters()).dtype.itemsize)
        measurements.update(sizes)
        origin = (f"distilled from a {settings['prompt_tokens']}-token prompt" if text is not None
                  else "trained on task data")
        body = (f"An NTK-attention adapter (arXiv 2406.14036) for `{source}`, {origin}, made by "
                "[surgery](https://pypi.org/project/surgery/): per layer and KV head a d×d matrix Z and a "
                "d-vector k that stand in for a prefix of any length"
                + (f", with the {adapter.exact_tokens} prompt tokens that draw the most attention kept exactly"
                   if adapter.exact_tokens else "") + ".\n\n```python\nfrom surgery.adapters import "
                "ntk_attention\nntk_attention.apply(model, ADAPTER_DIR)   # llama, mistral, qwen2\n```")
        files = write_adapter(
            output, checkpoint, tensors_file=ntk_attention.WEIGHTS_FILE, tensors=adapter.tensors(),
            files={ntk_attention.CONFIG_FILE: adapter.config_json()}, recipe=recipe, measurements=measurements,
            method="ntk-attention", title=f"{model_name(source)}: NTK-attention adapter", body=body, force=force,
            check=_check_ntk_adapter)
    return AdapterResult(str(output), "ntk", measurements, files, time.perf_counter() - started)


def _distil_prompt(model, ids: torch.Tensor, queries, *, steps: int, lr: float, batch: int, seed: int,
                   exact_tokens: int, least_squares: bool, config: dict):
    """Exact tokens → closed form → least squares → KL distillation, validated on the last queries (a quarter, at
    most VALIDATION_QUERIES), trained on the others; the KL on (up to MEASURED_QUERIES) training queries after each
    stage."""
    prompt_kv = ntk.prompt_keys_values(model, ids)
    cache, _ = prefill(model, ids)
    reference = with_prompt_logprobs(model, cache, queries, shared=True).half()  # halved: many queries fit
    validated = min(VALIDATION_QUERIES, len(queries) // 4)
    trained = len(queries) - validated
    validation = (queries.subset(torch.arange(trained, len(queries))), reference[trained:])
    queries, reference = queries.subset(torch.arange(trained)), reference[:trained]
    measured = queries.subset(torch.arange(min(MEASURED_QUERIES, len(queries))))
    measured_reference = reference[:len(measured)]
    fitted = queries.subset(torch.arange(min(LEAST_SQUARES_QUERIES, len(queries))))
    exact = ntk.heaviest_prompt_tokens(model, prompt_kv, fitted, exact_tokens) if exact_tokens else None
    adapter = ntk.closed_form(model, prompt_kv, exact, **config)
    kl = {"closed_form": ntk.adapter_kl(model, adapter, measured, measured_reference)}
    if least_squares:
        ntk.least_squares(model, adapter, prompt_kv, fitted)
        kl["least_squares"] = ntk.adapter_kl(model, adapter, measured, measured_reference)
    measurements = {"queries": trained, "validation_queries": validated, "prompt_tokens": ids.shape[1]}
    if steps:
        training = ntk.distill(model, adapter, queries, reference, steps=steps, lr=lr, batch=batch, seed=seed,
                               validation=validation if validated else None)
        kl["distilled"] = ntk.adapter_kl(model, adapter, measured, measured_reference)
        measurements["steps_run"] = len(training.losses)
        if validated:
            measurements.update(validation_kl={"start": _rounded(training.validation[0]),
                                               "kept": _rounded(training.validation[training.kept_step])},
                                kept_step=training.kept_step)
    measurements["train_kl"] = {stage: _rounded(value) for stage, value in kl.items()}
    return adapter, measurements


def _train_on_task(model, data, *, steps: int, lr: float, batch: int, seed: int, config: dict):
    """The paper's start (randn / 1e4), then next-token training on the task texts."""
    adapter = ntk.random_start(model, seed, **config)
    losses = ntk.train_on_data(model, adapter, data, steps=steps, lr=lr, batch=batch, seed=seed, absolute=True).losses
    measurements = {"train_loss_first": _rounded(losses[0]) if losses else None,
                    "train_loss_last": _rounded(losses[-1]) if losses else None, "texts": len(data)}
    return adapter, measurements
