"""Merge recipes: what to merge, how, with which parameters — from the CLI, a YAML file, a mergekit config, or the
``surgery.json`` manifest of an earlier merge (which reproduces it bit for bit).

Our YAML format::

    method: ties
    base: org/short-model             # optional: without it the first model is the base (methods that use one)
    models:
      - model: org/long-model
        parameters: {weight: 1.0, density: [0.1, 0.3]}      # a list is a gradient over the decoder layers
    parameters:                                              # global; per-model parameters override them
      lambda: 1.0
      density: [{filter: self_attn, value: 0.3}, {value: 0.2}]   # first matching tensor-name filter wins
    seed: 0
    dtype: bfloat16                   # output dtype; math is always float32
    tokenizer_source: base            # base, or one of the models

mergekit configs (``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``, full-range ``slices``) are read into the same structure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import BadInput

RECIPE_KEYS = {"method", "base", "models", "parameters", "seed", "dtype", "tokenizer_source", "dare_rescale"}


@dataclass
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    models: list[ModelEntry]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str | None = None
    tokenizer_source: str = "base"
    dare_rescale: str = "l1"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> "Recipe":
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise BadInput(f"{origin}: unknown recipe key(s) {', '.join(sorted(unknown))}")
        if "method" not in data or not data.get("models"):
            raise BadInput(f"{origin}: a recipe needs 'method' and a non-empty 'models' list")
        models = []
        for entry in data["models"]:
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise BadInput(f"{origin}: each entry of 'models' needs a 'model' key")
            models.append(ModelEntry(str(entry["model"]), dict(entry.get("parameters") or {})))
        return cls(method=data["method"], models=models, base=data.get("base"),
                   parameters=dict(data.get("parameters") or {}), seed=int(data.get("seed", 0)),
                   dtype=data.get("dtype"), tokenizer_source=data.get("tokenizer_source") or "base",
                   dare_rescale=data.get("dare_rescale", "l1"))


def _from_mergekit(config: dict, origin: str) -> Recipe:
    """Translate a mergekit YAML config; BadInput for features we do not run yet."""
    models = list(config.get("models") or [])
    if config.get("slices"):
        models = _models_from_full_range_slices(config["slices"], origin)
    tokenizer = config.get("tokenizer_source")
    if isinstance(tokenizer, dict) or tokenizer == "union":
        raise BadInput(f"{origin}: tokenizer_source {tokenizer!r} is not supported yet (use base or a model)")
    entries = []
    for entry in models:
        if isinstance(entry, dict) and isinstance(entry.get("model"), dict):  # {model: {model: path}} form
            entry = {**entry, "model": entry["model"].get("model") or entry["model"].get("path")}
        entries.append(entry)
    base = config.get("base_model")
    if base is not None:  # mergekit lists the base among the models too; we keep it apart
        entries = [e for e in entries if (e["model"] if isinstance(e, dict) else e) != base]
    return Recipe.from_dict({
        "method": config["merge_method"], "base": base, "models": entries,
        "parameters": config.get("parameters") or {},
        "dtype": config.get("out_dtype") or config.get("dtype"),
        "tokenizer_source": tokenizer or "base",
    }, origin)


def _models_from_full_range_slices(slices: list, origin: str) -> list:
    """mergekit ``slices`` that each cover a whole model are the same as a ``models`` list."""
    if len(slices) != 1:
        raise BadInput(f"{origin}: slices that stack or cut layer ranges are not supported yet")
    models = []
    for source in slices[0].get("sources", []):
        entry = {"model": source["model"], "parameters": source.get("parameters") or {}}
        models.append(entry)
    return models


def load_recipe(path: str | Path) -> Recipe:
    """Read our YAML/JSON recipe, a mergekit config, or a ``surgery.json`` manifest."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).replace("\n", " ")
        raise BadInput(f"{path}: not a valid YAML/JSON recipe ({reason})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a recipe must be a mapping")
    if "recipe" in data and "surgery_version" in data:  # a manifest written by an earlier merge
        data = data["recipe"]
    if "merge_method" in data:
        return _from_mergekit(data, str(path))
    return Recipe.from_dict(data, str(path))


def recipe_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)
