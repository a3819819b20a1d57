"""NTK-attention adapters (arXiv 2406.14036) made from a prompt, or trained on task data::

    prompt_kv = prompt_keys_values(model, ids)                 # the prompt's keys and values, per layer
    adapter = closed_form(model, prompt_kv)                    # 1.
    least_squares(model, adapter, prompt_kv, queries)          # 2.
    distill(model, adapter, queries, reference, steps=60, lr=1e-2, batch=8, seed=0)   # 3.

1. closed form (the paper's): the prompt is prefilled at positions −m..−1, so that its keys stand where queries that
   start at position 0 see them, and Z = Σ_j φ(k_j) v_jᵀ, k = Σ_j φ(k_j) per layer and KV head. φ(q)ᵀφ(k) is a poor
   stand-in for e^{q·k/√d}, so this start is usually worse than no prompt at all.
2. least squares, layer by layer in one forward pass over the queries (ours; no public work distils a prompt into
   NTK-attention): at each layer, for the queries it really receives (earlier layers already adapted), the output
   with the real prompt o* = (e^ℓ o + N)/(e^ℓ + D), N = Σ_j e^{q·k_j/√d} v_j, D = Σ_j e^{q·k_j/√d}, is known
   exactly. Z and k ≥ 0 minimise the adapter's output error linearised around it,
   Σ ‖(e^ℓ o + φ(q)ᵀZ − o* (e^ℓ + φ(q)ᵀk)) / (e^ℓ + D)‖², a quadratic solved in closed form (NNLS for k).
3. distillation: Adam on Z and k (steps relative to each head's size, cosine schedule) minimising
   KL(with prompt ‖ with adapter) on minibatches of the queries.

:func:`train_on_data` is the paper's other use: the same module trained by next-token loss on task data.
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import torch

from surgery.adapters.prompts import Queries, cache_layers, mean_kl, plain_logprobs, prefill
from surgery.extend import ntk_attention
from surgery.extend.ntk_attention import NTKAdapter, attention_logsumexp, attention_modules, feature_map

log = logging.getLogger(__name__)
RIDGE = 1e-6  # Tikhonov term of the least squares, relative to the mean diagonal of the normal matrix


def prompt_keys_values(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [kv_heads, m, d] of the prompt prefilled at positions −m..−1, float32."""
    cache, _ = prefill(model, ids, start=-ids.shape[1])
    return [(keys[0].float(), values[0].float()) for keys, values in cache_layers(cache)]


def closed_form(model, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], **config) -> NTKAdapter:
    """Z = Σ_j φ(k_j) v_jᵀ and k = Σ_j φ(k_j) per layer and KV head, from the prompt's keys and values."""
    adapter = NTKAdapter.zeros(model, **config)
    for layer, (keys, values) in enumerate(prompt_kv):
        features = feature_map(keys)
        adapter.z[layer] = torch.einsum("hmd,hme->hde", features, values).cpu()
        adapter.k[layer] = features.sum(1).cpu()
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
    batch, length, _ = hidden.shape
    dim = module.head_dim

    def project(linear) -> torch.Tensor:
        return linear(hidden).view(batch, length, -1, dim).transpose(1, 2).float()

    query, key = _rotary(module)(project(module.q_proj), project(module.k_proj), *position_embeddings)
    value = project(module.v_proj)
    prompt_keys, prompt_values = keys_values
    kv_heads, groups = prompt_keys.shape[0], query.shape[1] // prompt_keys.shape[0]
    own_lse = attention_logsumexp(query, key, None, module.scaling).reshape(batch, kv_heads, groups, length)
    own_out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True,
        scale=module.scaling).reshape(batch, kv_heads, groups, length, -1)
    grouped = query.reshape(batch, kv_heads, groups, length, dim)
    scores = torch.einsum("bhgnd,hmd->bhgnm", grouped, prompt_keys) * module.scaling
    prompt_lse = torch.logsumexp(scores, dim=-1)                                     # log D
    prompt_out = torch.einsum("bhgnm,hme->bhgne", torch.softmax(scores, dim=-1), prompt_values)  # N / D
    log_total = torch.logaddexp(own_lse, prompt_lse)
    share = torch.exp(prompt_lse - log_total)[..., None]                             # g = w·D
    target = (1 - share) * own_out + share * prompt_out                              # o*: the output with the prompt
    weighted = feature_map(grouped) * torch.exp(-log_total)[..., None]              # a = w·φ(q)
    # Residual of the output, linearised: r = aᵀZ − o* aᵀk − t with t = (1 − g)(o* − o_s), per output column.
    offset = (1 - share) * (target - own_out)
    rows = mask[:, None, None, :].expand(batch, kv_heads, groups, length)
    for head in range(kv_heads):
        pick = rows[:, head]
        a = weighted[:, head][pick].double()
        out = target[:, head][pick].double()
        t = offset[:, head][pick].double()
        z, k = _joint_solve(a, out, t)
        adapter.z[layer, head] = z.float()
        adapter.k[layer, head] = k.float()


def _joint_solve(a: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over Z and k ≥ 0 of Σ_rows Σ_c (aᵀZ_c − out_c aᵀk − t_c)²: Z eliminated (Z_c = G⁻¹(H_c k + b_c)),
    k from the remaining d×d quadratic by NNLS."""
    dim = a.shape[1]
    gram = a.T @ a
    ridge = torch.eye(dim, dtype=a.dtype) * RIDGE * gram.diagonal().mean().clamp_min(1e-300)
    gram = gram + ridge
    outer = (a[:, :, None] * a[:, None, :]).reshape(len(a), dim * dim)
    cross = (out.T @ outer).reshape(-1, dim, dim)                      # H_c = Σ_rows out_c a aᵀ
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


@torch.no_grad()
def least_squares(model, adapter: NTKAdapter, prompt_kv, queries: Queries) -> None:
    """Fit every layer's Z and k in one forward pass over ``queries`` with the adapter applied: each layer is
    fitted on the queries it receives, before its attention runs with the new values."""
    handles = []
    ntk_attention.apply(model, adapter)
    current = {}

    def hook(layer):
        def fit(module, args, kwargs):
            _fit_layer(module, adapter, layer, prompt_kv[layer], kwargs["hidden_states"],
                       kwargs["position_embeddings"], current["mask"])
        return fit

    try:
        for layer, module in enumerate(attention_modules(model)):
            handles.append(module.register_forward_pre_hook(hook(layer), with_kwargs=True))
        for part in queries.batches(len(queries)):
            current["mask"] = part.mask.to(model.device)
            model(part.ids.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
        ntk_attention.remove(model)


def adapter_kl(model, adapter: NTKAdapter, queries: Queries, reference: torch.Tensor) -> float:
    """Mean KL(with prompt ‖ with adapter) over the queries' positions."""
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


def _optimise(model, adapter: NTKAdapter, loss_of, count: int, *, steps: int, lr: float, batch: int, seed: int,
              absolute: bool = False) -> list[float]:
    """Adam on the adapter for ``steps`` minibatches of ``batch`` rows drawn (seeded) from ``count``; ``loss_of(rows)``
    is the loss of those rows with the adapter applied. Returns the loss of every step."""
    if steps <= 0:
        return []
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)  # only the adapter learns; restored below
    relative = _Relative(adapter, absolute)
    optimiser = torch.optim.Adam(relative.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    ntk_attention.apply(model, adapter)
    try:
        for step in range(steps):
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(count, generator=generator)])
            rows, order = order[:batch], order[batch:]
            relative.refresh()
            loss = loss_of(rows)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            log.info("step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    finally:
        ntk_attention.remove(model)
        relative.freeze()
        for parameter in trainable:
            parameter.requires_grad_(True)
    return losses


def distill(model, adapter: NTKAdapter, queries: Queries, reference: torch.Tensor, *, steps: int, lr: float,
            batch: int, seed: int) -> list[float]:
    """Train Z and k (in place) to minimise KL(with prompt ‖ with adapter) on minibatches of ``queries``."""
    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        part = queries.subset(rows)
        logits = model(part.ids.to(model.device)).logits.float()
        return mean_kl(reference[rows].to(model.device), torch.log_softmax(logits, dim=-1), part.mask.to(model.device))

    return _optimise(model, adapter, loss_of, len(queries), steps=steps, lr=lr, batch=batch, seed=seed)


def train_on_data(model, adapter: NTKAdapter, data: Queries, *, steps: int, lr: float, batch: int, seed: int,
                  absolute: bool) -> list[float]:
    """Train Z and k (in place) by next-token cross-entropy on ``data`` (the paper's parameter-efficient
    fine-tuning); ``absolute`` steps for an adapter started from noise rather than from a prompt."""
    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        part = data.subset(rows)
        ids = part.ids.to(model.device)
        labels = ids.masked_fill(~part.mask.to(model.device), -100)
        return model(ids, labels=labels).loss

    return _optimise(model, adapter, loss_of, len(data), steps=steps, lr=lr, batch=batch, seed=seed,
                     absolute=absolute)


def random_start(model, seed: int, **config) -> NTKAdapter:
    """The paper's start for training from scratch: randn / 1e4 (seeded)."""
    adapter = NTKAdapter.zeros(model, **config)
    generator = torch.Generator().manual_seed(seed)
    adapter.z = torch.randn(adapter.z.shape, generator=generator) / 1e4
    adapter.k = torch.randn(adapter.k.shape, generator=generator) / 1e4
    return adapter


def sizes(adapter: NTKAdapter, prompt_tokens: int | None, kv_itemsize: int) -> dict:
    """The adapter's float32 bytes against those of the prompt's KV cache in the model's dtype."""
    layers, heads, dim = adapter.k.shape
    parameters = adapter.z.numel() + adapter.k.numel()
    kv = None if prompt_tokens is None else 2 * layers * heads * dim * prompt_tokens * kv_itemsize
    return {"adapter_parameters": parameters, "adapter_bytes": 4 * parameters, "prompt_kv_cache_bytes": kv,
            "break_even_prompt_tokens": math.ceil(4 * parameters / (2 * layers * heads * dim * kv_itemsize))}
