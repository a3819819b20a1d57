"""surgery.io.sources, surgery.output and the operation configs of convert / extend / push: what they accept, what
they refuse, and that an output appears whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.errors import BadInput, CheckFailed
from surgery.io import open_checkpoint
from surgery.io.sources import hub_repo, resolve_source
from surgery.output import Card, OutputRecord, write_output


def test_sources_tell_paths_from_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_repo("org/name@v2") == ("org/name", "v2")
    assert hub_repo("org/name") == ("org/name", None)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_repo("org/name") is None  # it exists here: a local path wins
    assert hub_repo(Path("org/other")) is None  # a Path is never a repo id
    assert resolve_source("org/name") == Path("org/name")
    assert resolve_source("not-there", must_exist=False) == Path("not-there")
    with pytest.raises(BadInput, match="^not-there: no such file or directory$"):
        resolve_source("not-there")


def test_cards_name_inputs_by_name_or_repo_id(tmp_path, monkeypatch):
    from surgery.cards import model_name

    (tmp_path / "build" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "build")
    assert model_name(str(tmp_path / "build" / "final")) == "final"
    assert model_name(".") == "build" and model_name("final/") == "final"
    assert model_name("org/model") == "org/model"  # a Hub id as given
    assert model_name("org/model+final") == "org/model + final"  # MODEL+ADAPTER


def test_write_output_writes_manifest_and_card_with_the_files(tiny_checkpoints, tmp_path):
    def write(staging: Path) -> dict:
        (staging / "a.txt").write_text("a")
        return {"size": 1}

    with open_checkpoint(tiny_checkpoints["llama"]) as ckpt:
        written = write_output(tmp_path / "out", OutputRecord("adapter", [ckpt]), write, recipe={"method": "test"},
                               card=lambda measured: Card("T", "adapter", "test", f"size {measured['size']}", "peft"))
    assert written == ["README.md", "a.txt", "surgery.json"]
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["command"] == "adapter" and manifest["output"] == {"size": 1}
    assert manifest["inputs"][0]["sha256"]["model.safetensors"]  # the input was hashed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card and "size 1" in card


def test_write_output_leaves_nothing_when_the_check_fails(tiny_checkpoints, tmp_path):
    def refuse(staging: Path) -> None:
        assert (staging / "surgery.json").is_file() and (staging / "README.md").is_file()  # checked complete
        raise CheckFailed("the written output would not load")

    with open_checkpoint(tiny_checkpoints["llama"]) as ckpt:
        with pytest.raises(CheckFailed):
            write_output(tmp_path / "out", OutputRecord("adapter", [ckpt]), lambda staging: None,
                         recipe={}, card=Card("T", None, "test", "body"), check=refuse)
    assert list(tmp_path.iterdir()) == []


def test_configs_validate_when_made(tmp_path):
    from surgery.convert import ConvertConfig
    from surgery.extend import ExtendConfig
    from surgery.hub import PushConfig

    with pytest.raises(BadInput, match="--rope 'stretch': expected one of"):
        ExtendConfig("src", "out", "stretch")
    with pytest.raises(BadInput, match="^--power: applies to --rope power, not yarn$"):
        ExtendConfig("src", "out", "yarn", factor=2, power=1.0)
    assert ExtendConfig("src", "out", "yarn", factor=2, beta_fast=16).options["beta_fast"] == 16
    with pytest.raises(BadInput, match="int7"):
        ConvertConfig("src", "out", dtype="int7")
    with pytest.raises(BadInput, match="not a valid Hub repo id"):
        PushConfig(tmp_path, "me/bad--name")


def test_convert_and_extend_dry_runs_write_nothing(tiny_checkpoints, tmp_path):
    from surgery.convert import ConvertConfig, convert
    from surgery.extend import ExtendConfig, extend

    planned = convert(ConvertConfig(tiny_checkpoints["llama"], tmp_path / "c", dtype="bfloat16", dry_run=True))
    assert planned.summary()["dtype"] == "bfloat16" and planned.written is None
    extended = extend(ExtendConfig(tiny_checkpoints["llama"], tmp_path / "e", "linear", factor=2, dry_run=True))
    assert extended.summary()["output"] is None and extended.plan.new_length == 2 * extended.plan.geometry.source_length
    assert list(tmp_path.iterdir()) == []
