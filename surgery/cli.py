"""The ``surgery`` command line: parses options, calls the library, prints.

Results go to stdout (``--json`` for machines), logs and progress bars to stderr (bars only on a terminal).
Exit codes: 0 success, 2 bad input or usage (one line, no traceback), 1 a failed check of the result (one line) or
an internal error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import typer

from surgery import __version__
from surgery.errors import BadInput, CheckFailed

app = typer.Typer(
    help="Model surgery for LLM checkpoints: inspect, diff, convert, merge, extend, quantize and push, streaming one "
         "tensor at a time.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

LOG_FORMAT = "surgery: %(levelname)s: %(message)s"
JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu or cuda.")
SHARD_OPTION = typer.Option("5GB", "--max-shard-size", help="Largest shard file, e.g. 5GB, 500MB (powers of ten).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Streaming model surgery for Hugging Face checkpoints (safetensors, GGUF, Hub repo ids)."""


def _print_json(value: dict) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    raise AssertionError("unreachable")


@contextmanager
def _progress(total: int | None, unit: str, description: str) -> Iterator:
    """A tqdm bar on stderr when stderr is a terminal; otherwise a silent counter."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=description, file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id org/name[@rev]."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor (name, dtype, shape, role)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Architecture, parameter count, dtypes, shards, tied embeddings and rope settings of a checkpoint."""
    from surgery.io import open_checkpoint
    from surgery.report import inspect_checkpoint

    with open_checkpoint(source) as ckpt:
        report = inspect_checkpoint(ckpt, with_tensors=tensors)
    if as_json:
        return _print_json(report)
    arch = report["architecture"]
    lines = [
        f"source        {report['source']} ({report['format']})",
        f"architecture  {', '.join(arch['architectures']) or '?'} (model_type {arch['model_type']}"
        + ("" if arch["known_family"] else ", unknown family: roles guessed from names") + ")",
        f"parameters    {report['parameters']:,} in {report['num_tensors']} tensors ({_size(report['tensor_bytes'])})",
        "dtypes        " + ", ".join(f"{name} ×{d['tensors']}" for name, d in report["dtypes"].items()),
        f"layers        {arch['num_layers']}, hidden {arch['hidden_size']}, heads {arch['num_attention_heads']}"
        f" / kv {arch['num_key_value_heads']}, head_dim {arch['head_dim']}, vocab {arch['vocab_size']}",
        f"embeddings    {'tied (no lm_head tensor)' if report['tied_embeddings'] else 'separate lm_head'}",
        f"context       {arch['max_position_embeddings']}, rope {json.dumps(arch['rope'], sort_keys=True)}",
        "files         " + ", ".join(f"{name} ({_size(size)})" for name, size in report["files"].items()),
    ]
    typer.echo("\n".join(lines))
    for row in report.get("tensors", []):
        layer = "" if row["layer"] is None else f" L{row['layer']}"
        typer.echo(f"  {row['name']}  {row['dtype']}  {tuple(row['shape'])}  {row['role']}{layer}")


@app.command()
def diff(
    a: str = typer.Argument(..., help="Reference checkpoint (any source inspect accepts)."),
    b: str = typer.Argument(..., help="Checkpoint compared against A."),
    top: int = typer.Option(10, "--top", help="How many most-changed tensors to list (text output)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Missing / extra / shape-mismatched tensors, and per tensor ‖B−A‖/‖A‖ and cosine(A, B)."""
    from surgery.io import open_checkpoint
    from surgery.report import diff_checkpoints

    with open_checkpoint(a) as ckpt_a, open_checkpoint(b) as ckpt_b:
        with _progress(len(ckpt_a.tensors), "tensor", "diff") as advance:
            report = diff_checkpoints(ckpt_a, ckpt_b, progress=advance)
    if as_json:
        return _print_json(report)
    summary = report["summary"]
    typer.echo(f"compared {summary['compared']} tensors ({summary['identical']} identical); "
               f"missing in B {len(report['missing'])}, extra in B {len(report['extra'])}, "
               f"shape mismatches {len(report['shape_mismatch'])}")
    cosine = summary["min_cosine"]
    typer.echo(f"relative delta max {summary['max_relative_delta']:.3e}, mean {summary['mean_relative_delta']:.3e}; "
               f"min cosine {'n/a' if cosine is None else f'{cosine:.6f}'}")
    for name in report["missing"]:
        typer.echo(f"  missing in B: {name}")
    for name in report["extra"]:
        typer.echo(f"  extra in B:   {name}")
    for row in report["shape_mismatch"]:
        typer.echo(f"  shape:        {row['name']} {tuple(row['shape_a'])} vs {tuple(row['shape_b'])}")
    changed = sorted(report["tensors"], key=lambda row: -row["relative_delta"])[:top]
    for row in changed:
        if row["delta_norm"] > 0:
            cos = "n/a" if row["cosine"] is None else f"{row['cosine']:.6f}"
            typer.echo(f"  {row['relative_delta']:.3e}  cos {cos}  {row['name']}")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating tensors: float32, bfloat16, float16."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (only once the new one is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan without writing anything."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-shard, cast, or import a GGUF file into a safetensors checkpoint that transformers loads."""
    from surgery import convert as conversion
    from surgery.io import open_checkpoint

    if dry_run:
        with open_checkpoint(source) as ckpt:
            plan = {"output": output, **conversion.plan_conversion(ckpt, dtype, max_shard_size)}
        if as_json:
            return _print_json(plan)
        typer.echo(f"would write {output}: {len(plan['shards'])} shard(s), {_size(plan['total_bytes'])}, "
                   f"dtype {plan['dtype']}")
        for file, shard in plan["shards"].items():
            typer.echo(f"  {file}: {shard['tensors']} tensors, {_size(shard['bytes'])}")
        return
    with _progress(None, "B", "convert") as advance:
        result = conversion.convert(source, output, dtype, max_shard_size, force, progress=advance)
    summary = {"output": str(result.directory), "shards": len(result.shards), "total_bytes": result.total_size,
               "files": result.files}
    if as_json:
        return _print_json(summary)
    typer.echo(f"wrote {result.directory}: {len(result.shards)} shard(s), {_size(result.total_size)}, "
               f"{len(result.files)} files")


def _method_help() -> str:
    from surgery.merge import METHODS, get_method

    get_method("linear")  # registers the built-in methods
    return "\n\n".join(f"{m.name} — {m.summary}" for m in METHODS.values())


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"{option} {text!r}: expected comma-separated numbers") from None


MERGE_HELP = " ".join("""
Merge checkpoints (task arithmetic, TIES, DARE, SLERP, Model Stock...), one tensor at a time.
Long-to-short: surgery merge short-model long-model --method ties --density 0.2 --lambda 1.0 -o out
""".split("\n")).strip() + "\n\nMethods:\n\n" + _method_help() + "\n\n" + " ".join("""
Same names and parameter meanings as mergekit (density = fraction KEPT). Deliberate differences: math is always
float32; DARE/DELLA masks come from --seed and the tensor name (same seed, identical bytes); among entries of equal
magnitude at the TIES cut the first in memory order are kept. Models whose tokenizers differ are merged over the
output vocabulary (--tokenizer-source: the base's, a model's, or the union), embedding rows matched by token; rows a
model lacks contribute no task vector. Recipes may stack or cut layer ranges (slices, as in mergekit). The output
holds a README.md model card and surgery.json, from which --recipe OUT/surgery.json reproduces it bit for bit.
""".split("\n")).strip() + "\n\n" + " ".join("""
SVD methods (star, tsv, lore, svd) decompose 2-D weights; norms, biases and embeddings combine as task arithmetic
with normalised weights. svd is the one to start with: `surgery merge BASE MODEL --method svd -o out` runs STAR
(--eta 0.4: the top of each task matrix's spectrum holding 40% of its nuclear norm, rescaled to the full norm) and
with two or more models TSV-M (each task's top rank/T singular vectors, decorrelated, summed; --lambda 1).
STAR needs the whole spectrum: it takes it from the float64 Gram matrix's eigendecomposition (2-3× cheaper than an
SVD) and projects on the kept directions; tsv with --rank K uses a seeded randomised SVD; tsv at the default rank
and lore need full SVDs.
--aim applies activation-informed merging (arXiv 2502.02421) on top of any method with a base: W = W0 + (W − W0) ⊙ r,
r_j = 1 − (a_j / max a)(1 − ω) per input channel j, a from `surgery calibrate` statistics (--stats) or computed
now from --calibration text or text the base generates; embeddings keep the merged value. The long-to-short study's
best merge is `--method ties --density 0.2 --aim --omega 0.4`.
""".split("\n")).strip()


@app.command(help=MERGE_HELP)
def merge(
    models: list[str] = typer.Argument(None, help="Models to merge (any source inspect accepts). Without --base, "
                                                   "the FIRST is the base for methods that use one."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    method: Optional[str] = typer.Option(None, "--method", help="Merge method (listed above)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; task vectors are model − base."),
    weights: Optional[str] = typer.Option(None, "--weights", help="W1,W2,...: one per non-base model (default 1)."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", "--alpha", help="Scale of the merged task vector."),
    density: Optional[float] = typer.Option(None, "--density", help="Fraction of task-vector entries KEPT."),
    t: Optional[float] = typer.Option(None, "--t", help="slerp: 0 gives the base, 1 the other model."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="breadcrumbs: top fraction dropped (0.01)."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="della: keep-probability spread (0.15)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="star / svd with one model: share of each task "
                                                            "matrix's spectrum kept (0.4)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="star, tsv, svd: a fixed rank instead of the eta rule "
                                                            "(star) or the full rank split over the tasks (tsv)."),
    mu: Optional[float] = typer.Option(None, "--mu", help="lore: singular-value threshold relative to the largest "
                                                          "one (0.1)."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="Divide by the summed weights (method default)."),
    dare_rescale: Optional[str] = typer.Option(None, "--dare-rescale",
                                               help="DARE/DELLA rescale: l1 (mergekit, default), inverse (1/p, "
                                                    "the papers), none."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of DARE/DELLA masks: same seed, same bytes."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: float32, bfloat16, float16 (math is "
                                                              "always float32)."),
    tokenizer_source: Optional[str] = typer.Option(None, "--tokenizer-source",
                                                   help="Vocabulary of the output: base (default), union, or "
                                                        "one of the models."),
    pad_to_multiple_of: Optional[int] = typer.Option(None, "--pad-to-multiple-of",
                                                     help="Vocabulary rows: the tokenizer's tokens rounded up to a "
                                                          "multiple of N, extra rows the mean (mergekit's sizing; "
                                                          "default: the tokenizer source's rows)."),
    recipe_file: Optional[str] = typer.Option(None, "--recipe", help="Recipe: our YAML, a mergekit YAML config, "
                                                                     "or an earlier output's surgery.json."),
    aim: bool = typer.Option(False, "--aim", help="Apply AIM on top of the method: each weight's change is scaled "
                                                  "down on the input channels the base uses most."),
    omega: Optional[float] = typer.Option(None, "--omega", help="AIM: change kept on the most active channel (0.4)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="AIM: UTF-8 text to calibrate the base on "
                                                                          "(default: text the base generates)."),
    stats: Optional[str] = typer.Option(None, "--stats", help="AIM: statistics written by `surgery calibrate`."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="AIM: calibration tokens (2048)."),
    device: str = typer.Option("cpu", "--device", help="Where the math runs: cpu or cuda."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and print the plan; write nothing."),
    executor: str = typer.Option("local", "--executor", help="local, or ray: one Ray task per output shard (pip "
                                                              "install 'surgery[ray]'; inputs and OUTPUT's parent "
                                                              "on a path every node sees). Same bytes."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to run on, HOST:PORT "
                                                                          "(default: start a local one)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Merge checkpoints (task arithmetic, TIES, DARE, SLERP, Model Stock...), one tensor at a time."""
    from surgery.merge import ModelEntry, Recipe, get_method, load_recipe, merge as run_merge, plan_merge
    from surgery.merge.recipe import aim_settings

    if recipe_file:
        recipe = load_recipe(recipe_file)
        if models:
            raise BadInput("--recipe: give the models in the recipe, not on the command line")
    else:
        if not models:
            raise BadInput("no models given (pass MODEL... or --recipe FILE)")
        if method is None:
            raise BadInput("--method is required without --recipe")
        recipe = Recipe(method=method, models=[ModelEntry(m) for m in models], base=base)
    if method is not None:
        recipe.method = method
    first_is_base = recipe.base is None and get_method(recipe.method).uses_base
    non_base = len(recipe.models) - (1 if first_is_base else 0)
    weight_list = _float_list(weights, "--weights")
    if weight_list is not None and recipe.slices:
        raise BadInput("--weights: this recipe has slices; give the weights in it, per source")
    if weight_list is not None:
        if len(weight_list) != non_base:
            raise BadInput(f"--weights: {len(weight_list)} value(s) for {non_base} non-base model(s)")
        offset = len(recipe.models) - non_base
        for entry, value in zip(recipe.models[offset:], weight_list):
            entry.parameters["weight"] = value
    for key, value in (("lambda", lambda_), ("density", density), ("t", t), ("gamma", gamma),
                       ("epsilon", epsilon), ("normalize", normalize), ("eta", eta), ("rank", rank), ("mu", mu)):
        if value is not None:
            recipe.parameters[key] = value
    if seed is not None:
        recipe.seed = seed
    if dtype is not None:
        recipe.dtype = dtype
    if dare_rescale is not None:
        recipe.dare_rescale = dare_rescale
    if tokenizer_source is not None:
        recipe.tokenizer_source = tokenizer_source
    if pad_to_multiple_of is not None:
        from surgery.merge.vocab import check_pad_to_multiple_of

        recipe.pad_to_multiple_of = check_pad_to_multiple_of(pad_to_multiple_of, "--pad-to-multiple-of")
    aim_options = {"omega": omega, "calibration": calibration, "stats": stats, "max_tokens": max_tokens}
    given = {key: value for key, value in aim_options.items() if value is not None}
    if given and not aim:
        raise BadInput(f"--{next(iter(given)).replace('_', '-')}: applies only with --aim")
    if aim:
        recipe.aim = aim_settings({**(recipe.aim or {}), **given}, "--aim")
    if dry_run:
        plan = {"output": output, **plan_merge(recipe, max_shard_size)}
        if as_json:
            return _print_json(plan)
        typer.echo(f"would merge {len(plan['models'])} model(s) into {output} with {plan['method']}"
                   + (f" on base {plan['base']}" if plan["base"] else ""))
        typer.echo(f"  {plan['tensors']} tensors, {_size(plan['total_bytes'])} in {plan['shards']} shard(s), "
                   f"dtype {plan['dtype']}, seed {plan['seed']}, parameters {json.dumps(plan['parameters'])}")
        return
    with _progress(None, "B", "merge") as advance:
        result = run_merge(recipe, output, device=device, max_shard_size=max_shard_size, force=force,
                           progress=advance, executor=executor, ray_address=ray_address)
    summary = {"output": str(result.write.directory), "method": recipe.method, "shards": len(result.write.shards),
               "total_bytes": result.write.total_size, "files": result.write.files}
    if as_json:
        return _print_json(summary)
    typer.echo(f"wrote {result.write.directory}: {recipe.method} merge, {len(result.write.shards)} shard(s), "
               f"{_size(result.write.total_size)}")


QUANTIZE_HELP = " ".join("""
Quantize the Linear weights of SRC's decoder layers to 4- or 8-bit integers, group-wise, streaming one tensor at a
time, into a format stock loaders read: compressed-tensors pack-quantized (vLLM; transformers + compressed-tensors),
GPTQ v1, or GGUF (llama family; one .gguf file, Q4_0 or Q8_0 blocks of 32, read by llama.cpp and transformers;
symmetric only). Methods: rtn (round to nearest), hqq (half-quadratic refinement of the scales, and integer zero
points when asymmetric; kept per group only where it lowers the squared error without any weight erring more than
under rtn, so outlier weights are never clipped), selfcal (data-free self-calibration after AdaDFQ: the model
samples its own text, twice --calibration-sequences sequences of 128 tokens from random start tokens (4 greedy
tokens, then sampling; --seed); the hqq model scores each by its mean next-token KL from the full-precision one; the
25% lowest-KL ones plus an even spread of those between the 20th and 80th KL percentiles, --calibration-sequences in
all, drive GPTQ rounding (H = XᵀX per layer, damping 0.01, per-group scales re-fitted on the format's grid,
layers quantized in sequence), for --rounds rounds, each re-scored by the previous round's model; one decoder layer
in memory at a time after the generation, which loads the whole model; parameters recorded in surgery.json). Where
--group-size does not divide a module's input dimension: compressed-tensors puts those modules in a second config group at 64 or 32,
GPTQ lowers its one group size to the largest power of two that divides all (both reported).
""".split("\n")).strip()


@app.command(help=QUANTIZE_HELP)
def quantize(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns sharing a scale (multiple "
                                                                         "of 8; default 128, GGUF: 32)."),
    scheme: str = typer.Option("sym", "--scheme", help="sym or asym (integer zero points)."),
    method: str = typer.Option("rtn", "--method", help="rtn, hqq or selfcal."),
    fmt: str = typer.Option("compressed-tensors", "--format", help="compressed-tensors, gptq or gguf."),
    ignore: str = typer.Option("lm_head", "--ignore", help="Comma-separated modules left unquantized: names, "
                                                           "trailing parts (mlp.down_proj) or re:REGEX."),
    seed: Optional[int] = typer.Option(None, "--seed", help="selfcal: seed of the generated text (0)."),
    calibration_sequences: Optional[int] = typer.Option(None, "--calibration-sequences",
                                              help="selfcal: sequences kept for calibration per round (twice as "
                                                   "many are generated)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="selfcal: score → select → calibrate rounds (2)."),
    device: str = typer.Option("cpu", "--device", help="Where each tensor's grid is fitted (rtn, hqq, selfcal's GPTQ "
                                                       "rounding): cpu or cuda[:N]; reading, the layers and writing "
                                                       "stay on the CPU. rtn writes the same bytes on either."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.quantize import quantize as run_quantize

    _check_device(device)
    ignored = [part.strip() for part in ignore.split(",") if part.strip()]
    with _progress(None, "B", "quantize") as advance:
        summary = run_quantize(source, output, bits=bits, group_size=group_size, scheme=scheme, method=method,
                               format=fmt, ignore=ignored, seed=seed, max_shard_size=max_shard_size, force=force,
                               selfcal={"sequences": calibration_sequences, "rounds": rounds}, progress=advance,
                               device=device)
    if as_json:
        return _print_json({key: value for key, value in summary.items() if key != "per_module"})
    typer.echo(f"wrote {summary['output']}: {summary['modules']} modules at {bits} bits ({method}, {fmt}), "
               f"weight relative error {summary['weight_relative_error']:.4f}, {_size(summary['total_bytes'])}, "
               f"{summary['seconds']:.1f} s")


VERIFY_HELP = " ".join("""
Compare a quantized checkpoint with its reference, print the report, and fail (exit 1, one line on stderr) when it
is too far from it. The reference samples its own text from BOS (seeded; --tokens). Per quantized Linear, on the
inputs it sees in that text: the output relative error and cosine (fused dequantize-matmul kernel) and the weight
relative error; the text lists the --top worst. End to end: next-token KL(P‖Q) and top-1 agreement on that text,
the quantized side with all of the output's own tensors. Fails when a Linear's output cosine is below --min-cosine,
the KL is above --max-kl, or loaders would not read the output as written (a quantized module that is not a
Linear, a missing tensor, what transformers' loader refuses). The defaults are measured (seeds 0-2, 128 tokens;
benchmarks/verify_bench.py --thresholds): SmolLM2-135M at 4 bits (rtn, hqq, GPTQ; group 64 and 128) has a lowest
cosine of 0.970-0.978 and a KL of 0.60-0.90 nats, at 8 bits 0.9999 and 0.004, tiny test models 0.991 and up and
0.005; an unrelated reference gives cosines of 0 or below and, on SmolLM2, a KL of 4.2; a module with zeroed scales
or shuffled bits a cosine of 0 (its KL, 0.9-1.3, is not told from 4-bit noise). So 0.9 sits in a wide gap, and
1.5 nats is 1.7x the worst real 4-bit figure, a third of a wrong reference's. Models of billions of parameters reach
far lower KLs: tighten --max-kl for them. The reference must be the model the output was quantized from: the file
hashes its surgery.json records are checked (a difference exits 2 unless --any-reference; no manifest: a warning).
""".split("\n")).strip()


@app.command(help=VERIFY_HELP)
def verify(
    quantized: str = typer.Argument(..., help="A compressed-tensors or GPTQ checkpoint written by quantize."),
    reference: str = typer.Option(..., "--reference", help="The unquantized model it was quantized from."),
    tokens: int = typer.Option(128, "--tokens", help="Self-generated tokens scored end to end, in 8 sequences "
                                                     "(more narrow the KL; a decode step per 8)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated text and of the probed positions."),
    max_kl: float = typer.Option(1.5, "--max-kl", help="Fail above this mean next-token KL(P‖Q), in nats (4-bit "
                                                       "SmolLM2-135M: up to 0.9)."),
    min_cosine: float = typer.Option(0.9, "--min-cosine", help="Fail when a quantized Linear's output cosine is "
                                                               "below this (real 4-bit outputs: 0.97 and up)."),
    any_reference: bool = typer.Option(False, "--any-reference", help="Compare with a reference whose files differ "
                                                                      "from those surgery.json records."),
    top: int = typer.Option(5, "--top", help="Modules listed, worst output relative error first (--json: all)."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.quantize.verify import raise_if_failed, report_lines, verify as run_verify

    if tokens < 2:
        raise BadInput(f"--tokens {tokens}: must be at least 2")
    if top < 0:
        raise BadInput(f"--top {top}: must be 0 or more")
    report = run_verify(quantized, reference=reference, tokens=tokens, seed=seed, max_kl=max_kl,
                        min_cosine=min_cosine, any_reference=any_reference, top=top)
    if as_json:
        _print_json(report)
    else:
        typer.echo("\n".join(report_lines(report)))
    raise_if_failed(report)


CALIBRATE_HELP = " ".join("""
Run calibration text through BASE and store, for every module with a weight except embeddings (linear layers,
norms, lm_head), the per-input-channel activity Σ_blocks mean_tokens |x| (blocks of up to 512 tokens): the
statistics `surgery merge --aim --stats FILE` uses. One decoder layer is in memory at a time, run by transformers'
own modules. Without --calibration the base model generates its own text (seeded; it is loaded whole for that).
""".split("\n")).strip()


@app.command(help=CALIBRATE_HELP)
def calibrate(
    base: str = typer.Argument(..., help="The base model of the merges the statistics are for."),
    output: str = typer.Option(..., "-o", "--output", help="Statistics file to write (.safetensors)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="UTF-8 calibration text (default: text "
                                                                          "the base generates)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Calibration tokens used."),
    seed: int = typer.Option(0, "--seed", help="Seed of the self-generated text."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.merge.aim import calibrate as run_calibrate

    if max_tokens < 1:
        raise BadInput(f"--max-tokens {max_tokens}: must be at least 1")
    _check_device(device)
    summary = run_calibrate(base, output, calibration=calibration, max_tokens=max_tokens, seed=seed, device=device)
    if as_json:
        return _print_json(summary)
    typer.echo(f"wrote {summary['output']}: {summary['modules']} modules, {summary['tokens']} tokens in "
               f"{summary['blocks']} block(s), {summary['seconds']:.1f} s")


EXTEND_HELP = " ".join("""
Stretch a model's context by rewriting its RoPE configuration (weights copied unchanged), verified against the
frequencies transformers derives from the written config. Methods: linear (--factor), ntk (static: new rope base),
dynamic, yarn (--beta-fast, --beta-slow), llama3 (--low-freq-factor, --high-freq-factor), power (Giraffe power
basis, --power k), truncated (Giraffe truncated basis, --cut-length L_t, optional --factor on top). power and
truncated are written as per-pair longrope factors (magnitude 1), which transformers and vLLM honour.
--target-length N sets the factor to N over the current length. Rope parameters a method does not set (e.g.
Qwen2-VL's mrope_section) are kept. A yarn or llama3 model (gpt-oss, Llama-3.1) is extended by the same method: its
factor is multiplied, its trained length and options kept unless given; other scalings are refused.
""".split("\n")).strip()


def _print_pairs(pairs: list[dict]) -> None:
    typer.echo(f"{'pair':>4}  {'wavelength':>12}  {'new wavelength':>14}  status")
    for row in pairs:
        new = "∞ (no rotation)" if row["new_wavelength"] is None else f"{row['new_wavelength']:.1f}"
        typer.echo(f"{row['pair']:>4}  {row['wavelength']:>12.1f}  {new:>14}  {row['status']}")


@app.command(help=EXTEND_HELP)
def extend(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    rope: str = typer.Option(..., "--rope", help="linear, ntk, dynamic, yarn, llama3, power or truncated."),
    factor: Optional[float] = typer.Option(None, "--factor", help="Scale s: new length over the current one."),
    target_length: Optional[int] = typer.Option(None, "--target-length",
                                                help="New length N (factor = N / the current length)."),
    beta_fast: Optional[float] = typer.Option(
        None, "--beta-fast", help="yarn: rotations above which pairs are kept (default: the model's, else 32)."),
    beta_slow: Optional[float] = typer.Option(
        None, "--beta-slow", help="yarn: rotations below which pairs are interpolated (default: the model's, else 1)."),
    low_freq_factor: Optional[float] = typer.Option(
        None, "--low-freq-factor", help="llama3: low-frequency bound (default: the model's, else 1)."),
    high_freq_factor: Optional[float] = typer.Option(
        None, "--high-freq-factor", help="llama3: high-frequency bound (default: the model's, else 4)."),
    power: Optional[float] = typer.Option(None, "--power", help="power: exponent k of θ_i·(1 − 2i/d)^k."),
    cut_length: Optional[int] = typer.Option(None, "--cut-length", help="truncated: cut length L_t in tokens."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-pair table; write nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery import extend as extension

    options = dict(factor=factor, target_length=target_length, beta_fast=beta_fast, beta_slow=beta_slow,
                   low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, power=power,
                   cut_length=cut_length)
    if dry_run:
        result = extension.plan(source, rope, **options)
    else:
        with _progress(None, "B", "extend") as advance:
            result, _ = extension.extend(source, output, rope, max_shard_size=max_shard_size, force=force,
                                         progress=advance, **options)
    pairs = extension.pair_table(result.geometry.inv_freq, result.inv_freq, result.status)
    summary = {"output": None if dry_run else output, "method": rope, "parameters": result.parameters,
               "trained_length": result.geometry.trained_length, "source_length": result.geometry.source_length,
               "new_length": result.new_length,
               "attention_factor": result.attention_factor, "rope_parameters": result.config.get("rope_parameters"),
               "pairs": pairs}
    if as_json:
        return _print_json(summary)
    verb = "would write" if dry_run else "wrote"
    typer.echo(f"{verb} {output}: {rope} RoPE, length {result.geometry.source_length} → {result.new_length}, "
               f"attention factor {result.attention_factor:.4g}; verified against transformers")
    if dry_run:
        _print_pairs(pairs)


@app.command("verify-rope")
def verify_rope(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the rotary frequencies transformers derives from a checkpoint's config, per pair; for an output of
    `surgery extend`, check everything its surgery.json records (frequencies, attention scaling, rope parameters,
    rotary-module attributes, length, the rope fields written, a forward of a tiny model): a mismatch exits 2."""
    from surgery.extend import verify_rope as verification

    report = verification(source)
    if as_json:
        _print_json(report)
    else:
        typer.echo(f"{source}: rope_type {report['rope_type']}, attention scaling {report['attention_scaling']:.4g}")
        _print_pairs(report["pairs"])
        typer.echo("matches the intended frequencies (surgery.json)" if report["intended"] and not report["problems"]
                   else "no intended frequencies recorded (not written by surgery extend)" if not report["intended"]
                   else "")
    if report["problems"]:
        raise BadInput(f"{source}: config does not give the intended rotary embedding: "
                       + "; ".join(report["problems"][:3]))


eval_app = typer.Typer(help="Evaluations that run offline: answer accuracy against length, passkey retrieval, "
                            "perplexity.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
LENGTHS_OPTION = typer.Option("1k,2k,4k", "--lengths", help="Comma-separated lengths in tokens (k = 1024).")
def _eval_model(model: str, device: str):
    from surgery.evaluation import load_model

    _check_device(device)
    return load_model(model, device)


@eval_app.command("passkey")
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
        return _print_json({"model": model, "passkey": results})
    for row in results:
        typer.echo(f"length {row['length']:>6}: accuracy {row['accuracy']:.2f} ({len(row['trials'])} depths)")


@eval_app.command("perplexity")
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
        return _print_json({"model": model, "perplexity": results})
    for row in results:
        typer.echo(f"length {row['length']:>6}: perplexity {row['perplexity']:.3f} ({row['tokens_scored']} tokens)")


MAX_NEW_TOKENS_OPTION = typer.Option(512, "--max-new-tokens", help="Generation limit per answer.")
BATCH_OPTION = typer.Option(16, "--batch-size", help="Prompts generated together.")
CHAT_TEMPLATE_OPTION = typer.Option(None, "--chat-template/--no-chat-template",
                                    help="Wrap prompts in the tokenizer's chat template (default: when it has one).")
LIMIT_OPTION = typer.Option(None, "--limit", help="Only the first N tasks.")


@eval_app.command("length")
def eval_length(
    model: str = typer.Argument(..., help="Model directory, .gguf file, or Hub repo id."),
    tasks: str = typer.Option(..., "--tasks", help="JSONL: one {\"prompt\", \"answer\"[, \"difficulty\"]} per "
                                                   "line."),
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = BATCH_OPTION,
    chat_template: Optional[bool] = CHAT_TEMPLATE_OPTION,
    limit: Optional[int] = LIMIT_OPTION,
    responses: Optional[str] = typer.Option(None, "--responses", help="Also write every response and its score to "
                                                                      "this JSONL file."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Accuracy, mean response length and reflection rate (greedy), per difficulty: the long-to-short measures."""
    from surgery.eval_length import evaluate_length, load_tasks, write_responses

    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise BadInput("--max-new-tokens, --batch-size and --limit must be at least 1")
    chosen = load_tasks(tasks)[:limit]
    loaded, tokenizer = _eval_model(model, device)
    report = evaluate_length(loaded, tokenizer, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             chat_template=chat_template)
    rows = report.pop("responses")
    if responses:
        write_responses(responses, rows)
    if as_json:
        return _print_json({"model": model, "tasks": tasks, **report})
    typer.echo(f"{model}: accuracy {report['accuracy']:.3f}, mean length {report['mean_length']:.1f} tokens, "
               f"reflective {report['reflection_rate']:.2f}, truncated {report['truncated_rate']:.2f} "
               f"({report['count']} tasks)")
    for level, row in report["by_difficulty"].items():
        typer.echo(f"  difficulty {level}: accuracy {row['accuracy']:.3f}, mean length {row['mean_length']:.1f}, "
                   f"reflective {row['reflection_rate']:.2f} ({row['count']})")


adapter_app = typer.Typer(help="Prompt adapters: a long prompt turned into a PEFT prefix or an NTK-attention "
                                 "adapter, with a fidelity score.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
PROMPT_OPTION = typer.Option(..., "--prompt-file", help="UTF-8 text of the prompt (special tokens written out).")
ADAPTER_FORCE_OPTION = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is "
                                                           "complete).")


@adapter_app.command("prefix")
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
    from surgery.adapters import make_prefix_adapter

    _check_device(device)
    summary = make_prefix_adapter(source, prompt_file, output, force=force, device=device)
    if as_json:
        return _print_json(summary)
    typer.echo(f"wrote {summary['output']}: prefix of {summary['prompt_tokens']} tokens, "
               f"{_size(summary['adapter_bytes'])}, {summary['seconds']:.1f} s")


@adapter_app.command("ntk")
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
    noise. Use it with surgery.extend.ntk_attention.apply(model, OUTPUT)."""
    from surgery.adapters import make_ntk_adapter

    _check_device(device)
    summary = make_ntk_adapter(source, output, prompt_file=prompt_file, train_file=train_file,
                               queries_file=queries, steps=steps, lr=lr, batch=batch, count=count, length=length,
                               exact_tokens=exact_tokens, least_squares=least_squares, seed=seed, force=force,
                               device=device)
    if as_json:
        return _print_json(summary)
    stages = ", ".join(f"{stage} {value:.4f}" for stage, value in summary.get("train_kl", {}).items())
    validation = summary.get("validation_kl")
    kept = (f"; validation KL {validation['start']:.4f} before distillation, {validation['kept']:.4f} kept (step "
            f"{summary['kept_step']} of {summary['steps_run']} run)" if validation else "")
    typer.echo(f"wrote {summary['output']}: NTK-attention, {_size(summary['adapter_bytes'])}"
               + (f"; training KL: {stages}" if stages else "") + kept + f"; {summary['seconds']:.1f} s")


@adapter_app.command("eval")
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
    from surgery.adapters import evaluate

    if count < 1 or length < 1:
        raise BadInput("--count and --length must be positive")
    _check_device(device)
    report = evaluate(model, adapter, prompt_file, queries_file=queries, count=count, length=length, seed=seed,
                      device=device)
    if as_json:
        return _print_json(report)
    typer.echo(f"{report['kind']} adapter on {report['queries']} queries ({report['positions']} positions): "
               f"kl_adapter {report['kl_adapter']:.4f}, kl_no_prompt {report['kl_no_prompt']:.4f} nats; top-1 "
               f"agreement {report['top1_adapter']:.3f} (no prompt {report['top1_no_prompt']:.3f}); adapter "
               f"{_size(report['adapter_bytes'])} vs prompt KV cache {_size(report['prompt_kv_cache_bytes'])} "
               f"({report['prompt_tokens']} tokens)")


RUN_HELP = " ".join("""
Run the steps of a pipeline file in order. Each step is a command with the CLI's options (positional arguments
named: models for merge, input for the others, repo for push; output is -o). A step whose output exists and whose
stamp (OUTPUT.stamp.json; for push INPUT.push.stamp.json) records the same options and input content hashes is
skipped as up to date; otherwise it runs, replacing its output atomically, and so does every step after it.
""".split("\n")).strip()


@app.command("sweep")
def sweep_command(
    models: list[str] = typer.Argument(None, help="Models to merge, as for `surgery merge` (or give --recipe)."),
    output: str = typer.Option(..., "-o", "--output", help="Directory for sweep.json, pareto.png and the recipes "
                                                           "(written atomically)."),
    grid: str = typer.Option(..., "--grid", help="Settings to try, e.g. \"lambda=0.5:1.0:0.1,density=0.1,0.2\" "
                                                 "(START:STOP:STEP includes STOP; also method, seed, omega)."),
    tasks: str = typer.Option(..., "--eval", help="Tasks for `surgery eval length` (JSONL with prompt, answer)."),
    recipe_file: Optional[str] = typer.Option(None, "--recipe", help="Merge recipe (YAML, mergekit config, or a "
                                                                     "surgery.json)."),
    method: Optional[str] = typer.Option(None, "--method", help="Merge method, without --recipe."),
    tolerance: float = typer.Option(0.05, "--tolerance", help="Recommend the shortest merge within this relative "
                                                              "accuracy loss of the best input model."),
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = BATCH_OPTION,
    chat_template: Optional[bool] = CHAT_TEMPLATE_OPTION,
    limit: Optional[int] = LIMIT_OPTION,
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep every merge in OUTPUT/models/."),
    executor: str = typer.Option("local", "--executor", help="local, or ray: every merge + evaluation a Ray task "
                                                              "(one GPU each with --device cuda)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster, HOST:PORT (default: a "
                                                                          "local one)."),
    device: str = DEVICE_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Merge at every grid point, evaluate accuracy and response length, and recommend a setting on the Pareto front."""
    from surgery.eval_length import load_tasks
    from surgery.merge import ModelEntry, Recipe, load_recipe
    from surgery.sweep import parse_grid, sweep

    if bool(recipe_file) == bool(models):
        raise BadInput("give the models to merge (with --method) or --recipe FILE, not both")
    if recipe_file:
        recipe = load_recipe(recipe_file)
    elif method is None:
        raise BadInput("--method is required without --recipe")
    else:
        recipe = Recipe(method=method, models=[ModelEntry(model) for model in models])
    if not 0 <= tolerance < 1 or max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise BadInput("--tolerance must be in [0, 1); --max-new-tokens, --batch-size and --limit at least 1")
    settings = parse_grid(grid)
    chosen = load_tasks(tasks, "--eval")[:limit]
    _check_device(device)
    report = sweep(recipe, settings, chosen, output, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   chat_template=chat_template, device=device, tolerance=tolerance, keep_models=keep_models,
                   force=force, executor=executor, ray_address=ray_address,
                   progress=lambda line: typer.echo(line, err=True))
    if as_json:
        return _print_json({"output": output, **report})
    for row in report["inputs"] + report["points"]:
        mark = " <- recommended" if row.get("recommended") else " (Pareto front)" if row.get("pareto") else ""
        label = json.dumps(row["setting"]) if "setting" in row else "input"
        typer.echo(f"{row['name']:<12} {label:<40} accuracy {row['accuracy']:.3f}  mean length "
                   f"{row['mean_length']:7.1f}  reflective {row['reflection_rate']:.2f}{mark}")
    best = report["recommended"]
    typer.echo(f"recommended: {best['name']} {json.dumps(best['setting'])}; rebuild it with "
               f"`surgery merge --recipe {output}/recipes/{best['name']}.yaml -o OUT` ({report['seconds']} s)")


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
        _print_json({"steps": [{"step": r.step.number, "command": r.step.command, "output": r.step.output,
                                "status": r.status, "reason": r.reason} for r in reports]})


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
    try:
        result = hub.push(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                          create_pr=create_pr, dry_run=dry_run)
    except hub.PushFailed as err:
        typer.echo(f"surgery: error: {err}", err=True)
        raise typer.Exit(1)
    if as_json:
        return _print_json(result)
    verb = "would push" if dry_run else "pushed"
    typer.echo(f"{verb} {len(result['files'])} files ({_size(result['bytes'])}) to "
               f"{result['repo_id']}@{result['revision']}; model card {result['card']}")
    if dry_run:
        for name, size in result["files"].items():
            typer.echo(f"  {name}  {_size(size)}")
        return
    typer.echo(result["commit_url"])
    if result["pr_url"]:
        typer.echo(f"pull request: {result['pr_url']}")


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
    except CheckFailed as err:
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
