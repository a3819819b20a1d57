"""Merge parameters as recipes write them, resolved per tensor (filters and per-layer gradients).

A parameter value is a number, a list of numbers (a gradient, interpolated over the decoder layers: layer i of n
sits at t = i / (n − 1), the only layer of a one-layer slice at 1, tensors outside the layers at 0), or a list of
``{filter, value}`` conditions where the first whose filter is a substring of the tensor name (or is absent / ``*``)
applies — mergekit's conventions::

    resolve_value([{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}], "model.layers.3.mlp.up_proj.weight",
                  t=0.5)   # → 0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

from surgery.errors import BadInput

MAX_MAGNITUDE = 1e6  # far beyond any useful weight or scale, and far from float32 overflow


@dataclass(frozen=True)
class Rule:
    """What values a parameter takes: ``kind`` float, int or bool, within [low, high] (open ends excluded)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be finite"
        if self.kind is int and value != int(value):
            return "must be a whole number"
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if low_ok and high_ok:
            return None
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"must be in {left}{low}, {high}{right}"


RULES = {
    "weight": Rule(float, -MAX_MAGNITUDE, MAX_MAGNITUDE),
    "lambda": Rule(float, -MAX_MAGNITUDE, MAX_MAGNITUDE),
    "scale": Rule(float, -MAX_MAGNITUDE, MAX_MAGNITUDE),
    "density": Rule(float, 0, 1, low_open=True),  # the fraction kept: 0 would keep nothing
    "gamma": Rule(float, 0, 1, high_open=True),
    "epsilon": Rule(float, 0, 1, high_open=True),
    "t": Rule(float, 0, 1),
    "eta": Rule(float, 0, 1, low_open=True),
    "rank": Rule(int, 1),
    "mu": Rule(float, 0, 1),
    "normalize": Rule(bool),
    "rescale": Rule(bool),
    "int8_mask": Rule(bool),
}


def setting_values(setting: Any, key: str, where: str) -> Iterator[Any]:
    """Every value ``setting`` can take (gradient points, each filter's value), BadInput if it is not of a shape
    parameters take: a scalar, a list of numbers, or a list of {filter, value}."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise BadInput(f"parameter {key!r} ({where}): an empty list")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            yield from setting
            return
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition or set(condition) - {"filter", "value"}:
                raise BadInput(f"parameter {key!r} ({where}): {condition!r} is not a number or a "
                               "{filter, value} entry")
            if condition.get("filter") is not None and not isinstance(condition["filter"], str):
                raise BadInput(f"parameter {key!r} ({where}): filter {condition['filter']!r} must be a string")
            if isinstance(condition["value"], dict):
                raise BadInput(f"parameter {key!r} ({where}): a filter's value must be a number or a gradient")
            yield from setting_values(condition["value"], key, where)
        return
    yield setting


def check_setting(key: str, setting: Any, where: str) -> None:
    """BadInput naming ``key`` and ``where`` unless every value of ``setting`` obeys the parameter's :data:`RULES`::

        check_setting("density", [0.2, 0.5], "global")      # fine
        check_setting("density", 1.5, "global")             # BadInput: must be in (0, 1]
    """
    rule = RULES.get(key)
    for value in setting_values(setting, key, where):
        problem = rule.problem(value) if rule else None
        if problem:
            raise BadInput(f"parameter {key} {value!r} ({where}): {problem}")


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

