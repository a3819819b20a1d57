"""Hub repo ids resolve through huggingface_hub's cache: offline, and when the Hub cannot be reached."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from conftest import run_surgery

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_checkpoints) -> Path:
    """A Hugging Face cache holding org/tiny-llama at REVISION (the layout huggingface_hub writes)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-llama"
    shutil.copytree(tiny_checkpoints["llama"], repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("source", ["org/tiny-llama", f"org/tiny-llama@{REVISION}", "org/tiny-llama@main"])
def test_offline_repo_id(source, hub_cache, tiny_checkpoints):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = run_surgery("inspect", source, "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(hub_cache / "models--org--tiny-llama" / "snapshots" / REVISION)
    local = json.loads(run_surgery("inspect", tiny_checkpoints["llama"], "--json").stdout)
    assert report["parameters"] == local["parameters"] and report["architecture"] == local["architecture"]


def test_unreachable_hub_falls_back_to_cache(hub_cache, tmp_path):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    result = run_surgery("convert", "org/tiny-llama", "-o", tmp_path / "out", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_revision_is_bad_input(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = run_surgery("inspect", "org/tiny-llama@v9", env=env)
    assert result.returncode == 2 and "org/tiny-llama@v9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
