"""``surgery inspect``, ``diff`` and ``convert``: reading checkpoints and re-writing them."""

from __future__ import annotations

import json
from typing import Optional

import typer

from surgery.cli.options import (JSON_OPTION, SHARD_OPTION, print_json, progress, human_size)

app = typer.Typer()


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id "
                                           "org/name[@rev]."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor (name, dtype, shape, role, layer, "
                                                         "part, expert)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Architecture, parameter count, dtypes, shards, tied embeddings, rope settings, MoE experts and the
    text / vision / projector split of a checkpoint; roles from the model transformers builds for its config."""
    from surgery.io import open_checkpoint
    from surgery.report import inspect_checkpoint

    with open_checkpoint(source) as ckpt:
        report = inspect_checkpoint(ckpt, with_tensors=tensors)
    if as_json:
        return print_json(report)
    arch = report["architecture"]
    lines = [
        f"source        {report['source']} ({report['format']})",
        f"architecture  {', '.join(arch['architectures']) or '?'} (model_type {arch['model_type']}"
        + ("" if arch["known_family"] else ", unknown family: roles guessed from names") + ")",
        f"parameters    {report['parameters']:,} in {report['num_tensors']} tensors "
        f"({human_size(report['tensor_bytes'])})",
        "dtypes        " + ", ".join(f"{name} ×{d['tensors']}" for name, d in report["dtypes"].items()),
        f"layers        {arch['num_layers']}, hidden {arch['hidden_size']}, heads {arch['num_attention_heads']}"
        f" / kv {arch['num_key_value_heads']}, head_dim {arch['head_dim']}, vocab {arch['vocab_size']}",
        f"embeddings    {'tied (no lm_head tensor)' if report['tied_embeddings'] else 'separate lm_head'}",
        f"context       {arch['max_position_embeddings']}, rope {json.dumps(arch['rope'], sort_keys=True)}",
        "files         " + ", ".join(f"{name} ({human_size(size)})" for name, size in report["files"].items()),
    ]
    if "experts_per_layer" in arch:
        lines.insert(5, f"experts       {arch['experts_per_layer']} per layer in {arch['moe_layers']} MoE layers, "
                        f"{arch['active_experts']} active per token, "
                        + ("with shared experts" if arch["shared_experts"] else "no shared experts"))
    if "parameters_by_part" in arch:
        lines.insert(5, "parts         " + ", ".join(f"{part} {count:,}"
                                                     for part, count in arch["parameters_by_part"].items()))
    typer.echo("\n".join(lines))
    for row in report.get("tensors", []):
        facts = [row["role"]] + ([f"L{row['layer']}"] if row["layer"] is not None else []) \
            + ([row["part"]] if row["part"] != "text" else []) \
            + ([f"expert {row['expert']}"] if "expert" in row else []) \
            + ([f"{row['experts']} experts fused"] if "experts" in row else []) \
            + (["shared"] if "shared" in row else [])
        typer.echo(f"  {row['name']}  {row['dtype']}  {tuple(row['shape'])}  {' '.join(facts)}")


@app.command()
def diff(
    a: str = typer.Argument(..., help="Reference checkpoint (any source inspect accepts)."),
    b: str = typer.Argument(..., help="Checkpoint compared against A."),
    top: int = typer.Option(10, "--top", help="How many most-changed tensors to list (text output)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Missing / extra / shape-mismatched tensors, and per tensor ‖B−A‖/‖A‖ and cosine(A, B)."""
    from surgery.io import open_checkpoint
    from surgery.report import diff_checkpoints

    with open_checkpoint(a) as ckpt_a, open_checkpoint(b) as ckpt_b:
        with progress(len(ckpt_a.tensors), "tensor", "diff") as advance:
            report = diff_checkpoints(ckpt_a, ckpt_b, progress=advance)
    if as_json:
        return print_json(report)
    summary = report["summary"]
    typer.echo(f"compared {summary['compared']} tensors ({summary['identical']} identical); "
               f"missing in B {len(report['missing'])}, extra in B {len(report['extra'])}, "
               f"shape mismatches {len(report['shape_mismatch'])}")
    cosine = summary["min_cosine"]
    typer.echo(f"relative delta max {summary['max_relative_delta']:.3e}, mean {summary['mean_relative_delta']:.3e}; "
               f"min cosine {'n/a' if cosine is None else f'{cosine:.6f}'}")
    for name in report["missing"]:
        typer.echo(f"  missing in B: {name}")
    for name in report["extra"]:
        typer.echo(f"  extra in B:   {name}")
    for row in report["shape_mismatch"]:
        typer.echo(f"  shape:        {row['name']} {tuple(row['shape_a'])} vs {tuple(row['shape_b'])}")
    changed = sorted(report["tensors"], key=lambda row: -row["relative_delta"])[:top]
    for row in changed:
        if row["delta_norm"] > 0:
            cos = "n/a" if row["cosine"] is None else f"{row['cosine']:.6f}"
            typer.echo(f"  {row['relative_delta']:.3e}  cos {cos}  {row['name']}")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating tensors: float32, bfloat16, float16."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (only once the new one is "
                                                      "complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan without writing anything."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-shard, cast, or import a GGUF file into a safetensors checkpoint that transformers loads."""
    from surgery.convert import ConvertConfig, convert as conversion

    config = ConvertConfig(source, output, dtype, max_shard_size, force, dry_run)
    if dry_run:
        plan = conversion(config).summary()
        if as_json:
            return print_json(plan)
        typer.echo(f"would write {output}: {len(plan['shards'])} shard(s), {human_size(plan['total_bytes'])}, "
                   f"dtype {plan['dtype']}")
        for file, shard in plan["shards"].items():
            typer.echo(f"  {file}: {shard['tensors']} tensors, {human_size(shard['bytes'])}")
        return
    with progress(None, "B", "convert") as advance:
        result = conversion(config, progress=advance)
    if as_json:
        return print_json(result.summary())
    written = result.written
    typer.echo(f"wrote {written.directory}: {len(written.shards)} shard(s), {human_size(written.total_size)}, "
               f"{len(written.files)} files")
