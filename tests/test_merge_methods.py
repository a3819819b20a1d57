"""Every merge method against an independent float64 implementation of its formula, on two architectures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_surgery
from merge_helpers import read_numpy, save_family

ARCHITECTURES = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: save_family(root, arch, 3) for arch in ARCHITECTURES}


def top_k_keep(delta: np.ndarray, density: float) -> np.ndarray:
    k = max(1, int(density * delta.size))
    order = np.argsort(-np.abs(delta).ravel(), kind="stable")
    mask = np.zeros(delta.size, bool)
    mask[order[:k]] = True
    return delta * mask.reshape(delta.shape)


def ties_reference(base, models, weights, density, lam):
    deltas = np.stack([top_k_keep(m - base, density) for m in models]) * np.reshape(weights, (-1,) + (1,) * base.ndim)
    elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == elected
    w = np.reshape(weights, (-1,) + (1,) * base.ndim) * agree
    divisor = w.sum(0)
    divisor[divisor == 0] = 1
    return base + lam * (deltas * agree).sum(0) / divisor


def breadcrumbs_keep(delta, density, gamma):
    n = delta.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = np.argsort(np.abs(delta).ravel(), kind="stable")  # ascending
    mask = np.zeros(n, bool)
    mask[order[bottom:bottom + target]] = True
    return delta * mask.reshape(delta.shape)


def slerp_reference(a, b, t):
    ua, ub = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
    dot = float(np.clip(ua @ ub, -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def model_stock_reference(base, models):
    deltas = [(m - base).ravel() for m in models]
    cosines = [deltas[i] @ deltas[j] / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
               for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    c, n = np.mean(cosines), len(models)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(models, axis=0) + (1 - t) * base


CASES = {
    "linear": (["--weights", "1,2,0.5"], lambda b, ms: (ms[0] + 2 * ms[1] + 0.5 * ms[2]) / 3.5),
    "task_arithmetic": (["--weights", "0.7,0.3", "--lambda", "0.8"],
                        lambda b, ms: b + 0.8 * (0.7 * (ms[0] - b) + 0.3 * (ms[1] - b))),
    "ties": (["--weights", "1,0.5", "--density", "0.3", "--lambda", "1.2"],
             lambda b, ms: ties_reference(b, ms[:2], [1, 0.5], 0.3, 1.2)),
    "breadcrumbs": (["--density", "0.6", "--gamma", "0.05"],
                    lambda b, ms: b + sum(breadcrumbs_keep(m - b, 0.6, 0.05) for m in ms[:2])),
    "slerp": (["--t", "0.3"], lambda b, ms: slerp_reference(b, ms[0], 0.3)),
    "model_stock": ([], lambda b, ms: model_stock_reference(b, ms[:2])),
}
MODELS_USED = {"linear": 3, "task_arithmetic": 2, "ties": 2, "breadcrumbs": 2, "slerp": 1, "model_stock": 2}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(MODELS_USED))
def test_method_matches_formula(method, arch, families, tmp_path):
    paths = families[arch]
    options, reference = CASES[method]
    inputs = paths[1:4] if method == "linear" else paths[:1 + MODELS_USED[method]]
    result = run_surgery("merge", *inputs, "--method", method, *options, "-o", tmp_path / "out", "--dtype",
                         "float32")
    assert result.returncode == 0, result.stderr
    merged = read_numpy(tmp_path / "out")
    tensors = [read_numpy(p) for p in paths]
    assert merged.keys() == tensors[0].keys()
    for name, value in merged.items():
        expected = reference(tensors[0][name], [t[name] for t in tensors[1:]])
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=f"{method} {arch} {name}")


def test_passthrough_copies_the_model(families, tmp_path):
    paths = families["llama"]
    assert run_surgery("merge", paths[2], "--method", "passthrough", "-o", tmp_path / "out").returncode == 0
    merged, source = read_numpy(tmp_path / "out"), read_numpy(paths[2])
    assert all(np.array_equal(merged[n], source[n]) for n in source)


def test_breadcrumbs_ties_and_della_structure(families, tmp_path):
    """breadcrumbs_ties = breadcrumbs trimming + TIES election; della with ε→ small behaves like DARE-TIES."""
    paths = families["llama"]
    result = run_surgery("merge", *paths[:3], "--method", "breadcrumbs_ties", "--density", "0.5", "--gamma", "0.1",
                         "-o", tmp_path / "bt", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    merged = read_numpy(tmp_path / "bt")
    tensors = [read_numpy(p) for p in paths[:3]]
    for name, value in merged.items():
        base = tensors[0][name]
        deltas = np.stack([breadcrumbs_keep(t[name] - base, 0.5, 0.1) for t in tensors[1:]])
        elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == elected
        expected = base + (deltas * agree).sum(0)  # breadcrumbs_ties does not normalize by default
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
