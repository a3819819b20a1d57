"""Options and helpers every command module shares: the typed option aliases, JSON and size printing, progress."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

import typer

from surgery.errors import BadInput

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu or cuda.")
SHARD_OPTION = typer.Option("5GB", "--max-shard-size", help="Largest shard file, e.g. 5GB, 500MB (powers of ten).")
LENGTHS_OPTION = typer.Option("1k,2k,4k", "--lengths", help="Comma-separated lengths in tokens (k = 1024).")
MAX_NEW_TOKENS_OPTION = typer.Option(512, "--max-new-tokens", help="Generation limit per answer.")
BATCH_OPTION = typer.Option(16, "--batch-size", help="Prompts generated together.")
CHAT_TEMPLATE_OPTION = typer.Option(None, "--chat-template/--no-chat-template",
                                    help="Wrap prompts in the tokenizer's chat template (default: when it has one).")
LIMIT_OPTION = typer.Option(None, "--limit", help="Only the first N tasks.")
TEMPERATURE_OPTION = typer.Option(0.0, "--temperature", help="Sample answers at this temperature (0: greedy).")
SAMPLES_OPTION = typer.Option(1, "--samples", help="Answers sampled per task (with --temperature above 0): the "
                                                   "figures become rates over the samples.")
SAMPLE_SEED_OPTION = typer.Option(0, "--seed", help="Seed of the sampled answers.")


def print_json(value: dict) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def human_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    raise AssertionError("unreachable")


@contextmanager
def progress(total: int | None, unit: str, description: str) -> Iterator:
    """A tqdm bar on stderr when stderr is a terminal; otherwise a silent counter."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=description, file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    try:
        yield bar.update
    finally:
        bar.close()



def check_device(device: str) -> None:
    if device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")


def float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"{option} {text!r}: expected comma-separated numbers") from None

