"""Prompt adapters: prefix (PEFT loads it) and NTK-attention (math, run-time patch, distillation, fidelity)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model, run_surgery, save_tokenizer
from surgery.adapters import ntk_attention
from surgery.adapters.ntk_attention import NTKAdapter
from surgery.runtime import cache_kwargs

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


@pytest.mark.parametrize("case", ["causal", "decode", "padding", "exact"])
def test_ntk_attention_matches_the_formula(case):
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    rows, keys = {"causal": (5, 5), "decode": (1, 6), "padding": (5, 5), "exact": (5, 5)}[case]
    q = torch.randn(batch, heads, rows, dim, generator=generator) * 2
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator) * 2
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    z = torch.randn(kv_heads, dim, dim, generator=generator)
    kk = torch.randn(kv_heads, dim, generator=generator)  # signs mixed: the formula uses |k|
    allowed = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)[None, None].repeat(batch, 1, 1, 1)
    if case == "padding":
        allowed[0, :, :, 1] = False  # a masked-out key (padding) in the first sequence
    adapter = NTKAdapter(z[None], kk[None])
    expected_keys, expected_values = k, v
    if case == "exact":  # 3 tokens kept exactly: keys every row of every sequence sees, ahead of its own
        exact_k = torch.randn(kv_heads, 3, dim, generator=generator) * 2
        exact_v = torch.randn(kv_heads, 3, dim, generator=generator)
        adapter.exact_keys, adapter.exact_values = exact_k[None], exact_v[None]
        adapter.exact_index = torch.arange(3).expand(1, kv_heads, 3)
        expected_keys = torch.cat([exact_k[None].expand(batch, -1, -1, -1), k], dim=2)
        expected_values = torch.cat([exact_v[None].expand(batch, -1, -1, -1), v], dim=2)
        allowed = torch.cat([torch.ones(batch, 1, rows, 3, dtype=torch.bool), allowed], dim=-1)
    module = AttentionShape(heads // kv_heads)
    module.ntk_attention = ntk_attention._LayerTerms(adapter, 0)
    mask = None if case != "padding" else allowed
    output, _ = ntk_attention.ntk_attention_forward(module, q, k, v, mask, scaling=dim ** -0.5)
    expected = reference_ntk_attention(q, expected_keys, expected_values, z, kk, allowed)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, rtol=1e-5, atol=1e-5)


def test_least_squares_solve_matches_a_bounded_solver():
    """_joint_solve (Z eliminated, NNLS on k) against scipy's bounded least squares on the stacked system:
    every (row, column) residual aᵀZ_c − out_c aᵀk − t_c, Z free and k ≥ 0."""
    from scipy.optimize import lsq_linear

    from surgery.adapters.ntk import _joint_solve

    generator = torch.Generator().manual_seed(0)
    rows, dim, columns = 200, 5, 3
    a = torch.rand(rows, dim, generator=generator, dtype=torch.float64)
    out = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    t = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    design = torch.zeros(rows * columns, dim * columns + dim, dtype=torch.float64)
    for c in range(columns):
        design[c::columns, c:dim * columns:columns] = a  # Z[:, c], Z stored row-major as [dim, columns]
        design[c::columns, dim * columns:] = -out[:, c:c + 1] * a
    bounded = lsq_linear(design.numpy(), t.flatten().numpy(), tol=1e-12,
                         bounds=([-np.inf] * (dim * columns) + [0] * dim, [np.inf] * (dim * columns + dim)))
    assert bounded.x[dim * columns:].min() < 1e-12  # the bound is active: NNLS matters
    z, k = _joint_solve(a, out, t)
    np.testing.assert_allclose(z.flatten().numpy(), bounded.x[:dim * columns], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(k.numpy(), bounded.x[dim * columns:], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("exact_tokens", ["0", "16"])
def test_distilled_ntk_adapter_beats_no_prompt(peaked_llama, prompt_file, tmp_path, exact_tokens):
    out = tmp_path / "ntk"
    made = run_surgery("adapter", "ntk", peaked_llama, "--prompt-file", prompt_file, "-o", out, "--steps", "8",
                       "--count", "16", "--length", "16", "--exact-tokens", exact_tokens, "--json")
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


def test_distillation_keeps_the_values_with_the_lowest_validation_kl(peaked_llama, prompt_file):
    """Validated distillation restores the best values seen (checked by recomputing their KL) and stops once the
    validation KL has not fallen for two checks; a far too large learning rate makes it keep the start."""
    from surgery.adapters import ntk, prompts

    model, tokenizer = load(peaked_llama)
    ids = prompts.prompt_ids(tokenizer, prompt_file.read_text())
    queries = prompts.self_generated_queries(model, ids, count=24, length=8, seed=0)
    reference = prompts.with_prompt_logprobs(model, prompts.prefill(model, ids)[0], queries)
    prompt_kv = ntk.prompt_keys_values(model, ids)
    train, held = queries.subset(torch.arange(16)), queries.subset(torch.arange(16, 24))
    for lr, steps in ((1e-2, 30), (5.0, 200)):
        adapter = ntk.closed_form(model, prompt_kv)
        ntk.least_squares(model, adapter, prompt_kv, train)
        start = adapter.z.clone(), adapter.k.clone()
        training = ntk.distill(model, adapter, train, reference[:16], steps=steps, lr=lr, batch=4, seed=0,
                               validation=(held, reference[16:]))
        assert training.kept_step == min(training.validation, key=training.validation.get)
        assert ntk.adapter_kl(model, adapter, held, reference[16:]) == pytest.approx(
            training.validation[training.kept_step], rel=1e-5)
        run = len(training.losses)
        assert sorted(training.validation) == sorted(set(range(0, run + 1, 25)) | {run})  # start, every 25, end
    assert training.kept_step == 0 and len(training.losses) == 50  # stopped after two checks without progress
    assert torch.equal(adapter.z, start[0]) and torch.equal(adapter.k, start[1])


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


def test_exact_tokens_are_those_that_draw_the_most_attention(peaked_llama, prompt_file):
    """heaviest_prompt_tokens against the attention probabilities transformers' eager path returns for queries run
    after the real prompt, summed over the query heads of each KV head and over the query positions."""
    from surgery.adapters import ntk, prompts

    model, tokenizer = load(peaked_llama)
    ids = prompts.prompt_ids(tokenizer, prompt_file.read_text())
    queries = prompts.self_generated_queries(model, ids, count=4, length=6, seed=0)
    chosen = ntk.heaviest_prompt_tokens(model, ntk.prompt_keys_values(model, ids), queries, 5)

    model.set_attn_implementation("eager")
    cache, _ = prompts.prefill(model, ids)
    cache = prompts.expanded(cache, len(queries))
    m, n = ids.shape[1], queries.ids.shape[1]
    with torch.no_grad():
        attentions = model(queries.ids, position_ids=torch.arange(m, m + n)[None].expand(len(queries), n),
                           output_attentions=True, **cache_kwargs(model, cache)).attentions
    kv_heads = model.config.num_key_value_heads
    for layer, probabilities in enumerate(attentions):  # [batch, heads, n, m + n]
        drawn = probabilities[..., :m].sum((0, 2)).reshape(kv_heads, -1, m).sum(1)
        expected = drawn.topk(5, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(chosen[layer], expected), layer


def test_ntk_adapter_keeping_every_prompt_token_is_the_prompt(peaked_llama, prompt_file, tmp_path):
    """With every prompt token kept exactly the adapter is the prompt itself (Z and k then stand for nothing):
    its keys sit at the right positions and its merge with the queries' own attention is exact."""
    out = tmp_path / "ntk-all"
    made = run_surgery("adapter", "ntk", peaked_llama, "--prompt-file", prompt_file, "-o", out, "--steps", "0",
                       "--count", "8", "--length", "8", "--exact-tokens", "1000", "--json")
    assert made.returncode == 0, made.stderr
    adapter = NTKAdapter.load(out)
    assert adapter.exact_tokens == json.loads(made.stdout)["prompt_tokens"] > 40
    assert adapter.z.abs().max() == 0 and adapter.k.abs().max() == 0
    assert json.loads((out / "ntk_attention_config.json").read_text())["exact_tokens"] == adapter.exact_tokens
    report = json.loads(run_surgery("adapter", "eval", peaked_llama, out, "--prompt-file", prompt_file, "--count",
                                    "4", "--length", "8", "--json").stdout)
    assert report["kl_adapter"] < 1e-6 and report["top1_adapter"] == 1.0 and report["kl_no_prompt"] > 0.05


def test_closed_form_sums_over_the_tokens_not_kept(peaked_llama, prompt_file):
    from surgery.adapters import ntk, prompts

    model, tokenizer = load(peaked_llama)
    prompt_kv = ntk.prompt_keys_values(model, prompts.prompt_ids(tokenizer, prompt_file.read_text()))
    exact = [torch.tensor([[0, 3, 7], [1, 2, 40]]) for _ in prompt_kv]
    adapter = ntk.closed_form(model, prompt_kv, exact)
    for layer, (keys, values) in enumerate(prompt_kv):
        for head, kept in enumerate(exact[layer].tolist()):
            rest = [j for j in range(keys.shape[1]) if j not in kept]
            phi = F.elu(keys[head, rest].double() / keys.shape[-1] ** 0.25) + 1
            torch.testing.assert_close(adapter.z[layer, head].double(), phi.T @ values[head, rest].double(),
                                       rtol=1e-5, atol=1e-5)  # float32 sums against float64 ones
            torch.testing.assert_close(adapter.k[layer, head].double(), phi.sum(0), rtol=1e-5, atol=1e-5)
            assert torch.equal(adapter.exact_keys[layer, head], keys[head, kept])
            assert torch.equal(adapter.exact_values[layer, head], values[head, kept])


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
    broken = tmp_path / "broken"  # exact tokens without their values
    shutil.copytree(ntk_dir, broken)
    tensors = load_file(broken / "ntk_attention.safetensors")
    del tensors["exact_values"]
    save_file(tensors, broken / "ntk_attention.safetensors")
    cases = {
        ("adapter", "prefix", llama, "--prompt-file", tmp_path / "missing.txt", "-o", tmp_path / "x"): "no such file",
        ("adapter", "ntk", llama, "--prompt-file", empty, "-o", tmp_path / "x"): "the prompt is empty",
        ("adapter", "ntk", tiny_checkpoints["gemma2"], "--prompt-file", prompt_file, "-o", tmp_path / "x"):
            "NTK-attention supports llama, mistral, qwen2",
        ("adapter", "ntk", llama, "-o", tmp_path / "x"): "--prompt-file",
        ("adapter", "ntk", llama, "--prompt-file", prompt_file, "--exact-tokens", "-1", "-o", tmp_path / "x"):
            "--exact-tokens -1: must be non-negative",
        ("adapter", "eval", llama, broken, "--prompt-file", prompt_file): "exact_values, exact_index missing or not",
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
