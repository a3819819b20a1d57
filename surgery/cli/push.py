"""``surgery push``: upload to the Hugging Face Hub."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from surgery.cli.options import (JSON_OPTION, print_json, human_size)

app = typer.Typer()


@app.command("push")
def push(
    directory: str = typer.Argument(..., help="Checkpoint directory: config.json + safetensors weights (or an "
                                              "index), or a PEFT adapter."),
    repo_id: str = typer.Argument(..., help="Hub model repository, namespace/name (created when missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps "
                                                          "its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (made from main when "
                                                                    "missing)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Title of the commit."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded; no network call."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub in one commit, with a model card made from surgery.json (an
    existing README.md is kept, its front matter completed). Hidden files are never sent. Token: HF_TOKEN or
    `hf auth login`. Interrupted? Run the same command again: what arrived is not sent again."""
    from surgery import hub

    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    config = hub.PushConfig(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                            create_pr=create_pr, dry_run=dry_run)
    result = hub.push(config)  # hub.PushFailed: one line, exit 1 (surgery.cli.invoke)
    if as_json:
        return print_json(result.summary())
    verb = "would push" if dry_run else "pushed"
    typer.echo(f"{verb} {len(result.files)} files ({human_size(result.bytes)}) to "
               f"{result.repo_id}@{result.revision}; model card {result.card}")
    if dry_run:
        for name, size in result.files.items():
            typer.echo(f"  {name}  {human_size(size)}")
        return
    typer.echo(result.commit_url)
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")
