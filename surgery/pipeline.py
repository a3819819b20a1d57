"""Pipeline files: a list of surgery commands run in order, each skipped when its output is up to date.

A step is one command of the CLI with the same options, written as YAML; positional arguments have names (``models``
for merge, ``input`` for the others, ``repo`` for push) and ``output`` is ``-o``::

    steps:
      - merge: {models: [org/short-model, org/long-model], method: ties, density: 0.2, output: out/merged}
      - extend: {input: out/merged, rope: linear, factor: 2, output: out/extended}
      - quantize: {input: out/extended, bits: 4, method: rtn, output: out/q4}
      - push: {input: out/q4, repo: me/short-reasoner-q4}

    from surgery.pipeline import load_pipeline, run_pipeline
    for report in run_pipeline(load_pipeline("pipeline.yaml")):
        print(report.describe())

After a step succeeds, a stamp is written beside its output (``OUTPUT.stamp.json``; for push, beside the input:
``INPUT.push.stamp.json``) recording the step's options and the content hashes of its inputs (SHA-256 of every
file, remembered between runs; a Hub repo id by its resolved revision). A step is skipped as "up to date" when its
output exists and its stamp records the same options and inputs; otherwise it runs — replacing its output
atomically — and so does every step after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from surgery.errors import BadInput
from surgery.io.writer import write_file_atomic

# command → (names of its positional arguments, in order; whether it writes an output directory with -o)
COMMANDS = {
    "merge": (["models"], True),
    "extend": (["input"], True),
    "convert": (["input"], True),
    "calibrate": (["input"], True),
    "quantize": (["input"], True),
    "push": (["input", "repo"], False),
}
REPLACEABLE = {"merge", "extend", "convert", "quantize"}  # take --force; calibrate replaces its file anyway


@dataclass(frozen=True)
class Step:
    command: str
    options: dict[str, Any]
    number: int

    @property
    def output(self) -> str | None:
        return self.options.get("output")

    @property
    def inputs(self) -> list[str]:
        """Every path or repo id the step reads (positional inputs, a recipe, AIM statistics, calibration text)."""
        values = []
        for key in ("models", "input", "recipe", "base", "stats", "calibration", "text"):
            value = self.options.get(key)
            values += value if isinstance(value, list) else [] if value is None else [value]
        return [str(v) for v in values]

    @property
    def stamp_path(self) -> Path:
        if self.output is not None:
            return Path(f"{self.output}.stamp.json")
        return Path(f"{self.options['input']}.{self.command}.stamp.json")

    def argv(self) -> list[str]:
        """The command line this step stands for."""
        positional, _ = COMMANDS[self.command]
        args = [self.command]
        for name in positional:
            value = self.options[name]
            args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        for key, value in self.options.items():
            if key in positional or value is None or value is False:
                continue
            flag = "-o" if key == "output" else "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            else:
                args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        return args


def load_pipeline(path: str | Path) -> list[Step]:
    """The steps of a pipeline file (BadInput naming the file and step when malformed)."""
    from surgery.yamlfile import read_yaml

    path = Path(path)
    data = read_yaml(path, "pipeline")
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise BadInput(f"{path}: a pipeline is a mapping with a non-empty 'steps' list")
    steps = []
    for number, entry in enumerate(data["steps"], 1):
        where = f"{path}: step {number}"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise BadInput(f"{where}: each step is one command mapped to its options, e.g. 'merge: {{...}}'")
        (command, options), = entry.items()
        if command not in COMMANDS:
            raise BadInput(f"{where}: unknown command {command!r} (known: {', '.join(COMMANDS)})")
        if not isinstance(options, dict):
            raise BadInput(f"{where}: the options of {command} must be a mapping")
        positional, writes = COMMANDS[command]
        needed = positional + (["output"] if writes else [])
        missing = [name for name in needed if options.get(name) in (None, [], "")]
        if missing:
            raise BadInput(f"{where}: {command} needs {', '.join(missing)}")
        steps.append(Step(command, dict(options), number))
    return steps


def _input_state(source: str) -> Any:
    """What a step input is now: content hashes of a local file or directory's files (hidden ones aside; a Hub
    snapshot's files are named by their hashes already), or None when it does not exist yet."""
    from surgery.hub import looks_like_repo_id, resolve_repo
    from surgery.provenance import content_hashes

    path = Path(source)
    if not path.exists() and looks_like_repo_id(source):
        path = resolve_repo(source)
    if not path.exists():
        return None  # produced by an earlier step that has not run yet (dry run), or missing
    if path.is_file():
        return content_hashes([path])[path]
    files = [file for file in sorted(path.rglob("*"))
             if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)]
    hashes = content_hashes(files)
    return {str(file.relative_to(path)): hashes[file] for file in files}


def _stamp(step: Step) -> dict:
    return {"command": step.command, "options": step.options,
            "inputs": {source: _input_state(source) for source in step.inputs}}


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, stamp: dict) -> None:
    write_file_atomic(path, lambda temporary: temporary.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n"))


@dataclass
class StepReport:
    step: Step
    status: str  # "up to date", "ran", "would run"
    reason: str = ""

    def describe(self) -> str:
        text = f"step {self.step.number} {self.step.command}"
        text += f" → {self.step.output}" if self.step.output else f" {' '.join(self.step.argv()[1:3])}"
        return f"{text}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def _why_stale(step: Step, stamp: dict) -> str | None:
    """Why the step must run, or None when its output is up to date."""
    if step.output is not None and not Path(step.output).exists():
        return "no output yet"
    recorded = _read_stamp(step.stamp_path)
    if recorded is None:
        return "no stamp"
    if recorded.get("options") != stamp["options"]:
        return "options changed"
    if recorded.get("inputs") != stamp["inputs"]:
        return "inputs changed"
    return None


def run_pipeline(steps: list[Step], *, dry_run: bool = False) -> Iterator[StepReport]:
    """Run (or with ``dry_run`` only assess) the steps in order, yielding a report per step as it finishes."""
    earlier_ran = False
    for step in steps:
        stamp = _stamp(step)
        reason = "an earlier step ran" if earlier_ran else _why_stale(step, stamp)
        if reason is None:
            yield StepReport(step, "up to date")
            continue
        earlier_ran = True
        if dry_run:
            yield StepReport(step, "would run", reason)
            continue
        _run_step(step)
        _write_stamp(step.stamp_path, stamp)
        yield StepReport(step, "ran", reason)


def _run_step(step: Step) -> None:
    """The step's command, in this process, with its errors named after the step."""
    import typer

    from surgery.cli import app

    argv = step.argv() + (["--force"] if step.command in REPLACEABLE and Path(step.output).exists() else [])
    try:
        code = typer.main.get_command(app).main(argv, prog_name="surgery", standalone_mode=False)
    except BadInput as err:
        raise BadInput(f"step {step.number} ({step.command}): {err}") from None
    except Exception as err:
        if not hasattr(err, "format_message"):  # a usage error (typer ships its own copy of click's classes)
            raise
        raise BadInput(f"step {step.number} ({step.command}): {err.format_message()}") from None
    if isinstance(code, int) and code != 0:  # the command reported its failure itself (e.g. a push to retry)
        raise SystemExit(code)
