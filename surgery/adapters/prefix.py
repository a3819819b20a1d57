"""Prefix adapters: a prompt's KV cache packed in PEFT's PREFIX_TUNING format, so that

    model = peft.PeftModel.from_pretrained(model, "persona-prefix")
    model(query_ids)            # the logits of the base model run on prompt + query

``adapter_model.safetensors`` holds one tensor, ``prompt_embeddings`` [m, 2·L·H_kv·d]: PEFT views it as
(batch, m, 2L, H_kv, d) and permutes it to (2L, batch, H_kv, m, d), so row 2l holds layer l's keys (after RoPE, at
positions 0..m−1) and row 2l+1 its values. ``num_attention_heads`` is the number of KV heads (grouped-query
attention: PEFT's own convention since #1901) and ``token_dim`` = H_kv·d.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgery.adapters.prompts import cache_layers, prefill
from surgery.errors import BadInput

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def kv_geometry(model) -> dict:
    """Layers, KV heads and head_dim of ``model``.

    Args:
        model: a loaded causal LM (BadInput for families whose cache is not one plain key/value pair per layer).

    Returns:
        ``{"num_layers", "num_key_value_heads", "head_dim"}``.

    Example:
        ``kv_geometry(model)["num_key_value_heads"]``
    """
    config = model.config
    if config.model_type not in FAMILIES:
        raise BadInput(f"model type {config.model_type!r}: prefix adapters support {', '.join(FAMILIES)}")
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def pack(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """PEFT's prompt_embeddings layout from per-layer keys and values.

    Args:
        layers: per layer (keys, values) [1, H_kv, m, d].

    Returns:
        [m, 2·L·H_kv·d]: row 2l of PEFT's view holds layer l's keys, row 2l+1 its values.

    Example:
        ``embeddings = pack(cache_layers(cache))``
    """
    stacked = torch.stack([tensor[0] for pair in layers for tensor in pair])  # [2L, H_kv, m, d]
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1).contiguous()


def unpack(embeddings: torch.Tensor, num_layers: int, kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`pack`.

    Args:
        embeddings: prompt_embeddings [m, 2·L·H_kv·d].
        num_layers: L.
        kv_heads: H_kv.

    Returns:
        Per layer (keys, values) [1, H_kv, m, d] (views of ``embeddings``).

    Example:
        ``layers = unpack(pack(layers), len(layers), layers[0][0].shape[1])``
    """
    tokens = embeddings.shape[0]
    stacked = embeddings.reshape(tokens, 2 * num_layers, kv_heads, -1).permute(1, 2, 0, 3)
    return [(stacked[2 * layer][None], stacked[2 * layer + 1][None]) for layer in range(num_layers)]


def prefix_config(geometry: dict, tokens: int, base_model: str) -> dict:
    """The ``adapter_config.json`` of a PEFT PREFIX_TUNING adapter.

    Args:
        geometry: :func:`kv_geometry` of the model.
        tokens: the prompt's length (PEFT's ``num_virtual_tokens``).
        base_model: what the config records as ``base_model_name_or_path``.

    Returns:
        The config, as a dict ready for JSON.

    Example:
        ``prefix_config(kv_geometry(model), ids.shape[1], "org/model")["token_dim"]``
    """
    token_dim = geometry["num_key_value_heads"] * geometry["head_dim"]
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tokens,
        "token_dim": token_dim, "num_attention_heads": geometry["num_key_value_heads"],
        "num_layers": geometry["num_layers"], "num_transformer_submodules": 1, "encoder_hidden_size": token_dim,
        "prefix_projection": False, "inference_mode": True, "base_model_name_or_path": base_model,
        "revision": None, "auto_mapping": None,
    }


def prefix_tensors(model, ids: torch.Tensor) -> torch.Tensor:
    """prompt_embeddings of the prompt ``ids`` for ``model``.

    Args:
        model: a loaded causal LM of a supported family.
        ids: the prompt's token ids [1, m].

    Returns:
        [m, 2·L·H_kv·d] on the CPU, in the model's dtype (BadInput when its KV cache does not fit the layout).

    Example:
        ``embeddings = prefix_tensors(model, prompt_ids(tokenizer, text))``
    """
    geometry = kv_geometry(model)
    cache, _ = prefill(model, ids)
    layers = cache_layers(cache)
    if len(layers) != geometry["num_layers"] or layers[0][0].shape[1:] != (
            geometry["num_key_value_heads"], ids.shape[1], geometry["head_dim"]):
        raise BadInput(f"{model.config.model_type}: its KV cache is not one [kv_heads, tokens, head_dim] pair per "
                       "layer; no prefix adapter can hold it")
    return pack([(keys.detach().cpu(), values.detach().cpu()) for keys, values in layers])


def is_prefix_adapter(directory: Path) -> bool:
    """Whether ``directory`` holds a PEFT PREFIX_TUNING adapter (by its ``adapter_config.json``).

    Args:
        directory: the directory.

    Returns:
        True for a prefix adapter; False otherwise, or when its config cannot be read.

    Example:
        ``is_prefix_adapter(Path("persona-prefix"))``
    """
    try:
        return json.loads((directory / CONFIG_FILE).read_text()).get("peft_type") == "PREFIX_TUNING"
    except (OSError, ValueError, AttributeError):
        return False


def load_prefix_cache(directory: str | Path, model):
    """A DynamicCache holding the prefix adapter in ``directory``, for ``model`` (what PEFT builds from it).

    Args:
        directory: the adapter's directory.
        model: the model it is for (BadInput when the adapter was made for another geometry).

    Returns:
        The cache, on the model's device in its dtype, and the adapter's number of virtual tokens.

    Example:
        ``cache, tokens = load_prefix_cache("persona-prefix", model)``
    """
    from safetensors.torch import load_file
    from transformers import DynamicCache

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        embeddings = load_file(directory / WEIGHTS_FILE)["prompt_embeddings"]
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"{directory}: unreadable prefix adapter ({err})") from None
    geometry = kv_geometry(model)
    wanted = (geometry["num_layers"], geometry["num_key_value_heads"],
              geometry["num_key_value_heads"] * geometry["head_dim"])
    found = (config.get("num_layers"), config.get("num_attention_heads"), config.get("token_dim"))
    if found != wanted or embeddings.shape[1] != 2 * wanted[0] * wanted[2]:
        raise BadInput(f"{directory}: made for {found[0]} layers × {found[1]} KV heads × token_dim {found[2]}; the "
                       f"model has {wanted[0]} × {wanted[1]} × {wanted[2]}")
    dtype = next(model.parameters()).dtype
    layers = [(keys.to(model.device, dtype), values.to(model.device, dtype))
              for keys, values in unpack(embeddings, wanted[0], wanted[1])]
    return DynamicCache(ddp_cache_data=layers, config=model.config), embeddings.shape[0]
