"""Fused int4 dequantize-matmul (surgery.kernels.dequant_matmul) against tinygemm, a plain read of the int4 bytes,
and torch dequantize-then-matmul, side by side, on CUDA (an H200 in the issue): N = 14336, K = 4096, group 128,
bf16 activations, M = 1 and 16. Installs nothing; exits with a message without CUDA; writes $OUT/dequant_matmul.json
when OUT is set::

    OUT=results python benchmarks/dequant_matmul_bench.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

N, K, GROUP = 14336, 4096, 128


def timed(function, repeats: int = 200) -> float:
    """Median microseconds per call, CUDA events, after a warm-up."""
    for _ in range(10):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> int:
    if not torch.cuda.is_available():
        print("dequant_matmul_bench: needs a CUDA GPU (none found); nothing measured", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from surgery.kernels.dequant_matmul import dequant_matmul, unpack_weight
    from surgery.quantize.formats import CompressedTensors
    from surgery.quantize.grid import Scheme, rtn

    torch.manual_seed(0)
    weight = torch.randn(N, K) * 0.02
    tensors = CompressedTensors().encode_grid(rtn(weight, Scheme(4, GROUP, True), torch.bfloat16), torch.bfloat16)
    packed, scale = tensors["weight_packed"].cuda(), tensors["weight_scale"].cuda()
    dense = unpack_weight(packed, scale, None, 4, GROUP).to(torch.bfloat16)
    try:  # tinygemm's layout: its own packing of the same int4 values
        q_uint8 = torch.clamp(torch.round(weight.cuda() / scale.float().repeat_interleave(GROUP, 1)) + 8, 0, 15)
        tiny_packed = torch.ops.aten._convert_weight_to_int4pack((q_uint8.to(torch.int32)[:, ::2] << 4 | q_uint8.to(
            torch.int32)[:, 1::2]).to(torch.uint8), 8)
        scales_zeros = torch.stack([scale.float().T, torch.zeros_like(scale.float().T)], -1).to(torch.bfloat16).contiguous()
    except Exception as err:  # noqa: BLE001 - the op's signature changes between torch releases
        tiny_packed, tinygemm_error = None, str(err).splitlines()[0]
    results = {"device": torch.cuda.get_device_name(), "N": N, "K": K, "group_size": GROUP, "torch": torch.__version__,
               "rows": []}
    for m in (1, 16):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        fused = dequant_matmul(x, packed, scale, bits=4, group_size=GROUP, backend="triton")
        reference = x.float() @ dense.float().T
        row = {"M": m,
               "fused_us": timed(lambda: dequant_matmul(x, packed, scale, bits=4, group_size=GROUP, backend="triton")),
               "read_int4_us": timed(lambda: packed.sum(dtype=torch.int32)),
               "torch_dequant_then_matmul_us": timed(
                   lambda: x @ unpack_weight(packed, scale, None, 4, GROUP).to(torch.bfloat16).T),
               "fused_rel_mae": float((fused.float() - reference).abs().mean() / reference.abs().mean())}
        if tiny_packed is not None:
            row["tinygemm_us"] = timed(lambda: torch.ops.aten._weight_int4pack_mm(x, tiny_packed, GROUP, scales_zeros))
        else:
            row["tinygemm_error"] = tinygemm_error
        results["rows"].append(row)
        print(json.dumps(row))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "dequant_matmul.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
