"""``surgery extend`` and ``surgery verify-rope``: read a checkpoint, plan the extension, verify it, write it.

The weights are copied unchanged, one tensor at a time; only ``config.json`` changes. The ``surgery.json`` manifest
records the intended frequencies, so ``verify-rope`` can check the output later against transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from surgery.convert import output_specs
from surgery.errors import BadInput
from surgery.extend.rope import ExtensionPlan, classify_pairs, plan_extension, rope_geometry
from surgery.extend.verify import check_plan, derived_frequencies, mismatches
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available
from surgery.provenance import hash_inputs_in_background, manifest_bytes, model_card_bytes


def plan(source: str | Path, method: str, **options) -> ExtensionPlan:
    """The verified extension plan for ``source``'s config (nothing written)."""
    with open_checkpoint(source) as ckpt:
        if not ckpt.config:
            raise BadInput(f"{source}: no config.json: nothing to extend")
        result = plan_extension(ckpt.config, method, **options)
    check_plan(result)
    return result


def pair_table(original: torch.Tensor, new: torch.Tensor, status: list[str]) -> list[dict]:
    """Per rotary pair: original and new wavelength (tokens; None = no rotation) and what happened to it."""
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


def extend(source: str | Path, output: str | Path, method: str, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
           force: bool = False, progress=lambda nbytes: None, **options) -> tuple[ExtensionPlan, WriteResult]:
    """Copy ``source`` to ``output`` (atomically) with the config of the extension ``method``, verified first."""
    check_output_available(output, force)
    with open_checkpoint(source) as ckpt:
        if not ckpt.config:
            raise BadInput(f"{source}: no config.json: nothing to extend")
        result = plan_extension(ckpt.config, method, **options)
        check_plan(result)
        hashes = hash_inputs_in_background([ckpt])
        recipe = {"rope": method, **result.parameters, "source": str(source)}
        intended = {"inv_freq": result.inv_freq.tolist(), "attention_factor": result.attention_factor,
                    "dynamic_length": result.new_length if method == "dynamic" else None}

        def files() -> dict[str, bytes]:
            aux = ckpt.auxiliary_files()
            aux["surgery.json"] = manifest_bytes("extend", recipe, hashes.result(), {"rope": intended})
            aux["README.md"] = model_card_bytes(title=f"{Path(str(source)).name}, context extended ({method})",
                                                relation=None, method=f"rope-{method}", checkpoints=[ckpt],
                                                body=_card_body(result, str(source)))
            return aux

        written = write_checkpoint(output, output_specs(ckpt, None), ckpt.get, config=result.config, files=files,
                                   max_shard_size=max_shard_size, force=force, progress=progress,
                                   check=check_transformers)
    return result, written


def verify_rope(source: str | Path) -> dict:
    """What transformers derives from ``source``'s config, per pair, against the base frequencies — and against the
    intended ones when ``source`` was written by ``surgery extend`` (its ``surgery.json``)."""
    with open_checkpoint(source) as ckpt:
        config = ckpt.config
        manifest = ckpt.path / "surgery.json" if ckpt.path.is_dir() else None
        if not config:
            raise BadInput(f"{source}: no config.json")
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    original = rope_geometry(config, unscaled=False).inv_freq
    intended = None
    if manifest is not None and manifest.is_file():
        intended = json.loads(manifest.read_text()).get("output", {}).get("rope")
    derived, attention = derived_frequencies(config, (intended or {}).get("dynamic_length"))
    status = classify_pairs(original, derived.double(), rel_tol=1e-5)  # derived is float32
    report = {"source": str(source), "rope_type": rope.get("rope_type", rope.get("type", "default")),
              "attention_scaling": attention, "pairs": pair_table(original, derived.double(), status),
              "intended": intended is not None, "problems": []}
    if intended is not None:
        want = torch.tensor(intended["inv_freq"], dtype=torch.float64)
        report["problems"] = mismatches(want, intended["attention_factor"], derived, attention)
    return report
