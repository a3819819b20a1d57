"""Per-tensor cost of the SVD merge methods on CPU, side by side in one run, against task arithmetic and a full SVD.

One thread (as `surgery merge` gives each worker), one Llama-sized MLP matrix (default 2048×5632; the 0.85 B
benchmark layout's up/gate/down shape) and task vectors with a decaying spectrum plus noise, as fine-tunes have::

    .venv/bin/python benchmarks/svd_merge_bench.py              # ~2-4 minutes on one core
    .venv/bin/python benchmarks/svd_merge_bench.py --rows 512 --cols 1408   # smoke test

Prints a Markdown table and writes benchmarks/results/svd_merge_bench.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from surgery.merge.methods import task_arithmetic
from surgery.merge.registry import TensorMerge
from surgery.merge.spectral import lore, star, tsv

RESULTS = Path(__file__).parent / "results"


def task_matrices(rows: int, cols: int, count: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator) * 0.02
    models = []
    rank = min(rows, cols)
    for _ in range(count):
        left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
        right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
        spectrum = 0.05 * 0.99 ** torch.arange(rank)
        noise = 1e-4 * torch.randn(rows, cols, generator=generator)
        models.append((base + (left * spectrum) @ right.T + noise).to(torch.bfloat16))
    return base.to(torch.bfloat16), models


def timed(label: str, function, x: TensorMerge, repeat: int) -> dict:
    function(x)  # warm-up
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        function(x)
        times.append(time.perf_counter() - began)
    return {"run": label, "seconds": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=5632)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-lore", action="store_true", help="leave out lore (10 rounds of full SVDs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, models = task_matrices(args.rows, args.cols, 2)

    def merge_input(count: int, **parameters) -> TensorMerge:
        return TensorMerge(name="model.layers.0.mlp.up_proj.weight", base=base, models=models[:count],
                           parameters={"weight": [1.0] * count, **parameters}, is_matrix=True)

    def full_svd(x: TensorMerge) -> torch.Tensor:
        return torch.linalg.svd(x.models[0].float() - x.base.float(), full_matrices=False)[0]

    rows = [
        timed("task_arithmetic, 1 model", task_arithmetic, merge_input(1), args.repeat),
        timed("full SVD of one task matrix (reference)", full_svd, merge_input(1), args.repeat),
        timed("star eta 0.4, 1 model (Gram eigh + projection)", star, merge_input(1), args.repeat),
        timed("star rank 64, 1 model (Gram eigh + projection)", star, merge_input(1, rank=64), args.repeat),
        timed("tsv, 2 models (full rank: 2 full SVDs)", tsv, merge_input(2), args.repeat),
        timed("tsv rank 128, 2 models (randomised top-64 each)", tsv, merge_input(2, rank=128), args.repeat),
    ]
    if not args.skip_lore:
        rows.append(timed("lore, 2 models (10 rounds of full SVDs)", lore, merge_input(2), args.repeat))
    reference = rows[1]["seconds"]
    print(f"one {args.rows}×{args.cols} matrix, one thread\n\n| run | seconds | vs one full SVD |\n|---|---|---|")
    for row in rows:
        row["vs_full_svd"] = row["seconds"] / reference
        print(f"| {row['run']} | {row['seconds']:.3f} | {row['vs_full_svd']:.2f}× |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "svd_merge_bench.json").write_text(json.dumps({"shape": [args.rows, args.cols], "rows": rows},
                                                             indent=2))


if __name__ == "__main__":
    main()
