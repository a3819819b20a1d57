"""Merges on the sphere, with mergekit 0.1.5's names and parameters: ``nuslerp`` (two models, row- or column-wise
or flattened SLERP, of task vectors when a base is named), ``multislerp`` (any number of models, through the tangent
space at their weighted mean) and ``karcher`` (the Riemannian mean of the models' directions, times their mean
norm).

Each follows mergekit's formula step for step (its thresholds included), in float32::

    surgery merge a b --method nuslerp --weights 0.3,0.7                  # t = 0.7
    surgery merge a b c --method karcher --max-iter 20
"""

from __future__ import annotations

import torch

from surgery.errors import BadInput
from surgery.merge.params import WEIGHT, Parameter
from surgery.merge.registry import TensorMerge, register

ROW_WISE = Parameter("nuslerp_row_wise", bool, False, "nuslerp: interpolate column vectors (dim 0) when not "
                     "flattened (false: row vectors).")
FLATTEN = Parameter("nuslerp_flatten", bool, True, "nuslerp: treat each tensor as one vector (true).")
NORMALIZE_WEIGHTS = Parameter("normalize_weights", bool, True, "multislerp: divide the weights by their sum (true).")
EPS = Parameter("eps", float, 1e-8, "multislerp: numerical floor of norms (1e-8).", low=0, high=1)
MAX_ITER = Parameter("max_iter", int, 10, "karcher: most iterations of the mean's fixed point (10).", low=1,
                     high=10_000)
TOL = Parameter("tol", float, 1e-5, "karcher: stop when the tangent step is shorter than this (1e-5).", low=0,
                high=1)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
                    eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of ``v0`` → ``v1`` at ``t``, vector by vector along ``dim`` (or of the flattened
    tensors), linear where the two are colinear (1 − cos² ≤ eps²).

    Args:
        t: 0 gives ``v0``, 1 gives ``v1``.
        v0, v1: float32 tensors of one shape.
        dim: the axis the vectors lie along (``-1``: rows of a matrix; ``0``: its columns).
        flatten: one vector per tensor instead.
        eps: the colinearity threshold.

    Returns:
        The interpolated tensor, shaped like ``v0``.

    Example: ``nuslerp_vectors(0.5, torch.tensor([1., 0.]), torch.tensor([0., 1.]))``  # [0.7071, 0.7071]
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cosine = (unit0 * unit1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cosine), cosine))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


@register("nuslerp", uses_base="optional", parameters=[WEIGHT, ROW_WISE, FLATTEN], min_models=2, max_models=2)
def nuslerp(x: TensorMerge) -> torch.Tensor:
    """NuSLERP: SLERP of two models at t = w2 / (w1 + w2) (of their task vectors when a base is named).

    Args:
        x: the tensor's base (or None), two models and resolved parameters.

    Returns:
        The merged float32 tensor.

    Example: ``nuslerp(TensorMerge("w", None, [a, b], {"weight": [1.0, 3.0]}))``   # t = 0.75
    """
    x = x.as_float32()
    weights = x.per_model("weight")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if x.value("nuslerp_row_wise") else -1
    flatten = x.value("nuslerp_flatten")
    first, second = x.models
    if x.base is None:
        return nuslerp_vectors(t, first, second, dim=dim, flatten=flatten)
    return x.base + nuslerp_vectors(t, first - x.base, second - x.base, dim=dim, flatten=flatten)


@register("multislerp", uses_base="optional", parameters=[WEIGHT, NORMALIZE_WEIGHTS, EPS])
def multislerp(x: TensorMerge) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation on the sphere through the tangent space at the weighted mean.

    The models (task vectors when a base is named) are normalised, their weighted mean direction m found, each
    projected onto the tangent space at m, the weighted tangent sum mapped back to the sphere (exponential map)
    and scaled by the weighted mean norm.

    Args:
        x: the tensor's base (or None), the models and resolved parameters.

    Returns:
        The merged float32 tensor; BadInput when the weighted directions cancel out (more than two models).

    Example: ``multislerp(TensorMerge("w", None, [a, b, c], {"weight": [1.0, 1.0, 2.0]}))``
    """
    x = x.as_float32()
    if len(x.models) == 1:
        return x.models[0]
    eps = x.value("eps")
    vectors = torch.stack([m.reshape(-1) for m in x.models])
    if x.base is not None:
        vectors -= x.base.reshape(-1)
    weights = torch.tensor(x.per_model("weight"), dtype=torch.float32, device=vectors.device)
    if x.value("normalize_weights"):
        weights = weights / weights.sum()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(x.models) != 2:
            raise BadInput(f"tensor {x.name!r}: multislerp's weighted directions cancel out (antipodal models with "
                           "balancing weights); use other weights")
        result = vectors[0] * weights[0] + vectors[1] * weights[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * weights.view(-1, 1)).sum(0)
        length = tangent.norm() + eps
        result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * weights).sum()
    result = result.reshape(x.models[0].shape)
    return result if x.base is None else result + x.base


@register("karcher", uses_base=False, parameters=[MAX_ITER, TOL])
def karcher(x: TensorMerge) -> torch.Tensor:
    """Karcher mean: the equally weighted Riemannian mean of the models' directions, times their mean norm.

    Fixed-point iteration on the unit sphere from the normalised Euclidean mean: each step moves along the
    weighted sum of log maps θ / sin θ · (u − cos θ · m) until it is shorter than ``tol`` or ``max_iter`` steps;
    models with a norm at most ``tol`` take no part in the direction.

    Args:
        x: the tensor's models and resolved parameters (no base).

    Returns:
        The merged float32 tensor.

    Example: ``karcher(TensorMerge("w", None, [a, b, c], {"max_iter": 10, "tol": 1e-5}))``
    """
    x = x.as_float32()
    if len(x.models) == 1:
        return x.models[0]
    tol = x.value("tol")
    alpha = 1.0 / len(x.models)
    norms = [torch.linalg.vector_norm(m) for m in x.models]
    units = [m / norm for m, norm in zip(x.models, norms) if norm.item() > tol]
    if not units:
        return torch.zeros_like(x.models[0])
    share = 1.0 / len(units)  # the weights of the models that have a direction, renormalised
    mean = sum(share * unit for unit in units)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(int(x.value("max_iter"))):
        tangent = torch.zeros_like(mean)
        for unit in units:
            cosine = torch.clamp(torch.dot(mean.reshape(-1), unit.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - cosine * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for norm in norms) * mean
