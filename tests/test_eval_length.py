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
             (model, "--tasks", no_answer, "--max-new-tokens", "0"): "--max-new-tokens"}
    for args, message in cases.items():
        result = run_surgery("eval", "length", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
