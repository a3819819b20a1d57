"""`surgery extend`: each RoPE method's frequencies, read back by transformers from the written config, against an
independent implementation of its formula; length conventions; verify-rope; errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model, run_surgery

BASE, HEAD_DIM, TRAINED = 10000.0, 128, 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny llama with 128-dimensional heads (64 rotary pairs) trained for 256 positions."""
    path = tmp_path_factory.mktemp("rope") / "llama"
    make_tiny_model("llama", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                    max_position_embeddings=TRAINED).save_pretrained(path)
    return path


def theta() -> np.ndarray:
    return BASE ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)


def yarn(s: float, fast: float = 32, slow: float = 1) -> np.ndarray:
    """YaRN's reference code: ramp over pair index between the pairs that rotate `fast` and `slow` times in L0."""
    def pair(rotations):
        return HEAD_DIM * math.log(TRAINED / (rotations * 2 * math.pi)) / (2 * math.log(BASE))
    low, high = max(math.floor(pair(fast)), 0), min(math.ceil(pair(slow)), HEAD_DIM - 1)
    ramp = np.clip((np.arange(HEAD_DIM // 2) - low) / (high - low), 0, 1)
    return theta() / s * ramp + theta() * (1 - ramp)


def llama3(s: float, low: float = 1, high: float = 4) -> np.ndarray:
    out = []
    for t in theta():
        wavelength = 2 * math.pi / t
        if wavelength < TRAINED / high:
            out.append(t)
        elif wavelength > TRAINED / low:
            out.append(t / s)
        else:
            smooth = (TRAINED / wavelength - low) / (high - low)
            out.append((1 - smooth) * t / s + smooth * t)
    return np.array(out)


def truncated(cut: int) -> np.ndarray:
    b = 2 * math.pi / cut
    return np.array([t if t >= b else b / 16 if t >= b / 8 else 0.0 for t in theta()])


d = HEAD_DIM
CASES = {
    "linear": (["--factor", "4"], lambda: theta() / 4, 1.0, TRAINED),
    "ntk": (["--factor", "4"], lambda: (BASE * 4 ** (d / (d - 2))) ** (-np.arange(0, d, 2) / d), 1.0, 4 * TRAINED),
    "yarn": (["--factor", "4"], lambda: yarn(4), 0.1 * math.log(4) + 1, 4 * TRAINED),
    "llama3": (["--target-length", "2048"], lambda: llama3(8), 1.0, 2048),
    "power": (["--power", "2"], lambda: theta() * (1 - np.arange(0, d, 2) / d) ** 2, 1.0, TRAINED),
    "truncated": (["--cut-length", "64"], lambda: truncated(64), 1.0, TRAINED),
}


def rotary_of(directory: Path) -> tuple[np.ndarray, float]:
    """What the model's own rotary module computes from the written config (transformers' code path)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(directory))
    return rotary.inv_freq.double().numpy(), float(rotary.attention_scaling)


@pytest.mark.parametrize("method", sorted(CASES))
def test_frequencies_as_transformers_reads_them(method, model_dir, tmp_path):
    options, expected, attention, length = CASES[method]
    result = run_surgery("extend", model_dir, "-o", tmp_path / "out", "--rope", method, *options)
    assert result.returncode == 0, result.stderr
    inv_freq, scaling = rotary_of(tmp_path / "out")
    want = expected()
    zeroed = want == 0
    np.testing.assert_allclose(inv_freq[~zeroed], want[~zeroed], rtol=2e-6)
    assert np.all(inv_freq[zeroed] < 1e-25 * theta()[zeroed])  # "no rotation" within float precision
    assert scaling == pytest.approx(attention, rel=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == length
    # weights are copied unchanged
    from safetensors.torch import load_file

    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert_runs_past_trained_length(tmp_path / "out")


def assert_runs_past_trained_length(directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, 160, (1, 3 * TRAINED), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_dynamic_frequencies_at_the_new_length(model_dir, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    result = run_surgery("extend", model_dir, "-o", tmp_path / "out", "--rope", "dynamic", "--factor", "2")
    assert result.returncode == 0, result.stderr
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.max_position_embeddings == TRAINED
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"), seq_len=2 * TRAINED)
    new_base = BASE * (2 * 2 - 2 + 1) ** (d / (d - 2))
    np.testing.assert_allclose(inv_freq.double().numpy(), new_base ** (-np.arange(0, d, 2) / d), rtol=2e-6)
    assert_runs_past_trained_length(tmp_path / "out")


def test_giraffe_truncated_counts(tmp_path):
    """The reference's numbers: d = 128, base 1e4, L_t = 4096 → 46 kept, 14 clamped, 4 zeroed."""
    path = tmp_path / "model"
    make_tiny_model("llama", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                    max_position_embeddings=8192).save_pretrained(path)
    result = run_surgery("extend", path, "-o", tmp_path / "out", "--rope", "truncated", "--cut-length", "4096",
                         "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    statuses = [row["status"] for row in plan["pairs"]]
    assert (statuses.count("kept"), statuses.count("clamped"), statuses.count("zeroed")) == (46, 14, 4)
    assert plan["rope_parameters"]["rope_type"] == "longrope"
    assert plan["rope_parameters"]["short_factor"] == plan["rope_parameters"]["long_factor"]
    assert all(math.isfinite(f) for f in plan["rope_parameters"]["short_factor"])
    assert not (tmp_path / "out").exists()


def test_verify_rope_checks_the_written_config(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run_surgery("extend", model_dir, "-o", out, "--rope", "yarn", "--factor", "2").returncode == 0
    result = run_surgery("verify-rope", out)
    assert result.returncode == 0, result.stderr
    assert "matches the intended frequencies" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == config["rope_parameters"]["factor"] == 2.0
    # transformers 5 lets the legacy rope_scaling override rope_parameters: an edit of rope_parameters alone
    # changes nothing (so we keep the two in step); an edit of both does
    config["rope_parameters"]["factor"] = 3.0
    (out / "config.json").write_text(json.dumps(config))
    assert run_surgery("verify-rope", out).returncode == 0
    config["rope_scaling"]["factor"] = 3.0
    (out / "config.json").write_text(json.dumps(config))
    result = run_surgery("verify-rope", out)
    assert result.returncode == 2
    assert "does not give the intended frequencies" in result.stderr and "pair" in result.stderr
    plain = run_surgery("verify-rope", model_dir, "--json")
    assert plain.returncode == 0, plain.stderr
    report = json.loads(plain.stdout)
    assert not report["intended"] and {row["status"] for row in report["pairs"]} == {"kept"}


@pytest.mark.parametrize("options,message", [
    (["--rope", "stretch"], "--rope 'stretch': expected one of"),
    (["--rope", "linear"], "--rope linear: give --factor or --target-length"),
    (["--rope", "linear", "--factor", "0.5"], "--factor 0.5: must be greater than 1"),
    (["--rope", "truncated"], "--rope truncated: give --cut-length"),
    (["--rope", "power", "--power", "1", "--factor", "2"], "--rope power: --factor and --target-length do not apply"),
])
def test_bad_options_are_one_line_errors(options, message, model_dir, tmp_path):
    result = run_surgery("extend", model_dir, "-o", tmp_path / "out", *options)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_already_scaled_model_is_refused(model_dir, tmp_path):
    assert run_surgery("extend", model_dir, "-o", tmp_path / "once", "--rope", "linear", "--factor", "2").returncode == 0
    result = run_surgery("extend", tmp_path / "once", "-o", tmp_path / "twice", "--rope", "linear", "--factor", "2")
    assert result.returncode == 2 and "already uses 'linear' RoPE scaling" in result.stderr
