"""`surgery eval length`: greedy answers, accuracy by answer extraction, length, reflection, per difficulty."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import MINI_MAX_NEW_TOKENS, run_surgery

from surgery.evaluation.length import evaluate_length, extract_answer, is_correct, is_reflective, load_tasks


@pytest.mark.parametrize("response, expected", [
    ("so x = 3 and \\boxed{42}. The answer is 7", "42"),
    ("7 + 5 = 12 . the answer is 12 .", "12"),
    ("The answer: 1,234.", "1,234"),
    ("work... #### 56", "56"),
    ("first 3 then 4 then 17 apples", "17"),
    ("the answer is B", "B"),
    ("no digits here", None),
])
def test_answer_extraction(response, expected):
    assert extract_answer(response) == expected


def test_scoring_rules():
    assert is_correct("the answer is 1,234 .", 1234) and is_correct("\\boxed{$5}", "5.0")
    assert not is_correct("the answer is 12 .", "13") and not is_correct("nothing", "3")
    assert is_correct("The answer is b", "B")
    assert is_reflective("Hmm. Wait, that is wrong") and is_reflective("let me double-check : 3 + 4 = 7")
    assert is_reflective("Let me just verify it") and is_reflective("to recap, 5")
    assert not is_reflective("the waiter awaits") and not is_reflective("3 + 4 = 7 . the answer is 7 .")


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """One prompt, no padding, no generate(): argmax over the full-sequence logits, token by token."""
    ids = tokenizer(prompt)["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(torch.tensor([ids + generated])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            generated.append(next_id)
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def _reference_answer(text: str) -> str | None:
    found = re.findall(r"answer is (\d+)", text) or re.findall(r"\d+", text)
    return found[-1] if found else None


def test_batched_answers_equal_one_by_one_greedy_decoding(long_to_short):
    """Batches of prompts of different lengths (left padding) give each prompt's own greedy answer; accuracy,
    length, reflection and the per-difficulty figures follow from those answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = long_to_short / "models" / "system2"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = load_tasks(long_to_short / "tasks.jsonl")[:12]
    expected = [_greedy(model, tokenizer, task["prompt"], MINI_MAX_NEW_TOKENS) for task in tasks]
    # half the tasks are given the answer the model gives, so that accuracy is neither 0 nor 1
    for number, (task, (text, _)) in enumerate(zip(tasks, expected)):
        given = _reference_answer(text)
        if number % 2 and given is not None:
            task["answer"] = given
    report = evaluate_length(model, tokenizer, tasks, max_new_tokens=MINI_MAX_NEW_TOKENS, batch_size=5)
    assert [(row["response"], row["length"]) for row in report["responses"]] == expected
    correct = [_reference_answer(text) == str(task["answer"]) for task, (text, _) in zip(tasks, expected)]
    assert 0 < sum(correct) < len(tasks)
    assert report["accuracy"] == pytest.approx(sum(correct) / len(tasks))
    assert report["mean_length"] == pytest.approx(sum(length for _, length in expected) / len(tasks))
    reflective = ["wait" in text or "double-check" in text for text, _ in expected]
    assert report["reflection_rate"] == pytest.approx(sum(reflective) / len(tasks))
    for level, row in report["by_difficulty"].items():
        members = [i for i, task in enumerate(tasks) if str(task["difficulty"]) == level]
        assert row["count"] == len(members)
        assert row["accuracy"] == pytest.approx(sum(correct[i] for i in members) / len(members))
    assert set(report["by_difficulty"]) == {"1", "2", "3", "4"}


def test_sampled_first_tokens_follow_the_tempered_softmax(long_to_short):
    """With --temperature T every response is a draw from softmax(logits / T): over 600 one-token samples of one
    prompt, each token's frequency is within 4.5 standard errors of its probability computed here from a forward
    pass; the same seed repeats the samples exactly, another seed does not, and the caller's RNG is untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = long_to_short / "models" / "base"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_tasks(long_to_short / "tasks.jsonl")[1]
    temperature, samples = 2.0, 600
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(task["prompt"])["input_ids"]])).logits[0, -1].double()
    probability = torch.softmax(logits / temperature, dim=-1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    report = evaluate_length(model, tokenizer, [task], max_new_tokens=1, temperature=temperature, samples=samples,
                             seed=7, batch_size=4)
    assert torch.rand(1) == before  # fork_rng: the global stream goes on as if nothing had been sampled
    assert report["count"] == samples and report["samples"] == samples and len(report["responses"]) == samples
    # what each token comes back as: (length, text); special tokens other than <eos> decode to ""
    outcome = [(0, "") if token == tokenizer.eos_token_id else (1, tokenizer.decode([token], skip_special_tokens=True))
               for token in range(len(probability))]
    expected = {}
    for token, key in enumerate(outcome):
        expected[key] = expected.get(key, 0.0) + float(probability[token])
    seen = {}
    for row in report["responses"]:
        seen[(row["length"], row["response"])] = seen.get((row["length"], row["response"]), 0) + 1
    assert set(seen) <= set(expected)
    assert max(expected.values()) < 0.9  # a spread distribution, so that the test can tell sampling from greedy
    for key, chance in expected.items():
        error = (chance * (1 - chance) / samples) ** 0.5 + 1e-3
        assert abs(seen.get(key, 0) / samples - chance) <= 4.5 * error, (key, seen.get(key, 0), chance)
    again = evaluate_length(model, tokenizer, [task], max_new_tokens=1, temperature=temperature, samples=samples,
                            seed=7, batch_size=4)
    other = evaluate_length(model, tokenizer, [task], max_new_tokens=1, temperature=temperature, samples=samples,
                            seed=8, batch_size=4)
    assert again["responses"] == report["responses"] and other["responses"] != report["responses"]


def test_sampling_at_a_tiny_temperature_is_greedy_and_rates_average_the_samples(long_to_short):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = long_to_short / "models" / "system2"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = load_tasks(long_to_short / "tasks.jsonl")[:6]
    greedy = evaluate_length(model, tokenizer, tasks, max_new_tokens=MINI_MAX_NEW_TOKENS)
    cold = evaluate_length(model, tokenizer, tasks, max_new_tokens=MINI_MAX_NEW_TOKENS, temperature=1e-4, samples=3)
    assert [(row["task"], row["sample"]) for row in cold["responses"]] == [(t, s) for t in range(6) for s in range(3)]
    assert [row["response"] for row in cold["responses"]] == [row["response"] for row in greedy["responses"]
                                                              for _ in range(3)]
    hot = evaluate_length(model, tokenizer, tasks, max_new_tokens=MINI_MAX_NEW_TOKENS, temperature=1.5, samples=4)
    rows = hot["responses"]
    assert hot["accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / 24)
    assert hot["mean_length"] == pytest.approx(sum(row["length"] for row in rows) / 24)
    for level, figures in hot["by_difficulty"].items():
        members = [row for row in rows if str(row["difficulty"]) == level]
        assert figures["count"] == len(members) == 4 * sum(str(t["difficulty"]) == level for t in tasks)


def test_command_line_report_and_responses_file(long_to_short, tmp_path):
    responses = tmp_path / "responses.jsonl"
    model = long_to_short / "models" / "base"
    result = run_surgery("eval", "length", model, "--tasks", long_to_short / "tasks.jsonl", "--limit", "8",
                         "--max-new-tokens", "24", "--responses", responses, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 8 and report["max_new_tokens"] == 24 and report["chat_template"] is False
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 8
    assert report["accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / 8)
    assert report["truncated_rate"] == pytest.approx(sum(row["length"] >= 24 for row in rows) / 8)
    text = run_surgery("eval", "length", model, "--tasks", long_to_short / "tasks.jsonl", "--limit", "4",
                       "--max-new-tokens", "8")
    assert text.returncode == 0 and "accuracy" in text.stdout and "difficulty 1" in text.stdout


def test_bad_task_files_are_one_line_errors(long_to_short, tmp_path):
    model = long_to_short / "models" / "base"
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text('{"prompt": "a", "answer": 1}\n{oops\n')
    no_answer = tmp_path / "no-answer.jsonl"
    no_answer.write_text('{"prompt": "a"}\n')
    cases = {(model, "--tasks", not_json): "line 2 is not JSON",
             (model, "--tasks", no_answer): "line 1 needs a string \"prompt\" and an \"answer\"",
             (model, "--tasks", tmp_path / "missing.jsonl"): "cannot read it",
             (tmp_path / "no-model", "--tasks", long_to_short / "tasks.jsonl"): "no such file or directory",
             (model, "--tasks", no_answer, "--max-new-tokens", "0"): "--max-new-tokens",
             (model, "--tasks", no_answer, "--samples", "4"): "more than one sample needs a temperature above 0",
             (model, "--tasks", no_answer, "--temperature", "-1"): "--temperature -1 --samples 1"}
    for args, message in cases.items():
        result = run_surgery("eval", "length", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
