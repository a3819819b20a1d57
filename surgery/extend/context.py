"""``surgery extend`` and ``surgery verify-rope``: read a checkpoint, plan the extension, verify it, write it.

The weights are copied unchanged, one tensor at a time; only ``config.json`` changes. The ``surgery.json`` manifest
records everything the check compared (frequencies, rope parameters, rotary attributes, length, the rope fields
written), so ``verify-rope`` can check the output later against transformers::

    extend(ExtendConfig("gpt-oss-20b", "gpt-oss-256k", "yarn", factor=2))   # yarn factor 32 → 64, same 4096 positions
    verify_rope("gpt-oss-256k")["problems"]                                   # [] unless config.json was edited since
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.convert import output_specs
from surgery.errors import BadInput
from surgery.extend.rope import METHODS, ExtensionPlan, classify_pairs, plan_extension, rope_geometry
from surgery.extend.verify import Expectation, check_plan, problems, read_back
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available
from surgery.cards import model_name
from surgery.output import Card, OutputRecord
from surgery.provenance import read_manifest

# The options of each method besides --factor / --target-length (which power does not take either).
METHOD_OPTIONS = {"yarn": {"beta_fast", "beta_slow"}, "llama3": {"low_freq_factor", "high_freq_factor"},
                  "power": {"power"}, "truncated": {"cut_length"}}
OPTIONS = ("factor", "target_length", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor", "power",
           "cut_length")


@dataclass(frozen=True)
class ExtendConfig:
    """What ``surgery extend`` does: ``source`` copied to ``output`` with the RoPE extension ``rope`` (one of
    :data:`surgery.extend.rope.METHODS`) and its options; ``dry_run`` plans and verifies without writing.

    Made with an unknown method, or an option the method does not use (it would be dropped silently), it raises
    BadInput naming the option.
    """

    source: str | Path
    output: str | Path
    rope: str
    factor: float | None = None
    target_length: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    power: float | None = None
    cut_length: int | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.rope not in METHODS:
            raise BadInput(f"--rope {self.rope!r}: expected one of {', '.join(METHODS)}")
        for name in OPTIONS[2:]:
            if getattr(self, name) is not None and name not in METHOD_OPTIONS.get(self.rope, set()):
                users = [m for m, names in METHOD_OPTIONS.items() if name in names]
                raise BadInput(f"--{name.replace('_', '-')}: applies to --rope {' / '.join(users)}, not {self.rope}")

    @property
    def options(self) -> dict:
        """The method's options, as :func:`surgery.extend.rope.plan_extension` takes them (None: not given)."""
        return {name: getattr(self, name) for name in OPTIONS}


@dataclass(frozen=True)
class ExtendResult:
    """The verified plan and, unless a dry run, what was written."""

    config: ExtendConfig
    plan: ExtensionPlan
    written: WriteResult | None

    def summary(self) -> dict:
        """What ``surgery extend --json`` prints.

        Returns:
            Output (None in a dry run), method, parameters, lengths, attention factor, rope parameters and the
            per-pair table.

        Example::

            extend(ExtendConfig("smol", "smol-8k", "linear", factor=4, dry_run=True)).summary()["new_length"]
        """
        result = self.plan
        return {"output": None if self.config.dry_run else self.config.output, "method": self.config.rope,
                "parameters": result.parameters, "trained_length": result.geometry.trained_length,
                "source_length": result.geometry.source_length, "new_length": result.new_length,
                "attention_factor": result.attention_factor,
                "rope_parameters": result.config.get("rope_parameters"),
                "pairs": pair_table(result.geometry.inv_freq, result.inv_freq, result.status)}


def plan(config: ExtendConfig) -> ExtensionPlan:
    """The verified extension plan for ``config.source``'s config (nothing written).

    Args:
        config: the extension.

    Returns:
        The :class:`ExtensionPlan`, checked against what transformers derives from the config to be written.

    Example::

        plan(ExtendConfig("smol", "unused", "yarn", factor=2)).new_length
    """
    with open_checkpoint(config.source, raw=True) as ckpt:
        if not ckpt.config:
            raise BadInput(f"{config.source}: no config.json: nothing to extend")
        result = plan_extension(ckpt.config, config.rope, **config.options)
    check_plan(result)
    return result


def pair_table(original: torch.Tensor, new: torch.Tensor, status: list[str]) -> list[dict]:
    """Per rotary pair: original and new wavelength (tokens; None = no rotation) and what happened to it.

    Args:
        original: the source's inverse frequencies.
        new: the extended ones.
        status: per pair, from :func:`surgery.extend.rope.classify_pairs`.

    Returns:
        One ``{"pair", "wavelength", "new_wavelength", "status"}`` row per pair.

    Example:
        ``pair_table(plan.geometry.inv_freq, plan.inv_freq, plan.status)[0]["wavelength"]``   # 2π: θ_0 = 1
    """
    rows = []
    for pair, (old, now, what) in enumerate(zip(original.tolist(), new.tolist(), status)):
        rows.append({"pair": pair, "wavelength": 2 * math.pi / old,
                     "new_wavelength": None if what == "zeroed" else 2 * math.pi / now, "status": what})
    return rows


def _card_body(result: ExtensionPlan, source: str) -> str:
    counts = {s: result.status.count(s) for s in ("kept", "interpolated", "clamped", "zeroed") if s in result.status}
    options = ", ".join(f"{k} {v}" for k, v in result.parameters.items())
    return (f"`{source}` with its RoPE extended by [surgery](https://pypi.org/project/surgery/): **{result.method}**"
            f" ({options or 'defaults'}); trained length {result.geometry.trained_length}, new length "
            f"{result.new_length}. Rotary pairs: {json.dumps(counts)}. The weights are unchanged; only config.json "
            "differs, verified against the frequencies transformers derives from it. Check with `surgery verify-rope`.")


def extend(config: ExtendConfig, *, progress=None) -> ExtendResult:
    """Copy ``config.source`` to ``config.output`` (atomically) with the config of the extension, verified first.

    Args:
        config: the extension (``dry_run``: plan and verify only).
        progress: called with the bytes written, as they are.

    Returns:
        An :class:`ExtendResult`.

    Example::

        extend(ExtendConfig("smol", "smol-16k", "linear", factor=2)).plan.new_length   # twice the source's
    """
    if config.dry_run:
        return ExtendResult(config, plan(config), None)
    source, output, method = config.source, config.output, config.rope
    check_output_available(output, config.force)
    with open_checkpoint(source, raw=True) as ckpt:  # tensors copied as stored: a quantized model stays so
        if not ckpt.config:
            raise BadInput(f"{source}: no config.json: nothing to extend")
        result = plan_extension(ckpt.config, method, **config.options)
        intended = check_plan(result).to_json()
        record = OutputRecord("extend", [ckpt])
        recipe = {"rope": method, **result.parameters, "source": str(source)}
        card = Card(f"{model_name(str(source))}, context extended ({method})", None, f"rope-{method}",
                    _card_body(result, str(source)))

        def files() -> dict[str, bytes]:
            return ckpt.auxiliary_files() | record.files(recipe, card, {"rope": intended})

        written = write_checkpoint(output, output_specs(ckpt, None), ckpt.get, config=result.config, files=files,
                                   max_shard_size=config.max_shard_size, force=config.force,
                                   progress=progress or (lambda nbytes: None),
                                   check=lambda staging: check_transformers(staging, [ckpt.path]))
    return ExtendResult(config, result, written)


def verify_rope(source: str | Path) -> dict:
    """What transformers derives from ``source``'s config, per pair, against the base frequencies.

    When ``source`` was written by ``surgery extend`` (its ``surgery.json``), it is also checked against the intended
    frequencies.

    Args:
        source: a checkpoint directory, file or Hub repo id.

    Returns:
        ``{"source", "rope_type", "attention_scaling", "pairs" (:func:`pair_table`), "intended", "problems"}``:
        ``problems`` lists the differences from the intended config (empty when none or nothing intended).

    Example:
        ``verify_rope("smol-16k")["problems"]``   # []
    """
    with open_checkpoint(source, raw=True) as ckpt:
        config = ckpt.config
        manifest = read_manifest(ckpt.path) if ckpt.path.is_dir() else {}
        if not config:
            raise BadInput(f"{source}: no config.json")
    original = rope_geometry(config).inv_freq
    output = manifest.get("output") if manifest.get("command") == "extend" else None
    intended = output.get("rope") if isinstance(output, dict) else None
    want = Expectation.from_json(intended, f"{Path(str(source)) / 'surgery.json'}") if intended else None
    got = read_back(config, want.dynamic_length if want else None)
    if got.error:
        raise BadInput(f"{source}: config.json: {got.error}")
    derived = got.inv_freq.double()
    status = classify_pairs(original, derived, rel_tol=1e-5)  # derived is float32
    report = {"source": str(source), "rope_type": got.rope.get("rope_type", "default"),
              "attention_scaling": got.attention, "pairs": pair_table(original, derived, status),
              "intended": want is not None, "problems": []}
    if want is not None:
        report["problems"] = problems(config, want)
    return report
