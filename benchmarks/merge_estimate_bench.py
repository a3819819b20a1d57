"""How good are ``surgery merge --dry-run``'s estimates? The dry run's time, disk and memory figures beside the
merge they describe, measured in the same run (wall time and peak RssAnon of the process tree, :mod:`procmem`),
for task arithmetic (base + ft1), TIES (base + ft1 + ft2, density 0.2) and the SVD method (base + ft1).

Usage::

    python benchmarks/merge_estimate_bench.py [--small] [--repeat N] [--data-dir DIR]

Inputs: the synthetic Llama-layout checkpoints of ``synthetic.py`` (~0.85 B parameters, bf16; ``--small`` a tiny
layout). The page cache is warmed first, so the dry run and the merge read from memory alike. A Markdown table goes
to stdout, the numbers to ``benchmarks/results/merge_estimate_bench.json``: per method the estimate, the
measurement and their ratio (estimate / measured; the memory estimate is an upper bound, so its ratio should be
≥ 1), and the dry run's own wall time.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from procmem import measure  # benchmarks/ is on sys.path when run as a script
from synthetic import benchmark_arguments, prepare, warm_page_cache

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = {"task_arithmetic": (["ft1"], []), "ties": (["ft1", "ft2"], ["--density", "0.2"]),
        "svd": (["ft1"], [])}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_method(method: str, data: Path, out: Path, repeat: int) -> dict:
    models, extra = RUNS[method]
    argv = [sys.executable, "-m", "surgery", "merge", str(data / "base"), *(str(data / m) for m in models),
            "--method", method, *extra, "--dtype", "bfloat16", "--max-shard-size", "1GB", "-o", str(out), "--force"]
    dry = measure([*argv, "--dry-run", "--json"], env=OFFLINE)
    if dry.returncode != 0:
        sys.exit(f"FAIL dry run of {method}: {dry.stderr[-2000:]}")
    estimate = json.loads(dry.stdout)["diagnostics"]["estimate"]
    walls, peaks = [], []
    for _ in range(repeat):
        merged = measure(argv, env=OFFLINE)
        if merged.returncode != 0:
            sys.exit(f"FAIL merge {method}: {merged.stderr[-2000:]}")
        walls.append(merged.wall_s)
        peaks.append(merged.peak_anon_bytes)
    written = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return {"method": method, "dry_run_s": dry.wall_s, "estimated_s": estimate["seconds"],
            "measured_s": min(walls), "time_ratio": estimate["seconds"] / min(walls),
            "estimated_disk_bytes": estimate["disk_bytes"], "written_bytes": written,
            "estimated_memory_bytes": estimate["memory_bytes"], "peak_anon_bytes": max(peaks),
            "memory_ratio": estimate["memory_bytes"] / max(max(peaks), 1), "workers": estimate["workers"]}


def main() -> None:
    args = benchmark_arguments(__doc__.splitlines()[0], repeat=1).parse_args()
    data, params = prepare("small" if args.small else "full", args.data_dir)
    warm_page_cache(*(data / name for name in ("base", "ft1", "ft2")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="merge-estimate-", dir=args.data_dir) as scratch:
        for method in RUNS:
            rows.append(run_method(method, data, Path(scratch) / method, args.repeat))
    print(f"| method | dry run (s) | estimated time (s) | merge (s) | estimate / merge | estimated disk | written "
          f"| estimated memory | peak anon | estimate / peak |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['dry_run_s']:.1f} | {row['estimated_s']:.1f} | {row['measured_s']:.1f} | "
              f"{row['time_ratio']:.2f} | {row['estimated_disk_bytes'] / 1e6:.0f} MB | "
              f"{row['written_bytes'] / 1e6:.0f} MB | {row['estimated_memory_bytes'] / 1e6:.0f} MB | "
              f"{row['peak_anon_bytes'] / 1e6:.0f} MB | {row['memory_ratio']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    name = "merge_estimate_bench.small.json" if args.small else "merge_estimate_bench.json"
    (RESULTS / name).write_text(json.dumps({"parameters": params, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
