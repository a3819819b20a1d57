"""Models whose tokenizers differ: embedding rows are matched by token, for the base's, a model's or the union
vocabulary (mergekit's tokenizer_source)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_surgery
from merge_helpers import read_numpy, save_family

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def save_word_tokenizer(directory: Path, tokens: list[str]) -> dict[str, int]:
    """A word-level tokenizer whose ids follow ``tokens``' order; returns token → id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(directory)
    return vocab


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A llama base whose tokenizer knows <unk> w0…w99, and a fine-tune whose tokenizer orders those words backwards
    and adds x0…x9 (both with 160 embedding rows, the rest padding)."""
    base, tuned = save_family(tmp_path_factory.mktemp("vocab"), "llama", 1)
    words = [f"w{i}" for i in range(100)]
    base_ids = save_word_tokenizer(base, ["<unk>", *words])
    tuned_ids = save_word_tokenizer(tuned, ["<unk>", *reversed(words), *[f"x{i}" for i in range(10)]])
    return base, tuned, base_ids, tuned_ids


def test_rows_are_matched_by_token_not_by_id(two_tokenizers, tmp_path):
    base, tuned, base_ids, tuned_ids = two_tokenizers
    result = run_surgery("merge", base, tuned, "--method", "task_arithmetic", "--lambda", "0.5", "--dtype", "float32",
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, b, t = read_numpy(tmp_path / "out"), read_numpy(base), read_numpy(tuned)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == b[name].shape
        for token, row in base_ids.items():
            expected = b[name][row] + 0.5 * (t[name][tuned_ids[token]] - b[name][row])
            np.testing.assert_allclose(merged[name][row], expected, rtol=1e-6, atol=1e-7, err_msg=f"{name} {token}")
        padding = slice(len(base_ids), None)  # past the last token: matched by id
        np.testing.assert_allclose(merged[name][padding], b[name][padding] + 0.5 * (t[name][padding] -
                                   b[name][padding]), rtol=1e-6, atol=1e-7)
    # the base's tokenizer goes with the output
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"] == base_ids


def test_union_vocabulary_adds_the_other_models_tokens(two_tokenizers, tmp_path):
    base, tuned, base_ids, tuned_ids = two_tokenizers
    result = run_surgery("merge", base, tuned, "--method", "ties", "--density", "0.5", "--dtype", "float32",
                         "--tokenizer-source", "union", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    union_ids = tokenizer.get_vocab()
    assert {token: union_ids[token] for token in base_ids} == base_ids  # the base's ids are kept
    new = [f"x{i}" for i in range(10)]
    assert sorted(union_ids[token] for token in new) == list(range(len(base_ids), len(base_ids) + 10))
    assert tokenizer("w5 x3")["input_ids"] == [base_ids["w5"], union_ids["x3"]]
    merged, t = read_numpy(tmp_path / "out"), read_numpy(tuned)
    for name in VOCAB_TENSORS:
        for token in new:  # only the fine-tune knows them: its rows, unchanged (its task vector there is zero)
            np.testing.assert_allclose(merged[name][union_ids[token]], t[name][tuned_ids[token]], rtol=1e-6,
                                       atol=1e-7, err_msg=f"{name} {token}")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().num_embeddings == 160
    assert torch.isfinite(model(torch.tensor([tokenizer("w5 x3")["input_ids"]])).logits).all()


def test_union_beyond_the_embedding_grows_it(tmp_path):
    """When the union has more tokens than the base has rows, the output vocabulary grows to hold them."""
    base, tuned = save_family(tmp_path, "llama", 1)
    save_word_tokenizer(base, ["<unk>", *[f"w{i}" for i in range(150)]])
    tuned_ids = save_word_tokenizer(tuned, ["<unk>", *[f"y{i}" for i in range(20)]])
    result = run_surgery("merge", base, tuned, "--method", "task_arithmetic", "--dtype", "float32",
                         "--tokenizer-source", "union", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 171  # 151 base tokens + 20 new ones
    merged, b, t = read_numpy(tmp_path / "out"), read_numpy(base), read_numpy(tuned)
    embedding = merged["model.embed_tokens.weight"]
    assert embedding.shape[0] == 171
    np.testing.assert_allclose(embedding[151 + 19], t["model.embed_tokens.weight"][tuned_ids["y19"]], rtol=1e-6)
    # "<unk>" is the one token both know: base + its task vector
    expected = t["model.embed_tokens.weight"][0]
    np.testing.assert_allclose(embedding[0], expected, rtol=1e-6, atol=1e-7)
    # w0 is the base's alone: the fine-tune's stand-in is the base's row, so no task vector
    np.testing.assert_allclose(embedding[1], b["model.embed_tokens.weight"][1], rtol=1e-6, atol=1e-7)
