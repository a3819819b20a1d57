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
from surgery.merge.vocab import check_pad_to_multiple_of

RECIPE_KEYS = {"method", "base", "models", "slices", "parameters", "seed", "dtype", "tokenizer_source",
               "dare_rescale", "aim", "chat_template", "pad_to_multiple_of", "modules", "routers"}
# Which parts of a vision-language model are merged; the others are copied from the base (mergekit's modular VLMs).
MODULE_CHOICES = ("text", "vision", "all")
# MoE routers: merged like any other weight, or the base's kept (the experts' task vectors still merge).
ROUTER_CHOICES = ("merge", "base")
MODEL_KEYS = {"model", "parameters", "layer_range"}
SLICE_KEYS = {"sources", "parameters", "base"}
AIM_KEYS = {"omega", "stats", "calibration", "max_tokens"}
DARE_RESCALES = ("l1", "inverse", "none")  # DARE / DELLA rescale: mergekit's L1, the papers' 1/p, none
# mergekit's MergeConfiguration fields (mergekit/config.py); anything else in a mergekit config is refused by name
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template"}


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
    chat_template: str | None = None  # "auto" (the inputs' most common), "chatml", or a Jinja template
    pad_to_multiple_of: int | None = None  # vocabulary rows: tokens rounded up to this (None: the source's rows)
    modules: str = "text"  # vision-language models: the parts merged (MODULE_CHOICES); the rest is the base's
    routers: str = "merge"  # MoE routers (ROUTER_CHOICES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> "Recipe":
        """A recipe from its mapping form (our YAML, a manifest's ``recipe``); BadInput naming ``origin`` and the key
        for any unknown key or value of the wrong type."""
        if not isinstance(data, dict):
            raise BadInput(f"{origin}: a recipe must be a mapping")
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise BadInput(f"{origin}: unknown recipe key(s) {', '.join(sorted(map(str, unknown)))}")
        if "method" not in data or bool(data.get("models")) == bool(data.get("slices")):
            raise BadInput(f"{origin}: a recipe needs 'method' and either a non-empty 'models' or 'slices' list")
        models = [_model_entry(e, origin) for e in _list(data.get("models"), "models", origin)]
        if any(entry.layer_range for entry in models):
            raise BadInput(f"{origin}: layer_range belongs in 'slices', not 'models'")
        slices = [_slice(entry, f"{origin}: slice {number}")
                  for number, entry in enumerate(_list(data.get("slices"), "slices", origin))]
        dare_rescale = _choice(data.get("dare_rescale"), "dare_rescale", DARE_RESCALES, origin)
        return cls(method=_text(data["method"], "method", origin, required=True), models=models,
                   base=_text(data.get("base"), "base", origin), parameters=_parameters(data.get("parameters"), origin),
                   slices=slices or None, seed=_seed(data.get("seed", 0), origin),
                   dtype=_dtype(data.get("dtype"), origin),
                   tokenizer_source=_text(data.get("tokenizer_source"), "tokenizer_source", origin) or "base",
                   dare_rescale=dare_rescale, aim=aim_settings(data.get("aim"), origin),
                   chat_template=_text(data.get("chat_template"), "chat_template", origin),
                   pad_to_multiple_of=check_pad_to_multiple_of(data.get("pad_to_multiple_of"),
                                                               f"{origin}: pad_to_multiple_of"),
                   modules=_choice(data.get("modules"), "modules", MODULE_CHOICES, origin),
                   routers=_choice(data.get("routers"), "routers", ROUTER_CHOICES, origin))

    @property
    def sources(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        names = [self.base] if self.base else []
        for entry in self.models + [source for part in self.slices or [] for source in part.sources]:
            names.append(entry.model)
        return list(dict.fromkeys(names))


def checked_choice(value: str, what: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; BadInput naming ``what`` (a key, an option) else.

    Args:
        value: the value given.
        what: how the message names it (``"recipe.yaml: routers"``, ``"--routers"``).
        choices: the accepted values.

    Returns:
        ``value``.

    Example: ``checked_choice("base", "--routers", ROUTER_CHOICES)   # "base"``
    """
    if value not in choices:
        raise BadInput(f"{what} {value!r}: expected {', '.join(choices)}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...], origin: str) -> str:
    """``value`` (absent: the first choice) when it is one of ``choices``; BadInput naming ``key`` else."""
    return checked_choice(_text(value, key, origin) or choices[0], f"{origin}: {key}", choices)


def _text(value: Any, key: str, origin: str, *, required: bool = False) -> str | None:
    """``value`` when it is a non-empty string (or absent, unless ``required``); BadInput naming ``key`` else."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadInput(f"{origin}: {key} must be a non-empty string, found {value!r}")
    return value


def _list(value: Any, key: str, origin: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadInput(f"{origin}: {key} must be a list, found {type(value).__name__}")
    return value


def _parameters(value: Any, origin: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise BadInput(f"{origin}: parameters must be a mapping of parameter names to values, found {value!r}")
    return dict(value)


def _seed(value: Any, origin: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise BadInput(f"{origin}: seed must be a whole number from 0 to 2^63 - 1, found {value!r}")
    return value


def _dtype(value: Any, origin: str) -> str | None:
    from surgery.io.checkpoint import OUTPUT_DTYPES

    value = _text(value, "dtype", origin)
    if value is not None and value not in OUTPUT_DTYPES:
        raise BadInput(f"{origin}: dtype {value!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
    return value


def aim_settings(settings: Any, origin: str) -> dict | None:
    """AIM settings with their defaults (omega 0.4; self-generated calibration of 2048 tokens without stats).

    Args:
        settings: a recipe's ``aim`` mapping (``omega``, ``stats``, ``calibration``, ``max_tokens``), or None.
        origin: where it comes from, for messages (a recipe path, ``"--aim"``).

    Returns:
        ``{"omega", "stats", "calibration", "max_tokens"}`` with defaults filled in, or None without settings;
        BadInput for an unknown key, bad value, or both stats and calibration.

    Example: ``aim_settings({"omega": 0.5}, "--aim")``   # {"omega": 0.5, "stats": None, ..., "max_tokens": 2048}
    """
    if settings is None:
        return None
    if not isinstance(settings, dict) or set(settings) - AIM_KEYS:
        raise BadInput(f"{origin}: aim must be a mapping of {', '.join(sorted(AIM_KEYS))}")
    for key in ("stats", "calibration"):
        _text(settings.get(key), f"aim {key}", origin)
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
        raise BadInput(f"{origin}: each model entry needs a 'model' key, found {entry!r}")
    if "lora" in entry:
        raise BadInput(f"{origin}: {entry['model']!r}: name a model with a LoRA adapter as model: MODEL+ADAPTER")
    unknown = set(entry) - MODEL_KEYS
    if unknown:
        raise BadInput(f"{origin}: model {entry['model']!r}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    model = _text(entry["model"], "model", origin, required=True)
    _check_reference(model, origin)
    layer_range = entry.get("layer_range")
    if layer_range is not None:
        if (not isinstance(layer_range, (list, tuple)) or len(layer_range) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                or not 0 <= layer_range[0] < layer_range[1]):
            raise BadInput(f"{origin}: layer_range {layer_range!r} of {model}: expected [start, end) "
                           "with 0 <= start < end")
        layer_range = tuple(layer_range)
    return ModelEntry(model, _parameters(entry.get("parameters"), f"{origin}: model {model}"), layer_range)


def _check_reference(model: str, origin: str) -> None:
    """BadInput naming the recipe when ``model`` is neither a local path nor a valid Hub repo id."""
    from surgery.io.sources import REPO_ID, check_repo_id

    from surgery.io.lora_input import split_model_and_adapter

    for part in split_model_and_adapter(model) or (model,):
        match = REPO_ID.match(part)
        if match and not Path(part).expanduser().exists():
            try:
                check_repo_id(match["repo"])
            except BadInput as err:
                raise BadInput(f"{origin}: model {err}") from None


def _slice(entry: Any, origin: str) -> Slice:
    if not isinstance(entry, dict) or not entry.get("sources"):
        raise BadInput(f"{origin}: needs a non-empty 'sources' list")
    unknown = set(entry) - SLICE_KEYS
    if unknown:
        raise BadInput(f"{origin}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    sources = [_model_entry(source, origin) for source in _list(entry["sources"], "sources", origin)]
    if any(source.layer_range is None for source in sources):
        raise BadInput(f"{origin}: every source needs a layer_range")
    return Slice(sources, _parameters(entry.get("parameters"), origin), _text(entry.get("base"), "base", origin))


def _model_name(entry: Any, origin: str) -> Any:
    """mergekit writes a model as a string (``model+lora`` too), {model: path} or {model: {model: path, lora: ...}};
    a LoRA becomes our ``MODEL+ADAPTER`` form."""
    model = entry.get("model") if isinstance(entry, dict) else entry
    if isinstance(model, dict):
        lora = model.get("lora")
        model = model.get("model") or model.get("path")
        if lora is not None:
            if not isinstance(lora, str) or not lora or not isinstance(model, str):
                raise BadInput(f"{origin}: lora {lora!r} of model {model!r}: expected a PEFT adapter's path or Hub id")
            model = f"{model}+{lora}"
    return model


def _mergekit_tokenizer(config: dict, origin: str) -> tuple[str | None, int | None]:
    """(tokenizer_source, pad_to_multiple_of) from mergekit's ``tokenizer_source`` or its newer ``tokenizer:
    {source, pad_to_multiple_of}`` block. When mergekit builds the output's tokenizer it sizes the embedding to the
    tokenizer (rounded up to pad_to_multiple_of), so a named tokenizer source gets mergekit's sizing (at least 1)."""
    block = config.get("tokenizer")
    source = config.get("tokenizer_source")
    if block is None:
        return (None, None) if source is None else (_model_name(source, origin), 1)
    if source is not None:
        raise BadInput(f"{origin}: give tokenizer_source or tokenizer, not both")
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise BadInput(f"{origin}: tokenizer must be a mapping of source, tokens and pad_to_multiple_of")
    if block.get("tokens"):
        raise BadInput(f"{origin}: tokenizer tokens (per-token embedding sources) are not supported; give source "
                       "base, union or a model")
    multiple = block.get("pad_to_multiple_of")
    return _model_name(block.get("source", "union"), origin), 1 if multiple is None else multiple


def _merges_base_as_a_model(method_name: Any) -> bool:
    """Whether mergekit merges a ``base_model`` as one more model for this method: it always reads the base, and a
    method without a base and without per-model parameters (karcher) takes it like any other input. (One with
    per-model parameters, linear, fails there for the base's missing weight; here it is refused as a base.)"""
    from surgery.merge.registry import METHODS

    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    return (method is not None and not method.uses_base and not method.optional_base
            and not any(parameter.per_model for parameter in method.parameters))


def from_mergekit(config: dict, origin: str) -> Recipe:
    """Translate a mergekit YAML config.

    Args:
        config: the parsed config (a mapping with ``merge_method``).
        origin: where it comes from, for messages (a file, a document of one).

    Returns:
        The :class:`Recipe`; BadInput for keys mergekit does not have and features we do not run.

    Example: ``from_mergekit({"merge_method": "linear", "models": ["a", "b"]}, "config.yml").method``
    """
    unknown = set(config) - MERGEKIT_KEYS
    if unknown:
        raise BadInput(f"{origin}: unknown mergekit key(s) {', '.join(sorted(map(str, unknown)))}")
    if config.get("modules"):
        raise BadInput(f"{origin}: mergekit 'modules' are not supported (use models or slices)")
    base = _model_name(config.get("base_model"), origin)
    tokenizer_source, pad_to_multiple_of = _mergekit_tokenizer(config, origin)
    data = {"method": config["merge_method"], "base": base, "parameters": config.get("parameters"),
            "dtype": config.get("out_dtype") or config.get("dtype"), "tokenizer_source": tokenizer_source,
            "pad_to_multiple_of": pad_to_multiple_of, "chat_template": config.get("chat_template")}
    if config.get("slices"):
        data["slices"] = []
        for part in _list(config["slices"], "slices", origin):
            if not isinstance(part, dict):
                raise BadInput(f"{origin}: each slice must be a mapping, found {part!r}")
            unknown = set(part) - {"sources", "parameters", "base_model"}
            if unknown:
                raise BadInput(f"{origin}: slice: unknown mergekit key(s) {', '.join(sorted(map(str, unknown)))}")
            sources = [{**source, "model": _model_name(source, origin)} if isinstance(source, dict) else source
                       for source in _list(part.get("sources"), "sources", origin)]
            data["slices"].append({"sources": sources, "parameters": part.get("parameters"),
                                   "base": _model_name(part.get("base_model"), origin)})
    else:
        # mergekit lists the base among the models too; we keep it apart
        data["models"] = [{**e, "model": _model_name(e, origin)} if isinstance(e, dict) else _model_name(e, origin)
                          for e in _list(config.get("models"), "models", origin) if _model_name(e, origin) != base]
        if base is not None and _merges_base_as_a_model(config["merge_method"]):
            data["models"].insert(0, base)
            del data["base"]
    return Recipe.from_dict({key: value for key, value in data.items() if value is not None}, origin)


def load_recipe(path: str | Path) -> Recipe:
    """Read our YAML/JSON recipe, a mergekit config, or a ``surgery.json`` manifest.

    Args:
        path: the file (a mergekit config has ``merge_method``; a manifest ``recipe`` and ``surgery_version``).

    Returns:
        The :class:`Recipe`; BadInput when the file is not a recipe or a merge's manifest.

    Example: ``load_recipe("out/surgery.json").method``
    """
    from surgery.yamlfile import read_yaml

    path = Path(path)
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a recipe must be a mapping")
    if "recipe" in data and "surgery_version" in data:  # a manifest written by an earlier merge
        if data.get("command") != "merge":
            raise BadInput(f"{path}: the manifest of a {data.get('command')!r} output, not of a merge")
        data = data["recipe"]
        if not isinstance(data, dict):
            raise BadInput(f"{path}: the manifest's recipe must be a mapping, found {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data, str(path))
    return Recipe.from_dict(data, str(path))


def recipe_json(recipe: Recipe) -> str:
    """The recipe as indented JSON with sorted keys (what the model card shows and ``--recipe`` reads back).

    Args:
        recipe: the recipe.

    Returns:
        ``json.dumps(recipe.to_dict(), indent=2, sort_keys=True)``.

    Example: ``print(recipe_json(load_recipe("recipe.yaml")))``
    """
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)
