"""Start-up cost of the command line, before and after a change, side by side in one run.

    python benchmarks/startup_bench.py --before /path/to/old/checkout [--runs 7]

For each tree: ``python -X importtime -c "import surgery.cli"`` (cumulative import time of surgery.cli, and of
everything imported), and the wall time of ``surgery --version`` and ``surgery inspect MODEL`` (the tiny SmolLM2
bf16 checkpoint under benchmarks/data when present, else a small llama written on the spot). Minimum of --runs
runs each; ratios old / new.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def import_total_us(tree: Path) -> int:
    """Cumulative microseconds of ``import surgery.cli`` (its own line of -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import surgery.cli"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, cwd=tree)
    line = next(row for row in done.stderr.splitlines() if re.search(r"\|\s+surgery\.cli$", row))
    return int(line.split("|")[1])


def wall_s(tree: Path, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, check=True,
                   env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)  # cwd: -c / -m put it first on the path
    return time.perf_counter() - started


def tiny_model(root: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "tiny")
    return root / "tiny"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="A checkout of the code to compare with.")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    with tempfile.TemporaryDirectory() as scratch:
        model = HERE / "benchmarks" / "data" / "smollm2-bf16"
        model = model if model.exists() else tiny_model(Path(scratch))
        rows = {}
        for name, tree in trees.items():
            rows[name] = {
                "import surgery.cli (ms)": min(import_total_us(tree) for _ in range(args.runs)) / 1000,
                "surgery --version (s)": min(wall_s(tree, ["--version"]) for _ in range(args.runs)),
                "surgery inspect (s)": min(wall_s(tree, ["inspect", str(model)]) for _ in range(args.runs)),
            }
    for key in rows["before"]:
        before, after = rows["before"][key], rows["after"][key]
        print(f"{key:<28} before {before:9.3f}  after {after:9.3f}  ratio {before / after:5.1f}x")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
