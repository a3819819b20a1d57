"""SVD-based merge methods: STAR, TSV-M, LoRE and ``svd`` (the recommended default of the family).

They act on "matrices": 2-D weights outside the embedding and lm_head. Every other tensor (norms, biases, embeddings)
is combined as task arithmetic with normalised weights, θ0 + λ · Σ wi δi / Σ wi (LoRE, which has no base: the mean of
the models). Notation: base θ0, models θi, task vectors δi = θi − θ0, weights wi, scale λ.

- ``star`` (arXiv 2502.10339): per task matrix keep the smallest rank r whose singular values sum to ``eta`` of the
  total (or r = ``rank``), rescale the kept values so the nuclear norm is unchanged, then θ0 + λ · Σ wi δ̃i / Σ wi.
- ``tsv`` (TSV-M, task singular vectors): each task keeps its top ⌊rank / T⌋ singular triplets (rank: the full rank
  unless given), σ scaled by wi; the T·k left and right vectors are concatenated and orthogonalised (Procrustes:
  svd(U) = P S Qᵀ → P Qᵀ), then θ0 + λ · U⊥ diag(σ) V⊥ᵀ.
- ``lore`` (arXiv 2502.10749): no base needed. Coordinate descent on Σ ½‖θ0 + δi − θi‖² + τ‖δi‖*, starting from
  δi = 0: θ0 = mean(θi − δi), δi = SVT_τ(θi − θ0); τ = ``mu`` · σ₁(θi − mean θ) (scale-free, fixed per matrix).
  Result θ0 + λ Σ wi δi.
- ``svd``: STAR for one task vector, TSV-M for two or more, with their defaults.

Cost: STAR needs the whole spectrum (for r and the nuclear norm); it takes it, with the singular vectors of the
shorter side, from the eigendecomposition of the float64 Gram matrix (2-3× cheaper than an SVD) and truncates by
projecting on the top r of them. TSV-M's top-k per task is a seeded randomised SVD when k is small next to a large
matrix, else a full SVD (with the default rank and two tasks k is half the rank: a full SVD). LoRE soft-thresholds the
whole spectrum: full SVDs, ten rounds. The T task matrices of one tensor are decomposed as one batch.
"""

from __future__ import annotations

import zlib

import torch

from surgery.errors import BadInput
from surgery.kernels.svd_projection import reconstruct
from surgery.merge.params import ETA, LAMBDA, MU, NORMALIZE, RANK, WEIGHT
from surgery.merge.registry import TensorMerge, register

SVD_PARAMETERS = [WEIGHT, LAMBDA, NORMALIZE]
RANDOMISED_MIN_SIZE = 512  # below this a full SVD is cheap and exact
LORE_ROUNDS = 10


def _weighted_task_vector(x: TensorMerge, deltas: torch.Tensor, normalize_default: bool) -> torch.Tensor:
    """Σ wi δi (over the stacked first dimension), divided by Σ wi when normalising."""
    weights = torch.tensor(x.per_model("weight"), dtype=torch.float32, device=deltas.device)
    mixed = torch.tensordot(weights, deltas, dims=1)
    normalize = normalize_default if x.value("normalize") is None else x.value("normalize")
    total = float(weights.sum())
    return mixed / total if normalize and abs(total) > 1e-8 else mixed


def _task_vectors(x: TensorMerge) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ0 as float32, the stacked float32 task vectors)."""
    base = x.base.to(torch.float32)
    return base, torch.stack([model.to(torch.float32) - base for model in x.models])


def _as_task_arithmetic(x: TensorMerge) -> torch.Tensor:
    base, deltas = _task_vectors(x)
    return base + x.value("lambda") * _weighted_task_vector(x, deltas, normalize_default=True)


def _check_rank(x: TensorMerge) -> None:
    rank = x.value("rank")
    if rank is not None and (rank < 1 or rank != int(rank)):
        raise BadInput(f"--rank {rank}: must be a whole number of at least 1")


def _generator_for(x: TensorMerge, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(x.name.encode()))


def top_singular_triplets(matrices: torch.Tensor, k: int, generator: torch.Generator | None = None,
                          power_iterations: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets (U (B,m,k), S (B,k), V (B,n,k)) of a batch of matrices.

    A full SVD when k is a sizeable part of the rank or the matrices are small (exact); otherwise a randomised SVD
    (Halko et al.: Gaussian sketch of k + max(k, 10) columns, ``power_iterations`` re-orthonormalised power steps),
    seeded by ``generator`` so results are reproducible (``torch.svd_lowrank`` draws from the global RNG).

    Args:
        matrices: a (B, m, n) batch of float32 matrices.
        k: how many triplets to keep (at most min(m, n)).
        generator: seeds the randomised SVD's sketch (the global RNG when None).
        power_iterations: power steps of the randomised SVD.

    Returns:
        (U (B, m, k), S (B, k) descending, V (B, n, k)).

    Example: ``u, s, v = top_singular_triplets(deltas, 20, torch.Generator().manual_seed(3))``
    """
    rows, cols = matrices.shape[-2:]
    smallest = min(rows, cols)
    k = min(k, smallest)
    sketch = k + max(k, 10)
    if smallest < RANDOMISED_MIN_SIZE or sketch >= smallest // 2:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :].transpose(-2, -1)
    probe = torch.randn(*matrices.shape[:-2], cols, sketch, generator=generator, device=matrices.device)
    basis = torch.linalg.qr(matrices @ probe).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrices.transpose(-2, -1) @ basis).Q
        basis = torch.linalg.qr(matrices @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.transpose(-2, -1) @ matrices, full_matrices=False)
    return (basis @ u_small)[..., :k], s[..., :k], vh[..., :k, :].transpose(-2, -1)


def gram_spectrum(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending, float64) of each matrix and the matching singular vectors of its shorter side
    (left ones for a wide matrix, right ones for a tall one), from the eigendecomposition of the float64 Gram matrix
    of that side. On one core, for 2048×5632: ~6 s against ~13-18 s for ``torch.linalg.svd``; the values agree with
    svdvals to ~1e-6 of the largest (svdvals' own float32 accuracy).

    Args:
        matrices: a (B, m, n) batch of matrices.

    Returns:
        (singular values (B, min(m, n)) descending, float64; their singular vectors (B, min(m, n), min(m, n)),
        one per column, float64).

    Example: ``spectra, vectors = gram_spectrum(torch.randn(2, 4, 6))``   # shapes (2, 4) and (2, 4, 4)
    """
    wide = matrices.to(torch.float64)
    if wide.shape[-2] > wide.shape[-1]:
        wide = wide.transpose(-2, -1)
    eigenvalues, vectors = torch.linalg.eigh(wide @ wide.transpose(-2, -1))
    return eigenvalues.clamp(min=0).sqrt().flip(-1), vectors.flip(-1)


def project_on_top(matrices: torch.Tensor, vectors: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Each matrix projected on its top ``ranks[i]`` singular directions (``vectors`` of its shorter side, from
    :func:`gram_spectrum`): U_r U_rᵀ A for a wide matrix, A V_r V_rᵀ for a tall one — its rank-r SVD truncation.

    Args:
        matrices: a (B, m, n) batch of matrices.
        vectors: their shorter side's singular vectors, descending, from :func:`gram_spectrum`.
        ranks: the rank kept, one per matrix.

    Returns:
        The truncated matrices, shaped and typed like ``matrices``.

    Example: ``project_on_top(deltas, gram_spectrum(deltas)[1], [1, 2])``
    """
    kept = torch.arange(vectors.shape[-1], device=vectors.device) < torch.tensor(ranks, device=vectors.device)[:, None]
    basis = (vectors * kept[:, None, :]).to(matrices.dtype)
    if matrices.shape[-2] > matrices.shape[-1]:
        return (matrices @ basis) @ basis.transpose(-2, -1)
    return basis @ (basis.transpose(-2, -1) @ matrices)


def star_ranks(spectra: torch.Tensor, eta: float) -> list[int]:
    """Per matrix, the smallest r with σ1 + … + σr ≥ eta · Σσ (at least 1), from descending ``spectra``.

    Args:
        spectra: (B, r) descending singular values.
        eta: the share of the nuclear norm to reach, in (0, 1].

    Returns:
        One rank per matrix.

    Example: ``star_ranks(torch.tensor([[3., 1., 0.]]), 0.9)``   # [2]
    """
    totals = spectra.sum(dim=-1, keepdim=True)
    reached = spectra.cumsum(dim=-1) >= eta * totals * (1 - 1e-6)
    return [int(row.to(torch.int64).argmax()) + 1 for row in reached]


def _star_task_vectors(x: TensorMerge, deltas: torch.Tensor) -> torch.Tensor:
    """Each task matrix truncated to its STAR rank, kept singular values rescaled to the full nuclear norm."""
    spectra, vectors = gram_spectrum(deltas)
    rank = x.value("rank")
    if rank is not None:
        ranks = [min(int(rank), spectra.shape[-1])] * len(deltas)
    else:
        ranks = star_ranks(spectra, x.value("eta"))
    nuclear_norms = spectra.sum(dim=-1)
    kept_sums = torch.stack([row[:rank].sum() for row, rank in zip(spectra, ranks)])
    scales = torch.where(kept_sums > 0, nuclear_norms / kept_sums.clamp(min=1e-300), 0.0).to(deltas.dtype)
    return project_on_top(deltas, vectors, ranks) * scales[:, None, None]


@register("star", uses_base=True, parameters=SVD_PARAMETERS + [ETA, RANK])
def star(x: TensorMerge) -> torch.Tensor:
    """STAR: truncate each task matrix at eta of its spectrum (or --rank), keep its nuclear norm, average.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor (task arithmetic with normalised weights when ``x`` is not a matrix).

    Example: ``star(TensorMerge("w", base, [a], {"eta": 0.4}, is_matrix=True))``
    """
    eta = x.value("eta")
    if not 0 < eta <= 1:
        raise BadInput(f"--eta {eta}: must be in (0, 1]")
    _check_rank(x)
    if not x.is_matrix:
        return _as_task_arithmetic(x)
    base, deltas = _task_vectors(x)
    truncated = _star_task_vectors(x, deltas)
    return base + x.value("lambda") * _weighted_task_vector(x, truncated, normalize_default=True)


def orthogonalise(vectors: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``vectors`` (Procrustes): svd = P S Qᵀ → P Qᵀ.

    Args:
        vectors: an (m, k) matrix of concatenated singular vectors.

    Returns:
        The (m, k) matrix with orthonormal columns nearest to it.

    Example: ``orthogonalise(torch.tensor([[2., 0.], [0., 3.]]))``   # the identity
    """
    p, _, qh = torch.linalg.svd(vectors, full_matrices=False)
    return p @ qh


@register("tsv", uses_base=True, parameters=SVD_PARAMETERS + [RANK])
def tsv(x: TensorMerge) -> torch.Tensor:
    """TSV-M: each task's top rank/T singular vectors, decorrelated across tasks (Procrustes), summed.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor (task arithmetic with normalised weights when ``x`` is not a matrix).

    Example: ``tsv(TensorMerge("w", base, [a, b], {"weight": [1.0, 1.0]}, is_matrix=True))``
    """
    _check_rank(x)
    if not x.is_matrix:
        return _as_task_arithmetic(x)
    base, deltas = _task_vectors(x)
    count, rows, cols = deltas.shape
    rank = x.value("rank")
    total_rank = min(rows, cols) if rank is None else min(int(rank), rows, cols)
    per_task = max(1, total_rank // count)
    u, s, v = top_singular_triplets(deltas, per_task, _generator_for(x, deltas.device))
    weights = torch.tensor(x.per_model("weight"), dtype=torch.float32, device=s.device)[:, None]
    u_all = u.transpose(0, 1).reshape(rows, -1)  # task after task: [U1 | U2 | ...]
    v_all = v.transpose(0, 1).reshape(cols, -1)
    s_all = (s * weights).reshape(-1)
    merged = reconstruct(orthogonalise(u_all), s_all, orthogonalise(v_all), out_dtype=torch.float32)
    normalize = False if x.value("normalize") is None else x.value("normalize")
    if normalize and abs(float(weights.sum())) > 1e-8:
        merged = merged / float(weights.sum())
    return base + x.value("lambda") * merged


@register("svd", uses_base=True, parameters=SVD_PARAMETERS + [ETA, RANK])
def svd(x: TensorMerge) -> torch.Tensor:
    """The recommended SVD merge: STAR (eta 0.4) for one task vector, TSV-M (full rank) for two or more.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor, as :func:`star` or :func:`tsv` gives it.

    Example: ``svd(TensorMerge("w", base, [a, b], is_matrix=True))``
    """
    return star(x) if len(x.models) == 1 else tsv(x)


def singular_value_threshold(matrices: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Soft-threshold the singular values of each matrix by its threshold (the prox of τ‖·‖*).

    Args:
        matrices: a (B, m, n) batch of float32 matrices.
        thresholds: (B,) one threshold τ per matrix.

    Returns:
        The matrices rebuilt with singular values max(σ − τ, 0), float32.

    Example: ``singular_value_threshold(torch.diag(torch.tensor([3., 1.]))[None], torch.tensor([2.]))``   # diag(1, 0)
    """
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return reconstruct(u, (s - thresholds[:, None]).clamp(min=0), vh.transpose(-2, -1), out_dtype=torch.float32)


@register("lore", uses_base=False, parameters=SVD_PARAMETERS + [MU], min_models=2)
def lore(x: TensorMerge) -> torch.Tensor:
    """LoRE: estimate a shared base and low-rank task vectors (no base model needed), task arithmetic on them.

    Args:
        x: the tensor's base, models and resolved parameters (a :class:`~surgery.merge.registry.TensorMerge`).

    Returns:
        The merged float32 tensor (the weighted mean of the models when ``x`` is not a matrix).

    Example: ``lore(TensorMerge("w", None, [a, b], {"mu": 0.05}, is_matrix=True))``
    """
    mu = x.value("mu")
    if mu < 0:
        raise BadInput(f"--mu {mu}: must be at least 0")
    models = torch.stack([model.to(torch.float32) for model in x.models])
    if not x.is_matrix:
        return _weighted_task_vector(x, models, normalize_default=True)
    thresholds = mu * torch.linalg.matrix_norm(models - models.mean(dim=0), ord=2)
    deltas = torch.zeros_like(models)
    for _ in range(LORE_ROUNDS):
        base = (models - deltas).mean(dim=0)
        deltas = singular_value_threshold(models - base, thresholds)
    return base + x.value("lambda") * _weighted_task_vector(x, deltas, normalize_default=False)
