"""mergekit parity: the same mergekit YAML config run by mergekit and by `surgery merge --recipe` gives the same
float32 tensors (within 1e-6) for the deterministic methods both implement."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_helpers import MERGEKIT, assert_same_as_mergekit, save_family


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    if not MERGEKIT.exists():
        pytest.fail("mergekit is not installed (make test installs it with the test extra)")
    return {arch: save_family(tmp_path_factory.mktemp("parity"), arch, 3) for arch in ("llama", "qwen2")}


def configs(base: Path, ft: list[Path]) -> dict[str, dict]:
    b, m1, m2, m3 = str(base), str(ft[0]), str(ft[1]), str(ft[2])
    return {
        "linear": {"models": [{"model": m1, "parameters": {"weight": 1.0}}, {"model": m2, "parameters": {"weight": 3.0}}]},
        "task_arithmetic": {"base_model": b, "parameters": {"lambda": 0.7},
                            "models": [{"model": m1, "parameters": {"weight": 0.6}},
                                       {"model": m2, "parameters": {"weight": [0.2, 0.9]}}]},
        "ties": {"base_model": b, "parameters": {"lambda": 1.1, "density": 0.2},
                 "models": [{"model": m1, "parameters": {"weight": 1.0}},
                            {"model": m2, "parameters": {"weight": 0.5, "density": 0.35}},
                            {"model": m3, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 1.0}]}}]},
        "breadcrumbs": {"base_model": b, "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.7}},
                                                   {"model": m2, "parameters": {"weight": 0.5, "density": 0.6}}]},
        "breadcrumbs_ties": {"base_model": b, "models": [
            {"model": m1, "parameters": {"weight": 1.0, "density": 0.7, "gamma": 0.05}},
            {"model": m2, "parameters": {"weight": 0.8, "density": 0.5}}]},
        "slerp": {"base_model": b, "models": [{"model": b}, {"model": m1}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.4}]}},
        "model_stock": {"base_model": b, "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
    }


CASES = [(method, "llama") for method in ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                                           "slerp", "model_stock")] + [("ties", "qwen2"), ("slerp", "qwen2")]


@pytest.mark.parametrize("method,arch", CASES)
def test_same_tensors_as_mergekit(method, arch, paths, tmp_path):
    base, *fine_tunes = paths[arch]
    config = {"merge_method": method, "dtype": "float32", **configs(base, fine_tunes)[method]}
    assert_same_as_mergekit(config, tmp_path, f"{method} {arch}")


@pytest.fixture(scope="module")
def shared_tokenizer(tmp_path_factory):
    """A llama base and two fine-tunes sharing one tokenizer of 103 tokens (160 embedding rows)."""
    from conftest import save_tokenizer

    family = save_family(tmp_path_factory.mktemp("parity-tokenizer"), "llama", 2)
    for path in family:
        save_tokenizer(path)
    return family


def test_tokenizer_pad_to_multiple_of_as_mergekit(shared_tokenizer, tmp_path):
    """`tokenizer: {source: base, pad_to_multiple_of: 64}`: 128 rows (103 tokens, then their mean), as mergekit."""
    b, m1, m2 = map(str, shared_tokenizer)
    config = {"merge_method": "ties", "dtype": "float32", "base_model": b, "parameters": {"density": 0.3},
              "models": [{"model": m1, "parameters": {"weight": 1.0}}, {"model": m2, "parameters": {"weight": 0.5}}],
              "tokenizer": {"source": "base", "pad_to_multiple_of": 64}}
    assert_same_as_mergekit(config, tmp_path, "ties tokenizer pad_to_multiple_of 64")


# mergekit 0.1.5's other methods: every config through its Python API in one subprocess (importing mergekit takes
# most of a run's time), then each through `surgery merge --recipe`
MERGEKIT_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out, options=MergeOptions(quiet=True))
"""


def more_configs(base: Path, ft: list[Path]) -> dict[str, dict]:
    """Per-model weights (one a gradient, one a filter), gradients and filters of the global parameters."""
    b, m1, m2, m3 = str(base), str(ft[0]), str(ft[1]), str(ft[2])
    return {
        "nuslerp": {"models": [{"model": m1, "parameters": {"weight": [0.2, 0.9]}},
                               {"model": m2, "parameters": {"weight": 0.6}}]},
        "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": b, "parameters": {"nuslerp_flatten": False},
                              "models": [{"model": m1, "parameters": {"weight": 1.0}},
                                         {"model": m2, "parameters": {"weight": 3.0}}]},
        "nuslerp_columns": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False,
                                                                      "nuslerp_row_wise": True},
                            "models": [{"model": m1, "parameters": {"weight": 0.5}},
                                       {"model": m2, "parameters": {"weight": 0.25}}]},
        "multislerp": {"models": [{"model": m1, "parameters": {"weight": 1.0}},
                                  {"model": m2, "parameters": {"weight": [{"filter": "mlp", "value": 3.0},
                                                                          {"value": 0.5}]}},
                                  {"model": m3, "parameters": {"weight": [0.1, 0.7]}}]},
        "multislerp_base": {"merge_method": "multislerp", "base_model": b,
                            "parameters": {"normalize_weights": False},
                            "models": [{"model": m1, "parameters": {"weight": 0.3}},
                                       {"model": m2, "parameters": {"weight": 0.6}}]},
        "karcher": {"parameters": {"max_iter": 25, "tol": 1e-7},
                    "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
        "karcher_base": {"merge_method": "karcher", "base_model": b, "models": [{"model": m1}, {"model": m2}]},
        "sce": {"base_model": b, "parameters": {"select_topk": [0.2, 0.9]},
                "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
        "sce_all": {"merge_method": "sce", "base_model": b, "models": [{"model": m1}, {"model": m2}]},
        "nearswap": {"base_model": b, "parameters": {"t": [{"filter": "self_attn", "value": [0.001, 0.02]},
                                                           {"value": 0.01}]},
                     "models": [{"model": m1}]},
        "arcee_fusion": {"base_model": b, "models": [{"model": m1}]},
        "ram": {"base_model": b, "parameters": {"epsilon": 0.02}, "models": [{"model": m1}, {"model": m2},
                                                                            {"model": m3}]},
        "ramplus_tl": {"base_model": b, "parameters": {"r": [0.5, 2.0], "alpha": 0.8, "epsilon": 0.015},
                       "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
    }


MORE_CASES = [(name, "llama") for name in ("nuslerp", "nuslerp_base_rows", "nuslerp_columns", "multislerp",
                                           "multislerp_base", "karcher", "karcher_base", "sce", "sce_all", "nearswap",
                                           "arcee_fusion", "ram", "ramplus_tl")]
MORE_CASES += [(name, "qwen2") for name in ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion",
                                            "ram", "ramplus_tl")]


@pytest.fixture(scope="module")
def mergekit_outputs(paths, tmp_path_factory):
    """Each of MORE_CASES merged by mergekit: (config file, output directory) by case."""
    import subprocess
    import sys

    import yaml

    root = tmp_path_factory.mktemp("mergekit-more")
    runs, arguments = {}, []
    for name, arch in MORE_CASES:
        base, *fine_tunes = paths[arch]
        config = {"dtype": "float32", "merge_method": name, **more_configs(base, fine_tunes)[name]}
        recipe, out = root / f"{name}-{arch}.yml", root / f"{name}-{arch}"
        recipe.write_text(yaml.safe_dump(config))
        runs[name, arch] = recipe, out
        arguments += [str(recipe), str(out)]
    done = subprocess.run([sys.executable, "-c", MERGEKIT_SCRIPT, *arguments], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


@pytest.mark.parametrize("name,arch", MORE_CASES)
def test_more_methods_same_tensors_as_mergekit(name, arch, mergekit_outputs, tmp_path):
    """nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl: mergekit's YAML, its tensors."""
    import numpy as np

    from conftest import run_surgery
    from merge_helpers import read_numpy

    recipe, theirs_dir = mergekit_outputs[name, arch]
    result = run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "surgery")
    assert result.returncode == 0, result.stderr
    ours, theirs = read_numpy(tmp_path / "surgery"), read_numpy(theirs_dir)
    assert ours.keys() == theirs.keys()
    for tensor in ours:
        np.testing.assert_allclose(ours[tensor], theirs[tensor], rtol=0, atol=1e-6, err_msg=f"{name} {arch} {tensor}")
