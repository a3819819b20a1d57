"""Writing an adapter directory: its tensors, its config, the ``surgery.json`` manifest and a model card with
``base_model_relation: adapter``, all at once (nothing appears until everything is written)::

    with open_checkpoint("org/model") as checkpoint:
        write_adapter("out", checkpoint, tensors_file="adapter_model.safetensors", tensors={"prompt_embeddings": t},
                      files={"adapter_config.json": config_bytes}, recipe=recipe, measurements={"prompt_tokens": 812},
                      method="prefix-tuning", library="peft", title="...", body="...")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from surgery.io.checkpoint import Checkpoint
from surgery.io.writer import write_tensor_file
from surgery.output import Card, OutputRecord, write_output


def json_bytes(value: dict) -> bytes:
    """A JSON file's bytes as every surgery output writes them (indented, keys sorted, a final newline).

    Args:
        value: the JSON object.

    Returns:
        The file's content.

    Example::

        json_bytes({"b": 1, "a": 2})   # b'{\\n  "a": 2,\\n  "b": 1\\n}\\n'
    """
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def base_model_reference(source: str) -> str:
    """What an adapter records as its base model: a Hub repo id as given, a local model as its absolute path (a
    relative one would name another model, or none, from anywhere else).

    Args:
        source: the base model as the user named it.

    Returns:
        The reference for ``base_model_name_or_path``.

    Example: ``base_model_reference("org/model")`` is ``"org/model"``; ``base_model_reference("models/base")`` its
    absolute path
    """
    from surgery.io.sources import looks_like_repo_id

    path = Path(source).expanduser()
    return source if looks_like_repo_id(source) and not path.exists() else str(path.resolve())


def write_adapter(output: str | Path, checkpoint: Checkpoint, *, tensors_file: str, tensors: dict[str, torch.Tensor],
                  files: dict[str, bytes], recipe: dict, measurements: dict, method: str, title: str, body: str,
                  library: str | None = None, force: bool = False,
                  check: Callable[[Path], None] | None = None) -> list[str]:
    """Write the adapter directory atomically (:func:`surgery.output.write_output`).

    Args:
        output: the adapter directory.
        checkpoint: the base model, opened (hashed for the manifest; its card gives the license).
        tensors_file: the safetensors file the tensors go to.
        tensors: the adapter's tensors.
        files: other files (name → content), such as the adapter's config.
        recipe: everything that decides the adapter's bytes.
        measurements: numbers that the same inputs reproduce (no timings): the manifest's ``output``.
        method: the card's method tag.
        title: the card's title.
        body: the card's body.
        library: the card's library_name when not transformers.
        force: replace an existing output.
        check: the loader check the directory must pass before it appears (:mod:`surgery.io.loader_check`).

    Returns:
        The names of the files written, sorted.

    Example: see the module's.
    """
    def write(staging: Path) -> dict:
        write_tensor_file(staging / tensors_file, tensors, {"format": "pt"})
        for name, content in files.items():
            (staging / name).write_bytes(content)
        return measurements

    return write_output(output, OutputRecord("adapter", [checkpoint]), write, recipe=recipe, force=force, check=check,
                        card=Card(title, "adapter", method, body, library))
