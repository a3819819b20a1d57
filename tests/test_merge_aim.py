"""`surgery calibrate` and `surgery merge --aim`: the merged change scaled per input channel, checked against the
AIM formula written here from the statistics file and a plain merge."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import logits, run_surgery, save_tokenizer
from merge_helpers import read_numpy, save_family
from surgery.errors import BadInput
from surgery.merge import MergeJob, Recipe, merge

CALIBRATION = " ".join(f"w{(7 * i) % 100}" for i in range(300))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("aim")
    base, ft1, ft2 = save_family(root, "llama", 2, attention_bias=True)  # biases are left alone
    for path in (base, ft1, ft2):
        save_tokenizer(path)
    text = root / "calibration.txt"
    text.write_text(CALIBRATION)
    stats = root / "base.aim.safetensors"
    result = run_surgery("calibrate", base, "--calibration", text, "--max-tokens", "200", "-o", stats, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == 200
    plain = root / "ties"
    result = run_surgery("merge", base, ft1, ft2, "--method", "ties", "--density", "0.5", "-o", plain)
    assert result.returncode == 0, result.stderr
    return {"models": (base, ft1, ft2), "text": text, "stats": stats, "plain": plain, "root": root}


def expected_aim(base: dict, plain: dict, stats_file, omega: float) -> dict:
    with safe_open(str(stats_file), framework="np") as handle:
        stats = {name: handle.get_tensor(name).astype(np.float64) for name in handle.keys()}
    expected = {}
    for name, merged in plain.items():
        if name in stats:
            r = 1 - stats[name] / stats[name].max() * (1 - omega)
            expected[name] = base[name] + (merged - base[name]) * r  # r over the last (input) dimension
        else:
            expected[name] = merged
    return expected


def test_aim_ties_scales_each_change_by_its_input_channel(setup, tmp_path):
    base, ft1, ft2 = setup["models"]
    result = run_surgery("merge", base, ft1, ft2, "--method", "ties", "--density", "0.5", "--aim", "--omega", "0.4",
                         "--stats", setup["stats"], "-o", tmp_path / "aim")
    assert result.returncode == 0, result.stderr
    out, plain = read_numpy(tmp_path / "aim"), read_numpy(setup["plain"])
    expected = expected_aim(read_numpy(base), plain, setup["stats"], 0.4)
    for name in out:
        np.testing.assert_allclose(out[name], expected[name], rtol=0, atol=2e-6, err_msg=name)
    changed = [n for n in out if not np.array_equal(out[n], plain[n])]
    assert any(".mlp.down_proj." in n for n in changed) and any("norm" in n for n in changed)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert np.array_equal(out[name], plain[name]), name  # embeddings keep the merge, biases untouched
    manifest = json.loads((tmp_path / "aim" / "surgery.json").read_text())
    assert manifest["recipe"]["aim"]["omega"] == 0.4
    assert "AIM" in (tmp_path / "aim" / "README.md").read_text()
    assert torch.isfinite(logits(tmp_path / "aim", torch.tensor([[1, 4, 9]]))).all()


def test_calibrating_during_the_merge_gives_the_same_bytes(setup, tmp_path):
    base, ft1, ft2 = setup["models"]
    for name, extra in (("stats", ["--stats", setup["stats"]]),
                        ("text", ["--calibration", setup["text"], "--max-tokens", "200"])):
        result = run_surgery("merge", base, ft1, ft2, "--method", "task_arithmetic", "--aim", *extra,
                             "-o", tmp_path / name)
        assert result.returncode == 0, result.stderr
    for shard in (tmp_path / "stats").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "text" / shard.name).read_bytes()


def test_aim_errors_are_one_line(setup, tmp_path):
    base, ft1, ft2 = setup["models"]
    result = run_surgery("merge", base, ft1, ft2, "--method", "ties", "--omega", "0.3", "-o", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "surgery: error: --omega: applies only with --aim"]
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.norm.weight": torch.ones(5)}, wrong, metadata={"format": "surgery-aim-stats/1"})
    cases = [
        ("linear", {"stats": str(setup["stats"])}, "aim: needs one base model"),
        ("ties", {"omega": 1.5, "stats": str(setup["stats"])}, "omega 1.5"),
        ("ties", {"stats": str(wrong)}, "'model.norm.weight' has (5,) statistics"),
        ("ties", {"stats": str(setup["text"])}, "not an AIM statistics file"),
        ("ties", {"stats": str(setup["stats"]), "calibration": str(setup["text"])}, "not both"),
    ]
    for method, settings, message in cases:
        with pytest.raises(BadInput, match=re.escape(message)):
            recipe = Recipe.from_dict({"method": method, "models": [str(p) for p in (base, ft1, ft2)],
                                       "aim": settings})
            merge(MergeJob(recipe, tmp_path / "out"))
        assert not (tmp_path / "out").exists()
