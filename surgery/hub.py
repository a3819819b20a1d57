"""``surgery push``: upload a checkpoint directory to a Hugging Face Hub model repository in one commit::

    result = push(PushConfig("merged", "me/tiny-merge"))   # one commit, with a model card made from surgery.json
    result.commit_url, result.card                          # card: generated, completed, kept or none

Resolving ``org/name[@revision]`` to a local snapshot is :mod:`surgery.io.sources`; the card is :mod:`surgery.cards`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from surgery.cards import model_card_for
from surgery.errors import BadInput, Failed
from surgery.io.checkpoint import INDEX_FILE
from surgery.io.sources import check_repo_id

NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
RESUME = "run the same command again to resume (what arrived is not sent again)"


class PushFailed(Failed):
    """The Hub or the network failed during a push: one line, exit code 1. Rerunning the push resumes it."""


@dataclass(frozen=True)
class PushConfig:
    """What ``surgery push`` uploads, and where (the repo id is checked when the config is made).

    ``directory`` holds config.json with safetensors weights (or an index), or a PEFT adapter; ``revision`` is the
    branch committed to (made from main when missing); ``create_pr`` opens a pull request instead; ``dry_run`` lists
    what would be sent without a network call.
    """

    directory: str | Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_repo_id(self.repo_id)


@dataclass(frozen=True)
class PushResult:
    """What was (or, in a dry run, would be) pushed: repository, revision, commit, files with their sizes, card
    status ("generated", "completed", "kept" or "none")."""

    repo_id: str
    revision: str
    commit_url: str | None
    commit: str | None
    pr_url: str | None
    files: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    card: str = "none"
    private: bool = False
    dry_run: bool = False

    def summary(self) -> dict:
        """What ``surgery push --json`` prints.

        Returns:
            The fields as a dict, in declaration order.

        Example::

            push(PushConfig("merged", "me/m", dry_run=True)).summary()["files"]   # {"README.md": 812, ...}
        """
        return asdict(self)


def push(config: PushConfig, *, progress=None) -> PushResult:
    """Upload ``config.directory`` to ``config.repo_id`` in one commit, with a model card.

    Hidden files and folders (names starting with ".") are never sent. Without a README.md, a card is generated
    from ``surgery.json``; an existing card is kept, its front matter completed with the fields it lacks. The card
    travels in the commit: the directory is not modified. The token comes from HF_TOKEN or `hf auth login`, the
    endpoint from HF_ENDPOINT. An interrupted push resumes when run again: the Hub's LFS batch answer names the
    objects it already holds and those are not sent again, and file hashes are remembered between runs, so the
    weights are not even re-read.

    Args:
        config: what to push and where.
        progress: unused (huggingface_hub draws its own bars); accepted like every operation's.

    Returns:
        A :class:`PushResult`. Raises BadInput (not a checkpoint, no token, no write access, unknown revision) or
        PushFailed (Hub or network).

    Example::

        push(PushConfig("merged", "me/tiny-merge"))                          # creates the repository when missing
        push(PushConfig("merged", "me/tiny-merge", revision="v2"))           # branch v2
        push(PushConfig("merged", "me/tiny-merge", create_pr=True))          # a pull request instead of a commit
        push(PushConfig("merged", "me/tiny-merge", dry_run=True)).files      # what would be sent
    """
    directory, repo_id, revision = Path(config.directory), config.repo_id, config.revision
    kind = checkpoint_kind(directory)
    files = upload_files(directory)
    card, card_status = model_card_for(directory, kind, repo_id)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    if card is not None:
        sizes["README.md"] = len(card)
    planned = PushResult(repo_id, revision or "main", None, None, None, dict(sorted(sizes.items())),
                         sum(sizes.values()), card_status, config.private, config.dry_run)
    if config.dry_run:
        return planned
    token = _token()
    operations = _operations(files, card)
    with _hub_errors(directory, repo_id, revision, token):
        repo_id, commit = _commit(token, repo_id, operations, private=config.private, revision=revision,
                                  commit_message=config.commit_message or f"Upload {kind} with surgery push",
                                  create_pr=config.create_pr)
    return PushResult(repo_id, commit.pr_revision or revision or "main", commit.commit_url, commit.oid,
                      commit.pr_url, planned.files, planned.bytes, card_status, config.private, config.dry_run)


def checkpoint_kind(directory: Path) -> str:
    """What a pushed directory holds.

    Args:
        directory: the directory to push.

    Returns:
        "model" (config.json with safetensors weights or an index) or "adapter" (adapter_config.json with
        adapter_model.safetensors); a BadInput saying what is missing otherwise.

    Example::

        checkpoint_kind(Path("merged"))   # "model"
    """
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
    if not has(INDEX_FILE) and not any(path.is_file() and not path.name.startswith(".")
                                  for path in directory.glob("*.safetensors")):
        raise BadInput(f"{directory}: not a checkpoint (config.json but no safetensors weights)")
    from surgery.io.safetensors_reader import SafetensorsCheckpoint

    if has(INDEX_FILE) or has("model.safetensors"):  # config, index and every header as a loader reads them
        try:
            with SafetensorsCheckpoint(str(directory), directory):
                pass
        except BadInput as err:
            raise BadInput(f"{directory}: not a checkpoint ({err})") from None
    return "model"


def upload_files(directory: Path) -> dict[str, Path]:
    """What a push sends.

    Args:
        directory: the directory to push.

    Returns:
        Path in the repository → local file, sorted; hidden files and folders are left out.

    Example::

        upload_files(Path("merged"))   # {"README.md": Path("merged/README.md"), "config.json": ..., ...}
    """
    files = {}
    for root, folders, names in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(root) / name
                files[path.relative_to(directory).as_posix()] = path
    return dict(sorted(files.items()))


# ---- talking to the Hub


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
