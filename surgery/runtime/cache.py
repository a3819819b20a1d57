"""The KV-cache keyword arguments across transformers versions (5.2x renamed ``past_key_values`` to ``cache``)::

    out = model(input_ids=ids, use_cache=True)
    out = model(input_ids=next_ids, **cache_kwargs(model, output_cache(out)))
"""

from __future__ import annotations

import inspect


def cache_kwargs(model, cache) -> dict:
    """Forward keyword arguments that pass ``cache`` (and ``use_cache=True``) under the name ``model`` takes.

    Args:
        model: a transformers model.
        cache: a KV cache (``DynamicCache``...).

    Returns:
        ``{"cache" or "past_key_values": cache, "use_cache": True}``::

            logits = model(ids, **cache_kwargs(model, DynamicCache(config=model.config))).logits
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def output_cache(output):
    """The KV cache a forward pass with ``use_cache=True`` returned, under either name.

    Args:
        output: the model's output.

    Returns:
        The cache::

            cache = output_cache(model(input_ids=ids, use_cache=True))
    """
    return output.cache if hasattr(output, "cache") else output.past_key_values
