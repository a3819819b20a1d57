"""surgery quantize --method selfcal: end-to-end KL on held-out self-generated text below rtn's and hqq's on the same
grid; the output loads with transformers + compressed-tensors with its decoded weights' logits; same seed → same
bytes; the selection rule and GPTQ rounding checked against direct computations written here; gptq and gguf
formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import logits, quantize_variants, run_surgery

GROUP = 16


def kl_to_reference(source, quantized_dir, ids) -> float:
    """Mean next-token KL(P_source ‖ P_quantized) on ``ids``, the quantized model being the source architecture
    with the decoded weights."""
    from transformers import AutoModelForCausalLM

    from surgery.quantize.verify import load_dequantized
    from surgery.runtime import compare_logits

    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return compare_logits(reference, load_dequantized(str(quantized_dir), reference), ids)["kl"]


@pytest.fixture(scope="module")
def held_out(tiny_checkpoints):
    """Text the unquantized tiny llama samples from its BOS token with another seed than selfcal's pool (which
    starts from random tokens, seed 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.runtime import self_generated_ids

    source = tiny_checkpoints["llama"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return self_generated_ids(model, AutoTokenizer.from_pretrained(source), 1024, seed=1234, sequences=8)


@pytest.fixture(scope="module")
def outputs(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("selfcal")
    source = tiny_checkpoints["llama"]
    runs = {"rtn": ["--method", "rtn"], "hqq": ["--method", "hqq"], "selfcal": ["--method", "selfcal"],
            "selfcal_again": ["--method", "selfcal"]}
    return quantize_variants(source, root, runs, GROUP)


def test_selfcal_beats_rtn_and_hqq_on_held_out_text(outputs, tiny_checkpoints, held_out):
    source = tiny_checkpoints["llama"]
    kl = {name: kl_to_reference(source, outputs[name], held_out) for name in ("rtn", "hqq", "selfcal")}
    assert kl["selfcal"] < kl["rtn"] and kl["selfcal"] < kl["hqq"], kl
    assert kl["selfcal"] < 0.8 * min(kl["rtn"], kl["hqq"]), kl  # clearly, not by noise


def test_selfcal_output_loads_with_the_decoded_logits(outputs, tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    from surgery.quantize.verify import load_dequantized

    ids = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3]])
    loaded = logits(outputs["selfcal"], ids, dtype=torch.float32)  # transformers + compressed-tensors
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = load_dequantized(str(outputs["selfcal"]), reference)(ids).logits
    assert torch.allclose(loaded, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(loaded, logits(tiny_checkpoints["llama"], ids, dtype=torch.float32), atol=1e-4)
    config = json.loads((outputs["selfcal"] / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == GROUP


def test_same_seed_same_bytes_and_the_manifest_records_the_parameters(outputs):
    first, again = outputs["selfcal"], outputs["selfcal_again"]
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in again.iterdir())
    for path in first.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    manifest = json.loads((first / "surgery.json").read_text())
    recipe = manifest["recipe"]
    assert recipe["method"] == "selfcal"
    params = recipe["selfcal"]
    assert params["sequences"] == 32 and params["candidates"] == 64 and params["rounds"] == 2
    assert params["margin_low"] == 20 and params["margin_high"] == 80 and params["agreeing_share"] == 0.25
    assert params["damp"] == 0.01 and params["round0"] == "hqq"
    rounds = manifest["output"]["selfcal"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["kept"] == 32 for r in rounds)
    assert rounds[1]["pool_kl"] < rounds[0]["pool_kl"]  # the round-1 model disagrees less than hqq on the pool


def test_options_reach_the_manifest(tiny_checkpoints, tmp_path):
    out = tmp_path / "small"
    done = run_surgery("quantize", tiny_checkpoints["llama"], "-o", out, "--group-size", "32", "--method",
                       "selfcal", "--calibration-sequences", "8", "--rounds", "1", "--seed", "3")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "surgery.json").read_text())
    assert manifest["recipe"]["selfcal"]["sequences"] == 8 and manifest["recipe"]["selfcal"]["candidates"] == 16
    assert manifest["recipe"]["seed"] == 3 and len(manifest["output"]["selfcal"]["rounds"]) == 1


# ------------------------------------------------------------------------------------------------ selection

def expected_selection(kl: np.ndarray, keep: int, low: float, high: float, share: float) -> list[int]:
    """The rule, written out: round(share·keep) lowest-KL candidates (ties by index); then, among the others whose
    KL lies between the low and high percentiles (numpy's linear interpolation), keep − that many at evenly spaced
    ranks: the k-th (0-based) of `wanted` is the one at rank floor((2k + 1)·M / (2·wanted)) of the M in the
    margin, sorted by KL; all of them when M ≤ wanted."""
    order = sorted(range(len(kl)), key=lambda i: (kl[i], i))
    agreeing = order[:round(share * keep)]
    q_low, q_high = np.percentile(kl, low), np.percentile(kl, high)
    margin = [i for i in order if q_low <= kl[i] <= q_high and i not in agreeing]
    wanted = keep - len(agreeing)
    picked = margin if len(margin) <= wanted else [margin[(2 * k + 1) * len(margin) // (2 * wanted)]
                                                   for k in range(wanted)]
    return sorted(set(agreeing) | set(picked))


def test_selection_keeps_the_margin_and_the_agreeing_share():
    from surgery.quantize.selfcal import select_sequences

    rng = np.random.default_rng(0)
    kl = rng.lognormal(size=64)
    chosen = select_sequences(torch.from_numpy(kl), 32)
    assert chosen == expected_selection(kl, 32, 20, 80, 0.25)
    assert len(chosen) == 32
    q20, q80 = np.percentile(kl, 20), np.percentile(kl, 80)
    lowest = set(np.argsort(kl, kind="stable")[:8].tolist())
    assert lowest <= set(chosen)  # the agreeing share
    for index in set(chosen) - lowest:
        assert q20 <= kl[index] <= q80  # everything else inside the margin: the largest disagreement is left out
    assert int(np.argmax(kl)) not in chosen
    # other parameters, and a margin too small to fill the rest
    for keep, low, high, share in ((10, 40, 60, 0.5), (20, 45, 55, 0.1), (16, 0, 100, 0.0)):
        assert select_sequences(torch.from_numpy(kl), keep, low=low, high=high, agreeing_share=share) == \
            expected_selection(kl, keep, low, high, share)
    assert select_sequences(torch.tensor([0.1, 5.0, 0.3, 0.2, 9.0]), 2, agreeing_share=0.5) == [0, 2]
    assert select_sequences(torch.tensor([3.0, 1.0]), 5) == [0, 1]  # fewer candidates than wanted: all


# --------------------------------------------------------------------------------------------------- GPTQ

def correlated_inputs(tokens: int, columns: int, seed: int) -> torch.Tensor:
    """Activations with unequal, correlated channels (as LLM activations are): Gaussian times a random mixing
    matrix, a few outlier channels."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=generator) @ mixing
    x[:, :4] *= 8
    return x


def test_gptq_lowers_the_output_error_against_rtn_on_the_same_grid():
    from surgery.quantize.grid import Scheme, rtn
    from surgery.quantize.selfcal import gptq, group_fitter

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=generator)
    x = correlated_inputs(512, 128, seed=2)
    hessian = x.double().T @ x.double()
    for symmetric in (True, False):
        scheme = Scheme(4, 32, symmetric)
        base = rtn(weight, scheme)
        # the same grid: rtn's own scales and zero points, only the rounding differs
        fixed = gptq(weight, hessian, scheme, lambda columns, g: (base.scale[:, g], base.zero[:, g]))
        assert torch.equal(fixed.scale, base.scale) and torch.equal(fixed.zero, base.zero)
        assert fixed.q.min() >= scheme.qmin and fixed.q.max() <= scheme.qmax
        error = lambda grid: float((x @ weight.T - x @ grid.dequantize().T).norm())  # noqa: E731
        assert error(fixed) < 0.8 * error(base), (error(fixed), error(base))
        # re-fitted per group (selfcal's default) is also on a valid grid and beats rtn
        refit = gptq(weight, hessian, scheme, group_fitter(rtn, scheme))
        assert error(refit) < 0.8 * error(base)
        # the weight itself is not what GPTQ minimises: rtn is closer in weight space
        assert float((weight - fixed.dequantize()).norm()) >= float((weight - base.dequantize()).norm())


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    """With H ∝ I nothing is fed back (the off-diagonal of U is zero): GPTQ rounds each column to nearest."""
    from surgery.quantize.grid import Scheme, rtn
    from surgery.quantize.selfcal import gptq

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    scheme = Scheme(4, 32, True)
    base = rtn(weight, scheme)
    grid = gptq(weight, torch.eye(64, dtype=torch.float64), scheme,
                lambda columns, g: (base.scale[:, g], base.zero[:, g]))
    assert torch.equal(grid.q, base.q)


# ------------------------------------------------------------------------------------------- other formats

def test_selfcal_writes_gptq_too(tiny_checkpoints, outputs, tmp_path, held_out):
    out = tmp_path / "gptq"
    done = run_surgery("quantize", tiny_checkpoints["llama"], "-o", out, "--group-size", str(GROUP), "--method",
                       "selfcal", "--format", "gptq", "--calibration-sequences", "16", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["group_size"] == GROUP
    source = tiny_checkpoints["llama"]
    assert kl_to_reference(source, out, held_out) < kl_to_reference(source, outputs["rtn"], held_out)


def test_bad_selfcal_options_are_one_line(tiny_checkpoints, tmp_path):
    done = run_surgery("quantize", tiny_checkpoints["llama"], "-o", tmp_path / "out", "--method", "selfcal",
                       "--rounds", "0")
    assert done.returncode == 2 and "rounds" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    """A tiny llama with a byte-level BPE tokenizer (what --format gguf exports)."""
    from conftest import save_bpe_llama

    return save_bpe_llama(tmp_path_factory.mktemp("selfcal-gguf") / "llama")


def test_selfcal_writes_gguf_blocks_transformers_reads(bpe_llama, tmp_path):
    """Q4_0 with the GPTQ-rounded blocks (q/k rows in llama.cpp's order): transformers' GGUF loader reads it, and
    its KL on held-out text is below llama.cpp's own rounding (rtn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.runtime import compare_logits, self_generated_ids

    reference = AutoModelForCausalLM.from_pretrained(bpe_llama, dtype=torch.float32).eval()
    ids = self_generated_ids(reference, AutoTokenizer.from_pretrained(bpe_llama), 512, seed=99, sequences=4)
    kl = {}
    for method in ("rtn", "selfcal"):
        out = tmp_path / method
        selfcal_options = ["--calibration-sequences", "16", "--rounds", "1"] if method == "selfcal" else []
        done = run_surgery("quantize", bpe_llama, "-o", out, "--format", "gguf", "--method", method, *selfcal_options)
        assert done.returncode == 0, done.stderr
        (path,) = out.glob("*.gguf")
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        kl[method] = compare_logits(reference, loaded, ids)["kl"]
    assert kl["selfcal"] < kl["rtn"], kl
