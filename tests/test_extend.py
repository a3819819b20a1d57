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


def theta(base: float = BASE, dim: int = HEAD_DIM) -> np.ndarray:
    return base ** (-np.arange(0, dim, 2) / dim)


def yarn(s: float, fast: float = 32, slow: float = 1, *, base: float = BASE, dim: int = HEAD_DIM,
         trained: int = TRAINED, truncate: bool = True) -> np.ndarray:
    """YaRN's reference code: ramp over pair index between the pairs that rotate `fast` and `slow` times in L0
    (their indices rounded outwards unless `truncate` is false)."""
    def pair(rotations):
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = pair(fast), pair(slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return theta(base, dim) / s * ramp + theta(base, dim) * (1 - ramp)


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
    # transformers 5 lets the legacy rope_scaling override rope_parameters, so an edit of rope_parameters alone
    # changes nothing transformers derives, but the two now disagree (vLLM and older loaders read the other one)
    config["rope_parameters"]["factor"] = 3.0
    (out / "config.json").write_text(json.dumps(config))
    result = run_surgery("verify-rope", out)
    assert result.returncode == 2 and "config.json rope_parameters 'factor': 3.0 found, 2.0 written" in result.stderr
    config["rope_scaling"]["factor"] = 3.0
    (out / "config.json").write_text(json.dumps(config))
    result = run_surgery("verify-rope", out)
    assert result.returncode == 2
    assert "does not give the intended rotary embedding" in result.stderr and "pair" in result.stderr
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


# Other families, made here by transformers: Qwen2-VL (sectioned "mrope" rotary), gpt-oss (released with yarn
# factor 32 over 4096 positions), Mixtral (saves head_dim: null), GPT-2 (no RoPE).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=160, bos_token_id=0, eos_token_id=1)
SMALL_DIM = 16  # head size: 8 rotary pairs
MROPE_SECTION = [2, 3, 3]  # temporal, height, width pairs (sum 8)
GPT_OSS_BASE, GPT_OSS_TRAINED, GPT_OSS_FACTOR, GPT_OSS_LENGTH = 150000.0, 4096, 32.0, 131072
FAMILIES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", lambda t: t.Qwen2VLConfig(
        text_config=dict(SMALL, max_position_embeddings=TRAINED, rope_parameters={
            "rope_type": "default", "rope_theta": BASE, "mrope_section": MROPE_SECTION}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2))),
    "gpt_oss": ("GptOssForCausalLM", lambda t: t.GptOssConfig(**SMALL, head_dim=SMALL_DIM, num_local_experts=4,
                                                               num_experts_per_tok=2)),  # the released rope
    "mixtral": ("MixtralForCausalLM", lambda t: t.MixtralConfig(**SMALL, max_position_embeddings=TRAINED,
                                                                 rope_theta=BASE, num_local_experts=4,
                                                                 num_experts_per_tok=2)),
    "gpt2": ("GPT2LMHeadModel", lambda t: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=160, n_positions=256,
                                                       bos_token_id=0, eos_token_id=1)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name → directory of a tiny random checkpoint of that family (made on first use)."""
    import transformers

    made = {}

    def get(name: str) -> Path:
        if name not in made:
            class_name, config = FAMILIES[name]
            torch.manual_seed(0)
            made[name] = tmp_path_factory.mktemp("family") / name
            getattr(transformers, class_name)(config(transformers)).eval().save_pretrained(made[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def extended(family, tmp_path_factory):
    """name → `surgery extend --rope yarn --factor 2` of that family (made on first use; copy it before editing)."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp("extended") / name
            result = run_surgery("extend", family(name), "-o", made[name], "--rope", "yarn", "--factor", "2")
            assert result.returncode == 0, result.stderr
        return made[name]

    return get


def text_of(config: dict) -> dict:
    return config.get("text_config") or config


def run_forward(directory: Path, class_name: str):
    """Load ``directory`` with transformers, run one forward on a few tokens; the model (its logits are finite)."""
    import transformers

    model = getattr(transformers, class_name).from_pretrained(directory).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(8).view(1, -1)).logits).all()
    return model


def text_rotary(model) -> torch.nn.Module:
    """The decoder's rotary embedding (Qwen2-VL also has one for the vision tower)."""
    return next(module for module in model.modules()
                if type(module).__name__.endswith("RotaryEmbedding") and "Vision" not in type(module).__name__)


def test_qwen2_vl_keeps_its_mrope_section(extended):
    from transformers import AutoConfig

    out = extended("qwen2_vl")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["rope_parameters"]["mrope_section"] == text["rope_scaling"]["mrope_section"] == MROPE_SECTION
    assert text["rope_parameters"]["rope_type"] == text["rope_scaling"]["rope_type"] == "yarn"
    assert AutoConfig.from_pretrained(out).text_config.rope_parameters["mrope_section"] == MROPE_SECTION
    rotary = text_rotary(run_forward(out, "Qwen2VLForConditionalGeneration"))
    assert rotary.mrope_section == MROPE_SECTION
    np.testing.assert_allclose(rotary.inv_freq.double().numpy(), yarn(2, dim=SMALL_DIM), rtol=2e-6)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(2) + 1, rel=1e-6)
    assert run_surgery("verify-rope", out).returncode == 0


def test_qwen2_vl_hub_layout_with_legacy_mrope_type(family, tmp_path):
    """Qwen2-VL as its Hub config has it: flat text fields, rope_scaling {type: mrope, mrope_section}."""
    import shutil

    source = shutil.copytree(family("qwen2_vl"), tmp_path / "flat")
    config = json.loads((source / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config |= {key: value for key, value in text.items() if key != "model_type"}
    config |= {"rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION}}
    (source / "config.json").write_text(json.dumps(config))
    result = run_surgery("extend", source, "-o", tmp_path / "out", "--rope", "yarn", "--factor", "2")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "mrope_section": MROPE_SECTION,
                                       "factor": 2.0, "original_max_position_embeddings": TRAINED,
                                       "beta_fast": 32.0, "beta_slow": 1.0}
    rotary = text_rotary(run_forward(tmp_path / "out", "Qwen2VLForConditionalGeneration"))
    assert rotary.mrope_section == MROPE_SECTION
    np.testing.assert_allclose(rotary.inv_freq.double().numpy(), yarn(2, dim=SMALL_DIM), rtol=2e-6)


def test_a_written_config_that_loses_a_key_is_refused(family, tmp_path, monkeypatch):
    """Should the planner drop a key, the check names it and nothing is written."""
    from surgery.extend import context

    plan_extension = context.plan_extension

    def forgetful(*args, **kwargs):
        plan = plan_extension(*args, **kwargs)
        for field in ("rope_parameters", "rope_scaling"):
            del plan.config["text_config"][field]["mrope_section"]
        return plan

    monkeypatch.setattr(context, "plan_extension", forgetful)
    result = run_surgery("extend", family("qwen2_vl"), "-o", tmp_path / "out", "--rope", "yarn", "--factor", "2")
    assert result.returncode == 2, result.stderr
    assert "mrope_section" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_gpt_oss_yarn_factor_is_multiplied(extended):
    out = extended("gpt_oss")
    config = json.loads((out / "config.json").read_text())
    for rope in (config["rope_parameters"], config["rope_scaling"]):
        assert rope["factor"] == 2 * GPT_OSS_FACTOR and rope["original_max_position_embeddings"] == GPT_OSS_TRAINED
        assert (rope["beta_fast"], rope["beta_slow"], rope["truncate"]) == (32, 1, False)  # the release's, kept
    assert config["max_position_embeddings"] == 2 * GPT_OSS_LENGTH
    rotary = text_rotary(run_forward(out, "GptOssForCausalLM"))
    # gpt-oss does not round the ramp's ends (truncate false): rounding them would give other frequencies here
    want = yarn(2 * GPT_OSS_FACTOR, base=GPT_OSS_BASE, dim=SMALL_DIM, trained=GPT_OSS_TRAINED, truncate=False)
    np.testing.assert_allclose(rotary.inv_freq.double().numpy(), want, rtol=2e-6)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(2 * GPT_OSS_FACTOR) + 1, rel=1e-6)
    assert run_surgery("verify-rope", out).returncode == 0


def test_llama3_twice_multiplies_the_factor(model_dir, tmp_path):
    for source, out in ((model_dir, tmp_path / "once"), (tmp_path / "once", tmp_path / "twice")):
        result = run_surgery("extend", source, "-o", out, "--rope", "llama3", "--factor", "2")
        assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "twice" / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["factor"] == 4 and rope["original_max_position_embeddings"] == TRAINED
    assert config["max_position_embeddings"] == 4 * TRAINED
    inv_freq, scaling = rotary_of(tmp_path / "twice")
    np.testing.assert_allclose(inv_freq, llama3(4), rtol=2e-6)
    assert scaling == 1.0


@pytest.mark.parametrize("method", ["yarn", "dynamic"])
def test_mixtral_with_a_null_head_dim_extends(method, family, tmp_path):
    source, out = family("mixtral"), tmp_path / "out"
    assert json.loads((source / "config.json").read_text())["head_dim"] is None
    result = run_surgery("extend", source, "-o", out, "--rope", method, "--factor", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["head_dim"] == SMALL_DIM
    rotary = text_rotary(run_forward(out, "MixtralForCausalLM"))
    if method == "yarn":
        np.testing.assert_allclose(rotary.inv_freq.double().numpy(), yarn(2, dim=SMALL_DIM), rtol=2e-6)
    assert run_surgery("verify-rope", out).returncode == 0


@pytest.mark.parametrize("name,options,message", [
    ("gpt_oss", ["--rope", "linear", "--factor", "2"], "already uses 'yarn' RoPE scaling (factor 32 over 4096 trained "
                                                       "positions); extend it with --rope yarn --factor S"),
    ("gpt_oss", ["--rope", "yarn", "--factor", "0.5"], "--factor 0.5: must be greater than 1"),
    ("gpt2", ["--rope", "yarn", "--factor", "2"], "not a RoPE model"),
])
def test_refusals(name, options, message, family, tmp_path):
    result = run_surgery("extend", family(name), "-o", tmp_path / "out", *options)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def drop(*fields: str, key: str):
    def edit(text: dict) -> None:
        for field in fields:
            del text[field][key]
    return edit


def halve_length(text: dict) -> None:
    text["max_position_embeddings"] //= 2


@pytest.mark.parametrize("name,edit,message", [
    ("qwen2_vl", drop("rope_parameters", "rope_scaling", key="mrope_section"),
     "rope parameter 'mrope_section' missing"),
    ("qwen2_vl", drop("rope_parameters", key="mrope_section"), "config.json rope_parameters 'mrope_section' missing"),
    ("gpt_oss", drop("rope_parameters", "rope_scaling", key="truncate"), "'truncate' missing"),
    ("mixtral", halve_length, "max_position_embeddings 256 read, 512 intended"),
])
def test_verify_rope_reports_an_edited_config(name, edit, message, extended, tmp_path):
    import shutil

    out = shutil.copytree(extended(name), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    edit(text_of(config))
    (out / "config.json").write_text(json.dumps(config))
    result = run_surgery("verify-rope", out)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
