"""Tensor roles read off the model transformers builds for a config, on the meta device (no memory, no weights).

transformers knows every family it implements: its module classes say what a parameter is (an ``nn.Linear`` inside
an attention module, a ``MixtralExperts`` module holding every expert as one 3-D tensor, a router, a norm, the
vision tower ``get_encoder("image")`` returns, the decoder ``get_decoder()`` returns), and its weight conversions
say which parameter each checkpoint tensor becomes (``block_sparse_moe.experts.3.w1.weight`` → expert 3's gate
half of ``mlp.experts.gate_up_proj``). :class:`ModelLayout` asks both; only which projection of a module a
parameter is (q or k, gate or up) comes from its name, in the tables below::

    layout = ModelLayout.build(config)          # None when transformers cannot build the config's model
    layout.role("model.layers.0.block_sparse_moe.experts.3.w1.weight")
    # TensorRole(kind='mlp_gate', layer=0, expert=3, part='text', linear=False, ...)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Which projection a Linear is, by its attribute name inside an attention or MLP module.
ATTENTION_LEAVES = {
    "q_proj": "attn_q", "query": "attn_q", "wq": "attn_q", "q": "attn_q",
    "k_proj": "attn_k", "key": "attn_k", "wk": "attn_k", "k": "attn_k",
    "v_proj": "attn_v", "value": "attn_v", "wv": "attn_v", "v": "attn_v",
    "o_proj": "attn_o", "out_proj": "attn_o", "dense": "attn_o", "c_proj": "attn_o", "wo": "attn_o", "proj": "attn_o",
    "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "Wqkv": "attn_qkv",
    "qkv": "attn_qkv", "in_proj": "attn_qkv",
    "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a", "kv_b_proj": "attn_kv_b",
}
MLP_LEAVES = {
    "gate_proj": "mlp_gate", "w1": "mlp_gate",
    "up_proj": "mlp_up", "w3": "mlp_up", "c_fc": "mlp_up", "fc1": "mlp_up", "fc_in": "mlp_up",
    "dense_h_to_4h": "mlp_up", "linear_1": "mlp_up",
    "down_proj": "mlp_down", "w2": "mlp_down", "c_proj": "mlp_down", "fc2": "mlp_down", "fc_out": "mlp_down",
    "dense_4h_to_h": "mlp_down", "linear_2": "mlp_down",
    "gate_up_proj": "mlp_gate_up",
}
# A fused experts parameter's name → kind (biases share their weight's kind).
EXPERT_PARAMETERS = {"gate_up_proj": "mlp_gate_up", "down_proj": "mlp_down", "gate_proj": "mlp_gate",
                     "up_proj": "mlp_up", "w1": "mlp_gate", "w2": "mlp_down", "w3": "mlp_up"}
EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
ROUTER_CLASS = re.compile(r"(Router|Gate|TopK|Topk)", re.I)
_CACHE: dict[str, "ModelLayout | None"] = {}  # config → its layout, the most recent CACHED_LAYOUTS
CACHED_LAYOUTS = 16


@dataclass(frozen=True)
class TensorRole:
    """What a tensor is.

    ``kind``: embedding, position_embedding, lm_head, attn_q/k/v/o/qkv, attn_q_a/q_b/kv_a/kv_b (MLA), attn_sink,
    mlp_gate/up/down/gate_up, router, norm, linear (another Linear projection), other. ``layer``: the decoder layer
    (None outside the decoder's layers, and for vision-tower tensors). ``expert``: the expert a per-expert tensor
    belongs to; ``experts``: how many experts a fused tensor stacks along dim 0 (None: not fused). ``shared``: part
    of a shared expert (one that runs for every token). ``part``: text (the language model), vision (the vision
    tower) or projector (between them). ``linear``: the weight or bias of an ``nn.Linear``, which quantization
    loaders replace (GPT-2's ``Conv1D`` is not one).
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    experts: int | None = None
    shared: bool = False
    part: str = "text"
    linear: bool = False


def known_model_type(model_type) -> bool:
    """Whether transformers implements ``model_type`` (custom-code models are not).

    Args:
        model_type: a config.json's ``model_type``.

    Returns:
        True for a model type transformers has a config class for.

    Example: ``known_model_type("mixtral")   # True``
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def _hf_config(config: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def model_class(hf_config) -> Any:
    """The transformers class a user loads ``hf_config`` with: its ``architectures`` entry, else the
    image-text-to-text or causal-LM auto class that has the model type, else ``AutoModel``.

    Args:
        hf_config: a transformers config object.

    Returns:
        The class (``from_pretrained`` / ``from_config`` build the model).

    Example: ``model_class(AutoConfig.for_model("mixtral"))   # AutoModelForCausalLM``
    """
    import transformers
    from transformers.models.auto import modeling_auto

    for name in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is not None:
            return cls
    if hf_config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    if hf_config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def meta_model(config: dict):
    """transformers' model for ``config`` (a config.json dict), every parameter and buffer on the meta device.

    Args:
        config: the checkpoint's config.json.

    Returns:
        The model; ValueError (and others transformers raises) when it cannot be built.

    Example: ``meta_model({"model_type": "mixtral", "num_hidden_layers": 2}).model.layers[0].mlp.experts``
    """
    import torch
    from transformers.utils import logging as transformers_logging

    hf_config = _hf_config(config)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        cls = model_class(hf_config)
        build = getattr(cls, "from_config", None) or cls._from_config  # auto classes / model classes
        with torch.device("meta"):
            return build(hf_config)
    finally:
        transformers_logging.set_verbosity(verbosity)


@dataclass
class _Parameter:
    cls: str  # the class of the module holding it
    sort: str  # what that module is: head, input_embedding, embedding, linear, conv1d or other
    path: str  # the module's name in the model
    leaf: str  # the parameter's attribute name
    shape: tuple
    part: str
    layer: int | None
    alias: bool = False  # the same tensor as an earlier name (a tied lm_head)


class ModelLayout:
    """The parameters of transformers' model for a config, and the conversions from checkpoint names to them."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        self.model_class = type(model).__name__
        # names and shapes only: a cached layout keeps no module or tensor of the model alive
        self._state = {name: tuple(value.shape) for name, value in model.state_dict(keep_vars=True).items()}
        self._prefix = getattr(model, "base_model_prefix", None)
        transforms = get_model_conversion_mapping(model)
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.parameters = self._parameters(model)
        self._roles: dict[str, TensorRole] = {}

    @classmethod
    def build(cls, config: dict | None) -> "ModelLayout | None":
        """The layout for ``config``, built once per distinct config; None (with a warning saying why) when
        transformers does not know the model type or cannot build its model.

        Args:
            config: a config.json dict.

        Returns:
            The layout, or None.

        Example: ``ModelLayout.build(ckpt.config).role("lm_head.weight").kind   # "lm_head"``
        """
        import json

        model_type = (config or {}).get("model_type")
        if not known_model_type(model_type):
            return None
        key = json.dumps(config, sort_keys=True, default=str)
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)  # most recently used last
        else:
            while len(_CACHE) >= CACHED_LAYOUTS:
                _CACHE.pop(next(iter(_CACHE)))
            try:
                _CACHE[key] = cls(meta_model(config))
            except Exception as err:  # noqa: BLE001 - any refusal means: fall back to names, and say why
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                log.warning("transformers cannot build the %r model of this config (%s): tensor roles are guessed "
                            "from their names", model_type, reason)
                _CACHE[key] = None
        return _CACHE[key]

    def _parameters(self, model) -> dict[str, _Parameter]:
        vision = model.get_encoder(modality="image") if hasattr(model, "get_encoder") else model
        vision = None if vision is model or vision is getattr(model, "base_model", None) else vision
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

        def tensors(module) -> set[int]:  # parameters and persistent buffers (DeepSeek's router correction bias)
            return {id(t) for t in module.state_dict(keep_vars=True).values()} if module is not None else set()

        in_vision, in_decoder, in_head = tensors(vision), tensors(decoder), tensors(head)
        vision_prefix = next((n for n, m in model.named_modules() if m is vision), None) if vision else None
        modules = dict(model.named_modules())
        self._classes = {path: type(module).__name__ for path, module in modules.items()}
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found, seen = {}, set()
        for name, value in model.state_dict(keep_vars=True).items():
            path, _, leaf = name.rpartition(".")
            module = modules.get(path)
            if module is None:
                continue
            if id(value) in in_vision or (vision_prefix and name.startswith(vision_prefix + ".")):
                part = "vision"
            elif id(value) in in_decoder or id(value) in in_head or vision is None:
                part = "text"
            else:
                part = "projector"
            match = LAYER_INDEX.search(name)
            layer = int(match.group(1)) if match and part == "text" else None
            found[name] = _Parameter(type(module).__name__, _sort(module, head, embeddings), path, leaf,
                                     tuple(value.shape), part, layer, id(value) in seen)
            seen.add(id(value))
        names = {id(module): name for name, module in modules.items()}
        self._decoder_prefix = names.get(id(decoder))
        self._head_prefix = names.get(id(head)) if head is not None else None
        # transformers ties the head to the embeddings as it builds the model, when the config says so
        self.tied = head is not None and embeddings is not None and head.weight is embeddings.weight
        return found

    def target(self, name: str) -> tuple[str, str | None, Any]:
        """The model parameter the checkpoint tensor ``name`` becomes, the converter source pattern it matched (None
        for a plain rename) and that converter.

        Args:
            name: a checkpoint tensor name.

        Returns:
            (parameter name, matched source pattern or None, converter or None).

        Example: ``layout.target("model.layers.0.block_sparse_moe.experts.3.w1.weight")[0]``
        is ``"model.layers.0.mlp.experts.gate_up_proj"``
        """
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(name, self._renamings, self._converters, self._prefix, self._state)
        converter = None
        if pattern is not None:
            converter = next((c for c in self._converters if pattern in c.source_patterns), None)
        return renamed, pattern, converter

    def loader_module(self, module: str) -> str:
        """The name transformers' model gives the checkpoint module ``module`` (what quantization configs target);
        the checkpoint's name where the model has no such module (per-expert modules fused as they load).

        Args:
            module: a checkpoint module name (a tensor name without ``.weight``).

        Returns:
            The model's module name.

        Example: ``layout.loader_module("language_model.model.layers.0.mlp.up_proj")`` is
        ``"model.language_model.layers.0.mlp.up_proj"`` (llava)
        """
        target, pattern, _ = self.target(module + ".weight")
        if pattern is not None or not target.endswith(".weight"):
            return module
        return target.removesuffix(".weight")

    def text_key(self, name: str) -> str | None:
        """Where checkpoint tensor ``name`` sits in the language model, the same for a vision-language model and its
        text-only counterpart: ``decoder.`` + its name inside the decoder, or ``lm_head.`` + its name in the head;
        None outside the language model and for tensors transformers converts (per-expert ones).

        Args:
            name: a checkpoint tensor name.

        Returns:
            The key, or None.

        Example: ``layout.text_key("language_model.model.layers.0.mlp.up_proj.weight")`` (llava) and
        ``layout.text_key("model.layers.0.mlp.up_proj.weight")`` (llama) are both
        ``"decoder.layers.0.mlp.up_proj.weight"``
        """
        target, pattern, _ = self.target(name)
        parameter = self.parameters.get(target)
        if parameter is None or parameter.part != "text" or pattern is not None:
            return None
        for label, prefix in (("decoder", self._decoder_prefix), ("lm_head", self._head_prefix)):
            if prefix is not None and target.startswith(prefix + "."):
                return f"{label}.{target[len(prefix) + 1:]}"
        return None

    def sources(self, names) -> tuple[dict[str, str], dict[str, list[list[str]]]]:
        """How transformers builds the model's parameters from the checkpoint tensors ``names``: parameters stored
        under another name (parameter → tensor name), and fused ones (parameter → for each source pattern of its
        converter, the tensor names in expert order), which stack along dim 0 and, with two patterns (gate and
        up), concatenate along dim 1. BadInput for a conversion other than those.

        Args:
            names: the checkpoint's tensor names.

        Returns:
            (renamed, fused).

        Example: ``layout.sources(ckpt.tensors)[1]["model.layers.0.mlp.experts.down_proj"]``   # [[expert 0's w2...]]
        """
        from surgery.errors import BadInput

        renamed, parts = {}, {}
        for name in names:
            target, pattern, converter = self.target(name)
            if converter is None:
                if target != name:
                    renamed[target] = name
                continue
            operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
            if operations not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
                raise BadInput(f"{name}: transformers converts it into {target} by {operations}, which surgery "
                               f"does not reproduce")
            expert = EXPERT_INDEX.search(name)
            index = int(expert.group(1)) if expert else 0
            parts.setdefault(target, {}).setdefault(converter.source_patterns.index(pattern), {})[index] = name
        fused = {target: [[by_expert[e] for e in sorted(by_expert)] for _, by_expert in sorted(patterns.items())]
                 for target, patterns in parts.items()}
        return renamed, fused

    def module_class(self, name: str) -> str | None:
        """The class name of the module holding checkpoint tensor ``name`` in transformers' model (None: no such
        module). Example: ``layout.module_class("transformer.h.0.mlp.dense_h_to_4h.weight")   # "FalconLinear"``"""
        return self._classes.get(self.target(name)[0].rpartition(".")[0])

    def role(self, name: str) -> TensorRole | None:
        """The role of checkpoint tensor ``name``; None when it maps to no parameter of the model.

        Args:
            name: a checkpoint tensor name.

        Returns:
            The :class:`TensorRole`, or None.

        Example: ``layout.role("model.layers.1.mlp.gate.weight").kind   # "router"``
        """
        if name not in self._roles:
            self._roles[name] = self._role(name)
        return self._roles[name]

    def _role(self, name: str) -> TensorRole | None:
        target, pattern, converter = self.target(name)
        parameter = self.parameters.get(target)
        if parameter is None:
            return None
        cls, leaf = parameter.cls, parameter.leaf
        common = {"layer": parameter.layer, "part": parameter.part,
                  "shared": "shared_expert" in parameter.path}
        if cls.endswith("Experts") and len(parameter.shape) >= 2 and leaf.removesuffix("_bias") in EXPERT_PARAMETERS:
            kind = EXPERT_PARAMETERS[leaf.removesuffix("_bias")]
            expert_match = EXPERT_INDEX.search(name)
            if expert_match is None:  # stored fused, as the model holds it
                return TensorRole(kind, experts=parameter.shape[0], **common)
            if converter is not None and kind == "mlp_gate_up" and len(converter.source_patterns) == 2:
                kind = ("mlp_gate", "mlp_up")[converter.source_patterns.index(pattern)]
            elif converter is not None:  # a per-expert tensor named after its own projection
                kind = EXPERT_PARAMETERS.get(name.rsplit(".", 2)[-2], kind)
            return TensorRole(kind, expert=int(expert_match.group(1)), **common)
        return TensorRole(self._module_kind(parameter), linear=parameter.sort in ("linear", "head"), **common)

    def _module_kind(self, parameter: _Parameter) -> str:
        cls, sort = parameter.cls, parameter.sort
        if sort == "head":
            return "lm_head"
        if sort in ("input_embedding", "embedding"):
            if sort == "input_embedding":
                return "embedding"
            if re.search(r"pos|wpe", parameter.path):
                return "position_embedding"
            # rows by token only in the language model (vocabulary merging aligns those); a vision tower's are not
            return "embedding" if parameter.part == "text" else "other"
        if "Norm" in cls or "norm" in parameter.leaf:
            return "norm"
        if parameter.leaf == "sinks":
            return "attn_sink"
        attribute = parameter.path.rpartition(".")[2]
        if ROUTER_CLASS.search(cls) and sort != "linear" or attribute in ("gate", "router") or \
                attribute.endswith("expert_gate"):
            return "router"
        if sort not in ("linear", "conv1d"):
            return "other"
        parent = parameter.path.rpartition(".")[0]
        parent_name = parent.rpartition(".")[2].lower()
        parent_class = self._classes.get(parent, "")
        if "Attention" in parent_class or "attn" in parent_name or "attention" in parent_name:
            return ATTENTION_LEAVES.get(attribute, "linear")
        if re.search(r"MLP|FeedForward|Expert|FFN", parent_class, re.I) or \
                re.search(r"mlp|ffn|feed_forward|expert", parent_name):
            return MLP_LEAVES.get(attribute, "linear")
        return "linear"

    def experts_per_layer(self) -> dict[str, Any]:
        """Mixture-of-experts facts from the model: routed experts per MoE layer (layer → count), whether shared
        experts exist, and how many MoE layers there are (an empty dict for dense models).

        Returns:
            ``{"moe_layers": N, "experts": E, "shared_experts": bool}`` or ``{}``.

        Example: ``layout.experts_per_layer()   # {"moe_layers": 2, "experts": 8, "shared_experts": False}``
        """
        counts = {}
        for parameter in self.parameters.values():
            if parameter.cls.endswith("Experts") and parameter.part == "text" \
                    and len(parameter.shape) == 3:
                counts[parameter.layer] = parameter.shape[0]
        if not counts:
            return {}
        shared = any("shared_expert" in p.path for p in self.parameters.values())
        return {"moe_layers": len(counts), "experts": max(counts.values()), "shared_experts": shared}

    def parts(self) -> dict[str, int]:
        """Parameter count per part (text, vision, projector) of the model."""
        import math

        totals: dict[str, int] = {}
        for parameter in self.parameters.values():
            if parameter.alias:
                continue
            totals[parameter.part] = totals.get(parameter.part, 0) + math.prod(parameter.shape)
        return totals


def _sort(module, head, embeddings) -> str:
    """What ``module`` is to the roles: the head, the input embedding, another embedding, a Linear (what quantized
    loaders replace), GPT-2's Conv1D, or other."""
    from torch import nn

    if head is not None and module is head:
        return "head"
    if embeddings is not None and module is embeddings:
        return "input_embedding"
    if isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding"):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if type(module).__name__ == "Conv1D" else "other"
