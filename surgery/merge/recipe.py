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

Instead of ``models``, ``slices`` stack or cut layer ranges (mergekit's ``slices``). Each output slice merges the
given layer range of each of its sources (ranges of equal length) and the output layers follow slice by slice;
embeddings come from the first slice's sources, the final norm and lm_head from the last's::

    method: passthrough                # a 40-layer "frankenmerge" of two 32-layer models
    slices:
      - sources: [{model: org/a, layer_range: [0, 24]}]
      - sources: [{model: org/b, layer_range: [16, 32]}]

A slice may carry ``parameters`` (between the sources' and the global ones in precedence) and a ``base`` (one of its
sources); gradients run over each slice's own layers, as in mergekit.

mergekit configs (``merge_method``, ``base_model``, ``models``, ``slices``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``) are read into the same structure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import BadInput

RECIPE_KEYS = {"method", "base", "models", "slices", "parameters", "seed", "dtype", "tokenizer_source",
               "dare_rescale", "aim"}
AIM_KEYS = {"omega", "stats", "calibration", "max_tokens"}


@dataclass
class ModelEntry:
    """One input model; in a slice, ``layer_range`` [start, end) picks its decoder layers (None: all of them)."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class Slice:
    """A run of output layers merged from the same-length layer ranges of ``sources``."""

    sources: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    base: str | None = None


@dataclass
class Recipe:
    method: str
    models: list[ModelEntry]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    slices: list[Slice] | None = None
    seed: int = 0
    dtype: str | None = None
    tokenizer_source: str = "base"
    dare_rescale: str = "l1"
    aim: dict[str, Any] | None = None  # activation-informed merging: omega and stats, or calibration + max_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> "Recipe":
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise BadInput(f"{origin}: unknown recipe key(s) {', '.join(sorted(unknown))}")
        if "method" not in data or bool(data.get("models")) == bool(data.get("slices")):
            raise BadInput(f"{origin}: a recipe needs 'method' and either a non-empty 'models' or 'slices' list")
        models = [_model_entry(e, origin) for e in data.get("models") or []]
        if any(entry.layer_range for entry in models):
            raise BadInput(f"{origin}: layer_range belongs in 'slices', not 'models'")
        slices = [_slice(entry, f"{origin}: slice {number}") for number, entry in enumerate(data.get("slices") or [])]
        return cls(method=data["method"], models=models,
                   base=data.get("base"), parameters=dict(data.get("parameters") or {}), slices=slices or None,
                   seed=int(data.get("seed", 0)), dtype=data.get("dtype"),
                   tokenizer_source=data.get("tokenizer_source") or "base",
                   dare_rescale=data.get("dare_rescale", "l1"), aim=aim_settings(data.get("aim"), origin))

    @property
    def sources(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        names = [self.base] if self.base else []
        for entry in self.models + [source for part in self.slices or [] for source in part.sources]:
            names.append(entry.model)
        return list(dict.fromkeys(names))


def aim_settings(settings: Any, origin: str) -> dict | None:
    """AIM settings with their defaults (omega 0.4; self-generated calibration of 2048 tokens without stats)."""
    if settings is None:
        return None
    if not isinstance(settings, dict) or set(settings) - AIM_KEYS:
        raise BadInput(f"{origin}: aim must be a mapping of {', '.join(sorted(AIM_KEYS))}")
    if settings.get("stats") and settings.get("calibration"):
        raise BadInput(f"{origin}: aim takes stats (precomputed) or calibration (text), not both")
    omega = settings.get("omega", 0.4)
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 0 <= omega <= 1:
        raise BadInput(f"{origin}: aim omega {omega!r}: must be a number between 0 and 1")
    max_tokens = settings.get("max_tokens", 2048)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadInput(f"{origin}: aim max_tokens {max_tokens!r}: must be a positive whole number")
    return {"omega": float(omega), "stats": settings.get("stats"), "calibration": settings.get("calibration"),
            "max_tokens": max_tokens}


def _model_entry(entry: Any, origin: str) -> ModelEntry:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise BadInput(f"{origin}: each model entry needs a 'model' key")
    layer_range = entry.get("layer_range")
    if layer_range is not None:
        if (not isinstance(layer_range, (list, tuple)) or len(layer_range) != 2
                or not all(isinstance(v, int) for v in layer_range) or not 0 <= layer_range[0] < layer_range[1]):
            raise BadInput(f"{origin}: layer_range {layer_range!r} of {entry['model']}: expected [start, end) "
                           "with 0 <= start < end")
        layer_range = tuple(layer_range)
    return ModelEntry(str(entry["model"]), dict(entry.get("parameters") or {}), layer_range)


def _slice(entry: Any, origin: str) -> Slice:
    if not isinstance(entry, dict) or not entry.get("sources"):
        raise BadInput(f"{origin}: needs a non-empty 'sources' list")
    unknown = set(entry) - {"sources", "parameters", "base"}
    if unknown:
        raise BadInput(f"{origin}: unknown key(s) {', '.join(sorted(unknown))}")
    sources = [_model_entry(source, origin) for source in entry["sources"]]
    if any(source.layer_range is None for source in sources):
        raise BadInput(f"{origin}: every source needs a layer_range")
    return Slice(sources, dict(entry.get("parameters") or {}), entry.get("base"))


def _model_name(entry: Any) -> Any:
    """mergekit writes a model as a string, {model: path} or {model: {model: path, lora: ...}}."""
    model = entry.get("model") if isinstance(entry, dict) else entry
    if isinstance(model, dict):
        model = model.get("model") or model.get("path")
    return model


def _from_mergekit(config: dict, origin: str) -> Recipe:
    """Translate a mergekit YAML config; BadInput for features we do not run."""
    tokenizer = config.get("tokenizer_source")
    if isinstance(tokenizer, dict) or config.get("tokenizer"):
        raise BadInput(f"{origin}: per-token tokenizer settings are not supported (use base, union or a model)")
    base = config.get("base_model")
    data = {"method": config["merge_method"], "base": base, "parameters": config.get("parameters") or {},
            "dtype": config.get("out_dtype") or config.get("dtype"), "tokenizer_source": tokenizer or "base"}
    if config.get("modules"):
        raise BadInput(f"{origin}: mergekit 'modules' are not supported (use models or slices)")
    if config.get("slices"):
        data["slices"] = []
        for part in config["slices"]:
            sources = [{**source, "model": _model_name(source)} for source in part.get("sources") or []]
            data["slices"].append({"sources": sources, "parameters": part.get("parameters"),
                                   "base": part.get("base_model")})
    else:
        # mergekit lists the base among the models too; we keep it apart
        data["models"] = [{**e, "model": _model_name(e)} if isinstance(e, dict) else e
                          for e in config.get("models") or [] if _model_name(e) != base]
    return Recipe.from_dict(data, origin)


def load_recipe(path: str | Path) -> Recipe:
    """Read our YAML/JSON recipe, a mergekit config, or a ``surgery.json`` manifest."""
    from surgery.yamlfile import read_yaml

    path = Path(path)
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a recipe must be a mapping")
    if "recipe" in data and "surgery_version" in data:  # a manifest written by an earlier merge
        data = data["recipe"]
    if "merge_method" in data:
        return _from_mergekit(data, str(path))
    return Recipe.from_dict(data, str(path))


def recipe_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)
