"""Read-only reports on checkpoints: :func:`inspect_checkpoint` and :func:`diff_checkpoints`.

Both read tensor data one tensor (or one slice of a tensor) at a time, so they run on models larger than memory::

    with open_checkpoint("a") as a, open_checkpoint("b") as b:
        report = diff_checkpoints(a, b)
    print(report["summary"]["max_relative_delta"])
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch

from surgery.arch import Architecture
from surgery.io.checkpoint import Checkpoint, dtype_name

DIFF_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 per operand at a time


def inspect_checkpoint(ckpt: Checkpoint, with_tensors: bool = False) -> dict:
    """Architecture, parameter count, dtypes, files, tied embeddings and rope settings of ``ckpt``.

    Args:
        ckpt: an opened checkpoint (only its header and config are read).
        with_tensors: also list every tensor's name, dtype, shape, role and layer.

    Returns:
        ``source``, ``format``, ``path``, ``files``, ``architecture``, ``parameters``, ``tensor_bytes``,
        ``num_tensors``, ``dtypes`` (tensors and parameters per dtype), ``tied_embeddings``, ``roles`` and, when
        asked, ``tensors``.

    Example::

        with open_checkpoint("org/model") as ckpt:
            inspect_checkpoint(ckpt)["parameters"]
    """
    arch = Architecture.from_config(ckpt.config)
    dtypes: dict[str, dict[str, int]] = {}
    roles = Counter()
    for info in ckpt.tensors.values():
        entry = dtypes.setdefault(dtype_name(info.dtype), {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        roles[arch.role(info.name).kind] += 1
    has_lm_head = any(arch.role(name).kind == "lm_head" for name in ckpt.tensors)
    report = {
        "source": ckpt.source,
        "format": ckpt.format,
        "path": str(ckpt.path),
        "files": ckpt.files(),
        "architecture": arch.summary(),
        "parameters": sum(info.numel for info in ckpt.tensors.values()),
        "tensor_bytes": sum(info.nbytes for info in ckpt.tensors.values()),
        "num_tensors": len(ckpt.tensors),
        "dtypes": dtypes,
        "tied_embeddings": arch.tie_word_embeddings and not has_lm_head,
        "roles": dict(sorted(roles.items())),
    }
    if with_tensors:
        report["tensors"] = [_tensor_row(info, arch.role(info.name)) for info in ckpt.tensors.values()]
    return report


def _tensor_row(info, role) -> dict:
    """One ``inspect --tensors`` row: name, dtype, shape and the role's facts (expert fields only where set)."""
    row = {"name": info.name, "dtype": dtype_name(info.dtype), "shape": list(info.shape), "role": role.kind,
           "layer": role.layer, "part": role.part}
    row.update({key: value for key, value in (("expert", role.expert), ("experts", role.experts),
                                               ("shared", role.shared or None)) if value is not None})
    return row


def tensor_delta(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Task-vector view of ``b`` against ``a``: relative delta norm ‖b−a‖/‖a‖ and cosine similarity of a and b.

    Accumulated in float64 over float32 slices, so a bf16 tensor larger than memory allows in float32 is fine.

    Args:
        a: the base tensor.
        b: a tensor of the same number of elements.

    Returns:
        ``{"relative_delta", "cosine", "delta_norm"}``; cosine is None when either tensor is zero, and the relative
        delta inf when only ``a`` is.

    Example:
        ``tensor_delta(torch.ones(4), torch.ones(4) * 2)["relative_delta"]``   # 1.0
    """
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    dot = norm_a = norm_b = norm_delta = 0.0
    for start in range(0, flat_a.numel(), DIFF_CHUNK_ELEMENTS):
        chunk_a = flat_a[start:start + DIFF_CHUNK_ELEMENTS].to(torch.float32)
        chunk_b = flat_b[start:start + DIFF_CHUNK_ELEMENTS].to(torch.float32)
        dot += torch.dot(chunk_a.double(), chunk_b.double()).item()
        norm_a += chunk_a.double().square().sum().item()
        norm_b += chunk_b.double().square().sum().item()
        norm_delta += (chunk_b - chunk_a).double().square().sum().item()
    norm_a, norm_b, norm_delta = math.sqrt(norm_a), math.sqrt(norm_b), math.sqrt(norm_delta)
    relative = norm_delta / norm_a if norm_a > 0 else (0.0 if norm_delta == 0 else math.inf)
    cosine = dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None
    return {"relative_delta": relative, "cosine": cosine, "delta_norm": norm_delta}


def diff_checkpoints(a: Checkpoint, b: Checkpoint, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Tensors missing from / extra in ``b``, shape mismatches, and per shared tensor :func:`tensor_delta`.

    Args:
        a: the base checkpoint.
        b: the checkpoint compared with it.
        progress: called with 1 after each tensor compared.

    Returns:
        ``a``, ``b``, ``missing``, ``extra``, ``shape_mismatch``, ``tensors`` (one row per tensor compared) and
        ``summary`` (compared, identical, max and mean relative delta, min cosine).

    Example::

        with open_checkpoint("base") as base, open_checkpoint("merged") as merged:
            diff_checkpoints(base, merged)["summary"]["max_relative_delta"]
    """
    missing = [name for name in a.tensors if name not in b.tensors]
    extra = [name for name in b.tensors if name not in a.tensors]
    mismatched, rows = [], []
    for name, info in a.tensors.items():
        other = b.tensors.get(name)
        if other is None:
            continue
        if other.shape != info.shape:
            mismatched.append({"name": name, "shape_a": list(info.shape), "shape_b": list(other.shape)})
            continue
        rows.append({"name": name, **tensor_delta(a.get(name), b.get(name))})
        progress(1)
    finite = [row["relative_delta"] for row in rows if math.isfinite(row["relative_delta"])]
    cosines = [row["cosine"] for row in rows if row["cosine"] is not None]
    return {
        "a": a.source, "b": b.source,
        "missing": missing, "extra": extra, "shape_mismatch": mismatched,
        "tensors": rows,
        "summary": {
            "compared": len(rows),
            "identical": sum(1 for row in rows if row["delta_norm"] == 0),
            "max_relative_delta": max(finite, default=0.0),
            "mean_relative_delta": sum(finite) / len(finite) if finite else 0.0,
            "min_cosine": min(cosines, default=None),
        },
    }
