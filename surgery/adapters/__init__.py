"""Prompt adapters: a long prompt turned into an adapter, with a fidelity score.

    from surgery.adapters import (AdapterEvalConfig, NTKAdapterConfig, PrefixAdapterConfig, evaluate,
                                  make_ntk_adapter, make_prefix_adapter)

    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    make_prefix_adapter(PrefixAdapterConfig(model, "persona.txt", "persona-prefix"))         # PEFT format
    make_ntk_adapter(NTKAdapterConfig(model, "persona-ntk", prompt_file="persona.txt"))
    evaluate(AdapterEvalConfig(model, "persona-ntk", "persona.txt")).kl_adapter

- prefix (``prefix.py``): the prompt's KV cache in PEFT's PREFIX_TUNING format; exact by construction.
- NTK-attention (``ntk.py``; run time in ``ntk_attention.py``): per layer and KV head a d×d Z and a
  d-vector k, plus the few prompt tokens that draw the most attention kept exactly, made from the prompt (closed
  form, least squares, validated KL distillation) or trained on task data.
- fidelity (``fidelity.py``): next-token KL against the model run with the real prompt, on held-out queries.
- ``config.py``: the commands' frozen configs and typed results; ``prompts.py``: prompt and query files, prefill.

Sampling, next-token KL and the KV-cache keyword shim come from the model runtime, :mod:`surgery.runtime`.
"""

from surgery.adapters.config import AdapterEvalConfig, AdapterResult, Fidelity, NTKAdapterConfig, PrefixAdapterConfig
from surgery.adapters.fidelity import evaluate
from surgery.adapters.make import make_ntk_adapter, make_prefix_adapter

__all__ = ["AdapterEvalConfig", "AdapterResult", "Fidelity", "NTKAdapterConfig", "PrefixAdapterConfig", "evaluate",
           "make_ntk_adapter", "make_prefix_adapter"]
