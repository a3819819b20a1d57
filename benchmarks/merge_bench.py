"""Benchmark ``surgery merge`` against mergekit and against the streaming I/O floor: wall time and peak anonymous
memory, task arithmetic (base + ft1) and TIES (base + ft1 + ft2, density 0.2), all side by side in one run.

Usage::

    python benchmarks/merge_bench.py [--small] [--repeat N] [--data-dir DIR] [--skip-mergekit]

Inputs are the synthetic Llama-layout checkpoints of ``synthetic.py`` (``base``, ``ft1``, ``ft2`` = base +
N(0, 0.002) noise; bf16, 1 GB shards; ~0.85 B parameters, ~1.7 GB each), made on the first run and reused later;
``--small`` uses a tiny layout for a smoke test. With a warm page cache, each command runs ``--repeat`` times as
a subprocess measured with :mod:`procmem` (peak RssAnon of the process tree; mmapped file pages are not
counted):

* mergekit (``mergekit-yaml``; ``dtype: float32`` math, ``out_dtype: bfloat16``, ``--out-shard-size 1B``, which
  mergekit 0.1.x compares with the shard's size in bytes, i.e. 1 GB shards),
* ``surgery merge ... --dtype bfloat16 --max-shard-size 1GB`` (math is always float32),
* the I/O floor: a plain script that reads each tensor of every input (safetensors ``safe_open``, mmap), sums them
  in float32 and writes the bf16 result with ``surgery.io.write_checkpoint``, one tensor at a time. No merge can
  stream with less I/O.

``--skip-mergekit`` leaves out the mergekit runs (and the comparisons with them). The outputs of surgery and
mergekit are compared tensor by tensor (max abs difference; share of bf16 elements that differ: float32 -> bf16
rounding may flip a few ulps); a tensor whose max difference exceeds 1e-2 of its max |value| fails the run. A
Markdown table goes to stdout, the same numbers and the checks to ``benchmarks/results/merge_bench.json``
(``merge_bench.small.json`` with ``--small``). Outputs are deleted once checked.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from procmem import measure  # benchmarks/ is on sys.path when run as a script
from synthetic import benchmark_arguments, prepare, warm_page_cache  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
DENSITY = 0.2
REL_TOLERANCE = 1e-2  # max |surgery - mergekit| / max |mergekit| per tensor before the check fails

# Goals, checked against each group's surgery row: wall vs mergekit, wall vs floor, peak anon bytes.
GOALS = {
    "ties": {"vs_mergekit": 1 / 7, "anon_bytes": 1e9},
    "task_arithmetic": {"vs_floor": 1.2, "anon_bytes": 0.6e9},
}

# The I/O floor: read every input's tensor, sum in float32, write bf16 -- one tensor at a time, nothing else.
FLOOR = """
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
from surgery.io import TensorInfo, write_checkpoint

out, inputs = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
handles = []
for folder in inputs:
    files = {}
    for shard in sorted(folder.glob("*.safetensors")):
        handle = safe_open(shard, framework="pt")
        files.update(dict.fromkeys(handle.keys(), handle))
    handles.append(files)
first = handles[0]
specs = [TensorInfo(name, torch.bfloat16, tuple(first[name].get_slice(name).get_shape())) for name in first]

def load(name):
    total = handles[0][name].get_tensor(name).float()
    for files in handles[1:]:
        total += files[name].get_tensor(name).float()
    return total

write_checkpoint(out, specs, load, config=json.loads((inputs[0] / "config.json").read_text()),
                 max_shard_size="1GB", force=True)
"""


# ---------------------------------------------------------------------------------------------- commands

def mergekit_config(method: str, base: Path, models: list[Path]) -> dict:
    parameters = {"weight": 1.0, **({"density": DENSITY} if method == "ties" else {})}
    return {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(model), "parameters": dict(parameters)} for model in models]}


def commands(data: Path, out: Path, configs: Path, skip_mergekit: bool, devices: tuple[str, ...] = ()) -> list[dict]:
    """One entry per run: group (merge method), kind (mergekit / surgery / surgery@DEVICE / floor), label, argv,
    output folder. ``devices`` adds a surgery run with ``--device D`` for each (the GPU speed-up rows)."""
    base, fine_tunes = data / "base", {"task_arithmetic": [data / "ft1"], "ties": [data / "ft1", data / "ft2"]}
    runs = []
    for method, models in fine_tunes.items():
        names = " + ".join(["base"] + [model.name for model in models])
        if not skip_mergekit:
            config = configs / f"{method}.yml"
            config.write_text(yaml.safe_dump(mergekit_config(method, base, models), sort_keys=False))
            runs.append(dict(group=method, kind="mergekit", label=f"mergekit {method} ({names})",
                             argv=[str(MERGEKIT), str(config), str(out / f"{method}-mergekit"),
                                   "--out-shard-size", "1B", "--no-copy-tokenizer", "--quiet"],
                             output=out / f"{method}-mergekit"))
        extra = ["--density", str(DENSITY)] if method == "ties" else []
        runs.append(dict(group=method, kind="surgery", label=f"surgery merge {method} ({names})",
                         argv=[sys.executable, "-m", "surgery", "merge", str(base), *map(str, models),
                               "--method", method, *extra, "--dtype", "bfloat16", "-o", str(out / f"{method}-surgery"),
                               "--force", "--max-shard-size", "1GB"],
                         output=out / f"{method}-surgery", inputs=(base, models)))
        for device in devices:
            runs.append(dict(group=method, kind=f"surgery@{device}", label=f"surgery merge {method} --device {device}",
                             argv=[*runs[-1]["argv"][:-5], "-o", str(out / f"{method}-surgery-{device}"), "--force",
                                   "--max-shard-size", "1GB", "--device", device],
                             output=out / f"{method}-surgery-{device}"))
        runs.append(dict(group=method, kind="floor", label=f"I/O floor: read {len(models) + 1}, sum, write",
                         argv=[sys.executable, "-c", FLOOR, str(out / f"{method}-floor"), str(base),
                               *map(str, models)],
                         output=out / f"{method}-floor"))
    return runs


# ---------------------------------------------------------------------------------------------- checks

def tensor_files(folder: Path) -> dict[str, object]:
    from safetensors import safe_open

    files = {}
    for shard in sorted(folder.glob("*.safetensors")):
        handle = safe_open(shard, framework="pt")
        files.update(dict.fromkeys(handle.keys(), handle))
    if not files:
        sys.exit(f"FAIL {folder}: no safetensors output")
    return files


def at_ties_cut(name: str, base: dict, fine_tunes: list[dict], shape: torch.Size) -> torch.Tensor:
    """Elements where some task vector's |delta| equals its k-th largest (k = density * numel): which of those
    tied entries TIES keeps is implementation-defined (mergekit: torch.argsort; surgery: first in memory order)."""
    theta0 = base[name].get_tensor(name).float().reshape(-1)
    mask = torch.zeros(theta0.numel(), dtype=torch.bool)
    k = max(1, int(DENSITY * theta0.numel()))
    for files in fine_tunes:
        magnitude = (files[name].get_tensor(name).float().reshape(-1) - theta0).abs()
        cut = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
        mask |= magnitude == cut
    return mask.reshape(shape)


def compare(ours: Path, theirs: Path, ties_inputs: tuple[Path, list[Path]] | None = None) -> dict:
    """Tensor-by-tensor differences of two bf16 checkpoints (``theirs`` is the reference). With ``ties_inputs``
    (base, fine-tunes), differences at elements tied at a TIES cut are counted apart, and the pass/fail test uses
    only the others."""
    a, b = tensor_files(ours), tensor_files(theirs)
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5]
        return {"ok": False, "error": f"tensor names differ: only in {ours.name}: {only_a}; "
                                      f"only in {theirs.name}: {only_b}"}
    if ties_inputs:
        base, fine_tunes = tensor_files(ties_inputs[0]), [tensor_files(path) for path in ties_inputs[1]]
    summary = {"tensors": len(a), "tensors_differing": 0, "elements": 0, "elements_differing": 0,
               "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_tensor": None, "dtypes": set()}
    if ties_inputs:
        summary.update(elements_at_cut=0, differing_at_cut=0, differing_off_cut=0, max_rel_diff_off_cut=0.0,
                       worst_tensor_off_cut=None)
    for name in a:
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        summary["dtypes"].add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            return {"ok": False, "error": f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"}
        differs = x != y
        differing = int(differs.sum())
        summary["elements"] += x.numel()
        summary["elements_differing"] += differing
        summary["tensors_differing"] += bool(differing)
        if not differing:
            if ties_inputs:
                summary["elements_at_cut"] += int(at_ties_cut(name, base, fine_tunes, x.shape).sum())
            continue
        diff = (x.float() - y.float()).abs()
        scale = max(y.float().abs().max().item(), 1e-30)
        rel = diff.max().item() / scale
        summary["max_abs_diff"] = max(summary["max_abs_diff"], diff.max().item())
        if rel > summary["max_rel_diff"]:
            summary["max_rel_diff"], summary["worst_tensor"] = rel, name
        if ties_inputs:
            cut = at_ties_cut(name, base, fine_tunes, x.shape)
            off = differs & ~cut
            summary["elements_at_cut"] += int(cut.sum())
            summary["differing_at_cut"] += int((differs & cut).sum())
            summary["differing_off_cut"] += int(off.sum())
            rel_off = diff[off].max().item() / scale if off.any() else 0.0
            if rel_off > summary["max_rel_diff_off_cut"]:
                summary["max_rel_diff_off_cut"], summary["worst_tensor_off_cut"] = rel_off, name
    summary["dtypes"] = sorted(summary["dtypes"])
    summary["fraction_differing"] = summary["elements_differing"] / max(summary["elements"], 1)
    gate = summary["max_rel_diff_off_cut"] if ties_inputs else summary["max_rel_diff"]
    summary["ok"] = gate <= REL_TOLERANCE
    return summary


def describe(check: dict) -> str:
    if "error" in check:
        return f"FAIL: {check['error']}"
    text = (f"{'ok' if check['ok'] else 'FAIL'}: {check['tensors']} tensors ({', '.join(check['dtypes'])}), "
            f"{check['tensors_differing']} differ; {check['elements_differing']:,} of {check['elements']:,} "
            f"elements differ ({check['fraction_differing']:.2e}); max abs diff {check['max_abs_diff']:.3g}, "
            f"max rel diff {check['max_rel_diff']:.3g}" + (f" ({check['worst_tensor']})" if check["worst_tensor"]
                                                             else ""))
    if "elements_at_cut" in check:
        text += (f". {check['elements_at_cut']:,} elements are tied at a TIES cut (either may be kept); of the "
                 f"differing ones {check['differing_at_cut']:,} are among them and {check['differing_off_cut']:,} "
                 f"are not, max rel diff off the cut {check['max_rel_diff_off_cut']:.3g}"
                 + (f" ({check['worst_tensor_off_cut']})" if check["worst_tensor_off_cut"] else ""))
    return text


# ---------------------------------------------------------------------------------------------- measurement

def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where it cannot be read)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the measured command and its subprocesses)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_once(run: dict):
    """Run one command; ``result.other_cpu_s`` is the CPU time the rest of the machine used meanwhile (kernel
    writeback included): well above a few seconds means another job competed for the cores."""
    shutil.rmtree(run["output"], ignore_errors=True)
    busy, own = busy_cpu_s(), own_cpu_s()
    result = measure(run["argv"], env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    result.other_cpu_s = max(0.0, (busy_cpu_s() - busy) - (own_cpu_s() - own))
    if result.returncode != 0:
        print(f"FAIL ({result.returncode}): {run['label']}\n$ {' '.join(run['argv'])}\n"
              f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-10000:]}", file=sys.stderr)
    elif not list(run["output"].glob("*.safetensors")):
        sys.exit(f"FAIL: {run['label']} wrote no safetensors to {run['output']}")
    return result


def benchmark(runs: list[dict], data: Path, repeat: int, checks: dict) -> list[dict]:
    rows = []
    for group in dict.fromkeys(run["group"] for run in runs):
        members = [run for run in runs if run["group"] == group]
        for run in members:
            results = [run_once(run) for _ in range(repeat)]
            failed = next((r for r in results if r.returncode != 0), None)
            row = {"group": group, "kind": run["kind"], "run": run["label"], "argv": run["argv"],
                   "wall_s": min(r.wall_s for r in results),
                   "peak_anon_bytes": max(r.peak_anon_bytes for r in results),
                   "other_cpu_s": max(r.other_cpu_s for r in results)}
            if failed is not None:
                row["error"] = (failed.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                row["returncode"] = failed.returncode
            rows.append(row)
            status = f"FAILED ({row['error']})" if "error" in row else ""
            print(f"  {run['label']}: {row['wall_s']:.2f} s, {row['peak_anon_bytes'] / 1e9:.2f} GB, "
                  f"other processes {row['other_cpu_s']:.1f} CPU s {status}",
                  file=sys.stderr, flush=True)
            if run["kind"] == "floor":  # nothing to compare it with
                shutil.rmtree(run["output"], ignore_errors=True)
        outputs = {run["kind"]: run["output"] for run in members}
        ok = {row["kind"] for row in rows if row["group"] == group and "error" not in row}
        if {"surgery", "mergekit"} <= ok:
            inputs = next(run["inputs"] for run in members if run["kind"] == "surgery")
            checks[f"{group}: surgery vs mergekit"] = compare(outputs["surgery"], outputs["mergekit"],
                                                              inputs if group == "ties" else None)
        if group == "task_arithmetic" and "surgery" in ok:  # base + (ft1 - base) is ft1 up to float32 rounding
            checks[f"{group}: surgery vs ft1"] = compare(outputs["surgery"], data / "ft1")
        for output in outputs.values():
            shutil.rmtree(output, ignore_errors=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        group = {r["kind"]: r for r in rows if r["group"] == row["group"] and "error" not in r}
        for kind in ("mergekit", "floor"):
            ref = group.get(kind)
            row[f"wall_vs_{kind}"] = row["wall_s"] / ref["wall_s"] if ref and "error" not in row else None
        goal = GOALS.get(row["group"]) if row["kind"] == "surgery" else None
        if goal and "error" not in row:
            met = [row["peak_anon_bytes"] <= goal["anon_bytes"]]
            met += [None if row[f"wall_{key}"] is None else row[f"wall_{key}"] <= goal[key]
                    for key in ("vs_mergekit", "vs_floor") if key in goal]
            row["goal"] = goal_text(row["group"])
            row["goal_met"] = False if False in met else None if None in met else True  # None: not measured


def goal_text(group: str) -> str:
    goal = GOALS[group]
    parts = []
    if "vs_mergekit" in goal:
        parts.append(f"≤ 1/{round(1 / goal['vs_mergekit'])} of mergekit wall")
    if "vs_floor" in goal:
        parts.append(f"≤ {goal['vs_floor']}× I/O floor wall")
    parts.append(f"≤ {goal['anon_bytes'] / 1e9:g} GB anon")
    return ", ".join(parts)


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(rows: list[dict]) -> str:
    lines = ["| run | wall s | peak anon GB | wall vs mergekit | wall vs I/O floor | goal | other procs' CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | FAILED | – | – | – | {r['error'][:120]} | {r['other_cpu_s']:.1f} |")
            continue
        mark = {True: "✅", False: "❌", None: "❔ (partly unmeasured)"}.get(r.get("goal_met"))
        goal = f"{mark} {r['goal']}" if "goal" in r else ""
        lines.append(f"| {r['run']} | {r['wall_s']:.2f} | {r['peak_anon_bytes'] / 1e9:.2f} "
                     f"| {ratio(r['wall_vs_mergekit'])} | {ratio(r['wall_vs_floor'])} | {goal} "
                     f"| {r['other_cpu_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], repeat=1)
    parser.add_argument("--skip-mergekit", action="store_true", help="leave out the mergekit runs")
    parser.add_argument("--device", action="append", default=[],
                        help="also run surgery with --device DEVICE (e.g. cuda), for the speed-up over the CPU row")
    args = parser.parse_args()
    if not args.skip_mergekit and not MERGEKIT.exists():
        sys.exit(f"{MERGEKIT} not found: install mergekit in this environment or pass --skip-mergekit")

    size = "small" if args.small else "full"
    data, params = prepare(size, args.data_dir)
    warm_page_cache(*(data / name for name in ("base", "ft1", "ft2")))
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as configs:
        runs = commands(data, data / "bench-out", Path(configs), args.skip_mergekit, tuple(args.device))
        try:
            rows = benchmark(runs, data, args.repeat, checks)
        finally:
            shutil.rmtree(data / "bench-out", ignore_errors=True)

    print(markdown(rows))
    if checks:
        print()
        for label, check in checks.items():
            print(f"- {label}: {describe(check)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / ("merge_bench.small.json" if args.small else "merge_bench.json")
    summary = {"layout": size, "parameters": params, "repeat": args.repeat, "density": DENSITY,
               "torch_threads": torch.get_num_threads(), "runs": rows, "checks": checks}
    result_file.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    failed = [r["run"] for r in rows if "error" in r] + [k for k, c in checks.items() if not c["ok"]]
    if failed:
        sys.exit(f"FAILED: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
