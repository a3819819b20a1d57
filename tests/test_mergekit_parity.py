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
