"""``--preset NAME``: compressed-tensors' scheme names (what llm-compressor users know) → the format, bits, group
size and scheme that write them::

    QuantizeConfig("org/model", "model-fp8", preset="FP8_DYNAMIC").format   # "fp8-dynamic"
    preset_options("W4A16")   # {"format": "compressed-tensors", "bits": 4, "group_size": 128, "scheme": "sym"}

Presets whose activation scales are static (``FP8``, ``NVFP4``) need calibration data to set them, so they are
refused, naming the data-free preset next to them.
"""

from __future__ import annotations

from surgery.errors import BadInput

PRESETS: dict[str, dict] = {
    "W4A16": {"format": "compressed-tensors", "bits": 4, "group_size": 128, "scheme": "sym"},
    "W4A16_ASYM": {"format": "compressed-tensors", "bits": 4, "group_size": 128, "scheme": "asym"},
    "W8A16": {"format": "compressed-tensors", "bits": 8, "group_size": 128, "scheme": "sym"},
    "FP8_DYNAMIC": {"format": "fp8-dynamic", "bits": 8, "scheme": "sym"},
    "FP8_BLOCK": {"format": "fp8-block", "bits": 8, "scheme": "sym"},
    "NVFP4A16": {"format": "nvfp4a16", "bits": 4, "scheme": "sym"},
    "MXFP4A16": {"format": "mxfp4a16", "bits": 4, "scheme": "sym"},
}
STATIC_ACTIVATIONS = {
    "FP8": "FP8_DYNAMIC (the same FP8 E4M3 weights, per output channel, with activations scaled per token at run "
           "time)",
    "NVFP4": "NVFP4A16 (the same NVFP4 weights, activations in the model dtype)",
}


def preset_options(name: str) -> dict:
    """The QuantizeConfig fields preset ``name`` sets.

    Args:
        name: a compressed-tensors preset name (case-insensitive).

    Returns:
        ``{"format": ..., "bits": ..., ...}``; BadInput naming --preset for one this tool does not write.

    Example::

        preset_options("fp8_block")["format"]   # "fp8-block"
    """
    key = name.upper()
    if key in STATIC_ACTIVATIONS:
        raise BadInput(f"--preset {name}: its static activation scales need calibration data, which quantize does "
                       f"not take; use --preset {STATIC_ACTIVATIONS[key]}")
    if key not in PRESETS:
        raise BadInput(f"--preset {name!r}: expected {', '.join(PRESETS)}")
    return PRESETS[key]


__all__ = ["PRESETS", "preset_options"]
