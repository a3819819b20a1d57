"""``surgery merge-multi``: mergekit-multi's interdependent merges — one YAML file of mergekit configs (documents
separated by ``---``), each with a ``name`` by which later ones use its output as a model; the one without a name
is the final merge, written to ``--output``. Named merges go to ``INTERMEDIATE_DIR/NAME``.

Merges run in dependency order (a cycle or an unknown order is bad input before anything runs), each as
``surgery merge --recipe`` would run it. With ``lazy`` (the default, as mergekit's ``--lazy``) a merge whose output
already holds the same recipe is skipped — unless a merge it reads was just rebuilt, which mergekit would miss::

    from surgery.merge.multi import MultiMergeConfig, multi_merge
    result = multi_merge(MultiMergeConfig("multi.yaml", intermediate_dir="work", output="final"))
    [(step.name, step.ran) for step in result.steps]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import BadInput
from surgery.merge.job import MergeJob
from surgery.merge.recipe import MERGEKIT_KEYS, from_mergekit
from surgery.output import MANIFEST


@dataclass(frozen=True)
class MultiMergeConfig:
    """What ``surgery merge-multi CONFIG -I INTERMEDIATE_DIR [-o OUTPUT]`` does.

    Example: ``MultiMergeConfig("multi.yaml", intermediate_dir="work", output="final", lazy=False)``
    """

    config: str | Path
    intermediate_dir: str | Path
    output: str | Path | None = None
    lazy: bool = True
    device: str = "cpu"


@dataclass(frozen=True)
class MergeStep:
    """One merge of the file: its name (None for the final one), the checked job, the merge names it reads."""

    name: str | None
    job: MergeJob
    needs: tuple[str, ...]

    @property
    def output(self) -> Path:
        return Path(self.job.output)


@dataclass
class StepResult:
    """A step run (``ran``) or skipped as up to date."""

    name: str | None
    output: str
    ran: bool


@dataclass
class MultiMergeResult:
    """The steps, in the order they were taken."""

    steps: list[StepResult] = field(default_factory=list)

    def summary(self) -> dict:
        """What ``--json`` prints.

        Returns:
            ``{"steps": [{"name", "output", "ran"}, ...]}``.

        Example: ``multi_merge(config).summary()["steps"][-1]["output"]``
        """
        return {"steps": [{"name": s.name, "output": s.output, "ran": s.ran} for s in self.steps]}


def _reference(value, names: dict[str, Path], used: set[str]):
    """A model reference (``NAME``, ``{model: NAME, ...}``, ``{model: {path: NAME, lora: ...}}``) with a merge's
    name replaced by its output."""
    if isinstance(value, str) and value in names:
        used.add(value)
        return str(names[value])
    if isinstance(value, dict):
        return {key: _reference(item, names, used) if key in ("model", "path") else item
                for key, item in value.items()}
    return value


def _with_paths(document: dict, names: dict[str, Path], used: set[str]) -> dict:
    """``document`` with every model reference that names a merge of the file replaced by that merge's output,
    where mergekit reads models: models, base_model, slices' sources and base_model, the tokenizer source."""
    patched = dict(document)
    for key in ("base_model", "tokenizer_source"):
        if key in patched:
            patched[key] = _reference(patched[key], names, used)
    if isinstance(patched.get("tokenizer"), dict) and "source" in patched["tokenizer"]:
        patched["tokenizer"] = {**patched["tokenizer"], "source": _reference(patched["tokenizer"]["source"], names,
                                                                             used)}
    if isinstance(patched.get("models"), list):
        patched["models"] = [_reference(entry, names, used) for entry in patched["models"]]
    if isinstance(patched.get("slices"), list):
        patched["slices"] = [
            {**part, **({"sources": [_reference(s, names, used) for s in part["sources"]]}
                        if isinstance(part.get("sources"), list) else {}),
             **({"base_model": _reference(part["base_model"], names, used)} if "base_model" in part else {})}
            if isinstance(part, dict) else part for part in patched["slices"]]
    return patched


def plan_steps(config: MultiMergeConfig) -> list[MergeStep]:
    """The file's merges, checked, in the order they run.

    Args:
        config: the file and where outputs go.

    Returns:
        The :class:`MergeStep` list, each after the merges it reads; BadInput (naming the file and document) for a
        document that is no mergekit config, a missing, repeated or unsafe name, two unnamed merges, an unnamed
        one without ``output``, or a cycle.

    Example: ``[step.name for step in plan_steps(MultiMergeConfig("multi.yaml", "work", "final"))]``
    """
    from surgery.yamlfile import read_yaml_documents

    path = Path(config.config).expanduser()
    documents = [d for d in read_yaml_documents(path, "multi-merge config") if d is not None]
    if not documents:
        raise BadInput(f"{path}: no merge configs (YAML documents separated by ---)")
    names: dict[str, Path] = {}
    final = None
    for number, document in enumerate(documents, 1):
        where = f"{path}: document {number}"
        if not isinstance(document, dict) or "merge_method" not in document:
            raise BadInput(f"{where}: not a mergekit merge config (a mapping with merge_method)")
        unknown = set(document) - MERGEKIT_KEYS - {"name"}
        if unknown:
            raise BadInput(f"{where}: unknown mergekit key(s) {', '.join(sorted(map(str, unknown)))}")
        name = document.get("name")
        if name is None:
            if final is not None:
                raise BadInput(f"{where}: a second merge without a name (only the final merge has none)")
            final = number
            continue
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise BadInput(f"{where}: name {name!r}: must be a non-empty directory name")
        if name in names:
            raise BadInput(f"{where}: name {name!r} is used twice")
        names[name] = Path(config.intermediate_dir).expanduser() / name
    if final is not None and config.output is None:
        raise BadInput(f"{path}: document {final} has no name, so --output is where it goes; give -o OUTPUT")
    steps = []
    for number, document in enumerate(documents, 1):
        used: set[str] = set()
        body = {key: value for key, value in document.items() if key != "name"}
        patched = _with_paths(body, names, used)
        name = document.get("name")
        if name in used:
            raise BadInput(f"{path}: document {number}: merge {name!r} reads its own output")
        recipe = from_mergekit(patched, f"{path}: document {number}")
        _check_sources(recipe, set(map(str, names.values())), f"{path}: document {number}")
        output = names[name] if name is not None else Path(config.output).expanduser()
        try:  # the job checks the parameters: every document's, before any merge runs
            job = MergeJob(recipe, output, device=config.device, force=output.exists())
        except BadInput as err:
            raise BadInput(f"{path}: document {number}: {err}") from None
        steps.append(MergeStep(name, job, tuple(sorted(used))))
    return _in_order(steps, path)


def _check_sources(recipe, outputs: set[str], where: str) -> None:
    """BadInput naming the document for a model that is no merge of the file, no local path and no Hub repo id
    (a misspelt merge name would otherwise fail mid-run, naming only itself)."""
    from surgery.io.lora_input import split_model_and_adapter
    from surgery.io.sources import REPO_ID

    entries = recipe.models + [source for part in recipe.slices or [] for source in part.sources]
    sources = [entry.model for entry in entries] + [recipe.base] + [part.base for part in recipe.slices or []]
    for source in filter(None, sources):
        for part in split_model_and_adapter(source) or (source,):
            if part not in outputs and not Path(part).expanduser().exists() and not REPO_ID.match(part):
                raise BadInput(f"{where}: model {part!r} is no merge named in this file, no local path and no Hub "
                               "repo id")


def _in_order(steps: list[MergeStep], path: Path) -> list[MergeStep]:
    done: set[str] = set()
    ordered: list[MergeStep] = []
    waiting = list(steps)
    while waiting:
        ready = [step for step in waiting if set(step.needs) <= done]
        if not ready:
            cycle = ", ".join(sorted(str(step.name) for step in waiting))
            raise BadInput(f"{path}: merges {cycle} read each other's outputs (a cycle)")
        for step in ready:
            ordered.append(step)
            waiting.remove(step)
            if step.name is not None:
                done.add(step.name)
    return ordered


def _up_to_date(step: MergeStep) -> bool:
    manifest = step.output / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("recipe") == step.job.recipe.to_dict()
    except (OSError, ValueError):
        return False


def multi_merge(config: MultiMergeConfig, progress=None) -> MultiMergeResult:
    """Run the file's merges in dependency order (see the module's docstring).

    Args:
        config: the file, the intermediate directory, the final output, laziness, the device.
        progress: receives the bytes of each tensor written (as :func:`surgery.merge.merge`'s).

    Returns:
        The :class:`MultiMergeResult`.

    Example: ``multi_merge(MultiMergeConfig("multi.yaml", "work", "final")).steps``
    """
    from surgery.merge.engine import merge

    steps = plan_steps(config)
    result = MultiMergeResult()
    rebuilt: set[str] = set()
    for step in steps:
        if config.lazy and _up_to_date(step) and not rebuilt & set(step.needs):
            result.steps.append(StepResult(step.name, str(step.output), False))
            continue
        merge(step.job, progress=progress)  # force only replaces a checkpoint or an earlier output
        if step.name is not None:
            rebuilt.add(step.name)
        result.steps.append(StepResult(step.name, str(step.output), True))
    return result
