"""``surgery merge``, ``calibrate`` (AIM statistics) and ``sweep``."""

from __future__ import annotations

import inspect
import json
from typing import Optional

import typer

from surgery.cli.options import (BATCH_OPTION, CHAT_TEMPLATE_OPTION, DEVICE_OPTION, JSON_OPTION, LIMIT_OPTION,
                                 MAX_NEW_TOKENS_OPTION, SAMPLES_OPTION, SHARD_OPTION, TEMPERATURE_OPTION, human_size,
                                 print_json, progress)

app = typer.Typer()


def _method_help() -> str:
    from surgery.merge import METHODS

    return "\n\n".join(f"{m.name} — {m.summary}" for m in METHODS.values())




MERGE_HELP = " ".join("""
Merge checkpoints (task arithmetic, TIES, DARE, SLERP, Model Stock...), one tensor at a time.
Long-to-short: surgery merge short-model long-model --method ties --density 0.2 --lambda 1.0 -o out
""".split("\n")).strip() + "\n\nMethods:\n\n" + _method_help() + "\n\n" + " ".join("""
Same names and parameter meanings as mergekit (density = fraction KEPT). Deliberate differences: math is always
float32; DARE/DELLA masks come from --seed and the tensor name (same seed, identical bytes); among entries of equal
magnitude at the TIES cut (and sce's top-k) the first in memory order are kept; arcee_fusion's quantiles are exact
where mergekit samples a million entries unseeded. A name mergekit reuses means what the method declares:
--epsilon is della's spread and ram's threshold, --t slerp's position and nearswap's distance, --alpha is --lambda
except for ramplus_tl's cap. nuslerp and multislerp merge task vectors when --base names a base. Models whose tokenizers differ are merged over the
output vocabulary (--tokenizer-source: the base's, a model's, or the union), embedding rows matched by token; rows a
model lacks contribute no task vector. Recipes may stack or cut layer ranges (slices, as in mergekit). The output
holds a README.md model card and surgery.json, from which --recipe OUT/surgery.json reproduces it bit for bit.
MoE models merge expert by expert (fused 3-D expert tensors too); routers like any weight, or --routers base.
Vision-language models merge their language model only by default (--modules text: the vision tower and projector
are the base's), also with a text-only fine-tune of it.
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


def merge(
    models: list[str] = typer.Argument(None, help="Models to merge (any source inspect accepts). Without --base, "
                                                   "the FIRST is the base for methods that use one."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    method: Optional[str] = typer.Option(None, "--method", help="Merge method (listed above)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; task vectors are model − base."),
    weights: Optional[str] = typer.Option(None, "--weights", help="W1,W2,...: one per non-base model (default 1)."),
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
    modules: Optional[str] = typer.Option(None, "--modules", help="Vision-language models: text (default; the "
                                                                  "vision tower and projector are the base's), "
                                                                  "vision, or all."),
    routers: Optional[str] = typer.Option(None, "--routers", help="MoE routers: merge (default, like any weight) or "
                                                                  "base (keep the base's; experts still merge "
                                                                  "expert by expert)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe: our YAML, a mergekit YAML config, "
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
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and print the plan, then read them as "
                                                           "the merge would and print per layer each task vector's "
                                                           "norm relative to the base's, the cosine between task "
                                                           "vectors, TIES' sign conflicts, and the estimated time, "
                                                           "disk and memory; write nothing (but a scratch file that "
                                                           "times the disk, deleted at once)."),
    check: bool = typer.Option(False, "--check", help="Before the output appears, measure the merge on text the "
                                                       "base generates: KL and top-1 agreement against each parent, "
                                                       "probe NLL, finite weights, tokenizer and chat template; "
                                                       "written into the card and surgery.json."),
    executor: str = typer.Option("local", "--executor", help="local, or ray: one Ray task per output shard (pip "
                                                              "install 'surgery[ray]'; inputs and OUTPUT's parent "
                                                              "on a path every node sees). Same bytes."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to run on, HOST:PORT "
                                                                          "(default: start a local one)."),
    as_json: bool = JSON_OPTION,
    **parameters,
) -> None:
    """Merge checkpoints (task arithmetic, TIES, DARE, SLERP, Model Stock...), one tensor at a time.

    ``parameters`` are the declared merge parameters' options, by keyword NAME_ (see :func:`merge_signature`)."""
    from surgery.merge import MergeJob, merge as run_merge, plan_merge

    parameters = {key.removesuffix("_"): value for key, value in parameters.items()}
    job = MergeJob.from_options(models or (), output=output, method=method, base=base, weights=weights,
                                parameters=parameters, seed=seed, dtype=dtype, dare_rescale=dare_rescale,
                                tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to_multiple_of,
                                modules=modules, routers=routers, recipe=recipe, aim=aim, omega=omega, calibration=calibration, stats=stats,
                                max_tokens=max_tokens, device=device, max_shard_size=max_shard_size, force=force,
                                executor=executor, ray_address=ray_address, check=check)
    if dry_run:
        from surgery.merge.diagnostics import diagnose

        plan = plan_merge(job)
        report = diagnose(job)
        if as_json:
            return print_json(plan | {"diagnostics": report})
        typer.echo(f"would merge {len(plan['models'])} model(s) into {output} with {plan['method']}"
                   + (f" on base {plan['base']}" if plan["base"] else ""))
        typer.echo(f"  {plan['tensors']} tensors, {human_size(plan['total_bytes'])} in {plan['shards']} shard(s), "
                   f"dtype {plan['dtype']}, seed {plan['seed']}, parameters {json.dumps(plan['parameters'])}")
        return _print_diagnostics(report)
    with progress(None, "B", "merge") as advance:
        result = run_merge(job, progress=advance)
    if as_json:
        return print_json(result.summary())
    typer.echo(f"wrote {result.write.directory}: {job.recipe.method} merge, {len(result.write.shards)} shard(s), "
               f"{human_size(result.write.total_size)}")
    if result.check is not None:
        _print_check(result.check)


def _print_diagnostics(report: dict) -> None:
    """The dry run's task-vector table, estimate and warnings (:func:`surgery.merge.diagnostics.diagnose`)."""
    models = list(report["models"])
    if report["layers"]:
        pairs = list(report["overall"]["cosine"])
        typer.echo("task vectors τ = model − base: ‖τ‖/‖W0‖ per model, cosine between them, sign conflicts "
                   "(entries kept by 2+ models whose signs differ)")
        if len(models) > 2:
            typer.echo("  models: " + ", ".join(f"{k + 1} = {m}" for k, m in enumerate(models)))
        numbered = {pair: "·".join(str(models.index(m) + 1) for m in pair.split(" · ")) for pair in pairs}
        width = max(len(layer["group"]) for layer in report["layers"])
        header = [f"{'group':<{width}}"] + [f"{m[:12]:>12}" for m in models] + \
            [f"{'cosine' if len(pairs) == 1 else 'cos ' + numbered[pair]:>8}" for pair in pairs] + [f"{'conflicts':>9}"]
        typer.echo("  " + " ".join(header))
        for layer in report["layers"] + [report["overall"]]:
            cells = [f"{layer['group']:<{width}}"]
            cells += [f"{_number(layer['relative_norm'][m]):>12}" for m in models]
            cells += [f"{_number(layer['cosine'][pair]):>8}" for pair in pairs]
            conflicts = layer["sign_conflicts"]
            cells.append(f"{'-' if conflicts is None else f'{conflicts:.1%}':>9}")
            typer.echo("  " + " ".join(cells))
    else:
        typer.echo("no base, so no task vectors to report")
    estimate = report["estimate"]
    free = f", {human_size(estimate['free_bytes'])} free" if estimate["free_bytes"] is not None else ""
    typer.echo(f"estimate: {estimate['seconds']:.2g} s = opening and planning {estimate['planning_seconds']:.2g} s + "
               f"merging {estimate['merge_seconds']:.2g} s (the method on one tensor of each shape, reading "
               f"included) over {estimate['workers']} worker(s) + writing {estimate['write_seconds']:.2g} s (at the "
               "rate a synced scratch file was written beside OUTPUT)")
    typer.echo(f"  disk {human_size(estimate['disk_bytes'])}{free}; memory about "
               f"{human_size(estimate['memory_bytes'])} (this process now, plus each worker's peak on its largest "
               "tensor kind)")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _print_check(report: dict) -> None:
    """``--check``'s measurements (:func:`surgery.merge.check.check_merge`)."""
    probe = report["probe"]
    if "skipped" in probe:
        typer.echo(f"check: probe skipped ({probe['skipped']})")
    else:
        typer.echo(f"check on {probe['tokens']} tokens {probe['written_by']} wrote (seed {probe['seed']}): merge's "
                   f"NLL {report['merged_nll']:.3f}")
        for row in report["parents"]:
            if "skipped" in row:
                typer.echo(f"  {row['model']}: skipped ({row['skipped']})")
                continue
            extra = f", KL(base ‖ it) {row['kl_to_base']:.4f}" if "kl_to_base" in row else ""
            typer.echo(f"  {row['model']}{' (base)' if row['base'] else ''}: KL(it ‖ merge) {row['kl']:.4f}, "
                       f"top-1 agreement {row['top1_agreement']:.3f}, NLL {row['nll']:.3f}{extra}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}")


def _parameter_options() -> list[inspect.Parameter]:
    """One ``surgery merge`` option per name a declared merge parameter with CLI flags goes by (``--lambda`` and
    its alias ``--alpha`` are two), in declaration order: the recipe resolves each name for the chosen method."""
    from surgery.merge.registry import DECLARATIONS

    helps: dict[str, list[str]] = {}
    kinds: dict[str, type] = {}
    for declarations in DECLARATIONS.values():
        for parameter in declarations:
            if not parameter.cli:
                continue
            for spelled in (parameter.name, *parameter.aliases):
                kinds[spelled] = parameter.kind
                note = parameter.help if spelled == parameter.name else f"Another name for --{parameter.name}."
                helps.setdefault(spelled, [])
                if note not in helps[spelled]:
                    helps[spelled].append(note)
    options = []
    for spelled, notes in helps.items():
        flag = spelled.replace("_", "-")
        flags = (f"--{flag}/--no-{flag}",) if kinds[spelled] is bool else (f"--{flag}",)
        option = typer.Option(None, *flags, help=" ".join(notes))
        options.append(inspect.Parameter(spelled + "_", inspect.Parameter.KEYWORD_ONLY, default=option,
                                         annotation=Optional[kinds[spelled]]))
    return options


def merge_signature() -> inspect.Signature:
    """The merge command's signature as typer reads it: its fixed options, with one option per declared merge
    parameter name and alias that has CLI flags (``--lambda``, ``--alpha``, ``--density``...) after
    ``--weights``.

    Returns:
        The signature; a parameter's keyword is its name plus ``_`` (``lambda_``, ``density_``).

    Example: ``"density_" in merge_signature().parameters``
    """
    declared = _FIXED_OPTIONS.parameters.values()
    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.name != "models" else p
             for p in declared if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in fixed].index("weights") + 1
    return inspect.Signature(fixed[:at] + _parameter_options() + fixed[at:])


_FIXED_OPTIONS = inspect.signature(merge, eval_str=True)  # the options every merge has, as written above
merge.__signature__ = merge_signature()
app.command(help=MERGE_HELP)(merge)


MERGE_MULTI_HELP = " ".join("""
Run mergekit-multi's interdependent merges: CONFIG holds mergekit configs as YAML documents (separated by ---), each
with a name by which later ones use its output as a model (written to INTERMEDIATE_DIR/NAME); the one without a name
is the final merge, written to --output. They run in dependency order; with --lazy (default) a merge whose output
already holds the same recipe is skipped unless a merge it reads was rebuilt.
""".split("\n")).strip()


@app.command("merge-multi", help=MERGE_MULTI_HELP)
def merge_multi(
    config: str = typer.Argument(..., help="The multi-document YAML of mergekit configs."),
    intermediate_dir: str = typer.Option(..., "-I", "--intermediate-dir", help="Where named merges are written."),
    output: Optional[str] = typer.Option(None, "-o", "--output", "--out-path",
                                         help="Where the unnamed (final) merge is written."),
    lazy: bool = typer.Option(True, "--lazy/--no-lazy", help="Skip merges whose output holds the same recipe."),
    device: str = typer.Option("cpu", "--device", help="Where the math runs: cpu or cuda."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.merge.multi import MultiMergeConfig, multi_merge

    with progress(None, "B", "merge") as advance:
        result = multi_merge(MultiMergeConfig(config, intermediate_dir, output, lazy=lazy, device=device),
                             progress=advance)
    if as_json:
        return print_json(result.summary())
    for step in result.steps:
        typer.echo(f"{'wrote' if step.ran else 'up to date'} {step.output}"
                   + (f" ({step.name})" if step.name else " (final)"))


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
    from surgery.merge.aim import CalibrateConfig, calibrate as run_calibrate

    config = CalibrateConfig(source=base, output=output, calibration=calibration, max_tokens=max_tokens, seed=seed,
                             device=device)
    summary = run_calibrate(config).summary()
    if as_json:
        return print_json(summary)
    typer.echo(f"wrote {summary['output']}: {summary['modules']} modules, {summary['tokens']} tokens in "
               f"{summary['blocks']} block(s), {summary['seconds']:.1f} s")



@app.command("sweep")
def sweep_command(
    models: list[str] = typer.Argument(None, help="Models to merge, as for `surgery merge` (or give --recipe)."),
    output: str = typer.Option(..., "-o", "--output", help="Directory for sweep.json, pareto.png and the recipes "
                                                           "(written atomically)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Settings to try, e.g. \"lambda=0.5:1.0:0.1,"
                                                           "density=0.1,0.2\" (START:STOP:STEP includes STOP; also "
                                                           "method, seed, omega)."),
    search: Optional[str] = typer.Option(None, "--search", help="Instead of --grid, search this box with NSGA-II "
                                                               "for the accuracy / length Pareto front, e.g. "
                                                               "\"lambda@3=0.4:1.6,density=0.1:0.9\" (KEY@K: K "
                                                               "values over the layers, a gradient)."),
    population: int = typer.Option(8, "--population", help="Points per generation of --search."),
    generations: int = typer.Option(3, "--generations", help="Generations of --search (the first a Latin "
                                                             "hypercube)."),
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
    temperature: float = TEMPERATURE_OPTION,
    samples: int = SAMPLES_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of --search and of sampled answers."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep every merge in OUTPUT/models/."),
    executor: str = typer.Option("local", "--executor", help="local, or ray: every merge + evaluation a Ray task "
                                                              "(one GPU each with --device cuda)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster, HOST:PORT (default: a "
                                                                          "local one)."),
    device: str = DEVICE_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Merge at every grid point (or where --search leads), evaluate accuracy and response length, and recommend a
    setting on the Pareto front."""
    from surgery.sweep import SweepConfig, sweep

    config = SweepConfig(tuple(models or ()), output, grid, tasks, recipe=recipe_file, method=method,
                         search=search, population=population, generations=generations, temperature=temperature,
                         samples=samples, seed=seed, tolerance=tolerance, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, chat_template=chat_template, limit=limit, keep_models=keep_models, executor=executor,
                         ray_address=ray_address, device=device, force=force)
    report = sweep(config, progress=lambda line: typer.echo(line, err=True)).summary()
    if as_json:
        return print_json(report)
    for row in report["inputs"] + report["points"]:
        mark = " <- recommended" if row.get("recommended") else " (Pareto front)" if row.get("pareto") else ""
        label = json.dumps(row["setting"]) if "setting" in row else "input"
        label += f" (generation {row['generation']})" if "generation" in row else ""
        typer.echo(f"{row['name']:<12} {label:<40} accuracy {row['accuracy']:.3f}  mean length "
                   f"{row['mean_length']:7.1f}  reflective {row['reflection_rate']:.2f}{mark}")
    best = report["recommended"]
    typer.echo(f"recommended: {best['name']} {json.dumps(best['setting'])}; rebuild it with "
               f"`surgery merge --recipe {output}/recipes/{best['name']}.yaml -o OUT` ({report['seconds']} s)")
