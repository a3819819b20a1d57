"""What each expert of a fused MoE experts module receives in one forward, for measurements that need it (AIM's
statistics, verify's probes)::

    def record(module, args, kwargs):
        for expert, x in routed_inputs(module, args, kwargs):
            hidden = expert_intermediate(module, expert, x)   # its down projection's input, or None
    experts_module.register_forward_pre_hook(record, with_kwargs=True)

transformers' experts modules (``MixtralExperts``, ``Qwen2MoeExperts``...) take the tokens' hidden states and each
token's top-k expert indices; their gate and up projections are one ``gate_up_proj`` tensor, the two halves side
by side (the layout transformers fuses per-expert checkpoints into).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def routed_inputs(module: nn.Module, args: tuple, kwargs: dict) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert, the hidden states of the tokens routed to it) for one call of a fused experts module.

    Args:
        module: the experts module (its ``gate_up_proj`` holds every expert).
        args: the call's positional arguments (hidden states, top-k indices, top-k weights).
        kwargs: its keyword arguments.

    Returns:
        An iterator over the experts some token was routed to.

    Example: ``dict(routed_inputs(module, args, kwargs))[3].shape   # (tokens routed to expert 3, hidden)``
    """
    values = list(args) + [kwargs[key] for key in ("hidden_states", "top_k_index") if key in kwargs]
    hidden, top_k = values[0], values[1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    top_k = top_k.reshape(hidden.shape[0], -1)
    for expert in range(module.gate_up_proj.shape[0]):
        routed = hidden[(top_k == expert).any(dim=-1)]
        if routed.shape[0]:
            yield expert, routed


def expert_intermediate(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor | None:
    """act(gate) * up of ``expert`` on ``x``: its down projection's input, for the chunked [gate; up] layout with an
    ``act_fn`` (Mixtral, Qwen-MoE...) and for gpt-oss's (inputs, outputs) matrices with a bias and its own gate
    (``_apply_gate``: interleaved halves, clamped); None for any other.

    Args:
        module: the experts module.
        expert: the expert's index.
        x: inputs routed to it, (tokens, hidden).

    Returns:
        (tokens, intermediate) or None.

    Example: ``expert_intermediate(module, 3, x).shape   # (tokens, intermediate size)``
    """
    weight = module.gate_up_proj[expert]
    if hasattr(module, "_apply_gate") and hasattr(module, "gate_up_proj_bias") and weight.shape[0] == x.shape[-1]:
        gate_up = x @ weight
        bias = getattr(module, "gate_up_proj_bias", None)
        return module._apply_gate(gate_up + bias[expert] if bias is not None else gate_up)
    if not hasattr(module, "act_fn") or weight.shape[-1] != x.shape[-1] or weight.shape[0] % 2:
        return None
    gate, up = nn.functional.linear(x, weight).chunk(2, dim=-1)
    return module.act_fn(gate) * up
