"""Provenance written next to every output: the ``surgery.json`` manifest and the content hashes it records
(the ``README.md`` model card is :mod:`surgery.cards`; :mod:`surgery.output` writes both with the weights).

The manifest names the inputs (with Hub revisions and SHA-256 content hashes, remembered between runs), the full
recipe, the seed and the surgery version; ``surgery merge --recipe OUT/surgery.json`` reproduces the output bit
for bit. It holds no timestamps or output paths, so identical runs write identical manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from surgery import __version__
from surgery.io.checkpoint import Checkpoint

HASH_CHUNK = 8 << 20
SNAPSHOT_REVISION = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
BLOB_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256_file(path: Path) -> str:
    # one reused buffer: a fresh 8 MB bytes per chunk, allocated on this worker thread, left hundreds of MB resident
    # in its malloc arena while a quantize ran beside it (peaks of 0.45-0.83 GB for the same run)
    digest, buffer = hashlib.sha256(), bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _hash_cache_path() -> Path:
    """Where known file hashes are remembered: $SURGERY_CACHE or ~/.cache/surgery, file sha256.json."""
    root = os.environ.get("SURGERY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery"
    return Path(root) / "sha256.json"


def content_hash(path: Path, cache: dict) -> str:
    """SHA-256 of a file's content, without reading it when that is already known.

    A Hub cache names LFS blobs by their SHA-256, so a snapshot's weights cost nothing; other files are hashed once
    and remembered by (path, size, modification time, inode) in ``cache``, like make and git remember theirs.

    Args:
        path: the file (symbolic links are followed).
        cache: known hashes by file key, updated with any hash computed.

    Returns:
        The hex digest.

    Example:
        ``content_hash(Path("out/model.safetensors"), {})``
    """
    resolved = path.resolve()
    if BLOB_SHA256.fullmatch(resolved.name) and resolved.parent.name == "blobs":
        return resolved.name
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    if key not in cache:
        cache[key] = _sha256_file(resolved)
    return cache[key]


def _load_cache(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(cache, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass  # a cache we cannot write only costs time next run


def hash_inputs_in_background(checkpoints: list[Checkpoint]) -> Future:
    """Start hashing every input file on a worker thread (hashlib releases the GIL).

    Args:
        checkpoints: the opened inputs.

    Returns:
        A future of the manifest's input records: source, Hub revision (None for a local input), file → SHA-256.

    Example::

        records = hash_inputs_in_background([ckpt]).result()   # [{"source": "org/m", "revision": "…", ...}]
    """
    pool = ThreadPoolExecutor(max_workers=1)

    def work() -> list[dict]:
        cache_file = _hash_cache_path()
        cache = _load_cache(cache_file)
        known = len(cache)
        records = []
        for ckpt in checkpoints:
            directory = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
            files = {name: content_hash(directory / name, cache) for name in ckpt.files()}
            match = SNAPSHOT_REVISION.search(str(ckpt.path))
            records.append({"source": ckpt.source, "revision": match.group(1) if match else None,
                            "sha256": files})
        if len(cache) != known:
            _save_cache(cache_file, cache)
        return records

    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def read_manifest(directory: Path) -> dict:
    """The ``surgery.json`` manifest every surgery output carries.

    Args:
        directory: the output directory.

    Returns:
        The manifest; {} when there is none (BadInput naming it when it is not a JSON object).

    Example::

        read_manifest(Path("merged")).get("command")   # "merge"
    """
    from surgery.io.safetensors_reader import read_json

    path = Path(directory) / "surgery.json"
    if not path.is_file():
        return {}
    return read_json(path, "the surgery.json manifest")


def manifest_bytes(command: str, recipe: dict, inputs: list[dict], outputs: dict | None = None) -> bytes:
    """The ``surgery.json`` manifest: no timestamps or output paths, so identical runs write identical bytes.

    Args:
        command: the command that made the output.
        recipe: everything that decides the output bytes.
        inputs: the input records of :func:`hash_inputs_in_background`.
        outputs: what was measured (the manifest's ``output``; left out when empty).

    Returns:
        The file's content (indented JSON, keys sorted, a final newline).

    Example::

        manifest_bytes("merge", recipe.to_dict(), hashes.result())
    """
    manifest = {"surgery_version": __version__, "command": command, "recipe": recipe, "inputs": inputs}
    if outputs:
        manifest["output"] = outputs
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def content_hashes(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of each file (several read at once), read only when not remembered from an earlier run.

    Args:
        paths: the files.

    Returns:
        Each path's hex digest; new hashes are remembered in the hash cache ($SURGERY_CACHE or ~/.cache/surgery).

    Example::

        hashes = content_hashes([Path("out/model.safetensors")])   # a rerun on unchanged files reads nothing
    """
    cache_file = _hash_cache_path()
    cache = _load_cache(cache_file)
    known = len(cache)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        hashes = dict(zip(paths, pool.map(lambda path: content_hash(path, cache), paths)))
    if len(cache) != known:
        _save_cache(cache_file, cache)
    return hashes
