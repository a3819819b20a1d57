"""surgery push: the real huggingface_hub client, over real HTTP, against a Hub stand-in on loopback
(tests/hub_server.py). The main push and the error exits go through the real command line; card details and
resumption of a partial LFS upload use the Python API in-process (same client, same server)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import Result, run_surgery
from hub_server import HubServer
from merge_helpers import save_family
from surgery.errors import BadInput

TOKEN = f"hf_pushtest{uuid.uuid4().hex}"  # distinctive: it must appear in no output and no file
USER = "alice"
REVISION = "0123456789abcdef0123456789abcdef01234567"

# huggingface_hub's own LFS PUT (data=file) draws this from its HTTP library; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub():
    with HubServer(token=TOKEN, user=USER) as server:
        yield server


@pytest.fixture
def api_hub(hub, monkeypatch):
    """The server, with this process's huggingface_hub pointed at it (the CLI tests set HF_ENDPOINT instead)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    disable_progress_bars()
    yield hub
    enable_progress_bars()


def hub_env(hub: HubServer, tmp_path: Path, token: str = TOKEN) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": "", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home")}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A task-arithmetic merge of two tiny llamas read as Hub repo ids (org/tiny-base, org/tiny-ft) from a local
    Hugging Face cache, so that its surgery.json names Hub inputs (merged in-process: a subprocess costs ~3 s)."""
    from huggingface_hub import constants

    from surgery.merge import MergeJob, ModelEntry, Recipe, merge

    root = tmp_path_factory.mktemp("push")
    cache = root / "hub-cache"
    for name, path in zip(("tiny-base", "tiny-ft"), save_family(root / "family", "llama", 1)):
        repo = cache / f"models--org--{name}"
        shutil.copytree(path, repo / "snapshots" / REVISION)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        merge(MergeJob(Recipe("task_arithmetic", [ModelEntry("org/tiny-base"), ModelEntry("org/tiny-ft")]),
                       root / "merged"))
    return root / "merged"


@pytest.fixture
def checkpoint(merged, tmp_path) -> Path:
    """A copy of the merge without its README.md (push generates one), with hidden files that must stay home."""
    directory = shutil.copytree(merged, tmp_path / "checkpoint")
    (directory / "README.md").unlink()
    (directory / ".staging").mkdir()
    (directory / ".staging" / "model.safetensors").write_bytes(b"half-written")
    (directory / ".notes").write_text("private")
    return directory


def visible_files(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in directory.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)}


def card_metadata(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---\n")[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_token_nowhere(outputs: list[Result], *roots: Path) -> None:
    for result in outputs:
        assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for root in roots:
        for path in root.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def assert_one_line(result: Result, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert text in result.stderr


def test_push_merged_checkpoint(hub, checkpoint, tmp_path):
    result = run_surgery("push", checkpoint, f"{USER}/tiny-merge", "--json", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    stored = hub.files(f"{USER}/tiny-merge")
    assert summary["commit_url"] == f"{hub.url}/{USER}/tiny-merge/commit/{hub.repos[f'{USER}/tiny-merge'].refs['main']}"
    assert (summary["repo_id"], summary["revision"], summary["card"]) == (f"{USER}/tiny-merge", "main", "generated")
    assert summary["files"] == {name: len(content) for name, content in stored.items()}

    # Exactly the visible files, byte for byte, plus the generated card; the directory itself is untouched.
    assert {name: data for name, data in stored.items() if name != "README.md"} == visible_files(checkpoint)
    assert not (checkpoint / "README.md").exists()
    assert [oid for oid, _ in hub.uploaded()] == [sha256(checkpoint / "model.safetensors")]  # weights went by LFS

    metadata = card_metadata(stored["README.md"])
    assert metadata["base_model"] == ["org/tiny-base", "org/tiny-ft"]
    assert metadata["base_model_relation"] == "merge" and metadata["library_name"] == "transformers"
    assert {"surgery", "task_arithmetic"} <= set(metadata["tags"])
    card = stored["README.md"].decode()
    assert "surgery merge --recipe surgery.json" in card and '"method": "task_arithmetic"' in card
    assert f"`org/tiny-base` at revision `{REVISION}`" in card
    assert_token_nowhere([result], checkpoint, tmp_path / "hf-home")
    assert TOKEN not in card


def test_interrupted_push_resumes_without_resending(hub, checkpoint, tmp_path):
    env = hub_env(hub, tmp_path)
    hub.fail_commits = 1
    first = run_surgery("push", checkpoint, f"{USER}/resumed", env=env)
    assert_one_line(first, 1, "run the same command again to resume")
    weights = checkpoint / "model.safetensors"
    assert hub.uploaded() == [(sha256(weights), weights.stat().st_size)]  # the weights arrived; the commit did not
    assert hub.files(f"{USER}/resumed") == {}

    second = run_surgery("push", checkpoint, f"{USER}/resumed", env=env)
    assert second.returncode == 0, second.stderr
    assert len(hub.uploaded()) == 1  # not sent again: the LFS batch answer said the server has it
    assert second.stdout.strip().splitlines()[-1].startswith(f"{hub.url}/{USER}/resumed/commit/")
    stored = hub.files(f"{USER}/resumed")
    assert {name: data for name, data in stored.items() if name != "README.md"} == visible_files(checkpoint)
    assert_token_nowhere([first, second], checkpoint, tmp_path / "hf-home")


def test_partial_lfs_upload_resumes_with_the_missing_objects_only(api_hub, sharded_llama, tmp_path):
    from surgery.hub import PushConfig, PushFailed, push

    directory = shutil.copytree(sharded_llama, tmp_path / "sharded")
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 2
    broken = sha256(shards[1])
    api_hub.fail_uploads = {broken}
    with pytest.raises(PushFailed, match="the Hub answered 400"):
        push(PushConfig(directory, f"{USER}/sharded"))
    arrived = [oid for oid, _ in api_hub.uploaded()]
    assert arrived and broken not in arrived

    result = push(PushConfig(directory, f"{USER}/sharded"))
    resent = [oid for oid, _ in api_hub.uploaded()][len(arrived):]
    assert sorted(arrived + resent) == sorted(sha256(shard) for shard in shards)  # each object sent once, in all
    assert api_hub.files(f"{USER}/sharded") == visible_files(directory) and result.card == "none"


def test_existing_card_is_kept_or_completed(api_hub, merged, tmp_path):
    from surgery.hub import PushConfig, push

    directory = shutil.copytree(merged, tmp_path / "checkpoint")
    own_card = (directory / "README.md").read_bytes()  # the merge's card already has every field it can know
    assert push(PushConfig(directory, f"{USER}/cards")).card == "kept"
    assert api_hub.files(f"{USER}/cards")["README.md"] == own_card

    user_card = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My merge\n\nWritten by hand.\n"
    (directory / "README.md").write_text(user_card)
    assert push(PushConfig(directory, f"{USER}/cards", commit_message="Complete the card")).card == "completed"
    assert (directory / "README.md").read_text() == user_card  # completed in the commit, not on disk
    pushed = api_hub.files(f"{USER}/cards")["README.md"].decode()
    assert pushed.startswith("---\nlicense: mit\ntags:\n- mine\n")
    assert pushed.endswith("---\n\n# My merge\n\nWritten by hand.\n")
    metadata = card_metadata(pushed.encode())
    assert metadata["license"] == "mit" and metadata["tags"] == ["mine"]  # never overwritten
    assert metadata["base_model_relation"] == "merge" and metadata["library_name"] == "transformers"
    assert metadata["base_model"] == ["org/tiny-base", "org/tiny-ft"]


def test_card_the_hub_rejects_is_bad_input(api_hub, merged, tmp_path):
    from surgery.hub import PushConfig, push

    directory = shutil.copytree(merged, tmp_path / "checkpoint")
    (directory / "README.md").write_text("---\nbase_model_relation: none\n---\n# Converted\n")
    with pytest.raises(BadInput, match="the Hub rejects the model card: .*base_model_relation"):
        push(PushConfig(directory, f"{USER}/rejected"))
    assert api_hub.uploaded() == []  # validated before anything is sent


def test_branch_and_pull_request(api_hub, merged, tmp_path):
    from surgery.hub import PushConfig, push

    directory = shutil.copytree(merged, tmp_path / "checkpoint")
    on_branch = push(PushConfig(directory, f"{USER}/branches", revision="v2"))
    repo = api_hub.repos[f"{USER}/branches"]
    assert on_branch.revision == "v2" and api_hub.files(f"{USER}/branches", "v2") == visible_files(directory)
    assert api_hub.files(f"{USER}/branches") == {}  # main untouched

    (directory / "extra.txt").write_text("an addition proposed in a pull request\n")
    proposal = push(PushConfig(directory, f"{USER}/branches", revision="v2", create_pr=True))
    assert proposal.pr_url == f"{api_hub.url}/{USER}/branches/discussions/1"
    assert proposal.revision == "refs/pr/1" and repo.refs["refs/pr/1"] != repo.refs["v2"]
    assert api_hub.files(f"{USER}/branches", "refs/pr/1") == visible_files(directory)


@pytest.mark.parametrize("command, relation, library, tags", [
    ("convert", None, "transformers", ["surgery", "convert"]),
    ("extend", "finetune", "transformers", ["surgery", "finetune", "rope-yarn"]),
    ("quantize", "quantized", "transformers", ["surgery", "quantized", "int4"]),
    ("adapter", "adapter", "peft", ["surgery", "adapter", "lora"]),
])
def test_generated_card_fields(command, relation, library, tags, tmp_path):
    from surgery.cards import card_from_manifest

    recipe = {"convert": {"dtype": "bfloat16"}, "extend": {"rope": "yarn", "factor": 4.0},
              "quantize": {"method": "int4"}, "adapter": {"method": "lora"}}[command]
    manifest = {"surgery_version": "0.1.0", "command": command, "recipe": recipe,
                "inputs": [{"source": "org/base", "revision": REVISION, "sha256": {}}],
                "output": {"measurements": {"kl_divergence": 0.0123, "passkey": [{"length": 1024, "accuracy": 0.9}]},
                           "inv_freq": [1.0 / 2 ** i for i in range(16)]}}
    card = card_from_manifest(manifest, "adapter" if command == "adapter" else "model", f"{USER}/out", tmp_path)
    metadata = card_metadata(card)
    assert metadata.get("base_model_relation") == relation  # convert: none (the Hub knows no such relation)
    assert metadata["base_model"] == ["org/base"] and metadata["library_name"] == library
    assert metadata["tags"] == tags
    text = card.decode()
    assert "| output.measurements.kl_divergence | 0.0123 |" in text
    assert "| output.measurements.passkey[0].accuracy | 0.9 |" in text
    assert "| output.inv_freq | 16 values: 1 … 3.05176e-05 |" in text


def test_generated_card_takes_the_license_the_inputs_agree_on(tmp_path):
    from surgery.cards import card_from_manifest

    inputs = []
    for name in ("base", "tuned"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n# An input\n")
        inputs.append({"source": str(tmp_path / name), "revision": None, "sha256": {}})
    manifest = {"command": "merge", "recipe": {"method": "ties"}, "inputs": inputs}
    metadata = card_metadata(card_from_manifest(manifest, "model", f"{USER}/out", tmp_path))
    assert metadata["license"] == "apache-2.0" and "base_model" not in metadata  # local inputs are no Hub ids


def test_card_without_front_matter_gets_one(tmp_path):
    from surgery.cards import complete_front_matter

    completed = complete_front_matter("# Notes\n", {"license": "apache-2.0", "tags": ["surgery"]}, "README.md")
    assert completed == "---\nlicense: apache-2.0\ntags:\n- surgery\n---\n\n# Notes\n"
    with pytest.raises(BadInput, match="not valid YAML"):
        complete_front_matter("---\nlicense: [mit\n---\n", {"license": "mit"}, "README.md")


def test_dry_run_makes_no_request(hub, checkpoint, tmp_path):
    result = run_surgery("push", checkpoint, f"{USER}/planned", "--dry-run", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"would push {len(visible_files(checkpoint)) + 1} files")
    assert lines[0].endswith("model card generated")
    assert any(line.split()[0] == "model.safetensors" for line in lines[1:])
    assert not any(".staging" in line or ".notes" in line for line in lines)


@pytest.mark.parametrize("token, error", [
    ("", "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
    ("hf_readonly", f"{USER}/errors: no write access with this token (the Hub answered 403"),
], ids=["no token", "wrong token"])
def test_token_errors_are_one_line_exit_2(token, error, hub, checkpoint, tmp_path):
    result = run_surgery("push", checkpoint, f"{USER}/errors", env=hub_env(hub, tmp_path, token))
    assert_one_line(result, 2, error)
    assert TOKEN not in result.stderr + result.stdout
    assert f"{USER}/errors" not in hub.repos and all(request["status"] != 200 for request in hub.requests)


def test_unreachable_hub_is_push_failed(api_hub, merged, monkeypatch):
    from huggingface_hub import constants

    from surgery.hub import PushConfig, PushFailed, push

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(PushFailed, match=f"cannot reach the Hub at {closed} .*run the same command again"):
        push(PushConfig(merged, f"{USER}/offline"))


@pytest.mark.parametrize("case", ["invalid repo id", "not a checkpoint", "missing shard"])
def test_bad_input_before_any_request(case, api_hub, checkpoint, sharded_llama, tmp_path):
    from surgery.hub import PushConfig, push

    repo_id, directory = f"{USER}/errors", checkpoint
    if case == "invalid repo id":
        repo_id, error = f"{USER}/bad--name", f"{USER}/bad--name: not a valid Hub repo id"
    elif case == "not a checkpoint":
        directory = tmp_path / "notes"
        directory.mkdir()
        (directory / "notes.txt").write_text("not weights")
        error = f"{directory}: not a checkpoint (no config.json"
    else:
        directory = shutil.copytree(sharded_llama, tmp_path / "sharded")
        shard = sorted(directory.glob("*.safetensors"))[0]
        shard.unlink()
        error = f"{directory}: not a checkpoint ({shard}: shard file is missing)"
    with pytest.raises(BadInput) as raised:
        push(PushConfig(directory, repo_id))
    assert str(raised.value).startswith(error)
    assert api_hub.requests == []
