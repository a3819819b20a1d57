"""SVD-based merges (star, tsv, lore, svd) against independent float64 numpy implementations of their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import logits, run_surgery
from merge_helpers import read_numpy, save_family
from surgery.merge.registry import TensorMerge
from surgery.merge.spectral import gram_spectrum, lore, star, svd, top_singular_triplets, tsv


def star_reference(base, models, weights, eta=0.4, lam=1.0, rank=None):
    truncated = []
    for model in models:
        u, s, vt = np.linalg.svd(model - base, full_matrices=False)
        r = rank if rank is not None else int(np.searchsorted(np.cumsum(s), eta * s.sum() * (1 - 1e-9))) + 1
        kept = s[:r] * (s.sum() / s[:r].sum())
        truncated.append((u[:, :r] * kept) @ vt[:r])
    w = np.asarray(weights)
    return base + lam * np.tensordot(w, np.stack(truncated), axes=1) / w.sum()


def polar(matrix):
    p, _, qt = np.linalg.svd(matrix, full_matrices=False)
    return p @ qt


def tsv_reference(base, models, weights, lam=1.0, rank=None):
    rows, cols = base.shape
    k = (rank or min(rows, cols)) // len(models)
    us, ss, vs = [], [], []
    for model, w in zip(models, weights):
        u, s, vt = np.linalg.svd(model - base, full_matrices=False)
        us.append(u[:, :k]), ss.append(w * s[:k]), vs.append(vt[:k].T)
    return base + lam * (polar(np.hstack(us)) * np.concatenate(ss)) @ polar(np.hstack(vs)).T


def lore_reference(models, weights, mu=0.1, lam=1.0, rounds=10):
    models = np.stack(models)
    tau = [mu * np.linalg.norm(m - models.mean(0), 2) for m in models]
    deltas = np.zeros_like(models)
    for _ in range(rounds):
        base = (models - deltas).mean(0)
        for i, m in enumerate(models):
            u, s, vt = np.linalg.svd(m - base, full_matrices=False)
            deltas[i] = (u * np.maximum(s - tau[i], 0)) @ vt
    return base + lam * np.tensordot(np.asarray(weights), deltas, axes=1)


def low_rank_models(count, rows=48, cols=32, seed=0):
    """A base and ``count`` models whose task vectors have decaying spectra (as fine-tunes do)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(rows, cols))
    models = []
    for _ in range(count):
        u, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
        v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
        models.append(base + (u * 0.1 * 0.8 ** np.arange(cols)) @ v.T)
    return base, models


def run(method, base, models, weights=None, **parameters):
    weights = weights or [1.0] * len(models)
    parameters = {("lambda" if key == "lambda_" else key): value for key, value in parameters.items()}
    x = TensorMerge(name="w", base=None if base is None else torch.tensor(base, dtype=torch.float32),
                    models=[torch.tensor(m, dtype=torch.float32) for m in models],
                    parameters={"weight": weights, **parameters}, is_matrix=True)
    return method(x).to(torch.float64).numpy()


@pytest.mark.parametrize("count", [1, 3])
def test_star_matches_formula(count):
    base, models = low_rank_models(count)
    np.testing.assert_allclose(run(star, base, models, [1.0, 0.5, 2.0][:count], eta=0.3, lambda_=0.8),
                               star_reference(base, models, [1.0, 0.5, 2.0][:count], eta=0.3, lam=0.8), atol=2e-5)
    np.testing.assert_allclose(run(star, base, models, rank=3), star_reference(base, models, [1.0] * count, rank=3),
                               atol=2e-5)


def test_star_keeps_the_nuclear_norm_and_the_rank():
    base, (model,) = low_rank_models(1)
    delta = run(star, base, [model], eta=0.5) - base
    s_in, s_out = np.linalg.svd(model - base, compute_uv=False), np.linalg.svd(delta, compute_uv=False)
    expected_rank = int(np.argmax(np.cumsum(s_in) >= 0.5 * s_in.sum())) + 1
    assert (s_out > 1e-4 * s_out[0]).sum() == expected_rank < len(s_in)  # the rest is float32 round-off
    assert np.isclose(s_out[:expected_rank].sum(), s_in.sum(), rtol=1e-5)


@pytest.mark.parametrize("rank", [None, 12])
def test_tsv_matches_formula(rank):
    base, models = low_rank_models(3)
    weights = [1.0, 0.7, 1.3]
    np.testing.assert_allclose(run(tsv, base, models, weights, lambda_=0.9, rank=rank),
                               tsv_reference(base, models, weights, lam=0.9, rank=rank), atol=2e-5)


def test_tsv_of_one_task_vector_at_full_rank_is_task_arithmetic():
    base, models = low_rank_models(1)
    np.testing.assert_allclose(run(tsv, base, models), models[0], atol=2e-5)


def test_svd_is_star_for_one_model_and_tsv_for_more():
    base, models = low_rank_models(2)
    np.testing.assert_allclose(run(svd, base, models[:1]), star_reference(base, models[:1], [1.0]), atol=2e-5)
    np.testing.assert_allclose(run(svd, base, models), tsv_reference(base, models, [1.0, 1.0]), atol=2e-5)


def test_lore_matches_formula_without_a_base():
    _, models = low_rank_models(3)
    np.testing.assert_allclose(run(lore, None, models, [1.0, 0.5, 1.0], mu=0.2, lambda_=0.7),
                               lore_reference(models, [1.0, 0.5, 1.0], mu=0.2, lam=0.7), atol=2e-5)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_singular_values_from_the_gram_matrix(shape):
    matrices = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -6, shape[1])
    expected = np.linalg.svd(matrices.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(gram_spectrum(matrices)[0].numpy(), expected, rtol=0, atol=1e-7 * expected.max())


def test_randomised_top_triplets_match_the_full_svd_and_are_reproducible():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(700, 600)))
    v, _ = np.linalg.qr(rng.normal(size=(600, 600)))
    matrix = torch.tensor((u * 0.97 ** np.arange(600)) @ v.T, dtype=torch.float32)[None]
    first = top_singular_triplets(matrix, 20, torch.Generator().manual_seed(3))
    second = top_singular_triplets(matrix, 20, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    exact = np.linalg.svd(matrix[0].double().numpy(), compute_uv=False)[:20]
    np.testing.assert_allclose(first[1][0].double().numpy(), exact, rtol=1e-4)
    u_k, s_k, v_k = (t[0].double().numpy() for t in first)
    top = (u[:, :20] * 0.97 ** np.arange(20)) @ v[:, :20].T
    assert np.linalg.norm((u_k * s_k) @ v_k.T - top) < 1e-3 * np.linalg.norm(top)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("svd"), "llama", 2)


def test_svd_merge_from_the_command_line_with_defaults(family, tmp_path):
    base, ft1, ft2 = family
    result = run_surgery("merge", base, ft1, ft2, "--method", "svd", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out, inputs = read_numpy(tmp_path / "out"), [read_numpy(path) for path in family]
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        expected = tsv_reference(inputs[0][name], [inputs[1][name], inputs[2][name]], [1.0, 1.0])
        np.testing.assert_allclose(out[name], expected, atol=1e-5, err_msg=name)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # task arithmetic, mean
        np.testing.assert_allclose(out[name], (inputs[1][name] + inputs[2][name]) / 2, atol=1e-6, err_msg=name)
    input_ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(logits(tmp_path / "out", input_ids)).all()


def test_star_from_the_command_line_and_bad_eta(family, tmp_path):
    base, ft1, _ = family
    result = run_surgery("merge", base, ft1, "--method", "star", "--eta", "0.2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out, inputs = read_numpy(tmp_path / "out"), [read_numpy(path) for path in family[:2]]
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(out[name], star_reference(inputs[0][name], [inputs[1][name]], [1.0], eta=0.2),
                               atol=1e-5)
    bad = run_surgery("merge", base, ft1, "--method", "star", "--eta", "1.5", "-o", tmp_path / "bad")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["surgery: error: parameter eta 1.5 (global): must be in (0, 1]"]
    assert not (tmp_path / "bad").exists()
