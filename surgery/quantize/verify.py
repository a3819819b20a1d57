"""``surgery verify``: how far a quantized checkpoint is from its reference, per layer and end to end.

    from surgery.quantize import verify
    report = verify("model-w4", reference="org/model", tokens=256, seed=0)
    report["layers"][0]   # {"module", "weight_rel_error", "output_rel_error", "output_cosine"}
    report["end_to_end"]  # {"kl": mean next-token KL(P‖Q), "top1_agreement": ..., "tokens": ...}

Per quantized Linear: the weight-space relative error ‖Ŵ − W‖/‖W‖, and on seeded Gaussian probe inputs X the output
relative error ‖XŴᵀ − XWᵀ‖/‖XWᵀ‖ and cosine similarity. For compressed-tensors outputs, XŴᵀ comes from the fused
dequantize-matmul kernel reading the packed tensors (Triton on CUDA, its torch reference on CPU). End to end, the
reference model generates its own text (seeded sampling from BOS; no data set) and both models score it: the mean
next-token KL(P_reference ‖ P_quantized) and the share of positions whose top-1 tokens agree. The quantized model
is the reference architecture with the decoded weights, so any quantized format is compared the same way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import torch

from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint
from surgery.kernels.dequant_matmul import dequant_matmul
from surgery.quantize.formats import FORMATS
from surgery.quantize.grid import Scheme, dequantize
from surgery.quantize.groups import group_size_of

FIRST_TENSOR = {"compressed-tensors": "weight_packed", "gptq": "qweight"}


def scheme_of(config: dict | None, source: str) -> tuple[str, Scheme]:
    """The format name and grid of a quantized checkpoint's config.json."""
    quant = (config or {}).get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors" and quant.get("format") == "pack-quantized":
        groups = quant["config_groups"].values()
        weights = next((g for g in groups if "Linear" in g["targets"]), next(iter(groups)))["weights"]
        return "compressed-tensors", Scheme(weights["num_bits"], weights["group_size"], weights["symmetric"])
    if quant.get("quant_method") == "gptq":
        return "gptq", Scheme(quant["bits"], quant["group_size"], quant.get("sym", True), v1_zeros=True)
    raise BadInput(f"{source}: not a compressed-tensors pack-quantized or GPTQ checkpoint (no quantization_config "
                   f"this command reads)")


def module_scheme(config: dict | None, module: str, default: Scheme) -> Scheme:
    """The grid of one module: compressed-tensors may give some modules another group size (groups.py)."""
    quant = (config or {}).get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return default
    return replace(default, group_size=group_size_of(module, quant["config_groups"]))


def quantized_modules(ckpt: Checkpoint) -> list[str]:
    """Names of the quantized modules of a quantized checkpoint."""
    fmt_name, _ = scheme_of(ckpt.config, ckpt.source)
    marker = "." + FIRST_TENSOR[fmt_name]
    return [name.removesuffix(marker) for name in ckpt.tensors if name.endswith(marker)]


def module_tensors(ckpt: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    prefix = module + "."
    return {name[len(prefix):]: ckpt.get(name) for name in ckpt.tensors
            if name.startswith(prefix) and "." not in name[len(prefix):] and name[len(prefix):] not in ("weight", "bias")}


def dequantized_weights(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module + ".weight", float32 weight)`` for every quantized module, decoded from the stored bits."""
    fmt_name, default = scheme_of(ckpt.config, ckpt.source)
    for module in quantized_modules(ckpt):
        scheme = module_scheme(ckpt.config, module, default)
        q, scale, zero = FORMATS[fmt_name].decode(module_tensors(ckpt, module), scheme)
        yield f"{module}.weight", dequantize(q, scale, zero, scheme.group_size)


def _layer_report(ckpt: Checkpoint, reference: Checkpoint, fmt_name: str, scheme: Scheme, module: str,
                  probes: int, generator: torch.Generator, backend: str) -> dict:
    scheme = module_scheme(ckpt.config, module, scheme)
    tensors = module_tensors(ckpt, module)
    q, scale, zero = FORMATS[fmt_name].decode(tensors, scheme)
    approx = dequantize(q, scale, zero, scheme.group_size)
    weight = reference.get(f"{module}.weight").float()
    if weight.shape != approx.shape:
        raise BadInput(f"{module}: quantized shape {tuple(approx.shape)} but reference {tuple(weight.shape)}")
    x = torch.randn(probes, weight.shape[1], generator=generator)
    expected = x @ weight.T
    if fmt_name == "compressed-tensors":
        device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
        got = dequant_matmul(x.to(device), tensors["weight_packed"].to(device), tensors["weight_scale"].to(device),
                             tensors.get("weight_zero_point"),
                             bits=scheme.bits, group_size=scheme.group_size, backend=backend).cpu().float()
    else:
        got = x @ approx.T
    return {"module": module, "group_size": scheme.group_size,
            "weight_rel_error": float((approx - weight).norm() / weight.norm().clamp_min(1e-30)),
            "output_rel_error": float((got - expected).norm() / expected.norm().clamp_min(1e-30)),
            "output_cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0))}


@torch.no_grad()
def self_generated_ids(model, tokenizer, tokens: int, seed: int, sequences: int = 4) -> torch.Tensor:
    """(sequences, tokens // sequences + 1) ids the model samples from its BOS token, seeded."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    length = max(2, math.ceil(tokens / sequences))
    prompt = torch.full((sequences, 1), start, dtype=torch.long)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=length, min_new_tokens=length,
                              pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start)


@torch.no_grad()
def compare_logits(reference_model, quantized_model, ids: torch.Tensor) -> dict:
    """Mean next-token KL(P‖Q) and top-1 agreement of two models on ``ids``."""
    log_p = torch.log_softmax(reference_model(ids).logits.float(), -1)
    log_q = torch.log_softmax(quantized_model(ids).logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1_agreement": float(agree.mean()), "tokens": int(ids.numel())}


def load_dequantized(quantized: str, reference_model):
    """A copy of ``reference_model`` whose quantized Linear weights are replaced by the decoded ones."""
    import copy

    model = copy.deepcopy(reference_model)
    params = dict(model.named_parameters())
    with open_checkpoint(quantized) as ckpt, torch.no_grad():
        for name, weight in dequantized_weights(ckpt):
            if name not in params:
                raise BadInput(f"{quantized}: {name} has no counterpart in the reference model")
            params[name].copy_(weight)
    return model


def verify(quantized: str, *, reference: str, tokens: int = 256, probes: int = 64, seed: int = 0,
           backend: str = "auto", end_to_end: bool = True) -> dict:
    with open_checkpoint(quantized) as ckpt, open_checkpoint(reference) as ref:
        fmt_name, scheme = scheme_of(ckpt.config, ckpt.source)
        generator = torch.Generator().manual_seed(seed)
        layers = [_layer_report(ckpt, ref, fmt_name, scheme, module, probes, generator, backend)
                  for module in quantized_modules(ckpt)]
    report = {"quantized": quantized, "reference": reference, "format": fmt_name, "bits": scheme.bits,
              "group_size": scheme.group_size, "symmetric": scheme.symmetric, "layers": layers,
              "worst_output_rel_error": max(layer["output_rel_error"] for layer in layers),
              "min_output_cosine": min(layer["output_cosine"] for layer in layers)}
    if end_to_end:
        from surgery.evaluation import load_model

        model, tokenizer = load_model(reference)
        ids = self_generated_ids(model, tokenizer, tokens, seed)
        report["end_to_end"] = compare_logits(model, load_dequantized(quantized, model), ids)
    return report
