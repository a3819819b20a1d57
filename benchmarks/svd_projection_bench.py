"""Benchmark the Triton low-rank reconstruction kernel on a GPU against torch's matmul and the bytes floor.

Usage::

    python benchmarks/svd_projection_bench.py                 # needs CUDA; under a minute on an H200
    OUT=/some/dir python benchmarks/svd_projection_bench.py   # also writes /some/dir/svd_projection.json
    python benchmarks/svd_projection_bench.py --smoke         # tiny shapes on CPU in the Triton interpreter

For a batch 8 x 4096 x 4096 bfloat16 output and k = 128 and 512 (u, v: orthonormal columns, bfloat16), side by
side: torch ``(u * s) @ vᵀ`` (cuBLAS, float32 accumulation), triton ``reconstruct(u, s, v)`` and the floor
``out.zero_()`` (writes the output once, as any reconstruction must).

Times are medians of ``triton.testing.do_bench`` (eager launches, L2 flushed before each run) and, when capture
works, of ``do_bench_cudagraph`` (a CUDA graph: no CPU launch overhead). The first triton call, which autotunes
(compiles and times each tile config), is done and timed before. Every output is compared with float32 math
(max |out - ref| / max |ref|); a triton error above 2e-2 fails the run (exit 1). A Markdown table goes to stdout; the JSON to ``$OUT/svd_projection.json`` when OUT is set,
else to stdout. Nothing is installed. ``--smoke`` runs the same code on tiny shapes on CPU to check the script
itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's surgery, installed or not

FULL = dict(batch=8, m=4096, n=4096, ranks=(128, 512))
SMOKE = dict(batch=2, m=96, n=80, ranks=(16, 40))
MAX_REL_ERROR = 2e-2


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------- timing


def timer_for(device: torch.device):
    """(eager, graph) timers returning microseconds; graph returns None where it does not apply or fails."""
    if device.type != "cuda":
        def eager(fn):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6
        return eager, lambda fn: None

    from triton.testing import do_bench, do_bench_cudagraph

    def graph(fn):
        try:
            return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3
        except Exception as error:  # capture can fail (e.g. a sync inside); the eager time still stands
            print(f"  (CUDA graph timing failed: {type(error).__name__}: {error})", file=sys.stderr)
            return None

    return (lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3), graph


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_call_seconds(fn, device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the cases


def make_inputs(batch, m, n, rank, device):
    generator = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(batch, m, n, generator=generator, device=device).to(torch.bfloat16)
    u = torch.linalg.qr(torch.randn(batch, m, rank, generator=generator, device=device))[0].to(torch.bfloat16)
    v = torch.linalg.qr(torch.randn(batch, n, rank, generator=generator, device=device))[0].to(torch.bfloat16)
    s = torch.rand(batch, rank, generator=generator, device=device) * 10
    return x, u, v, s


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.float() - reference).abs().max() / reference.abs().max()).item()


def chosen_configs(kernel) -> dict:
    """The tile config autotuning picked per key (the only config in the interpreter)."""
    cache = getattr(kernel, "cache", {})
    if cache:
        return {str(key): str(config) for key, config in cache.items()}
    return {"only": str(kernel.configs[0])}


def bench_rank(svd, shape, rank, device, timers) -> list[dict]:
    """All rows for one rank: reconstruct (torch, triton, floor)."""
    eager, graph = timers
    batch, m, n = shape["batch"], shape["m"], shape["n"]
    x, u, v, s = make_inputs(batch, m, n, rank, device)
    matrix_bytes = x.numel() * x.element_size()
    out = torch.empty_like(x)
    rows = []

    def add(op, variant, fn, moved_bytes, result=None, reference=None, first_s=None):
        us = eager(fn)
        rows.append(dict(op=op, rank=rank, variant=variant, eager_us=us, graph_us=graph(fn),
                         gb_per_s=moved_bytes / us / 1e3 if moved_bytes else None, first_call_s=first_s,
                         max_rel_error=None if result is None else relative_error(result, reference)))

    reconstruct_ref = svd.reconstruct_reference(u, s, v, out_dtype=torch.float32)
    first = first_call_seconds(lambda: svd.reconstruct(u, s, v, backend="triton"), device)
    add("reconstruct", "torch: (u * s) @ vᵀ", lambda: (u * s.unsqueeze(-2).to(u.dtype)) @ v.mT, matrix_bytes,
        (u * s.unsqueeze(-2).to(u.dtype)) @ v.mT, reconstruct_ref)
    add("reconstruct", "triton", lambda: svd.reconstruct(u, s, v, backend="triton"), matrix_bytes,
        svd.reconstruct(u, s, v, backend="triton"), reconstruct_ref, first)
    add("reconstruct", "floor: out.zero_()", lambda: out.zero_(), matrix_bytes)
    return rows


# ------------------------------------------------------------------------------------------- reporting


def add_ratios(rows: list[dict]) -> None:
    """vs_torch, vs_floor: a row's time over the torch row's and the floor row's of its op and rank (graph times
    when both have one, else eager)."""
    def ratio(row, other):
        if row["graph_us"] is not None and other["graph_us"] is not None:
            return row["graph_us"] / other["graph_us"]
        return row["eager_us"] / other["eager_us"]
    for row in rows:
        group = [r for r in rows if r["op"] == row["op"] and r["rank"] == row["rank"]]
        row["vs_torch"] = ratio(row, next(r for r in group if r["variant"].startswith("torch")))
        row["vs_floor"] = ratio(row, next(r for r in group if r["variant"].startswith("floor")))


def markdown(rows: list[dict]) -> str:
    def number(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}"
    lines = ["| op | k | variant | eager µs | graph µs | GB/s | × torch | × floor | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = "" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        lines.append(f"| {r['op']} | {r['rank']} | {r['variant']} | {number(r['eager_us'])} | "
                     f"{number(r['graph_us'])} | {number(r['gb_per_s'], 0)} | {number(r['vs_torch'], 2)} | "
                     f"{number(r['vs_floor'], 2)} | {error} |")
    return "\n".join(lines)


def main() -> int:
    arguments = parse_arguments()
    if arguments.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels, i.e. before the import below
        device, shape = torch.device("cpu"), SMOKE
    elif not torch.cuda.is_available():
        sys.exit("svd_projection_bench: CUDA is not available (torch.cuda.is_available() is False). Run it on a "
                 "GPU machine, or pass --smoke to check the script on CPU through the Triton interpreter.")
    else:
        device, shape = torch.device("cuda"), FULL

    import triton
    from surgery.kernels import svd_projection as svd

    started = time.perf_counter()
    timers = timer_for(device)
    rows = []
    for rank in shape["ranks"]:
        rows += bench_rank(svd, shape, rank, device, timers)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    failed = [r for r in rows if r["variant"] == "triton" and r["max_rel_error"] > MAX_REL_ERROR]
    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter, --smoke)",
        torch=torch.__version__, triton=triton.__version__, shape=dict(shape, dtype="bfloat16"),
        timing="medians; eager: triton.testing.do_bench (L2 flushed), graph: do_bench_cudagraph; "
               "ratios use graph times where both rows have one",
        rows=rows, max_rel_error_allowed=MAX_REL_ERROR, checks_passed=not failed,
        autotuned={"times_vt": chosen_configs(svd._times_vt_kernel)},
        wall_s=time.perf_counter() - started)

    print(markdown(rows))
    text = json.dumps(result, indent=2)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "svd_projection.json"
        path.write_text(text)
        print(f"wrote {path}")
    else:
        print(text)
    for row in failed:
        print(f"FAILED: triton {row['op']} k={row['rank']} max rel error {row['max_rel_error']:.2e} "
              f"> {MAX_REL_ERROR}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
