"""Hugging Face Hub access: resolving ``org/name[@revision]`` to a local snapshot, and pushing a checkpoint.

Resolution goes through huggingface_hub's cache: with a network, the snapshot is downloaded or refreshed; without one
(or with ``HF_HUB_OFFLINE=1``) it is served from the local cache, as any transformers user would expect::

    path = resolve_repo("HuggingFaceTB/SmolLM2-135M@main")
    result = push("merged", "me/tiny-merge")    # one commit, with a model card made from surgery.json
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from surgery.errors import BadInput

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

# What a checkpoint needs from a repository: weights in safetensors, configs and tokenizer files.
CHECKPOINT_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]


def looks_like_repo_id(source: str) -> bool:
    return REPO_ID.match(source) is not None


def resolve_repo(source: str) -> Path:
    """Local snapshot directory of ``org/name[@revision]``; a one-line BadInput when it cannot be had."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    match = REPO_ID.match(source)
    if match is None:
        raise BadInput(f"{source}: not a local path and not a Hub repo id of the form org/name[@revision]")
    repo_id, revision = match["repo"], match["revision"]
    check_repo_id(repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except RepositoryNotFoundError:
        raise BadInput(f"{source}: no such repository on the Hub (or no access to it)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        pass  # no network, or the Hub refused the revision: fall back to the local cache below
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        raise BadInput(f"{source}: not a local path, and not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) while the Hub cannot be reached") from None


# ---- push

INDEX = "model.safetensors.index.json"
RELATIONS = {"merge": "merge", "quantize": "quantized", "adapter": "adapter", "extend": "finetune"}  # the Hub's names
CARD_FIELDS = ("base_model", "base_model_relation", "library_name", "license", "tags")
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(?P<yaml>.*?)(?P<close>^---[ \t]*\r?$)", re.S | re.M)
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
RESUME = "run the same command again to resume (what arrived is not sent again)"


class PushFailed(Exception):
    """The Hub or the network failed during a push: one line, exit code 1. Rerunning the push resumes it."""


def push(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, create_pr: bool = False, dry_run: bool = False) -> dict:
    """Upload a checkpoint directory to a Hub model repository in one commit, with a model card::

        result = push("merged", "me/tiny-merge")               # creates the repository when it is missing
        result["commit_url"], result["files"], result["card"]  # card: generated, completed, kept or none
        push("merged", "me/tiny-merge", revision="v2")          # branch v2, made from main when missing
        push("merged", "me/tiny-merge", create_pr=True)         # a pull request instead of a commit to main
        push("merged", "me/tiny-merge", dry_run=True)           # what would be sent; no network call

    ``directory`` holds config.json with safetensors weights (or an index), or a PEFT adapter; hidden files and
    folders (names starting with ".") are never sent. Without a README.md, a card is generated from ``surgery.json``;
    an existing card is kept, its front matter completed with the fields it lacks. The card travels in the commit:
    the directory is not modified. The token comes from HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT.

    An interrupted push resumes when run again: the Hub's LFS batch answer names the objects it already holds and
    those are not sent again, and file hashes are remembered between runs, so the weights are not even re-read.
    Raises BadInput (not a checkpoint, invalid repo id, no token, no write access) or PushFailed (Hub or network).
    """
    directory = Path(directory)
    check_repo_id(repo_id)
    kind = checkpoint_kind(directory)
    files = upload_files(directory)
    card, card_status = model_card_for(directory, kind, repo_id)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    if card is not None:
        sizes["README.md"] = len(card)
    summary = {"repo_id": repo_id, "revision": revision or "main", "commit_url": None, "commit": None,
               "pr_url": None, "files": dict(sorted(sizes.items())), "bytes": sum(sizes.values()),
               "card": card_status, "private": private, "dry_run": dry_run}
    if dry_run:
        return summary
    token = _token()
    operations = _operations(files, card)
    with _hub_errors(directory, repo_id, revision, token):
        repo_id, commit = _commit(token, repo_id, operations, private=private, revision=revision,
                                  commit_message=commit_message or f"Upload {kind} with surgery push",
                                  create_pr=create_pr)
    return {**summary, "repo_id": repo_id, "revision": commit.pr_revision or revision or "main",
            "commit_url": commit.commit_url, "commit": commit.oid, "pr_url": commit.pr_url}


def checkpoint_kind(directory: Path) -> str:
    """What ``directory`` holds: "model" (config.json with safetensors weights or an index) or "adapter"
    (adapter_config.json with adapter_model.safetensors); a BadInput saying what is missing otherwise."""
    def has(name: str) -> bool:
        return (directory / name).is_file()

    if not directory.is_dir():
        reason = "not a directory" if directory.exists() else "no such directory"
        raise BadInput(f"{directory}: not a checkpoint ({reason})")
    if has("adapter_config.json") and has("adapter_model.safetensors"):
        return "adapter"
    if not has("config.json"):
        raise BadInput(f"{directory}: not a checkpoint (no config.json with safetensors weights, and no "
                       "adapter_config.json with adapter_model.safetensors)")
    if not has(INDEX) and not any(path.is_file() and not path.name.startswith(".")
                                  for path in directory.glob("*.safetensors")):
        raise BadInput(f"{directory}: not a checkpoint (config.json but no safetensors weights)")
    from surgery.io.safetensors_reader import SafetensorsCheckpoint

    if has(INDEX) or has("model.safetensors"):  # config, index and every header as a loader reads them
        try:
            with SafetensorsCheckpoint(str(directory), directory):
                pass
        except BadInput as err:
            raise BadInput(f"{directory}: not a checkpoint ({err})") from None
    return "model"


def upload_files(directory: Path) -> dict[str, Path]:
    """What a push sends: path in the repository → local file, sorted; hidden files and folders are left out."""
    files = {}
    for root, folders, names in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(root) / name
                files[path.relative_to(directory).as_posix()] = path
    return dict(sorted(files.items()))


# ---- the model card


def model_card_for(directory: Path, kind: str, repo_id: str) -> tuple[bytes | None, str]:
    """The README.md a push sends in place of the directory's (None: the directory's own file, or no card) and the
    card's status: "generated" from surgery.json, "completed" (the existing card with the front-matter fields it
    lacked), "kept", or "none" (neither a card nor a manifest to make one from)."""
    from surgery.provenance import read_manifest

    manifest = read_manifest(directory)
    readme = directory / "README.md"
    if not manifest:
        return None, "kept" if readme.is_file() else "none"
    card = card_from_manifest(manifest, kind, repo_id, directory)
    if not readme.is_file():
        return card, "generated"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{readme}: cannot read the model card ({err})") from None
    ours = front_matter(card.decode(), "generated card")
    completed = complete_front_matter(text, {key: ours.get(key) for key in CARD_FIELDS}, str(readme))
    return (None, "kept") if completed == text else (completed.encode(), "completed")


@dataclass
class _RecordedInput:
    """An input named in surgery.json, with what provenance.model_card_bytes reads of a Checkpoint: ``source``
    (its base_model entry when a Hub repo id) and ``path``, a directory whose README.md gives the input's license."""

    source: str
    path: Path


def card_from_manifest(manifest: dict, kind: str, repo_id: str, directory: Path) -> bytes:
    """A Hub model card for what ``manifest`` records: base_model (inputs that are Hub repo ids),
    base_model_relation, tags (surgery, the relation, the method or command), library_name, the license the
    inputs' cards agree on, and a body with the recipe and the figures measured."""
    from huggingface_hub import ModelCard

    from surgery.provenance import model_card_bytes

    command = str(manifest.get("command") or "surgery")
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    method = recipe.get("method") or (f"rope-{recipe['rope']}" if recipe.get("rope") else command)
    records = [record for record in manifest.get("inputs") or [] if isinstance(record, dict)]
    with tempfile.TemporaryDirectory() as nowhere:  # the path of an input whose card is not at hand
        inputs = [_recorded_input(record, Path(nowhere)) for record in records]
        if kind == "adapter":
            inputs += _adapter_base(directory, Path(nowhere), {i.source for i in inputs})
        card = model_card_bytes(title=repo_id.split("/")[-1], relation="adapter" if kind == "adapter"
                                else RELATIONS.get(command), method=str(method), checkpoints=inputs,
                                body=_card_body(manifest, command, recipe, records))
    if kind == "adapter":
        parsed = ModelCard(card.decode())
        parsed.data.library_name = "peft"
        card = str(parsed).encode()
    return card


def _recorded_input(record: dict, nowhere: Path) -> _RecordedInput:
    source = str(record.get("source") or "")
    local = Path(source).expanduser()
    if local.exists():
        return _RecordedInput(source, local)
    match = REPO_ID.match(source)
    if match is None or not record.get("revision"):
        # A local path that is gone (or relative to another directory): "./" keeps it out of base_model.
        return _RecordedInput(source if local.is_absolute() else f"./{source}", nowhere)
    from huggingface_hub import try_to_load_from_cache

    card = try_to_load_from_cache(match["repo"], "README.md", revision=record["revision"])
    return _RecordedInput(match["repo"], Path(card).parent if isinstance(card, str) else nowhere)


def _adapter_base(directory: Path, nowhere: Path, known: set[str]) -> list[_RecordedInput]:
    """The base model adapter_config.json names, when it is a Hub repo id the manifest does not list already."""
    try:
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(base, str) or not looks_like_repo_id(base) or Path(base).exists() or base in known:
        return []
    return [_RecordedInput(base, nowhere)]


def _card_body(manifest: dict, command: str, recipe: dict, records: list[dict]) -> str:
    version = manifest.get("surgery_version")
    lines = [f"Made with [surgery](https://pypi.org/project/surgery/){f' {version}' if version else ''}: "
             f"`surgery {command}`. `surgery.json` records the inputs (with SHA-256 content hashes) and the full "
             "recipe.", ""]
    for record in records:
        revision = record.get("revision")
        lines.append(f"- input: `{record.get('source')}`" + (f" at revision `{revision}`" if revision else ""))
    reproduce = " (reproduce with `surgery merge --recipe surgery.json -o OUT`)" if command == "merge" else ""
    lines += ["", f"Recipe{reproduce}:", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```"]
    figures = list(_numbers({key: manifest[key] for key in ("output", "measurements") if key in manifest}))
    if figures:
        lines += ["", "## Measurements", "", "| field | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in figures]
    return "\n".join(lines)


def _numbers(value, name: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, text) for every number in ``value``; a long list of numbers is shown by its ends."""
    def text(number) -> str:
        return f"{number:.6g}" if isinstance(number, float) else str(number)

    def is_number(item) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if is_number(value):
        yield name, text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list) and len(value) > 8 and all(is_number(item) for item in value):
        yield name, f"{len(value)} values: {text(value[0])} … {text(value[-1])}"
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{name}[{index}]")


def front_matter(text: str, label: str) -> dict:
    """The YAML front matter of a model card ({} when it has none)."""
    import yaml

    match = FRONT_MATTER.match(text)
    try:
        data = yaml.safe_load(match["yaml"]) if match else {}
    except yaml.YAMLError as err:
        raise BadInput(f"{label}: the front matter is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data or {}, dict):
        raise BadInput(f"{label}: the front matter is not a YAML mapping")
    return data or {}


def complete_front_matter(text: str, fields: dict, label: str) -> str:
    """``text`` with the ``fields`` its front matter lacks (absent or null) appended to it; everything the author
    wrote stays as it is, byte for byte::

        complete_front_matter("---\\nlicense: mit\\n---\\n# M\\n", {"license": "apache-2.0", "tags": ["x"]}, "card")
        # '---\\nlicense: mit\\ntags:\\n- x\\n---\\n# M\\n'
    """
    import yaml

    present = front_matter(text, label)
    missing = {key: value for key, value in fields.items() if value is not None and present.get(key) is None}
    if not missing:
        return text
    block = yaml.safe_dump(missing, sort_keys=False, allow_unicode=True)
    if "\r\n" in text:
        block = block.replace("\n", "\r\n")
    match = FRONT_MATTER.match(text)
    if match is None:
        return f"---\n{block}---\n\n{text}"
    return text[:match.start("close")] + block + text[match.start("close"):]


# ---- talking to the Hub


def check_repo_id(repo_id: str) -> None:
    """BadInput unless ``repo_id`` is a valid Hub repo id (``org/..`` and the like are not)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BadInput(f"{repo_id}: not a valid Hub repo id (namespace/name, or name in your own namespace: "
                       "letters, digits, '-', '_' and '.', at most 96 characters)") from None


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise BadInput(NO_TOKEN)
    return token


def _operations(files: dict[str, Path], card: bytes | None) -> list:
    from huggingface_hub import CommitOperationAdd

    from surgery.provenance import content_hashes

    if card is not None:
        files = {name: path for name, path in files.items() if name != "README.md"}
    hashes = content_hashes(list(files.values()))
    operations = []
    for name, path in files.items():
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        operation.upload_info.sha256 = bytes.fromhex(hashes[path])  # so the client does not read the file to hash it
        operations.append(operation)
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    return operations


def _commit(token: str, repo_id: str, operations: list, *, private: bool, revision: str | None,
            commit_message: str, create_pr: bool):
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and not revision.startswith("refs/") and not constants.REGEX_COMMIT_OID.fullmatch(revision):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision,
                               create_pr=create_pr)
    return repo_id, commit


@contextmanager
def _hub_errors(directory: Path, repo_id: str, revision: str | None, token: str) -> Iterator[None]:
    """Turn the client's errors into one-line BadInput / PushFailed messages (never with the token in them)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    def one_line(text: object) -> str:
        return " ".join(str(text).split()).replace(token, "***")

    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted below; anything else is re-raised as it is
        cause = err
        while cause is not None and not isinstance(cause, (HfHubHTTPError, httpx2.TransportError, ValueError)):
            cause = cause.__cause__
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code
            detail = f": {one_line(cause.server_message)}" if cause.server_message else ""
            if status in (401, 403):
                raise BadInput(f"{repo_id}: no write access with this token (the Hub answered {status}{detail})") \
                    from None
            if isinstance(cause, RevisionNotFoundError):
                raise BadInput(f"--revision {revision}: not a branch or pull request of {repo_id}") from None
            raise PushFailed(f"{repo_id}: the Hub answered {status}{detail}; {RESUME}") from None
        if isinstance(cause, httpx2.TransportError):
            raise PushFailed(f"cannot reach the Hub at {constants.ENDPOINT} ({type(cause).__name__}); {RESUME}") \
                from None
        if isinstance(cause, ValueError) and "README.md" in str(cause):
            raise BadInput(f"{directory}: the Hub rejects the model card: {one_line(cause)}") from None
        raise
