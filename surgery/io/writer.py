"""Write sharded safetensors checkpoints atomically, deterministically, one tensor in memory at a time.

The shard plan is made from names, dtypes and shapes alone (huggingface_hub's splitter, so names and index follow the
Hugging Face convention), then each shard is streamed: header first, then every tensor's bytes as the caller
produces it. The whole output is built in a hidden sibling directory and renamed into place at the end, so a failed
or killed run never leaves a half-written output behind::

    write_checkpoint("out", specs, load=lambda name: tensors[name], config=config, max_shard_size="5GB")
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import INDEX_FILE, TORCH_TO_SAFETENSORS, TensorInfo

DEFAULT_MAX_SHARD_SIZE = "5GB"
PARTIAL_MARK = ".partial-"
REPLACED_MARK = ".replaced-"


@dataclass
class WriteResult:
    """What was written: the directory, shard file → tensor names, and the total tensor bytes."""

    directory: Path
    shards: dict[str, list[str]]
    total_size: int
    files: list[str] = field(default_factory=list)


def plan_shards(specs: Iterable[TensorInfo], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Shard file name → the specs it holds, in the order given (Hugging Face's greedy splitter).

    Args:
        specs: every output tensor's name, dtype and shape.
        max_shard_size: the largest shard, in bytes or as ``"5GB"``-style text (BadInput when not positive).

    Returns:
        ``{"model-00001-of-00002.safetensors": [TensorInfo, ...], ...}`` (``model.safetensors`` when one shard).

    Example: ``plan_shards([TensorInfo("w", torch.float32, (4, 4))])   # {"model.safetensors": [TensorInfo(...)]}``
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    if isinstance(max_shard_size, int) and max_shard_size <= 0:
        raise BadInput(f"--max-shard-size {max_shard_size!r}: must be positive")
    by_name = {spec.name: spec for spec in specs}
    try:
        split = split_state_dict_into_shards_factory(
            by_name, get_storage_size=lambda spec: spec.nbytes, filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as err:
        raise BadInput(f"--max-shard-size {max_shard_size!r}: {err}") from None
    return {file: [by_name[name] for name in names] for file, names in split.filename_to_tensors.items()}


def _header(specs: list[TensorInfo], metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorInfo]]:
    """The safetensors header for ``specs`` and the order their data follows in.

    Like the reference serializer, data is ordered by decreasing element size (then name) so every tensor starts at
    an offset aligned to its dtype, and the header is padded with spaces to a multiple of 8 bytes. Metadata keys are
    sorted (the safetensors library writes them in hash-map order, so its bytes vary from run to run).
    """
    order = sorted(specs, key=lambda spec: (-spec.dtype.itemsize, spec.name))
    entries: dict[str, dict] = {"__metadata__": dict(sorted((metadata or {"format": "pt"}).items()))}
    offset = 0
    for spec in order:
        if spec.dtype not in TORCH_TO_SAFETENSORS:
            raise BadInput(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        entries[spec.name] = {
            "dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, order


AHEAD_BYTES = 256 << 20  # how many output bytes may be computed ahead of the one being written


def _produce(order: list[TensorInfo], load: Callable[[str], torch.Tensor],
             workers: int) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """``(spec, load(spec.name))`` in ``order``. With ``workers`` > 1 the following tensors are computed ahead on
    worker threads (torch releases the GIL) while their planned bytes stay under AHEAD_BYTES, so memory stays a
    few tensors, and a large tensor is computed alone."""
    if workers <= 1:
        for spec in order:
            yield spec, load(spec.name)
        return
    upcoming = deque(order)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()

        def top_up() -> None:
            while upcoming and len(pending) < workers and (
                    not pending or sum(s.nbytes for s, _ in pending) + upcoming[0].nbytes <= AHEAD_BYTES):
                spec = upcoming.popleft()
                pending.append((spec, pool.submit(load, spec.name)))

        try:
            top_up()
            while pending:
                spec, future = pending.popleft()
                result = future.result()
                top_up()
                yield spec, result
                del result
        finally:
            for _, future in pending:
                future.cancel()


def _write_shard(path: Path, header: bytes, tensors: Iterator[tuple[TensorInfo, torch.Tensor]], count: int,
                 progress: Callable[[int], None], after_header: Callable[[], None] = lambda: None) -> None:
    with open(path, "wb") as out:
        out.write(header)
        out.flush()
        after_header()
        for _ in range(count):
            spec, tensor = next(tensors)
            if tuple(tensor.shape) != spec.shape:
                raise RuntimeError(f"tensor {spec.name!r}: produced shape {tuple(tensor.shape)}, planned {spec.shape}")
            tensor = tensor.detach().to("cpu", spec.dtype).contiguous()
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            progress(spec.nbytes)
        out.flush()
        os.fsync(out.fileno())


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Have ``write(temporary)`` fill a temporary file beside ``path``, then rename it over ``path``: readers see
    the old file or the new one, never part of one.

    Args:
        path: the file to write (its parent directories are created).
        write: fills the temporary file it is given (a ``Path``).

    Example::

        write_file_atomic("report.json", lambda temporary: temporary.write_text("{}"))
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    except OSError as err:
        raise BadInput(f"{path}: cannot write there ({err.strerror})") from None
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One small safetensors file (held in memory), written atomically (``write_file_atomic``). Same tensors and
    metadata → same bytes.

    Args:
        path: the ``.safetensors`` file to write.
        tensors: name → tensor.
        metadata: the header's ``__metadata__`` (written with sorted keys).

    Example::

        write_tensor_file("stats.safetensors", {"a": torch.ones(3)}, {"format": "my-format/1"})
    """
    specs = [TensorInfo(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    header, order = _header(specs, metadata)
    write_file_atomic(path, lambda temporary: _write_shard(
        temporary, header, ((spec, tensors[spec.name]) for spec in order), len(order), lambda nbytes: None))


def shard_headers(shards: dict[str, list[TensorInfo]]) -> dict[str, tuple[bytes, list[TensorInfo]]]:
    """Shard file → (its safetensors header, its specs in data order), for a plan from :func:`plan_shards`.

    Args:
        shards: shard file → its specs, as :func:`plan_shards` returns them.

    Returns:
        Shard file → ``(header bytes, specs in data order)``: what :func:`write_shard_file` takes.

    Example: ``header, order = shard_headers(plan_shards(specs))["model.safetensors"]``
    """
    return {file: _header(shard_specs) for file, shard_specs in shards.items()}


def write_shard_file(path: str | Path, header: bytes, order: list[TensorInfo], load: Callable[[str], torch.Tensor],
                     *, workers: int = 1, progress: Callable[[int], None] = lambda nbytes: None,
                     after_header: Callable[[], None] = lambda: None) -> None:
    """Write one shard of :func:`write_checkpoint` on its own (a worker's share of the output): ``header`` and
    ``order`` from :func:`shard_headers`, ``load(name)`` for each tensor. The bytes are those ``write_checkpoint``
    writes for that shard. Atomic (a temporary file beside ``path``, renamed over it), so a retried worker simply
    replaces its shard. ``after_header`` runs once the header is on disk (tests use it to kill a worker mid-shard).

    Args:
        path: the shard file to write.
        header: the shard's safetensors header bytes.
        order: the shard's specs in data order.
        load: name → the tensor to store (cast to its planned dtype).
        workers: how many tensors to compute ahead on threads.
        progress: called with each tensor's bytes once written.
        after_header: called once the header is on disk.

    Example::

        header, order = shard_headers(plan_shards(specs))["model-00001-of-00003.safetensors"]
        write_shard_file(staging / "model-00001-of-00003.safetensors", header, order, merger)
    """
    def write(temporary: Path) -> None:
        tensors = _produce(order, load, workers)
        try:
            _write_shard(temporary, header, tensors, len(order), progress, after_header)
        finally:
            tensors.close()

    write_file_atomic(path, write)


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_checkpoint(
    directory: str | Path,
    specs: Iterable[TensorInfo],
    load: Callable[[str], torch.Tensor],
    *,
    config: dict | None = None,
    files: dict[str, bytes] | Callable[[], dict[str, bytes]] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: Callable[[int], None] = lambda nbytes: None,
    workers: int = 1,
    write_shards: Callable[[Path, dict[str, tuple[bytes, list[TensorInfo]]]], None] | None = None,
    check: Callable[[Path], None] | None = None,
) -> WriteResult:
    """Write a checkpoint directory: safetensors shards (+ index when sharded), ``config.json`` and ``files``
    (name → content, or a function returning them, called once the tensors are written).

    ``specs`` fixes the name, dtype and shape of every output tensor; ``load(name)`` is called once per tensor, in
    shard order (``workers`` > 1 computes that many ahead on threads), and its result is cast to the planned dtype.
    Same specs and tensors → byte-identical files.
    An existing ``directory`` is an error unless ``force``; it is then replaced only once the new one is complete.

    ``write_shards(staging, headers)``, when given, writes the shards instead (``load`` is then unused): ``headers``
    is shard file → (header, specs in data order), and each shard must end up as ``staging / file``, written with
    :func:`write_shard_file` (how the Ray executor spreads shards over a cluster: the same bytes).

    ``check(staging)`` runs on the complete output before it appears (:func:`atomic_directory`): commands pass
    :func:`surgery.io.loader_check.check_transformers`. The file system must have room for the tensors (BadInput
    before anything is computed otherwise).

    Args:
        directory: the output directory.
        specs: every output tensor's name, dtype and shape.
        load: name → the tensor to store.
        config: written as ``config.json`` when given.
        files: other files, name → bytes (or a function returning them).
        max_shard_size: the largest shard (bytes or ``"5GB"``-style text).
        force: replace an existing output.
        progress: called with each tensor's bytes once written.
        workers: how many tensors to compute ahead on threads.
        write_shards: writes the shards instead, ``(staging, headers)``.
        check: runs on the complete staging directory before it is renamed into place.

    Returns:
        The :class:`WriteResult`: directory, shard file → tensor names, total bytes, the files written.

    Example: ``write_checkpoint("out", specs, load=lambda name: tensors[name], config=config, max_shard_size="5GB")``
    """
    specs = list(specs)
    shards = plan_shards(specs, max_shard_size)
    total_size = sum(spec.nbytes for spec in specs)
    directory = Path(directory).expanduser()
    headers = shard_headers(shards)
    order = [spec for header, shard_order in headers.values() for spec in shard_order]
    with atomic_directory(directory, force=force, check=check, needed_bytes=total_size) as staging:
        if write_shards is not None:
            write_shards(staging, headers)
            missing = [file for file in headers if not (staging / file).is_file()]
            if missing:
                raise RuntimeError(f"shards not written: {', '.join(missing)}")
        else:
            tensors = _produce(order, load, workers)
            try:
                for file, (header, shard_order) in headers.items():
                    _write_shard(staging / file, header, tensors, len(shard_order), progress)
            finally:
                tensors.close()
        extra = dict((files() if callable(files) else files) or {})
        if len(shards) > 1:
            weight_map = {spec.name: file for file, shard_specs in shards.items() for spec in shard_specs}
            extra[INDEX_FILE] = _json_bytes({"metadata": {"total_size": total_size}, "weight_map": weight_map})
        if config is not None:
            extra["config.json"] = _json_bytes(config)
        for name, content in extra.items():
            (staging / name).write_bytes(content)
        written = sorted(path.name for path in staging.iterdir())
    return WriteResult(directory, {file: [s.name for s in ss] for file, ss in shards.items()}, total_size, written)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(candidate: Path, prefix: str) -> bool:
    """Whether the process that named ``candidate`` ``prefix + PID-...`` is gone."""
    pid_text = candidate.name[len(prefix):].split("-", 1)[0]
    return pid_text.isdigit() and not _process_alive(int(pid_text))


def _remove_abandoned(directory: Path) -> None:
    """Clean up after killed runs beside ``directory``: delete their staging directories, and where a run was killed
    between moving the old output aside and moving the new one in, put the old output back."""
    partial = f".{directory.name}{PARTIAL_MARK}"
    for candidate in directory.parent.glob(f"{partial}*"):
        if _dead(candidate, partial):
            shutil.rmtree(candidate, ignore_errors=True)
    replaced = f".{directory.name}{REPLACED_MARK}"
    for candidate in directory.parent.glob(f"{replaced}*"):
        if not _dead(candidate, replaced):
            continue
        old = candidate / directory.name
        if old.exists() and not directory.exists():
            os.rename(old, directory)
        shutil.rmtree(candidate, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What marks a directory as an output that --force may replace: weights (a checkpoint, an adapter), or a surgery
# output's manifest. A config.json alone does not.
OUTPUT_MARKERS = ("surgery.json", "adapter_config.json", INDEX_FILE, "sweep.json")
OUTPUT_SUFFIXES = (".safetensors", ".gguf")


def replaceable(directory: Path) -> bool:
    """Whether ``--force`` may replace ``directory``: it is empty, or holds a checkpoint or an earlier output.

    Args:
        directory: an existing directory.

    Returns:
        True when it is empty or holds safetensors/GGUF files, an index, or a surgery, adapter or sweep manifest.

    Example: ``replaceable(Path("out"))   # False for a directory of the user's own notes``
    """
    entries = list(directory.iterdir())
    return not entries or any(entry.name in OUTPUT_MARKERS or entry.suffix in OUTPUT_SUFFIXES for entry in entries)


def check_output_available(directory: str | Path, force: bool = False) -> Path:
    """Fail early (BadInput) when ``directory`` exists and may not be replaced; returns it as an absolute path
    (``~`` expanded). Killed runs' leftovers beside it are cleaned up first (:func:`_remove_abandoned`). With
    ``force`` only a directory holding a checkpoint (or an earlier output, or nothing) is replaced: a directory of
    the user's own files never is.

    Args:
        directory: the output directory.
        force: whether an existing output may be replaced.

    Returns:
        The absolute output path.

    Example: ``output = check_output_available("~/models/out", force=True)``
    """
    directory = Path(directory).expanduser().absolute()
    if directory.parent.is_dir():
        _remove_abandoned(directory)  # first restore an output a killed run left moved aside
    if directory.exists() and not force:
        raise BadInput(f"{directory}: already exists (pass --force to replace it)")
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"{directory}: exists and is not a directory")
    if directory.exists() and not replaceable(directory):
        raise BadInput(f"{directory}: holds no checkpoint or surgery output, so --force does not replace it "
                       "(choose another output directory)")
    return directory


def _no_space(directory: Path, needed: int | None) -> BadInput:
    free = shutil.disk_usage(_existing_parent(directory)).free
    wanted = f"{needed / 1e9:.2f} GB needed, " if needed else ""
    return BadInput(f"{directory}: no space left on the device ({wanted}{free / 1e9:.2f} GB free)")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_free_space(directory: str | Path, needed: int) -> None:
    """BadInput naming ``directory`` when its file system has less than ``needed`` bytes free."""
    directory = Path(directory).expanduser().absolute()
    if shutil.disk_usage(_existing_parent(directory)).free < needed:
        raise _no_space(directory, needed)


@contextmanager
def atomic_directory(directory: str | Path, force: bool = False, *, check: Callable[[Path], None] | None = None,
                     needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a hidden staging directory beside ``directory``; on success it is renamed to ``directory``.

    ``check(staging)``, when given, runs once the body has written everything and before the rename (the loader
    checks of :mod:`surgery.io.loader_check`): if it raises, nothing appears. On any error (or KeyboardInterrupt)
    the staging directory is deleted and ``directory`` is left as it was. A run killed outright leaves only hidden
    directories, which the next run beside it cleans up (restoring the old output if the kill came mid-swap). A full
    disk is a one-line BadInput naming the output and the space ``needed_bytes``.

    Args:
        directory: the output directory.
        force: replace an existing output (see :func:`check_output_available`).
        check: runs on the staging directory before the rename.
        needed_bytes: the space the output needs (BadInput before anything is written when less is free).

    Yields:
        The staging directory to write into.

    Example::

        with atomic_directory("out", force=True, check=check_transformers) as staging:
            (staging / "config.json").write_text("{}")
    """
    directory = check_output_available(directory, force)
    if needed_bytes:
        _check_free_space(directory, needed_bytes)
    created = _first_missing(directory.parent)  # removed again if the output does not appear
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"{directory.parent}: cannot create the output's parent directory ({err.strerror})") from None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{PARTIAL_MARK}{os.getpid()}-", dir=directory.parent))
    except OSError as err:
        _remove_empty_tree(created)
        raise BadInput(f"{directory.parent}: cannot write there ({err.strerror})") from None
    try:
        yield staging
        if check is not None:
            check(staging)
        os.chmod(staging, 0o777 & ~_umask())
        _fsync_directory(staging)
        if directory.exists() and not force:
            raise BadInput(f"{directory}: appeared while this run was writing (pass --force to replace it)")
        if directory.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f".{directory.name}{REPLACED_MARK}{os.getpid()}-",
                                             dir=directory.parent))
            os.rename(directory, replaced / directory.name)
            os.rename(staging, directory)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, directory)
        _fsync_directory(directory.parent)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_tree(created)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(directory, needed_bytes) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_tree(created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None when it all exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _remove_empty_tree(path: Path | None) -> None:
    """Remove ``path`` and the directories under it, only as far as they hold nothing else."""
    if path is None or not path.is_dir():
        return
    for root, _, files in os.walk(path, topdown=False):
        if not files:
            try:
                os.rmdir(root)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
