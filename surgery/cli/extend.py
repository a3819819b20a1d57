"""``surgery extend`` and ``verify-rope``: RoPE context extension."""

from __future__ import annotations

from typing import Optional

import typer

from surgery.cli.options import (JSON_OPTION, SHARD_OPTION, print_json, progress)
from surgery.errors import BadInput

app = typer.Typer()


EXTEND_HELP = " ".join("""
Stretch a model's context by rewriting its RoPE configuration (weights copied unchanged), verified against the
frequencies transformers derives from the written config. Methods: linear (--factor), ntk (static: new rope base),
dynamic, yarn (--beta-fast, --beta-slow), llama3 (--low-freq-factor, --high-freq-factor), power (Giraffe power
basis, --power k), truncated (Giraffe truncated basis, --cut-length L_t, optional --factor on top). power and
truncated are written as per-pair longrope factors (magnitude 1), which transformers and vLLM honour.
--target-length N sets the factor to N over the current length. Rope parameters a method does not set (e.g.
Qwen2-VL's mrope_section) are kept. A yarn or llama3 model (gpt-oss, Llama-3.1) is extended by the same method: its
factor is multiplied, its trained length and options kept unless given; other scalings are refused.
""".split("\n")).strip()


def _print_pairs(pairs: list[dict]) -> None:
    typer.echo(f"{'pair':>4}  {'wavelength':>12}  {'new wavelength':>14}  status")
    for row in pairs:
        new = "∞ (no rotation)" if row["new_wavelength"] is None else f"{row['new_wavelength']:.1f}"
        typer.echo(f"{row['pair']:>4}  {row['wavelength']:>12.1f}  {new:>14}  {row['status']}")


@app.command(help=EXTEND_HELP)
def extend(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    rope: str = typer.Option(..., "--rope", help="linear, ntk, dynamic, yarn, llama3, power or truncated."),
    factor: Optional[float] = typer.Option(None, "--factor", help="Scale s: new length over the current one."),
    target_length: Optional[int] = typer.Option(None, "--target-length",
                                                help="New length N (factor = N / the current length)."),
    beta_fast: Optional[float] = typer.Option(
        None, "--beta-fast", help="yarn: rotations above which pairs are kept (default: the model's, else 32)."),
    beta_slow: Optional[float] = typer.Option(
        None, "--beta-slow", help="yarn: rotations below which pairs are interpolated (default: the model's, else 1)."),
    low_freq_factor: Optional[float] = typer.Option(
        None, "--low-freq-factor", help="llama3: low-frequency bound (default: the model's, else 1)."),
    high_freq_factor: Optional[float] = typer.Option(
        None, "--high-freq-factor", help="llama3: high-frequency bound (default: the model's, else 4)."),
    power: Optional[float] = typer.Option(None, "--power", help="power: exponent k of θ_i·(1 − 2i/d)^k."),
    cut_length: Optional[int] = typer.Option(None, "--cut-length", help="truncated: cut length L_t in tokens."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-pair table; write nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.extend import ExtendConfig, extend as extension

    config = ExtendConfig(source, output, rope, factor=factor, target_length=target_length, beta_fast=beta_fast,
                          beta_slow=beta_slow, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                          power=power, cut_length=cut_length, max_shard_size=max_shard_size, force=force,
                          dry_run=dry_run)
    with progress(None, "B", "extend") as advance:
        result = extension(config, progress=advance)
    summary = result.summary()
    plan = result.plan
    if as_json:
        return print_json(summary)
    verb = "would write" if dry_run else "wrote"
    typer.echo(f"{verb} {output}: {rope} RoPE, length {plan.geometry.source_length} → {plan.new_length}, "
               f"attention factor {plan.attention_factor:.4g}; verified against transformers")
    if dry_run:
        _print_pairs(summary["pairs"])


@app.command("verify-rope")
def verify_rope(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the rotary frequencies transformers derives from a checkpoint's config, per pair; for an output of
    `surgery extend`, check everything its surgery.json records (frequencies, attention scaling, rope parameters,
    rotary-module attributes, length, the rope fields written, a forward of a tiny model): a mismatch exits 2."""
    from surgery.extend import verify_rope as verification

    report = verification(source)
    if as_json:
        print_json(report)
    else:
        typer.echo(f"{source}: rope_type {report['rope_type']}, attention scaling {report['attention_scaling']:.4g}")
        _print_pairs(report["pairs"])
        typer.echo("matches the intended frequencies (surgery.json)" if report["intended"] and not report["problems"]
                   else "no intended frequencies recorded (not written by surgery extend)" if not report["intended"]
                   else "")
    if report["problems"]:
        raise BadInput(f"{source}: config does not give the intended rotary embedding: "
                       + "; ".join(report["problems"][:3]))
