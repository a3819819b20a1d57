"""RoPE context extension as pure functions on configs: the intended rotary frequencies of each method and the
``config.json`` that makes stock loaders (transformers, vLLM) compute exactly those.

Notation: θ_i = base^(−2i/d) for rotary pair i of a head of d rotary dimensions, wavelength λ_i = 2π/θ_i, trained
length L0, scale s. Methods (formulas in ``shared/reference/context.md``)::

    plan = plan_extension(config, "yarn", factor=4)        # config: the model's config.json as a dict
    plan.inv_freq, plan.attention_factor                   # what the model should use
    new_config = plan.config                               # what to write

Methods transformers has no type for (Giraffe's power and truncated bases) are compiled to ``longrope`` with
per-pair factors θ_i/θ'_i, the same for short and long contexts, the magnitude pinned to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from surgery.errors import BadInput

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "power", "truncated")
ZEROED_FACTOR = 1e30  # longrope factor for "no rotation": finite (strict JSON has no Infinity), θ' ≈ 1e-30 θ


@dataclass(frozen=True)
class RopeGeometry:
    """What a config says about its rotary embedding before extension."""

    base: float
    dim: int  # rotary dimensions per head (head_dim × partial_rotary_factor)
    trained_length: int  # L0
    partial_rotary_factor: float = 1.0

    @property
    def inv_freq(self) -> torch.Tensor:
        """θ_i = base^(−2i/d), in float64 (transformers computes in float32; compare with a tolerance)."""
        return self.base ** -(torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)


@dataclass
class ExtensionPlan:
    method: str
    geometry: RopeGeometry
    inv_freq: torch.Tensor  # intended θ'_i (float64); for dynamic, at the new length
    attention_factor: float
    new_length: int
    status: list[str]  # per pair: kept, interpolated, clamped or zeroed
    config: dict = field(default_factory=dict)  # the full config to write
    parameters: dict = field(default_factory=dict)  # the method's options, as given (for the manifest)


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def rope_geometry(config: dict, unscaled: bool = True) -> RopeGeometry:
    """The rotary geometry of ``config``; BadInput if it is not a RoPE model, or (``unscaled``) already scaled."""
    text = _text_config(config)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if rope and any(isinstance(value, dict) for value in rope.values()):
        raise BadInput("config.json: RoPE parameters per layer type (e.g. gemma3) are not supported yet")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if unscaled and kind != "default":
        raise BadInput(f"config.json: the model already uses {kind!r} RoPE scaling; extend the unscaled model")
    base = rope.get("rope_theta", text.get("rope_theta"))
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if heads and hidden else None)
    length = text.get("original_max_position_embeddings") or text.get("max_position_embeddings")
    if base is None or head_dim is None or length is None:
        raise BadInput("config.json: no rope_theta, head size or max_position_embeddings: not a RoPE model")
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)))
    return RopeGeometry(float(base), int(head_dim * partial), int(length), partial)


def classify_pairs(before: torch.Tensor, after: torch.Tensor, rel_tol: float = 1e-9) -> list[str]:
    """Per rotary pair: zeroed, kept, interpolated (lower frequency) or raised (higher)."""
    status = []
    for old, new in zip(before.tolist(), after.tolist()):
        if new <= old * 1e-20:
            status.append("zeroed")
        elif math.isclose(new, old, rel_tol=rel_tol):
            status.append("kept")
        else:
            status.append("interpolated" if new < old else "raised")
    return status


def _factor(factor: float | None, target_length: int | None, geometry: RopeGeometry, method: str) -> float:
    if factor is None and target_length is not None:
        factor = target_length / geometry.trained_length
    if factor is None:
        raise BadInput(f"--rope {method}: give --factor or --target-length")
    if not factor > 1:
        raise BadInput(f"--factor {factor}: must be greater than 1 (the new length over the trained one)")
    return float(factor)


def _yarn(theta: torch.Tensor, g: RopeGeometry, s: float, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN as its reference code does it: a linear ramp over pair index between the pairs whose r = L0/λ equals
    β_fast and β_slow (floored / ceiled), interpolating θ/s below the ramp and keeping θ above it."""

    def pair_at(rotations: float) -> float:
        return (g.dim * math.log(g.trained_length / (rotations * 2 * math.pi))) / (2 * math.log(g.base))

    low = max(math.floor(pair_at(beta_fast)), 0)
    high = min(math.ceil(pair_at(beta_slow)), g.dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(g.dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep θ (high frequency), 0 = θ/s
    return theta / s * (1 - keep) + theta * keep


def _llama3(theta: torch.Tensor, g: RopeGeometry, s: float, low_freq: float, high_freq: float) -> torch.Tensor:
    wavelength = 2 * math.pi / theta
    low_wavelength, high_wavelength = g.trained_length / low_freq, g.trained_length / high_freq
    smooth = (g.trained_length / wavelength - low_freq) / (high_freq - low_freq)
    blended = (1 - smooth) * theta / s + smooth * theta
    out = torch.where(wavelength > low_wavelength, theta / s, theta)
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, blended, out)


def _giraffe(method: str, theta: torch.Tensor, g: RopeGeometry, factor: float | None, target_length: int | None,
             power: float | None, cut_length: int | None) -> tuple[torch.Tensor, list[str] | None, float]:
    """Giraffe's power or truncated basis (arXiv 2308.10882): θ', per-pair status, and the linear scale on top."""
    scaled = factor is not None or target_length is not None
    if method == "power":
        if power is None or power < 0:
            raise BadInput("--rope power: give --power k (k >= 0)")
        if scaled:
            raise BadInput("--rope power: --factor and --target-length do not apply (use --power)")
        return theta * (1 - torch.arange(0, g.dim, 2, dtype=torch.float64) / g.dim) ** power, None, 1.0
    if cut_length is None or cut_length <= 0:
        raise BadInput("--rope truncated: give --cut-length L_t (a positive number of tokens)")
    b = 2 * math.pi / cut_length
    a, rho = b / 8, b / 16
    new = torch.where(theta >= b, theta, torch.where(theta >= a, torch.full_like(theta, rho), torch.zeros_like(theta)))
    status = ["kept" if t >= b else "clamped" if t >= a else "zeroed" for t in theta.tolist()]
    if not scaled:
        return new, status, 1.0
    s = _factor(factor, target_length, g, "truncated")
    return new / s, [x if x == "zeroed" else "interpolated" for x in status], s


def plan_extension(config: dict, method: str, *, factor: float | None = None, target_length: int | None = None,
                   beta_fast: float = 32.0, beta_slow: float = 1.0, low_freq_factor: float = 1.0,
                   high_freq_factor: float = 4.0, power: float | None = None,
                   cut_length: int | None = None) -> ExtensionPlan:
    """The extension ``method`` of ``config``: intended frequencies, per-pair status and the config to write."""
    if method not in METHODS:
        raise BadInput(f"--rope {method!r}: expected one of {', '.join(METHODS)}")
    g = rope_geometry(config)
    theta = g.inv_freq
    given = {"factor": factor, "target_length": target_length}
    attention = 1.0
    status = None
    if method in ("linear", "ntk", "dynamic", "yarn", "llama3"):
        s = _factor(factor, target_length, g, method)
        new_length = int(round(g.trained_length * s))
        if method == "linear":
            new = theta / s
            rope = {"rope_type": "linear", "factor": s}
            length = g.trained_length  # vLLM multiplies max_position_embeddings by the factor itself
        elif method == "ntk":
            new_base = g.base * s ** (g.dim / (g.dim - 2))
            new = new_base ** -(torch.arange(0, g.dim, 2, dtype=torch.float64) / g.dim)
            rope = {"rope_type": "default", "rope_theta": new_base}
            length = new_length
        elif method == "dynamic":
            new_base = g.base * (s * new_length / g.trained_length - s + 1) ** (g.dim / (g.dim - 2))
            new = new_base ** -(torch.arange(0, g.dim, 2, dtype=torch.float64) / g.dim)
            rope = {"rope_type": "dynamic", "factor": s}
            length = g.trained_length
        elif method == "yarn":
            new = _yarn(theta, g, s, beta_fast, beta_slow)
            attention = 0.1 * math.log(s) + 1
            rope = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": g.trained_length,
                    "beta_fast": beta_fast, "beta_slow": beta_slow}
            length = new_length
            given |= {"beta_fast": beta_fast, "beta_slow": beta_slow}
        else:
            new = _llama3(theta, g, s, low_freq_factor, high_freq_factor)
            rope = {"rope_type": "llama3", "factor": s, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": g.trained_length}
            length = new_length
            given |= {"low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor}
    else:
        new, status, s = _giraffe(method, theta, g, factor, target_length, power, cut_length)
        given |= {"power": power} if method == "power" else {"cut_length": cut_length}
        new_length = length = int(round(g.trained_length * s))
        ext = [ZEROED_FACTOR if n == 0 else float(t / n) for t, n in zip(theta.tolist(), new.tolist())]
        # original == max_position_embeddings: neither transformers nor vLLM switches factors or rescales magnitude
        rope = {"rope_type": "longrope", "short_factor": ext, "long_factor": ext, "factor": 1.0, "attention_factor": 1.0,
                "original_max_position_embeddings": new_length}
        new = theta / torch.tensor(ext, dtype=torch.float64)
    return ExtensionPlan(method, g, new, attention, new_length, status or classify_pairs(theta, new),
                         _written_config(config, g, rope, length),
                         {k: v for k, v in given.items() if v is not None})


def _written_config(config: dict, g: RopeGeometry, rope: dict, length: int) -> dict:
    """``config`` with ``rope_parameters`` (transformers v5) and the legacy ``rope_scaling`` + ``rope_theta`` that
    older transformers and vLLM read, and the length each loader expects in ``max_position_embeddings``."""
    config = dict(config)
    text = dict(_text_config(config))
    rope = {"rope_theta": g.base, **rope}
    if g.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = g.partial_rotary_factor
    text["rope_parameters"] = rope
    text["rope_theta"] = rope["rope_theta"]
    legacy = {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}
    text["rope_scaling"] = None if legacy["rope_type"] == "default" else {**legacy, "type": legacy["rope_type"]}
    text["max_position_embeddings"] = length
    if "original_max_position_embeddings" in text and "original_max_position_embeddings" in rope:
        text["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if "text_config" in config:
        config["text_config"] = text
        return config
    return text
