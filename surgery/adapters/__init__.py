"""Prompt adapters: a long prompt turned into an adapter, with a fidelity score.

    from surgery.adapters import evaluate, make_ntk_adapter, make_prefix_adapter

    make_prefix_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "persona.txt", "persona-prefix")   # PEFT format
    make_ntk_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "persona-ntk", prompt_file="persona.txt")
    evaluate("HuggingFaceTB/SmolLM2-135M-Instruct", "persona-ntk", "persona.txt")["kl_adapter"]

- prefix (``prefix.py``): the prompt's KV cache in PEFT's PREFIX_TUNING format; exact by construction.
- NTK-attention (``ntk.py``; run time in :mod:`surgery.extend.ntk_attention`): per layer and KV head a d×d Z and a
  d-vector k, plus the few prompt tokens that draw the most attention kept exactly, made from the prompt (closed
  form, least squares, validated KL distillation) or trained on task data.
- fidelity (``fidelity.py``): next-token KL against the model run with the real prompt, on held-out queries.
"""

from surgery.adapters.fidelity import evaluate
from surgery.adapters.make import make_ntk_adapter, make_prefix_adapter

__all__ = ["evaluate", "make_ntk_adapter", "make_prefix_adapter"]
