"""Validate the fields of a model config that surgery and the loaders compute with, where the config is read.

Every reader calls :func:`validate_config` once, so a ``hidden_size`` of 1.5, ``num_attention_heads: 0``, a size of
2^63 or ``tie_word_embeddings: "yes"`` is a one-line BadInput naming the file and the key — not arithmetic on
nonsense later, nor a crash deep inside transformers::

    validate_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, "model/config.json")

Only the generic fields are checked (the same keys across families, also inside ``text_config`` and the other
sub-configs of multimodal models); family-specific ones are left to transformers.
"""

from __future__ import annotations

import math
from typing import Any

from surgery.errors import BadInput

MAX_SIZE = 1 << 31  # larger than any real dimension, and small enough that products of a few stay exact

POSITIVE_SIZES = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "original_max_position_embeddings", "head_dim", "n_embd", "n_layer",
    "n_head", "n_positions",
)
BOOLEANS = ("tie_word_embeddings", "use_cache", "attention_bias", "mlp_bias")
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta")
# transformers' rope types (modeling_rope_utils.ROPE_INIT_FUNCTIONS, "default"), Qwen2-VL's legacy "mrope" and the
# vision towers' "axial"; tests/test_reliability.py checks the installed transformers has no others.
ROPE_TYPES = {"default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional", "mrope", "axial",
              "su"}  # "su": Phi-3's first name for longrope, which transformers still reads

SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dtype(name: Any) -> bool:
    import torch

    return name == "auto" or (isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype))


def validate_config(config: Any, where: str) -> None:
    """BadInput naming ``where`` and the key unless the generic fields of ``config`` have sane types and values.

    Args:
        config: the parsed config (anything: a non-dict is refused too).
        where: what to name in the message (the file, or the GGUF metadata).

    Example::

        validate_config({"model_type": "llama", "hidden_size": -1}, "m/config.json")
        # BadInput: m/config.json: hidden_size must be a positive whole number, found -1
    """
    if not isinstance(config, dict):
        raise BadInput(f"{where}: a config must be a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadInput(f"{where}: model_type must name the model family (a string), found {model_type!r}")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(name, str) and name for name in architectures)):
        raise BadInput(f"{where}: architectures must be a list of class names, found {architectures!r}")
    _check_fields(config, where)
    for key in SUB_CONFIGS:
        sub = config.get(key)
        if sub is not None:
            if not isinstance(sub, dict):
                raise BadInput(f"{where}: {key} must be a JSON object, found {type(sub).__name__}")
            _check_fields(sub, f"{where}: {key}")


def _check_fields(config: dict, where: str) -> None:
    for key in POSITIVE_SIZES:
        value = config.get(key)
        if value is None:
            continue
        if not _is_int(value) or value <= 0:
            raise BadInput(f"{where}: {key} must be a positive whole number, found {value!r}")
        if value > MAX_SIZE:
            raise BadInput(f"{where}: {key} {value} is larger than any model dimension ({MAX_SIZE})")
    for key in BOOLEANS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise BadInput(f"{where}: {key} must be true or false, found {value!r}")
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and not _is_dtype(value):
            raise BadInput(f"{where}: {key} {value!r} is not a torch dtype (float32, bfloat16, float16, ...) or auto")
    for key in POSITIVE_NUMBERS:
        if config.get(key) is not None:
            _positive_number(config[key], key, where)
    custom = "auto_map" in config  # a model with its own code may have rope types of its own
    for key in ("rope_parameters", "rope_scaling"):
        _check_rope(config.get(key), key, where, check_type=not custom)
    head_dim = config.get("head_dim")
    rotary = config.get("rope_theta") is not None or config.get("rope_parameters") is not None
    if head_dim is not None and rotary and head_dim % 2:
        raise BadInput(f"{where}: head_dim {head_dim} is odd, and rotary embeddings rotate pairs of dimensions")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise BadInput(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    hidden = config.get("hidden_size")
    if heads and hidden and config.get("head_dim") is None and hidden % heads:
        raise BadInput(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                       "(and no head_dim is given)")


def _positive_number(value: Any, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{where}: {key} must be a positive number, found {value!r}")


def _check_rope(rope: Any, key: str, where: str, check_type: bool = True) -> None:
    """A rope dict (or one per layer type, as gemma3 writes): a known rope_type (unless ``check_type`` is false),
    positive theta and factor."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise BadInput(f"{where}: {key} must be a JSON object, found {rope!r}")
    if rope and all(isinstance(value, dict) for value in rope.values()):  # per layer type
        for layer_type, sub in rope.items():
            _check_rope(sub, f"{key}.{layer_type}", where, check_type)
        return
    kind = rope.get("rope_type", rope.get("type", "default"))
    if check_type and kind not in ROPE_TYPES:
        raise BadInput(f"{where}: {key} rope_type {kind!r} is not one transformers knows "
                       f"({', '.join(sorted(ROPE_TYPES))})")
    for name in ("rope_theta", "factor"):
        if rope.get(name) is not None:
            _positive_number(rope[name], f"{key}.{name}", where)
