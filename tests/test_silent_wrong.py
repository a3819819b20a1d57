"""Never exit 0 with a wrong result (issue #23): outputs are checked against their loader, no recipe key or option is
silently dropped, parameters are range-checked, and SVD merges decompose only projections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_surgery
from merge_helpers import read_numpy
from surgery.errors import CheckFailed
from surgery.io.loader_check import check_transformers
from test_reliability import assert_bad_input


# ---- the loader check itself


@pytest.fixture()
def converted(tiny_checkpoints, tmp_path):
    out = tmp_path / "converted"
    assert run_surgery("convert", tiny_checkpoints["qwen2"], "-o", out).returncode == 0
    return out


def rewrite(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_check_passes_a_complete_checkpoint(converted):
    check_transformers(converted)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "parameters missing: 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}), "does not use: 'model.layers.0.mlp.extra"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), "shapes the model does not have: 'model.norm.weight'"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}), "'model.norm.weight' is torch.int32"),
])
def test_check_names_what_the_loader_would_get_wrong(converted, damage, message):
    rewrite(converted, damage)
    with pytest.raises(CheckFailed, match=None) as raised:
        check_transformers(converted)
    assert message in str(raised.value), str(raised.value)


def test_check_failure_writes_nothing_and_exits_1(family_pairs, tmp_path):
    """GPTQ of mixtral without its experts: GPTQ's layout check knows no renamed, fused expert tensors, so the
    output check fails (MoE experts themselves are refused up front, exit 2)."""
    result = run_surgery("quantize", family_pairs["mixtral"][0], "--format", "gptq", "-o", tmp_path / "out",
                         "--ignore", "lm_head,re:.*experts.*")
    lines = [line for line in result.stderr.splitlines() if not line.startswith("surgery: WARNING")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "parameters missing" in lines[0] and "internal error" not in lines[0]
    assert list(tmp_path.iterdir()) == []


# ---- recipes: nothing silently dropped


def merge_recipe(tmp_path: Path, recipe: dict, *extra: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run_surgery("merge", "--recipe", path, "-o", tmp_path / "out", *extra)


def test_mergekit_chat_template_is_written(tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    model = str(tiny_checkpoints["llama"])
    for setting, expected in (("auto", "{% for m in messages %}{{ m['content'] }} {% endfor %}"),
                              ("chatml", "<|im_start|>"), ("{{ 'custom' }}", "{{ 'custom' }}")):
        config = {"merge_method": "linear", "models": [{"model": model}, {"model": model}],
                  "chat_template": setting}
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        result = merge_recipe(tmp_path, config)
        assert result.returncode == 0, result.stderr
        template = AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
        assert expected in template, (setting, template)
        assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


def test_mergekit_int8_mask_is_accepted_and_changes_nothing(family_pairs, tmp_path):
    base, ft = map(str, family_pairs["llama"])
    config = {"merge_method": "ties", "base_model": base, "models": [{"model": ft}], "parameters": {"density": 0.5}}
    assert merge_recipe(tmp_path, config).returncode == 0
    plain = (tmp_path / "out" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "out")
    config["parameters"]["int8_mask"] = True
    result = merge_recipe(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == plain


def test_mergekit_tokenizer_block(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["llama"])
    config = {"merge_method": "linear", "models": [{"model": model}, {"model": model}],
              "tokenizer": {"source": "base"}}
    result = merge_recipe(tmp_path, config)
    assert result.returncode == 0, result.stderr
    rows = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    assert rows == 103  # mergekit sizes the embedding to the tokenizer: 103 tokens (the models have 160 rows)
    config["tokenizer"]["tokens"] = {"<s>": {"source": model}}
    shutil.rmtree(tmp_path / "out")
    assert_bad_input(merge_recipe(tmp_path, config), "tokens")


@pytest.mark.parametrize("option,value", [("--density", "-0.2"), ("--density", "1.5"), ("--weights", "1e308"),
                                          ("--lambda", "nan")])
def test_parameter_ranges_on_the_command_line(option, value, tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    result = run_surgery("merge", model, model, "--method", "ties", option, value, "-o", tmp_path / "out")
    assert_bad_input(result, option.removeprefix("--").removesuffix("s"))
    assert not (tmp_path / "out").exists()


# ---- roles: what SVD decomposes


@pytest.mark.parametrize("family,untouched,decomposed", [
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("gpt2", "transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"),
])
def test_svd_leaves_routers_and_position_embeddings_whole(family, untouched, decomposed, family_pairs, tmp_path):
    base, ft = family_pairs[family]
    result = run_surgery("merge", base, ft, "--method", "svd", "--rank", "1", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out, fine_tune, original = read_numpy(tmp_path / "out"), read_numpy(ft), read_numpy(base)
    np.testing.assert_allclose(out[untouched], fine_tune[untouched], atol=1e-6)  # task arithmetic, weight 1
    delta = out[decomposed] - original[decomposed]
    assert np.linalg.matrix_rank(delta, tol=1e-5) == 1  # a projection: rank-truncated as asked


def test_falcon_fused_qkv_is_attn_qkv(family_pairs):
    result = run_surgery("inspect", family_pairs["falcon"][0], "--tensors", "--json")
    roles = {row["name"]: row["role"] for row in json.loads(result.stdout)["tensors"]}
    assert roles["transformer.h.0.self_attention.query_key_value.weight"] == "attn_qkv"
    assert roles["transformer.h.0.self_attention.dense.weight"] == "attn_o"


# ---- adapters


def test_adapter_records_its_base_model_as_an_absolute_path(tiny_checkpoints, tmp_path, monkeypatch):
    from conftest import save_tokenizer

    model = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "model")
    save_tokenizer(model)
    (tmp_path / "prompt.txt").write_text("w1 w2 w3 w4 w5 w6")
    monkeypatch.chdir(tmp_path)
    result = run_surgery("adapter", "prefix", "model", "--prompt-file", "prompt.txt", "-o", "adapter")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model.resolve())


# ---- options that would be ignored are refused


@pytest.mark.parametrize("args,flag", [
    (["quantize", "--seed", "3"], "--seed"), (["quantize", "--method", "hqq", "--rounds", "1"], "--rounds"),
    (["quantize", "--calibration-sequences", "4"], "--calibration-sequences"),
    (["quantize", "--format", "gguf", "--group-size", "64"], "--group-size 64"),
    (["extend", "--rope", "linear", "--factor", "2", "--beta-fast", "16"], "--beta-fast"),
    (["extend", "--rope", "yarn", "--factor", "2", "--power", "1"], "--power"),
    (["extend", "--rope", "ntk", "--factor", "2", "--cut-length", "64"], "--cut-length"),
])
def test_options_the_command_would_ignore_are_refused(args, flag, tiny_checkpoints, tmp_path):
    command, *options = args
    result = run_surgery(command, tiny_checkpoints["llama"], *options, "-o", tmp_path / "out")
    assert_bad_input(result, flag)
    assert not (tmp_path / "out").exists()


def test_tensors_transformers_does_not_use_are_carried_not_dropped(tiny_checkpoints, tmp_path):
    """An input tensor the model class does not declare (say a multi-token-prediction head) is no fault of the
    command: it is carried into the output, with a warning, never dropped and never a refusal."""
    model = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "model")
    rewrite(model, lambda t: t.update({"model.mtp.weight": torch.arange(4.0)}))
    for command in (["convert", "--dtype", "bfloat16"], ["quantize", "--group-size", "32"]):
        out = tmp_path / command[0]
        result = run_surgery(command[0], model, *command[1:], "-o", out)
        assert result.returncode == 0, result.stderr
        assert "model.mtp.weight" in result.stderr  # the warning names it
        assert torch.equal(load_file(out / "model.safetensors")["model.mtp.weight"].float(), torch.arange(4.0))


def test_an_output_problem_the_input_does_not_have_is_the_commands(tiny_checkpoints, tmp_path):
    """The input carries an unused tensor; the output loses a parameter: that is a failed check (exit 1), not the
    input's fault."""
    from surgery.io.loader_check import check_transformers

    model = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    rewrite(model, lambda t: t.update({"model.mtp.weight": torch.arange(4.0)}))
    out = shutil.copytree(model, tmp_path / "out")
    rewrite(out, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckFailed, match="parameters missing: 'model.norm.weight'"):
        check_transformers(out, [model])


def test_loader_reports_stay_off_the_terminal_where_ci_is_set(monkeypatch):
    """transformers lets its logs propagate to the root logger when the environment has CI=true: the loading report
    of a check must still be collected, not printed as a warning of ours (which broke the one-line error)."""
    import logging

    from surgery.io.loader_check import _quiet
    from transformers.utils import logging as transformers_logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen: list[str] = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    transformers_logging.get_verbosity()  # configures transformers' root logger
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    ours = Keep()
    logging.getLogger().addHandler(ours)
    try:
        with _quiet() as messages:
            logging.getLogger("transformers.modeling_utils").warning("LlamaForCausalLM LOAD REPORT")
        assert messages == ["LlamaForCausalLM LOAD REPORT"] and ours.seen == []
        assert logging.getLogger("transformers").propagate is True  # restored
        logging.getLogger("surgery.test").warning("a warning of ours")
        assert ours.seen == ["a warning of ours"]  # the handler does see what reaches the root logger
    finally:
        logging.getLogger().removeHandler(ours)
