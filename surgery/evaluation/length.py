"""Accuracy against response length: answers to a JSONL task file (greedy, or sampled N times per task at a
temperature), scored the way the long-to-short study (arXiv 2503.20641) scores them::

    from surgery.evaluation import load_model
    from surgery.evaluation.length import evaluate_length, load_tasks
    model, tokenizer = load_model("merged")
    report = evaluate_length(model, tokenizer, load_tasks("tasks.jsonl"), max_new_tokens=512)
    report["accuracy"], report["mean_length"], report["reflection_rate"], report["by_difficulty"]
    sampled = evaluate_length(model, tokenizer, tasks, temperature=0.7, samples=8, seed=0)   # rates, not thresholds

Each task line is ``{"prompt": ..., "answer": ...}`` with an optional ``"difficulty"`` (any label; the report breaks
the figures down by it). Length is the number of tokens generated before the end-of-sequence token. A response is
*reflective* when it contains one of the study's keywords (wait, re-examine, double-check, let me check, recap,
let me just verify, let me just check). The answer is read from the response: the last ``\\boxed{...}``, else the
last "answer is X" / "answer: X", else the last "#### X", else the last number; numbers compare numerically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from surgery.errors import BadInput

REFLECTION_KEYWORDS = ("wait", "re-examine", "double-check", "let me check", "recap", "let me just verify",
                       "let me just check")
_REFLECTION = re.compile(r"\b(" + "|".join(re.escape(word) for word in REFLECTION_KEYWORDS) + r")\b", re.IGNORECASE)
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_PATTERNS = [re.compile(r"\\boxed\{([^{}]*)\}"),
                    re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(" + _NUMBER + r"|\S+)", re.IGNORECASE),
                    re.compile(r"####\s*(\S+)"),
                    re.compile(r"(" + _NUMBER + r")")]


def load_tasks(path: str | Path, option: str = "--tasks") -> list[dict]:
    """The tasks of a JSONL file; every line needs ``prompt`` (a string) and ``answer``.

    Args:
        path: the JSONL file (blank lines are skipped).
        option: the command-line option that named it, for the error message.

    Returns:
        One dict per task line, as written (BadInput when there is none).

    Example:
        ``load_tasks("tasks.jsonl")[0]["prompt"]``
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{option} {path}: cannot read it ({err.__class__.__name__})") from None
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"{option} {path}: line {number} is not JSON") from None
        if not isinstance(task, dict) or not isinstance(task.get("prompt"), str) or "answer" not in task:
            raise BadInput(f"{option} {path}: line {number} needs a string \"prompt\" and an \"answer\"")
        tasks.append(task)
    if not tasks:
        raise BadInput(f"{option} {path}: no tasks in the file")
    return tasks


def extract_answer(text: str) -> str | None:
    """The answer a response gives (see the module docstring), or None.

    Args:
        text: the response.

    Returns:
        The last ``\\boxed{...}``, else the last "answer is X", else the last "#### X", else the last number
        (stripped of a final "."); None when there is none of them.

    Example:
        ``extract_answer("so the answer is 42.")``   # "42"
    """
    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].strip().rstrip(".")
    return None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def is_correct(response: str, answer) -> bool:
    """Whether the answer read from ``response`` is ``answer``: numerically when both are numbers, else as text
    (case-insensitive).

    Args:
        response: the model's response.
        answer: the task's answer (any JSON value).

    Returns:
        True when they agree; False, too, when the response gives no answer.

    Example:
        ``is_correct("The answer is 1,000.", 1000)``   # True
    """
    given = extract_answer(response)
    if given is None:
        return False
    given_number, expected_number = _as_number(given), _as_number(str(answer))
    if given_number is not None and expected_number is not None:
        return abs(given_number - expected_number) < 1e-6
    return given.strip().lower() == str(answer).strip().lower()


def is_reflective(response: str) -> bool:
    """Whether ``response`` contains one of the study's reflection keywords (REFLECTION_KEYWORDS, case-insensitive).

    Args:
        response: the model's response.

    Returns:
        True when it does.

    Example:
        ``is_reflective("Wait, let me re-examine that.")``   # True
    """
    return _REFLECTION.search(response) is not None


def check_sampling(temperature: float, samples: int) -> None:
    """BadInput unless ``temperature`` ≥ 0 and ``samples`` ≥ 1, more than one only when sampling.

    Args:
        temperature: 0 (greedy) or the sampling temperature.
        samples: answers per task.

    Example: ``check_sampling(0.7, 8)``
    """
    if not temperature >= 0 or samples < 1 or (samples > 1 and temperature == 0):
        raise BadInput(f"--temperature {temperature:g} --samples {samples}: the temperature must be at least 0 and "
                       "--samples at least 1; more than one sample needs a temperature above 0 (greedy answers "
                       "repeat)")


def _prompt_text(tokenizer, prompt: str, chat_template: bool) -> str:
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def _generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                        chat_template: bool, temperature: float = 0.0, samples: int = 1,
                        seed: int = 0) -> list[list[tuple[str, int]]]:
    """``samples`` responses per prompt (greedy when ``temperature`` is 0, else sampled from the whole softmax at
    that temperature, seeded), and the number of tokens each generated before end-of-sequence, in the order given.
    Prompts are batched by length (left padding) so that padding is short; the same batch size and seed give the
    same samples."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(_prompt_text(tokenizer, p, chat_template), add_special_tokens=not chat_template)["input_ids"]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    decoding = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples)
                if temperature > 0 else dict(do_sample=False))
    results: list[list[tuple[str, int]] | None] = [None] * len(prompts)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, pad_token_id=pad, **decoding)
            output = output.view(len(chunk), -1, output.shape[-1])  # (prompt, sample, tokens)
            for row, i in enumerate(chunk):
                results[i] = []
                for generated in output[row, :, width:].tolist():
                    length = generated.index(eos) if eos in generated else len(generated)
                    results[i].append((tokenizer.decode(generated[:length], skip_special_tokens=True), length))
    return results


def _summarise(rows: list[dict]) -> dict:
    """Accuracy, mean length and reflection rate of scored rows (``correct``, ``length``, ``reflective``)."""
    count = len(rows)
    return {"count": count,
            "accuracy": sum(row["correct"] for row in rows) / count,
            "mean_length": sum(row["length"] for row in rows) / count,
            "reflection_rate": sum(row["reflective"] for row in rows) / count,
            "truncated_rate": sum(row["truncated"] for row in rows) / count}


def evaluate_length(model, tokenizer, tasks: list[dict], *, max_new_tokens: int = 512, batch_size: int = 16,
                    chat_template: bool | None = None, temperature: float = 0.0, samples: int = 1,
                    seed: int = 0) -> dict:
    """Answers to ``tasks`` scored for accuracy, length and reflection, overall and per difficulty: greedy by
    default, or ``samples`` answers per task sampled at ``temperature`` (seeded), so that the figures are rates
    over the samples rather than one decision per task.

    Args:
        model: the loaded causal LM.
        tokenizer: its tokenizer.
        tasks: from :func:`load_tasks`.
        max_new_tokens: the most tokens generated per response (a response that long counts as truncated).
        batch_size: prompts generated together.
        chat_template: wrap each prompt in the tokenizer's chat template; None: when it has one.
        temperature: 0 for greedy decoding, else the sampling temperature (no top-k / top-p cut).
        samples: responses per task (more than 1 only when sampling).
        seed: the sampling seed (the same seed, tasks and batch size give the same samples).

    Returns:
        ``count`` (responses), ``accuracy``, ``mean_length``, ``reflection_rate``, ``truncated_rate``,
        ``by_difficulty`` (the same figures per level), ``max_new_tokens``, ``chat_template``, ``temperature``,
        ``samples``, ``seed`` and ``responses`` (every response with its score, in task order, samples together).

    Example:
        ``evaluate_length(model, tokenizer, load_tasks("tasks.jsonl"), temperature=0.7, samples=4)["accuracy"]``
    """
    check_sampling(temperature, samples)
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    generated = _generate_responses(model, tokenizer, [task["prompt"] for task in tasks],
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template,
                                    temperature=temperature, samples=samples, seed=seed)
    rows = []
    for number, (task, responses) in enumerate(zip(tasks, generated)):
        for sample, (response, length) in enumerate(responses):
            rows.append({"task": number, **({"sample": sample} if samples > 1 else {}),
                         "difficulty": task.get("difficulty"), "answer": task["answer"], "response": response,
                         "length": length, "truncated": length >= max_new_tokens,
                         "correct": is_correct(response, task["answer"]), "reflective": is_reflective(response)})
    report = _summarise(rows)
    levels = sorted({row["difficulty"] for row in rows if row["difficulty"] is not None}, key=str)
    report["by_difficulty"] = {str(level): _summarise([row for row in rows if row["difficulty"] == level])
                               for level in levels}
    report.update(max_new_tokens=max_new_tokens, chat_template=chat_template, temperature=temperature,
                  samples=samples, seed=seed, responses=rows)
    return report


def write_responses(path: str | Path, rows: list[dict]) -> None:
    """Every scored response as a JSONL file, written atomically.

    Args:
        path: the file to write.
        rows: the scored responses (the ``responses`` of :func:`evaluate_length`).

    Example:
        ``write_responses("responses.jsonl", report["responses"])``
    """
    from surgery.io.writer import write_file_atomic

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_file_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
