"""Integer packing shared by the formats: unsigned ``bits``-bit fields in int32 words, LSB-first::

    words = pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)   # int32 (1, 1)
    unpack(words, 4)                                            # [[1, 2, 3, 4, 5, 6, 7, 8]]
"""

from __future__ import annotations

import sys

import torch


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values (any int dtype, last dim a multiple of 32/bits) → int32, LSB-first along the
    last dim.

    Args:
        values: the unsigned fields.
        bits: 4 or 8.

    Returns:
        int32 words, the last dim divided by 32 / bits.

    Example: ``pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)   # tensor([[-2023406815]], dtype=torch.int32)``
    """
    per_word = 32 // bits
    rows = values.shape[:-1]
    if bits in (4, 8) and sys.byteorder == "little":
        # a little-endian int32's first byte is its lowest: bytes of two 4-bit fields (low one first) are the words
        fields = values.to(torch.uint8)
        if bits == 4:
            pairs = fields.reshape(*rows, -1, 2)
            fields = pairs[..., 0] | (pairs[..., 1] << 4)
        return fields.contiguous().view(torch.int32)
    fields = values.to(torch.int64).reshape(*rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (fields << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unsigned_fields(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed grid values (int8, in [−2^(b−1), 2^(b−1) − 1]) → their unsigned fields q + 2^(b−1), as uint8 (what
    :func:`pack` stores; uint8 addition wraps, so 8-bit values need no wider type).

    Args:
        q: int8 values on a ``bits``-bit signed grid.
        bits: 4 or 8.

    Returns:
        uint8 fields of the same shape.

    Example: ``unsigned_fields(torch.tensor([-8, 0, 7], dtype=torch.int8), 4)   # tensor([0, 8, 15], uint8)``
    """
    return q.view(torch.uint8) + (1 << (bits - 1))


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words → unsigned values (int32), LSB-first along the last dim (inverse of :func:`pack`).

    Args:
        words: int32 words.
        bits: 4 or 8.

    Returns:
        int32 fields, the last dim multiplied by 32 / bits.

    Example: ``unpack(pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4), 4)   # [[1, 2, 3, 4, 5, 6, 7, 8]] (int32)``
    """
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*words.shape[:-1], -1).to(torch.int32)


def pad_rows(values: torch.Tensor, multiple: int) -> torch.Tensor:
    """``values`` with zero rows appended up to a multiple of ``multiple`` rows.

    Args:
        values: the tensor to pad along its first dim.
        multiple: the row count to round up to a multiple of.

    Returns:
        ``values`` itself when its rows are already a multiple, else a padded copy.

    Example: ``pad_rows(torch.ones(3, 2), 4).shape   # torch.Size([4, 2])``
    """
    extra = -values.shape[0] % multiple
    return torch.cat([values, values.new_zeros(extra, *values.shape[1:])]) if extra else values
