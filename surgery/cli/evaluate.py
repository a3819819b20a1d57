"""``surgery eval``: offline evaluations (answer length, passkey retrieval, perplexity)."""

from __future__ import annotations

from typing import Optional

import typer

from surgery.cli.options import (BATCH_OPTION, CHAT_TEMPLATE_OPTION, DEVICE_OPTION, JSON_OPTION, LENGTHS_OPTION,
                                 LIMIT_OPTION, MAX_NEW_TOKENS_OPTION, SAMPLE_SEED_OPTION, SAMPLES_OPTION,
                                 TEMPERATURE_OPTION, check_device, print_json)
from surgery.errors import BadInput

app = typer.Typer(name="eval", help="Evaluations that run offline: answer accuracy against length, passkey retrieval, "
                            "perplexity.",
                       no_args_is_help=True)


def _eval_model(model: str, device: str):
    from surgery.evaluation import load_model

    check_device(device)
    return load_model(model, device)


@app.command("passkey")
def eval_passkey(
    model: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id."),
    lengths: str = LENGTHS_OPTION,
    depths: int = typer.Option(5, "--depths", help="Depths per length, spread evenly through the filler."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pass keys."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Passkey retrieval: accuracy per length (greedy, first integer generated)."""
    from surgery.evaluation import parse_lengths, passkey

    wanted = parse_lengths(lengths)
    if depths < 1:
        raise BadInput(f"--depths {depths}: must be at least 1")
    loaded, tokenizer = _eval_model(model, device)
    results = passkey(loaded, tokenizer, wanted, depths, seed)
    if as_json:
        return print_json({"model": model, "passkey": results})
    for row in results:
        typer.echo(f"length {row['length']:>6}: accuracy {row['accuracy']:.2f} ({len(row['trials'])} depths)")


@app.command("perplexity")
def eval_perplexity(
    model: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id."),
    lengths: str = LENGTHS_OPTION,
    text: Optional[str] = typer.Option(None, "--text", help="UTF-8 text file (default: Python's bundled docs)."),
    stride: int = typer.Option(256, "--stride", help="Sliding-window stride in tokens."),
    scored_tokens: int = typer.Option(1024, "--scored-tokens", help="Tokens scored past the first window."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sliding-window perplexity per window length."""
    from pathlib import Path

    from surgery.evaluation import parse_lengths, perplexity

    wanted = parse_lengths(lengths)
    if stride < 1 or scored_tokens < 0:
        raise BadInput("--stride must be positive and --scored-tokens non-negative")
    content = None
    if text is not None:
        try:
            content = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BadInput(f"--text {text}: cannot read it ({err})") from None
    loaded, tokenizer = _eval_model(model, device)
    results = perplexity(loaded, tokenizer, wanted, content, stride, scored_tokens)
    if as_json:
        return print_json({"model": model, "perplexity": results})
    for row in results:
        typer.echo(f"length {row['length']:>6}: perplexity {row['perplexity']:.3f} ({row['tokens_scored']} tokens)")




@app.command("length")
def eval_length(
    model: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id."),
    tasks: str = typer.Option(..., "--tasks", help="JSONL: one {\"prompt\", \"answer\"[, \"difficulty\"]} per "
                                                   "line."),
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = BATCH_OPTION,
    chat_template: Optional[bool] = CHAT_TEMPLATE_OPTION,
    limit: Optional[int] = LIMIT_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    samples: int = SAMPLES_OPTION,
    seed: int = SAMPLE_SEED_OPTION,
    responses: Optional[str] = typer.Option(None, "--responses", help="Also write every response and its score to "
                                                                      "this JSONL file."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Accuracy, mean response length and reflection rate per difficulty, the long-to-short measures: greedy, or
    --samples answers per task at --temperature (seeded) so that they are rates."""
    from surgery.evaluation.length import check_sampling, evaluate_length, load_tasks, write_responses

    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise BadInput("--max-new-tokens, --batch-size and --limit must be at least 1")
    check_sampling(temperature, samples)
    chosen = load_tasks(tasks)[:limit]
    loaded, tokenizer = _eval_model(model, device)
    report = evaluate_length(loaded, tokenizer, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             chat_template=chat_template, temperature=temperature, samples=samples, seed=seed)
    rows = report.pop("responses")
    if responses:
        write_responses(responses, rows)
    if as_json:
        return print_json({"model": model, "tasks": tasks, **report})
    sampled = f", {samples} samples each at temperature {temperature:g}" if temperature else ""
    typer.echo(f"{model}: accuracy {report['accuracy']:.3f}, mean length {report['mean_length']:.1f} tokens, "
               f"reflective {report['reflection_rate']:.2f}, truncated {report['truncated_rate']:.2f} "
               f"({len(chosen)} tasks{sampled})")
    for level, row in report["by_difficulty"].items():
        typer.echo(f"  difficulty {level}: accuracy {row['accuracy']:.3f}, mean length {row['mean_length']:.1f}, "
                   f"reflective {row['reflection_rate']:.2f} ({row['count']})")
