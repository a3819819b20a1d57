"""`surgery sweep`: grids, the Pareto front and the recommendation, and whole sweeps on the miniature's models."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import run_surgery
from safetensors.torch import load_file

from surgery.sweep import grid_points, parse_grid, pareto_front, recommend


def test_grid_syntax():
    assert parse_grid("lambda=0.5:1.0:0.1,density=0.1,0.2,0.3") == {
        "lambda": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "density": [0.1, 0.2, 0.3]}
    assert parse_grid("method=ties,dare_ties, rank = 8,16, seed=1") == {
        "method": ["ties", "dare_ties"], "rank": [8, 16], "seed": [1]}
    assert grid_points({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3},
                                                       {"a": 2, "b": 4}]
    for bad in ("lambda", "=0.1", "lambda=1:0:0.1", "lambda=0:1:0", "density=x", "lambda=1,lambda=2", "",
                "lambda=0.1,,0.2", "Lambda=1"):
        with pytest.raises(Exception) as info:
            parse_grid(bad)
        assert type(info.value).__name__ == "BadInput", bad


def _dominates(a, b):
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def test_front_and_recommendation_against_brute_force():
    rng = random.Random(3)
    for _ in range(200):
        rows = [{"accuracy": rng.choice([0.2, 0.5, 0.8, 0.9, 1.0]), "mean_length": rng.choice([5, 10, 30, 60])}
                for _ in range(rng.randint(1, 8))]
        points = [(row["accuracy"], row["mean_length"]) for row in rows]
        expected = [i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)]
        assert pareto_front(rows) == expected
        reference = rng.choice([0.5, 0.9, 1.0])
        within = sorted((p[1], -p[0], i) for i, p in enumerate(points) if p[0] >= 0.95 * reference)
        fallback = sorted((-p[0], p[1], i) for i, p in enumerate(points))
        assert recommend(rows, reference, 0.05) == (within[0][2] if within else fallback[0][2])


def _figures(row):
    return {key: row[key] for key in ("accuracy", "mean_length", "reflection_rate", "by_difficulty")}


def test_sweep_end_to_end(long_to_short, tmp_path):
    """lambda 0 of task arithmetic on System 1 is System 1 itself: the same answers; every point's recipe rebuilds
    its merge; the same sweep twice gives the same bytes."""
    models = long_to_short / "models"
    args = ["sweep", models / "system1", models / "system2", "--method", "task_arithmetic", "--grid",
            "lambda=0:1:0.5", "--eval", long_to_short / "tasks.jsonl", "--limit", "8", "--max-new-tokens", "24",
            "--keep-models", "--json"]
    result = run_surgery(*args, "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    inputs = {row["name"]: row for row in report["inputs"]}
    points = report["points"]
    assert [row["setting"] for row in points] == [{"lambda": 0.0}, {"lambda": 0.5}, {"lambda": 1.0}]
    assert _figures(points[0]) == _figures(inputs[str(models / "system1")])
    saved = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert saved["points"] == points and saved["recommended"]["name"] == report["recommended"]["name"]
    assert [row["name"] for row in points if row["recommended"]] == [report["recommended"]["name"]]
    assert (tmp_path / "a" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = yaml.safe_load((tmp_path / "a" / "recipes" / "point-02.yaml").read_text())
    assert recipe["method"] == "task_arithmetic" and recipe["parameters"] == {"lambda": 0.5}
    rebuilt = run_surgery("merge", "--recipe", tmp_path / "a" / "recipes" / "point-02.yaml", "-o", tmp_path / "re")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "re" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "models" / "point-02" / "model.safetensors").read_bytes()
    s1, s2 = (load_file(models / name / "model.safetensors") for name in ("system1", "system2"))
    middle = load_file(tmp_path / "re" / "model.safetensors")
    for name, tensor in middle.items():
        torch.testing.assert_close(tensor, s1[name] + 0.5 * (s2[name] - s1[name]))
    again = run_surgery(*args, "-o", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    for name in ("sweep.json", "pareto.png", "recipes/point-03.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_aim_sweep_calibrates_once(long_to_short, tmp_path):
    models = long_to_short / "models"
    recipe = tmp_path / "aim.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "ties", "models": [{"model": str(models / "system1")}, {"model": str(models / "system2")}],
        "parameters": {"density": 0.5, "lambda": 1.0},
        "aim": {"calibration": str(long_to_short / "calibration.txt"), "max_tokens": 256}}))
    out = tmp_path / "sweep"
    result = run_surgery("sweep", "--recipe", recipe, "--grid", "omega=0.2,0.8", "--eval",
                         long_to_short / "tasks.jsonl",
                         "--limit", "4", "--max-new-tokens", "8", "--keep-models", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("calibrating") == 1
    assert (out / "aim-stats.safetensors").exists()
    point = yaml.safe_load((out / "recipes" / "point-01.yaml").read_text())
    assert point["aim"]["stats"] == str(out.absolute() / "aim-stats.safetensors") and point["aim"]["omega"] == 0.2
    rebuilt = run_surgery("merge", "--recipe", out / "recipes" / "point-01.yaml", "-o", tmp_path / "re")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "re" / "model.safetensors").read_bytes() == \
        (out / "models" / "point-01" / "model.safetensors").read_bytes()
    direct = run_surgery("merge", models / "system1", models / "system2", "--method", "ties", "--density", "0.5",
                         "--lambda", "1.0", "--aim", "--omega", "0.2", "--calibration",
                         long_to_short / "calibration.txt", "--max-tokens", "256", "-o", tmp_path / "direct")
    assert direct.returncode == 0, direct.stderr
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (out / "models" / "point-01" / "model.safetensors").read_bytes()


def test_search_sweep_end_to_end(long_to_short, tmp_path):
    """--search: generation 0 is a Latin hypercube of the box (each quarter of each coordinate once), a later
    generation follows; a KEY@2 dimension becomes a two-point gradient in the point's recipe; the Pareto flags are
    the brute-force front of all visited points; the same search twice gives the same bytes."""
    models = long_to_short / "models"
    args = ["sweep", models / "system1", models / "system2", "--method", "task_arithmetic", "--search",
            "lambda@2=0:1", "--population", "4", "--generations", "2", "--seed", "3", "--eval",
            long_to_short / "tasks.jsonl", "--limit", "4", "--max-new-tokens", "8", "--json"]
    result = run_surgery(*args, "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["search"] == {"space": "lambda@2=0:1", "population": 4, "generations": 2, "seed": 3}
    points = report["points"]
    first = [row["setting"]["lambda"] for row in points if row["generation"] == 0]
    assert len(first) == 4 and 1 <= len(points) - 4 <= 4 and {row["generation"] for row in points[4:]} == {1}
    for coordinate in zip(*first):
        assert sorted(min(int(value * 4), 3) for value in coordinate) == [0, 1, 2, 3]
    settings = [json.dumps(row["setting"], sort_keys=True) for row in points]
    assert len(set(settings)) == len(settings)  # nothing evaluated twice
    recipe = yaml.safe_load((tmp_path / "a" / "recipes" / "point-05.yaml").read_text())
    assert recipe["parameters"] == {"lambda": points[4]["setting"]["lambda"]}
    assert len(recipe["parameters"]["lambda"]) == 2
    figures = [(row["accuracy"], row["mean_length"]) for row in points]
    front = [i for i, p in enumerate(figures) if not any(_dominates(q, p) for q in figures)]
    assert [i for i, row in enumerate(points) if row["pareto"]] == front
    again = run_surgery(*args, "-o", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a" / "sweep.json").read_bytes() == (tmp_path / "b" / "sweep.json").read_bytes()


def test_bad_sweeps_are_one_line_errors(long_to_short, tmp_path):
    models = long_to_short / "models"
    tasks = long_to_short / "tasks.jsonl"
    pair = [models / "system1", models / "system2"]
    cases = {
        (*pair, "--method", "ties", "--grid", "omega=0.2", "--eval", tasks): "omega needs a recipe with an aim",
        (*pair, "--method", "ties", "--grid", "lambda", "--eval", tasks): "--grid",
        (*pair, "--method", "ties", "--grid", "method=nope", "--eval", tasks): "nope",
        (*pair, "--grid", "lambda=1", "--eval", tasks): "--method is required",
        (*pair, "--method", "ties", "--grid", "lambda=1", "--eval", tmp_path / "none.jsonl"): "--eval",
        (*pair, "--method", "ties", "--eval", tasks): "give --grid or --search",
        (*pair, "--method", "ties", "--grid", "lambda=1", "--search", "lambda=0:1", "--eval", tasks): "one of them",
        (*pair, "--method", "ties", "--search", "lambda=1:0", "--eval", tasks): "needs LOW < HIGH",
        (*pair, "--method", "ties", "--search", "method=0:1", "--eval", tasks): "not a numeric parameter",
        (*pair, "--method", "ties", "--search", "density=0:1", "--eval", tasks): "density",
        (*pair, "--method", "ties", "--search", "omega=0:1", "--eval", tasks): "omega needs a recipe with an aim",
        (*pair, "--method", "ties", "--search", "lambda=0:1", "--population", "1", "--eval", tasks): "--population",
        (*pair, "--method", "ties", "--grid", "lambda=1", "--samples", "3", "--eval", tasks): "needs a temperature",
    }
    for args, message in cases.items():
        result = run_surgery("sweep", *args, "-o", tmp_path / "out")
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists()
