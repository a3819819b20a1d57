"""Run a command and measure its wall time and peak anonymous memory (Linux).

Peak RssAnon is summed over the process tree and sampled every few milliseconds; memory-mapped file pages (how
safetensors reads) are reclaimable and not counted. Used by the benchmarks and the memory tests::

    result = measure([sys.executable, "-m", "surgery", "convert", "in", "-o", "out"])
    print(result.wall_s, result.peak_anon_bytes / 1e9)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measurement:
    returncode: int
    wall_s: float
    peak_anon_bytes: int
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process ended between two looks
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree_anon_bytes(pid: int) -> int:
    """Current RssAnon of ``pid`` and all its descendants, in bytes."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        pending += _children(current)
    return total


def measure(argv: list[str], interval_s: float = 0.005, env: dict | None = None, cwd: str | None = None) -> Measurement:
    """Run ``argv`` to completion, sampling its process tree's anonymous memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})},
                                   cwd=cwd)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_anon_bytes(process.pid))
            time.sleep(interval_s)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Measurement(process.returncode, wall, peak, out.read(), err.read())
