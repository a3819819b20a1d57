"""``surgery extract-lora``: a fine-tune's change to its base as a PEFT LoRA adapter."""

from __future__ import annotations

from typing import Optional

import typer

from surgery.cli.options import JSON_OPTION, print_json

app = typer.Typer()


@app.command("extract-lora")
def extract_lora(
    finetuned: str = typer.Argument(..., help="The fine-tuned model (directory, file or Hub id)."),
    base: str = typer.Option(..., "--base", help="The model it was tuned from."),
    output: str = typer.Option(..., "-o", "--output", help="Adapter directory to write (atomically)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="The rank of every module's LoRA."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Instead of --rank: per module, the smallest rank "
                                                                 "keeping this fraction of the change's squared "
                                                                 "norm (0-1]."),
    max_rank: int = typer.Option(256, "--max-rank", help="With --energy: the largest rank a module gets."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomised SVD (same seed, same bytes)."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run: cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Extract what FINETUNED changed in BASE's Linear layers as a PEFT LoRA adapter (one SVD per module, one
    module in memory at a time), loaded by `PeftModel.from_pretrained`. Changed tensors a LoRA cannot hold (norms,
    biases, embeddings) are listed, not dropped silently."""
    from surgery.adapters.lora import ExtractLoraConfig, extract_lora as run

    result = run(ExtractLoraConfig(finetuned, base=base, output=output, rank=rank, energy=energy,
                                   max_rank=max_rank, seed=seed, device=device, force=force))
    if as_json:
        return print_json(result.summary())
    ranks = list(result.ranks.values())
    typer.echo(f"wrote {result.output}: LoRA of {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)}, "
               f"{result.kept_energy:.4f} of the change's energy kept, worst relative error "
               f"{result.max_relative_error:.4f}")
    if result.not_carried:
        typer.echo(f"not in the adapter (a LoRA cannot hold them): {len(result.not_carried)} changed tensor(s), "
                   f"e.g. {next(iter(sorted(result.not_carried)))}")
