"""MXFP4 (OCP Microscaling v1.0): blocks of 32 values in FP4 E2M1 sharing one power-of-two scale (E8M0)::

    codes, exponents = mxfp4_quantize(weight)          # weight (..., n), n a multiple of 32
    blocks = pack_fp4(codes)                           # uint8 (..., n / 32, 16): two codes a byte, low nibble first
    scales = (exponents + 127).to(torch.uint8)         # E8M0: the exponent plus 127
    approx = mxfp4_dequantize(codes, exponents)        # float32, shaped like weight
    decode_experts(blocks, scales)                     # gpt-oss's (experts, outputs, ...) pair → (E, in, out)

The scale of a block is 2^(⌊log₂ max|x|⌋ − 2) (the spec's rule: 2 is E2M1's largest exponent); each value x / scale
rounds to the nearest E2M1 value (ties to the even code), saturating at ±6.
"""

from __future__ import annotations

import torch

BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative value
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # halfway between neighbouring magnitudes
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose upper neighbour has the even code
E8M0_BIAS = 127


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes of ``values`` already divided by their scale: nearest value, ties to the even code,
    saturating at ±6.

    Args:
        values: any float tensor.

    Returns:
        uint8 codes shaped like ``values`` (0..15, bit 3 the sign).

    Example: ``e2m1_codes(torch.tensor([0.3, -2.6, 7.0]))   # tensor([1, 13, 7], dtype=torch.uint8)``
    """
    magnitude = values.abs()
    code = (values < 0).to(torch.uint8).mul_(8)
    # the code counts the midpoints below the magnitude (7 comparisons: 5× faster than torch.bucketize); a tie
    # counts where the upper neighbour has the even code
    for midpoint in _MIDPOINTS:
        code += (magnitude >= midpoint) if midpoint in _TIES_UP else (magnitude > midpoint)
    return code


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The values of E2M1 codes.

    Args:
        codes: uint8 codes (0..15).

    Returns:
        float32 values shaped like ``codes``.

    Example: ``e2m1_values(torch.tensor([1, 13, 7]))   # tensor([0.5, -3.0, 6.0])``
    """
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of ``weight``'s blocks of 32 along its last dimension (which 32 must divide: the caller checks).

    Args:
        weight: a float tensor (..., n).

    Returns:
        (codes uint8 shaped like ``weight``, the blocks' exponents int32 (..., n / 32)).

    Example: ``codes, exponents = mxfp4_quantize(torch.randn(8, 64))   # (8, 64), (8, 2)``
    """
    blocks = weight.float().reshape(*weight.shape[:-1], -1, BLOCK)
    peak = blocks.abs().amax(dim=-1)
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak.clamp(min=torch.finfo(torch.float32).tiny))) - 2,
                           torch.full_like(peak, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)
    codes = e2m1_codes(blocks / torch.exp2(exponent.float()).unsqueeze(-1))
    return codes.reshape(weight.shape), exponent


def mxfp4_dequantize(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """The weight MXFP4 codes and block exponents stand for.

    Args:
        codes: uint8 E2M1 codes (..., n).
        exponents: integer block exponents (..., n / 32).

    Returns:
        float32 (..., n).

    Example: ``approx = mxfp4_dequantize(*mxfp4_quantize(weight))``
    """
    values = e2m1_values(codes).reshape(*codes.shape[:-1], -1, BLOCK)
    return (values * torch.exp2(exponents.float()).unsqueeze(-1)).reshape(codes.shape)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte: element 2i in the low nibble of byte i, 2i + 1 in the high (gpt-oss's ``_blocks``).

    Args:
        codes: uint8 codes (..., n), n a multiple of 32.

    Returns:
        uint8 (..., n / 32, 16).

    Example: ``pack_fp4(torch.zeros(4, 64, dtype=torch.uint8)).shape   # (4, 2, 16)``
    """
    pairs = codes.reshape(*codes.shape[:-1], -1, BLOCK // 2, 2).to(torch.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(blocks: torch.Tensor) -> torch.Tensor:
    """The codes :func:`pack_fp4` packed.

    Args:
        blocks: uint8 (..., n / 32, 16).

    Returns:
        uint8 codes (..., n).

    Example: ``torch.equal(unpack_fp4(pack_fp4(codes)), codes)   # True``
    """
    low, high = blocks & 0x0F, blocks >> 4
    return torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-2], -1)


def decode_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor gpt-oss's ``_blocks`` / ``_scales`` pair stands for, decoded one expert at a time (the float32
    temporaries are one expert's).

    Args:
        blocks: uint8 (experts, outputs, inputs / 32, 16).
        scales: uint8 E8M0 (experts, outputs, inputs / 32).
        dtype: the result's dtype.

    Returns:
        (experts, inputs, outputs) in ``dtype``, as the model's parameter.

    Example: ``decode_experts(ckpt.get(name + "_blocks"), ckpt.get(name + "_scales")).shape   # (E, in, out)``
    """
    experts, outputs, groups, _ = blocks.shape
    decoded = torch.empty(experts, groups * BLOCK, outputs, dtype=dtype)
    for expert in range(experts):
        decoded[expert] = mxfp4_dequantize(unpack_fp4(blocks[expert]), scales[expert].to(torch.int32) - E8M0_BIAS).T
    return decoded
