"""What every output carries besides its weights, written with them in one atomic directory: the ``surgery.json``
manifest (inputs with their content hashes, the recipe, what was measured) and the ``README.md`` model card.

An :class:`OutputRecord` is started as soon as the inputs are open, so their files are hashed on a worker thread
while the weights are computed. A checkpoint written by :func:`surgery.io.write_checkpoint` takes the record's
:meth:`OutputRecord.files` among its files; any other output (a GGUF file, an adapter) is written by
:func:`write_output`::

    record = OutputRecord("quantize", [ckpt])
    write_output("out", record, lambda staging: write_weights(staging), recipe=recipe,
                 card=lambda measured: Card("title", "quantized", "quantize-rtn", body(measured)),
                 check=lambda staging: check_gguf(staging / "model-Q8_0.gguf"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from surgery.cards import Card, model_card_bytes
from surgery.io.checkpoint import Checkpoint
from surgery.io.writer import atomic_directory
from surgery.provenance import hash_inputs_in_background, manifest_bytes

__all__ = ["Card", "OutputRecord", "write_output"]

MANIFEST = "surgery.json"
CARD = "README.md"


class OutputRecord:
    """How an output was made: the command and its inputs, hashed in the background from the moment it is made.

    Args:
        command: the command that makes the output (merge, quantize, extend, adapter).
        inputs: the opened input checkpoints (their files are hashed; Hub snapshots cost nothing).

    Example::

        record = OutputRecord("extend", [ckpt])
        files = record.files({"rope": "yarn"}, Card("title", None, "rope-yarn", "body"), {"rope": intended})
        sorted(files)   # ["README.md", "surgery.json"]
    """

    def __init__(self, command: str, inputs: Sequence[Checkpoint]):
        self.command = command
        self.inputs = list(inputs)
        self._hashes = hash_inputs_in_background(self.inputs)

    def files(self, recipe: dict, card: Card, measurements: dict | None = None) -> dict[str, bytes]:
        """The manifest and the card (waits for the input hashes).

        Args:
            recipe: everything that decides the output bytes.
            card: what the model card says.
            measurements: numbers the same inputs reproduce (no timings): the manifest's ``output``.

        Returns:
            ``{"surgery.json": ..., "README.md": ...}``.

        Example::

            aux |= record.files(recipe.to_dict(), Card("A ties merge", "merge", "ties", body))
        """
        return {MANIFEST: manifest_bytes(self.command, recipe, self._hashes.result(), measurements),
                CARD: model_card_bytes(card, self.inputs)}


def write_output(output: str | Path, record: OutputRecord, write: Callable[[Path], dict | None], *, recipe: dict,
                 card: Card | Callable[[dict | None], Card], force: bool = False,
                 check: Callable[[Path], None] | None = None) -> list[str]:
    """Write an output directory atomically: ``write(staging)`` writes the weights and returns the measurements,
    then the manifest and card follow, then ``check(staging)`` (the loader check) runs; nothing appears unless all
    of it succeeds.

    Args:
        output: the output directory (an existing one is replaced only with ``force``).
        record: the record started when the inputs were opened.
        write: writes everything but the manifest and card into the staging directory; returns the measurements
            (or None).
        recipe: everything that decides the output bytes.
        card: the card, or a function making it from the measurements.
        force: replace an existing output (once the new one is complete).
        check: the loader check the staging directory must pass (:mod:`surgery.io.loader_check`).

    Returns:
        The names of the files written, sorted.

    Example::

        write_output("adapter", OutputRecord("adapter", [ckpt]), lambda staging: write_tensors(staging),
                     recipe=recipe, card=Card("title", "adapter", "prefix-tuning", "body", library="peft"))
    """
    with atomic_directory(output, force=force, check=check) as staging:
        measured = write(staging)
        described = card(measured) if callable(card) else card
        for name, content in record.files(recipe, described, measured).items():
            (staging / name).write_bytes(content)
        written = sorted(path.name for path in staging.iterdir())
    return written
