"""Provenance written next to every output: the ``surgery.json`` manifest and the ``README.md`` model card.

The manifest names the inputs (with Hub revisions and SHA-256 content hashes), the full recipe, the seed and the
surgery version; ``surgery merge --recipe OUT/surgery.json`` reproduces the output bit for bit. It holds no
timestamps or output paths, so identical runs write identical manifests.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from surgery import __version__
from surgery.io.checkpoint import Checkpoint

HASH_CHUNK = 8 << 20
SNAPSHOT_REVISION = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_inputs_in_background(checkpoints: list[Checkpoint]) -> Future:
    """Start hashing every input file on a worker thread (hashlib releases the GIL); the result is a list of
    input records for the manifest."""
    pool = ThreadPoolExecutor(max_workers=1)

    def work() -> list[dict]:
        records = []
        for ckpt in checkpoints:
            directory = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
            files = {name: sha256_file(directory / name) for name in ckpt.files()}
            match = SNAPSHOT_REVISION.search(str(ckpt.path))
            records.append({"source": ckpt.source, "revision": match.group(1) if match else None,
                            "sha256": files})
        return records

    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def manifest_bytes(command: str, recipe: dict, inputs: list[dict], outputs: dict | None = None) -> bytes:
    manifest = {"surgery_version": __version__, "command": command, "recipe": recipe, "inputs": inputs}
    if outputs:
        manifest["output"] = outputs
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _license(ckpt: Checkpoint) -> str | None:
    directory = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    card = directory / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - an unreadable input card just means "license unknown"
        return None


def model_card_bytes(*, title: str, relation: str, method: str, checkpoints: list[Checkpoint], body: str) -> bytes:
    """A Hub model card: YAML front matter (base_model list, base_model_relation, tags, license when the inputs
    agree on one) and a body describing what was done."""
    from huggingface_hub import ModelCard, ModelCardData

    from surgery.hub import looks_like_repo_id

    licenses = {_license(ckpt) for ckpt in checkpoints}
    data = ModelCardData(
        base_model=[c.source for c in checkpoints if looks_like_repo_id(c.source) and not Path(c.source).exists()]
        or None,
        base_model_relation=relation,
        tags=["surgery", relation, method],
        library_name="transformers",
        license=licenses.pop() if len(licenses) == 1 and None not in licenses else None,
    )
    content = f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n"
    return ModelCard(content).content.encode()
