"""``--imatrix``: a data-free importance matrix (GGUF, compressed-tensors, GPTQ), from text the model writes itself.

llama.cpp's ``llama-imatrix`` runs the model over a calibration file and records, for every matrix multiplication,
the mean squared activation of each input column; ``llama-quantize --imatrix`` then searches each block's scales to
lower Σ importance · (x − x̂)² instead of the plain error (kquants.py does the same for GGUF's blocks,
weighted_grid.py for the integer grids of compressed-tensors and GPTQ). Here no file
is needed: the full-precision model samples ``sequences`` sequences of ``length`` tokens (a uniformly random start
token, ``greedy_tokens`` greedy tokens, then temperature 1: selfcal's pool, seeded by ``--seed``), and the streaming
runtime runs them through one decoder layer at a time, summing x² per input column of every quantized Linear::

    from surgery.quantize.imatrix import importance_matrix, resolve
    importance, report = importance_matrix(ckpt, ["model.layers.0.mlp.down_proj", ...], resolve(None), seed=0)
    importance["model.layers.0.mlp.down_proj"].shape     # (intermediate_size,), float32: mean x² per column

Parameters (the resolved values are recorded in surgery.json) and defaults:

=================  =======  ================================================================================
sequences          8        sequences generated (``--calibration-sequences``; 8, 16 and 32 measured the same KL)
length             256      tokens per sequence (start token included)
greedy_tokens      4        greedy tokens after the random start token
chunk              8        sequences run through a layer at once
=================  =======  ================================================================================

Generating loads the whole model once (float32), as selfcal's pool does; the statistics then need one decoder
layer and the pool's hidden states, and a quantized lm_head its input (the final norm's output; the head itself is
not run). Other modules outside the decoder layers' Linears (fused MoE experts) get no importance and are quantized
as without one. Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import logging
import time

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint
from surgery.runtime import LayerStream, input_hooks

log = logging.getLogger(__name__)

DEFAULTS = {"sequences": 8, "length": 256, "greedy_tokens": 4, "chunk": 8}


def resolve(given: dict | None) -> dict:
    """The full parameter set: ``given`` over :data:`DEFAULTS` (a None value keeps the default), checked.

    Args:
        given: the parameters set, or None for all defaults.

    Returns:
        Every parameter of :data:`DEFAULTS`.

    Example: ``resolve({"sequences": 8})["length"]   # 256``
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise BadInput(f"--imatrix: unknown parameter {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    params = {**DEFAULTS, **{key: value for key, value in given.items() if value is not None}}
    for key in ("sequences", "length", "chunk"):
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            raise BadInput(f"--imatrix: {key} {params[key]!r} must be a positive integer")
    if params["length"] < 2 or not 0 <= params["greedy_tokens"] < params["length"]:
        raise BadInput("--imatrix: length must be at least 2 and greedy_tokens between 0 and length − 1")
    return params


@torch.no_grad()
def importance_matrix(ckpt: Checkpoint, modules: list[str], params: dict,
                      seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean x² per input column of each of ``modules`` over self-generated text.

    Args:
        ckpt: the full-precision checkpoint (with a config.json: the model is built from it).
        modules: Linear module names (as transformers' model names them) to measure.
        params: the resolved parameters (:func:`resolve`).
        seed: the seed of the generated text.

    Returns:
        ``(importance, report)``: module → float32 (in_features,) for every module inside the decoder layers and
        the lm_head, and
        ``{"sequences", "tokens", "modules"}`` for the manifest.

    Example::

        importance, report = importance_matrix(ckpt, ["model.layers.0.mlp.up_proj"], resolve(None), 0)
    """
    from surgery.quantize.selfcal import generate_pool

    if not ckpt.config:
        raise BadInput(f"{ckpt.source}: --imatrix needs a config.json to build the model")
    started = time.perf_counter()
    wanted = set(modules)
    torch.set_flush_denormal(True)  # subnormal activations slow CPU matmuls tenfold (tiny random models hit them)
    try:
        pool = generate_pool(ckpt, {"candidates": params["sequences"], "length": params["length"],
                                    "greedy_tokens": params["greedy_tokens"]}, seed)
        stream = LayerStream(ckpt, params["chunk"])
        hidden, kwargs = stream.layer_inputs(pool)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def accumulate(name: str):
            def add(inputs: torch.Tensor) -> None:
                x = inputs.reshape(-1, inputs.shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            return add

        for index, _ in stream.each_layer():
            linears = [name for name in stream.linears(index) if name in wanted]
            with input_hooks(stream.model, {name: accumulate(name) for name in linears}):
                hidden = [stream.run(index, h, kwargs[c]) for c, h in enumerate(hidden)]
        head = stream.names.get(id(stream.head)) if stream.head is not None else None
        if head in wanted:  # a quantized lm_head: its input is the final norm's output
            for ids, h in zip(stream.chunks(pool), hidden):
                accumulate(head)(stream.head_inputs(ids, h))
    finally:
        torch.set_flush_denormal(False)
    importance = {name: (sums[name] / counts[name]).float() for name in sums}
    report = {"sequences": params["sequences"], "tokens": int(pool.numel()), "modules": len(importance)}
    log.info("imatrix: %d modules from %d self-generated tokens in %.1f s", len(importance), pool.numel(),
             time.perf_counter() - started)
    return importance, report


__all__ = ["DEFAULTS", "importance_matrix", "resolve"]
