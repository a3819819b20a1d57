"""Merge parameters as recipes write them, resolved per tensor (filters and per-layer gradients).

A parameter value is a number, a list of numbers (a gradient, interpolated over the decoder layers: layer i of n
sits at t = i / (n − 1), the only layer of a one-layer slice at 1, tensors outside the layers at 0), or a list of
``{filter, value}`` conditions where the first whose filter is a substring of the tensor name (or is absent / ``*``)
applies — mergekit's conventions::

    resolve_value([{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}], "model.layers.3.mlp.up_proj.weight",
                  t=0.5)   # → 0.5
"""

from __future__ import annotations

from typing import Any

from surgery.errors import BadInput


def resolve_value(setting: Any, tensor_name: str, t: float) -> Any:
    """The value ``setting`` takes for ``tensor_name`` at layer position ``t`` ∈ [0, 1]; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, str)) or setting is None:
        return setting
    if isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            position = t * (len(setting) - 1)
            low = int(position)
            high = min(len(setting) - 1, low + 1)
            fraction = position - low
            return (1 - fraction) * float(setting[low]) + fraction * float(setting[high])
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition:
                raise BadInput(f"parameter value {condition!r}: expected a number, a list of numbers, "
                               "or {filter, value} entries")
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return resolve_value(condition["value"], tensor_name, t)
        return None
    raise BadInput(f"parameter value {setting!r}: expected a number, a list of numbers, or {{filter, value}} entries")

