"""Formats are registered objects: a format defined here (one class, as a new format module would be) is accepted
by QuantizeConfig and the CLI's --format once registered, the engine writes through it (same planning, error
accounting, manifest and card as the built-in formats), and `surgery verify` reads it back. Its stored weights
are checked against the independent numpy quantizer of test_quantize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_surgery
from test_quantize import LINEARS, dequantized, numpy_rtn

GROUP = 32


def dequantized_format():
    """Simulated quantization: each quantized Linear's weight replaced by its dequantized grid, in the model dtype
    (any loader reads it; the recipe in surgery.json says which grid)."""
    from surgery.io.checkpoint import TensorInfo
    from surgery.provenance import read_manifest
    from surgery.quantize.engine import select_modules
    from surgery.quantize.formats.base import QuantFormat
    from surgery.quantize.grid import Scheme

    class Dequantized(QuantFormat):
        name = "dequantized"

        def group_sizes(self, inputs, requested, together=frozenset()):
            return {module: requested for module in inputs}

        def specs(self, module, shape, scheme, dtype):
            return [TensorInfo(f"{module}.weight", dtype, tuple(shape))]

        def encode_grid(self, grid, dtype):
            return {"weight": grid.dequantize().to(dtype)}

        def quantization_config(self, schemes, scheme, ignore, dtype, fallbacks):
            return None

        def _recipe(self, ckpt):
            return read_manifest(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent).get("recipe") or {}

        def reads(self, ckpt):
            return self._recipe(ckpt).get("format") == self.name

        def stored_scheme(self, ckpt):
            recipe = self._recipe(ckpt)
            return Scheme(recipe["bits"], recipe["group_size"], recipe["scheme"] == "sym")

        def quantized_modules(self, ckpt):
            return list(select_modules(ckpt, tuple(self._recipe(ckpt)["ignore"])).modules)

        def decoded_weight(self, ckpt, module):
            return ckpt.get(f"{module}.weight").float()

    return Dequantized()


@pytest.fixture
def registered():
    from surgery.quantize.formats import FORMATS, register_format

    fmt = register_format(dequantized_format())
    try:
        yield fmt
    finally:
        FORMATS.pop(fmt.name)


def test_an_unregistered_format_is_refused_naming_the_registered_ones(tiny_checkpoints, tmp_path):
    from surgery.errors import BadInput
    from surgery.quantize import QuantizeConfig

    with pytest.raises(BadInput, match="--format 'dequantized': expected compressed-tensors, fp8-dynamic, fp8-block, nvfp4a16, mxfp4a16, gptq, gguf or mxfp4"):
        QuantizeConfig(tiny_checkpoints["llama"], tmp_path / "out", format="dequantized")


@pytest.mark.parametrize("bits,scheme", [(4, "sym"), (8, "asym")])
def test_a_registered_format_is_written_through_the_engine(registered, tiny_checkpoints, tmp_path, bits, scheme):
    from surgery.quantize import QuantizeConfig, quantize

    source = tiny_checkpoints["llama"]
    config = QuantizeConfig(source, tmp_path / "out", bits=bits, group_size=GROUP, scheme=scheme,
                            format="dequantized")
    summary = quantize(config).summary()
    assert summary["format"] == "dequantized" and summary["modules"] == len(LINEARS)
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(source / "model.safetensors")
    assert set(written) == set(original)
    error_sq = norm_sq = 0.0
    for module in LINEARS:
        weight = original[f"{module}.weight"].float().numpy()
        expected = dequantized(*numpy_rtn(weight, bits, GROUP, scheme == "sym", torch.float32), GROUP)
        got = written[f"{module}.weight"].float().numpy()
        assert np.allclose(got, expected, rtol=0, atol=1e-6), module
        assert not np.allclose(got, weight), module  # it did quantize
        error_sq += float(((weight - expected) ** 2).sum())
        norm_sq += float((weight ** 2).sum())
    assert summary["weight_relative_error"] == pytest.approx((error_sq / norm_sq) ** 0.5, rel=1e-4)
    assert torch.equal(written["lm_head.weight"], original["lm_head.weight"])  # ignored by default
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["recipe"]["format"] == "dequantized"
    assert "format `dequantized`" in (tmp_path / "out" / "README.md").read_text()


def test_the_cli_accepts_a_registered_format_and_verify_reads_it(registered, tiny_checkpoints, tmp_path):
    source, out = tiny_checkpoints["llama"], tmp_path / "out"
    done = run_surgery("quantize", source, "-o", out, "--group-size", str(GROUP), "--format", "dequantized")
    assert done.returncode == 0, done.stderr
    done = run_surgery("verify", out, "--reference", source, "--tokens", "16", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "dequantized" and report["passed"]
    assert sorted(layer["module"] for layer in report["layers"]) == sorted(LINEARS)
    original, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    for layer in report["layers"]:
        weight, approx = (t[f"{layer['module']}.weight"].float().numpy() for t in (original, written))
        assert layer["weight_rel_error"] == pytest.approx(
            np.linalg.norm(approx - weight) / np.linalg.norm(weight), rel=1e-4)
        assert layer["output_cosine"] > 0.98
