"""Benchmark ``surgery convert`` against a plain safetensors copy: wall time and peak anonymous memory.

Usage::

    python benchmarks/convert_bench.py [--small] [--repeat N] [--data-dir DIR]

The first run generates a synthetic Llama-layout checkpoint set (``base`` plus fine-tunes ``ft1`` and ``ft2`` =
base + N(0, 0.002) noise; bf16, 1 GB shards; ~0.85 B parameters, ~1.7 GB each; see ``synthetic.py``) under
``benchmarks/data/``, one tensor at a time with surgery's streaming writer; later runs reuse it. ``--small`` uses a
tiny layout for a smoke test. Each command then runs ``--repeat`` times on a warm page cache, measured with
:mod:`procmem` (peak RssAnon of the process tree; mmapped file pages are not counted). A Markdown table
goes to stdout and the same numbers to ``benchmarks/results/convert_bench.json`` (``convert_bench.small.json``
with ``--small``). Every output is checked against the base before it is deleted.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import torch

from surgery.io import open_checkpoint
from procmem import measure  # benchmarks/ is on sys.path when run as a script
from synthetic import benchmark_arguments, prepare, warm_page_cache  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The baseline: what a user would write without surgery, shard by shard. safetensors >= 0.8 maps the file
# (load_file's default backend="mmap"); backend="pread" reads each whole shard into memory, as older releases did
# (the reference anchor: ~1.24 GB anon for 1 GB shards).
PLAIN_COPY = """
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard, **LOAD_KWARGS), dst / shard.name, metadata={"format": "pt"})
for extra in ("config.json", "model.safetensors.index.json"):
    if (src / extra).exists():
        shutil.copy(src / extra, dst / extra)
"""


# ---------------------------------------------------------------------------------------------- measurement

def plain_copy(base: Path, out: Path, load_kwargs: dict | None = None) -> list[str]:
    return [sys.executable, "-c", PLAIN_COPY.replace("LOAD_KWARGS", repr(load_kwargs or {})), str(base), str(out)]


def commands(base: Path, out: Path) -> dict[str, list[str]]:
    """Label -> argv; the first is the reference the ratios are taken against."""
    from safetensors.torch import load_file

    surgery = [sys.executable, "-m", "surgery", "convert", str(base), "-o", str(out), "--force"]
    runs = {"plain safetensors copy (load_file + save_file per shard)": plain_copy(base, out)}
    if "backend" in inspect.signature(load_file).parameters:
        runs["plain copy, load_file(backend='pread') (whole shard in memory)"] = plain_copy(base, out,
                                                                                             {"backend": "pread"})
    runs["surgery convert (same dtype, 5GB shards)"] = surgery
    runs["surgery convert --max-shard-size 1GB"] = surgery + ["--max-shard-size", "1GB"]
    return runs


def verify(output: Path, base: Path) -> None:
    """Same tensor names as the base, and a few tensors bit-identical; exits loudly otherwise."""
    with open_checkpoint(base) as expected, open_checkpoint(output) as got:
        if set(got.tensors) != set(expected.tensors):
            sys.exit(f"FAIL {output}: tensor names differ from {base}")
        names = list(expected.tensors)
        for name in {names[0], names[len(names) // 2], names[-2], names[-1]}:
            if not torch.equal(got.get(name), expected.get(name)):
                sys.exit(f"FAIL {output}: tensor {name} differs from {base}")


def run_once(argv: list[str], out: Path, base: Path):
    shutil.rmtree(out, ignore_errors=True)
    result = measure(argv)
    if result.returncode != 0:
        sys.exit(f"FAIL ({result.returncode}): {' '.join(argv[:4])} ...\n{result.stdout}{result.stderr}")
    verify(out, base)
    shutil.rmtree(out)
    return result


def benchmark(base: Path, out: Path, repeat: int) -> list[dict]:
    rows = []
    for label, argv in commands(base, out).items():
        results = [run_once(argv, out, base) for _ in range(repeat)]
        rows.append({"run": label, "wall_s": min(r.wall_s for r in results),
                     "peak_anon_bytes": max(r.peak_anon_bytes for r in results)})
        print(f"  {label}: {rows[-1]['wall_s']:.2f} s, {rows[-1]['peak_anon_bytes'] / 1e9:.2f} GB",
              file=sys.stderr, flush=True)
    plain = rows[0]
    for row in rows:
        row["wall_vs_plain"] = row["wall_s"] / plain["wall_s"]
        row["anon_vs_plain"] = row["peak_anon_bytes"] / max(plain["peak_anon_bytes"], 1)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | wall s | peak anon GB | wall vs plain copy | anon vs plain copy |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['wall_s']:.2f} | {r['peak_anon_bytes'] / 1e9:.2f} | {r['wall_vs_plain']:.2f}× "
              f"| {r['anon_vs_plain']:.2f}× |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], repeat=2)
    args = parser.parse_args()

    size = "small" if args.small else "full"
    data_dir, params = prepare(size, args.data_dir)
    base = data_dir / "base"
    warm_page_cache(base)
    rows = benchmark(base, data_dir / "bench-out", args.repeat)

    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / ("convert_bench.small.json" if args.small else "convert_bench.json")
    summary = {"layout": size, "parameters": params, "repeat": args.repeat, "runs": rows}
    result_file.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
