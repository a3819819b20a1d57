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


def _unit(v):
    return v / np.linalg.norm(v)


def nuslerp_reference(t, a, b):
    """SLERP of the flattened a and b, however close to colinear (nuslerp interpolates linearly only at exactly
    parallel vectors, slerp's reference above from |cos| > 0.9995)."""
    theta = math.acos(float(np.clip(_unit(a.ravel()) @ _unit(b.ravel()), -1, 1)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp_rows_reference(t, a, b):
    """SLERP of each row of a and b (a vector: itself)."""
    if a.ndim == 1:
        return nuslerp_reference(t, a, b)
    return np.stack([nuslerp_reference(t, x, y) for x, y in zip(a, b)])


def multislerp_reference(models, weights):
    weights = np.asarray(weights) / np.sum(weights)
    flat = [m.ravel() for m in models]
    units = [_unit(v) for v in flat]
    mean = _unit(sum(w * u for w, u in zip(weights, units)))
    tangent = sum(w * (u - (u @ mean) * mean) for w, u in zip(weights, units))
    length = np.linalg.norm(tangent)
    point = math.cos(length) * mean + math.sin(length) * tangent / length
    return (point * sum(w * np.linalg.norm(v) for w, v in zip(weights, flat))).reshape(models[0].shape)


def karcher_reference(models, steps=200):
    """The Fréchet mean on the sphere by Riemannian gradient descent to convergence, times the mean norm."""
    units = [_unit(m.ravel()) for m in models]
    mean = _unit(sum(units))
    for _ in range(steps):
        logs = []
        for u in units:
            theta = math.acos(np.clip(mean @ u, -1, 1))
            logs.append(0 * u if theta < 1e-12 else theta / math.sin(theta) * (u - math.cos(theta) * mean))
        step = sum(logs) / len(units)
        length = np.linalg.norm(step)
        if length < 1e-12:
            break
        mean = _unit(math.cos(length) * mean + math.sin(length) * step / length)
    return (mean * np.mean([np.linalg.norm(m) for m in models])).reshape(models[0].shape)


def sce_reference(base, models):
    deltas = np.stack([m - base for m in models])
    elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    energies = np.array([np.mean(d ** 2) for d in deltas])
    weights = (energies / energies.sum()).reshape((-1,) + (1,) * base.ndim) * (np.sign(deltas) == elected)
    return base + (deltas * weights).sum(0) / np.maximum(weights.sum(0), 1e-6)


def ram_reference(base, models, epsilon):
    deltas = np.stack([m - base for m in models])
    changed = np.abs(deltas) > epsilon
    return base + (deltas * changed).sum(0) / np.maximum(changed.sum(0), 1)


def nearswap_reference(base, model, t):
    share = np.clip(t / np.maximum(np.abs(base - model), 1e-6), 0, 1)
    return share * model + (1 - share) * base


def arcee_fusion_reference(base, model):
    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(model) + 1e-8, softmax(base) + 1e-8
    importance = np.abs(model - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    q1, median, q3 = np.quantile(importance, [0.25, 0.5, 0.75], method="lower")
    threshold = median + 1.5 * (q3 - q1)
    merged = base + (model - base) * (importance >= threshold)
    # float32 KL of near-equal rows is exact to ~1e-4 relative: entries that close to the threshold may be either
    borderline = np.broadcast_to(np.abs(importance - threshold) <= 1e-3 * threshold, merged.shape)
    return np.where(borderline, np.nan, merged)


# method → (options, which of base/ft1/ft2/ft3 go in, the float64 formula on (base, [ft1, ft2, ft3]))
MERGEKIT_METHODS = {
    "nuslerp": (["--weights", "1,3"], "with --base", lambda b, ms: b + nuslerp_reference(0.75, ms[0] - b, ms[1] - b)),
    "nuslerp_rows": (["--weights", "2,1", "--no-nuslerp-flatten"], "models 1-2",
                     lambda b, ms: nuslerp_rows_reference(1 / 3, ms[0], ms[1])),
    "multislerp": (["--weights", "1,2,0.5"], "models 1-3", lambda b, ms: multislerp_reference(ms, [1, 2, 0.5])),
    "karcher": (["--max-iter", "100", "--tol", "1e-9"], "models 1-3", lambda b, ms: karcher_reference(ms)),
    "sce": ([], "base first", lambda b, ms: sce_reference(b, ms)),
    "ram": (["--epsilon", "0.02"], "base first", lambda b, ms: ram_reference(b, ms, 0.02)),
    "nearswap": (["--t", "0.01"], "base and ft1", lambda b, ms: nearswap_reference(b, ms[0], 0.01)),
    "arcee_fusion": ([], "base and ft1", lambda b, ms: arcee_fusion_reference(b, ms[0])),
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_METHODS))
def test_mergekit_method_matches_formula(case, families, tmp_path):
    """mergekit's other methods from the command line, against float64 formulas written here (the optional base
    of nuslerp named with --base, nearswap's required --t)."""
    paths = families["qwen2"]
    options, inputs, reference = MERGEKIT_METHODS[case]
    chosen = {"with --base": [*paths[1:3], "--base", paths[0]], "models 1-2": paths[1:3], "models 1-3": paths[1:4],
              "base first": paths, "base and ft1": paths[:2]}[inputs]
    result = run_surgery("merge", *chosen, "--method", case.split("_rows")[0], *options, "-o", tmp_path / "out",
                         "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    merged, tensors = read_numpy(tmp_path / "out"), [read_numpy(p) for p in paths]
    assert merged.keys() == tensors[0].keys()
    for name, value in merged.items():
        expected = reference(tensors[0][name], [t[name] for t in tensors[1:]])
        either = np.isnan(expected)  # arcee_fusion's borderline entries: the base's or the model's value
        assert either.mean() < 0.01
        allowed = (np.isclose(value, tensors[0][name], rtol=0, atol=1e-7)
                   | np.isclose(value, tensors[1][name], rtol=0, atol=1e-7))
        assert allowed[either].all(), f"{case} {name}"
        np.testing.assert_allclose(value[~either], expected[~either], rtol=1e-5, atol=2e-6, err_msg=f"{case} {name}")


def test_mergekit_methods_refuse_what_they_cannot_use(families, tmp_path):
    """One line, exit 2, nothing written: nearswap without t, karcher given a base, nuslerp with three models."""
    base, ft1, ft2, ft3 = families["llama"]
    for arguments, message in (
            ([base, ft1, "--method", "nearswap"], "method 'nearswap' needs parameter 't'"),
            ([ft1, ft2, "--base", base, "--method", "karcher"], "--base: method 'karcher' does not use a base model"),
            ([ft1, ft2, ft3, "--method", "nuslerp"], "--method nuslerp: takes at most 2 model(s) besides the base"),
            ([base, ft1, "--method", "nearswap", "--t", "0"], "parameter t 0.0 (global): must be in (0, 1]")):
        result = run_surgery("merge", *arguments, "-o", tmp_path / "out")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "out").exists()
