"""``surgery merge-multi``: mergekit-multi's multi-document configs. Every output equals mergekit-multi's own (0.1.5,
installed with the tests) within 1e-6; laziness skips only what is up to date, and rebuilds what reads a rebuilt
merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_surgery
from merge_helpers import read_numpy, save_family

MERGEKIT_MULTI = Path(sys.executable).parent / "mergekit-multi"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return save_family(tmp_path_factory.mktemp("multi"), "llama", 3)


def multi_config(models: list[Path], density: float = 0.5) -> str:
    base, ft1, ft2, ft3 = map(str, models)
    documents = [
        {"name": "pair", "merge_method": "linear", "models": [{"model": ft1, "parameters": {"weight": 0.6}},
                                                             {"model": ft2, "parameters": {"weight": 0.4}}],
         "dtype": "float32"},
        {"merge_method": "slerp", "base_model": "pair", "models": [{"model": "pair"}, {"model": "tied"}],
         "parameters": {"t": 0.3}, "dtype": "float32"},  # the final merge, before the one it reads
        {"name": "tied", "merge_method": "ties", "base_model": base,
         "models": [{"model": "pair"}, {"model": ft3}], "parameters": {"density": density, "weight": 1.0},
         "dtype": "float32"},
    ]
    return yaml.safe_dump_all(documents)


def test_outputs_equal_mergekit_multi(models, tmp_path):
    config = tmp_path / "multi.yaml"
    config.write_text(multi_config(models))
    done = subprocess.run([str(MERGEKIT_MULTI), str(config), "--intermediate-dir", str(tmp_path / "theirs"),
                           "--out-path", str(tmp_path / "theirs-final")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = run_surgery("merge-multi", config, "-I", tmp_path / "ours", "-o", tmp_path / "ours-final", "--json")
    assert result.returncode == 0, result.stderr
    steps = json.loads(result.stdout)["steps"]
    assert [step["name"] for step in steps] == ["pair", "tied", None] and all(step["ran"] for step in steps)
    for ours, theirs in (("ours/pair", "theirs/pair"), ("ours/tied", "theirs/tied"), ("ours-final", "theirs-final")):
        mine, reference = read_numpy(tmp_path / ours), read_numpy(tmp_path / theirs)
        assert mine.keys() == reference.keys()
        for name in mine:
            np.testing.assert_allclose(mine[name], reference[name], rtol=0, atol=1e-6, err_msg=f"{ours} {name}")
    recipe = json.loads((tmp_path / "ours-final" / "surgery.json").read_text())["recipe"]
    assert recipe["base"] == str(tmp_path / "ours" / "pair")


def test_lazy_skips_what_is_up_to_date_and_rebuilds_what_reads_a_rebuilt_merge(models, tmp_path):
    config = tmp_path / "multi.yaml"
    config.write_text(multi_config(models))
    argv = ["merge-multi", config, "-I", tmp_path / "work", "-o", tmp_path / "final", "--json"]
    first = run_surgery(*argv)
    assert first.returncode == 0, first.stderr
    final_bytes = (tmp_path / "final" / "model.safetensors").read_bytes()
    again = json.loads(run_surgery(*argv).stdout)["steps"]
    assert [step["ran"] for step in again] == [False, False, False]
    config.write_text(multi_config(models, density=0.3))  # changes "tied" only: the final merge reads it
    changed = json.loads(run_surgery(*argv).stdout)["steps"]
    assert [(step["name"], step["ran"]) for step in changed] == [("pair", False), ("tied", True), (None, True)]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() != final_bytes
    forced = json.loads(run_surgery(*argv, "--no-lazy").stdout)["steps"]
    assert all(step["ran"] for step in forced)


@pytest.mark.parametrize("documents, message", [
    ([{"name": "a", "merge_method": "linear", "models": ["b", "MODEL_X"]},
      {"name": "b", "merge_method": "linear", "models": ["a", "MODEL_X"]}], "read each other's outputs (a cycle)"),
    ([{"name": "a", "merge_method": "linear", "models": ["a", "MODEL_X"]}], "merge 'a' reads its own output"),
    ([{"name": "a", "merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]},
      {"name": "a", "merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]}], "name 'a' is used twice"),
    ([{"merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]}, {"merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]}],
     "a second merge without a name"),
    ([{"name": "../up", "merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]}], "must be a non-empty directory name"),
    ([{"name": "a", "models": ["MODEL_X", "MODEL_Y"]}], "not a mergekit merge config"),
    ([{"name": "a", "merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"]},
      {"merge_method": "linear", "models": ["aa", "MODEL_X"]}], "model 'aa' is no merge named in this file"),
    ([{"name": "a", "merge_method": "linear", "models": ["MODEL_X", "MODEL_Y"], "typo": 1}], "unknown mergekit key(s) typo"),
])
def test_bad_files_are_one_line_errors_before_anything_runs(models, tmp_path, documents, message):
    config = tmp_path / "multi.yaml"
    text = yaml.safe_dump_all(documents).replace("MODEL_X", str(models[1])).replace("MODEL_Y", str(models[2]))
    config.write_text(text)
    result = run_surgery("merge-multi", config, "-I", tmp_path / "work", "-o", tmp_path / "final")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "final").exists() and not any((tmp_path / "work").glob("*"))


def test_an_unnamed_merge_needs_an_output(models, tmp_path):
    config = tmp_path / "multi.yaml"
    config.write_text(yaml.safe_dump_all([{"merge_method": "linear", "models": [str(models[1]), str(models[2])]}]))
    result = run_surgery("merge-multi", config, "-I", tmp_path / "work")
    assert result.returncode == 2 and "give -o OUTPUT" in result.stderr
