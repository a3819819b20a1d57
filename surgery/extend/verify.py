"""Check a written config against the intended rotary frequencies, the way transformers derives them.

The model's own rotary-embedding module is built from the config (for a dynamic scaling, transformers' dynamic
initialisation at the new length), and its inverse frequencies and attention scaling are compared with the intended
ones::

    derived = derived_frequencies(config)            # what transformers will use
    check_plan(plan)                                  # BadInput when the written config would not give plan.inv_freq
"""

from __future__ import annotations

import importlib
import math

import torch

from surgery.errors import BadInput
from surgery.extend.rope import ExtensionPlan, RopeGeometry

RELATIVE_TOLERANCE = 1e-5  # transformers computes in float32


def _transformers_config(config: dict):
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(config.get("model_type"), **fields).get_text_config()
    except (ValueError, KeyError) as err:
        raise BadInput(f"config.json: transformers cannot read it ({str(err).splitlines()[0]})") from None


def _rotary_module(model_type: str):
    """The model family's rotary-embedding class (e.g. LlamaRotaryEmbedding), or None."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    classes = [getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding")]
    return classes[0] if len(classes) == 1 else None


def derived_frequencies(config: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32) and attention scaling transformers computes from ``config``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = _transformers_config(config)
    text.standardize_rope_params()
    rope_type = text.rope_parameters.get("rope_type", "default")
    if rope_type == "dynamic" and seq_len is not None:
        return ROPE_INIT_FUNCTIONS["dynamic"](text, torch.device("cpu"), seq_len=seq_len)
    rotary = _rotary_module(text.model_type)
    if rotary is not None:
        module = rotary(config=text)
        return module.inv_freq.clone(), float(module.attention_scaling)
    if rope_type == "default":
        geometry = RopeGeometry(text.rope_parameters["rope_theta"], _dim(text), 1)
        return geometry.inv_freq.to(torch.float32), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](text, torch.device("cpu"))


def _dim(text) -> int:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))


def mismatches(intended: torch.Tensor, attention: float, derived: torch.Tensor, derived_attention: float) -> list[str]:
    """Human-readable differences between intended and derived frequencies (empty when they agree)."""
    problems = []
    if derived.numel() != intended.numel():
        return [f"{derived.numel()} rotary pairs in the config, {intended.numel()} intended"]
    for pair, (want, got) in enumerate(zip(intended.tolist(), derived.double().tolist())):
        if want == 0:
            ok = abs(got) <= 1e-20
        else:
            ok = math.isclose(got, want, rel_tol=RELATIVE_TOLERANCE)
        if not ok:
            problems.append(f"pair {pair}: θ' {got:.6g} derived, {want:.6g} intended")
    if not math.isclose(derived_attention, attention, rel_tol=1e-6):
        problems.append(f"attention scaling {derived_attention:.6g} derived, {attention:.6g} intended")
    return problems


def check_plan(plan: ExtensionPlan) -> None:
    """BadInput unless transformers, reading ``plan.config``, uses ``plan``'s frequencies and attention scaling."""
    derived, attention = derived_frequencies(plan.config, plan.new_length if plan.method == "dynamic" else None)
    problems = mismatches(plan.inv_freq, plan.attention_factor, derived, attention)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise BadInput(f"--rope {plan.method}: the written config would not give the intended frequencies: {shown}")
