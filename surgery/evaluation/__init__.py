"""Offline evaluations: passkey retrieval and perplexity against length (``long_context``), accuracy against
response length (``length``), and the accuracy / length plots (``plots``); ``model`` loads what they evaluate::

    from surgery.evaluation import load_model, passkey, perplexity
    model, tokenizer = load_model("smol-16k")
    passkey(model, tokenizer, [4096, 8192], depths=5, seed=0)

    from surgery.evaluation.length import evaluate_length, load_tasks
    evaluate_length(model, tokenizer, load_tasks("tasks.jsonl"), max_new_tokens=512)["accuracy"]
"""

from surgery.evaluation.long_context import (FILLER, INTRO, QUESTION, default_text, parse_lengths, passkey,
                                             passkey_prompt, perplexity)
from surgery.evaluation.model import load_model

__all__ = ["FILLER", "INTRO", "QUESTION", "default_text", "load_model", "parse_lengths", "passkey", "passkey_prompt",
           "perplexity"]
