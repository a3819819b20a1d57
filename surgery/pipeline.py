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

A step replaces only an output this pipeline made (one with its stamp): an existing output without a stamp is a
one-line error unless the step says ``force: true``. A step's keys are its command's options (``output`` for
``-o``, the positional names above, ``force``), nothing else; their values are strings, numbers, booleans or
lists of them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from surgery.errors import BadInput, CheckFailed
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
# the pipeline's to decide, not the step's (a push step may be a dry run: it sends nothing and needs no network)
NOT_STEP_OPTIONS = {"help", "dry_run", "json", "force", "version"}


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
            return Path(f"{self.output}.stamp.json").expanduser()
        return Path(f"{self.options['input']}.{self.command}.stamp.json").expanduser()

    @property
    def force(self) -> bool:
        """The step may replace an existing output that has no stamp of this pipeline."""
        return self.options.get("force") is True

    def argv(self) -> list[str]:
        """The command line this step stands for (without --force, which :func:`_run_step` decides): options first,
        then ``--`` and the positional values, so that no value (``--help``, say) is read as an option."""
        positional, _ = COMMANDS[self.command]
        declared = _step_options(self.command)
        args = [self.command]
        for key, value in self.options.items():
            option = declared.get(key)
            if key in positional or key == "force" or value is None:
                continue
            if isinstance(value, bool) and option is not None and option.is_flag:
                flags = option.opts if value else option.secondary_opts  # --normalize / --no-normalize
                args += [flag for flag in flags if flag.startswith("--")][:1]
                continue
            flag = "-o" if key == "output" else "--" + key.replace("_", "-")
            args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        args.append("--")
        for name in positional:
            value = self.options[name]
            args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        return args


@functools.lru_cache(maxsize=None)
def _step_options(command: str) -> dict[str, Any]:
    """The keys a step of ``command`` may have → the command line's option they stand for (None for the positional
    names and ``force``), read from the command line's own declaration of that command."""
    import typer

    from surgery.cli import app

    positional, writes = COMMANDS[command]
    declared: dict[str, Any] = {name: None for name in positional + (["output", "force"] if writes else [])}
    group = typer.main.get_command(app)
    for parameter in group.get_command(None, command).params:
        if parameter.param_type_name != "option":
            continue
        for flag in parameter.opts:
            key = flag.removeprefix("--").replace("-", "_")
            pipeline_only = key in NOT_STEP_OPTIONS and not (command == "push" and key == "dry_run")
            if flag.startswith("--") and not pipeline_only and key != "output":
                declared[key] = parameter
    return declared


def _check_options(command: str, options: dict, where: str) -> None:
    """BadInput naming the key unless ``options`` are declared options of ``command`` with plain values."""
    declared = _step_options(command)
    for key, value in options.items():
        if not isinstance(key, str) or key not in declared:
            known = ", ".join(sorted(declared))
            raise BadInput(f"{where}: {key!r} is not an option of {command} (its options: {known})")
        flag = key == "force" or (declared[key] is not None and declared[key].is_flag)
        if flag and not isinstance(value, bool) and value is not None:
            raise BadInput(f"{where}: {key} must be true or false, found {value!r}")
        if isinstance(value, bool) and not flag:
            raise BadInput(f"{where}: {key} takes a value, not {str(value).lower()}")
        scalars = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in scalars):
            raise BadInput(f"{where}: {key} must be a string, a number or a list of them, found {value!r}")
    required = sorted({key for key, option in declared.items() if option is not None and option.required})
    missing = [key for key in required if options.get(key) is None]
    if missing:
        raise BadInput(f"{where}: {command} needs {', '.join(missing)}")
    for key in ("output", "input", "repo"):
        if key in options and not (isinstance(options[key], str) and options[key]):
            raise BadInput(f"{where}: {key} must be a path or name (a string), found {options[key]!r}")
    models = options.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) and m for m in models)):
        raise BadInput(f"{where}: models must be a list of model paths or repo ids, found {models!r}")


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
        _check_options(command, options, where)
        steps.append(Step(command, dict(options), number))
    return steps


def _input_state(source: str, planned: set[str]) -> Any:
    """What a step input is now: content hashes of a local file or directory's files (hidden ones aside; a Hub
    snapshot's files are named by their hashes already), or None when it does not exist yet. ``planned`` are the
    outputs of earlier steps: always local paths, never Hub repo ids."""
    from surgery.hub import looks_like_repo_id, resolve_repo
    from surgery.provenance import content_hashes

    path = Path(source).expanduser()
    if not path.exists() and looks_like_repo_id(source) and _normal(source) not in planned:
        path = resolve_repo(source)
    if not path.exists():
        return None  # produced by an earlier step that has not run yet (dry run), or missing
    if path.is_file():
        return content_hashes([path])[path]
    files = [file for file in sorted(path.rglob("*"))
             if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)]
    hashes = content_hashes(files)
    return {str(file.relative_to(path)): hashes[file] for file in files}


def _normal(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _stamp(step: Step, planned: set[str]) -> dict:
    options = {key: value for key, value in step.options.items() if key != "force"}
    return {"command": step.command, "options": options,
            "inputs": {source: _input_state(source, planned) for source in step.inputs}}


def _read_stamp(path: Path) -> dict | None:
    try:
        stamp = json.loads(path.expanduser().read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _write_stamp(path: Path, stamp: dict) -> None:
    write_file_atomic(path, lambda temporary: temporary.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n"))


@dataclass
class StepReport:
    step: Step
    status: str  # "up to date", "ran", "would run"
    reason: str = ""

    def describe(self) -> str:
        text = f"step {self.step.number} {self.step.command}"
        positional, _ = COMMANDS[self.step.command]
        arguments = " ".join(str(self.step.options[name]) for name in positional)
        text += f" → {self.step.output}" if self.step.output else f" {arguments}"
        return f"{text}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def _why_stale(step: Step, stamp: dict) -> str | None:
    """Why the step must run, or None when its output is up to date."""
    if step.output is not None and not Path(step.output).expanduser().exists():
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
    planned: set[str] = set()
    for step in steps:
        stamp = _stamp(step, planned)
        if step.output is not None:
            planned.add(_normal(step.output))
        reason = "an earlier step ran" if earlier_ran else _why_stale(step, stamp)
        if reason is None:
            yield StepReport(step, "up to date")
            continue
        earlier_ran = True
        _check_replaceable(step)
        if dry_run:
            yield StepReport(step, "would run", reason)
            continue
        _run_step(step)
        _write_stamp(step.stamp_path, stamp)
        yield StepReport(step, "ran", reason)


def _check_replaceable(step: Step) -> None:
    """BadInput unless the step's output is absent, was made by this pipeline (it has the step's stamp), or the step
    says ``force: true``: a pipeline never deletes what the user made."""
    if step.output is None or not Path(step.output).expanduser().exists() or step.force:
        return
    recorded = _read_stamp(step.stamp_path)
    if recorded is None or recorded.get("command") != step.command:
        raise BadInput(f"step {step.number} ({step.command}): {step.output} exists and was not made by this step "
                       f"(no {step.stamp_path.name} beside it); remove it or set force: true in the step")


def _run_step(step: Step) -> None:
    """The step's command, in this process, with its errors named after the step."""
    import typer

    from surgery.cli import app

    argv = step.argv()
    if step.command in REPLACEABLE and Path(step.output).expanduser().exists():
        argv.insert(argv.index("--"), "--force")
    try:
        code = typer.main.get_command(app).main(argv, prog_name="surgery", standalone_mode=False)
    except BadInput as err:
        raise BadInput(f"step {step.number} ({step.command}): {err}") from None
    except CheckFailed as err:
        raise CheckFailed(f"step {step.number} ({step.command}): {err}") from None
    except Exception as err:
        if not hasattr(err, "format_message"):  # a usage error (typer ships its own copy of click's classes)
            raise
        raise BadInput(f"step {step.number} ({step.command}): {err.format_message()}") from None
    if isinstance(code, int) and code != 0:  # the command reported its failure itself (e.g. a push to retry)
        raise SystemExit(code)
