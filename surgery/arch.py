"""Architecture knowledge: what each tensor is, and the attention geometry from ``config.json``.

>>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
...                                  "num_attention_heads": 4, "num_key_value_heads": 2})
>>> arch.role("model.layers.1.self_attn.k_proj.weight").kind, arch.role("model.layers.1.self_attn.k_proj.weight").layer
('attn_k', 1)
>>> arch.head_dim, arch.num_key_value_heads
(16, 2)

Every family transformers implements is known: roles come from the model it builds for the config on the meta
device (surgery/layout.py: module classes, weight conversions, experts, vision tower). A model type transformers
does not have (custom code) falls back to name patterns common across model families, with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from surgery.layout import ModelLayout, TensorRole, known_model_type

log = logging.getLogger(__name__)

# Generic patterns for unknown architectures, tried in order on the module name. A fused qkv projection is tried
# before q, k and v (falcon's query_key_value ends in "value"); routers and position embeddings have roles of their
# own, so that nothing treats them as projections (SVD merges decompose only projections).
MLP_PARENT = r"(mlp|ffn|feed_forward|experts\.\d+|shared_experts?)"
FALLBACK_PATTERNS = [
    (r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)$", "embedding"),
    (r"(^|\.)(wpe|embed_positions|position_embeddings)$", "position_embedding"),
    (r"(^|\.)(lm_head|embed_out|output)$", "lm_head"),
    (r"(norm|ln_\w+|ln_?\d*|layernorm)$", "norm"),
    (r"(^|\.)(gate|router|shared_expert_gate)$", "router"),
    (MLP_PARENT + r"\.(gate_proj|w1)$", "mlp_gate"),
    (MLP_PARENT + r"\.(up_proj|w3|c_fc|fc1|fc_in|dense_h_to_4h)$", "mlp_up"),
    (MLP_PARENT + r"\.(down_proj|w2|c_proj|fc2|fc_out|dense_4h_to_h)$", "mlp_down"),
    (MLP_PARENT + r"\.gate_up_proj$", "mlp_gate_up"),
    (r"(qkv_proj|c_attn|query_key_value|Wqkv)$", "attn_qkv"),
    (r"(q_proj|query|wq)$", "attn_q"), (r"(k_proj|key|wk)$", "attn_k"), (r"(v_proj|value|wv)$", "attn_v"),
    (r"(o_proj|out_proj|dense|c_proj|wo)$", "attn_o"),
]
# Roles of weights that act as projections of the hidden state (what quantizers quantize).
PROJECTION_KINDS = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "attn_q_a", "attn_q_b", "attn_kv_a",
                    "attn_kv_b", "mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up", "linear"}
# 2-D weights that are not projections to decompose: rows by token or position, and MoE routers (a handful of rows
# whose every direction matters). SVD methods decompose every other 2-D weight (vision towers, MLA's q_a/kv_a...).
NOT_DECOMPOSED_KINDS = {"embedding", "lm_head", "position_embedding", "router"}
_WARNED: set = set()  # model types already warned about in this process
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
# transformers' default for tie_word_embeddings when config.json omits it (the base config class says True).
UNTIED_BY_DEFAULT = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
VISION_MODULE = re.compile(r"(^|\.)(vision_tower|vision_model|multi_modal_projector)\.")


def with_layer_index(name: str, layer: int) -> str:
    """``name`` moved to decoder layer ``layer`` (ValueError when ``name`` is not inside a decoder layer).

    Args:
        name: a tensor name inside a decoder layer.
        layer: the new layer index.

    Returns:
        The name with its layer index replaced.

    Example: ``with_layer_index("model.layers.3.mlp.up_proj.weight", 7)`` is ``"model.layers.7.mlp.up_proj.weight"``
    """
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a decoder layer")
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


@dataclass
class Architecture:
    """Geometry and tensor roles of one checkpoint."""

    model_type: str | None
    architectures: list[str]
    known: bool
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    rope: dict
    layout: ModelLayout | None = field(default=None, repr=False)
    num_experts_per_tok: int | None = None
    text_model_type: str | None = None  # the language model's: a vision-language model's text_config's

    @classmethod
    def from_config(cls, config: dict | None) -> "Architecture":
        config = config or {}
        text = config.get("text_config") or config  # multimodal wrappers (gemma3) keep the LM in text_config
        model_type = config.get("model_type")
        layout = ModelLayout.build(config)
        known = layout is not None
        if not known and not known_model_type(model_type) and model_type not in _WARNED:  # else: layout warned
            _WARNED.add(model_type)
            log.warning("unknown architecture %r: tensor roles are guessed from their names", model_type)
        heads = text.get("num_attention_heads")
        hidden = text.get("hidden_size")
        head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        if layout is not None:
            tied = layout.tied
        elif tied is None:
            tied = model_type not in UNTIED_BY_DEFAULT
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if "rope_theta" in text:
            rope.setdefault("rope_theta", text["rope_theta"])
        return cls(
            model_type=model_type,
            architectures=list(config.get("architectures") or []),
            known=known,
            num_layers=text.get("num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim,
            vocab_size=text.get("vocab_size"),
            tie_word_embeddings=bool(tied),
            max_position_embeddings=text.get("max_position_embeddings"),
            rope=rope,
            layout=layout,
            num_experts_per_tok=text.get("num_experts_per_tok", text.get("moe_topk")),
            text_model_type=text.get("model_type") or model_type,
        )

    def role(self, name: str) -> TensorRole:
        """Role of the tensor called ``name`` (a checkpoint tensor name such as ``model.layers.3.mlp.up_proj.weight``):
        from transformers' model when it knows the family, else guessed from the name."""
        if self.layout is not None:
            role = self.layout.role(name)
            if role is not None:
                return role
        module = re.sub(r"\.(weight|bias)$", "", name)
        match = LAYER_INDEX.search(module)
        layer = int(match.group(1)) if match else None
        if VISION_MODULE.search(module):
            return TensorRole("other", part="vision")
        if self.layout is not None:  # a tensor the model has no parameter for
            return TensorRole("other", layer)
        for pattern, kind in FALLBACK_PATTERNS:
            if re.search(pattern, module):
                return TensorRole(kind, layer, linear=kind in PROJECTION_KINDS or kind == "lm_head")
        return TensorRole("other", layer)

    def holds_every_expert(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the tensor ``name`` of ``shape`` is a projection of every expert in one 3-D tensor, as the
        checkpoint stores it (gpt-oss's ``mlp.experts.gate_up_proj``: (experts, inputs, outputs))."""
        role = self.role(name)
        return role.experts is not None and len(shape) == 3 and role.kind in PROJECTION_KINDS

    def text_key(self, name: str) -> str | None:
        """Where ``name`` sits in the language model, whatever wraps it (see :meth:`ModelLayout.text_key`); None for
        families transformers does not know."""
        return self.layout.text_key(name) if self.layout is not None else None

    def loader_module(self, module: str) -> str:
        """The name transformers' model gives checkpoint module ``module`` (see :meth:`ModelLayout.loader_module`);
        ``module`` itself for families transformers does not know."""
        return self.layout.loader_module(module) if self.layout is not None else module

    def summary(self) -> dict:
        """Plain-data view for reports."""
        return {
            "model_type": self.model_type, "architectures": self.architectures, "known_family": self.known,
            "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "rope": self.rope,
            **self.experts_summary(), **({"parameters_by_part": self.layout.parts()}
                                         if self.layout is not None and len(self.layout.parts()) > 1 else {}),
        }

    def experts_summary(self) -> dict:
        """Mixture-of-experts facts for reports: MoE layers, experts per layer, active experts per token, whether
        there are shared experts (empty for dense models)."""
        moe = self.layout.experts_per_layer() if self.layout is not None else {}
        if not moe:
            return {}
        return {"moe_layers": moe["moe_layers"], "experts_per_layer": moe["experts"],
                "active_experts": self.num_experts_per_tok, "shared_experts": moe["shared_experts"]}
