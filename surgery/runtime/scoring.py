"""Next-token log-probabilities and how far two models' are apart::

    log_p, log_q = log_probs(reference, ids), log_probs(quantized, ids)
    agreement(log_p, log_q)                  # {"kl": mean KL(P‖Q), "top1_agreement": ..., "tokens": ...}
    mean_kl(log_p, log_q, mask)              # over the masked positions only
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.runtime.stream import input_hooks


@torch.no_grad()
def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 next-token log-probabilities of ``model`` at every position of ``ids``.

    Args:
        model: a causal LM.
        ids: (sequences, length) token ids.

    Returns:
        (sequences, length, vocab) log-probabilities::

            log_p = log_probs(model, ids)
    """
    return torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)


def kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) at every position of two log-probability tensors [..., vocab].

    Args:
        log_p: the reference's log-probabilities.
        log_q: the other's, same shape.

    Returns:
        The KL, shape ``log_p.shape[:-1]``::

            kl_per_position(log_p, log_q).mean()
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mean_kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(reference ‖ other) over the ``mask``ed positions (all without a mask), both log-probabilities
    [..., vocab]; ``reference`` may be stored in half precision.

    Args:
        reference: the reference log-probabilities.
        other: the other log-probabilities.
        mask: True at the positions that count.

    Returns:
        A 0-d tensor::

            float(mean_kl(reference, plain_logprobs(model, queries), queries.mask))
    """
    per_position = kl_per_position(reference.float(), other)
    return per_position.mean() if mask is None else per_position[mask].mean()


def top1_agreement(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of the (``mask``ed) positions whose most likely next token is the same.

    Args:
        reference: log-probabilities or logits [..., vocab].
        other: the same for the other model.
        mask: True at the positions that count.

    Returns:
        The share, in [0, 1]::

            top1_agreement(log_p, log_q)
    """
    agree = reference.argmax(-1) == other.argmax(-1)
    return float((agree if mask is None else agree[mask]).float().mean())


def agreement(log_p: torch.Tensor, log_q: torch.Tensor) -> dict:
    """Mean next-token KL(P‖Q) and top-1 agreement of two models' log-probabilities on the same positions.

    Args:
        log_p: the reference's log-probabilities.
        log_q: the other's.

    Returns:
        ``{"kl", "top1_agreement", "tokens"}``::

            agreement(log_probs(reference, ids), log_probs(quantized, ids))["kl"]
    """
    kl = kl_per_position(log_p, log_q)
    return {"kl": float(kl.mean()), "top1_agreement": top1_agreement(log_p, log_q), "tokens": int(kl.numel())}


@torch.no_grad()
def compare_logits(reference_model, other_model, ids: torch.Tensor) -> dict:
    """Mean next-token KL(P‖Q) and top-1 agreement of two models on ``ids``.

    Args:
        reference_model: the model P.
        other_model: the model Q.
        ids: (sequences, length) token ids.

    Returns:
        :func:`agreement`'s dict::

            compare_logits(reference, load_dequantized("model-w4", reference), ids)["top1_agreement"]
    """
    return agreement(log_probs(reference_model, ids), log_probs(other_model, ids))


def captured_inputs(model: nn.Module, modules: list[str], ids: torch.Tensor, rows: torch.Tensor):
    """Run ``model`` on ``ids``; return its log-probabilities and, per module, its inputs at the flattened
    positions ``rows``.

    Args:
        model: a causal LM.
        modules: names of the modules whose inputs are kept.
        ids: (sequences, length) token ids.
        rows: positions into the flattened (sequences × length) inputs.

    Returns:
        (log-probabilities, module → float32 (len(rows), in_features) inputs)::

            log_p, inputs = captured_inputs(model, ["model.layers.0.mlp.up_proj"], ids, torch.arange(16))
    """
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def record(x: torch.Tensor) -> None:
            inputs[name] = x.reshape(-1, x.shape[-1])[rows].float().clone()
        return record

    with input_hooks(model, {name: keep(name) for name in modules}):
        return log_probs(model, ids), inputs
