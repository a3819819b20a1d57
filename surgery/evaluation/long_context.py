"""Long-context evaluations that run offline: passkey retrieval and sliding-window perplexity against length.

    from surgery.evaluation import load_model, passkey, perplexity
    model, tokenizer = load_model("smol-16k")
    passkey(model, tokenizer, [4096, 8192], depths=5, seed=0)    # [{"length": 4096, "accuracy": 1.0, ...}, ...]
    perplexity(model, tokenizer, [4096, 8192])                   # default text: see default_text()

Passkey follows the standard prompt (Mohtashami & Jaggi, landmark attention): filler sentences, the key at a given
depth, then "What is the pass key? The pass key is"; the first integer generated greedily must be the key.
"""

from __future__ import annotations

import math
import random
import re

import torch

from surgery.errors import BadInput

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def parse_lengths(text: str) -> list[int]:
    """Token counts from a comma-separated list (k = 1024).

    Args:
        text: e.g. ``"1k,2k,4096"`` (BadInput for anything but positive counts).

    Returns:
        The lengths in tokens.

    Example:
        ``parse_lengths("1k,2k,4096")``   # [1024, 2048, 4096]
    """
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        match = re.fullmatch(r"(\d+)(k?)", part)
        if not match or int(match.group(1)) <= 0:
            raise BadInput(f"--lengths {text!r}: expected comma-separated token counts such as 1k,2k,4096")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return lengths


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids of a passkey prompt of about ``length`` tokens with the key at ``depth``.

    Args:
        tokenizer: the model's tokenizer.
        length: the prompt's length in tokens, about.
        depth: in [0, 1], the share of the filler that comes before the key.
        key: the pass key.

    Returns:
        The ids, [1, tokens].

    Example:
        ``passkey_prompt(tokenizer, 4096, 0.5, 12345).shape[1]``   # about 4096
    """
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    fixed = len(tokenizer(f"{INTRO} {needle} {QUESTION}")["input_ids"])
    per_filler = len(tokenizer(" " + FILLER * 10)["input_ids"]) / 10
    repeats = max(0, int((length - fixed) / per_filler))
    before = round(repeats * depth)
    text = " ".join([INTRO, *[FILLER] * before, needle, *[FILLER] * (repeats - before), QUESTION])
    return torch.tensor([tokenizer(text)["input_ids"]])


@torch.no_grad()
def passkey(model, tokenizer, lengths: list[int], depths: int = 5, seed: int = 0) -> list[dict]:
    """Passkey accuracy per length over ``depths`` evenly spread depths, keys drawn from ``seed``.

    Args:
        model: the loaded causal LM.
        tokenizer: its tokenizer.
        lengths: the prompt lengths, in tokens.
        depths: trials per length, at depths (i + 0.5) / depths.
        seed: the seed of the keys.

    Returns:
        Per length ``{"length", "accuracy", "trials"}``, each trial with its depth, key, answer, correct and tokens.

    Example:
        ``passkey(model, tokenizer, [4096, 8192], depths=5, seed=0)[0]["accuracy"]``
    """
    rng = random.Random(seed)
    results = []
    for length in lengths:
        trials = []
        for index in range(depths):
            depth = (index + 0.5) / depths
            key = rng.randint(10000, 99999)
            ids = passkey_prompt(tokenizer, length, depth, key).to(model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            found = re.search(r"\d+", answer)
            trials.append({"depth": round(depth, 3), "key": key, "answer": answer.strip(),
                           "correct": bool(found) and int(found.group()) == key, "tokens": ids.shape[1]})
        results.append({"length": length, "accuracy": sum(t["correct"] for t in trials) / len(trials),
                        "trials": trials})
    return results


def default_text() -> str:
    """Offline English prose for perplexity: the Python documentation topics in the standard library (``pydoc_data``),
    present on every Python install.

    Returns:
        The topics, in key order, separated by blank lines.

    Example:
        ``perplexity(model, tokenizer, [4096], text=default_text())``
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@torch.no_grad()
def perplexity(model, tokenizer, lengths: list[int], text: str | None = None, stride: int = 256,
               scored_tokens: int = 1024) -> list[dict]:
    """Sliding-window perplexity per window length.

    The first window scores all its tokens, each later one (moved by ``stride``) the ``stride`` new ones, until
    ``length + scored_tokens`` tokens of the text are covered.

    Args:
        model: the loaded causal LM.
        tokenizer: its tokenizer.
        lengths: the window lengths, in tokens.
        text: the text scored (:func:`default_text` when None); BadInput when it is too short for a length.
        stride: tokens each window moves by.
        scored_tokens: tokens covered past the first window.

    Returns:
        Per length ``{"length", "perplexity", "tokens_scored"}``.

    Example:
        ``perplexity(model, tokenizer, [4096, 8192])[0]["perplexity"]``
    """
    ids = tokenizer(text or default_text(), return_tensors="pt")["input_ids"]
    results = []
    for length in lengths:
        end_of_text = length + scored_tokens
        if ids.shape[1] < end_of_text:
            raise BadInput(f"--lengths: the text has {ids.shape[1]} tokens, {end_of_text} needed for length {length}")
        total_nll, counted, previous_end = 0.0, 0, 0
        for begin in range(0, end_of_text - length + 1, stride):
            end = begin + length
            window = ids[:, begin:end].to(model.device)
            labels = window.clone()
            labels[:, : length - (end - previous_end)] = -100  # score only tokens not scored before
            loss = model(window, labels=labels).loss
            scored = int((labels[:, 1:] != -100).sum())
            total_nll += float(loss) * scored
            counted += scored
            previous_end = end
        results.append({"length": length, "perplexity": math.exp(total_nll / counted), "tokens_scored": counted})
    return results
