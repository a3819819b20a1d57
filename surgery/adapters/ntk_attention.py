"""NTK-attention at run time (arXiv 2406.14036): a prefix of any length folded, per layer and KV head, into a d×d
matrix Z and a d-vector k that every query reads through the feature map φ(x) = elu(x / d^¼) + 1, optionally with
a few of the prefix's tokens kept exactly::

    from surgery.evaluation import load_model
    from surgery.adapters import ntk_attention

    model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    ntk_attention.apply(model, "persona-ntk")          # a directory written by `surgery adapter ntk`
    model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)   # as if the prompt came first
    ntk_attention.remove(model)                         # the original model again, bit for bit

Supported path: llama, mistral and qwen2 models of transformers whose attention modules call
``ALL_ATTENTION_FUNCTIONS`` (transformers ≥ 4.48). :func:`apply` registers the attention implementation
"surgery_ntk" and switches the model to it (whatever it used before: eager, sdpa...): torch's
scaled_dot_product_attention called exactly as transformers' "sdpa" calls it (same masks, same KV cache, so
``generate`` works with or without cache), then for every query row, in float32 on the post-RoPE queries,

    O = (e^ℓ O_sdpa + φ(Q) Z) / (e^ℓ + φ(Q)|k|)

with ℓ the log-sum-exp of the row's scaled, masked attention scores (computed alongside, in blocks of rows); the
query heads of a KV group share their KV head's Z and k. Exact tokens (keys after RoPE at their prompt positions,
and values, per layer and KV head) are attended to first, as real keys every row sees, and merged into O_sdpa and ℓ
by their log-sum-exp. A zero adapter returns O_sdpa exactly. :func:`remove` puts back the previous implementation.
Files: ``ntk_attention_config.json`` and ``ntk_attention.safetensors`` with ``z`` [layers, kv_heads, d, d] and
``k`` [layers, kv_heads, d], float32, and when tokens are kept exactly ``exact_keys`` / ``exact_values``
[layers, kv_heads, tokens, d] (float32) and ``exact_index`` [layers, kv_heads, tokens] (their prompt positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from surgery.errors import BadInput

IMPLEMENTATION = "surgery_ntk"
CONFIG_FILE = "ntk_attention_config.json"
WEIGHTS_FILE = "ntk_attention.safetensors"
FORMAT = "surgery-ntk-attention/1"
FAMILIES = ("llama", "mistral", "qwen2")
STATE = "ntk_attention"           # attribute set on each patched attention module
PREVIOUS = "_ntk_attention_previous"  # the implementation to restore, set on the patched model
ROW_BLOCK = 512                   # query rows per block when computing ℓ (bounds the score matrix in memory)
EXACT = ("exact_keys", "exact_values", "exact_index")  # the optional tensors of prompt tokens kept exactly


@dataclass
class NTKAdapter:
    """Z [layers, kv_heads, d, d_v] and k [layers, kv_heads, d] (float32), optionally prompt tokens kept exactly
    (``exact_keys`` after RoPE, ``exact_values``: [layers, kv_heads, tokens, d]; ``exact_index``: their prompt
    positions [layers, kv_heads, tokens]), and the config that names the model geometry they were made for
    (``model_type``, ``num_layers``, ``num_key_value_heads``, ``head_dim``...)."""

    z: torch.Tensor
    k: torch.Tensor
    config: dict = field(default_factory=dict)
    exact_keys: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None
    exact_index: torch.Tensor | None = None

    @classmethod
    def zeros(cls, model, **config) -> "NTKAdapter":
        """The adapter that changes nothing, shaped for ``model``."""
        geometry = model_geometry(model)
        layers, heads, dim = geometry["num_layers"], geometry["num_key_value_heads"], geometry["head_dim"]
        return cls(torch.zeros(layers, heads, dim, dim), torch.zeros(layers, heads, dim), {**geometry, **config})

    @classmethod
    def load(cls, directory: str | Path) -> "NTKAdapter":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise BadInput(f"{directory}: not an NTK-attention adapter ({CONFIG_FILE} and {WEIGHTS_FILE} expected)")
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            tensors = load_file(directory / WEIGHTS_FILE)
            adapter = cls(tensors["z"], tensors["k"], config, *(tensors.get(name) for name in EXACT))
        except (OSError, ValueError, KeyError) as err:
            raise BadInput(f"{directory}: unreadable NTK-attention adapter ({err})") from None
        if config.get("format") != FORMAT:
            raise BadInput(f"{directory / CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
        layers, heads, dim = adapter.k.shape
        if adapter.z.shape[:3] != (layers, heads, dim):
            raise BadInput(f"{directory / WEIGHTS_FILE}: z {tuple(adapter.z.shape)} does not match k "
                           f"{tuple(adapter.k.shape)}")
        exact = [getattr(adapter, name) for name in EXACT]
        if any(tensor is not None for tensor in exact) and (
                any(tensor is None for tensor in exact) or exact[0].shape[:2] != (layers, heads)
                or exact[0].shape != exact[1].shape[:3] + (dim,) or exact[2].shape != exact[0].shape[:3]):
            raise BadInput(f"{directory / WEIGHTS_FILE}: {', '.join(EXACT)} missing or not shaped "
                           f"[{layers}, {heads}, tokens, {dim}] (index: [{layers}, {heads}, tokens])")
        return adapter

    @property
    def exact_tokens(self) -> int:
        """Prompt tokens kept exactly, per layer and KV head."""
        return 0 if self.exact_keys is None else self.exact_keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"z": self.z.detach().float().contiguous(), "k": self.k.detach().float().contiguous()}
        if self.exact_tokens:
            tensors.update(exact_keys=self.exact_keys.float().contiguous(),
                           exact_values=self.exact_values.float().contiguous(),
                           exact_index=self.exact_index.long().contiguous())
        return tensors

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as saved."""
        return sum(tensor.nbytes for tensor in self.tensors().values())

    def config_json(self) -> bytes:
        layers, heads, dim = self.k.shape
        config = {**self.config, "format": FORMAT, "num_layers": layers, "num_key_value_heads": heads,
                  "head_dim": dim, "feature_map": "elu(x / head_dim ** 0.25) + 1", "exact_tokens": self.exact_tokens}
        return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def model_geometry(model) -> dict:
    """model_type, layers, query and KV heads and head_dim of a transformers causal LM of a supported family.

    Args:
        model: a loaded llama, mistral or qwen2 causal LM (BadInput for any other ``model_type``).

    Returns:
        ``{"model_type", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"}``.

    Example:
        ``model_geometry(model)["head_dim"]``   # 64 for SmolLM2-135M
    """
    config = model.config
    if config.model_type not in FAMILIES:
        raise BadInput(f"model type {config.model_type!r}: NTK-attention supports {', '.join(FAMILIES)}")
    heads = config.num_attention_heads
    return {"model_type": config.model_type, "num_layers": config.num_hidden_layers, "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order.

    Args:
        model: a transformers causal LM whose decoder has ``layers`` with a ``self_attn`` each.

    Returns:
        The ``self_attn`` modules, one per layer.

    Example:
        ``len(attention_modules(model)) == model.config.num_hidden_layers``
    """
    return [layer.self_attn for layer in model.get_decoder().layers]


@dataclass
class _LayerTerms:
    """What a patched attention module reads: its layer's slice of the adapter, taken at each call (so training
    updates of the adapter's tensors are seen)."""

    adapter: NTKAdapter
    layer: int

    def z_k(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.z[self.layer].to(device, torch.float32), self.adapter.k[self.layer].to(device, torch.float32)

    def exact(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's exact tokens, keys and values [kv_heads, tokens, d], or None."""
        if not self.adapter.exact_tokens:
            return None
        return (self.adapter.exact_keys[self.layer].to(device, torch.float32),
                self.adapter.exact_values[self.layer].to(device, torch.float32))


def token_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` to tokens every row sees (query heads grouped over KV heads), in float32.

    Args:
        query: [batch, heads, rows, d].
        keys: [kv_heads, m, d].
        values: [kv_heads, m, d_v].
        scaling: the factor applied to the scores (usually d^-½).

    Returns:
        The output [batch, heads, rows, d_v] and the log-sum-exp of the scores [batch, heads, rows] (0 and −inf
        when m is 0).

    Example:
        ``output, logsumexp = token_attention(query, exact_keys[layer], exact_values[layer], query.shape[-1] ** -0.5)``
    """
    batch, heads, rows, dim = query.shape
    kv_heads = keys.shape[0]
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads, rows, dim)
    scores = torch.einsum("bhgnd,hmd->bhgnm", grouped, keys.float()) * scaling
    output = torch.einsum("bhgnm,hme->bhgne", torch.softmax(scores, dim=-1).nan_to_num(), values.float())
    return output.reshape(batch, heads, rows, -1), torch.logsumexp(scores, dim=-1).reshape(batch, heads, rows)


def merge(output: torch.Tensor, logsumexp: torch.Tensor, other: torch.Tensor,
          other_logsumexp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over two disjoint sets of keys from each set's output and log-sum-exp (float32).

    Args:
        output: the attention output over the first set [..., d_v].
        logsumexp: the log-sum-exp of the first set's scores [...].
        other: the attention output over the second set [..., d_v].
        other_logsumexp: the log-sum-exp of the second set's scores [...].

    Returns:
        The output over both sets and its log-sum-exp.

    Example:
        ``mixed, logsumexp = merge(mixed, logsumexp, *token_attention(query, keys, values, scaling))``
    """
    total = torch.logaddexp(logsumexp, other_logsumexp)
    share = torch.exp(other_logsumexp - total).nan_to_num()[..., None]
    own = output.float()
    return own + share * (other.float() - own), total


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x / d^¼) + 1, positive everywhere (d = the last dimension).

    Args:
        x: any tensor; its last dimension is d.

    Returns:
        φ(x), shaped like ``x``.

    Example:
        ``feature_map(torch.zeros(2, 64))``   # all ones
    """
    return F.elu(x / x.shape[-1] ** 0.25) + 1


def attention_logsumexp(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """ℓ: per query row, the log-sum-exp of the scores scaled_dot_product_attention normalises.

    The mask rules are those of transformers' sdpa path: no mask means causal when there are several queries (keys
    cut to the first ``queries`` then, as it does); a boolean mask's True attends; a float mask is added.

    Args:
        query: [batch, heads, queries, d] (after RoPE).
        key: [batch, kv_heads, keys, d] (after RoPE).
        attention_mask: None, boolean or additive float, broadcastable to [batch, heads, queries, keys].
        scaling: the factor applied to the scores.

    Returns:
        ℓ [batch, heads, queries], float32, computed in blocks of ``ROW_BLOCK`` rows.

    Example:
        ``logsumexp = attention_logsumexp(query, key, None, query.shape[-1] ** -0.5)``
    """
    batch, heads, rows, dim = query.shape
    groups = heads // key.shape[1]
    if attention_mask is None and rows > 1:
        key = key[:, :, :rows]
        attention_mask = torch.ones(rows, rows, dtype=torch.bool, device=query.device).tril()
    grouped = query.float().reshape(batch, key.shape[1], groups, rows, dim)
    key = key.float()
    blocks = []
    for start in range(0, rows, ROW_BLOCK):
        scores = torch.einsum("bhgnd,bhkd->bhgnk", grouped[:, :, :, start:start + ROW_BLOCK], key) * scaling
        scores = scores.reshape(batch, heads, scores.shape[3], key.shape[2])
        if attention_mask is not None:
            mask = attention_mask[..., start:start + ROW_BLOCK, :]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        blocks.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(blocks, dim=-1)


def combine(output: torch.Tensor, logsumexp: torch.Tensor, query: torch.Tensor, z: torch.Tensor,
            k: torch.Tensor) -> torch.Tensor:
    """(e^ℓ O + φ(Q) Z) / (e^ℓ + φ(Q)|k|) in float32.

    Both terms are scaled by e^−c, c = max(ℓ, log φ(Q)|k|), so nothing overflows; where φ(Q)|k| is 0 (a zero
    adapter) the result is O exactly.

    Args:
        output: O [batch, heads, queries, d_v].
        logsumexp: ℓ [batch, heads, queries].
        query: [batch, heads, queries, d].
        z: one layer's Z [kv_heads, d, d_v].
        k: one layer's k [kv_heads, d].

    Returns:
        The mixed output [batch, heads, queries, d_v], float32.

    Example:
        ``mixed = combine(mixed, logsumexp, query, *terms.z_k(query.device))``
    """
    batch, heads, rows, dim = query.shape
    kv_heads = z.shape[0]
    features = feature_map(query.float()).reshape(batch, kv_heads, heads // kv_heads, rows, dim)
    numerator = torch.einsum("bhgnd,hde->bhgne", features, z).reshape(batch, heads, rows, -1)
    denominator = torch.einsum("bhgnd,hd->bhgn", features, k.abs()).reshape(batch, heads, rows)
    shift = torch.maximum(logsumexp, denominator.log())
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    own = torch.exp(logsumexp - shift)
    extra = torch.exp(-shift)
    total = own + denominator * extra
    mixed = (own[..., None] * output.float() + numerator * extra[..., None]) / total[..., None]
    return torch.where(total[..., None] > 0, mixed, output.float())


def ntk_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """The "surgery_ntk" attention function: transformers' sdpa, plus the NTK term of ``module``'s layer when an
    adapter is applied to it.

    Args:
        module: the attention module calling it (its adapter terms, if any, are an attribute of it).
        query: [batch, heads, queries, d] after RoPE.
        key: [batch, kv_heads, keys, d] after RoPE.
        value: [batch, kv_heads, keys, d_v].
        attention_mask: as transformers' sdpa path gets it.
        dropout: the attention dropout, passed to sdpa.
        scaling: the score scale (d^-½ when None).
        **kwargs: passed on to transformers' ``sdpa_attention_forward``.

    Returns:
        ``(output, None)``, output [batch, queries, heads, d_v] in the query's dtype, as transformers expects.

    Example:
        ``output, _ = ntk_attention_forward(model.model.layers[0].self_attn, q, k, v, None)``
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    terms: _LayerTerms | None = getattr(module, STATE, None)
    if terms is None:
        return output, None
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logsumexp = attention_logsumexp(query, key, attention_mask, scaling)
    mixed = output.transpose(1, 2)  # sdpa returns [batch, queries, heads, d_v]
    exact = terms.exact(query.device)
    if exact is not None:
        mixed, logsumexp = merge(mixed, logsumexp, *token_attention(query, *exact, scaling))
    mixed = combine(mixed, logsumexp, query, *terms.z_k(query.device))
    return mixed.transpose(1, 2).to(output.dtype).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, ntk_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def check_compatible(adapter: NTKAdapter, model, label: str = "adapter") -> None:
    """BadInput when ``adapter`` was made for another family, layer count, KV head count or head_dim than ``model``.

    Args:
        adapter: the adapter to check.
        model: the model it is meant for.
        label: how the adapter is named in the error message.

    Example:
        ``check_compatible(NTKAdapter.load("persona-ntk"), model, "persona-ntk")``
    """
    geometry = model_geometry(model)
    made_for = adapter.config.get("model_type")
    if made_for is not None and made_for != geometry["model_type"]:
        raise BadInput(f"{label}: made for a {made_for} model; this one is {geometry['model_type']}")
    layers, heads, dim = adapter.k.shape
    wanted = (geometry["num_layers"], geometry["num_key_value_heads"], geometry["head_dim"])
    if (layers, heads, dim) != wanted or adapter.z.shape[-1] != dim:
        raise BadInput(f"{label}: made for {layers} layers × {heads} KV heads × head_dim {dim}; the model has "
                       f"{wanted[0]} × {wanted[1]} × {wanted[2]}")


def _switch_attention(model) -> None:
    """Route ``model``'s attention through this module (remembering the implementation to restore)."""
    _register()
    if getattr(model, PREVIOUS, None) is None:
        setattr(model, PREVIOUS, model.config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        raise BadInput(f"{type(model).__name__}: its attention implementation cannot be switched")


def apply(model, adapter: str | Path | NTKAdapter) -> NTKAdapter:
    """Patch ``model`` (in place) so that its attention adds ``adapter``'s terms.

    The adapter's tensors are read at every call, so training them in place works. Applying again replaces it.

    Args:
        model: a loaded llama, mistral or qwen2 causal LM.
        adapter: an adapter directory (written by ``surgery adapter ntk``) or an :class:`NTKAdapter`.

    Returns:
        The applied adapter (loaded, when a directory was given).

    Example:
        ``adapter = apply(model, "persona-ntk")``
    """
    label = str(adapter) if not isinstance(adapter, NTKAdapter) else "adapter"
    if not isinstance(adapter, NTKAdapter):
        adapter = NTKAdapter.load(adapter)
    check_compatible(adapter, model, label)
    _switch_attention(model)
    for layer, module in enumerate(attention_modules(model)):
        setattr(module, STATE, _LayerTerms(adapter, layer))
    return adapter


def apply_prompt(model, keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Patch ``model`` (in place) so that every row of a batch attends to one real prompt, not repeated per row.

    The prompt is kept as the exact tokens of a zero adapter. Inputs then need position_ids from m on. Undo with
    :func:`remove`.

    Args:
        model: a loaded llama, mistral or qwen2 causal LM.
        keys_values: per layer, the prompt's (keys after RoPE, values), each [kv_heads, m, d].

    Example:
        ``apply_prompt(model, [(keys[0], values[0]) for keys, values in cache_layers(prefill(model, ids)[0])])``
    """
    adapter = NTKAdapter.zeros(model)
    adapter.exact_keys = torch.stack([keys for keys, _ in keys_values])
    adapter.exact_values = torch.stack([values for _, values in keys_values])
    adapter.exact_index = torch.arange(adapter.exact_keys.shape[2]).expand(adapter.exact_keys.shape[:3])
    apply(model, adapter)


def remove(model) -> None:
    """Undo :func:`apply`: the adapter is detached and the previous attention implementation restored.

    Args:
        model: a model patched by :func:`apply` or :func:`apply_prompt` (nothing happens to one that is not).

    Example:
        ``remove(model)``   # the original model again, bit for bit
    """
    previous = getattr(model, PREVIOUS, None)
    for module in attention_modules(model):
        if hasattr(module, STATE):
            delattr(module, STATE)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, PREVIOUS)
