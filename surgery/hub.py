"""Hugging Face Hub access: resolving ``org/name[@revision]`` to a local snapshot.

Resolution goes through huggingface_hub's cache: with a network, the snapshot is downloaded or refreshed; without one
(or with ``HF_HUB_OFFLINE=1``) it is served from the local cache, as any transformers user would expect::

    path = resolve_repo("HuggingFaceTB/SmolLM2-135M@main")
"""

from __future__ import annotations

import re
from pathlib import Path

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
