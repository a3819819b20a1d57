"""Where a source is: a local path, or a Hub repo id ``org/name[@revision]`` resolved through the Hugging Face cache.

Every command, the pipeline and the evaluations name their inputs the same way; this module is the one place that
tells the two apart and turns a repo id into a local snapshot. With a network the snapshot is downloaded or
refreshed; without one (or with ``HF_HUB_OFFLINE=1``) it is served from the local cache::

    from surgery.io.sources import resolve_source, hub_repo
    resolve_source("merged")                          # Path("merged"), a local directory
    resolve_source("HuggingFaceTB/SmolLM2-135M@main")  # .../snapshots/<commit>, from the Hub or its cache
    hub_repo("org/name@v2")                           # ("org/name", "v2"); None for a local path
"""

from __future__ import annotations

import re
from pathlib import Path

from surgery.errors import BadInput

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

# What a checkpoint needs from a repository: weights in safetensors, configs and tokenizer files.
CHECKPOINT_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]


def looks_like_repo_id(source: str) -> bool:
    """Whether ``source`` has the form ``org/name[@revision]`` (it may still be a local path too).

    Args:
        source: what the user named.

    Returns:
        True for the repo-id form.

    Example::

        looks_like_repo_id("org/name@main")   # True
        looks_like_repo_id("./model")         # False
    """
    return REPO_ID.match(source) is not None


def hub_repo(source: str | Path) -> tuple[str, str | None] | None:
    """The Hub repository ``source`` names, when it names one rather than a local path.

    Args:
        source: a path or ``org/name[@revision]``; a :class:`Path`, or a string naming something that exists
            locally, is always a local path.

    Returns:
        ``(repo_id, revision or None)``, or None for a local path.

    Example::

        hub_repo("HuggingFaceTB/SmolLM2-135M@main")   # ("HuggingFaceTB/SmolLM2-135M", "main")
        hub_repo("out/merged")                        # None when out/merged exists
    """
    if isinstance(source, Path) or Path(source).expanduser().exists():
        return None
    match = REPO_ID.match(source)
    return (match["repo"], match["revision"]) if match else None


def check_repo_id(repo_id: str) -> None:
    """BadInput unless ``repo_id`` is a valid Hub repo id (``org/..`` and the like are not).

    Args:
        repo_id: ``namespace/name`` or ``name``, without a revision.

    Returns:
        None; raises :class:`BadInput` with a one-line reason.

    Example::

        check_repo_id("me/tiny-merge")   # passes
        check_repo_id("org/..")          # BadInput
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BadInput(f"{repo_id}: not a valid Hub repo id (namespace/name, or name in your own namespace: "
                       "letters, digits, '-', '_' and '.', at most 96 characters)") from None


def resolve_repo(source: str) -> Path:
    """Local snapshot directory of ``org/name[@revision]``; a one-line BadInput when it cannot be had.

    Args:
        source: ``org/name[@revision]``.

    Returns:
        The snapshot directory in the Hugging Face cache (weights, configs, tokenizer files).

    Example::

        resolve_repo("HuggingFaceTB/SmolLM2-135M@main")   # ~/.cache/huggingface/hub/models--.../snapshots/<commit>
    """
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


def resolve_source(source: str | Path, *, must_exist: bool = True) -> Path:
    """The local path of a source: the path itself, or the Hub snapshot a repo id names.

    Args:
        source: a local path (``~`` expanded) or ``org/name[@revision]``; a :class:`Path` is never a repo id.
        must_exist: raise when ``source`` is neither an existing path nor a repo id (False: return the missing path,
            as the pipeline does for outputs of steps not run yet).

    Returns:
        The local file or directory.

    Example::

        resolve_source("merged")                              # Path("merged")
        resolve_source("org/model@main")                      # the snapshot directory
        resolve_source("not-yet", must_exist=False)           # Path("not-yet")
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    if hub_repo(source) is not None:
        return resolve_repo(str(source))
    if must_exist:
        raise BadInput(f"{source}: no such file or directory")
    return path
