"""Architecture knowledge read from ``config.json``: what each tensor is, and the attention geometry.

>>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
...                                  "num_attention_heads": 4, "num_key_value_heads": 2})
>>> arch.role("model.layers.1.self_attn.k_proj.weight")
TensorRole(kind='attn_k', layer=1)
>>> arch.head_dim, arch.num_key_value_heads
(16, 2)

Known families (llama, mistral, qwen2, qwen3, gemma/gemma2/gemma3, phi3) follow transformers' module names; any
other architecture falls back to name patterns common across model families, with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

KNOWN_FAMILIES = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3",
}

# Suffix of a module name inside a decoder layer → role, for the known families (transformers' names).
LAYER_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_o", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "norm", "self_attn.k_norm": "norm",
    "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up", "mlp.down_proj": "mlp_down", "mlp.gate_up_proj": "mlp_gate_up",
    "input_layernorm": "norm", "post_attention_layernorm": "norm", "pre_feedforward_layernorm": "norm",
    "post_feedforward_layernorm": "norm",
}

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
PROJECTION_KINDS = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up", "mlp_down",
                    "mlp_gate_up"}
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


@dataclass(frozen=True)
class TensorRole:
    """What a tensor is: ``kind`` (embedding, position_embedding, lm_head, attn_q/k/v/o/qkv,
    mlp_gate/up/down/gate_up, norm, router, vision, other)
    and the decoder layer it belongs to (None outside the layers)."""

    kind: str
    layer: int | None = None


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

    @classmethod
    def from_config(cls, config: dict | None) -> "Architecture":
        config = config or {}
        text = config.get("text_config") or config  # multimodal wrappers (gemma3) keep the LM in text_config
        model_type = config.get("model_type")
        known = model_type in KNOWN_FAMILIES
        if not known and model_type not in _WARNED:
            _WARNED.add(model_type)
            log.warning("unknown architecture %r: tensor roles are guessed from their names", model_type)
        heads = text.get("num_attention_heads")
        hidden = text.get("hidden_size")
        head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        if tied is None:
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
        )

    def role(self, name: str) -> TensorRole:
        """Role of the tensor called ``name`` (a parameter name such as ``model.layers.3.mlp.up_proj.weight``)."""
        module = re.sub(r"\.(weight|bias)$", "", name)
        match = LAYER_INDEX.search(module)
        layer = int(match.group(1)) if match else None
        if VISION_MODULE.search(module):
            return TensorRole("vision", layer)
        if self.known:
            if module.endswith("embed_tokens"):
                return TensorRole("embedding")
            if module.endswith("lm_head"):
                return TensorRole("lm_head")
            if layer is not None:
                local = module[match.end():]
                return TensorRole(LAYER_MODULES.get(local, "other"), layer)
            if module.endswith("norm"):
                return TensorRole("norm")
            return TensorRole("other")
        for pattern, kind in FALLBACK_PATTERNS:
            if re.search(pattern, module):
                return TensorRole(kind, layer)
        return TensorRole("other", layer)

    def summary(self) -> dict:
        """Plain-data view for reports."""
        return {
            "model_type": self.model_type, "architectures": self.architectures, "known_family": self.known,
            "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "rope": self.rope,
        }
