"""``surgery run``: a pipeline file's steps in order."""

from __future__ import annotations

import sys

import typer

from surgery.cli.options import (JSON_OPTION, print_json)

app = typer.Typer()


RUN_HELP = " ".join("""
Run the steps of a pipeline file in order. Each step is a command with the CLI's options (positional arguments
named: models for merge, input for the others, repo for push; output is -o). A step whose output exists and whose
stamp (OUTPUT.stamp.json; for push INPUT.push.stamp.json) records the same options and input content hashes is
skipped as up to date; otherwise it runs, replacing its output atomically, and so does every step after it.
""".split("\n")).strip()



@app.command("run", help=RUN_HELP)
def run_pipeline_file(
    pipeline: str = typer.Argument(..., help="Pipeline YAML: steps: [{merge: {...}}, {extend: {...}}, ...]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print which steps would run and why; run nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    from contextlib import redirect_stdout

    from surgery.pipeline import load_pipeline, run_pipeline

    reports, results = [], sys.stdout
    with redirect_stdout(sys.stderr):  # the steps' own results are logs here; the step reports are the result
        for report in run_pipeline(load_pipeline(pipeline), dry_run=dry_run):
            reports.append(report)
            print(report.describe(), file=sys.stderr if as_json else results, flush=True)
    if as_json:
        print_json({"steps": [{"step": r.step.number, "command": r.step.command, "output": r.step.output,
                                "status": r.status, "reason": r.reason} for r in reports]})
