"""NTK-attention adapters (arXiv 2406.14036) made from a prompt, or trained on task data::

    prompt_kv = prompt_keys_values(model, ids)                 # the prompt's keys and values, per layer
    exact = heaviest_prompt_tokens(model, prompt_kv, queries, 16)   # 0.
    adapter = closed_form(model, prompt_kv, exact)             # 1.
    least_squares(model, adapter, prompt_kv, queries)          # 2.
    distill(model, adapter, queries, reference, steps=60, lr=1e-2, batch=8, seed=0)   # 3.

0. exact tokens (ours, in the spirit of heavy-hitter KV caches, arXiv 2306.14048): per layer and KV head, the prompt
   tokens that draw the most attention from the queries in the model run with the real prompt (the first token,
   an attention sink, among them) are kept as they are: their sharply peaked e^{q·k/√d} is what φ(q)ᵀφ(k)
   approximates worst. Z and k then stand in for the rest of the prompt only.
1. closed form (the paper's): the prompt is prefilled at positions −m..−1, so that its keys stand where queries that
   start at position 0 see them, and Z = Σ_j φ(k_j) v_jᵀ, k = Σ_j φ(k_j) per layer and KV head over the tokens
   not kept exactly. φ(q)ᵀφ(k) is a poor stand-in for e^{q·k/√d}, so this start is usually worse than no prompt.
2. least squares, layer by layer in one forward pass over the queries (ours; no public work distils a prompt into
   NTK-attention): at each layer, for the queries it really receives (earlier layers already adapted), the output
   with the real prompt o* = (e^ℓ o + N)/(e^ℓ + D), N = Σ_j e^{q·k_j/√d} v_j, D = Σ_j e^{q·k_j/√d}, is known
   exactly (o and ℓ include the exact tokens; N and D sum over the rest). Z and k ≥ 0 minimise the adapter's output
   error linearised around it, Σ ‖(e^ℓ o + φ(q)ᵀZ − o* (e^ℓ + φ(q)ᵀk)) / (e^ℓ + D)‖², a quadratic solved in closed
   form (NNLS for k).
3. distillation: Adam on Z and k (steps relative to each head's size, cosine schedule) minimising
   KL(with prompt ‖ with adapter) on minibatches of the queries; with validation queries, the values with the lowest
   validation KL are kept (the least-squares start included: with exact tokens, distillation tends to overfit).

:func:`train_on_data` is the paper's other use: the same module trained by next-token loss on task data.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from surgery.adapters.prompts import Queries, cache_layers, plain_logprobs, prefill
from surgery.adapters import ntk_attention
from surgery.adapters.ntk_attention import (
    NTKAdapter, attention_logsumexp, attention_modules, feature_map, merge, token_attention,
)
from surgery.runtime import mean_kl

log = logging.getLogger(__name__)
RIDGE = 1e-6  # Tikhonov term of the least squares, relative to the mean diagonal of the normal matrix
VALIDATE_EVERY = 25  # distillation steps between validations
PATIENCE = 2  # validations without improvement before distillation stops


def prompt_keys_values(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [kv_heads, m, d] of the prompt prefilled at positions −m..−1, float32.

    Args:
        model: a loaded llama, mistral or qwen2 causal LM.
        ids: the prompt's token ids [1, m].

    Returns:
        One (keys after RoPE, values) pair per layer.

    Example:
        ``prompt_kv = prompt_keys_values(model, prompt_ids(tokenizer, text))``
    """
    cache, _ = prefill(model, ids, start=-ids.shape[1])
    return [(keys[0].float(), values[0].float()) for keys, values in cache_layers(cache)]


def _split_prompt(keys: torch.Tensor, values: torch.Tensor, exact_index: torch.Tensor | None):
    """One layer's prompt (keys, values) [kv_heads, m, d] split into the tokens at ``exact_index`` [kv_heads, s]
    and the rest, each per KV head in prompt order: (exact keys, exact values, rest keys, rest values)."""
    if exact_index is None:
        exact_index = torch.empty(keys.shape[0], 0, dtype=torch.long)
    keep = torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
    keep.scatter_(1, exact_index.to(keys.device), True)
    heads = range(keys.shape[0])
    return tuple(torch.stack([tensor[head][chosen[head]] for head in heads])
                 for chosen in (keep, ~keep) for tensor in (keys, values))


def _projections(module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
    """Query and key (after RoPE) and value [batch, heads, length, d] of an attention module, float32."""
    batch, length, _ = hidden.shape

    def project(linear) -> torch.Tensor:
        return linear(hidden).view(batch, length, -1, module.head_dim).transpose(1, 2).float()

    query, key = _rotary(module)(project(module.q_proj), project(module.k_proj), *position_embeddings)
    return query, key, project(module.v_proj)


def _each_layer(model, queries: Queries, visit, prompt_kv=None, adapter: NTKAdapter | None = None) -> None:
    """Run ``queries`` through ``model`` in one batch, with ``adapter`` (or the real prompt ``prompt_kv``) applied,
    calling ``visit(layer, module, hidden_states, position_embeddings, mask)`` before each attention module runs."""
    handles = []
    mask = queries.mask.to(model.device)

    def hook(layer):
        def before(module, args, kwargs):
            visit(layer, module, kwargs["hidden_states"], kwargs["position_embeddings"], mask)
        return before

    if adapter is not None:
        ntk_attention.apply(model, adapter)
    else:
        ntk_attention.apply_prompt(model, prompt_kv)
    try:
        for layer, module in enumerate(attention_modules(model)):
            handles.append(module.register_forward_pre_hook(hook(layer), with_kwargs=True))
        with torch.no_grad():
            model(queries.ids.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
        ntk_attention.remove(model)


def heaviest_prompt_tokens(model, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], queries: Queries,
                           count: int) -> list[torch.Tensor]:
    """Per layer the positions of the prompt tokens that draw the most attention in the model run with the real prompt.

    The attention is summed over the query heads of each KV head and the real positions of ``queries``.

    Args:
        model: a loaded llama, mistral or qwen2 causal LM.
        prompt_kv: the prompt's keys and values from :func:`prompt_keys_values`.
        queries: the queries whose attention is summed.
        count: tokens to keep per KV head (capped at the prompt's length).

    Returns:
        Per layer [kv_heads, count] prompt positions, ascending.

    Example:
        ``exact = heaviest_prompt_tokens(model, prompt_kv, queries, 16)``
    """
    count = min(count, prompt_kv[0][0].shape[1])
    chosen: list[torch.Tensor | None] = [None] * len(prompt_kv)

    def visit(layer, module, hidden, position_embeddings, mask):
        query, key, _ = _projections(module, hidden, position_embeddings)
        keys = prompt_kv[layer][0].float()
        batch, heads, length, dim = query.shape
        own = attention_logsumexp(query, key, None, module.scaling)
        scores = torch.einsum("bhgnd,hmd->bhgnm", query.reshape(batch, len(keys), heads // len(keys), length, dim),
                              keys) * module.scaling
        total = torch.logaddexp(own.reshape(scores.shape[:4]), torch.logsumexp(scores, dim=-1))
        weights = torch.exp(scores - total[..., None]) * mask[:, None, None, :, None]
        chosen[layer] = weights.sum((0, 2, 3)).topk(count, dim=-1).indices.sort(dim=-1).values.cpu()

    _each_layer(model, queries, visit, prompt_kv=prompt_kv)
    return chosen


def closed_form(model, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], exact: list[torch.Tensor] | None = None,
                **config) -> NTKAdapter:
    """The paper's closed-form adapter: Z = Σ_j φ(k_j) v_jᵀ, k = Σ_j φ(k_j) per layer and KV head.

    The prompt tokens at ``exact`` are kept as they are, and Z and k sum over the others.

    Args:
        model: the model the adapter is shaped for.
        prompt_kv: the prompt's keys and values from :func:`prompt_keys_values`.
        exact: per layer [kv_heads, s] positions of tokens to keep exactly, or None.
        **config: extra entries of the adapter's config.

    Returns:
        The new :class:`NTKAdapter`.

    Example:
        ``adapter = closed_form(model, prompt_kv, exact, source="org/model")``
    """
    adapter = NTKAdapter.zeros(model, **config)
    kept = []
    for layer, (keys, values) in enumerate(prompt_kv):
        exact_keys, exact_values, rest_keys, rest_values = _split_prompt(keys, values, exact[layer] if exact else None)
        kept.append((exact_keys.cpu(), exact_values.cpu()))
        features = feature_map(rest_keys)
        adapter.z[layer] = torch.einsum("hmd,hme->hde", features, rest_values).cpu()
        adapter.k[layer] = features.sum(1).cpu()
    if exact is not None and exact[0].shape[1]:
        adapter.exact_keys = torch.stack([keys for keys, _ in kept])
        adapter.exact_values = torch.stack([values for _, values in kept])
        adapter.exact_index = torch.stack(exact)
    return adapter


def _rotary(module):
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def _nonnegative_solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """argmin_{x ≥ 0} xᵀ G x − 2 xᵀ b, as an NNLS problem on G's Cholesky factor."""
    from scipy.optimize import nnls

    lower = np.linalg.cholesky(gram)
    solution, _ = nnls(lower.T, np.linalg.solve(lower, rhs), maxiter=50 * len(rhs))
    return solution


def _fit_layer(module, adapter: NTKAdapter, layer: int, keys_values, hidden, position_embeddings,
               mask: torch.Tensor) -> None:
    """Least-squares Z and k of one layer from the queries it receives (see the module docstring)."""
    query, key, value = _projections(module, hidden, position_embeddings)
    index = adapter.exact_index[layer] if adapter.exact_tokens else None
    exact_keys, exact_values, rest_keys, rest_values = _split_prompt(*keys_values, index)
    kv_heads, groups = rest_keys.shape[0], query.shape[1] // rest_keys.shape[0]
    own_lse = attention_logsumexp(query, key, None, module.scaling)
    own_out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True,
        scale=module.scaling)
    own_out, own_lse = merge(own_out, own_lse, *token_attention(query, exact_keys, exact_values, module.scaling))
    rest_out, rest_lse = token_attention(query, rest_keys, rest_values, module.scaling)   # N / D, log D
    target, log_total = merge(own_out, own_lse, rest_out, rest_lse)                   # o*: the output with the prompt
    share = torch.exp(rest_lse - log_total)[..., None]                                # g = w·D
    weighted = feature_map(query) * torch.exp(-log_total)[..., None]                 # a = w·φ(q)
    # Residual of the output, linearised: r = aᵀZ − o* aᵀk − t with t = (1 − g)(o* − o_s), per output column.
    offset = (1 - share) * (target - own_out)
    batch, _, length, _ = query.shape

    def head_rows(tensor: torch.Tensor, head: int) -> torch.Tensor:
        grouped = tensor.reshape(batch, kv_heads, groups, length, -1)[:, head]
        return grouped[mask[:, None, :].expand(batch, groups, length)].double()

    for head in range(kv_heads):
        z, k = _joint_solve(head_rows(weighted, head), head_rows(target, head), head_rows(offset, head))
        adapter.z[layer, head] = z.float()
        adapter.k[layer, head] = k.float()


def _joint_solve(a: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over Z and k ≥ 0 of Σ_rows Σ_c (aᵀZ_c − out_c aᵀk − t_c)²: Z eliminated (Z_c = G⁻¹(H_c k + b_c)),
    k from the remaining d×d quadratic by NNLS."""
    dim = a.shape[1]
    gram = a.T @ a
    ridge = torch.eye(dim, dtype=a.dtype) * RIDGE * gram.diagonal().mean().clamp_min(1e-300)
    gram = gram + ridge
    cross = torch.stack([(a * column[:, None]).T @ a for column in out.T])  # H_c = Σ_rows out_c a aᵀ
    rhs = a.T @ t                                                       # b_c as columns [d, d_v]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    solved_cross = inverse @ cross                                      # G⁻¹ H_c
    solved_rhs = inverse @ rhs                                          # G⁻¹ b_c
    second = (a * (out * out).sum(1, keepdim=True)).T @ a + ridge      # Σ_c M_c
    schur = second - torch.einsum("cij,cjk->ik", cross, solved_cross)
    linear = torch.einsum("cij,jc->i", cross, solved_rhs) - a.T @ (out * t).sum(1)
    schur = (schur + schur.T) / 2
    k = torch.from_numpy(_nonnegative_solve(schur.numpy(), linear.numpy()))
    z = solved_rhs + torch.einsum("cij,j->ic", solved_cross, k)
    return z, k


def least_squares(model, adapter: NTKAdapter, prompt_kv, queries: Queries) -> None:
    """Fit every layer's Z and k (in place) in one forward pass over ``queries`` with the adapter applied.

    Each layer is fitted on the queries it receives, before its attention runs with the new values.

    Args:
        model: the model ``adapter`` is applied to.
        adapter: the adapter to fit (its exact tokens are kept).
        prompt_kv: the prompt's keys and values from :func:`prompt_keys_values`.
        queries: the queries to fit on.

    Example:
        ``least_squares(model, adapter, prompt_kv, queries)``
    """
    def fit(layer, module, hidden, position_embeddings, mask):
        _fit_layer(module, adapter, layer, prompt_kv[layer], hidden, position_embeddings, mask)

    _each_layer(model, queries, fit, adapter=adapter)


def adapter_kl(model, adapter: NTKAdapter, queries: Queries, reference: torch.Tensor) -> float:
    """Mean KL(with prompt ‖ with adapter) over the queries' positions.

    Args:
        model: the model to apply ``adapter`` to (removed again afterwards).
        adapter: the adapter measured.
        queries: the queries.
        reference: the log-probabilities of the queries with the real prompt.

    Returns:
        The mean KL, in nats.

    Example:
        ``kl = adapter_kl(model, adapter, held_out, held_out_reference)``
    """
    ntk_attention.apply(model, adapter)
    try:
        return float(mean_kl(reference, plain_logprobs(model, queries), queries.mask))
    finally:
        ntk_attention.remove(model)


class _Relative:
    """Z = Z₀ + s_Z ΔZ and k = k₀ + s_k Δk with s the RMS of each head's starting values (1 where they are 0),
    so that one learning rate suits heads of any scale; Δ are the trained parameters."""

    def __init__(self, adapter: NTKAdapter, absolute: bool):
        self.adapter = adapter
        self.z0, self.k0 = adapter.z.detach().clone(), adapter.k.detach().clone()
        self.z_scale = self._scale(self.z0, absolute)
        self.k_scale = self._scale(self.k0, absolute)
        self.delta_z = torch.zeros_like(self.z0, requires_grad=True)
        self.delta_k = torch.zeros_like(self.k0, requires_grad=True)

    @staticmethod
    def _scale(start: torch.Tensor, absolute: bool) -> torch.Tensor:
        if absolute:
            return torch.ones(start.shape[:2] + (1,) * (start.ndim - 2))
        rms = start.flatten(2).pow(2).mean(-1).sqrt()
        return torch.where(rms > 0, rms, torch.ones_like(rms)).reshape(start.shape[:2] + (1,) * (start.ndim - 2))

    def parameters(self) -> list[torch.Tensor]:
        return [self.delta_z, self.delta_k]

    def refresh(self) -> None:
        """Point the adapter at the current values (with their graph, for the next backward pass)."""
        self.adapter.z = self.z0 + self.z_scale * self.delta_z
        self.adapter.k = self.k0 + self.k_scale * self.delta_k

    def freeze(self) -> NTKAdapter:
        with torch.no_grad():
            self.refresh()
        self.adapter.z, self.adapter.k = self.adapter.z.detach(), self.adapter.k.detach()
        return self.adapter


@dataclass
class Training:
    """What :func:`distill` and :func:`train_on_data` report: the loss of every step and, when validated, the
    validation loss by step (step 0: the start) and the step whose values were kept."""

    losses: list[float]
    validation: dict[int, float] = field(default_factory=dict)
    kept_step: int | None = None


def _optimise(model, adapter: NTKAdapter, loss_of, count: int, *, steps: int, lr: float, batch: int, seed: int,
              absolute: bool = False, validate=None) -> Training:
    """Adam on the adapter for ``steps`` minibatches of ``batch`` rows drawn (seeded) from ``count``; ``loss_of(rows)``
    is the loss of those rows with the adapter applied. With ``validate`` (the validation loss with the adapter
    applied), checked at the start and every VALIDATE_EVERY steps: the best values seen are kept, and training stops
    after PATIENCE checks without improvement."""
    if steps <= 0:
        return Training([])
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)  # only the adapter learns; restored below
    relative = _Relative(adapter, absolute)
    optimiser = torch.optim.Adam(relative.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    training = Training([])
    best = None

    def check(step: int) -> bool:
        """Validate at ``step``; False when it is time to stop."""
        nonlocal best
        with torch.no_grad():
            relative.refresh()
            training.validation[step] = float(validate())
        log.info("step %d/%d: validation loss %.4f", step, steps, training.validation[step])
        if best is None or training.validation[step] < training.validation[training.kept_step]:
            best = [parameter.detach().clone() for parameter in relative.parameters()]
            training.kept_step = step
        return step - training.kept_step < PATIENCE * VALIDATE_EVERY

    ntk_attention.apply(model, adapter)
    try:
        if validate is not None:
            check(0)
        for step in range(1, steps + 1):
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(count, generator=generator)])
            rows, order = order[:batch], order[batch:]
            relative.refresh()
            loss = loss_of(rows)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            training.losses.append(loss.item())
            log.info("step %d/%d: loss %.4f", step, steps, training.losses[-1])
            if validate is not None and (step % VALIDATE_EVERY == 0 or step == steps) and not check(step):
                break
        if best is not None:
            with torch.no_grad():
                for parameter, kept in zip(relative.parameters(), best):
                    parameter.copy_(kept)
    finally:
        ntk_attention.remove(model)
        relative.freeze()
        for parameter in trainable:
            parameter.requires_grad_(True)
    return training


def distill(model, adapter: NTKAdapter, queries: Queries, reference: torch.Tensor, *, steps: int, lr: float,
            batch: int, seed: int, validation: tuple[Queries, torch.Tensor] | None = None) -> Training:
    """Train Z and k (in place) to minimise KL(with prompt ‖ with adapter) on minibatches of ``queries``.

    With ``validation`` the values with the lowest validation KL are kept (the start included) and training stops
    once it no longer falls.

    Args:
        model: the model the adapter is applied to while training.
        adapter: the adapter trained.
        queries: the training queries.
        reference: their log-probabilities with the real prompt.
        steps: Adam steps (at most).
        lr: the learning rate, relative to each head's scale (cosine schedule).
        batch: queries per step.
        seed: the seed of the minibatch order.
        validation: held-out queries and their reference log-probabilities, or None.

    Returns:
        The :class:`Training`: the loss of each step, validation losses and the step kept.

    Example:
        ``distill(model, adapter, queries, reference, steps=60, lr=1e-2, batch=8, seed=0)``
    """
    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        part = queries.subset(rows)
        logits = model(part.ids.to(model.device)).logits.float()
        return mean_kl(reference[rows].to(model.device), torch.log_softmax(logits, dim=-1), part.mask.to(model.device))

    def validate() -> float:
        held, held_reference = validation
        return mean_kl(held_reference, plain_logprobs(model, held), held.mask)

    return _optimise(model, adapter, loss_of, len(queries), steps=steps, lr=lr, batch=batch, seed=seed,
                     validate=validate if validation is not None else None)


def train_on_data(model, adapter: NTKAdapter, data: Queries, *, steps: int, lr: float, batch: int, seed: int,
                  absolute: bool) -> Training:
    """Train Z and k (in place) by next-token cross-entropy on ``data`` (the paper's parameter-efficient fine-tuning).

    Args:
        model: the model the adapter is applied to while training.
        adapter: the adapter trained.
        data: the training sequences (loss on their real tokens).
        steps: Adam steps.
        lr: the learning rate.
        batch: sequences per step.
        seed: the seed of the minibatch order.
        absolute: steps for an adapter started from noise rather than scaled to each head's starting values.

    Returns:
        The :class:`Training` with the loss of each step.

    Example:
        ``train_on_data(model, random_start(model, 0), data, steps=100, lr=1e-3, batch=8, seed=0, absolute=True)``
    """
    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        part = data.subset(rows)
        ids = part.ids.to(model.device)
        labels = ids.masked_fill(~part.mask.to(model.device), -100)
        return model(ids, labels=labels).loss

    return _optimise(model, adapter, loss_of, len(data), steps=steps, lr=lr, batch=batch, seed=seed,
                     absolute=absolute)


def random_start(model, seed: int, **config) -> NTKAdapter:
    """The paper's start for training from scratch: randn / 1e4 (seeded).

    Args:
        model: the model the adapter is shaped for.
        seed: the seed of the noise.
        **config: extra entries of the adapter's config.

    Returns:
        The new :class:`NTKAdapter`.

    Example:
        ``adapter = random_start(model, 0, source="org/model")``
    """
    adapter = NTKAdapter.zeros(model, **config)
    generator = torch.Generator().manual_seed(seed)
    adapter.z = torch.randn(adapter.z.shape, generator=generator) / 1e4
    adapter.k = torch.randn(adapter.k.shape, generator=generator) / 1e4
    return adapter


def sizes(adapter: NTKAdapter, prompt_tokens: int | None, kv_itemsize: int) -> dict:
    """The adapter's bytes as saved against those of the prompt's KV cache in the model's dtype.

    Args:
        adapter: the adapter.
        prompt_tokens: the prompt's length, or None (no KV cache size then).
        kv_itemsize: bytes per element of the model's KV cache.

    Returns:
        ``adapter_parameters``, ``adapter_bytes``, ``exact_tokens``, ``prompt_kv_cache_bytes`` and
        ``break_even_prompt_tokens`` (the prompt length whose KV cache is as big as the adapter).

    Example:
        ``sizes(adapter, 512, 2)["break_even_prompt_tokens"]``
    """
    layers, heads, dim = adapter.k.shape
    per_token = 2 * layers * heads * dim * kv_itemsize
    kv = None if prompt_tokens is None else per_token * prompt_tokens
    return {"adapter_parameters": sum(tensor.numel() for tensor in adapter.tensors().values()
                                      if tensor.is_floating_point()),  # exact_index holds positions, not values
            "adapter_bytes": adapter.nbytes, "exact_tokens": adapter.exact_tokens, "prompt_kv_cache_bytes": kv,
            "break_even_prompt_tokens": math.ceil(adapter.nbytes / per_token)}
