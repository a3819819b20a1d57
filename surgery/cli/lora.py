"""``surgery extract-lora`` (a fine-tune's change to its base as a PEFT LoRA adapter) and ``merge-lora`` (LoRA
adapters merged in adapter space)."""

from __future__ import annotations

import inspect
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
    embeddings: bool = typer.Option(False, "--embeddings", help="Also the input embedding's change, as an "
                                                                "embedding LoRA (same rank rule)."),
    save_module: Optional[list[str]] = typer.Option(None, "--save-module", help="A module saved whole (PEFT's "
                                                                              "modules_to_save): lm_head, norm, "
                                                                              "input_layernorm...; repeatable."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run: cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Extract what FINETUNED changed in BASE's Linear layers as a PEFT LoRA adapter (one SVD per module, one
    module in memory at a time), loaded by `PeftModel.from_pretrained`; --embeddings adds the embedding's change,
    --save-module saves norms or lm_head whole. Changed tensors the adapter does not hold are listed, not dropped
    silently."""
    from surgery.adapters.lora import ExtractLoraConfig, extract_lora as run

    result = run(ExtractLoraConfig(finetuned, base=base, output=output, rank=rank, energy=energy,
                                   max_rank=max_rank, seed=seed, device=device, force=force, embeddings=embeddings,
                                   save_modules=tuple(save_module or ())))
    if as_json:
        return print_json(result.summary())
    ranks = list(result.ranks.values())
    typer.echo(f"wrote {result.output}: LoRA of {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)}, "
               f"{result.kept_energy:.4f} of the change's energy kept, worst relative error "
               f"{result.max_relative_error:.4f}")
    if result.not_carried:
        typer.echo(f"not in the adapter (a LoRA cannot hold them): {len(result.not_carried)} changed tensor(s), "
                   f"e.g. {next(iter(sorted(result.not_carried)))}")


MERGE_LORA_HELP = " ".join("""
Merge LoRA adapters of one base in adapter space into one PEFT LoRA: each adapter's change scale·B·A to a module is
a task vector, merged by the method as `surgery merge` merges model − base (task_arithmetic, ties, dare_linear,
dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, tsv; same parameters), then factored again by a seeded
SVD at the sum of the inputs' ranks (exact for task arithmetic), --rank R, or --energy E. One module in memory at a
time; loaded back by PEFT before it appears.
""".split("\n")).strip()


def merge_lora(
    adapters: list[str] = typer.Argument(..., help="PEFT LoRA adapter directories, all of --base."),
    base: str = typer.Option(..., "--base", help="The model the adapters were trained on."),
    output: str = typer.Option(..., "-o", "--output", help="Adapter directory to write (atomically)."),
    method: str = typer.Option("task_arithmetic", "--method", help="Merge method (see above)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="W1,W2,...: one per adapter (default 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of DARE/DELLA masks and the SVD sketches."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Every module's output rank (default: the sum of the "
                                                            "inputs' ranks)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Instead: per module the smallest rank keeping "
                                                                 "this fraction of the merged change's squared "
                                                                 "norm (0-1]."),
    max_rank: int = typer.Option(256, "--max-rank", help="With --energy: the largest rank a module gets."),
    device: str = typer.Option("cpu", "--device", help="Where the math runs: cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
    **parameters,
) -> None:
    from surgery.adapters.lora_merge import MergeLoraConfig, merge_lora as run

    parameters = {key.removesuffix("_"): value for key, value in parameters.items() if value is not None}
    result = run(MergeLoraConfig.from_options(adapters, base=base, output=output, method=method, weights=weights,
                                              seed=seed, rank=rank, energy=energy, max_rank=max_rank, device=device,
                                              force=force, **parameters))
    if as_json:
        return print_json(result.summary())
    ranks = list(result.ranks.values())
    typer.echo(f"wrote {result.output}: {method} merge of {len(adapters)} adapter(s), LoRA of {len(ranks)} modules, "
               f"ranks {min(ranks)}-{max(ranks)}, worst relative error {result.max_relative_error:.4f}")


def _merge_lora_signature() -> inspect.Signature:
    """merge-lora's options with one per declared merge parameter (``--density``, ``--lambda``...), as merge has."""
    from surgery.cli.merge import _parameter_options

    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.name != "adapters" else p
             for p in inspect.signature(merge_lora, eval_str=True).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in fixed].index("weights") + 1
    own = {p.name for p in fixed}  # --rank is the output's rank here, not tsv's parameter
    declared = [p for p in _parameter_options() if p.name.removesuffix("_") not in own]
    return inspect.Signature(fixed[:at] + declared + fixed[at:])


merge_lora.__signature__ = _merge_lora_signature()
app.command("merge-lora", help=MERGE_LORA_HELP)(merge_lora)
