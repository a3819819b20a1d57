"""`surgery verify` on the real SmolLM2-135M-Instruct: wall time of the old and new implementations side by side,
and the figures behind the default thresholds.

    python benchmarks/verify_bench.py                     # timing: old (905e1f2) and new, rtn and hqq, 4 bits g64
    python benchmarks/verify_bench.py --thresholds        # measures of good, wrong-reference and broken outputs
    python benchmarks/verify_bench.py --data-dir /tmp/verify-bench --seeds 0,1,2

Timing (each run a fresh process, as the command runs, so imports count): the old implementation (``git show
905e1f2:surgery/quantize/verify.py`` imported as a temporary module, run with the old command's defaults: 256
tokens, 64 Gaussian probes) as it was, with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers instead of
spinning) and with ``OMP_NUM_THREADS=1``, then the new ``surgery verify`` command (which runs on one torch thread
itself). On a CPU another job keeps busy, thread fan-out dominates the old run; the variants separate that from
the rest of the changes.

Thresholds (in process, library calls): for SmolLM2 and the tiny test models (tests/conftest.py) quantized at 4
bits (rtn / hqq, group 64 and 128, sym / asym, GPTQ) and 8 bits, the lowest per-layer cosine, the worst module and
the KL, per seed; then the same for failures: an unrelated reference of the same shapes (random weights, seeded),
a module whose scales are zeroed, one whose packed words are shuffled, and an output without its final norm.

Quantized outputs go to ``--data-dir`` (default benchmarks/data/verify) and are reused; hqq at group 64 takes a few
minutes on 2 cores. Results: stdout (one JSON line per row) and benchmarks/results/verify_bench[.thresholds].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "905e1f2"
SMOL_OUTPUTS = {  # name → surgery quantize options
    "rtn-g64": ["--group-size", "64"], "hqq-g64": ["--group-size", "64", "--method", "hqq"],
    "hqq-g128": ["--group-size", "128", "--method", "hqq"], "rtn-g128": ["--group-size", "128"],
    "asym-g128": ["--group-size", "128", "--scheme", "asym"],
    "gptq-g128": ["--group-size", "128", "--format", "gptq"], "rtn8-g64": ["--group-size", "64", "--bits", "8"],
}
TINY_OUTPUTS = {  # group sizes as tests/test_quantize.py uses them
    "rtn-g32": ["--group-size", "32"], "asym-g32": ["--group-size", "32", "--scheme", "asym"],
    "hqq-g32": ["--group-size", "32", "--method", "hqq"], "gptq-g32": ["--group-size", "32", "--format", "gptq"],
    "rtn8-g32": ["--group-size", "32", "--bits", "8"], "rtn-g64": ["--group-size", "64"],
}
OLD_DRIVER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("old_verify", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
report = old.verify(sys.argv[2], reference=sys.argv[3], tokens=256, seed=0)
print("kl", report["end_to_end"]["kl"], "min cosine", report["min_output_cosine"])
"""


def surgery(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def smol_source(data: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory (converted once from the GGUF on PyPI)."""
    from examples.smollm2 import smollm2_gguf

    source = data / "smol"
    if not (source / "model.safetensors").exists():
        done = surgery("convert", smollm2_gguf(), "-o", source, "--dtype", "bfloat16")
        assert done.returncode == 0, done.stderr
    return source


def quantized(source: Path, root: Path, runs: dict[str, list[str]]) -> dict[str, Path]:
    """``surgery quantize`` outputs of ``source`` (name → directory), made once."""
    paths = {}
    for name, options in runs.items():
        path = root / name
        if not (path / "surgery.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            done = surgery("quantize", source, "-o", path, *options, env={"OMP_WAIT_POLICY": "PASSIVE"})
            assert done.returncode == 0, done.stderr
        paths[name] = path
    return paths


def timed(command: list[str], env: dict) -> dict:
    started = time.perf_counter()
    inherited = {key: value for key, value in os.environ.items()  # thread settings only as each run asks
                 if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run(command, capture_output=True, text=True, env={**inherited, "PYTHONPATH": str(ROOT), **env})
    seconds = time.perf_counter() - started
    assert done.returncode in (0, 1), done.stderr
    return {"seconds": round(seconds, 1), "exit": done.returncode, "tail": done.stdout.strip().splitlines()[-2:]}


def timing(data: Path, source: Path) -> list[dict]:
    outputs = quantized(source, data, {name: SMOL_OUTPUTS[name] for name in ("rtn-g64", "hqq-g64")})
    old_file = data / "old_verify.py"
    old_file.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:surgery/quantize/verify.py"],
                                       capture_output=True, text=True, check=True).stdout)
    driver = data / "old_driver.py"
    driver.write_text(OLD_DRIVER)
    surgery("verify", outputs["rtn-g64"], "--reference", source)  # hashes the reference once (remembered after)
    rows = []
    for name, path in outputs.items():
        runs = {"old": ([sys.executable, str(driver), str(old_file), str(path), str(source)], {}),
                "old, OMP_WAIT_POLICY=PASSIVE": ([sys.executable, str(driver), str(old_file), str(path), str(source)],
                                                 {"OMP_WAIT_POLICY": "PASSIVE"}),
                "old, OMP_NUM_THREADS=1": ([sys.executable, str(driver), str(old_file), str(path), str(source)],
                                           {"OMP_NUM_THREADS": "1"}),
                "new": ([sys.executable, "-m", "surgery", "verify", str(path), "--reference", str(source)], {})}
        for label, (command, env) in runs.items():
            row = {"output": name, "run": label, **timed(command, env)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Thresholds


def unrelated_reference(source: Path, directory: Path, seed: int) -> Path:
    """A model of ``source``'s config with random weights (seeded), and its tokenizer: same shapes, nothing else."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (directory / "model.safetensors").exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
        model.save_pretrained(directory)
        for file in source.iterdir():
            if file.name.startswith("tokenizer") or file.suffix == ".jinja":
                shutil.copy(file, directory)
    return directory


def broken_copies(output: Path, root: Path, module: str) -> dict[str, Path]:
    """Copies of a compressed-tensors ``output``: ``module``'s scales zeroed, its packed words shuffled, and the
    final norm removed."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(output / "model.safetensors")
    words = tensors[f"{module}.weight_packed"]
    shuffled = words.flatten()[torch.randperm(words.numel(), generator=torch.Generator().manual_seed(0))]
    edits = {"zero-scales": {f"{module}.weight_scale": torch.zeros_like(tensors[f"{module}.weight_scale"])},
             "shuffled-words": {f"{module}.weight_packed": shuffled.reshape(words.shape)},
             "no-final-norm": {"model.norm.weight": None}}
    paths = {}
    for name, edit in edits.items():
        path = root / name
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(output, path)
        changed = {key: value for key, value in {**tensors, **edit}.items() if value is not None}
        save_file(changed, path / "model.safetensors", metadata={"format": "pt"})
        paths[name] = path
    return paths


def measure(label: str, output: Path, reference: Path, seed: int, **options) -> dict:
    from surgery.quantize import VerifyConfig, verify

    started = time.perf_counter()
    # any_reference: the unrelated reference is measured, not refused for its hashes
    report = verify(VerifyConfig(str(output), reference=str(reference), seed=seed, any_reference=True,
                                 **options)).summary()
    worst = min(report["layers"], key=lambda layer: layer["output_cosine"])
    row = {"case": label, "seed": seed, "min_cosine": round(report["min_output_cosine"], 4),
           "worst_module": worst["module"], "kl": round(report["end_to_end"]["kl"], 4),
           "top1": round(report["end_to_end"]["top1_agreement"], 3), "passed": report["passed"],
           "first_failure": report["failures"][0]["message"] if report["failures"] else None,
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(row), flush=True)
    return row


def thresholds(data: Path, source: Path, seeds: list[int], tokens: int | None, models: str) -> list[dict]:
    options = {"tokens": tokens} if tokens else {}
    rows = smol_thresholds(data, source, seeds, options) if models in ("all", "smol") else []
    if models in ("all", "tiny"):
        rows += tiny_thresholds(data, seeds, options)
    return rows


def smol_thresholds(data: Path, source: Path, seeds: list[int], options: dict) -> list[dict]:
    rows = []
    smol = quantized(source, data, SMOL_OUTPUTS)
    wrong = unrelated_reference(source, data / "unrelated-smol", seed=1)
    broken = broken_copies(smol["rtn-g64"], data / "broken", "model.layers.5.mlp.down_proj")
    for seed in seeds:
        for name, path in smol.items():
            rows.append(measure(f"smol {name}", path, source, seed, **options))
        rows.append(measure("smol rtn-g64 vs unrelated reference", smol["rtn-g64"], wrong, seed, **options))
        for name, path in broken.items():
            rows.append(measure(f"smol rtn-g64 {name}", path, source, seed, **options))
    return rows


def tiny_thresholds(data: Path, seeds: list[int], options: dict) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_CONFIGS, make_tiny_model, save_tokenizer

    rows = []
    tiny_root = data / "tiny"
    for model_type in TINY_CONFIGS:
        model_dir = tiny_root / model_type / "source"
        if not (model_dir / "model.safetensors").exists():
            make_tiny_model(model_type).save_pretrained(model_dir)
            save_tokenizer(model_dir)
        other = tiny_root / model_type / "unrelated"
        if not (other / "model.safetensors").exists():
            make_tiny_model(model_type, seed=1).save_pretrained(other)
            save_tokenizer(other)
        outputs = quantized(model_dir, tiny_root / model_type, TINY_OUTPUTS)
        for seed in seeds:
            for name, path in outputs.items():
                rows.append(measure(f"tiny {model_type} {name}", path, model_dir, seed, **options))
            rows.append(measure(f"tiny {model_type} rtn-g32 vs unrelated", outputs["rtn-g32"], other, seed,
                                **options))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data" / "verify")
    parser.add_argument("--thresholds", action="store_true", help="Measure good and failing cases instead of timing.")
    parser.add_argument("--seeds", default="0,1,2", help="--thresholds: seeds, comma-separated.")
    parser.add_argument("--tokens", type=int, default=None, help="--thresholds: generated tokens (default: verify's).")
    parser.add_argument("--models", choices=("all", "smol", "tiny"), default="all", help="--thresholds: which models.")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", tempfile.mkdtemp(prefix="verify-bench-cache-"))
    source = smol_source(args.data_dir)
    if args.thresholds:
        rows = thresholds(args.data_dir, source, [int(seed) for seed in args.seeds.split(",")], args.tokens,
                          args.models)
        name = "verify_bench.thresholds.json"
    else:
        rows = timing(args.data_dir, source)
        name = "verify_bench.json"
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
