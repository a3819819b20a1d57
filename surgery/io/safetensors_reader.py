"""Read safetensors checkpoints lazily: a model directory (single file or sharded index) or one ``.safetensors`` file.

Headers are validated by the safetensors library when a file is opened (truncation, overlapping offsets, unknown
dtypes, oversized headers...); data is memory-mapped and read one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from surgery.errors import BadInput
from surgery.io.checkpoint import INDEX_FILE, SAFETENSORS_DTYPES, Checkpoint, TensorInfo, natural_key
from surgery.io.config_check import validate_config

SINGLE_FILE = "model.safetensors"

# Files that belong to a model besides its weights and config, carried over to every output.
AUXILIARY_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON object from ``path`` or raise a one-line :class:`BadInput` naming it.

    Args:
        path: the JSON file.
        what: what the file is, for the messages (``"config.json"``).

    Returns:
        The parsed object (BadInput when missing, not JSON, or not an object).

    Example: ``read_json(directory / "config.json", "config.json")["model_type"]``
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} is missing") from None
    except RecursionError:
        raise BadInput(f"{path}: {what} is nested too deeply to be a {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}: {what} must be a JSON object, found {type(value).__name__}")
    return value


def _read_shard_index(directory: Path) -> dict[str, str]:
    """tensor name → shard file name from ``directory``'s index: BadInput unless every shard is a plain file name
    inside ``directory`` (no absolute path, no ``..``: a checkpoint never reads outside its directory)."""
    index_path = directory / INDEX_FILE
    weight_map = read_json(index_path, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInput(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise BadInput(f"{index_path}: tensor {name!r} maps to {shard!r}, not a shard file name")
        parts = Path(shard).parts
        if (Path(shard).is_absolute() or "\\" in shard or ".." in parts or not shard.endswith(".safetensors")
                or any(len(part.encode()) > 255 for part in parts)):
            raise BadInput(f"{index_path}: shard {shard!r} of tensor {name!r} is not a .safetensors file inside "
                           f"{directory}")
    return weight_map


class SafetensorsCheckpoint(Checkpoint):
    """A checkpoint stored as one or more safetensors files."""

    format = "safetensors"

    def __init__(self, source: str, path: Path):
        self.source = source
        self.path = path
        self._handles: dict[Path, object] = {}
        try:
            self.directory = path if path.is_dir() else path.parent
            config_path = self.directory / "config.json"
            self.config = read_json(config_path, "config.json") if path.is_dir() or config_path.exists() else None
            if self.config is not None and not path.is_dir() and "model_type" not in self.config:
                self.config = None  # a lone file beside some other config.json: not its model's
            if self.config is not None:
                validate_config(self.config, str(config_path))
            shard_of = self._shard_map(path) if path.is_dir() else None
            self.tensors = self._read_headers(path, shard_of)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _shard_map(directory: Path) -> dict[str, str] | None:
        """tensor → shard file from the index, or None for a single ``model.safetensors``."""
        if (directory / INDEX_FILE).exists():
            return _read_shard_index(directory)
        if (directory / SINGLE_FILE).exists():
            return None
        raise BadInput(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} in this directory")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                present = file.is_file()
            except OSError as err:  # a name the file system cannot hold
                raise BadInput(f"{file}: cannot be read ({err.strerror})") from None
            if not present:
                raise BadInput(f"{file}: shard file is missing")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise BadInput(f"{file}: not a valid safetensors file ({err})") from None
        return self._handles[file]

    def _describe(self, file: Path, name: str) -> TensorInfo:
        view = self._open(file).get_slice(name)
        dtype_code = view.get_dtype()
        if dtype_code not in SAFETENSORS_DTYPES:
            raise BadInput(f"{file}: tensor {name!r} has dtype {dtype_code}, which torch cannot represent")
        return TensorInfo(name, SAFETENSORS_DTYPES[dtype_code], tuple(view.get_shape()),
                          file.relative_to(self.directory).as_posix())

    def _read_headers(self, path: Path, shard_of: dict[str, str] | None) -> dict[str, TensorInfo]:
        """Every tensor's TensorInfo; ``file`` is where its header was read, and where :meth:`get` reads it."""
        infos: dict[str, TensorInfo] = {}
        if shard_of is None:
            file = path / SINGLE_FILE if path.is_dir() else path
            for name in self._open(file).keys():
                infos[name] = self._describe(file, name)
        else:
            for shard in sorted(set(shard_of.values())):
                file = path / shard
                present = set(self._open(file).keys())
                for name in sorted(name for name, s in shard_of.items() if s == shard):
                    if name not in present:
                        raise BadInput(f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not in this shard")
                    infos[name] = self._describe(file, name)
        return {name: infos[name] for name in sorted(infos, key=natural_key)}

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self._open(self.directory / info.file).get_tensor(name)

    def files(self) -> dict[str, int]:
        return {file.relative_to(self.directory).as_posix(): file.stat().st_size for file in sorted(self._handles)}

    def auxiliary_files(self) -> dict[str, bytes]:
        return {
            name: (self.directory / name).read_bytes()
            for name in AUXILIARY_FILES
            if (self.directory / name).is_file()
        }

    def close(self) -> None:
        self._handles.clear()
