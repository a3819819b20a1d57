"""``surgery adapter``: a long prompt turned into a PEFT prefix or an NTK-attention adapter."""

from __future__ import annotations

from typing import Optional

import typer

from surgery.cli.options import DEVICE_OPTION, JSON_OPTION, human_size, print_json

app = typer.Typer(name="adapter", help="Prompt adapters: a long prompt turned into a PEFT prefix or an NTK-attention "
                                 "adapter, with a fidelity score.", no_args_is_help=True)


PROMPT_OPTION = typer.Option(..., "--prompt-file", help="UTF-8 text of the prompt (special tokens written out).")
ADAPTER_FORCE_OPTION = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is "
                                                           "complete).")


@app.command("prefix")
def adapter_prefix(
    source: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id."),
    prompt_file: str = PROMPT_OPTION,
    output: str = typer.Option(..., "-o", "--output", help="Adapter directory (written atomically)."),
    force: bool = ADAPTER_FORCE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Prefill the prompt and pack its KV cache as a PEFT prefix-tuning adapter: PeftModel.from_pretrained(model,
    OUTPUT) then gives the logits of the model run on prompt + query."""
    from surgery.adapters import PrefixAdapterConfig, make_prefix_adapter

    config = PrefixAdapterConfig(source=source, prompt_file=prompt_file, output=output, force=force, device=device)
    summary = make_prefix_adapter(config).summary()
    if as_json:
        return print_json(summary)
    typer.echo(f"wrote {summary['output']}: prefix of {summary['prompt_tokens']} tokens, "
               f"{human_size(summary['adapter_bytes'])}, {summary['seconds']:.1f} s")


@app.command("ntk")
def adapter_ntk(
    source: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id (llama, mistral, qwen2)."),
    output: str = typer.Option(..., "-o", "--output", help="Adapter directory (written atomically)."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Prompt to distil into the adapter."),
    train_file: Optional[str] = typer.Option(None, "--train-file", help="Instead of a prompt: task data to train "
                                                                        "on (.jsonl with \"text\", or paragraphs)."),
    queries: Optional[str] = typer.Option(None, "--queries", help="Distillation queries (.jsonl or paragraphs; "
                                                                  "default: continuations the model samples)."),
    steps: int = typer.Option(200, "--steps", help="Adam steps of training on --train-file, or at most of "
                              "distillation: it keeps the values with the lowest KL on held-back queries (a quarter, "
                              "32 at most) and stops once that KL stops falling."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate; distilling, relative to each head's starting size."),
    batch: int = typer.Option(8, "--batch", help="Queries (or texts) per step."),
    count: int = typer.Option(512, "--count", help="Self-generated queries."),
    length: int = typer.Option(32, "--length", help="Tokens per query."),
    exact_tokens: int = typer.Option(16, "--exact-tokens", help="Distilling: prompt tokens per layer and KV head "
                                     "kept exactly, those that draw the most attention (0: the paper's pure form)."),
    least_squares: bool = typer.Option(True, "--least-squares/--no-least-squares",
                                       help="Fit each layer by least squares between closed form and distillation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the queries, the minibatches and a from-scratch start."),
    force: bool = ADAPTER_FORCE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """NTK-attention adapter (arXiv 2406.14036): per layer and KV head a d×d Z and a d-vector k standing in for
    the prompt, plus the --exact-tokens prompt tokens that draw the most attention kept as they are: closed form
    from the prompt's keys and values, least squares per layer, then distillation (KL to the model run with the
    real prompt), validated on held-back queries. Or, with --train-file, the same module trained on task data from
    noise. Use it with surgery.adapters.ntk_attention.apply(model, OUTPUT)."""
    from surgery.adapters import NTKAdapterConfig, make_ntk_adapter

    config = NTKAdapterConfig(source=source, output=output, prompt_file=prompt_file, train_file=train_file,
                              queries=queries, steps=steps, lr=lr, batch=batch, count=count, length=length,
                              exact_tokens=exact_tokens, least_squares=least_squares, seed=seed, force=force,
                              device=device)
    summary = make_ntk_adapter(config).summary()
    if as_json:
        return print_json(summary)
    stages = ", ".join(f"{stage} {value:.4f}" for stage, value in summary.get("train_kl", {}).items())
    validation = summary.get("validation_kl")
    kept = (f"; validation KL {validation['start']:.4f} before distillation, {validation['kept']:.4f} kept (step "
            f"{summary['kept_step']} of {summary['steps_run']} run)" if validation else "")
    typer.echo(f"wrote {summary['output']}: NTK-attention, {human_size(summary['adapter_bytes'])}"
               + (f"; training KL: {stages}" if stages else "") + kept + f"; {summary['seconds']:.1f} s")


@app.command("eval")
def adapter_eval(
    model: str = typer.Argument(..., help="The model the adapter was made for (directory, .gguf, Hub repo id)."),
    adapter: str = typer.Argument(..., help="A prefix or NTK-attention adapter directory."),
    prompt_file: str = PROMPT_OPTION,
    queries: Optional[str] = typer.Option(None, "--queries", help="Held-out queries (.jsonl or paragraphs; "
                                                                  "default: continuations the model samples)."),
    count: int = typer.Option(64, "--count", help="Self-generated queries."),
    length: int = typer.Option(32, "--length", help="Tokens per query."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out queries (never those training drew)."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fidelity: mean next-token KL against the model run with the real prompt, for the adapter and for no prompt,
    top-1 agreement, and the adapter's size against the prompt's KV cache."""
    from surgery.adapters import AdapterEvalConfig, evaluate

    config = AdapterEvalConfig(model=model, adapter=adapter, prompt_file=prompt_file, queries=queries, count=count,
                               length=length, seed=seed, device=device)
    report = evaluate(config).summary()
    if as_json:
        return print_json(report)
    typer.echo(f"{report['kind']} adapter on {report['queries']} queries ({report['positions']} positions): "
               f"kl_adapter {report['kl_adapter']:.4f}, kl_no_prompt {report['kl_no_prompt']:.4f} nats; top-1 "
               f"agreement {report['top1_adapter']:.3f} (no prompt {report['top1_no_prompt']:.3f}); adapter "
               f"{human_size(report['adapter_bytes'])} vs prompt KV cache "
               f"{human_size(report['prompt_kv_cache_bytes'])} "
               f"({report['prompt_tokens']} tokens)")
