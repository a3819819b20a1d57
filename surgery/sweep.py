"""Sweeps: merge at every point of a settings grid, evaluate each merge (and the input models) for accuracy and
response length, and find the accuracy / length Pareto front::

    from surgery.eval_length import load_tasks
    from surgery.merge import load_recipe
    from surgery.sweep import parse_grid, sweep
    report = sweep(load_recipe("ties.yaml"), parse_grid("lambda=0.5:1.0:0.1,density=0.1,0.2,0.3"),
                   load_tasks("tasks.jsonl"), "sweep-out", max_new_tokens=512)
    report["recommended"]     # {"name": "point-07", "setting": {"lambda": 0.8, "density": 0.2}, ...}

``sweep-out/`` (written atomically) holds ``sweep.json`` (every row: setting, accuracy, mean length, reflection
rate, per difficulty, on the front or not), ``pareto.png``, and ``recipes/point-NN.yaml``, the recipe of each point,
so that ``surgery merge --recipe sweep-out/recipes/point-07.yaml -o best`` rebuilds the recommended merge.

Grid keys are merge parameters (``lambda``, ``density``, ``weight``, ``t``, ``eta``, ``rank``, ...), and also
``method``, ``seed`` and ``omega`` (AIM; the recipe needs an ``aim`` section). The recommended setting is the
shortest one whose accuracy is at least ``1 − tolerance`` times the best input model's; when none is, the most
accurate one.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from surgery.errors import BadInput
from surgery.io.writer import atomic_directory, check_output_available
from surgery.merge import Recipe, get_method, merge

log = logging.getLogger(__name__)
SPECIAL_KEYS = {"method", "seed", "omega"}
TOLERANCE = 0.05


def _value(text: str, key: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        if key != "method":
            raise BadInput(f"--grid: {key}={text!r} is not a number") from None
        return text
    return int(number) if key in {"seed", "rank"} and number == int(number) else number


def _range(text: str, key: str) -> list[float]:
    start, stop, step = (_value(part, key) for part in text.split(":"))
    if step <= 0 or stop < start:
        raise BadInput(f"--grid: {key}={text}: expected START:STOP:STEP with STOP ≥ START and STEP > 0")
    count = int(round((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_grid(text: str) -> dict[str, list]:
    """``"lambda=0.5:1.0:0.1,density=0.1,0.2"`` → {"lambda": [0.5, 0.6, ..., 1.0], "density": [0.1, 0.2]}: a comma
    starts a new value, or a new key when the item holds ``=``; START:STOP:STEP includes STOP."""
    grid: dict[str, list] = {}
    key = None
    for item in (part.strip() for part in text.split(",")):
        if "=" in item:
            key, item = (side.strip() for side in item.split("=", 1))
            if not re.fullmatch(r"[a-z_]+", key) or key in grid:
                raise BadInput(f"--grid: {key!r} is not a parameter name or is given twice")
            grid[key] = []
        if key is None or not item:
            raise BadInput(f"--grid {text!r}: expected KEY=VALUE[,VALUE...][,KEY=...]")
        grid[key] += _range(item, key) if item.count(":") == 2 else [_value(item, key)]
    if not grid:
        raise BadInput("--grid: no settings given")
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the last key varying fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def with_setting(recipe: Recipe, setting: dict) -> Recipe:
    """A copy of ``recipe`` with one grid point's values in place (global parameters, method, seed, AIM omega)."""
    changed = copy.deepcopy(recipe)
    for key, value in setting.items():
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
            changed.parameters[key] = value
    return changed


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats: at least as accurate and as short, and better in one of the two."""
    def beaten(row: dict) -> bool:
        return any(other["accuracy"] >= row["accuracy"] and other["mean_length"] <= row["mean_length"]
                   and (other["accuracy"] > row["accuracy"] or other["mean_length"] < row["mean_length"])
                   for other in rows)
    return [index for index, row in enumerate(rows) if not beaten(row)]


def recommend(rows: list[dict], reference_accuracy: float, tolerance: float = TOLERANCE) -> int:
    """Index of the shortest row within ``tolerance`` (relative) of ``reference_accuracy``; if none, the most
    accurate row (the shorter on a tie)."""
    good = [i for i, row in enumerate(rows) if row["accuracy"] >= (1 - tolerance) * reference_accuracy - 1e-12]
    if good:
        return min(good, key=lambda i: (rows[i]["mean_length"], -rows[i]["accuracy"], i))
    return min(range(len(rows)), key=lambda i: (-rows[i]["accuracy"], rows[i]["mean_length"], i))


def _measures(report: dict) -> dict:
    keys = ("accuracy", "mean_length", "reflection_rate", "truncated_rate", "count", "by_difficulty")
    return {key: report[key] for key in keys}


def _calibrate_once(recipe: Recipe, staging: Path, device: str, progress) -> Path | None:
    """With AIM and no statistics file, the base's statistics computed once for all points (in the output)."""
    from surgery.merge.aim import calibrate

    if recipe.aim is None or recipe.aim.get("stats"):
        return None
    base = recipe.base or recipe.models[0].model
    progress(f"calibrating {base} for AIM")
    path = staging / "aim-stats.safetensors"
    calibrate(base, path, calibration=recipe.aim.get("calibration"), max_tokens=recipe.aim["max_tokens"],
              seed=recipe.seed, device=device)
    return path


def sweep(recipe: Recipe, grid: dict[str, list], tasks: list[dict], output: str | Path, *,
          max_new_tokens: int = 512, batch_size: int = 16, chat_template: bool | None = None, device: str = "cpu",
          tolerance: float = TOLERANCE, keep_models: bool = False, force: bool = False,
          progress: Callable[[str], None] = log.info) -> dict:
    """Merge and evaluate every grid point; evaluate the recipe's input models as references; write ``output``
    (atomically): sweep.json, pareto.png, recipes/. With ``keep_models`` the merges stay in ``output/models/``."""
    from surgery.eval_length import evaluate_length
    from surgery.evaluation import load_model
    from surgery.plots import accuracy_length_plot

    points = grid_points(grid)
    recipes = [with_setting(recipe, setting) for setting in points]
    check_output_available(output, force)
    began = time.perf_counter()

    def evaluated(model_dir: str) -> dict:
        model, tokenizer = load_model(model_dir, device)
        return _measures(evaluate_length(model, tokenizer, tasks, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, chat_template=chat_template))

    references = []
    for source in recipe.sources:
        progress(f"evaluating input {source}")
        references.append({"name": source, "kind": "input", **evaluated(source)})
    with atomic_directory(output, force) as staging, tempfile.TemporaryDirectory(dir=staging) as scratch:
        (staging / "recipes").mkdir()
        stats = _calibrate_once(recipe, staging, device, progress)
        rows = []
        for number, (setting, point_recipe) in enumerate(zip(points, recipes), 1):
            name = f"point-{number:02d}"
            if stats:  # merged with the staged file; the saved recipe names where it will be
                point_recipe.aim.update(stats=str(Path(output).absolute() / stats.name), calibration=None)
            (staging / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(point_recipe.to_dict(), sort_keys=True))
            if stats:
                point_recipe.aim["stats"] = str(stats)
            model_dir = (staging / "models" if keep_models else Path(scratch)) / name
            progress(f"{name} ({number}/{len(points)}): {setting}")
            merge(point_recipe, model_dir, device=device)
            rows.append({"name": name, "kind": "merge", "setting": setting, **evaluated(str(model_dir))})
        front = pareto_front(rows)
        best_reference = max(reference["accuracy"] for reference in references)
        chosen = recommend(rows, best_reference, tolerance)
        for index, row in enumerate(rows):
            row.update(pareto=index in front, recommended=index == chosen)
        report = {"grid": grid, "tolerance": tolerance, "reference_accuracy": best_reference,
                  "recommended": rows[chosen], "inputs": references, "points": rows,
                  "max_new_tokens": max_new_tokens, "tasks": len(tasks)}
        (staging / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        accuracy_length_plot(references + rows, staging / "pareto.png",
                             title=f"{recipe.method} sweep: accuracy against mean response length")
    return {**report, "seconds": round(time.perf_counter() - began, 1)}
