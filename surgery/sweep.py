"""Sweeps: merge at every point of a settings grid — or where a multi-objective search leads (``search``,
NSGA-II over a box of settings, :mod:`surgery.search`) — evaluate each merge (and the input models) for accuracy and
response length, and find the accuracy / length Pareto front::

    from surgery.sweep import SweepConfig, sweep
    report = sweep(SweepConfig(recipe="ties.yaml", grid="lambda=0.5:1.0:0.1,density=0.1,0.2,0.3",
                               tasks="tasks.jsonl", output="sweep-out", max_new_tokens=512)).summary()
    report["recommended"]     # {"name": "point-07", "setting": {"lambda": 0.8, "density": 0.2}, ...}
    searched = sweep(SweepConfig(recipe="ties.yaml", grid=None, search="lambda@3=0.4:1.6,density=0.1:0.9",
                                 population=8, generations=4, tasks="tasks.jsonl", output="search-out"))

``sweep-out/`` (written atomically) holds ``sweep.json`` (every row: setting, accuracy, mean length, reflection
rate, per difficulty, on the front or not), ``pareto.png``, and ``recipes/point-NN.yaml``, the recipe of each point,
so that ``surgery merge --recipe sweep-out/recipes/point-07.yaml -o best`` rebuilds the recommended merge.

Grid keys are the declared merge parameters (``lambda``, ``density``, ``weight``, ``t``, ``eta``, ``rank``, ... and
any a registered method declares; values parsed by their declared type), and also ``method``, ``seed`` and
``omega`` (AIM; the recipe needs an ``aim`` section). Search keys are the numeric ones (``key@K`` searches K values
spread over the layers, a gradient). Each row of a search says its ``generation``. The recommended setting is the
shortest one whose accuracy is at least ``1 − tolerance`` times the best input model's; when none is, the most
accurate one.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from surgery.errors import BadInput
from surgery.executors import check_executor, run_jobs
from surgery.io.writer import atomic_directory, check_output_available
from surgery.merge import MergeJob, Recipe, get_method, merge
from surgery.merge.job import check_parameters
from surgery.merge.params import Parameter
from surgery.merge.registry import PARAMETERS, aliases
from surgery.search import Space, latin_hypercube, next_generation, parse_space

log = logging.getLogger(__name__)
TOLERANCE = 0.05
# grid keys besides the merge parameters: how each one's values are read
RECIPE_KEYS = {"method": str, "seed": Parameter("seed", int, 0, "the recipe's seed").parse,
               "omega": Parameter("omega", float, 0.4, "AIM's omega").parse}


def grid_keys() -> list[str]:
    """Every key a ``--grid`` may set: ``method``, ``seed``, ``omega`` and each declared merge parameter's names.

    Returns:
        The keys, sorted.

    Example: ``"density" in grid_keys()``
    """
    return sorted(set(RECIPE_KEYS) | set(aliases()))


def search_kinds() -> dict[str, type]:
    """The keys ``--search`` may set (every numeric merge parameter name, and ``omega``) and their types.

    Returns:
        Key → int or float.

    Example: ``search_kinds()["density"] is float``
    """
    kinds = {name: PARAMETERS[canonical].kind for name, canonical in aliases().items()}
    return {name: kind for name, kind in kinds.items() if kind in (int, float)} | {"omega": float}


def _value(text: str, key: str) -> Any:
    if key == "method":
        return text
    if key in RECIPE_KEYS:
        return RECIPE_KEYS[key](text, "--grid")
    return PARAMETERS[aliases()[key]].parse(text, "--grid")


def _range(text: str, key: str) -> list[float]:
    start, stop, step = (_value(part, key) for part in text.split(":"))
    if step <= 0 or stop < start:
        raise BadInput(f"--grid: {key}={text}: expected START:STOP:STEP with STOP ≥ START and STEP > 0")
    count = int(round((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_grid(text: str) -> dict[str, list]:
    """The settings a ``--grid`` text gives: a comma starts a new value, or a new key when the item holds ``=``;
    START:STOP:STEP includes STOP. Keys are :func:`grid_keys`; values are read by the parameter's declared type.

    Args:
        text: e.g. ``"lambda=0.5:1.0:0.1,density=0.1,0.2"``.

    Returns:
        Key → values, e.g. ``{"lambda": [0.5, 0.6, ..., 1.0], "density": [0.1, 0.2]}``; BadInput when malformed.

    Example: ``parse_grid("rank=8,16") == {"rank": [8, 16]}``
    """
    grid: dict[str, list] = {}
    key = None
    for item in (part.strip() for part in text.split(",")):
        if "=" in item:
            key, item = (side.strip() for side in item.split("=", 1))
            if key not in grid_keys() or key in grid:
                raise BadInput(f"--grid: {key!r} is not a parameter name or is given twice "
                               f"(keys: {', '.join(grid_keys())})")
            grid[key] = []
        if key is None or not item:
            raise BadInput(f"--grid {text!r}: expected KEY=VALUE[,VALUE...][,KEY=...]")
        grid[key] += _range(item, key) if item.count(":") == 2 else [_value(item, key)]
    if not grid:
        raise BadInput("--grid: no settings given")
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the last key varying fastest.

    Args:
        grid: values by key (:func:`parse_grid`).

    Returns:
        One setting (key → value) per combination.

    Example: ``grid_points({"lambda": [0.5, 1.0], "seed": [0, 1]})[1]``   # {"lambda": 0.5, "seed": 1}
    """
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def with_setting(recipe: Recipe, setting: dict) -> Recipe:
    """A copy of ``recipe`` with one grid point's values in place (global parameters, method, seed, AIM omega).

    Args:
        recipe: the sweep's recipe.
        setting: one grid point (:func:`grid_points`).

    Returns:
        The changed copy; BadInput for an unknown method, an omega without AIM or a parameter the method does not
        take.

    Example: ``with_setting(recipe, {"lambda": 0.5, "seed": 2}).parameters["lambda"] == 0.5``
    """
    changed = copy.deepcopy(recipe)
    for key, value in sorted(setting.items(), key=lambda item: item[0] != "method"):  # the method first
        if key == "method":
            get_method(value)  # an unknown method is an error before anything runs
            changed.method = value
        elif key == "seed":
            changed.seed = int(value)
        elif key == "omega":
            if changed.aim is None:
                raise BadInput("--grid: omega needs a recipe with an aim section")
            changed.aim["omega"] = value
        else:
            changed.parameters[aliases(get_method(changed.method)).get(key, aliases()[key])] = value
    check_parameters(changed)  # a parameter the method does not take is an error before anything runs
    return changed


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats: at least as accurate and as short, and better in one of the two.

    Args:
        rows: sweep rows, each with ``accuracy`` and ``mean_length``.

    Returns:
        The indices of the rows on the front, in order.

    Example: ``pareto_front([{"accuracy": 0.8, "mean_length": 100}, {"accuracy": 0.7, "mean_length": 120}])``   # [0]
    """
    def beaten(row: dict) -> bool:
        return any(other["accuracy"] >= row["accuracy"] and other["mean_length"] <= row["mean_length"]
                   and (other["accuracy"] > row["accuracy"] or other["mean_length"] < row["mean_length"])
                   for other in rows)
    return [index for index, row in enumerate(rows) if not beaten(row)]


def recommend(rows: list[dict], reference_accuracy: float, tolerance: float = TOLERANCE) -> int:
    """Index of the shortest row within ``tolerance`` (relative) of ``reference_accuracy``; if none, the most
    accurate row (the shorter on a tie).

    Args:
        rows: sweep rows, each with ``accuracy`` and ``mean_length`` (at least one).
        reference_accuracy: the accuracy to stay close to (the best input model's).
        tolerance: the relative accuracy loss allowed (default 0.05).

    Returns:
        The index of the recommended row.

    Example: ``recommend([{"accuracy": 0.8, "mean_length": 100}, {"accuracy": 0.77, "mean_length": 60}], 0.8)``   # 1
    """
    good = [i for i, row in enumerate(rows) if row["accuracy"] >= (1 - tolerance) * reference_accuracy - 1e-12]
    if good:
        return min(good, key=lambda i: (rows[i]["mean_length"], -rows[i]["accuracy"], i))
    return min(range(len(rows)), key=lambda i: (-rows[i]["accuracy"], rows[i]["mean_length"], i))


def _measures(report: dict) -> dict:
    keys = ("accuracy", "mean_length", "reflection_rate", "truncated_rate", "count", "by_difficulty")
    return {key: report[key] for key in keys}


def _calibrate_once(recipe: Recipe, staging: Path, device: str, progress) -> Path | None:
    """With AIM and no statistics file, the base's statistics computed once for all points (in the output)."""
    from surgery.merge.aim import CalibrateConfig, calibrate

    if recipe.aim is None or recipe.aim.get("stats"):
        return None
    base = recipe.base or recipe.models[0].model
    progress(f"calibrating {base} for AIM")
    path = staging / "aim-stats.safetensors"
    calibrate(CalibrateConfig(source=base, output=path, calibration=recipe.aim.get("calibration"),
                              max_tokens=recipe.aim["max_tokens"], seed=recipe.seed, device=device))
    return path


@dataclass(frozen=True)
class Evaluation:
    """How every model of a sweep is evaluated (picklable: Ray tasks receive it)."""

    tasks: list[dict]
    max_new_tokens: int
    batch_size: int
    chat_template: bool | None
    device: str
    temperature: float = 0.0
    samples: int = 1
    seed: int = 0

    def __call__(self, model_dir: str) -> dict:
        from surgery.evaluation.length import evaluate_length
        from surgery.evaluation import load_model

        model, tokenizer = load_model(model_dir, self.device)
        return _measures(evaluate_length(model, tokenizer, self.tasks, max_new_tokens=self.max_new_tokens,
                                         batch_size=self.batch_size, chat_template=self.chat_template,
                                         temperature=self.temperature, samples=self.samples, seed=self.seed))


def merge_and_evaluate(recipe: Recipe, model_dir: str, evaluation: Evaluation) -> dict:
    """One grid point: merge into ``model_dir`` (replacing what a lost earlier attempt left), then evaluate it.

    Args:
        recipe: the point's recipe (:func:`with_setting`).
        model_dir: where the merged model is written.
        evaluation: how it is evaluated.

    Returns:
        Its measures: accuracy, mean_length, reflection_rate, truncated_rate, count, by_difficulty.

    Example: ``merge_and_evaluate(with_setting(recipe, {"lambda": 0.5}), "scratch/point-01", evaluation)["accuracy"]``
    """
    merge(MergeJob(recipe, model_dir, device=evaluation.device, force=True))
    return evaluation(model_dir)


@dataclass(frozen=True)
class SweepConfig:
    """What ``surgery sweep`` runs, checked when made (BadInput with the command's messages).

    Args:
        models: the models to merge, as for ``surgery merge`` (or ``recipe``).
        output: the directory for sweep.json, pareto.png and the recipes (written atomically).
        grid: the settings to try, e.g. ``"lambda=0.5:1.0:0.1,density=0.1,0.2"`` (:func:`parse_grid`); None with
            ``search``.
        tasks: the task file of ``surgery eval length`` (``--eval``: JSONL with prompt and answer).
        search: instead of a grid, the box NSGA-II searches, e.g. ``"lambda@3=0.4:1.6,density=0.1:0.9"``
            (:func:`surgery.search.parse_space`): ``population`` points per generation, ``generations`` of them,
            the first a Latin hypercube drawn from ``seed``.
        temperature, samples, seed: sample ``samples`` answers per task at ``temperature`` (0: greedy); ``seed``
            also seeds the search.
        recipe: a merge recipe file instead of ``models`` and ``method``.
        method: the merge method (without ``recipe``; overrides the recipe's).
        tolerance: the relative accuracy loss the recommendation allows, in [0, 1).
        max_new_tokens, batch_size, chat_template: how answers are generated.
        limit: only the first N tasks.
        keep_models: keep each point's merge in ``output/models/``.
        executor, ray_address: ``"local"`` or ``"ray"`` and the Ray cluster to use.
        device: cpu or cuda.
        force: replace an existing ``output``.

    Example: ``SweepConfig(["base", "ft"], "out", "density=0.2,0.5", "tasks.jsonl", method="ties")``
    """

    models: tuple[str, ...]
    output: str | Path
    grid: str | None
    tasks: str | Path
    recipe: str | Path | None = None
    search: str | None = None
    population: int = 8
    generations: int = 3
    temperature: float = 0.0
    samples: int = 1
    seed: int = 0
    method: str | None = None
    tolerance: float = TOLERANCE
    max_new_tokens: int = 512
    batch_size: int = 16
    chat_template: bool | None = None
    limit: int | None = None
    keep_models: bool = False
    executor: str = "local"
    ray_address: str | None = None
    device: str = "cpu"
    force: bool = False
    merge_recipe: Recipe = field(init=False, repr=False, compare=False)
    settings: dict | None = field(init=False, repr=False, compare=False)
    space: Space | None = field(init=False, repr=False, compare=False)
    task_list: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from surgery.evaluation.length import check_sampling, load_tasks
        from surgery.merge import build_recipe

        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "merge_recipe", build_recipe(self.models, method=self.method, recipe=self.recipe))
        if (not 0 <= self.tolerance < 1 or self.max_new_tokens < 1 or self.batch_size < 1
                or (self.limit is not None and self.limit < 1)):
            raise BadInput("--tolerance must be in [0, 1); --max-new-tokens, --batch-size and --limit at least 1")
        if (self.grid is None) == (self.search is None):
            raise BadInput("give --grid or --search (one of them)")
        if self.search is not None and not (2 <= self.population <= 256 and 1 <= self.generations <= 100):
            raise BadInput(f"--population {self.population} --generations {self.generations}: need 2-256 points "
                           "per generation and 1-100 generations")
        check_sampling(self.temperature, self.samples)
        object.__setattr__(self, "settings", None if self.grid is None else parse_grid(self.grid))
        object.__setattr__(self, "space", None if self.search is None else parse_space(self.search, search_kinds()))
        if self.space is not None:  # a key the method does not take, or a box past a range, fails before any work
            for corner in (0.0, 1.0):
                with_setting(self.merge_recipe, self.space.setting([corner] * self.space.size))
        object.__setattr__(self, "task_list", load_tasks(self.tasks, "--eval")[:self.limit])
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BadInput(f"--device {self.device}: no CUDA device is available")


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` wrote: ``output`` and the report sweep.json holds (plus ``seconds``)."""

    output: str
    report: dict

    def summary(self) -> dict:
        """What ``surgery sweep --json`` prints.

        Returns:
            ``{"output": ..., **report}``.

        Example: ``sweep(config).summary()["recommended"]["setting"]``
        """
        return {"output": self.output, **self.report}


def sweep(config: SweepConfig, *, progress: Callable[[str], None] = log.info) -> SweepResult:
    """Merge and evaluate every point of ``config.grid``, the input models as references, and recommend a point.

    Args:
        config: the checked :class:`SweepConfig`.
        progress: called with a line per step.

    Returns:
        The :class:`SweepResult`.

    Example: ``sweep(SweepConfig(["base", "ft"], "out", "density=0.2,0.5", "tasks.jsonl", method="ties"))``
    """
    evaluation = Evaluation(config.task_list, config.max_new_tokens, config.batch_size, config.chat_template,
                            config.device, config.temperature, config.samples, config.seed)
    if config.space is None:
        points: list[dict] | _Search = grid_points(config.settings)
        header = {"grid": config.settings}
    else:
        points = _Search(config.space, config.population, config.generations, config.seed)
        header = {"search": {"space": config.search, "population": config.population,
                             "generations": config.generations, "seed": config.seed}}
    report = _sweep(config.merge_recipe, points, evaluation, config.output, header, tolerance=config.tolerance,
                    keep_models=config.keep_models, force=config.force, executor=config.executor,
                    ray_address=config.ray_address, progress=progress)
    return SweepResult(str(config.output), report)


class _Points:
    """Merges and evaluates settings into sweep rows: each point's recipe saved in ``recipes/``, its merge in the
    scratch directory (or ``models/`` to keep), the input models evaluated with the first batch."""

    def __init__(self, recipe: Recipe, evaluation: Evaluation, staging: Path, scratch: Path, output: str | Path, *,
                 keep_models: bool, executor: str, ray_address: str | None, progress: Callable[[str], None]):
        self.recipe, self.evaluation, self.staging, self.scratch = recipe, evaluation, staging, scratch
        self.output, self.keep_models, self.progress = output, keep_models, progress
        self.executor, self.ray_address = executor, ray_address
        self.stats = _calibrate_once(recipe, staging, evaluation.device, progress)
        self.rows: list[dict] = []
        self.inputs: list[dict] | None = None

    def run(self, settings: list[dict], total: int | str, **labels) -> list[dict]:
        """Merge and evaluate ``settings`` (named on from the rows so far); return their rows (with ``labels``)."""
        jobs, names = [], []
        if self.inputs is None:
            jobs = [(self.evaluation, (source,)) for source in self.recipe.sources]
            names = [f"evaluating input {source}" for source in self.recipe.sources]
        for number, setting in enumerate(settings, len(self.rows) + 1):
            point_recipe = with_setting(self.recipe, setting)
            name = f"point-{number:02d}"
            if self.stats:  # merged with the staged file; the saved recipe names where it will be
                point_recipe.aim.update(stats=str(Path(self.output).absolute() / self.stats.name), calibration=None)
            (self.staging / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(point_recipe.to_dict(),
                                                                                  sort_keys=True))
            if self.stats:
                point_recipe.aim["stats"] = str(self.stats)
            model_dir = (self.staging / "models" if self.keep_models else self.scratch) / name
            jobs.append((merge_and_evaluate, (point_recipe, str(model_dir), self.evaluation)))
            names.append(f"{name} ({number}/{total}): {setting}")
        results = run_jobs(self.executor, jobs, names, self.progress, ray_address=self.ray_address,
                           device=self.evaluation.device)
        if self.inputs is None:
            count = len(self.recipe.sources)
            self.inputs = [{"name": source, "kind": "input", **measures}
                           for source, measures in zip(self.recipe.sources, results[:count])]
            results = results[count:]
        rows = [{"name": f"point-{number:02d}", "kind": "merge", **labels, "setting": setting, **measures}
                for number, (setting, measures) in enumerate(zip(settings, results), len(self.rows) + 1)]
        self.rows += rows
        return rows


@dataclass(frozen=True)
class _Search:
    """NSGA-II over ``space``: ``population`` points a generation for ``generations`` generations, maximising
    accuracy and minimising mean length; a setting already evaluated is not evaluated again."""

    space: Space
    population: int
    generations: int
    seed: int

    def run(self, points: _Points) -> None:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        vectors, evaluated, seen = latin_hypercube(rng, self.population, self.space.size), [], set()
        total = f"≤{self.population * self.generations}"
        for generation in range(self.generations):
            fresh, settings = [], []
            for vector in vectors:
                setting = self.space.setting(vector)
                key = json.dumps(setting, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    fresh.append(vector)
                    settings.append(setting)
            rows = points.run(settings, total, generation=generation)
            evaluated += [(vector, (-row["accuracy"], row["mean_length"])) for vector, row in zip(fresh, rows)]
            if generation + 1 < self.generations:
                vectors = next_generation(rng, [v for v, _ in evaluated], [o for _, o in evaluated],
                                          self.population)


def _sweep(recipe: Recipe, points: list[dict] | _Search, evaluation: Evaluation, output: str | Path,
           header: dict, *, tolerance: float = TOLERANCE, keep_models: bool = False, force: bool = False,
           executor: str = "local", ray_address: str | None = None,
           progress: Callable[[str], None] = log.info) -> dict:
    """Merge and evaluate every grid point, or the points a search visits; evaluate the recipe's input models as
    references; write ``output`` (atomically): sweep.json, pareto.png, recipes/. With ``keep_models`` the merges
    stay in ``output/models/``. ``executor="ray"`` runs the evaluations and the merge + evaluation of each point as
    Ray tasks (``ray_address`` or a new local cluster; OUTPUT's parent and the inputs on paths every node sees): the
    same results.

    Args:
        recipe: the recipe every point starts from.
        points: the settings of a grid (:func:`grid_points`), or the search to run.
        evaluation: how every model is evaluated (``device`` also merges).
        output: the output directory (BadInput when it exists, unless ``force``).
        header: what sweep.json says first (the grid or the search).
        tolerance: the relative accuracy loss the recommendation allows.
        keep_models: keep each point's merged model in ``output/models/``.
        force: replace an existing ``output``.
        executor, ray_address: ``"local"`` or ``"ray"`` and the Ray cluster to use.
        progress: called with a line per step.

    Returns:
        The report sweep.json holds (the header, tolerance, reference_accuracy, recommended, inputs, points,
        max_new_tokens, temperature, samples, tasks), plus ``seconds``.
    """
    from surgery.evaluation.plots import accuracy_length_plot

    check_executor(executor, ray_address)
    for setting in [] if isinstance(points, _Search) else points:
        with_setting(recipe, setting)  # a bad point is an error before anything runs
    check_output_available(output, force)
    began = time.perf_counter()
    with atomic_directory(output, force) as staging, tempfile.TemporaryDirectory(dir=staging) as scratch:
        (staging / "recipes").mkdir()
        runner = _Points(recipe, evaluation, staging, Path(scratch), output, keep_models=keep_models,
                         executor=executor, ray_address=ray_address, progress=progress)
        if isinstance(points, _Search):
            points.run(runner)
        else:
            runner.run(points, len(points))
        rows, references = runner.rows, runner.inputs
        front = pareto_front(rows)
        best_reference = max(reference["accuracy"] for reference in references)
        chosen = recommend(rows, best_reference, tolerance)
        for index, row in enumerate(rows):
            row.update(pareto=index in front, recommended=index == chosen)
        report = {**header, "tolerance": tolerance, "reference_accuracy": best_reference,
                  "recommended": rows[chosen], "inputs": references, "points": rows,
                  "max_new_tokens": evaluation.max_new_tokens, "temperature": evaluation.temperature,
                  "samples": evaluation.samples, "tasks": len(evaluation.tasks)}
        (staging / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        kind = "search" if isinstance(points, _Search) else "sweep"
        accuracy_length_plot(references + rows, staging / "pareto.png",
                             title=f"{recipe.method} {kind}: accuracy against mean response length")
    return {**report, "seconds": round(time.perf_counter() - began, 1)}
