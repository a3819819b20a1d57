"""`surgery run PIPELINE.yaml` and examples/Makefile: steps rerun only when their options or inputs change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_surgery
from merge_helpers import save_family

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture()
def models(tmp_path):
    return save_family(tmp_path / "models", "llama", 1)


def write_pipeline(path: Path, base: Path, ft: Path, out: Path, factor: float = 2.0) -> Path:
    steps = [
        {"merge": {"models": [str(base), str(ft)], "method": "ties", "density": 0.5, "output": str(out / "merged")}},
        {"extend": {"input": str(out / "merged"), "rope": "linear", "factor": factor, "output": str(out / "long")}},
        {"convert": {"input": str(out / "long"), "dtype": "bfloat16", "output": str(out / "bf16")}},
        {"quantize": {"input": str(out / "bf16"), "bits": 4, "group_size": 32, "output": str(out / "q4")}},
    ]
    path.write_text(yaml.safe_dump({"steps": steps}))
    return path


def statuses(stdout: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stdout.strip().splitlines()]


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(directory.iterdir())}


def test_steps_rerun_only_when_options_or_inputs_change(models, tmp_path):
    base, ft = models
    out = tmp_path / "out"
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", base, ft, out)

    dry = run_surgery("run", pipeline, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert statuses(dry.stdout) == ["would run (no output yet)"] + ["would run (an earlier step ran)"] * 3
    assert not out.exists()

    first = run_surgery("run", pipeline)
    assert first.returncode == 0, first.stderr
    assert statuses(first.stdout) == ["ran (no output yet)"] + ["ran (an earlier step ran)"] * 3
    assert "quantization_config" in (out / "q4" / "config.json").read_text()
    before = {name: snapshot(out / name) for name in ("merged", "long", "bf16", "q4")}

    again = run_surgery("run", pipeline)
    assert statuses(again.stdout) == ["up to date"] * 4
    assert {name: snapshot(out / name) for name in before} == before  # nothing rewritten

    write_pipeline(pipeline, base, ft, out, factor=4.0)
    changed = run_surgery("run", pipeline)
    assert changed.returncode == 0, changed.stderr
    assert statuses(changed.stdout) == ["up to date", "ran (options changed)"] + ["ran (an earlier step ran)"] * 2
    assert snapshot(out / "merged") == before["merged"]
    assert '"factor": 4.0' in (out / "long" / "config.json").read_text()

    weights = ft / "model.safetensors"  # a changed input reruns everything
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rerun = run_surgery("run", pipeline)
    assert statuses(rerun.stdout) == ["ran (inputs changed)"] + ["ran (an earlier step ran)"] * 3


def test_bad_pipelines_are_one_line_errors(models, tmp_path):
    base, ft = models
    cases = {
        "steps: []": "non-empty 'steps' list",
        "steps: [{frobnicate: {input: x, output: y}}]": "step 1: unknown command 'frobnicate'",
        f"steps: [{{merge: {{models: [{base}, {ft}], method: ties}}}}]": "step 1: merge needs output",
        f"steps: [{{merge: {{models: [{base}, {ft}], method: ties, bogus: 1, output: {tmp_path}/o}}}}]":
            "step 1: 'bogus' is not an option of merge",
    }
    for text, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(text)
        result = run_surgery("run", path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (text, result.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_example_makefile_reruns_only_what_changed(models, tmp_path):
    base, ft = models
    surgery = f"{sys.executable} -m surgery"
    variables = [f"SHORT={base}", f"LONG={ft}", f"OUT={tmp_path / 'out'}", f"SURGERY={surgery}"]
    make = ["make", "-C", str(EXAMPLES), "-j2", *variables]
    env = {**os.environ, "MAKEFLAGS": ""}
    done = subprocess.run([*make, "extended"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "extended" / "surgery.json").exists()
    up_to_date = subprocess.run([*make, "-q", "extended"], env=env)
    assert up_to_date.returncode == 0  # make -q: 0 when the target is up to date
