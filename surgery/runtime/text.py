"""Calibration text: the checkpoint's tokenizer, text cut into blocks, blocks batched without padding::

    tokenizer = load_tokenizer(checkpoint)
    blocks = calibration_blocks(tokenizer, Path("notes.txt").read_text(), max_tokens=2048)
    for batch in equal_length_batches(blocks, batch_tokens=8192):
        model.get_decoder()(input_ids=batch, use_cache=False)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint

BLOCK_SIZE = 512


def has_tokenizer_files(files: dict[str, bytes]) -> bool:
    """Whether a checkpoint's auxiliary files include a tokenizer.

    Args:
        files: file name → content (:meth:`Checkpoint.auxiliary_files`).

    Returns:
        True when one of them is a tokenizer file.

    Example: ``has_tokenizer_files(checkpoint.auxiliary_files())``
    """
    return any(name.startswith("tokenizer") or name in ("vocab.json", "vocab.txt") for name in files)


def load_tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer, built by transformers from the files the checkpoint carries (for a GGUF file,
    the files transformers rebuilds from its vocabulary).

    Args:
        checkpoint: an open checkpoint.

    Returns:
        The tokenizer; BadInput when there are no tokenizer files or transformers cannot load them::

            tokenizer = load_tokenizer(checkpoint)
    """
    from transformers import AutoTokenizer

    files = checkpoint.auxiliary_files()
    if not has_tokenizer_files(files):
        raise BadInput(f"{checkpoint.source}: no tokenizer files, so calibration text cannot be tokenized")
    with tempfile.TemporaryDirectory(prefix="surgery-tokenizer-") as scratch:
        for name, content in files.items():
            (Path(scratch) / name).write_bytes(content)
        if checkpoint.config is not None:
            (Path(scratch) / "config.json").write_text(json.dumps(checkpoint.config))
        try:
            return AutoTokenizer.from_pretrained(scratch)
        except (OSError, ValueError) as err:
            raise BadInput(f"{checkpoint.source}: transformers cannot load its tokenizer "
                           f"({str(err).splitlines()[0]})") from None


def calibration_blocks(tokenizer, text: str, max_tokens: int, block_size: int = BLOCK_SIZE) -> list[torch.Tensor]:
    """The first ``max_tokens`` tokens of ``text`` as 1-D id blocks of up to ``block_size`` tokens.

    When the tokenizer starts a text with its BOS token (gemma's do), every block starts with it too.

    Args:
        tokenizer: a transformers tokenizer.
        text: the calibration text.
        max_tokens: tokens used in all.
        block_size: tokens per block.

    Returns:
        The blocks::

            blocks = calibration_blocks(tokenizer, Path("notes.txt").read_text(), max_tokens=2048)
            [len(block) for block in blocks]      # [512, 512, 512, 512]
    """
    ids = list(tokenizer(text)["input_ids"])
    prefix = [ids[0]] if ids and ids[0] == tokenizer.bos_token_id else []
    body = ids[len(prefix):]
    if max_tokens <= len(prefix) or block_size <= len(prefix):
        raise BadInput(f"calibration: max_tokens ({max_tokens}) and block_size ({block_size}) must exceed "
                       f"{len(prefix)}")
    if not body:
        raise BadInput("calibration: the text gives no tokens")
    step = block_size - len(prefix)
    blocks, total = [], 0
    for start in range(0, len(body), step):
        block = (prefix + body[start:start + step])[:max_tokens - total]
        if len(block) <= len(prefix):
            break
        blocks.append(torch.tensor(block, dtype=torch.long))
        total += len(block)
    return blocks


def equal_length_batches(blocks: list[torch.Tensor], batch_tokens: int) -> list[torch.Tensor]:
    """Blocks of equal length stacked together (no padding needed), up to ``batch_tokens`` tokens a batch.

    Args:
        blocks: 1-D id blocks.
        batch_tokens: tokens per batch at most (a longer block is a batch of its own).

    Returns:
        (blocks, length) batches, by length in order of first appearance::

            [batch.shape for batch in equal_length_batches(blocks, 1024)]    # [(2, 512), (2, 512), (1, 70)]
    """
    by_length: dict[int, list[torch.Tensor]] = {}
    for block in blocks:
        by_length.setdefault(block.numel(), []).append(block.reshape(-1))
    batches = []
    for length, same in by_length.items():
        per_batch = max(1, batch_tokens // length)
        batches.extend(torch.stack(same[start:start + per_batch]) for start in range(0, len(same), per_batch))
    return batches
