"""The ``surgery`` command line: parses options, calls the library, prints.

Results go to stdout (``--json`` for machines), logs and progress bars to stderr (bars only on a terminal).
Exit codes: 0 success, 2 bad input or usage (one line, no traceback), 1 a failed check of the result (one line) or
an internal error.

One module per command group (``surgery/cli/<module>.py``, each with its own ``app``); :data:`COMMANDS` maps a
command name to its module, imported only when that command runs (or for ``--help``), so ``surgery --version``
and ``surgery inspect`` never import the merge methods, torch's kernels or triton. A new command is a function in
a module here and one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

import click
import typer
from typer.core import TyperGroup

from surgery import __version__
from surgery.errors import BadInput, Failed

# command → its module under surgery/cli/ (help lists them in this order); eval and adapter are groups
COMMANDS = {
    "inspect": "checkpoint", "diff": "checkpoint", "convert": "checkpoint",
    "merge": "merge", "merge-multi": "merge", "quantize": "quantize", "verify": "quantize", "calibrate": "merge",
    "extend": "extend", "verify-rope": "extend", "eval": "evaluate", "adapter": "adapter",
    "sweep": "merge", "run": "run", "push": "push", "moe": "moe", "extract-lora": "lora", "merge-lora": "lora",
}
GROUPS = {"eval", "adapter"}


class LazyCommands(TyperGroup):
    """The top-level group: a command's module is imported when the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        commands = importlib.import_module(f"surgery.cli.{module}").app
        group = typer.main.get_group(commands)
        return group if name in GROUPS else group.get_command(ctx, name)


app = typer.Typer(
    cls=LazyCommands,
    help="Model surgery for LLM checkpoints: inspect, diff, convert, merge, moe, extend, quantize and push, streaming "
         "one tensor at a time.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

LOG_FORMAT = "surgery: %(levelname)s: %(message)s"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Streaming model surgery for Hugging Face checkpoints (safetensors, GGUF, Hub repo ids)."""


def _terminate(signum, frame):  # pragma: no cover - exercised by the kill tests through a subprocess
    raise SystemExit(128 + signum)


def invoke(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return its exit code: 0 success, 2 bad
    input or usage (one line on stderr), 1 a failed check (one line) or an internal error, 130 interrupted::

        invoke(["merge", "base", "ft", "--method", "ties", "-o", "out"])
    """
    try:
        app(args=argv, prog_name="surgery")
    except SystemExit as done:  # click ends every run with SystemExit
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BadInput as err:
        typer.echo(f"surgery: error: {err}", err=True)
        return 2
    except Failed as err:
        typer.echo(f"surgery: error: {err}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("surgery: interrupted", err=True)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns crashes into a one-line report
        if os.environ.get("SURGERY_DEBUG"):
            raise
        typer.echo(f"surgery: internal error: {type(err).__name__}: {err} (set SURGERY_DEBUG=1 for a traceback)",
                   err=True)
        return 1
    return 0


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)  # run cleanups (staging directories) on `kill` too
    sys.exit(invoke())
