"""``surgery moe``: dense models → a mixture of experts (mergekit-moe's YAML)."""

from __future__ import annotations

import typer

from surgery.cli.options import JSON_OPTION, SHARD_OPTION, human_size, print_json, progress

app = typer.Typer()

MOE_HELP = " ".join("""
Build a mixture-of-experts checkpoint from dense models, from a mergekit-moe YAML (base_model; experts, each a
source_model with positive_prompts and optional negative_prompts, noise_scale, residual_scale; gate_mode hidden,
cheap_embed or random; experts_per_token; shared_experts; architecture mixtral, qwen or qwen3; dtype). Attention,
norms and embeddings are the base's, each expert's MLPs become expert i of every layer, and with gate_mode hidden
router row i of a layer is what that layer's MLP receives in the base at the end of expert i's prompts (averaged,
normalised; the router's own input, where mergekit-moe takes the layer's input; streamed one layer at a time). llama and mistral make Mixtral, qwen2 Qwen2-MoE (one shared expert, gated by its
own prompts), qwen3 Qwen3-MoE. The output is checked against transformers' loader before it appears.
""".split("\n")).strip()


@app.command(help=MOE_HELP)
def moe(
    config: str = typer.Argument(..., help="mergekit-moe YAML file."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random gates and of noise_scale's noise."),
    device: str = typer.Option("cpu", "--device", help="Where hidden states are computed: cpu or cuda."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.moe import MoeConfig, moe as build

    job = MoeConfig.from_file(config, output, seed=seed, device=device, max_shard_size=max_shard_size, force=force)
    with progress(None, "B", "moe") as advance:
        result = build(job, progress=advance)
    if as_json:
        return print_json(result.summary())
    summary = result.summary()
    typer.echo(f"wrote {summary['output']}: {summary['model_type']}, {summary['experts']} experts "
               f"({summary['experts_per_token']} per token"
               + (f", {summary['shared_experts']} shared" if summary["shared_experts"] else "")
               + f"), {summary['layers']} layers, gates {summary['gate_mode']}, "
               f"{human_size(summary['total_bytes'])}")
