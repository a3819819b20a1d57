"""Shared pieces of the merge tests: tiny base + fine-tune families and reading a checkpoint as numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from conftest import make_tiny_model


def save_family(root: Path, model_type: str, count: int, scale: float = 0.02) -> list[Path]:
    """A base and ``count`` fine-tunes (base + Gaussian noise), saved by transformers; returns [base, ft1, ...]."""
    paths = []
    for index in range(count + 1):
        model = make_tiny_model(model_type, seed=0)
        if index:
            generator = torch.Generator().manual_seed(100 + index)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(scale * torch.randn(param.shape, generator=generator))
        path = root / model_type / ("base" if index == 0 else f"ft{index}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def read_numpy(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).to(torch.float64).numpy()
    return tensors
