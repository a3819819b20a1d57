"""Writing an adapter directory: its tensors, its config, the ``surgery.json`` manifest and a model card with
``base_model_relation: adapter``, all at once (nothing appears until everything is written)::

    with opened_source("org/model") as source:
        write_adapter("out", source, tensors_file="adapter_model.safetensors", tensors={"prompt_embeddings": t},
                      files={"adapter_config.json": config_bytes}, recipe=recipe, method="prefix-tuning",
                      title="...", body="...")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from surgery.io import atomic_directory
from surgery.io.checkpoint import Checkpoint
from surgery.io.writer import write_tensor_file
from surgery.provenance import hash_inputs_in_background, manifest_bytes, model_card_bytes


def json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_adapter(output: str | Path, checkpoint: Checkpoint, *, tensors_file: str, tensors: dict[str, torch.Tensor],
                  files: dict[str, bytes], recipe: dict, measurements: dict, method: str, title: str, body: str,
                  library: str | None = None, force: bool = False,
                  check: Callable[[Path], None] | None = None) -> list[str]:
    """Write the adapter directory atomically; returns the names of the files written. ``measurements`` (numbers
    that the same inputs reproduce, no timings) go into the manifest's ``output``; ``check(staging)`` is the loader
    check the directory must pass before it appears (:mod:`surgery.io.loader_check`)."""
    hashes = hash_inputs_in_background([checkpoint])
    with atomic_directory(output, force=force, check=check) as staging:
        write_tensor_file(staging / tensors_file, tensors, {"format": "pt"})
        card = model_card_bytes(title=title, relation="adapter", method=method, checkpoints=[checkpoint], body=body)
        if library is not None:
            from huggingface_hub import ModelCard

            parsed = ModelCard(card.decode())
            parsed.data.library_name = library
            card = str(parsed).encode()
        everything = {**files, "surgery.json": manifest_bytes("adapter", recipe, hashes.result(), measurements),
                      "README.md": card}
        for name, content in everything.items():
            (staging / name).write_bytes(content)
        written = sorted(path.name for path in staging.iterdir())
    return written
