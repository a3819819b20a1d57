"""``surgery merge --check``: how the merged model behaves, measured before the output appears.

On probe text the reference parent (the base, else the first model) writes itself (seeded, no dataset), the merged
model and each parent run through the streaming runtime (one decoder layer in memory at a time):

- ``kl``: mean next-token KL(parent ‖ merged) over the probe's positions, and ``top1_agreement``: the share of
  positions where both predict the same next token;
- ``nll``: each model's mean negative log-likelihood of the probe's next tokens (the merged model's beside its
  parents': a merge that predicts the text far worse than every parent is broken);
- ``kl_to_base``: each other parent's KL(base ‖ parent), the scale the merged model's distances compare with.

Also: every output tensor finite; the tokenizer loads, has no more tokens than the embedding has rows and its special
tokens are inside them; the chat template renders, and is there when a parent has one. A non-finite weight, and a
broken tokenizer no parent shares, are CheckFailed (nothing written); the rest are numbers and warnings, written
into the card and ``surgery.json``. Where the probe cannot run (no BOS or EOS, a family the streaming runtime
cannot run), the report says why instead::

    report = check_merge(staging, inputs.checkpoints, reference=inputs.reference, base=inputs.base, seed=0)
    report["parents"][0]["kl"], report["merged_nll"], report["warnings"]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from surgery.arch import Architecture
from surgery.cards import model_name
from surgery.errors import BadInput, CheckFailed, one_line
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint
from surgery.merge.chat_template import template_of
from surgery.merge.sparsify import chunk_slices

PROBE_TOKENS = 256
PROBE_SEQUENCES = 4
GIBBERISH_NLL = 1.0  # nats: the merged model's probe NLL this far above its worst parent's is a warning
DIGITS = 4  # measured numbers are rounded: the card and surgery.json repeat byte for byte


def _embedding_rows(checkpoint: Checkpoint) -> int | None:
    arch = Architecture.from_config(checkpoint.config)
    rows = [info.shape[0] for name, info in checkpoint.tensors.items() if arch.role(name).kind == "embedding"]
    return rows[0] if rows else None


def _non_finite(checkpoint: Checkpoint) -> list[str]:
    bad = []
    for name in checkpoint.tensors:
        flat = checkpoint.get(name).reshape(-1)
        if flat.is_floating_point() and not all(torch.isfinite(flat[part]).all() for part in chunk_slices(flat.numel())):
            bad.append(name)
    return bad


def tokenizer_problems(checkpoint: Checkpoint) -> tuple[list[str], dict]:
    """What is wrong with a checkpoint's tokenizer and chat template, and what was found.

    Args:
        checkpoint: an open checkpoint.

    Returns:
        (problems, facts): problems are one-line sentences (empty: none); facts are ``{"tokens", "embedding_rows",
        "chat_template": None | "renders" | "fails: ..."}``.

    Example: ``problems, facts = tokenizer_problems(open_checkpoint("out"))``
    """
    from surgery.runtime import load_tokenizer
    from surgery.runtime.text import has_tokenizer_files

    facts: dict = {"tokens": None, "embedding_rows": _embedding_rows(checkpoint), "chat_template": None}
    if not has_tokenizer_files(checkpoint.auxiliary_files()):
        return [], facts
    try:
        tokenizer = load_tokenizer(checkpoint)
    except BadInput as err:
        return [f"the tokenizer does not load: {err}"], facts
    rows = facts["embedding_rows"]
    facts["tokens"] = len(tokenizer)
    problems = []
    if rows is not None and len(tokenizer) > rows:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the embedding {rows} rows (ids from {rows} "
                        "up index out of range)")
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if rows is not None and isinstance(token_id, int) and token_id >= rows:
            problems.append(f"the {role} token's id {token_id} is outside the embedding's {rows} rows")
    if template_of(checkpoint.auxiliary_files()):
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                          add_generation_prompt=True)
            facts["chat_template"] = "renders"
        except Exception as err:  # noqa: BLE001 - any template error is reported, not raised
            facts["chat_template"] = f"fails: {one_line(err)}"
            problems.append(f"the chat template does not render a one-message conversation ({one_line(err)})")
    return problems, facts


def _probe(reference: Checkpoint, merged: Checkpoint, seed: int) -> tuple[torch.Tensor, object]:
    """(sequences, tokens) ids the reference parent samples from its BOS token, as the merged model's tokenizer
    spells them (the same ids when the vocabularies are the same, else the text tokenized again)."""
    from surgery.runtime import calibration_blocks, load_tokenizer, loaded_model, self_generated_ids

    tokenizer, theirs = load_tokenizer(merged), load_tokenizer(reference)
    ids = self_generated_ids(loaded_model(reference), theirs, PROBE_TOKENS, seed, sequences=PROBE_SEQUENCES)
    if theirs.get_vocab() == tokenizer.get_vocab():
        return ids, tokenizer
    text = "\n\n".join(theirs.batch_decode(ids[:, 1:], skip_special_tokens=True))
    blocks = calibration_blocks(tokenizer, text, PROBE_TOKENS, ids.shape[1])
    blocks = [block for block in blocks if block.numel() == blocks[0].numel()]
    return torch.stack(blocks), tokenizer


def _log_probs(checkpoint: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    from surgery.runtime import log_probs, streamed_model

    with streamed_model(checkpoint) as model:
        return log_probs(model, ids)


def _nll(log_p: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-log_p[:, :-1].gather(-1, ids[:, 1:, None]).mean())


def _same_vocabulary(parent: Checkpoint, tokenizer) -> bool:
    """Whether ``parent``'s token ids mean the tokens they mean to the merged model's ``tokenizer``."""
    from surgery.runtime import load_tokenizer

    try:
        return load_tokenizer(parent).get_vocab() == tokenizer.get_vocab()
    except BadInput:
        return False


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean KL(P ‖ Q) over the positions; float32 rounding can make a zero KL slightly negative: clamped at 0."""
    from surgery.runtime import kl_per_position

    return _rounded(max(0.0, float(kl_per_position(log_p, log_q).mean())))


def _rounded(value: float) -> float:
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else value


def _measure_parents(report: dict, merged: Checkpoint, parents: list[Checkpoint], *, reference: Checkpoint,
                     base: Checkpoint | None, seed: int) -> None:
    """Fill ``report``'s probe, merged_nll and parents (KL, top-1, NLL, KL to the base) and the NLL warning."""
    from surgery.runtime import top1_agreement

    ids, tokenizer = _probe(reference, merged, seed)
    probe = {"tokens": int(ids.numel()), "sequences": int(ids.shape[0]), "written_by": model_name(reference.source),
             "seed": seed}
    merged_log_p = _log_probs(merged, ids)
    merged_nll = _rounded(_nll(merged_log_p, ids))
    base_log_p = None
    rows = []
    for parent in sorted(parents, key=lambda p: p is not base):  # the base first: the others compare with it
        row: dict = {"model": model_name(parent.source), "base": parent is base}
        if not _same_vocabulary(parent, tokenizer) or _embedding_rows(parent) != _embedding_rows(merged):
            row["skipped"] = "another vocabulary: its next-token distributions are over other tokens"
            rows.append(row)
            continue
        log_p = _log_probs(parent, ids)
        row |= {"kl": _kl(log_p, merged_log_p),
                "top1_agreement": _rounded(top1_agreement(log_p, merged_log_p)), "nll": _rounded(_nll(log_p, ids))}
        if parent is base:
            base_log_p = log_p
        elif base_log_p is not None:
            row["kl_to_base"] = _kl(base_log_p, log_p)
        rows.append(row)
    report |= {"probe": probe, "merged_nll": merged_nll, "parents": rows}
    measured = [row["nll"] for row in rows if "nll" in row]
    if measured and merged_nll > max(measured) + GIBBERISH_NLL:
        report["warnings"].append(f"the merge predicts the probe text far worse than every parent (NLL "
                                  f"{merged_nll:.2f} vs {min(measured):.2f}-{max(measured):.2f} nats): check the "
                                  "method and parameters")


def check_merge(output: str | Path, parents: list[Checkpoint], *, reference: Checkpoint, base: Checkpoint | None,
                seed: int = 0) -> dict:
    """Measure a written merge against its parents (see the module's docstring).

    Args:
        output: the merged checkpoint (the staging directory).
        parents: the opened inputs, each once.
        reference: the parent whose generated text is the probe (the base, else the first model).
        base: the base, when the merge has one (for ``kl_to_base``).
        seed: seed of the probe text.

    Returns:
        ``{"probe", "finite", "tokenizer", "parents": [{"model", "base", "kl", "top1_agreement", "nll",
        "kl_to_base"} | {"model", "skipped"}], "merged_nll", "warnings"}``; CheckFailed for a problem of the
        output's own (not one a parent has too).

    Example: ``check_merge(staging, inputs.checkpoints, reference=inputs.reference, base=inputs.base)``
    """
    from surgery.runtime import one_torch_thread

    report: dict = {"warnings": []}
    with open_checkpoint(str(output)) as merged, one_torch_thread():
        bad = _non_finite(merged)
        if bad:
            raise CheckFailed(f"{output}: tensor {bad[0]!r} contains NaN or Inf ({len(bad)} tensor(s))")
        report["finite"] = True
        problems, report["tokenizer"] = tokenizer_problems(merged)
        inherited = {problem for parent in parents for problem in tokenizer_problems(parent)[0]}
        for problem in problems:
            if problem not in inherited:
                raise CheckFailed(f"{output}: {problem}")
            report["warnings"].append(f"{problem} (as in a parent)")
        if report["tokenizer"]["chat_template"] is None and any(template_of(p.auxiliary_files()) for p in parents):
            report["warnings"].append("a parent has a chat template and the merge has none (a recipe's "
                                      "chat_template: auto carries one over)")
        if report["tokenizer"]["tokens"] is None:
            report["probe"] = {"skipped": "no tokenizer, so no probe text"}
            report["parents"] = []
            return report
        try:
            _measure_parents(report, merged, parents, reference=reference, base=base, seed=seed)
        except BadInput as err:  # no BOS or EOS to start from, a family the streaming runtime cannot run...
            reason = one_line(err).replace(str(output), "the merge")  # no staging or absolute input paths
            for parent in parents:
                reason = reason.replace(str(parent.source), model_name(parent.source))
            report["probe"], report["parents"] = {"skipped": reason}, []
    return report


def check_section(report: dict | None) -> str:
    """The model card's "Check" section for a :func:`check_merge` report.

    Args:
        report: the report, or None.

    Returns:
        Markdown starting with a blank line ("" without a report).

    Example: ``card_body + check_section(report)``
    """
    if not report:
        return ""
    lines = ["", "## Check", ""]
    probe = report["probe"]
    if "skipped" in probe:
        lines.append(f"Probe: skipped ({probe['skipped']}).")
    else:
        lines += [f"Measured by `surgery merge --check` on {probe['tokens']} tokens of text "
                  f"`{probe['written_by']}` generated (seed {probe['seed']}).", "",
                  "| model | KL(model ‖ merge) | top-1 agreement | NLL of the probe | KL(base ‖ model) |",
                  "|---|---|---|---|---|"]
        for row in report["parents"]:
            name = f"`{row['model']}`" + (" (base)" if row["base"] else "")
            if "skipped" in row:
                lines.append(f"| {name} | skipped: {row['skipped']} | | | |")
                continue
            lines.append(f"| {name} | {row['kl']:.4f} | {row['top1_agreement']:.3f} | {row['nll']:.3f} | "
                         f"{row['kl_to_base']:.4f} |" if "kl_to_base" in row else
                         f"| {name} | {row['kl']:.4f} | {row['top1_agreement']:.3f} | {row['nll']:.3f} | |")
        lines.append(f"| the merge | | | {report['merged_nll']:.3f} | |")
    facts = report["tokenizer"]
    lines += ["", "Every weight is finite. "
              + (f"Tokenizer: {facts['tokens']} tokens, embedding {facts['embedding_rows']} rows. "
                 if facts["tokens"] is not None else "No tokenizer. ")
              + (f"Chat template: {facts['chat_template']}." if facts["chat_template"] else "No chat template.")]
    lines += [f"- warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)
