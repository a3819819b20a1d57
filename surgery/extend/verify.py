"""Check a written config against everything the extension intends, the way transformers reads it.

From the written config, transformers' own config class standardises the rope parameters and the model family's
rotary-embedding module is built (for a dynamic scaling, transformers' dynamic initialisation at the new length);
then a tiny random model of the family runs one forward. Compared with what was intended: the inverse frequencies
and attention scaling, the standardised rope parameters (every key of the source's, unless the method set it), the
rotary module's other attributes (e.g. Qwen2-VL's mrope sections), max_position_embeddings and the rope fields of
the file itself::

    expected = expectation(plan)         # also what `surgery extend` records in surgery.json
    problems(plan.config, expected)      # [] when transformers reads the config as intended
    check_plan(plan)                     # BadInput naming the first differences
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from dataclasses import asdict, dataclass

import torch

from surgery.errors import BadInput, one_line
from surgery.extend.rope import EXTENDED_LAYER_TYPE, ExtensionPlan, RopeGeometry

RELATIVE_TOLERANCE = 1e-5  # transformers computes in float32
IGNORED_ROPE_KEYS = {"type"}  # the legacy name of rope_type: transformers reads it only when rope_type is absent
# rotary-module attributes compared elsewhere (attention_scaling) or that change by design with the length
RESTATED_ATTRIBUTES = {"training", "config", "rope_type", "max_seq_len_cached", "original_max_seq_len",
                       "attention_scaling"}
WRITTEN_FIELDS = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
                  "original_max_position_embeddings", "head_dim")
TINY_TOKENS = 6

log = logging.getLogger(__name__)


@dataclass
class Expectation:
    """What transformers should derive from a written config; None fields were not recorded (older manifests)."""

    inv_freq: list[float]
    attention_factor: float
    dynamic_length: int | None = None
    rope: dict | None = None  # the rope parameters transformers should standardise to
    rotary: dict | None = None  # the rotary module's other attributes
    max_position_embeddings: int | None = None
    written: dict | None = None  # the text config's rope fields, as written
    runs: bool | None = None  # a tiny model of the source ran (then the output must), or did not

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "surgery.json") -> "Expectation":
        """The expectation a manifest records; BadInput naming ``where`` when its fields are not of their types."""
        if (not isinstance(data, dict) or not isinstance(data.get("inv_freq"), list)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data["inv_freq"])
                or isinstance(data.get("attention_factor"), bool)
                or not isinstance(data.get("attention_factor"), (int, float))):
            raise BadInput(f"{where}: output.rope must record inv_freq (a list of numbers) and attention_factor")
        for key in ("rope", "rotary", "written"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise BadInput(f"{where}: output.rope.{key} must be a JSON object")
        return cls(**{key: data.get(key) for key in cls.__dataclass_fields__ if key in data})


@dataclass
class ReadBack:
    """What transformers derives from a config."""

    inv_freq: torch.Tensor | None
    attention: float | None
    rope: dict
    rotary: dict
    max_position_embeddings: int | None
    error: str | None = None  # building the rotary embedding failed


def _plain(value):
    """JSON-like copy (tuples → lists) of a config value, for comparison and the manifest."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return a == b


def text_config(config: dict):
    """transformers' text config for ``config``, its rope parameters standardised.

    Args:
        config: a ``config.json`` as a dict (deep-copied first: transformers edits rope dicts in place).

    Returns:
        The text config object (``get_text_config()`` of the family's config class); BadInput when transformers
        cannot read ``config``.

    Example:
        ``text_config(config).rope_parameters["rope_type"]``
    """
    from transformers import AutoConfig

    fields = copy.deepcopy({key: value for key, value in config.items() if key != "model_type"})
    try:
        text = AutoConfig.for_model(config.get("model_type"), **fields).get_text_config()
        text.standardize_rope_params()
    except Exception as err:  # noqa: BLE001 - transformers' own validation of the config's values, whatever it raises
        raise BadInput(f"config.json: transformers cannot read it ({one_line(err)})") from None
    return text


def _rotary_class(text):
    """The family's text rotary-embedding class (e.g. Qwen2VLRotaryEmbedding, not its vision one), or None."""
    try:
        module = importlib.import_module(type(text).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    classes = [getattr(module, key) for key in dir(module)
               if key.endswith("RotaryEmbedding") and "Vision" not in key and isinstance(getattr(module, key), type)]
    return classes[0] if len(classes) == 1 else None


def _rotary_attributes(module) -> dict:
    return {key: _plain(value) for key, value in vars(module).items()
            if not key.startswith("_") and key not in RESTATED_ATTRIBUTES
            and not key.endswith("_attention_scaling")  # gemma3's per layer type, compared like attention_scaling
            and isinstance(value, (bool, int, float, str, list, tuple))}


def read_back(config: dict, seq_len: int | None = None) -> ReadBack:
    """What transformers derives from ``config``.

    Args:
        config: a ``config.json`` as a dict.
        seq_len: for a dynamic scaling, the length to derive the frequencies at.

    Returns:
        A :class:`ReadBack`: frequencies (float32), attention scaling, standardised rope parameters, rotary-module
        attributes and max_position_embeddings, with ``error`` set when the rotary embedding does not build.

    Example:
        ``read_back(json.loads(Path("out/config.json").read_text())).inv_freq``
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = text_config(config)
    got = ReadBack(None, None, _plain(text.rope_parameters), {}, getattr(text, "max_position_embeddings", None))
    per_layer_type = EXTENDED_LAYER_TYPE in text.rope_parameters  # gemma3: one rotary embedding per layer type
    rope = text.rope_parameters[EXTENDED_LAYER_TYPE] if per_layer_type else text.rope_parameters
    rope_type = rope.get("rope_type", "default")
    rotary = _rotary_class(text)
    prefix = f"{EXTENDED_LAYER_TYPE}_" if per_layer_type else ""
    try:
        module = rotary(config=copy.deepcopy(text)) if rotary is not None else None
        if module is not None and hasattr(module, f"{prefix}inv_freq"):
            got.inv_freq = getattr(module, f"{prefix}inv_freq").clone()
            got.attention = float(getattr(module, f"{prefix}attention_scaling"))
            got.rotary = _rotary_attributes(module)
        elif per_layer_type:  # no full-attention layer among layer_types: the module builds none, ask the function
            init = ROPE_INIT_FUNCTIONS.get(rope_type) or rotary.compute_default_rope_parameters
            got.inv_freq, got.attention = init(copy.deepcopy(text), torch.device("cpu"),
                                               layer_type=EXTENDED_LAYER_TYPE)
            got.rotary = _rotary_attributes(module) if module is not None else {}
        elif rope_type == "default":
            got.inv_freq, got.attention = RopeGeometry(text.rope_parameters["rope_theta"], _dim(text), 1).inv_freq, 1.0
            got.inv_freq = got.inv_freq.to(torch.float32)
        else:
            got.inv_freq, got.attention = ROPE_INIT_FUNCTIONS[rope_type](copy.deepcopy(text), torch.device("cpu"))
        if rope_type == "dynamic" and seq_len is not None:
            got.inv_freq, got.attention = ROPE_INIT_FUNCTIONS["dynamic"](copy.deepcopy(text), torch.device("cpu"),
                                                                         seq_len=seq_len)
    except Exception as err:  # noqa: BLE001 -- whatever transformers raises, the config does not build
        got.error = f"transformers cannot build its rotary embedding ({one_line(err)})"
    return got


def derived_frequencies(config: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32) and attention scaling transformers computes from ``config``.

    Args:
        config: a ``config.json`` as a dict.
        seq_len: for a dynamic scaling, the length to derive them at.

    Returns:
        ``(inv_freq, attention_scaling)``; BadInput when the rotary embedding does not build.

    Example:
        ``inv_freq, attention = derived_frequencies(plan.config)``
    """
    got = read_back(config, seq_len)
    if got.error:
        raise BadInput(f"config.json: {got.error}")
    return got.inv_freq, got.attention


def _dim(text) -> int:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))


def _tiny(text):
    """A copy of ``text`` with the same rotary geometry (head size, rope parameters, length, layers) and little
    else: one attention head, the head size as width, at most two experts, a 32-token vocabulary."""
    tiny = copy.deepcopy(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = {"num_attention_heads": 1, "num_key_value_heads": 1, "hidden_size": head_dim, "vocab_size": 32,
             "intermediate_size": 2 * head_dim, "moe_intermediate_size": 2 * head_dim,
             "shared_expert_intermediate_size": 2 * head_dim, "pad_token_id": None, "bos_token_id": None,
             "eos_token_id": None}
    for key, value in sizes.items():
        if hasattr(tiny, key):
            setattr(tiny, key, value)
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
        if isinstance(getattr(tiny, key, None), int):
            setattr(tiny, key, min(getattr(tiny, key), 2))
    if hasattr(tiny, "quantization_config"):
        del tiny.quantization_config
    return tiny


def forward_error(config: dict) -> str | None:
    """Why a tiny random model of ``config``'s family (its rotary geometry, little else) fails one forward.

    Args:
        config: a ``config.json`` as a dict.

    Returns:
        The error in one line, or None when it runs and gives finite values.

    Example:
        ``forward_error(plan.config) is None``   # the extended config runs
    """
    from transformers import AutoModel

    try:
        tiny = _tiny(text_config(config))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModel.from_config(tiny, attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            hidden = model(input_ids=torch.arange(TINY_TOKENS).view(1, -1)).last_hidden_state
    except Exception as err:  # noqa: BLE001 -- any failure means the config does not run
        return one_line(err)
    return None if torch.isfinite(hidden).all() else "non-finite hidden states"


def _compared(rope: dict) -> dict:
    """The rope parameters that are compared: all but the legacy names transformers ignores."""
    return {key: value for key, value in rope.items() if key not in IGNORED_ROPE_KEYS}


def expectation(plan: ExtensionPlan) -> Expectation:
    """What transformers should derive from ``plan.config``.

    Args:
        plan: the extension plan.

    Returns:
        An :class:`Expectation`: the plan's frequencies, the source's standardised rope parameters with those the
        method sets replaced, the source's rotary attributes and the new length (``runs`` is left to
        :func:`check_plan`).

    Example:
        ``problems(plan.config, expectation(plan))``   # [] when transformers reads it as intended
    """
    source = read_back(plan.source)
    rotary = None if source.error else source.rotary
    if plan.geometry.per_layer_type is not None:  # the full-attention layers' parameters change, the others' not
        rope = {**source.rope, EXTENDED_LAYER_TYPE: _compared({**source.rope[EXTENDED_LAYER_TYPE],
                                                               **_plain(plan.rope_set)})}
    else:
        rope = _compared({**source.rope, **_plain(plan.rope_set)})
    text = plan.config.get("text_config") or plan.config
    return Expectation(plan.inv_freq.tolist(), plan.attention_factor,
                       plan.new_length if plan.method == "dynamic" else None, rope, rotary,
                       text["max_position_embeddings"],
                       {key: _plain(text[key]) for key in WRITTEN_FIELDS if key in text})


def mismatches(intended: torch.Tensor, attention: float, derived: torch.Tensor, derived_attention: float) -> list[str]:
    """Human-readable differences between intended and derived frequencies and attention scaling.

    Args:
        intended: the intended inverse frequencies.
        attention: the intended attention scaling.
        derived: the inverse frequencies transformers derives.
        derived_attention: the attention scaling it derives.

    Returns:
        One line per difference (empty when they agree).

    Example:
        ``mismatches(plan.inv_freq, plan.attention_factor, *derived_frequencies(plan.config))``
    """
    problems = []
    if derived.numel() != intended.numel():
        return [f"{derived.numel()} rotary pairs in the config, {intended.numel()} intended"]
    for pair, (want, got) in enumerate(zip(intended.tolist(), derived.double().tolist())):
        if want == 0:
            ok = abs(got) <= 1e-20
        else:
            ok = math.isclose(got, want, rel_tol=RELATIVE_TOLERANCE)
        if not ok:
            problems.append(f"pair {pair}: θ' {got:.6g} derived, {want:.6g} intended")
    if not math.isclose(derived_attention, attention, rel_tol=1e-6):
        problems.append(f"attention scaling {derived_attention:.6g} derived, {attention:.6g} intended")
    return problems


def dict_mismatches(what: str, intended: dict, got: dict, verb: str = "read", wanted: str = "intended") -> list[str]:
    """Per key of ``intended`` or ``got``: missing, extra or different (empty when they agree).

    Args:
        what: how each key is named in the lines ("rope parameter").
        intended: the wanted values.
        got: the values found.
        verb: how a found value is said to be got ("read", "derived", "found").
        wanted: how a wanted value is said to be wanted ("intended", "written").

    Returns:
        One line per differing key, in key order.

    Example::

        dict_mismatches("rope parameter", {"factor": 2.0}, {})   # ["rope parameter 'factor' missing (2.0 intended)"]
    """
    problems = []
    for key in sorted(intended.keys() | got.keys()):
        if key not in got:
            problems.append(f"{what} {key!r} missing ({intended[key]!r} {wanted})")
        elif key not in intended:
            problems.append(f"{what} {key!r}: {got[key]!r} {verb}, not {wanted}")
        elif not _same(intended[key], got[key]):
            problems.append(f"{what} {key!r}: {got[key]!r} {verb}, {intended[key]!r} {wanted}")
    return problems


def _written_mismatches(config: dict, written: dict) -> list[str]:
    text = config.get("text_config") or config
    problems = []
    for key, want in written.items():
        got = _plain(text.get(key))
        if isinstance(want, dict) and isinstance(got, dict):
            problems += dict_mismatches(f"config.json {key}", want, got, verb="found", wanted="written")
        elif not _same(want, got):
            problems.append(f"config.json {key}: {got!r} found, {want!r} written" if key in text
                            else f"config.json {key} missing ({want!r} written)")
    return problems


def problems(config: dict, want: Expectation) -> list[str]:
    """Every difference between what transformers derives from ``config`` and ``want``, the frequencies first.

    Args:
        config: a ``config.json`` as a dict.
        want: what it should give.

    Returns:
        One line per difference (empty when none).

    Example:
        ``problems(plan.config, expectation(plan))``   # []
    """
    got = read_back(config, want.dynamic_length)
    if got.error:
        return [got.error]
    found = mismatches(torch.tensor(want.inv_freq, dtype=torch.float64), want.attention_factor, got.inv_freq,
                       got.attention)
    if want.rope is not None:
        rope = _compared(got.rope)
        if EXTENDED_LAYER_TYPE in rope:
            rope[EXTENDED_LAYER_TYPE] = _compared(rope[EXTENDED_LAYER_TYPE])
        found += dict_mismatches("rope parameter", want.rope, rope)
    if want.rotary is not None:
        found += dict_mismatches("rotary embedding's", want.rotary, got.rotary, verb="derived")
    if want.max_position_embeddings is not None and got.max_position_embeddings != want.max_position_embeddings:
        found.append(f"max_position_embeddings {got.max_position_embeddings} read, "
                     f"{want.max_position_embeddings} intended")
    if want.written is not None:
        found += _written_mismatches(config, want.written)
    if want.runs and not found:
        found += _forward_problems(config)
    return found


def _forward_problems(config: dict) -> list[str]:
    error = forward_error(config)
    return [f"a tiny model of the family fails a forward with it: {error}"] if error else []


def summary(found: list[str], shown: int = 3) -> str:
    """The first differences of ``found`` in one line.

    Args:
        found: lines from :func:`problems`.
        shown: how many are shown; the rest are counted.

    Returns:
        ``"a; b; c; and 2 more"``.

    Example:
        ``summary(["a", "b", "c", "d"], shown=2)``   # "a; b; and 2 more"
    """
    return "; ".join(found[:shown]) + (f"; and {len(found) - shown} more" if len(found) > shown else "")


def check_plan(plan: ExtensionPlan) -> Expectation:
    """BadInput unless transformers, reading ``plan.config``, gives what ``plan`` intends.

    Args:
        plan: the extension plan.

    Returns:
        The expectation (for the manifest), ``runs`` set by a forward of a tiny model of the family.

    Example:
        ``recorded = check_plan(plan_extension(config, "yarn", factor=4.0)).to_json()``
    """
    want = expectation(plan)
    found = problems(plan.config, want)
    if not found:
        found = _forward_problems(plan.config)
        want.runs = not found
    if found and want.runs is False and forward_error(plan.source) is not None:
        log.warning("a tiny model of the source's family does not run here either; the forward check is skipped")
        found = []
    if found:
        raise BadInput(f"--rope {plan.method}: the written config would not give the intended rotary embedding: "
                       f"{summary(found)}")
    return want
