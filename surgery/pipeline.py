"""Pipeline files: a list of surgery operations run in order, each skipped when its output is up to date.

A step is one command with the options of the CLI, written as YAML (the pipeline builds the operation's config
from them, e.g. :class:`~surgery.quantize.QuantizeConfig`, and calls the operation: the same checks as the command
line, no argv); positional arguments have names (``models`` for merge, ``adapters`` for merge-lora, ``config`` for moe's mergekit-moe YAML,
``input`` for the others, ``repo`` for push) and ``output`` is ``-o``::

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
one-line error unless the step says ``force: true``. A step's keys are its operation's options (``output`` for
``-o``, the positional names above, ``force``), nothing else; their values are strings, numbers, booleans or
lists of them. A new command becomes a step with one line in :data:`OPERATIONS`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from surgery.errors import BadInput, Failed
from surgery.io.writer import write_file_atomic


@dataclass(frozen=True)
class Operation:
    """What a step of one command runs: ``config`` (``module:name``) built from the step's keys, then ``function``
    called with it. ``positional`` are the keys naming its inputs (``renames`` maps a key to the config's argument
    where they differ); ``writes``: it takes ``output``; ``replaceable``: its config has ``force``. The step's keys
    are the config's fields (a dataclass), the parameters of ``config`` (a function: its signature's), or what
    ``options`` (``module:name`` of a function returning name → type) lists."""

    config: str
    function: str
    positional: tuple[str, ...]
    renames: dict[str, str]
    writes: bool = True
    replaceable: bool = True
    options: str | None = None

    @staticmethod
    def _named(path: str) -> Any:
        module, _, name = path.partition(":")
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target

    def build(self, options: dict[str, Any]) -> Any:
        """The step's config, from its keys (values already checked by :func:`_check_options`)."""
        arguments = {self.renames.get(key, key): value for key, value in options.items() if value is not None}
        return self._named(self.config)(**arguments)

    def run(self, config: Any) -> Any:
        return self._named(self.function)(config)


# A new command becomes a pipeline step with one line here.
OPERATIONS = {
    "merge": Operation("surgery.merge.job:MergeJob.from_options", "surgery.merge.engine:merge", ("models",), {},
                       options="surgery.merge.job:option_types"),
    "extend": Operation("surgery.extend.context:ExtendConfig", "surgery.extend.context:extend", ("input",),
                        {"input": "source"}),
    "convert": Operation("surgery.convert:ConvertConfig", "surgery.convert:convert", ("input",), {"input": "source"}),
    "calibrate": Operation("surgery.merge.aim:CalibrateConfig", "surgery.merge.aim:calibrate", ("input",),
                           {"input": "source"}, replaceable=False),  # replaces its statistics file anyway
    "quantize": Operation("surgery.quantize.engine:QuantizeConfig", "surgery.quantize.engine:quantize", ("input",),
                          {"input": "source"}),
    "moe": Operation("surgery.moe:MoeConfig.from_file", "surgery.moe:moe", ("config",), {"config": "path"}),
    "extract-lora": Operation("surgery.adapters.lora:ExtractLoraConfig", "surgery.adapters.lora:extract_lora",
                              ("input", "base"), {"input": "finetuned"}),
    "merge-lora": Operation("surgery.adapters.lora_merge:MergeLoraConfig.from_options",
                            "surgery.adapters.lora_merge:merge_lora", ("adapters",), {},
                            options="surgery.adapters.lora_merge:option_types"),
    "push": Operation("surgery.hub:PushConfig", "surgery.hub:push", ("input", "repo"),
                      {"input": "directory", "repo": "repo_id"}, writes=False, replaceable=False),
}
# the pipeline's to decide, not the step's (a push step may be a dry run: it sends nothing and needs no network)
NOT_STEP_OPTIONS = {"dry_run", "force"}


@dataclass(frozen=True)
class Step:
    command: str
    options: dict[str, Any]
    number: int

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.command]

    @property
    def output(self) -> str | None:
        return self.options.get("output")

    @property
    def inputs(self) -> list[str]:
        """Every path or repo id the step reads (positional inputs, a recipe, AIM statistics, calibration text)."""
        values = []
        for key in ("models", "adapters", "input", "recipe", "config", "base", "stats", "calibration", "text"):
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


@dataclass(frozen=True)
class Declared:
    """A step key: the type of what it sets, whether the step must give it."""

    kind: Any
    required: bool = False

    def types(self) -> set:
        """The plain types the key accepts (None aside): bool, int, float, str, or list."""
        found = set()
        union = typing.get_origin(self.kind) in (typing.Union, types.UnionType)
        for kind in typing.get_args(self.kind) if union else (self.kind,):
            origin = typing.get_origin(kind) or kind
            if origin in (list, tuple) or (isinstance(origin, type) and issubclass(origin, Sequence)
                                           and origin is not str):
                found.add(list)
            elif kind in (bool, int, float, str):
                found.add(kind)
            elif kind is Path:
                found.add(str)
        return found or {str}

    @property
    def is_flag(self) -> bool:
        return self.types() == {bool}


@functools.lru_cache(maxsize=None)
def _step_options(command: str) -> dict[str, Declared]:
    """The keys a step of ``command`` may have → what they set, read from the operation's config (see
    :class:`Operation`), positional arguments by their step names."""
    operation = OPERATIONS[command]
    target = Operation._named(operation.config)
    inverse = {argument: key for key, argument in operation.renames.items()}
    declared: dict[str, Declared] = {}
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        for field in dataclasses.fields(target):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            declared[inverse.get(field.name, field.name)] = Declared(hints[field.name], required)
    elif operation.options is not None:
        declared = {name: Declared(kind) for name, kind in Operation._named(operation.options)().items()}
    else:
        import inspect

        hints = typing.get_type_hints(target)
        for name, parameter in inspect.signature(target).parameters.items():
            declared[inverse.get(name, name)] = Declared(hints.get(name, Any),
                                                         parameter.default is inspect.Parameter.empty)
    for name in NOT_STEP_OPTIONS - ({"dry_run"} if command == "push" else set()):
        declared.pop(name, None)
    if operation.writes:
        declared["force"] = Declared(bool)
    return declared

def _coerced(key: str, value: Any, declared: Declared, where: str) -> Any:
    """``value`` as the config takes it, the way the command line reads its text: numbers where a number is
    declared (BadInput naming the key when it is none), text where text is, a list only where a list is."""
    accepted = declared.types()
    if value is None:
        return None
    if isinstance(value, list) and list not in accepted:
        value = ",".join(map(str, value))  # as on the command line: one comma-separated value
    if isinstance(value, list) or bool in accepted:
        return value
    if int in accepted and not isinstance(value, bool):
        try:
            return value if isinstance(value, int) else int(value) if isinstance(value, str) else int(str(value))
        except ValueError:
            if str not in accepted:
                raise BadInput(f"{where}: {key} must be an integer, found {value!r}") from None
    if float in accepted and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            if str not in accepted:
                raise BadInput(f"{where}: {key} must be a number, found {value!r}") from None
    if str in accepted:
        return value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    raise BadInput(f"{where}: {key}: unexpected value {value!r}")


def _check_options(command: str, options: dict, where: str) -> dict[str, Any]:
    """The step's options as its config takes them; BadInput naming the key unless each is an option of
    ``command`` with a plain value of the declared kind and every required one is given."""
    declared = _step_options(command)
    checked = {}
    for key, value in options.items():
        if not isinstance(key, str) or key not in declared:
            known = ", ".join(sorted(declared))
            raise BadInput(f"{where}: {key!r} is not an option of {command} (its options: {known})")
        flag = declared[key].is_flag
        if flag and not isinstance(value, bool) and value is not None:
            raise BadInput(f"{where}: {key} must be true or false, found {value!r}")
        if isinstance(value, bool) and not flag and bool not in declared[key].types():
            raise BadInput(f"{where}: {key} takes a value, not {str(value).lower()}")
        scalars = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in scalars):
            raise BadInput(f"{where}: {key} must be a string, a number or a list of them, found {value!r}")
        checked[key] = _coerced(key, value, declared[key], where)
    operation = OPERATIONS[command]
    required = sorted(key for key, option in declared.items() if option.required
                      and key not in operation.positional and key != "output")
    missing = [key for key in required if options.get(key) is None]
    if missing:
        raise BadInput(f"{where}: {command} needs {', '.join(missing)}")
    for key in ("output", "input", "repo"):
        if key in options and not (isinstance(options[key], str) and options[key]):
            raise BadInput(f"{where}: {key} must be a path or name (a string), found {options[key]!r}")
    for key in ("models", "adapters"):
        models = options.get(key)
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) and m for m in models)):
            raise BadInput(f"{where}: {key} must be a list of model paths or repo ids, found {models!r}")
    return checked


def load_pipeline(path: str | Path) -> list[Step]:
    """The steps of a pipeline file (BadInput naming the file and step when malformed).

    Args:
        path: the YAML pipeline file (a mapping with a non-empty ``steps`` list).

    Returns:
        One :class:`Step` per entry, in order, its options checked against its operation's.

    Example:
        ``[step.command for step in load_pipeline("pipeline.yaml")]``   # ["merge", "extend", "quantize", "push"]
    """
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
        if command not in OPERATIONS:
            raise BadInput(f"{where}: unknown command {command!r} (known: {', '.join(OPERATIONS)})")
        if not isinstance(options, dict):
            raise BadInput(f"{where}: the options of {command} must be a mapping")
        operation = OPERATIONS[command]
        needed = list(operation.positional) + (["output"] if operation.writes else [])
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
    from surgery.io.sources import resolve_source
    from surgery.provenance import content_hashes

    path = Path(source).expanduser() if _normal(source) in planned else resolve_source(source, must_exist=False)
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
        arguments = " ".join(str(self.step.options[name]) for name in self.step.operation.positional)
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
    """Run (or with ``dry_run`` only assess) the steps in order, yielding a report per step as it finishes.

    A step runs when its output or stamp is stale, and then so does every step after it.

    Args:
        steps: from :func:`load_pipeline`.
        dry_run: say which steps would run, running none.

    Yields:
        A :class:`StepReport` per step: "up to date", "ran" or "would run", with the reason.

    Example::

        for report in run_pipeline(load_pipeline("pipeline.yaml"), dry_run=True):
            print(report.describe())
    """
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
    """The step's operation, in this process: its config built from the step's keys (``force`` when it replaces
    its own earlier output), then run; errors are named after the step."""
    options = _check_options(step.command, step.options, f"step {step.number}")
    options.pop("force", None)
    operation = step.operation
    if operation.replaceable and Path(step.output).expanduser().exists():
        options["force"] = True
    try:
        operation.run(operation.build(options))
    except BadInput as err:
        raise BadInput(f"step {step.number} ({step.command}): {err}") from None
    except Failed as err:  # CheckFailed, a push to retry...: the same kind, named after the step
        raise type(err)(f"step {step.number} ({step.command}): {err}") from None
