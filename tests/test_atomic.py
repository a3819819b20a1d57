"""Outputs appear atomically or not at all: failures, SIGTERM and SIGKILL mid-write leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_surgery
from surgery.errors import BadInput
from surgery.io import TensorInfo, write_checkpoint


def staging_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".out")]


def start_convert(source: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "surgery", "convert", str(source), "-o", str(out),
                             "--dtype", "bfloat16", "--max-shard-size", "100MB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_writing(parent: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the run has written some shard bytes into its staging directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "convert finished before it could be interrupted"
        shards = [f for d in staging_dirs(parent) for f in d.glob("*.safetensors")]
        if shards and sum(f.stat().st_size for f in shards) > 50_000_000:
            return
        time.sleep(0.02)
    raise AssertionError("convert never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_output_and_rerun_succeeds(sig, big_checkpoint, tmp_path):
    out = tmp_path / "out"
    process = start_convert(big_checkpoint, out)
    wait_until_writing(tmp_path, process)
    process.send_signal(sig)
    process.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable signal: the run cleans up after itself
        assert process.returncode == 128 + signal.SIGTERM, process.stderr.read()
        assert staging_dirs(tmp_path) == []
    else:  # SIGKILL: only the hidden staging directory remains, and the next run removes it
        assert len(staging_dirs(tmp_path)) == 1
    result = run_surgery("convert", big_checkpoint, "-o", out, "--dtype", "bfloat16", "--max-shard-size", "100MB")
    assert result.returncode == 0, result.stderr
    assert staging_dirs(tmp_path) == [] and (out / "model.safetensors.index.json").exists()


def test_only_abandoned_staging_directories_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.partial-{finished.stdout.strip()}-abc"
    live = tmp_path / f".out.partial-{os.getpid()}-def"  # this very process: alive
    for directory in (dead, live):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"partial")
    write_checkpoint(tmp_path / "out", [TensorInfo("t", torch.float32, (3,))], lambda name: torch.ones(3))
    assert not dead.exists() and live.exists()


def test_output_appearing_during_the_run_is_not_clobbered(tmp_path):
    out = tmp_path / "out"

    def produce(name):
        out.mkdir()  # another process finished first
        (out / "theirs.txt").write_text("kept")
        return torch.ones(3)

    with pytest.raises(BadInput, match="appeared while"):
        write_checkpoint(out, [TensorInfo("t", torch.float32, (3,))], produce)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_write_keeps_the_existing_output(tmp_path):
    out = tmp_path / "out"
    specs = [TensorInfo(f"t{i}", torch.float32, (1000,)) for i in range(6)]
    write_checkpoint(out, specs, lambda name: torch.zeros(1000), max_shard_size="8KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(name):
        if name == "t4":
            raise RuntimeError("disk on fire")
        return torch.ones(1000)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(out, specs, failing, max_shard_size="8KB", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_shape_from_producer_is_caught(tmp_path):
    with pytest.raises(RuntimeError, match="planned"):
        write_checkpoint(tmp_path / "out", [TensorInfo("t", torch.float32, (4,))], lambda name: torch.zeros(5))
    assert list(tmp_path.iterdir()) == []
