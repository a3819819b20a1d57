"""``surgery merge --executor ray`` on a real local Ray cluster (started here, loopback only): the same bytes as the
local executor, a worker killed mid-shard is survived, and one-line errors without Ray or a cluster."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from conftest import run_surgery
from merge_helpers import save_family

SHARD_SIZE = "100KB"  # the tiny llama is ~0.4 MB in float32: several shards


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return save_family(tmp_path_factory.mktemp("ray-family"), "llama", 2)


def merge_args(family: list[Path], output: Path) -> list:
    # dare_ties is random: the same per-tensor seeds must reach the workers
    return ["merge", *family, "--method", "dare_ties", "--density", "0.5", "--seed", "7", "-o", output,
            "--max-shard-size", SHARD_SIZE]


@pytest.fixture(scope="module")
def local_output(family, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("local") / "merged"
    result = run_surgery(*merge_args(family, output), "--executor", "local")
    assert result.returncode == 0, result.stderr
    assert len(list(output.glob("model-*.safetensors"))) >= 3
    return output


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def assert_same_files(ours: Path, reference: Path) -> None:
    mine, theirs = files(ours), files(reference)
    assert sorted(mine) == sorted(theirs)
    assert "model.safetensors.index.json" in mine
    for name in theirs:
        assert mine[name] == theirs[name], name


def test_ray_output_is_byte_identical(ray_cluster, family, local_output, tmp_path):
    output = tmp_path / "merged"
    result = run_surgery(*merge_args(family, output), "--executor", "ray")
    assert result.returncode == 0, result.stderr
    assert_same_files(output, local_output)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging directory left beside it


def test_killed_worker_is_survived(ray_cluster, family, local_output, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("SURGERY_TEST_KILL_ONCE", str(marker))
    output = tmp_path / "merged"
    result = run_surgery(*merge_args(family, output), "--executor", "ray")
    assert result.returncode == 0, result.stderr
    assert marker.exists()  # a worker did die mid-shard
    assert_same_files(output, local_output)  # no partial file of the lost attempt either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed-once", "merged"]


def test_ray_address_needs_ray_executor(family, tmp_path):
    result = run_surgery(*merge_args(family, tmp_path / "out"), "--ray-address", "127.0.0.1:6379")
    assert result.returncode == 2
    assert result.stderr.strip() == "surgery: error: --ray-address: applies only with --executor ray"
    assert not (tmp_path / "out").exists()


def test_missing_ray_is_one_line(family, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where Ray is not installed
    result = run_surgery(*merge_args(family, tmp_path / "out"), "--executor", "ray")
    assert result.returncode == 2
    assert result.stderr.strip() == "surgery: error: --executor ray needs Ray: pip install 'surgery[ray]'"
    assert list(tmp_path.iterdir()) == []


def test_unreachable_cluster_is_one_line(family, tmp_path):
    # a fresh process (this one is already connected to the test cluster); port 9 on loopback: nothing listens
    result = run_surgery(*merge_args(family, tmp_path / "out"), "--executor", "ray", "--ray-address",
                         "127.0.0.1:9", isolated=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: --ray-address 127.0.0.1:9: no Ray cluster "
                                                   "answers there"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_address_a_local_cluster_is_started(family, local_output, tmp_path):
    # a fresh process, not connected to the test cluster: `--executor ray` starts a local Ray and stops it after
    output = tmp_path / "merged"
    result = run_surgery(*merge_args(family, output), "--executor", "ray", isolated=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert_same_files(output, local_output)


def test_sweep_on_ray_equals_the_local_sweep(ray_cluster, long_to_short, tmp_path):
    """`surgery sweep --executor ray`: every evaluation and every merge + evaluation a Ray task; same results."""
    models = long_to_short / "models"
    args = ["sweep", models / "system1", models / "system2", "--method", "task_arithmetic", "--grid",
            "lambda=0,0.7", "--eval", long_to_short / "tasks.jsonl", "--limit", "6", "--max-new-tokens", "16"]
    local = run_surgery(*args, "-o", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    on_ray = run_surgery(*args, "--executor", "ray", "-o", tmp_path / "ray")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "submitted to Ray" in on_ray.stderr
    for name in ("sweep.json", "pareto.png", "recipes/point-02.yaml"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert not [path for path in (tmp_path / "ray").iterdir() if path.name.startswith(".")]
