"""surgery.kernels.dequant_matmul: the fused dequantize-matmul Triton kernel on CPU through the Triton interpreter
(in a subprocess started with TRITON_INTERPRET=1, as tests/test_kernels_svd.py explains), against float32
dequantize-then-matmul computed here from bits unpacked with numpy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.kernels import dequant_matmul as kernel
from surgery.quantize.formats import CompressedTensors
from surgery.quantize.grid import Scheme, rtn

REPO = Path(__file__).resolve().parents[1]
# Relative mean absolute error vs float32 (the projects' criterion); bf16 outputs are rounded to 8 bits.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-3, torch.float16: 1e-3}

RUNNER = textwrap.dedent("""
    import sys
    import torch
    from surgery.kernels import dequant_matmul as k

    interpreted = k._INTERPRETING and "Interpreted" in type(k._kernel).__name__
    results = {name: k.dequant_matmul(*args, backend="triton", **kw)
               for name, (args, kw) in torch.load(sys.argv[1], weights_only=False).items()}
    torch.save({"interpreted": interpreted, "results": results}, sys.argv[2])
""")


def case(m, n, kdim, bits, group, symmetric, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, kdim, generator=generator)
    tensors = CompressedTensors().encode_grid(rtn(weight, Scheme(bits, group, symmetric), torch.bfloat16), torch.bfloat16)
    x = torch.randn(m, kdim, generator=generator).to(dtype)
    return ((x, tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point")),
            {"bits": bits, "group_size": group})


CASES = {
    "sym4_g32_fp32_m1": case(1, 72, 128, 4, 32, True, torch.float32, 1),
    "sym4_g128_fp32_m16": case(16, 40, 256, 4, 128, True, torch.float32, 2),
    "asym4_g32_fp32_m5": case(5, 70, 96, 4, 32, False, torch.float32, 3),
    "sym8_g64_fp32_m3": case(3, 33, 128, 8, 64, True, torch.float32, 4),
    "asym8_g32_fp32_m17": case(17, 48, 64, 8, 32, False, torch.float32, 5),
    "sym4_g128_bf16_m16": case(16, 64, 256, 4, 128, True, torch.bfloat16, 6),
    "asym4_g64_bf16_m1": case(1, 72, 128, 4, 64, False, torch.bfloat16, 7),
    "sym4_g32_fp16_m4": case(4, 40, 64, 4, 32, True, torch.float16, 8),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    if kernel.triton is None:
        pytest.skip("triton is not installed")
    directory = tmp_path_factory.mktemp("dequant_kernel")
    cases, results = directory / "cases.pt", directory / "results.pt"
    torch.save(CASES, cases)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(cases), str(results)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = torch.load(results, weights_only=False)
    assert saved["interpreted"], "the subprocess did not run the kernel in the Triton interpreter"
    return saved["results"]


def expected(args, kwargs) -> np.ndarray:
    """float32 dequantize-then-matmul from bits unpacked with numpy (not the module's reference)."""
    x, packed, scale, zero_packed = args
    bits, group = kwargs["bits"], kwargs["group_size"]
    per_word, offset = 32 // bits, 1 << (bits - 1)
    words = packed.numpy().astype(np.int64) & 0xFFFFFFFF
    q = np.stack([(words >> (bits * i)) & ((1 << bits) - 1) for i in range(per_word)], -1).reshape(len(words), -1)
    n = q.shape[0]
    if zero_packed is None:
        zero = np.full(scale.shape, offset)
    else:
        zw = zero_packed.numpy().astype(np.int64).T & 0xFFFFFFFF
        zero = np.stack([(zw >> (bits * i)) & ((1 << bits) - 1) for i in range(per_word)], -1)
        zero = zero.reshape(zw.shape[0], -1)[:, :n].T
    weight = ((q.reshape(n, -1, group) - zero[..., None]) * scale.float().numpy()[..., None]).reshape(n, -1)
    return x.float().numpy() @ weight.T.astype(np.float32)


def relative_mae(result: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(result.float().numpy() - reference).mean() / np.abs(reference).mean())


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_matches_float32_dequantize_then_matmul(interpreted, name):
    args, kwargs = CASES[name]
    result = interpreted[name]
    assert result.dtype == args[0].dtype and tuple(result.shape) == (args[0].shape[0], args[1].shape[0])
    assert relative_mae(result, expected(args, kwargs)) < TOLERANCE[args[0].dtype], name


@pytest.mark.parametrize("name", list(CASES))
def test_torch_reference_matches_float32_dequantize_then_matmul(name):
    args, kwargs = CASES[name]
    result = kernel.dequant_matmul(*args, backend="torch", **kwargs)
    assert relative_mae(result, expected(args, kwargs)) < TOLERANCE[args[0].dtype], name


def test_auto_backend_on_cpu_is_the_reference():
    args, kwargs = CASES["asym4_g32_fp32_m5"]
    assert torch.equal(kernel.dequant_matmul(*args, **kwargs), kernel.dequant_matmul_reference(*args, **kwargs))
