"""Check a written output against the loader it is meant for, before it appears.

Every command that writes a model calls one of these on its staging directory; a failure raises
:class:`~surgery.errors.CheckFailed` (exit 1, one line naming the tensor) and the output is never renamed into
place, so an output that its loader would reject — or load with weights missing — cannot appear::

    check_transformers(staging)          # config.json + safetensors, as transformers' from_pretrained reads them
    check_gguf(staging / "model-Q4_0.gguf")
    check_peft(staging)                  # a PEFT adapter directory against its base model

The transformers check runs transformers' own loading code (key renames, weight conversions such as fused MoE
experts, the quantizer of ``quantization_config``, tied weights) on the meta device, feeding it the written tensors'
names, shapes and dtypes as meta tensors: no weight data is read, so it costs the time to build the model skeleton.
What it checks: transformers reads the config; every parameter the model expects is present (tied ones aside); no
written tensor goes unused; shapes match; each tensor's dtype is of the kind (floating / integer) the parameter has.
"""

from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from surgery.errors import BadInput, CheckFailed, one_line
from surgery.layout import known_model_type, model_class

log = logging.getLogger(__name__)
SHOWN = 3  # names quoted in a failure message


def _names(keys, total: int | None = None) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(key) for key in keys[:SHOWN])
    more = len(keys) - SHOWN if total is None else total - SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


@contextmanager
def _quiet() -> Iterator[list[str]]:
    """transformers' loading report, warnings and progress bars kept off the terminal for the duration of the check;
    yields the list their messages are collected in (the report explains a failed conversion)."""
    from transformers.utils import logging as transformers_logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    library_logger = logging.getLogger("transformers")
    propagates = library_logger.propagate  # True where the environment has CI=true (transformers' own rule)
    library_logger.propagate = False
    # compressed-tensors warns about config targets the model has no module for: MoE experts, which are targeted
    # by their checkpoint names so that transformers finds their scheme, are fused into one tensor at load
    matcher = logging.getLogger("compressed_tensors")
    matcher_level = matcher.level
    matcher.setLevel(logging.ERROR)
    transformers_logging.disable_default_handler()
    transformers_logging.add_handler(handler)
    transformers_logging.set_verbosity_warning()
    transformers_logging.disable_progress_bar()
    try:
        with redirect_stderr(io.StringIO()):
            yield messages
    finally:
        transformers_logging.remove_handler(handler)
        transformers_logging.enable_default_handler()
        transformers_logging.set_verbosity(verbosity)
        library_logger.propagate = propagates
        matcher.setLevel(matcher_level)
        if bars:
            transformers_logging.enable_progress_bar()


REPORT_ROW = re.compile(r"^(?P<key>\S+(?: \S+)*?)\s+\|\s+(?P<status>MISSING|UNEXPECTED|MISMATCH|CONVERSION)\b", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _report_rows(messages: list[str]) -> dict[str, Problem]:
    """Problems by kind (missing, unused, mismatched, conversion) from transformers' loading report."""
    rows: dict[str, list[str]] = {}
    for message in messages:
        for match in REPORT_ROW.finditer(ANSI.sub("", message)):
            rows.setdefault(match["status"], []).append(match["key"])
    kinds = {"MISSING": ("missing", "parameters missing"), "UNEXPECTED": ("unused", "tensors the loader does not use"),
             "MISMATCH": ("mismatched", "shapes the model does not have"),
             "CONVERSION": ("conversion", "weight conversion failed for")}
    return {kinds[status][0]: _problem(*kinds[status], keys) for status, keys in rows.items()}


def _installed(package: str, what: Path) -> bool:
    """Whether the loader's ``package`` is importable; a warning that ``what`` goes unchecked when it is not."""
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        return True
    log.warning("%s is not checked against its loader: %s is not installed (pip install %s)", what.name, package,
                package.replace("_", "-"))
    return False


@dataclass(frozen=True)
class Problem:
    """One kind of thing transformers would get wrong loading a checkpoint: ``kind`` (missing, unused, mismatched,
    conversion, dtype, error, crashed, config, layout), the tensor names it concerns, and a line for people."""

    kind: str
    keys: frozenset[str]
    message: str

    @property
    def identity(self) -> frozenset[str]:
        """What makes two problems the same: the tensors, else the message."""
        return self.keys or frozenset({self.message})


def _problem(kind: str, label: str, keys) -> Problem:
    keys = frozenset(keys)
    return Problem(kind, keys, f"{label}: {_names(keys)}")


def check_transformers(directory: str | Path, inputs: list = ()) -> None:
    """CheckFailed unless transformers would load ``directory`` (config.json + safetensors) completely.

    ``inputs`` are the checkpoints the output was made from. A problem the output only inherits from them is not
    the command's: tensors transformers does not use are carried over with a warning (nothing is dropped), anything
    else is a BadInput naming the input. GPTQ checkpoints need a GPU kernel package to load, so their layout is
    checked against the unquantized model instead (:func:`_gptq_problems`). An asymmetric compressed-tensors
    checkpoint that transformers reads only with ``CompressedTensorsConfig(dequantize=True)`` passes with a warning
    saying so. A directory without config.json (bare tensors) and model types transformers does not know are not
    checked (a warning says so for the latter).

    Args:
        directory: the output checkpoint (usually the staging directory).
        inputs: the checkpoints it was made from (open ones, or their paths): a quantized input read decoded is
            checked as the command read it, its decoded tensors under its config without quantization_config.

    Example::

        check_transformers(staging, inputs=[ckpt])
    """
    found = _findings(Path(directory))
    if not found:
        return
    theirs = {Path(getattr(source, "path", source)): _input_findings(source) for source in inputs
              if Path(getattr(source, "path", source)).suffix != ".gguf"}
    inherited: dict[str, set[str]] = {}
    for problems in theirs.values():
        for problem in problems.values():
            inherited.setdefault(problem.kind, set()).update(problem.identity)
    own = [problem for problem in found.values() if not problem.identity <= inherited.get(problem.kind, set())]
    unloadable = next(((source, problems) for source, problems in theirs.items()
                       if {"config", "crashed"} & set(problems)), None)
    if own and unloadable is not None:  # an input transformers cannot load at all: the output's problems are its
        source, problems = unloadable
        raise BadInput(f"{source}: transformers would not load this input: "
                       + "; ".join(problem.message for problem in problems.values()))
    if own:
        raise CheckFailed("transformers would not load the output correctly: "
                          + "; ".join(problem.message for problem in own))
    if set(found) == {"unused"}:
        log.warning("the output carries tensors transformers does not use, as its input does: %s",
                    found["unused"].message.split(": ", 1)[1])
        return
    source, problems = next((source, problems) for source, problems in theirs.items() if problems)
    raise BadInput(f"{source}: transformers would not load this input correctly: "
                   + "; ".join(problem.message for problem in problems.values()))


def loading_problems(path: Path) -> list[str]:
    """What goes wrong when transformers loads the checkpoint at ``path`` (a directory, or one safetensors file
    beside its config.json), a line each; empty: nothing.

    Args:
        path: a checkpoint directory, or one safetensors file in it.

    Returns:
        One message per kind of problem (see :func:`check_transformers`); empty when it loads completely.

    Example: ``loading_problems(Path("model-w4"))   # ["parameters missing: 'lm_head.weight'"]``
    """
    return [problem.message for problem in _findings(path).values()]


def _input_findings(source) -> dict[str, Problem]:
    """An input's problems (see :func:`check_transformers`): a quantized one read decoded as the command read it,
    so that what an output inherits from its weights is found in the input too."""
    from surgery.io.checkpoint import DecodedView

    if isinstance(source, DecodedView) and known_model_type(source.config.get("model_type")):
        config = _config_of(source.config)
        if not isinstance(config, str):
            return _problems_with(config, dict(source.tensors))
    return _findings(Path(getattr(source, "path", source)))


def _findings(path: Path) -> dict[str, Problem]:
    """The problems, by kind, transformers would have loading the checkpoint at ``path`` (see
    :func:`check_transformers`)."""
    from surgery.io.safetensors_reader import SafetensorsCheckpoint, read_json

    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        return {}
    raw = read_json(directory / "config.json", "config.json")
    if not known_model_type((raw or {}).get("model_type")):  # custom code models are not checked
        log.warning("model type %r is not one transformers knows: %s is not checked against a loader",
                    raw.get("model_type"), path.name)
        return {}
    with SafetensorsCheckpoint(str(path), path) as written:
        specs = dict(written.tensors)
    config = _transformers_config(directory)
    if isinstance(config, str):
        return {"config": Problem("config", frozenset(), config)}
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method == "compressed-tensors" and not _installed("compressed_tensors", path):
        return {}
    if method == "gptq":
        del config.quantization_config
        try:
            model, _ = _load_on_meta(config, {})
        except _LoadCrashed as err:
            return {"crashed": Problem("crashed", frozenset(), f"transformers would not build the model: {err}")}
        return {problem.kind: problem for problem in _gptq_problems(model, specs, raw["quantization_config"])}
    if method == "mxfp4":
        # the layout of its CPU path (blocks and scales read by name and shape, dequantized); with `kernels`
        # installed transformers would first fetch gpt-oss's Triton kernels from the Hub, which meta cannot run
        config.quantization_config["dequantize"] = True
    problems = _problems_with(config, specs)
    # transformers' compressed path refuses (loudly: a shape mismatch raises) the packed asymmetric zero points
    # compressed-tensors itself writes; its dequantizing path reads them. A load that would silently leave
    # parameters missing or tensors unused never gets that second chance.
    if problems and method == "compressed-tensors" and set(problems) == {"mismatched"}:
        config.quantization_config["dequantize"] = True
        if not _problems_with(config, specs):
            log.warning("transformers loads %s only with quantization_config=CompressedTensorsConfig(dequantize=True): "
                        "%s", directory.name, problems["mismatched"].message)
            return {}
    return problems


def _config_of(config: dict):
    """transformers' config object for a config.json's content, or why it refuses it (a string)."""
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.for_model(**config)
    except Exception as err:  # noqa: BLE001 - any refusal of the config is the finding
        return f"its config.json is refused: {one_line(err)}"


def _transformers_config(directory: Path):
    """transformers' config object for ``directory``, or why it refuses the config.json (a string)."""
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - any refusal of the config is the finding
        return f"its config.json is refused: {one_line(err)}"


class _LoadCrashed(Exception):
    """transformers raised while loading: ``problems`` by kind, from its report when it printed one."""

    def __init__(self, problems: dict[str, Problem]):
        super().__init__("; ".join(problem.message for problem in problems.values()))
        self.problems = problems


def _load_on_meta(config, state: dict) -> tuple:
    """The model transformers builds for ``config`` and its loading info for ``state`` (meta tensors)."""
    cls = model_class(config)
    try:
        with _quiet() as messages:
            # Hub kernels cannot replace layers on meta (transformers >= 5.25 tries by default when `kernels` is in).
            return cls.from_pretrained(None, config=config, state_dict=state, device_map="meta",
                                       output_loading_info=True, use_kernels=False)
    except Exception as err:  # noqa: BLE001 - a crash while loading is the finding
        raise _LoadCrashed(_report_rows(messages) or {"crashed": Problem("crashed", frozenset(), one_line(err))}) \
            from None


def _problems_with(config, specs: dict) -> dict[str, Problem]:
    """What goes wrong, by kind, when transformers loads tensors of ``specs``' names, shapes and dtypes (empty:
    nothing)."""
    import copy

    state = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in specs.items()}
    try:
        model, info = _load_on_meta(copy.deepcopy(config), state)
    except _LoadCrashed as err:
        return err.problems
    problems = {}
    if info.get("missing_keys"):
        problems["missing"] = _problem("missing", "parameters missing", info["missing_keys"])
    if info.get("unexpected_keys"):
        problems["unused"] = _problem("unused", "tensors the loader does not use", info["unexpected_keys"])
    if info.get("mismatched_keys"):
        problems["mismatched"] = _problem("mismatched", "shapes the model does not have",
                                          [key for key, *_ in info["mismatched_keys"]])
    if info.get("error_msgs"):
        problems["error"] = Problem("error", frozenset(), one_line(info["error_msgs"][0]))
    parameters = dict(model.state_dict())
    wrong_kind = sorted(name for name, spec in specs.items() if name in parameters
                        and spec.dtype.is_floating_point != parameters[name].dtype.is_floating_point)
    if wrong_kind:
        name = wrong_kind[0]
        problems["dtype"] = Problem("dtype", frozenset(wrong_kind), (
            f"tensor {name!r} is {specs[name].dtype} but the model's parameter is {parameters[name].dtype}"
            + (f" (and {len(wrong_kind) - 1} more)" if len(wrong_kind) > 1 else "")))
    return problems


GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _gptq_problems(model, specs: dict, quant: dict) -> list[Problem]:
    """GPTQ v1's layout checked against the unquantized ``model``: each quantized Linear's weight replaced by
    qweight (in·b/32, out) int32, qzeros (in/g, out·b/32) int32, scales (in/g, out) float16, g_idx (in,) int32;
    every other parameter present with its shape."""
    bits, group = quant.get("bits"), quant.get("group_size")
    expected = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()}
    tied = {name for name in expected if name not in specs and name.endswith("lm_head.weight")
            and getattr(model.config, "tie_word_embeddings", False)}
    modules = {name.removesuffix(".qweight") for name in specs if name.endswith(".qweight")}
    for module in sorted(modules):
        shape = expected.pop(f"{module}.weight", None)
        if shape is None:
            return [Problem("layout", frozenset({module}),
                            f"tensor {module + '.qweight'!r} quantizes a module the model does not have")]
        kind = type(model.get_submodule(module))
        if not issubclass(kind, torch.nn.Linear):
            return [Problem("layout", frozenset({module}),
                            f"module {module!r} is a {kind.__name__}, not the Linear layer GPTQ kernels replace")]
        out, inputs = shape[0]
        expected.update({
            f"{module}.qweight": ((inputs * bits // 32, out), torch.int32),
            f"{module}.qzeros": ((inputs // group, -(-out * bits // 32)), torch.int32),
            f"{module}.scales": ((inputs // group, out), torch.float16),
            f"{module}.g_idx": ((inputs,), torch.int32)})
    problems = []
    missing = set(expected) - set(specs) - tied
    unused = set(specs) - set(expected)
    if missing:
        problems.append(_problem("missing", "parameters missing", missing))
    if unused:
        problems.append(_problem("unused", "tensors the loader does not use", unused))
    for name, info in specs.items():
        if name in expected:
            shape, dtype = expected[name]
            quantized = name.rsplit(".", 1)[-1] in GPTQ_TENSORS
            if info.shape != shape or (quantized and info.dtype != dtype) or (
                    not quantized and info.dtype.is_floating_point != dtype.is_floating_point):
                problems.append(Problem("mismatched", frozenset({name}),
                                        f"tensor {name!r} is {info.dtype} {info.shape}, the model needs {dtype} "
                                        f"{shape}"))
                break
    return problems


def check_gguf(path: str | Path) -> None:
    """CheckFailed unless ``path`` reads back as the GGUF checkpoint transformers and llama.cpp load: metadata
    transformers maps to a config, every tensor inside the file, every tensor the model needs present, with its
    shape (:class:`~surgery.io.gguf_reader.GGUFCheckpoint` checks all of that when it opens a file).

    Args:
        path: the GGUF file.

    Example: ``check_gguf(staging / "model-Q8_0.gguf")``
    """
    from surgery.io.gguf_reader import GGUFCheckpoint

    path = Path(path)
    try:
        with _quiet(), GGUFCheckpoint(str(path), path):
            pass
    except BadInput as err:
        raise CheckFailed(f"the written GGUF file would not load: {err}") from None


def check_peft(directory: str | Path, base_config: dict) -> None:
    """CheckFailed unless PEFT loads the adapter in ``directory`` onto a model built (on the meta device) from
    ``base_config``, using every tensor and missing none it needs (prompt-learning adapters: PEFT loads
    ``prompt_embeddings`` into the prompt encoder strictly, so a wrong shape fails there). Not checked when peft is
    not installed.

    Args:
        directory: the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
        base_config: the base model's ``config.json``.

    Example: ``check_peft(staging, checkpoint.config)``
    """
    directory = Path(directory)
    if not _installed("peft", directory):
        return
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in base_config.items() if key != "model_type"}
    try:
        with _quiet():
            config = AutoConfig.for_model(base_config["model_type"], **fields)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            peft_config = peft.PeftConfig.from_pretrained(directory)
            adapted = peft.get_peft_model(model, peft_config)
            tensors = _adapter_tensors(directory)
            result = peft.set_peft_model_state_dict(adapted, tensors)
    except Exception as err:  # noqa: BLE001 - any refusal is the finding
        raise CheckFailed(f"PEFT would not load the adapter: {one_line(err)}") from None
    if peft_config.is_prompt_learning:
        unused = sorted(set(tensors) - {"prompt_embeddings"})
        missing = [] if "prompt_embeddings" in tensors else ["prompt_embeddings"]
    else:
        unused = list(result.unexpected_keys)
        missing = [key for key in result.missing_keys if "lora_" in key]
    problems = ([f"tensors PEFT does not use: {_names(unused)}"] if unused else []) + (
        [f"adapter tensors missing: {_names(missing)}"] if missing else [])
    if problems:
        raise CheckFailed("PEFT would not load the adapter correctly: " + "; ".join(problems))


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


