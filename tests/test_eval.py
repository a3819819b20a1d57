"""Offline long-context evaluations on the real SmolLM2-135M: passkey prompts and retrieval, sliding-window
perplexity against a direct log-softmax computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_surgery
from surgery.errors import BadInput
from surgery.evaluation import FILLER, default_text, load_model, parse_lengths, passkey, passkey_prompt, perplexity


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(str(smollm2_gguf))


def test_parse_lengths():
    assert parse_lengths("1k, 2K,300") == [1024, 2048, 300]
    with pytest.raises(BadInput, match="--lengths '1k,x'"):
        parse_lengths("1k,x")


@pytest.mark.parametrize("length,depth", [(512, 0.1), (1024, 0.5), (2048, 0.9)])
def test_passkey_prompt_has_the_length_and_depth_asked(smollm2, length, depth):
    _, tokenizer = smollm2
    ids = passkey_prompt(tokenizer, length, depth, 12345)[0].tolist()
    assert abs(len(ids) - length) <= 32
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("What is the pass key? The pass key is")
    before = text[: text.index("The pass key is 12345")]
    assert abs(before.count(FILLER) / text.count(FILLER) - depth) < 0.02  # depth: the share of filler before it


def test_passkey_retrieval_within_the_trained_length(smollm2):
    model, tokenizer = smollm2
    result = passkey(model, tokenizer, [512], depths=3, seed=1)
    assert [trial["correct"] for trial in result[0]["trials"]] == [True, True, True], result


def test_sliding_window_perplexity_matches_log_softmax(smollm2):
    model, tokenizer = smollm2
    length, stride, extra = 128, 64, 128
    got = perplexity(model, tokenizer, [length], stride=stride, scored_tokens=extra)[0]
    ids = tokenizer(default_text(), return_tensors="pt")["input_ids"][0, : length + extra]
    # independent: every token after the first is predicted by a window ending at it that starts on a stride
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, extra + 1, stride):
            window = ids[begin: begin + length]
            log_probs = torch.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
            first_new = 1 if begin == 0 else length - stride
            for position in range(first_new, length):
                nll -= float(log_probs[position - 1, window[position]])
                count += 1
    assert got["tokens_scored"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert 2 < got["perplexity"] < 60  # real text through a real model


def test_eval_command(smollm2_gguf):
    result = run_surgery("eval", "passkey", smollm2_gguf, "--lengths", "256", "--depths", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["passkey"][0]["accuracy"] == 1.0


def test_perplexity_needs_enough_text(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(BadInput, match="the text has 113108 tokens, 205824 needed for length 204800"):
        perplexity(model, tokenizer, [204800])
