"""What ``surgery merge --dry-run`` measures before anything is written: the task vectors, layer by layer, and what
the merge will cost. It answers "will this merge work?" up front (mergekit #169, #671, #652: "why is my merge
gibberish?"): a model that is no fine-tune of the base shows a task vector as large as the base itself, two models
that undo each other show a negative cosine, and TIES' sign conflicts show how much of the models' changes the
sign election will drop.

Per group (a decoder layer — ``model.layers.3`` — or a tensor outside the layers: embeddings, final norm,
lm_head), with τi = model i − base in float32, over every merged tensor of the group:

- ``relative_norm[i]`` = ‖τi‖ / ‖W0‖ (Frobenius norms over the group's tensors together);
- ``cosine[i, j]`` = ⟨τi, τj⟩ / (‖τi‖ ‖τj‖);
- ``sign_conflicts`` = of the entries kept by two or more models, the share whose kept values do not all have
  the same sign; kept is TIES' trim (the top ``density`` of |τi| per tensor, per expert for fused experts) for
  methods with a density, every nonzero entry otherwise.

The inputs are read exactly as the merge reads them (slices, vocabulary rows matched by token, parameters per
tensor), one tensor at a time::

    from surgery.merge import MergeJob
    from surgery.merge.diagnostics import diagnose
    report = diagnose(MergeJob.from_options(["base", "ft1", "ft2"], method="ties", density=0.2, output="out"))
    report["layers"][0]["relative_norm"], report["estimate"]["seconds"], report["warnings"]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from surgery.arch import LAYER_INDEX
from surgery.io.checkpoint import parse_dtype
from surgery.merge.engine import PlannedTensor, TensorMerger, merge_workers, open_inputs, plan_tensors
from surgery.merge.job import MergeJob
from surgery.merge.registry import TensorMerge
from surgery.merge.sparsify import chunk_slices, kept_count, magnitude_cut
from surgery.runtime.model import one_torch_thread

FAR_FROM_BASE = 0.5  # ‖τ‖/‖W0‖ above this in a layer: hardly a fine-tune of that base (fine-tunes: ~1e-3 to 1e-1)
OPPOSED = -0.2  # a model-wide cosine below this: the two task vectors largely cancel
WRITE_PROBE_BYTES = 512 << 20  # at most this much is written (and synced) to time the output's writing: smaller
# probes measure the device's cache (2 GB/s on the benchmark machine, 0.5 GB/s sustained; 512 MB: 0.65 GB/s)


@dataclass
class _Sums:
    """Running sums over one group's tensors."""

    base_squares: float = 0.0
    task_squares: list[float] = field(default_factory=list)
    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    overlapping: int = 0  # entries kept by two or more models
    conflicting: int = 0  # of those, entries whose kept values differ in sign
    tensors: int = 0

    def add(self, piece: TensorMerge) -> None:
        """Add one tensor (or one expert of a fused tensor), chunk by chunk: no whole float32 copy is made."""
        base, models = piece.base.reshape(-1), [model.reshape(-1) for model in piece.models]
        numel, count = base.numel(), len(models)
        if not self.task_squares:
            self.task_squares = [0.0] * count

        def delta(i: int, part: slice) -> torch.Tensor:
            return models[i][part].float() - base[part].float()

        densities = piece.per_model("density") if "density" in piece.parameters else [None] * count
        cuts = [None if density is None or density >= 1 or count < 2 else
                magnitude_cut(lambda part, i=i: delta(i, part).abs_(), numel, kept_count(numel, density))
                for i, density in enumerate(densities)]  # TIES' trim, exactly as ties() cuts
        ties_seen = [0] * count
        for part in chunk_slices(numel):  # float32 chunks, sums accumulated in float64
            chunk = base[part].float()
            self.base_squares += float(torch.dot(chunk, chunk).double())
            deltas = [delta(i, part) for i in range(count)]
            for i, one in enumerate(deltas):
                self.task_squares[i] += float(one.square().sum(dtype=torch.float64))
                for j in range(i + 1, count):
                    self.dots[i, j] = self.dots.get((i, j), 0.0) + float((one * deltas[j]).sum(dtype=torch.float64))
            if count < 2:
                continue
            positive, negative = torch.zeros_like(chunk), torch.zeros_like(chunk)
            for i, one in enumerate(deltas):
                kept = one
                if cuts[i] is not None:
                    mask, ties_seen[i] = cuts[i].keep(one.abs(), ties_seen[i])
                    kept = one * mask
                positive += kept > 0
                negative += kept < 0
            self.overlapping += int(torch.count_nonzero(positive + negative > 1))
            self.conflicting += int(torch.count_nonzero((positive > 0) & (negative > 0)))

    def merge_into(self, other: "_Sums") -> None:
        if not other.task_squares:
            other.task_squares = [0.0] * len(self.task_squares)
        other.base_squares += self.base_squares
        other.task_squares = [a + b for a, b in zip(other.task_squares, self.task_squares)]
        for pair, value in self.dots.items():
            other.dots[pair] = other.dots.get(pair, 0.0) + value
        other.overlapping += self.overlapping
        other.conflicting += self.conflicting
        other.tensors += self.tensors

    def report(self, group: str, models: list[str]) -> dict:
        base_norm = self.base_squares ** 0.5
        norms = [value ** 0.5 for value in self.task_squares]
        cosine = {f"{models[i]} · {models[j]}": (dot / (norms[i] * norms[j]) if norms[i] and norms[j] else None)
                  for (i, j), dot in sorted(self.dots.items())}
        return {
            "group": group, "tensors": self.tensors,
            "relative_norm": {model: (norm / base_norm if base_norm else None) for model, norm in zip(models, norms)},
            "norm": dict(zip(models, norms)), "cosine": cosine,
            "sign_conflicts": self.conflicting / self.overlapping if self.overlapping else None,
        }


def group_of(name: str) -> str:
    """The group a tensor's statistics add to: its decoder layer, else its module.

    Args:
        name: a tensor name.

    Returns:
        The group's name.

    Example: ``group_of("model.layers.3.mlp.up_proj.weight")`` is ``"model.layers.3"``, ``group_of("lm_head.weight")``
    is ``"lm_head"``
    """
    match = LAYER_INDEX.search(name)
    return name[:match.end(1)] if match else name.rsplit(".", 1)[0] if "." in name else name


def _check_inputs_finite(planned: PlannedTensor, merge_input: TensorMerge) -> None:
    from surgery.errors import BadInput

    tensors = ([merge_input.base] if merge_input.base is not None else []) + merge_input.models
    for (ckpt, name), tensor in zip(planned.inputs(), tensors):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BadInput(f"{ckpt.source}: tensor {name!r} contains NaN or Inf")


def _free_bytes(output: Path) -> int | None:
    for directory in (output, *output.parents):
        if directory.exists():
            return shutil.disk_usage(directory).free
    return None


def _anon_bytes() -> int | None:
    """This process's resident anonymous memory (Linux: RssAnon), None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere: what starting, importing, opening and
    planning cost before the first tensor, which the merge pays as well."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _timed(function: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak growth of anonymous memory) of ``function()``, its result held until measured; memory is
    sampled every 2 ms by a thread (torch's kernels release the GIL), 0 where it cannot be read."""
    start_anon = _anon_bytes()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            now = _anon_bytes()
            if now is not None and start_anon is not None:
                peak[0] = max(peak[0], now - start_anon)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    now = _anon_bytes()
    done.set()
    sampler.join()
    if now is not None and start_anon is not None:
        peak[0] = max(peak[0], now - start_anon)
    del result
    return seconds, peak[0]


def _write_rate(output: Path, size: int) -> float | None:
    """Bytes per second the output's file system takes, written and synced: a scratch file of ``size`` bytes (whole
    MiB, at least one) beside where the output would go, deleted at once (None where nothing can be written)."""
    size = max(1 << 20, size >> 20 << 20)
    directory = next((d for d in (output.parent, *output.parent.parents) if d.exists()), None)
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".surgery-write-probe-") as scratch:
            block = os.urandom(1 << 20)
            started = time.perf_counter()
            for _ in range(size >> 20):
                scratch.write(block)
            scratch.flush()
            os.fsync(scratch.fileno())
            return size / max(time.perf_counter() - started, 1e-9)
    except OSError:
        return None


def diagnose(job: MergeJob, workers: int | None = None) -> dict:
    """Read every input tensor as the merge would and report the task vectors per group, warnings, and the
    merge's estimated time, disk and memory (see the module's docstring for the definitions).

    Args:
        job: the merge job (nothing is written but a scratch file beside the output, deleted at once).
        workers: tensors merged at once (default: as many as the merge would use, one per CPU core).

    Returns:
        ``{"models", "layers": [group reports], "overall": group report, "estimate": {...}, "warnings": [...]}``;
        with no base (slerp without one, linear...) there are no task vectors: ``layers`` is empty.

    Example: ``diagnose(MergeJob.from_options(["base", "ft"], method="ties", output="out"))["overall"]``
    """
    recipe = job.recipe
    workers = workers or merge_workers(torch.device(job.device))
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with ExitStack() as stack:
        started = time.perf_counter()
        inputs = open_inputs(recipe, stack)
        plan = plan_tensors(inputs, dtype)
        planning_seconds = _process_seconds() or time.perf_counter() - started  # the merge's start as well
        merger = TensorMerger(recipe, inputs, plan, "cpu")
        models = [ckpt.source for ckpt in inputs.checkpoints if ckpt is not inputs.base]
        groups: dict[str, _Sums] = defaultdict(_Sums)
        samples: dict[tuple, tuple[float, int]] = {}  # per kind of tensor: (seconds, working bytes)
        merge_seconds, working_bytes, baseline = 0.0, 0, _anon_bytes()
        for planned in plan:
            merge_input = merger.merge_input(planned.spec.name)
            if merge_input is None:
                continue
            kind = (tuple(planned.spec.shape), merge_input.models[0].dtype, merge_input.is_matrix)
            if kind not in samples:  # the method timed once per kind, before anything else touches the inputs'
                # mapped pages (faulting them in is part of a merge's reading): merges cost the same per kind
                with one_torch_thread() if workers > 1 else nullcontext():  # as the merge runs each worker
                    samples[kind] = _timed(lambda: merger.merged(merge_input))
            _check_inputs_finite(planned, merge_input)
            merge_seconds += samples[kind][0]
            working_bytes = max(working_bytes, samples[kind][1])
            if merge_input.base is None:
                continue
            group = groups[group_of(planned.spec.name)]
            for piece in merger.pieces(merge_input):
                group.add(piece)
            group.tensors += 1
        labels = [_label(model, models) for model in models]
        layers = [groups[group].report(group, labels) for group in groups]
        overall = _Sums()
        for sums in groups.values():
            sums.merge_into(overall)
        total_bytes = sum(planned.spec.nbytes for planned in plan)
        rate = _write_rate(Path(job.output), min(total_bytes, WRITE_PROBE_BYTES))
        write_seconds = total_bytes / rate if rate else 0.0
        estimate = {
            "seconds": planning_seconds + merge_seconds / workers + write_seconds,
            "planning_seconds": planning_seconds, "merge_seconds": merge_seconds, "workers": workers,
            "write_seconds": write_seconds, "write_bytes_per_second": rate,
            "disk_bytes": total_bytes, "free_bytes": _free_bytes(Path(job.output)),
            "memory_bytes": (baseline or 0) + min(workers, max(1, len(plan))) * working_bytes,
        }
        report = {"models": dict(zip(labels, models)), "layers": layers,
                  "overall": overall.report("all", labels) if groups else None, "estimate": estimate}
        report["warnings"] = _warnings(report)
        return report


def _label(model: str, models: list[str]) -> str:
    """A short name for a model in tables: its card name, or its position when two share one."""
    from surgery.cards import model_name

    names = [model_name(m) for m in models]
    name = model_name(model)
    return name if names.count(name) == 1 else f"{name} ({models.index(model) + 1})"


def _warnings(report: dict) -> list[str]:
    warnings = []
    for model in report["models"]:
        far = [layer for layer in report["layers"] if (layer["relative_norm"][model] or 0) > FAR_FROM_BASE]
        if far:
            worst = max(far, key=lambda layer: layer["relative_norm"][model])
            warnings.append(f"{model}: its task vector is over {FAR_FROM_BASE:.0%} of the base's norm in "
                            f"{len(far)} group(s) (up to {worst['relative_norm'][model]:.2f}, in {worst['group']}): "
                            "is it a fine-tune of this base?")
        overall = report["overall"]
        if overall and overall["norm"][model] == 0:
            warnings.append(f"{model}: identical to the base in every merged tensor: it adds nothing")
    if report["overall"]:
        for pair, cosine in report["overall"]["cosine"].items():
            if cosine is not None and cosine < OPPOSED:
                warnings.append(f"{pair}: the task vectors point against each other (cosine {cosine:.2f}): their "
                                "changes largely cancel")
    estimate = report["estimate"]
    if estimate["free_bytes"] is not None and estimate["free_bytes"] < estimate["disk_bytes"]:
        warnings.append(f"the output needs {estimate['disk_bytes']} bytes; its file system has "
                        f"{estimate['free_bytes']} free")
    return warnings
