"""GGUF K-quant encoding speed and error, side by side in one run, on one core: surgery's searched scales
(surgery/quantize/kquants.py as it is), llama.cpp's full candidate lists (make_qkx2_quants: 21 reciprocal scales
for Q4_K, 16 for Q5_K; make_qx_quants: 19 for Q6_K) through the same code, and plain min/max rounding (kquants.py
as of commit b60375f, before the search)::

    python benchmarks/kquant_bench.py                    # 1024 × 4096 heavy-tailed weights, 3 repeats
    python benchmarks/kquant_bench.py --rows 4096 --repeat 5 --out benchmarks/results/kquant_bench.json

Weights: Gaussian rows times a per-column gamma(2) spread (outlier input channels, as in LLM weights), seeded.
Reported per kind: the fastest of the repeats in M weights/s, the relative error ‖decoded − W‖ / ‖W‖ through the
gguf package's own dequantize, and the error gained over plain min/max as a share of what the full lists gain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.quantize import kquants  # noqa: E402

PLAIN_COMMIT = "b60375f"
FULL_LISTS = {"SEARCH": {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}, "SIGNED_SEARCH": tuple(range(-9, 10))}


def module_at(commit: str, scratch: Path):
    """kquants.py as of ``commit``, imported under another name."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:surgery/quantize/kquants.py"], check=True,
                          capture_output=True, text=True).stdout
    path = scratch / "kquants_plain.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("kquants_plain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(encode, weight: np.ndarray, kind: str, repeat: int) -> dict:
    fastest = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        data = encode(weight, kind)
        fastest = min(fastest, time.perf_counter() - started)
    decoded = kquants.dequantize_k(data, kind)
    return {"M_weights_per_s": round(weight.size / fastest / 1e6, 1),
            "relative_error": round(float(np.linalg.norm(decoded - weight) / np.linalg.norm(weight)), 5)}


def full_lists(weight: np.ndarray, kind: str) -> np.ndarray:
    saved = {name: getattr(kquants, name) for name in FULL_LISTS}
    try:
        for name, value in FULL_LISTS.items():
            setattr(kquants, name, value)
        return kquants.quantize_k(weight, kind)
    finally:
        for name, value in saved.items():
            setattr(kquants, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight = (np.random.default_rng(0).standard_normal((args.rows, args.columns))
              * np.random.default_rng(1).gamma(2.0, 1.0, (1, args.columns))).astype(np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        plain = module_at(PLAIN_COMMIT, Path(scratch))
        results = {}
        for kind in ("Q4_K", "Q5_K", "Q6_K"):
            row = {"plain": measure(plain.quantize_k, weight, kind, args.repeat),
                   "surgery": measure(kquants.quantize_k, weight, kind, args.repeat),
                   "full_lists": measure(full_lists, weight, kind, args.repeat)}
            gained = row["plain"]["relative_error"] - row["surgery"]["relative_error"]
            possible = row["plain"]["relative_error"] - row["full_lists"]["relative_error"]
            row["share_of_full_gain"] = round(gained / possible, 3) if possible > 0 else None
            results[kind] = row
    print("| kind | plain M/s | err | surgery M/s | err | full lists M/s | err | share of full gain |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, row in results.items():
        print(f"| {kind} | {row['plain']['M_weights_per_s']} | {row['plain']['relative_error']} "
              f"| {row['surgery']['M_weights_per_s']} | {row['surgery']['relative_error']} "
              f"| {row['full_lists']['M_weights_per_s']} | {row['full_lists']['relative_error']} "
              f"| {row['share_of_full_gain']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"shape": [args.rows, args.columns], "results": results}, indent=1))


if __name__ == "__main__":
    main()
