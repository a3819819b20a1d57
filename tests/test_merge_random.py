"""DARE and DELLA: seeded masks (same seed → identical bytes), kept fractions, and both rescale rules."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_surgery
from merge_helpers import read_numpy, save_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("random"), "llama", 2)


def merge(family, out, *options):
    result = run_surgery("merge", *family, *options, "-o", out, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    return read_numpy(out)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_seed_identical_bytes_other_seed_differs(method, family, tmp_path):
    options = ["--method", method, "--density", "0.4", "--seed", "7"]
    for name in ("a", "b"):
        merge(family, tmp_path / name, *options)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    other = merge(family, tmp_path / "c", "--method", method, "--density", "0.4", "--seed", "8")
    first = read_numpy(tmp_path / "a")
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_dare_keeps_density_and_rescales(family, tmp_path):
    base, tuned = read_numpy(family[0]), read_numpy(family[1])
    inverse = merge(family[:2], tmp_path / "inverse", "--method", "dare_linear", "--density", "0.3",
                    "--dare-rescale", "inverse")
    l1 = merge(family[:2], tmp_path / "l1", "--method", "dare_linear", "--density", "0.3")
    name = "model.layers.0.mlp.up_proj.weight"  # 8192 entries
    delta = tuned[name] - base[name]
    kept_inverse = inverse[name] - base[name]
    kept = kept_inverse != 0
    assert abs(kept.mean() - 0.3) < 0.03
    np.testing.assert_allclose(kept_inverse[kept], delta[kept] / 0.3, rtol=1e-5, atol=1e-7)  # the paper's 1/p
    kept_l1 = l1[name] - base[name]
    assert np.array_equal(kept_l1 != 0, kept)  # same seed, same mask, whatever the rescale
    assert abs(np.abs(kept_l1).sum() - np.abs(delta).sum()) < 1e-4 * np.abs(delta).sum()  # mergekit's L1 rule


def test_della_keeps_large_entries_more_often(family, tmp_path):
    base, tuned = read_numpy(family[0]), read_numpy(family[1])
    merged = merge(family[:2], tmp_path / "della", "--method", "della_linear", "--density", "0.5", "--epsilon",
                   "0.3", "--dare-rescale", "none")
    name = "model.embed_tokens.weight"
    delta, kept = tuned[name] - base[name], (merged[name] - base[name]) != 0
    magnitude = np.abs(delta)
    small, large = magnitude < np.quantile(magnitude, 0.2), magnitude > np.quantile(magnitude, 0.8)
    assert abs(kept.mean() - 0.5) < 0.03
    assert kept[large].mean() > 0.7 and kept[small].mean() < 0.3  # probabilities 0.2 → 0.8 by rank


def test_density_one_dare_is_task_arithmetic(family, tmp_path):
    dare = merge(family, tmp_path / "dare", "--method", "dare_linear", "--density", "1", "--weights", "0.5,0.5")
    ta = merge(family, tmp_path / "ta", "--method", "task_arithmetic", "--weights", "0.5,0.5")
    assert all(np.array_equal(dare[n], ta[n]) for n in ta)
