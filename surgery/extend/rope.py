"""RoPE context extension as pure functions on configs: the intended rotary frequencies of each method and the
``config.json`` that makes stock loaders (transformers, vLLM) compute exactly those.

Notation: θ_i = base^(−2i/d) for rotary pair i of a head of d rotary dimensions, wavelength λ_i = 2π/θ_i, trained
length L0, scale s. Methods (formulas in ``shared/reference/context.md``)::

    plan = plan_extension(config, "yarn", factor=4)        # config: the model's config.json as a dict
    plan.inv_freq, plan.attention_factor                   # what the model should use
    new_config = plan.config                               # what to write

Methods transformers has no type for (Giraffe's power and truncated bases) are compiled to ``longrope`` with
per-pair factors θ_i/θ'_i, the same for short and long contexts, the magnitude pinned to 1.

Rope parameters a method does not set (Qwen2-VL's ``mrope_section``, gpt-oss's ``truncate``...) are carried into
both ``rope_parameters`` and ``rope_scaling`` unchanged; Qwen2-VL's sections split the same scaled frequencies
among the time, height and width positions, so they need no change. Where the parameters are per layer type
(gemma3: ``full_attention`` and ``sliding_attention``), the full-attention layers' RoPE is extended and the
sliding-window layers', which never attend past their window, is kept (as Gemma 3 itself was extended to 128K).
A config already scaled by yarn or llama3 (gpt-oss,
Llama-3.1) is extended by the same method, its factor multiplied over the same trained geometry; other
combinations are refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from surgery.errors import BadInput

log = logging.getLogger(__name__)

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "power", "truncated")
EXTENDED_LAYER_TYPE = "full_attention"  # with RoPE parameters per layer type, the layers whose RoPE is extended
ZEROED_FACTOR = 1e30  # longrope factor for "no rotation": finite (strict JSON has no Infinity), θ' ≈ 1e-30 θ


@dataclass(frozen=True)
class RopeGeometry:
    """What a config says about its rotary embedding before extension.

    ``scaling`` and ``factor`` describe a scaling the config already has (``"default"`` and 1.0 when none), ``length``
    the context it is set up for, and ``rope`` the rope parameters as transformers reads them (the legacy
    ``rope_scaling`` wins, ``rope_theta`` and ``partial_rotary_factor`` fall back to the top-level fields)::

        rope_geometry(gpt_oss_config)   # scaling 'yarn', factor 32.0, trained_length 4096, length 131072
    """

    base: float
    dim: int  # rotary dimensions per head (head_dim × partial_rotary_factor)
    trained_length: int  # L0
    partial_rotary_factor: float = 1.0
    head_dim: int | None = None
    scaling: str = "default"
    factor: float = 1.0
    length: int | None = None  # None: trained_length
    rope: dict = field(default_factory=dict, compare=False)
    per_layer_type: dict | None = field(default=None, compare=False)  # gemma3: layer type → its rope parameters

    @property
    def inv_freq(self) -> torch.Tensor:
        """θ_i = base^(−2i/d), in float64 (transformers computes in float32; compare with a tolerance)."""
        return self.base ** -(torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)

    @property
    def source_length(self) -> int:
        return self.length or self.trained_length


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
    source: dict = field(default_factory=dict)  # the config it extends
    rope_set: dict = field(default_factory=dict)  # the rope parameters the method sets; every other key is carried


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _source_rope(text: dict) -> dict:
    """The rope parameters transformers 5 reads: ``rope_scaling`` when set, else ``rope_parameters``, with the
    top-level ``rope_theta`` and ``partial_rotary_factor`` as fallbacks."""
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if rope.get(key) is None and text.get(key) is not None:
            rope[key] = text[key]
    return rope


def rope_geometry(config: dict) -> RopeGeometry:
    """The rotary geometry of ``config``, scaled or not; BadInput if it is not a RoPE model.

    Args:
        config: a ``config.json`` as a dict (a multimodal one's ``text_config`` is read).

    Returns:
        Its :class:`RopeGeometry`.

    Example:
        ``rope_geometry(config).inv_freq``   # θ_i, float64
    """
    text = _text_config(config)
    rope = _source_rope(text)
    per_layer_type = None
    if any(isinstance(value, dict) for value in rope.values()):
        per_layer_type = {key: dict(value) for key, value in rope.items() if isinstance(value, dict)}
        if EXTENDED_LAYER_TYPE not in per_layer_type:
            raise BadInput(f"config.json: RoPE parameters per layer type ({', '.join(per_layer_type)}) without a "
                           f"{EXTENDED_LAYER_TYPE!r} entry: no layers attend over the whole context to extend")
        rope = per_layer_type[EXTENDED_LAYER_TYPE]
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "default" if kind == "mrope" else kind  # Qwen2-VL's legacy name for its sectioned default RoPE
    base = rope.get("rope_theta")
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    # `head_dim: null` (mixtral) means hidden / heads to the model, but transformers' yarn, dynamic and longrope
    # functions read the null itself: the written config states the size (see _written_config)
    head_dim = text.get("head_dim") or (hidden // heads if heads and hidden else None)
    trained = (text.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
               or text.get("max_position_embeddings"))
    if base is None or head_dim is None or trained is None:
        raise BadInput("config.json: no rope_theta, head size or max_position_embeddings: not a RoPE model")
    partial = float(rope.get("partial_rotary_factor") or 1.0)
    factor = float(rope.get("factor") or 1.0) if kind != "default" else 1.0
    return RopeGeometry(float(base), int(head_dim * partial), int(trained), partial, int(head_dim), kind, factor,
                        _set_up_length(text, kind, int(trained), factor), rope, per_layer_type)


def _set_up_length(text: dict, kind: str, trained: int, factor: float) -> int:
    """The context a config is set up for: a scaled config's max_position_embeddings when it is past the trained
    length (gpt-oss, Llama-3.1), else trained length × factor (a yarn scaling added to an unchanged config)."""
    length = text.get("max_position_embeddings") or trained
    if kind == "default":
        return trained
    return int(length) if length > trained else int(round(trained * factor))


def classify_pairs(before: torch.Tensor, after: torch.Tensor, rel_tol: float = 1e-9) -> list[str]:
    """Per rotary pair: zeroed, kept, interpolated (lower frequency) or raised (higher).

    Args:
        before: the source's inverse frequencies.
        after: the extended ones.
        rel_tol: how close a frequency must stay to count as kept.

    Returns:
        One status per pair.

    Example:
        ``classify_pairs(torch.tensor([1.0, 0.1]), torch.tensor([1.0, 0.05]))``   # ["kept", "interpolated"]
    """
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
        factor = target_length / geometry.source_length
    if factor is None:
        raise BadInput(f"--rope {method}: give --factor or --target-length")
    if not factor > 1:
        raise BadInput(f"--factor {factor}: must be greater than 1 (the new length over the current one)")
    return float(factor)


def _inv_freq(base: float, dim: int) -> torch.Tensor:
    return base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _yarn(theta: torch.Tensor, g: RopeGeometry, s: float, beta_fast: float, beta_slow: float,
          truncate: bool = True) -> torch.Tensor:
    """YaRN as its reference code does it: a linear ramp over pair index between the pairs whose r = L0/λ equals
    β_fast and β_slow (floored / ceiled unless ``truncate`` is false, as gpt-oss sets), interpolating θ/s below the
    ramp and keeping θ above it."""

    def pair_at(rotations: float) -> float:
        return (g.dim * math.log(g.trained_length / (rotations * 2 * math.pi))) / (2 * math.log(g.base))

    low, high = pair_at(beta_fast), pair_at(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, g.dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(g.dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep θ (high frequency), 0 = θ/s
    return theta / s * (1 - keep) + theta * keep


def _yarn_attention(rope: dict) -> float:
    """YaRN's magnitude for the rope parameters ``rope``: an explicit attention_factor, else DeepSeek's mscale ratio
    when both mscale and mscale_all_dim are set, else 0.1·ln s + 1."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])

    def magnitude(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    s, mscale, all_dim = float(rope["factor"]), rope.get("mscale"), rope.get("mscale_all_dim")
    return magnitude(s, mscale) / magnitude(s, all_dim) if mscale and all_dim else magnitude(s)


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


RESCALABLE = ("yarn", "llama3")  # scalings whose factor can be raised: the trained geometry stays in the config


def _check_existing_scaling(g: RopeGeometry, method: str) -> None:
    """BadInput unless ``method`` can extend ``g``: any method on an unscaled config, yarn on yarn, llama3 on
    llama3 (their factor is raised); anything else would stack two scalings no loader composes."""
    if g.scaling == "default" or (g.scaling == method and method in RESCALABLE):
        return
    what = (f"config.json: the model already uses {g.scaling!r} RoPE scaling (factor {g.factor:g} over "
            f"{g.trained_length} trained positions)")
    if g.scaling in RESCALABLE:
        raise BadInput(f"{what}; extend it with --rope {g.scaling} --factor S (its factor times S), or apply "
                       f"--rope {method} to the unscaled model")
    raise BadInput(f"{what}; another scaling cannot be stacked on it: extend the unscaled model")


def _option(given: float | None, g: RopeGeometry, key: str, default: float) -> float:
    """An option as given, else the source's own value (when it already uses this scaling), else the default."""
    if given is not None:
        return float(given)
    return float(g.rope[key] if g.rope.get(key) is not None else default)


def _scaled(method: str, theta: torch.Tensor, g: RopeGeometry, s: float, new_length: int,
            options: dict) -> tuple[torch.Tensor, dict, int, float, dict]:
    """θ', the rope parameters to set, max_position_embeddings, attention factor and the options used, for the
    methods with a scale ``s`` (the total factor: a rescaled yarn or llama3 config's factor times the new one)."""
    if method == "linear":  # vLLM multiplies max_position_embeddings by the factor itself
        return theta / s, {"rope_type": "linear", "factor": s}, g.trained_length, 1.0, {}
    if method == "ntk":
        new_base = g.base * s ** (g.dim / (g.dim - 2))
        return _inv_freq(new_base, g.dim), {"rope_theta": new_base}, new_length, 1.0, {}
    if method == "dynamic":
        new_base = g.base * (s * new_length / g.trained_length - s + 1) ** (g.dim / (g.dim - 2))
        return _inv_freq(new_base, g.dim), {"rope_type": "dynamic", "factor": s}, g.trained_length, 1.0, {}
    if method == "yarn":
        used = {"beta_fast": _option(options["beta_fast"], g, "beta_fast", 32.0),
                "beta_slow": _option(options["beta_slow"], g, "beta_slow", 1.0)}
        rope = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": g.trained_length, **used}
        new = _yarn(theta, g, s, used["beta_fast"], used["beta_slow"], bool(g.rope.get("truncate", True)))
        if g.scaling == "yarn" and g.rope.get("attention_factor") is not None:
            log.warning("the model's yarn attention_factor %s is kept as it is for the new factor %g (it was set "
                        "for factor %g; transformers reads the value, not a formula)", g.rope["attention_factor"], s,
                        g.factor)
        return new, rope, new_length, _yarn_attention({**g.rope, **rope}), used
    used = {"low_freq_factor": _option(options["low_freq_factor"], g, "low_freq_factor", 1.0),
            "high_freq_factor": _option(options["high_freq_factor"], g, "high_freq_factor", 4.0)}
    rope = {"rope_type": "llama3", "factor": s, **used, "original_max_position_embeddings": g.trained_length}
    return _llama3(theta, g, s, used["low_freq_factor"], used["high_freq_factor"]), rope, new_length, 1.0, used


def plan_extension(config: dict, method: str, *, factor: float | None = None, target_length: int | None = None,
                   beta_fast: float | None = None, beta_slow: float | None = None,
                   low_freq_factor: float | None = None, high_freq_factor: float | None = None,
                   power: float | None = None, cut_length: int | None = None) -> ExtensionPlan:
    """The extension ``method`` of ``config``: intended frequencies, per-pair status and the config to write.

    Rope parameters the method does not set (Qwen2-VL's mrope_section, gpt-oss's truncate...) are carried
    unchanged. A yarn or llama3 config is extended by the same method: its factor is multiplied, its trained
    geometry (original_max_position_embeddings, betas or frequency bounds unless given) kept. Options a method does
    not use are refused by :class:`surgery.extend.context.ExtendConfig`, not here.

    Args:
        config: the model's ``config.json`` as a dict.
        method: one of METHODS.
        factor: the new length over the current one (or give ``target_length``).
        target_length: the new length.
        beta_fast: yarn's beta_fast.
        beta_slow: yarn's beta_slow.
        low_freq_factor: llama3's low_freq_factor.
        high_freq_factor: llama3's high_freq_factor.
        power: the exponent k of Giraffe's power basis.
        cut_length: the cut length of Giraffe's truncated basis, in tokens.

    Returns:
        The :class:`ExtensionPlan`.

    Example::

        plan_extension(gpt_oss_config, "yarn", factor=2).config["rope_parameters"]["factor"]   # 64.0
    """
    if method not in METHODS:
        raise BadInput(f"--rope {method!r}: expected one of {', '.join(METHODS)}")
    g = rope_geometry(config)
    _check_existing_scaling(g, method)
    theta = g.inv_freq
    given = {"factor": factor, "target_length": target_length}
    attention = 1.0
    status = None
    if method in ("linear", "ntk", "dynamic", "yarn", "llama3"):
        s = _factor(factor, target_length, g, method)
        new_length = int(round(g.source_length * s))
        options = {"beta_fast": beta_fast, "beta_slow": beta_slow, "low_freq_factor": low_freq_factor,
                   "high_freq_factor": high_freq_factor}
        new, rope, length, attention, used = _scaled(method, theta, g, g.factor * s, new_length, options)
        given |= used | ({"source_factor": g.factor} if g.scaling != "default" else {})
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
                         {k: v for k, v in given.items() if v is not None}, config, rope)


ROPE_FIELDS = ("rope_parameters", "rope_scaling", "rope_theta")


def _written_config(config: dict, g: RopeGeometry, rope_set: dict, length: int) -> dict:
    """``config`` with the source's rope parameters, those in ``rope_set`` replaced, written as ``rope_parameters``
    (transformers v5) and the legacy ``rope_scaling`` + ``rope_theta`` that older transformers and vLLM read, and
    the length each loader expects in ``max_position_embeddings``."""
    config = dict(config)
    rope = {**g.rope, **rope_set}
    rope.setdefault("rope_type", g.scaling)
    if "type" in rope and "rope_type" in rope_set:
        rope["type"] = rope_set["rope_type"]  # the legacy name must not contradict the new type
    if "text_config" not in config:
        return _with_rope(config, rope, length, g)
    config["text_config"] = _with_rope(dict(config["text_config"]), rope, length, g)
    if any(config.get(key) for key in ROPE_FIELDS):  # a VLM config that repeats the text fields at the top
        config = _with_rope(config, rope, length, g)
    return config


def _with_rope(text: dict, rope: dict, length: int, g: RopeGeometry) -> dict:
    # older transformers and vLLM apply rope_scaling + rope_theta to gemma3's full-attention layers only
    text["rope_parameters"] = dict(rope) if g.per_layer_type is None else \
        {**g.per_layer_type, EXTENDED_LAYER_TYPE: dict(rope)}
    text["rope_theta"] = rope["rope_theta"]
    legacy = {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}
    legacy.setdefault("type", legacy["rope_type"])
    unscaled = set(legacy) <= {"rope_type", "type"} and legacy["rope_type"] == "default"
    text["rope_scaling"] = None if unscaled else legacy
    text["max_position_embeddings"] = length
    if "original_max_position_embeddings" in text and "original_max_position_embeddings" in rope:
        text["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if "head_dim" in text and text["head_dim"] is None:
        text["head_dim"] = g.head_dim  # transformers' yarn, dynamic and longrope read null as None, not hidden/heads
    return text
