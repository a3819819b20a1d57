"""``surgery extend`` and ``surgery verify-rope``: read a checkpoint, plan the extension, verify it, write it.

The weights are copied unchanged, one tensor at a time; only ``config.json`` changes. The ``surgery.json`` manifest
records everything the check compared (frequencies, rope parameters, rotary attributes, length, the rope fields
written), so ``verify-rope`` can check the output later against transformers::

    extend("gpt-oss-20b", "gpt-oss-256k", "yarn", factor=2)    # yarn factor 32 → 64 over the same 4096 positions
    verify_rope("gpt-oss-256k")["problems"]                      # [] unless config.json was edited since
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from surgery.convert import output_specs
from surgery.errors import BadInput
from surgery.extend.rope import ExtensionPlan, classify_pairs, plan_extension, rope_geometry
from surgery.extend.verify import Expectation, check_plan, problems, read_back
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available
from surgery.provenance import hash_inputs_in_background, manifest_bytes, model_card_bytes, read_manifest


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
        intended = check_plan(result).to_json()
        hashes = hash_inputs_in_background([ckpt])
        recipe = {"rope": method, **result.parameters, "source": str(source)}

        def files() -> dict[str, bytes]:
            aux = ckpt.auxiliary_files()
            aux["surgery.json"] = manifest_bytes("extend", recipe, hashes.result(), {"rope": intended})
            aux["README.md"] = model_card_bytes(title=f"{Path(str(source)).name}, context extended ({method})",
                                                relation=None, method=f"rope-{method}", checkpoints=[ckpt],
                                                body=_card_body(result, str(source)))
            return aux

        written = write_checkpoint(output, output_specs(ckpt, None), ckpt.get, config=result.config, files=files,
                                   max_shard_size=max_shard_size, force=force, progress=progress,
                                   check=lambda staging: check_transformers(staging, [ckpt.path]))
    return result, written


def verify_rope(source: str | Path) -> dict:
    """What transformers derives from ``source``'s config, per pair, against the base frequencies — and against the
    intended ones when ``source`` was written by ``surgery extend`` (its ``surgery.json``)."""
    with open_checkpoint(source) as ckpt:
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
