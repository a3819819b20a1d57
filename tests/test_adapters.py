"""Prompt adapters: prefix (PEFT loads it) and NTK-attention (math, run-time patch, distillation, fidelity)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model, run_surgery, save_tokenizer
from surgery.extend import ntk_attention
from surgery.extend.ntk_attention import NTKAdapter

PROMPT_WORDS = 48


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    words = random.Random(0)
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(" ".join(f"w{words.randrange(100)}" for _ in range(PROMPT_WORDS)))
    return path


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory):
    """A tiny llama whose larger weights make attention peaked, so that the prompt matters to its predictions."""
    path = tmp_path_factory.mktemp("peaked") / "llama"
    make_tiny_model("llama", seed=3, initializer_range=0.1).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def qwen2_bpe(tmp_path_factory):
    """A tiny qwen2 with a byte-level BPE tokenizer (transformers 5 loads qwen2 tokenizers as Qwen2Tokenizer, which
    cannot read the word-level test tokenizer) and an English prompt it tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("qwen2-bpe")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    make_tiny_model("qwen2", vocab_size=320).save_pretrained(root / "qwen2")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(root / "qwen2")
    prompt = root / "prompt.txt"
    prompt.write_text("You are Marlowe, the librarian. Answer briefly, kindly and precisely; the quick brown fox.")
    return root / "qwen2", prompt


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# --- prefix adapters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_adapter_gives_the_logits_of_prompt_plus_query(tiny_checkpoints, prompt_file, qwen2_bpe, tmp_path,
                                                              family):
    from peft import PeftModel

    source, prompt_file = (tiny_checkpoints["llama"], prompt_file) if family == "llama" else qwen2_bpe
    out = tmp_path / "prefix"
    result = run_surgery("adapter", "prefix", source, "--prompt-file", prompt_file, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] > 10
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_attention_heads"], config["token_dim"]) == ("PREFIX_TUNING", 2, 32)
    assert "base_model_relation: adapter" in (out / "README.md").read_text()
    assert json.loads((out / "surgery.json").read_text())["recipe"]["method"] == "prefix"

    model, tokenizer = load(source)
    prompt = tokenizer(prompt_file.read_text())["input_ids"]
    query = [[5, 17, 33, 2, 60, 7, 81], [9, 9, 41, 3, 12, 70, 44]]
    with torch.no_grad():
        expected = model(torch.tensor([prompt + row for row in query])).logits[:, len(prompt):]
        adapted = PeftModel.from_pretrained(model, out)(input_ids=torch.tensor(query)).logits
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)


# --- NTK-attention: the math ----------------------------------------------------------------------------------


def reference_ntk_attention(q, k, v, z, kk, mask):
    """O = (A V + φ(Q) Z e^−M) / (A·1 + φ(Q)|k| e^−M), A = exp(S − M) masked, S = QKᵀ/√d, M = row max: written
    out head by head in float64, independently of the module."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    for h in range(heads):
        g = h // (heads // kv_heads)
        qh, kh, vh = q[:, h].double(), k[:, g].double(), v[:, g].double()
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(dim)
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        a = torch.exp(scores - row_max)
        phi = F.elu(qh / dim ** 0.25) + 1
        extra = torch.exp(-row_max)
        numerator = a @ vh + (phi @ z[g].double()) * extra
        denominator = a.sum(-1, keepdim=True) + (phi @ kk[g].double().abs())[..., None] * extra
        out[:, h] = numerator / denominator
    return out


class AttentionShape(torch.nn.Module):
    """What transformers' attention functions read from the module that calls them."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("case", ["causal", "decode", "padding"])
def test_ntk_attention_matches_the_formula(case):
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    rows, keys = {"causal": (5, 5), "decode": (1, 6), "padding": (5, 5)}[case]
    q = torch.randn(batch, heads, rows, dim, generator=generator) * 2
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator) * 2
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    z = torch.randn(kv_heads, dim, dim, generator=generator)
    kk = torch.randn(kv_heads, dim, generator=generator)  # signs mixed: the formula uses |k|
    allowed = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)[None, None].repeat(batch, 1, 1, 1)
    if case == "padding":
        allowed[0, :, :, 1] = False  # a masked-out key (padding) in the first sequence
    module = AttentionShape(heads // kv_heads)
    module.ntk_attention = ntk_attention._LayerTerms(NTKAdapter(z[None], kk[None]), 0)
    mask = None if case != "padding" else allowed
    output, _ = ntk_attention.ntk_attention_forward(module, q, k, v, mask, scaling=dim ** -0.5)
    expected = reference_ntk_attention(q, k, v, z, kk, allowed)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, rtol=1e-5, atol=1e-5)


# --- NTK-attention: the run-time patch ------------------------------------------------------------------------


def random_adapter(model, scale: float = 1.0) -> NTKAdapter:
    adapter = NTKAdapter.zeros(model)
    generator = torch.Generator().manual_seed(1)
    adapter.z = torch.randn(adapter.z.shape, generator=generator) * scale
    adapter.k = torch.rand(adapter.k.shape, generator=generator) * scale
    return adapter


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_zero_adapter_changes_nothing_and_remove_restores(family):
    model = make_tiny_model(family)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(ids).logits
        ntk_attention.apply(model, NTKAdapter.zeros(model))
        assert torch.equal(model(ids).logits, original)
        ntk_attention.apply(model, random_adapter(model, 5.0))
        assert not torch.allclose(model(ids).logits, original, atol=1e-3)
        ntk_attention.remove(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, original)


def test_generation_with_cache_equals_recomputation():
    model = make_tiny_model("llama")
    ntk_attention.apply(model, random_adapter(model, 3.0))
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    runs = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           use_cache=cached, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            for cached in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores), rtol=1e-4, atol=1e-4)


def test_shared_prompt_equals_a_repeated_cache():
    """Generation and teacher log-probabilities with the prompt's cache shared by the rows (make's fast path) equal
    those of the cache repeated per row."""
    from contextlib import contextmanager

    from surgery.adapters import prompts

    model = make_tiny_model("llama", seed=3, initializer_range=0.1).eval()
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    queries = prompts.self_generated_queries(model, ids, count=6, length=8, seed=0, chunk=4)
    cache, _ = prompts.prefill(model, ids)
    shared = prompts.with_prompt_logprobs(model, cache, queries, shared=True)
    torch.testing.assert_close(shared, prompts.with_prompt_logprobs(model, cache, queries), rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"

    @contextmanager
    def repeated(model, cache):
        yield None

    original, prompts.shared_prompt = prompts.shared_prompt, repeated
    try:
        again = prompts.self_generated_queries(model, ids, count=6, length=8, seed=0, chunk=4)
    finally:
        prompts.shared_prompt = original
    assert torch.equal(queries.ids, again.ids)


# --- NTK-attention adapters made from a prompt ----------------------------------------------------------------


def test_distilled_ntk_adapter_beats_no_prompt(peaked_llama, prompt_file, tmp_path):
    out = tmp_path / "ntk"
    made = run_surgery("adapter", "ntk", peaked_llama, "--prompt-file", prompt_file, "-o", out, "--steps", "8",
                       "--count", "16", "--length", "16", "--json")
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["train_kl"]["least_squares"] < summary["train_kl"]["closed_form"]
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md", "ntk_attention.safetensors", "ntk_attention_config.json", "surgery.json"]
    assert "base_model_relation: adapter" in (out / "README.md").read_text()

    checked = run_surgery("adapter", "eval", peaked_llama, out, "--prompt-file", prompt_file, "--count", "8",
                          "--length", "16", "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["kind"] == "ntk" and report["positions"] == 8 * 16
    assert report["kl_no_prompt"] > 0.05  # the prompt matters to this model...
    assert report["kl_adapter"] < report["kl_no_prompt"] / 4  # ...and the adapter stands in for most of it
    assert report["top1_adapter"] >= report["top1_no_prompt"]

    model, tokenizer = load(peaked_llama)
    ntk_attention.apply(model, out)  # what users do: the directory straight into the run-time patch
    ntk_attention.remove(model)


def test_prefix_adapter_fidelity_is_exact(tiny_checkpoints, prompt_file, tmp_path):
    out = tmp_path / "prefix"
    assert run_surgery("adapter", "prefix", tiny_checkpoints["llama"], "--prompt-file", prompt_file, "-o",
                       out).returncode == 0
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"text": f"w{i} w{i + 1} w{2 * i} w7 w9"}) for i in range(5)))
    result = run_surgery("adapter", "eval", tiny_checkpoints["llama"], out, "--prompt-file", prompt_file,
                         "--queries", queries, "--json")
    report = json.loads(result.stdout)
    assert report["kind"] == "prefix" and report["queries"] == 5
    assert report["kl_adapter"] < 1e-9 and report["top1_adapter"] == 1.0
    assert report["adapter_bytes"] == report["prompt_kv_cache_bytes"]


def test_same_inputs_and_seed_give_identical_bytes(qwen2_bpe, tmp_path):
    source, prompt_file = qwen2_bpe
    queries = tmp_path / "queries.txt"
    queries.write_text("the lazy dog jumps\n\nover the quick brown fox\n\nthe fox, the dog and the librarian")
    runs = []
    for name in ("a", "b"):
        made = [run_surgery("adapter", "ntk", source, "--prompt-file", prompt_file, "-o", tmp_path / name / "ntk",
                            "--queries", queries, "--steps", "3", "--batch", "2", "--seed", "5"),
                run_surgery("adapter", "prefix", source, "--prompt-file", prompt_file, "-o", tmp_path / name / "pre")]
        assert all(result.returncode == 0 for result in made), [result.stderr for result in made]
        runs.append({path.relative_to(tmp_path / name): path.read_bytes()
                     for path in (tmp_path / name).rglob("*") if path.is_file()})
    assert len(runs[0]) == 8 and runs[0] == runs[1]
    recipe = json.loads(runs[0][Path("ntk/surgery.json")])["recipe"]
    assert recipe["queries_file"] == str(queries) and recipe["seed"] == 5


def test_ntk_trained_on_task_data(tiny_checkpoints, tmp_path):
    data = tmp_path / "task.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * j) % 100}" for j in range(20)) for i in range(12)))
    out = tmp_path / "task-ntk"
    result = run_surgery("adapter", "ntk", tiny_checkpoints["mistral"], "--train-file", data, "-o", out,
                         "--steps", "6", "--batch", "4", "--lr", "0.01", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["texts"] == 12 and summary["train_loss_last"] is not None
    adapter = NTKAdapter.load(out)
    assert adapter.z.abs().max() > 1e-3  # moved away from the randn/1e4 start
    assert json.loads((out / "surgery.json").read_text())["recipe"]["train_file"] == str(data)


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tiny_checkpoints, prompt_file, tmp_path):
    llama, qwen3 = tiny_checkpoints["llama"], tiny_checkpoints["qwen3"]
    deeper = tmp_path / "deeper"
    make_tiny_model("llama", num_hidden_layers=3).save_pretrained(deeper)
    save_tokenizer(deeper)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    ntk_dir = tmp_path / "ntk"
    assert run_surgery("adapter", "ntk", llama, "--prompt-file", prompt_file, "-o", ntk_dir, "--steps", "0",
                       "--count", "4", "--length", "4", "--no-least-squares").returncode == 0
    prefix_dir = tmp_path / "prefix"
    assert run_surgery("adapter", "prefix", llama, "--prompt-file", prompt_file, "-o", prefix_dir).returncode == 0
    cases = {
        ("adapter", "prefix", llama, "--prompt-file", tmp_path / "missing.txt", "-o", tmp_path / "x"): "no such file",
        ("adapter", "ntk", llama, "--prompt-file", empty, "-o", tmp_path / "x"): "the prompt is empty",
        ("adapter", "ntk", tiny_checkpoints["gemma2"], "--prompt-file", prompt_file, "-o", tmp_path / "x"):
            "NTK-attention supports llama, mistral, qwen2",
        ("adapter", "ntk", llama, "-o", tmp_path / "x"): "--prompt-file",
        ("adapter", "ntk", llama, "--train-file", prompt_file, "--queries", prompt_file, "-o", tmp_path / "x"):
            "--queries is for distilling a prompt",
        ("adapter", "ntk", llama, "--prompt-file", prompt_file, "--queries", tmp_path / "none.txt", "-o",
         tmp_path / "x"): "--queries",
        ("adapter", "eval", qwen3, ntk_dir, "--prompt-file", prompt_file): "NTK-attention supports",
        ("adapter", "eval", tiny_checkpoints["mistral"], ntk_dir, "--prompt-file", prompt_file):
            "made for a llama model; this one is mistral",
        ("adapter", "eval", deeper, ntk_dir, "--prompt-file", prompt_file): "made for 2 layers × 2 KV heads",
        ("adapter", "eval", qwen3, prefix_dir, "--prompt-file", prompt_file): "made for 2 layers × 2 KV heads",
        ("adapter", "eval", llama, tmp_path, "--prompt-file", prompt_file): "neither a prefix adapter",
        ("adapter", "prefix", llama, "--prompt-file", prompt_file, "-o", prefix_dir): "already exists",
    }
    for args, message in cases.items():
        result = run_surgery(*args)
        assert result.returncode == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("surgery: error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
    assert not (tmp_path / "x").exists()
