"""``surgery verify``: how far a quantized checkpoint is from its reference, and whether that is close enough::

    from surgery.quantize import VerifyConfig, verify
    from surgery.quantize.verify import raise_if_failed
    report = verify(VerifyConfig("model-w4", reference="org/model", tokens=128, seed=0)).summary()
    report["passed"]      # False when a check below failed; report["failures"] lists them, worst first
    report["worst"]       # the ``top`` modules with the largest output relative error
    report["layers"][0]   # {"module", "group_size", "weight_rel_error", "output_rel_error", "output_cosine"}
    report["end_to_end"]  # {"kl": mean next-token KL(P‖Q), "top1_agreement": ..., "tokens": ...}
    raise_if_failed(report)   # CheckFailed naming the first failure and its threshold (the command exits 1)

What is measured. One model is built, transformers' module for the output's config, in float32 (by the model
runtime, :mod:`surgery.runtime`). With the reference's weights it samples its own text from BOS (seeded,
temperature 1; no data set): ``tokens`` tokens in 8 parallel sequences (:func:`surgery.runtime.sampled_ids`), since
on a CPU a decode step costs about the same for 1 or 8 of them. It scores that text, and the inputs every quantized
Linear sees are kept at ``probes`` positions drawn with the seed. Per
quantized Linear, with W the reference weight and Ŵ the one decoded from the stored bits: the weight relative error
‖Ŵ − W‖/‖W‖, and on those real activations X the output relative error ‖XŴᵀ − XWᵀ‖/‖XWᵀ‖ and cosine. For
compressed-tensors, XŴᵀ comes from the fused dequantize-matmul kernel reading the packed tensors (Triton on CUDA,
its torch reference on CPU). Then Ŵ replaces W, the output's other tensors (embeddings, norms, head) replace the
reference's, as a loader would load them, and the model scores the same text again: the mean next-token
KL(P_reference ‖ P_quantized) and the share of positions whose top-1 tokens agree. Everything is deterministic given
the seed.

What fails (exit 1 through :class:`~surgery.errors.CheckFailed`, after the report): a quantized Linear's output
cosine below ``min_cosine`` (NaN fails too), the KL above ``max_kl``, and an output loaders cannot read as written:
a quantized module that is not an ``nn.Linear`` of the model its config builds (loaders replace only Linear modules;
GPT-2's Conv1D projections keep their own weights, which the output does not hold), a tensor the model needs that
the output lacks, and, for compressed-tensors, whatever transformers' own loader, asked on the meta device, would
leave missing or refuse for its shape.

The defaults, DEFAULT_MIN_COSINE = 0.9 and DEFAULT_MAX_KL = 1.5 nats, come from measurements at the default 128
tokens over seeds 0-2 (``python benchmarks/verify_bench.py --thresholds``). Real outputs: SmolLM2-135M-Instruct at 4
bits (rtn, hqq, asymmetric, GPTQ; group 64 and 128) has a lowest per-layer cosine of 0.970-0.978 (a value
projection) and a KL of 0.60-0.90; at 8 bits 0.9999 and 0.004; the tiny test models 0.991 or more and 0.005 or
less. (Asymmetric compressed-tensors outputs measure as well but fail the loading check with the transformers 5.24
and compressed-tensors 0.20.1 installed here, which refuse their packed zero points.) Failures: against an unrelated
reference of the same shapes the lowest cosine is -0.02 or below and SmolLM2's KL 4.2; one module with zeroed
scales or shuffled packed words has cosine 0 or -0.01, while the KL (0.94-1.31) would not tell it from 4-bit noise.
So the cosine threshold sits in a wide gap, and the KL threshold 1.7x above the worst real 4-bit figure of a 135M
model, where it still catches outputs that lost the reference's predictions. Models of billions of parameters
measure far lower KLs at 4 bits: give them a tighter ``--max-kl``.

What is refused (exit 2 through :class:`~surgery.errors.BadInput`): a reference whose files do not have the content
hashes the output's ``surgery.json`` recorded for its input (unless ``any_reference``; an output without such a
manifest is compared with a warning), and any structural mismatch: a quantized module or a tensor the reference
lacks, or holds in another shape.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from surgery.errors import BadInput, CheckFailed
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint
from surgery.io.loader_check import loading_problems
from surgery.quantize.formats import QuantFormat, format_of, output_path
from surgery.quantize.grid import Scheme
from surgery.runtime import (agreement, build_model, captured_inputs, load_parameters, log_probs, one_torch_thread,
                             sampled_ids, set_parameter)

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 128
DEFAULT_PROBES = 64
DEFAULT_TOP = 5
DEFAULT_MIN_COSINE = 0.9
DEFAULT_MAX_KL = 1.5


# ---------------------------------------------------------------------------------------------------------------
# Reading the quantized checkpoint


def scheme_of(ckpt: Checkpoint) -> tuple[QuantFormat, Scheme]:
    """The registered format that wrote a quantized checkpoint, and the grid it declares.

    Args:
        ckpt: the open quantized checkpoint.

    Returns:
        (format, scheme); BadInput when no registered format reads it.

    Example::

        fmt, scheme = scheme_of(ckpt)   # (CompressedTensors(), Scheme(bits=4, group_size=32, ...))
    """
    fmt = format_of(ckpt)
    return fmt, fmt.stored_scheme(ckpt)


def module_scheme(ckpt: Checkpoint, module: str, default: Scheme) -> Scheme:
    """The grid of one module (compressed-tensors may give some modules another group size, groups.py).

    Args:
        ckpt: the quantized checkpoint.
        module: a quantized module's name.
        default: the checkpoint's declared grid.

    Returns:
        The module's grid.

    Example::

        module_scheme(ckpt, "model.layers.0.mlp.up_proj", scheme).group_size   # 64
    """
    return format_of(ckpt).module_scheme(ckpt, module, default)


def quantized_modules(ckpt: Checkpoint) -> list[str]:
    """Names of the quantized modules of a quantized checkpoint.

    Args:
        ckpt: the quantized checkpoint.

    Returns:
        Module names (without ``.weight``).

    Example::

        quantized_modules(ckpt)[0]   # "model.layers.0.self_attn.q_proj"
    """
    return format_of(ckpt).quantized_modules(ckpt)


def decoded_weight(ckpt: Checkpoint, module: str) -> torch.Tensor:
    """The float32 weight of one quantized module, decoded from the stored bits by its format.

    Args:
        ckpt: the quantized checkpoint.
        module: a quantized module's name.

    Returns:
        float32 (out, in) in transformers' layout.

    Example::

        weight = decoded_weight(ckpt, "model.layers.0.mlp.up_proj")   # (out, in)
    """
    return format_of(ckpt).decoded_weight(ckpt, module)


def dequantized_weights(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module + ".weight", float32 weight)`` for every quantized module, decoded from the stored bits.

    Args:
        ckpt: the quantized checkpoint.

    Returns:
        An iterator of (parameter name, weight).

    Example::

        dict(dequantized_weights(ckpt))["model.layers.0.mlp.up_proj.weight"]
    """
    yield from format_of(ckpt).decoded_parameters(ckpt)


def open_quantized(path: str):
    """Open a quantized output: a checkpoint directory, or the one file a single-file format keeps in it (GGUF).

    Args:
        path: the output (directory or file).

    Returns:
        The open checkpoint (a context manager).

    Example::

        with open_quantized("smol-gguf") as ckpt:   # opens smol-gguf/model-Q4_0.gguf
            quantized_modules(ckpt)
    """
    inner = output_path(path)
    return open_checkpoint(inner if inner is not None else path, raw=True)


def load_dequantized(quantized: str, reference_model):
    """A copy of ``reference_model`` whose quantized Linear weights are replaced by the decoded ones (tests compare
    transformers' own loading of an output with this).

    Args:
        quantized: the quantized output.
        reference_model: a transformers model of the same architecture.

    Returns:
        The copy.

    Example::

        model = load_dequantized("model-w4", AutoModelForCausalLM.from_pretrained("org/model"))
    """
    import copy

    model = copy.deepcopy(reference_model)
    params = dict(model.named_parameters())
    with open_quantized(quantized) as ckpt, torch.no_grad():
        for name, weight in dequantized_weights(ckpt):
            if name not in params:
                raise BadInput(f"{quantized}: {name} has no counterpart in the reference model")
            params[name].copy_(weight)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Is the reference the quantized model's source?


def _manifest_input(ckpt: Checkpoint) -> dict | None:
    """The input record (``source``, ``sha256``: file → hash) of a ``surgery quantize`` output's surgery.json, or
    None when the checkpoint has no such manifest."""
    from surgery.provenance import read_manifest

    manifest = read_manifest(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)
    inputs = manifest.get("inputs")
    if manifest.get("command") != "quantize":
        return None
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict) \
            or not isinstance(inputs[0].get("sha256"), dict):
        raise BadInput(f"{ckpt.source}: surgery.json records its input without file hashes (not a manifest of "
                       "`surgery quantize`?)")
    return inputs[0]


def _check_provenance(ckpt: Checkpoint, reference: Checkpoint, any_reference: bool = False) -> dict:
    """Compare the reference's file hashes with those ``surgery quantize`` recorded for its input: BadInput on a
    difference unless ``any_reference``; a warning when there is no manifest. Returns the report's ``provenance``::

        _check_provenance(ckpt, ref)   # {"manifest": True, "source": "org/model", "matches": True, "file": None}
    """
    from surgery.provenance import content_hashes

    recorded = _manifest_input(ckpt)
    if recorded is None:
        log.warning("%s has no surgery.json from `surgery quantize`: cannot check that %s is the model it was "
                    "quantized from", ckpt.source, reference.source)
        return {"manifest": False, "source": None, "matches": None, "file": None}
    directory = reference.path if reference.path.is_dir() else reference.path.parent
    hashes = {path.name: digest for path, digest in
              content_hashes([directory / name for name in reference.files()]).items()}
    differing = next((name for name in sorted(set(recorded["sha256"]) | set(hashes))
                      if recorded["sha256"].get(name) != hashes.get(name)), None)
    result = {"manifest": True, "source": recorded.get("source"), "matches": differing is None, "file": differing}
    if differing is None:
        return result
    ours, theirs = hashes.get(differing), recorded["sha256"].get(differing)
    message = (f"{reference.source} is not the model {ckpt.source} was quantized from: its {differing} "
               + (f"has SHA-256 {ours[:12]}…" if ours else "does not exist")
               + f", {ckpt.source}/surgery.json records "
               + (f"{theirs[:12]}…" if theirs else "no such file") + f" (source {recorded.get('source')})")
    if not any_reference:
        raise BadInput(message + "; pass --any-reference to compare them anyway")
    log.info("%s; comparing anyway (--any-reference)", message)
    return result


# ---------------------------------------------------------------------------------------------------------------
# One model, reference weights first, then the quantized checkpoint's


def _loading_problem(module: str, message: str, tensor: str | None = None) -> dict:
    """A failed ``loadable`` check about ``module`` (and one of its tensors)."""
    return {"check": "loadable", "module": module, **({"tensor": tensor} if tensor else {}), "message": message}


def _not_linear_problems(model: nn.Module, ckpt: Checkpoint, modules: list[str]) -> list[dict]:
    """A failure per quantized module that is not a Linear of the model its config builds: loaders replace only
    ``nn.Linear`` modules (a GPT-2 Conv1D keeps its own weight, which the checkpoint does not hold)."""
    problems = []
    for module in modules:
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise BadInput(f"{ckpt.source}: quantized module {module} has no counterpart in the model its config "
                           f"builds") from None
        if not isinstance(target, nn.Linear):
            problems.append(_loading_problem(module, (
                f"{module} is a {type(target).__name__}, not a Linear: loaders quantize Linear modules only, so "
                f"transformers would load it without its weights")))
    return problems


def _transformers_loading_problems(ckpt: Checkpoint) -> list[dict]:
    """What transformers' own loader makes of the checkpoint, asked on the meta device by the output check every
    command runs (:func:`surgery.io.loader_check.loading_problems`): a failure per problem it reports."""
    if not ckpt.path.is_dir():
        return []
    return [_loading_problem("(loader)", f"transformers would not load {ckpt.source} correctly: {problem}")
            for problem in loading_problems(ckpt.path)]


def _one_per_module(problems: list[dict]) -> list[dict]:
    """The first problem of each module (several checks may see the same one)."""
    seen: set[str] = set()
    kept = []
    for problem in problems:
        if problem["module"] not in seen:
            seen.add(problem["module"])
            kept.append(problem)
    return kept


def _start_token(ckpt: Checkpoint, reference: Checkpoint) -> tuple[int, int]:
    """(first token, pad token) of the generated text: the config's BOS, else its EOS; where the config names
    neither (tiny qwen2 configs), the tokenizer's, from the output's directory or else the reference's."""
    def first(value):
        return value[0] if isinstance(value, list) and value else value

    config = ckpt.config or {}
    bos, eos = first(config.get("bos_token_id")), first(config.get("eos_token_id"))
    if bos is None and eos is None:
        bos, eos = _tokenizer_ids(ckpt, reference)
    start = bos if bos is not None else eos
    if start is None:
        raise BadInput(f"{ckpt.source}: neither config.json nor the tokenizer names a BOS or EOS token to start the "
                       f"generated text from")
    return start, eos if eos is not None else start


def _tokenizer_ids(ckpt: Checkpoint, reference: Checkpoint) -> tuple[int | None, int | None]:
    from transformers import AutoTokenizer

    for source in (ckpt, reference):
        directory = source.path if source.path.is_dir() else source.path.parent
        if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(directory)
            return tokenizer.bos_token_id, tokenizer.eos_token_id
    return None, None


# ---------------------------------------------------------------------------------------------------------------
# Per-layer measures


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """The relative error ``‖approx - exact‖ / ‖exact‖`` (an all-zero ``exact`` divides by 1e-30, not 0).

    Args:
        approx: the approximation (a decoded weight, an output).
        exact: the reference of the same shape.

    Returns:
        The Frobenius-norm relative error as a float.

    Example: ``relative_error(torch.tensor([1.0, 1.1]), torch.tensor([1.0, 1.0]))   # ≈ 0.0707``
    """
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def _layer_report(ckpt: Checkpoint, module: str, weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor,
                  backend: str) -> dict:
    """The measures of one quantized module: reference ``weight``, decoded ``approx``, probe inputs ``x``."""
    fmt, default = scheme_of(ckpt)
    scheme = fmt.module_scheme(ckpt, module, default)
    expected = x @ weight.T
    got = fmt.matmul(ckpt, module, x, approx, scheme, backend)
    return {"module": module, "group_size": scheme.group_size,
            "weight_rel_error": relative_error(approx, weight),
            "output_rel_error": relative_error(got, expected),
            "output_cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0))}


def _checked_shape(ckpt: Checkpoint, reference: Checkpoint, module: str, approx: torch.Tensor,
                   weight_shape: tuple[int, ...]) -> None:
    if tuple(approx.shape) != tuple(weight_shape):
        raise BadInput(f"{module}.weight: quantized in {ckpt.source} with shape {tuple(approx.shape)}, but "
                       f"{reference.source} has {tuple(weight_shape)}")


def _gaussian_layer_reports(ckpt: Checkpoint, reference: Checkpoint, modules: list[str], probes: int, seed: int,
                            backend: str) -> list[dict]:
    """Per-layer measures without a model run (``end_to_end=False``): seeded Gaussian probe inputs."""
    generator = torch.Generator().manual_seed(seed)
    reports = []
    stored, held = _stored_experts(reference), (None, None)
    for module in modules:
        if module in stored:  # the experts of one tensor come one after another: read it once
            tensor, expert = stored[module]
            held = held if held[0] == tensor else (tensor, reference.get(tensor))
            weight = held[1][expert].float().T
        elif f"{module}.weight" not in reference.tensors:
            raise BadInput(f"{reference.source}: no tensor {module}.weight for the quantized module {module}")
        else:
            weight = reference.get(f"{module}.weight").float()
        approx = decoded_weight(ckpt, module)
        _checked_shape(ckpt, reference, module, approx, tuple(weight.shape))
        x = torch.randn(probes, weight.shape[1], generator=generator)
        reports.append(_layer_report(ckpt, module, weight, approx, x, backend))
    return reports


# ---------------------------------------------------------------------------------------------------------------
# Verdict


def _nan_as(value: float, worst: float) -> float:
    """``value`` for sorting, a NaN (a broken output's measure) counted as ``worst``."""
    return worst if math.isnan(value) else value


def failures(layers: list[dict], end_to_end: dict | None, *, max_kl: float, min_cosine: float) -> list[dict]:
    """The failed checks, each with a one-line ``message``: per-layer cosines below ``min_cosine`` (lowest first;
    NaN fails), then an end-to-end KL above ``max_kl``.

    Args:
        layers: the per-layer measures (each with ``module`` and ``output_cosine``).
        end_to_end: the end-to-end measures (``kl``, ``top1_agreement``), or None when no model was run.
        max_kl: the largest end-to-end KL that passes.
        min_cosine: the smallest per-layer output cosine that passes.

    Returns:
        One dict per failed check (``check``, ``value``, ``threshold``, ``message``; ``module`` for a layer);
        empty when everything passed.

    Example::

        failures([{"module": "l.q", "output_cosine": 0.9}], None, max_kl=0.1, min_cosine=0.99)
        # [{"check": "min_cosine", "module": "l.q", "value": 0.9, "threshold": 0.99, "message": "l.q output ..."}]
    """
    low = sorted((layer for layer in layers if not layer["output_cosine"] >= min_cosine),
                 key=lambda layer: _nan_as(layer["output_cosine"], -math.inf))
    found = [{"check": "min_cosine", "module": layer["module"], "value": layer["output_cosine"],
              "threshold": min_cosine, "message": f"{layer['module']} output cosine {layer['output_cosine']:.4g} "
                                                  f"< --min-cosine {min_cosine:g}"} for layer in low]
    if end_to_end is not None and not end_to_end["kl"] <= max_kl:
        found.append({"check": "max_kl", "value": end_to_end["kl"], "threshold": max_kl,
                      "message": f"end-to-end KL(P‖Q) {end_to_end['kl']:.4g} nats > --max-kl {max_kl:g} "
                                 f"(top-1 agreement {end_to_end['top1_agreement']:.3f})"})
    return found


def raise_if_failed(report: dict) -> None:
    """CheckFailed naming the first (worst) failure of a :func:`verify` report and how many others there are.

    Args:
        report: a :func:`verify` report (its ``summary()``): ``passed`` and ``failures``.

    Raises:
        CheckFailed: when ``report["passed"]`` is false.

    Example: ``raise_if_failed(verify(VerifyConfig("model-w4", reference="org/model")).summary())``
    """
    if report["passed"]:
        return
    first, others = report["failures"][0], len(report["failures"]) - 1
    more = f" (and {others} more failed check{'s' if others > 1 else ''})" if others else ""
    raise CheckFailed(f"verify failed: {first['message']}{more}")


def report_lines(report: dict) -> list[str]:
    """The text the command prints for a :func:`verify` report: what was compared, the worst modules, the measures
    against their thresholds, the verdict and (up to ``len(report["worst"])``, at least one) the failures.

    Args:
        report: a :func:`verify` report (its ``summary()``).

    Returns:
        The lines to print, without newlines; the last is ``"passed"`` or a failure.

    Example: ``print("\n".join(report_lines(verify(VerifyConfig("model-w4", reference="org/model")).summary())))``
    """
    provenance, thresholds = report["provenance"], report["thresholds"]
    source = ("its files have the hashes surgery.json records" if provenance["matches"]
              else "no surgery.json to check it against" if not provenance["manifest"]
              else f"its {provenance['file']} is not the one surgery.json records; --any-reference")
    lines = [f"{report['quantized']}: {report['format']}, {report['bits']} bits, group {report['group_size']}, "
             f"{len(report['layers'])} quantized modules; reference {report['reference']} ({source})"]
    if report["worst"]:
        probes = "the reference's activations" if report["probes"] == "activations" else "Gaussian probes"
        lines.append(f"worst {len(report['worst'])} by output relative error on {probes}:")
    lines += [f"  {layer['module']}: output {layer['output_rel_error']:.4f}, cos {layer['output_cosine']:.5f}, "
              f"weight {layer['weight_rel_error']:.4f}" for layer in report["worst"]]
    lines.append(f"min output cosine {report['min_output_cosine']:.5f} (--min-cosine {thresholds['min_cosine']:g}), "
                 f"worst output relative error {report['worst_output_rel_error']:.4f}")
    if "end_to_end" in report:
        e2e = report["end_to_end"]
        lines.append(f"KL(P‖Q) {e2e['kl']:.5f} nats (--max-kl {thresholds['max_kl']:g}), top-1 agreement "
                     f"{e2e['top1_agreement']:.4f} over {e2e['tokens']} tokens")
    if report["passed"]:
        return lines + ["passed"]
    count = len(report["failures"])
    lines.append(f"FAILED: {count} check{'s' if count > 1 else ''}")
    return lines + [f"  {failure['message']}" for failure in report["failures"][:max(len(report["worst"]), 1)]]


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyConfig:
    """What ``surgery verify`` compares and its thresholds, validated on construction (BadInput with the CLI's
    message). ``source``: the quantized output (a directory, or a GGUF output's directory or file).
    ``end_to_end=False`` runs no model: per-layer measures on seeded Gaussian probes, and no KL.

    Example::

        config = VerifyConfig("model-w4", reference="org/model", max_kl=0.1)
    """

    source: str
    reference: str
    tokens: int = DEFAULT_TOKENS
    probes: int = DEFAULT_PROBES
    seed: int = 0
    backend: str = "auto"
    end_to_end: bool = True
    max_kl: float = DEFAULT_MAX_KL
    min_cosine: float = DEFAULT_MIN_COSINE
    any_reference: bool = False
    top: int = DEFAULT_TOP

    def __post_init__(self):
        if self.tokens < 2:
            raise BadInput(f"--tokens {self.tokens}: must be at least 2")
        if self.top < 0:
            raise BadInput(f"--top {self.top}: must be 0 or more")


@dataclass(frozen=True)
class VerifyResult:
    """A :func:`verify` report; ``passed`` is the verdict."""

    report: dict

    @property
    def passed(self) -> bool:
        return self.report["passed"]

    def summary(self) -> dict:
        """What ``surgery verify --json`` prints (see the module docstring).

        Returns:
            The report dict.

        Example::

            verify(config).summary()["end_to_end"]["kl"]
        """
        return self.report


def verify(config: VerifyConfig, *, progress=None) -> VerifyResult:
    """Compare ``config.source`` with ``config.reference`` (see the module docstring), for any registered format.

    Args:
        config: the validated VerifyConfig.
        progress: unused (verify reports no byte progress); accepted as every operation does.

    Returns:
        The :class:`VerifyResult`; :func:`raise_if_failed` turns a failed one into CheckFailed.

    Example::

        result = verify(VerifyConfig("model-w4", reference="org/model", max_kl=0.1))
        raise_if_failed(result.summary())
    """
    c = config
    with open_quantized(c.source) as ckpt, open_checkpoint(c.reference) as ref, one_torch_thread():
        fmt, scheme = scheme_of(ckpt)
        provenance = _check_provenance(ckpt, ref, c.any_reference)
        modules = fmt.quantized_modules(ckpt)
        if not modules:
            raise BadInput(f"{ckpt.source}: its quantization_config says {fmt.name}, but it holds no quantized "
                           "module")
        if c.end_to_end:
            layers, e2e, problems = compare_models(ckpt, ref, modules, c.tokens, c.probes, c.seed, c.backend)
        else:
            layers, e2e, problems = _gaussian_layer_reports(ckpt, ref, modules, c.probes, c.seed, c.backend), None, []
    report = {"quantized": c.source, "reference": c.reference, "format": fmt.name, "bits": scheme.bits,
              "group_size": scheme.group_size, "symmetric": scheme.symmetric, "provenance": provenance,
              "probes": "activations" if c.end_to_end else "gaussian", "layers": layers,
              "worst": sorted(layers, key=lambda layer: -_nan_as(layer["output_rel_error"], math.inf))[:c.top],
              "worst_output_rel_error": max(layers, key=lambda layer: _nan_as(layer["output_rel_error"], math.inf))[
                  "output_rel_error"],
              "min_output_cosine": min(layers, key=lambda layer: _nan_as(layer["output_cosine"], -math.inf))[
                  "output_cosine"],
              "thresholds": {"max_kl": c.max_kl, "min_cosine": c.min_cosine}}
    if e2e is not None:
        report["end_to_end"] = e2e
    failed = problems + failures(layers, e2e, max_kl=c.max_kl, min_cosine=c.min_cosine)
    return VerifyResult({**report, "passed": not failed, "failures": failed})


@torch.no_grad()
def compare_models(ckpt: Checkpoint, ref: Checkpoint, modules: list[str], tokens: int, probes: int, seed: int,
                   backend: str) -> tuple[list[dict], dict, list[dict]]:
    """One model, transformers' for the output's config (built by :func:`surgery.runtime.build_model`). With the
    reference's weights: generate, score, keep each quantized Linear's inputs; per module, measure and swap the
    decoded weight in; then the output's other tensors, and score again.

    Args:
        ckpt: the quantized checkpoint.
        ref: the reference checkpoint.
        modules: the quantized modules.
        tokens: self-generated tokens scored.
        probes: positions whose inputs each module is measured on.
        seed: seed of the text and the probe positions.
        backend: the dequantize-matmul backend.

    Returns:
        (layer reports, end-to-end measures, loading failures)::

            layers, e2e, problems = compare_models(ckpt, ref, quantized_modules(ckpt), 128, 64, 0, "auto")
    """
    model = build_model({key: value for key, value in (ckpt.config or {}).items() if key != "quantization_config"},
                        ckpt.source)
    stored = _stored_experts(ref)
    experts = _expert_slices(ref) | {module: (tensor, expert, slice(None)) for module, (tensor, expert) in
                                     stored.items()}
    problems = _not_linear_problems(model, ckpt, [module for module in modules if module not in experts])
    missing = load_parameters(model, ref, set(), f"model {ckpt.source}'s config builds")
    if missing:
        raise BadInput(f"{ref.source}: no tensor {missing[0]} (the model {ckpt.source}'s config builds needs it)")
    ids = sampled_ids(model, *_start_token(ckpt, ref), tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(ids.numel(), generator=generator)[:probes].sort().values
    linear = [module for module in modules
              if module not in experts and isinstance(model.get_submodule(module), nn.Linear)]
    with _expert_inputs(model, {m: experts[m] for m in modules if m in experts}) as routed:
        log_p, inputs = captured_inputs(model, linear, ids, rows)
    inputs |= {module: torch.cat(parts)[:probes] for module, parts in routed.items()}
    layers = []
    for module in modules:
        if module in experts:  # its rows of the fused experts tensor the model holds
            target, expert, rows_of = experts[module]
            weight = model.get_parameter(target)[expert][rows_of]
            weight = weight.T if module in stored else weight  # gpt-oss's: (inputs, outputs)
        else:
            weight = model.get_parameter(f"{module}.weight")
        approx = decoded_weight(ckpt, module)
        _checked_shape(ckpt, ref, module, approx, tuple(weight.shape))
        # A module that is not a Linear (already a failure) has no inputs captured, nor an expert no token was
        # routed to: Gaussian probes
        x = inputs.pop(module) if module in inputs else torch.randn(probes, weight.shape[1], generator=generator)
        layers.append(_layer_report(ckpt, module, weight, approx, x, backend))
        if module in experts:
            model.get_parameter(target).data[expert][rows_of] = approx.T if module in stored else approx
        else:
            set_parameter(model, _parameter_aliases_of(model, f"{module}.weight"), approx)
    replaced = {f"{module}.weight" for module in modules if module not in experts} | \
        {target for target, _, _ in experts.values()}
    missing = load_parameters(model, ckpt, replaced, "model its config builds")
    problems += [_loading_problem(name.rpartition(".")[0], f"{ckpt.source} has no tensor {name}: a loader would "
                                 f"leave it uninitialised", name) for name in missing]
    problems += _transformers_loading_problems(ckpt)
    return layers, agreement(log_p, log_probs(model, ids)), _one_per_module(problems)


@contextmanager
def _expert_inputs(model: nn.Module, experts: dict[str, tuple[str, int, slice]]) -> Iterator[dict]:
    """While the model runs, each per-expert module's inputs: the hidden states of the tokens routed to its expert
    (gate and up), act(gate) * up (down, where the layout gives it). Yields module → list of (tokens, in) tensors."""
    from surgery.runtime.experts import expert_intermediate, routed_inputs

    wanted: dict[tuple[str, int], dict[str, list[str]]] = {}
    for module, (target, expert, _) in experts.items():
        path, _, leaf = target.rpartition(".")
        wanted.setdefault((path, expert), {}).setdefault(leaf, []).append(module)
    routed: dict[str, list[torch.Tensor]] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for expert, x in routed_inputs(module, args, kwargs):
                entry = wanted.get((path, expert), {})
                for name in entry.get("gate_up_proj", []):
                    routed.setdefault(name, []).append(x.float().clone())
                intermediate = expert_intermediate(module, expert, x) if "down_proj" in entry else None
                for name in entry.get("down_proj", []) if intermediate is not None else []:
                    routed.setdefault(name, []).append(intermediate.float().clone())
        return record

    handles = [model.get_submodule(path).register_forward_pre_hook(hook(path), with_kwargs=True)
               for path in {path for path, _ in wanted}]
    try:
        yield routed
    finally:
        for handle in handles:
            handle.remove()


def _expert_slices(ref: Checkpoint) -> dict[str, tuple[str, int, slice]]:
    """Per-expert module of the checkpoint → the fused parameter transformers' model holds it in, its expert index
    and its rows there (gate first, then up, in a fused gate_up tensor)."""
    from surgery.layout import ModelLayout

    layout = ModelLayout.build(ref.config)
    if layout is None:
        return {}
    slices = {}
    for target, patterns in layout.sources(ref.tensors)[1].items():
        for part, names in enumerate(patterns):
            for expert, name in enumerate(names):
                rows = ref.tensors[name].shape[0]
                slices[name.removesuffix(".weight")] = (target, expert, slice(part * rows, (part + 1) * rows))
    return slices


def _stored_experts(ref: Checkpoint) -> dict[str, tuple[str, int]]:
    """Each expert matrix of the 3-D expert tensors a checkpoint stores as they are (gpt-oss: (experts, inputs,
    outputs)), named ``<tensor>.<expert>`` as the formats quantizing them name it → (tensor, expert)."""
    from surgery.arch import Architecture

    arch = Architecture.from_config(ref.config)
    stored = {}
    for name, info in ref.tensors.items():
        if arch.holds_every_expert(name, info.shape):
            stored.update({f"{name}.{expert}": (name, expert) for expert in range(info.shape[0])})
    return stored


def _parameter_aliases_of(model: nn.Module, name: str) -> list[str]:
    """Every name of the parameter called ``name``."""
    target = model.get_parameter(name)
    return [other for other, param in model.named_parameters(remove_duplicate=False) if param is target]
