"""Shared pieces of the merge tests: tiny base + fine-tune families and reading a checkpoint as numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open

from conftest import make_tiny_model, run_surgery

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"


def save_family(root: Path, model_type: str, count: int, scale: float = 0.02, **config) -> list[Path]:
    """A base and ``count`` fine-tunes (base + Gaussian noise), saved by transformers; returns [base, ft1, ...].
    ``config`` overrides fields of the tiny config (e.g. ``num_hidden_layers``)."""
    paths = []
    for index in range(count + 1):
        model = make_tiny_model(model_type, seed=0, **config)
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


def assert_same_as_mergekit(config: dict, tmp_path: Path, label: str) -> None:
    """Run one mergekit config through mergekit and through ``surgery merge --recipe``: same tensor names, and
    float32 values equal within 1e-6. Outputs stay in ``tmp_path``/mergekit and ``tmp_path``/surgery."""
    recipe = tmp_path / "config.yml"
    recipe.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(MERGEKIT), str(recipe), str(tmp_path / "mergekit")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "surgery")
    assert result.returncode == 0, result.stderr
    ours, theirs = read_numpy(tmp_path / "surgery"), read_numpy(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=f"{label} {name}")
