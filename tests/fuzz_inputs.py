"""Seeded malformed inputs for the ``surgery`` command line, and the harness that runs and judges them.

The contract for bad input: exit code 2 and exactly one line on stderr, starting ``surgery: error:``, that names the
file, tensor, key or option and the reason; no traceback; nothing left behind (no output directory, no hidden
staging directory ``.<name>.partial-*`` or ``.<name>.replaced-*`` beside it). Exit 1 ("internal error") on bad
input is a bug, and so is a hang. Exit 0 is acceptable only where the mutated input is in fact valid, and then the
output must be complete (config.json, and every weight file present with finite floating-point values).

Families, each generated from its own fixed seed (``random.Random(SEEDS[family])``) from tiny real checkpoints:

- ``safetensors``: the header JSON of a tiny llama's model.safetensors (dtypes, shapes, offsets, entry and header
  types, the length prefix, truncation, huge numbers, nesting), as a lone file or as a model directory's weights
  → ``inspect``, ``convert``;
- ``index``: model.safetensors.index.json of a sharded tiny llama (weight_map values, their types and paths outside
  the model, nesting, missing or corrupt shards) → ``inspect``, ``convert``, ``push --dry-run``;
- ``config``: config.json (wrong types and ranges of the fields the commands read, nesting, non-objects, broken
  JSON) → ``inspect``, ``convert``, ``merge --method linear``, ``quantize``, ``extend --rope linear --factor 2``;
- ``gguf``: a Q8_0 GGUF written by ``surgery quantize --format gguf``, re-serialised with mutated metadata values
  and types, tensor offsets, dims and types, header counts, or truncated → ``inspect``, ``convert``;
- ``recipe``: merge recipes (our YAML, mergekit configs, a surgery.json manifest) with wrong field types, nesting,
  anchors and aliases → ``merge --recipe F -o OUT`` and the same with ``--dry-run``;
- ``pipeline``: pipeline YAML (step shapes, option keys and value types, aliases) → ``run F --dry-run``, ``run F``;
- ``multi``: mergekit-multi files (names, references, cycles, documents that are no configs, seeded junk at random
  keys of either document, YAML bombs) → ``merge-multi F -I DIR -o OUT``;
- ``moe``: mergekit-moe YAML (field types and ranges, experts and their prompts, anchors, nesting) → ``moe F -o OUT``;
- ``mxfp4``: a gpt-oss MXFP4 checkpoint whose ``_blocks`` / ``_scales`` pairs (missing, shapes, dtypes, NaN and
  overflowing E8M0 scales) or quantization_config are wrong → ``inspect``, ``quantize``, ``merge`` with a bf16 one;
- ``quantized``: a tiny llama as compressed-tensors (asymmetric int4), FP8_DYNAMIC, NVFP4A16, GPTQ, AutoAWQ GEMM and
  DeepSeek-V3 FP8, two modules' stored tensors (missing, a row short, dtypes, NaN scales, another module's, random
  bits) or the quantization_config wrong → ``convert``, which reads every tensor decoded;
- ``lora``: a PEFT LoRA adapter of the tiny llama applied as ``MODEL+ADAPTER``, its adapter_config.json (peft_type,
  ranks, alphas and their patterns, DoRA, biases, broken JSON) or its factors (missing, shapes, NaN, overflowing,
  naming modules the model lacks) or files (truncated, missing) wrong → ``inspect``, ``convert``, ``merge-lora``
  (with the pristine adapter).

Each mutation says whether its input is bad (``valid=False``: exit 0 is a failure), may be valid (``None``: exit 0
with a complete output, or a clean exit 2, both pass) or is a valid control (``True``: must exit 0 complete).
``lenient`` names commands that cannot see a mutation's damage, for which exit 0 is acceptable anyway: a pipeline
dry run (option values only the step's command checks), ``push --dry-run`` (shard contents), ``inspect`` of a GGUF
(its tokenizer). An exit 2 must name one of the case's ``names``: the mutated file or its directory, the key, the
option or the value.

Cases run in this process through ``conftest.run_surgery`` under a watchdog: a SIGALRM timer raises in the main
thread past ``LIMIT_SECONDS`` or ``MEMORY_GROWTH`` bytes of resident growth ("hang"). The YAML bombs (billion
laughs) run in subprocesses, in the background, under an address-space limit and a CPU-time limit, since C code
(``repr``, comparisons) can expand them without ever returning to the interpreter. Python warnings are ignored, as
pytest captures them anyway.

Results: one verdict per case, ``exit 2 clean``, ``exit 0 complete``, ``exit 1``, ``hang`` or ``other`` (exit 2
with a traceback, several lines, no ``surgery: error:`` or not naming the input; leftovers; exit 0 on bad input or
with an incomplete output; any other exit code)::

    python tests/fuzz_inputs.py --table          # run every family (under a minute), print table and failure kinds
    python tests/fuzz_inputs.py --table --from DIR   # the same from the JSON results a pytest run wrote in DIR
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
SEEDS = {"safetensors": 1101, "index": 2202, "config": 3303, "gguf": 4404, "recipe": 5505, "pipeline": 6606,
         "moe": 7707, "mxfp4": 8808, "quantized": 9909, "lora": 1010, "multi": 1111}
LIMIT_SECONDS = 2.0  # a valid case takes 0.5 s at most on these loaded cores
MEMORY_GROWTH = 2 << 30
ISOLATED_ADDRESS_SPACE = 4 << 30
INDEX = "model.safetensors.index.json"
DEEP = 5000  # nesting depth of the deep-nesting mutations (past Python's recursion limit)

CLEAN2, COMPLETE0, EXIT1, HANG, OTHER = "exit 2 clean", "exit 0 complete", "exit 1", "hang", "other"
VERDICTS = (CLEAN2, COMPLETE0, EXIT1, HANG, OTHER)
PASSING = {CLEAN2, COMPLETE0}


# ---- cases and outcomes

@dataclass
class Mutation:
    label: str
    valid: bool | None = False  # False: bad input; None: may be valid; True: a valid control
    lenient: frozenset = frozenset()  # commands for which exit 0 is acceptable even so
    names: tuple = ()  # extra words any of which the error line may name instead of the file
    isolated: bool = False  # run in a memory-limited subprocess (YAML bombs)


@dataclass
class Case:
    id: str
    family: str
    mutation: str
    command: str
    argv: list
    workdir: str
    valid: bool | None
    names: list  # the error line must contain one of these
    output: str | None = None  # the directory the command would write
    writes: bool = False  # False: OUTPUT must never appear (dry runs)
    outputs: list = field(default_factory=list)  # pipelines: every step's output
    isolated: bool = False


@dataclass
class Outcome:
    code: int | None  # None: stopped by the watchdog
    stderr: str
    seconds: float
    verdict: str = ""
    reason: str = ""

    @property
    def error_line(self) -> str:
        """The last error line on stderr (earlier lines may be logs), else the first line."""
        lines = self.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith(("surgery: error:", "surgery: internal error:"))]
        return errors[-1] if errors else lines[0] if lines else ""


def make_case(family: str, number: int, mutation: Mutation, command: str, argv: list, workdir: Path,
              names: tuple, **extra) -> Case:
    valid = None if command in mutation.lenient and mutation.valid is False else mutation.valid
    return Case(f"{family}-{number:03d}", family, mutation.label, command, [str(a) for a in argv], str(workdir),
                valid, [str(n) for n in (*names, *mutation.names)], isolated=mutation.isolated, **extra)


def short(value: Any, width: int = 48) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- files

def link_tree(source: Path, target: Path, skip: set = frozenset()) -> Path:
    """``target`` with hard links to ``source``'s files (not those in ``skip``): mutated files are written fresh,
    never through a link, so the pristine sources stay intact."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name not in skip:
            try:
                os.link(file, target / file.name)
            except OSError:
                shutil.copy2(file, target / file.name)
    return target


def write_fresh(path: Path, content: bytes | str) -> None:
    """Replace ``path`` (possibly a hard link to a pristine source) with a new file holding ``content``."""
    path.unlink(missing_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def split_safetensors(content: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8:8 + length]), content[8 + length:]


def pack_safetensors(header: Any, data: bytes, text: str | None = None) -> bytes:
    encoded = (json.dumps(header) if text is None else text).encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(encoded)) + encoded + data


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


# ---- safetensors headers

def safetensors_mutations(header: dict, data: bytes, rng: random.Random) -> Iterator[tuple[Mutation, bytes]]:
    names = [name for name in header if name != "__metadata__"]
    pick = lambda: rng.choice(names)  # noqa: E731

    def entry(field_name: str, make: Callable[[dict], Any], valid: bool | None = False):
        name = pick()
        changed = copy.deepcopy(header)
        value = make(changed[name])
        changed[name][field_name] = value
        return Mutation(f"header[{name}].{field_name} = {short(value)}", valid), pack_safetensors(changed, data)

    def numel(e: dict) -> int:
        count = 1
        for size in e["shape"]:
            count *= size
        return count

    for value in ("F99", "", 5, None, ["F32"]):
        yield entry("dtype", lambda e, v=value: v)
    yield entry("dtype", lambda e: "I32", valid=None)  # same width: a valid file of integers
    for make in (lambda e: [], lambda e: [-1], lambda e: [str(numel(e))], lambda e: [numel(e) + 0.5], lambda e: None,
                 lambda e: [2 ** 64], lambda e: [0], lambda e: [1e400]):
        yield entry("shape", make)
    yield entry("shape", lambda e: list(reversed(e["shape"])), valid=None)
    yield entry("shape", lambda e: e["shape"] + [1], valid=None)
    for make in (lambda e: list(reversed(e["data_offsets"])),
                 lambda e: [e["data_offsets"][0], e["data_offsets"][1] + 1],
                 lambda e: [offset + 4 for offset in e["data_offsets"]], lambda e: [-1, e["data_offsets"][1]],
                 lambda e: [0, 2 ** 64], lambda e: [2 ** 63, 2 ** 63 + 16], lambda e: None,
                 lambda e: [str(v) for v in e["data_offsets"]], lambda e: e["data_offsets"][:1]):
        yield entry("data_offsets", make)
    yield entry("extra", lambda e: 1, valid=None)
    for value in (5, "x", [], None):
        name = pick()
        yield Mutation(f"header[{name}] = {short(value)}"), pack_safetensors({**header, name: value}, data)
    for value in (5, {"format": 5}, [1]):
        yield Mutation(f"__metadata__ = {short(value)}"), pack_safetensors({**header, "__metadata__": value}, data)
    yield from safetensors_layout_mutations(header, data, rng)


def safetensors_layout_mutations(header: dict, data: bytes, rng: random.Random) -> Iterator[tuple[Mutation, bytes]]:
    good = pack_safetensors(header, data)
    length = len(json.dumps(header).encode())
    for value in (5, [], None):
        yield Mutation(f"header = {short(value)}"), pack_safetensors(value, data)
    yield Mutation("header = {} with the data kept"), pack_safetensors({}, data)
    yield Mutation("header = {} and no data", valid=None), pack_safetensors({}, b"")
    yield Mutation(f"header nested {DEEP} deep"), pack_safetensors(None, data, text=deep_json())
    yield Mutation(f"dtype nested {DEEP} deep"), pack_safetensors(
        None, data, text=json.dumps(header).replace('"F32"', deep_json(), 1))
    for value in (length + 1, 0, 2 ** 64 - 1, len(good)):
        yield Mutation(f"header length prefix = {value}"), struct.pack("<Q", value) + good[8:]
    for cut in (rng.randrange(1, 8), rng.randrange(9, 8 + length), rng.randrange(8 + length, len(good))):
        yield Mutation(f"truncated to {cut} of {len(good)} bytes"), good[:cut]
    yield Mutation("8 junk bytes after the data"), good + b"\x00" * 8
    yield Mutation("empty file"), b""
    text = json.dumps(header)
    yield Mutation("invalid UTF-8 in a tensor name"), pack_safetensors(
        None, data, text=text.replace("model.", "model\udcff", 1))
    yield Mutation("NaN in a shape"), pack_safetensors(None, data, text=re.sub(r'"shape": \[\d+', '"shape": [NaN',
                                                                                text, count=1))
    yield Mutation("header padded with trailing spaces", valid=True), pack_safetensors(None, data, text=text + " " * 8)
    yield Mutation("unchanged (re-serialised)", valid=True), good
    first = next(name for name in header if name != "__metadata__")
    duplicate = text.replace("{", "{" + json.dumps(first) + ": " + json.dumps(header[first]) + ", ", 1)
    yield Mutation("a tensor listed twice (same entry)", valid=None), pack_safetensors(None, data, text=duplicate)


def safetensors_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    header, data = split_safetensors((sources.llama / "model.safetensors").read_bytes())
    cases = []
    for number, (mutation, content) in enumerate(safetensors_mutations(header, data, rng)):
        workdir = root / f"case-{number:03d}"
        model = link_tree(sources.llama, workdir / "model", skip={"model.safetensors"})
        as_file = rng.random() < 0.5
        target = model / ("weights.safetensors" if as_file else "model.safetensors")
        write_fresh(target, content)
        mutation.label += " (lone file)" if as_file else " (model directory)"
        source = target if as_file else model
        for command in ("inspect", "convert"):
            output = workdir / f"out-{command}"
            argv = ["inspect", source] if command == "inspect" else ["convert", source, "-o", output]
            cases.append(make_case("safetensors", len(cases), mutation, command, argv, workdir, (target.name, model),
                                   output=None if command == "inspect" else str(output), writes=True))
    return cases


# ---- shard index

IndexMutator = Callable[[dict, Path, random.Random], tuple[Mutation, Any]]
KEEP = object()  # the index text is left as it is


def index_value_mutations() -> Iterator[IndexMutator]:
    """Set the weight_map value of one tensor."""
    def outside(model: Path, shard: str) -> str:
        (model.parent / "outside").mkdir(exist_ok=True)
        shutil.copy(model / shard, model.parent / "outside" / "x.safetensors")
        return "../outside/x.safetensors"

    def absolute(model: Path, shard: str) -> str:
        (model.parent / "elsewhere").mkdir(exist_ok=True)
        shutil.copy(model / shard, model.parent / "elsewhere" / shard)
        return str(model.parent / "elsewhere" / shard)

    def subfolder(model: Path, shard: str) -> str:
        (model / "sub").mkdir(exist_ok=True)
        shutil.copy(model / shard, model / "sub" / shard)
        return f"sub/{shard}"

    def other_shard(model: Path, shard: str) -> str:
        return next(file.name for file in sorted(model.glob("model-*.safetensors")) if file.name != shard)

    content = frozenset({"push --dry-run"})  # bad only in the shards' content, which push --dry-run does not read
    makers = [(None, False, ()), (5, False, ()),
              (lambda model, shard: [shard], False, ()), ({"a": 1}, False, ()), ("", False, ()), (".", False, ()),
              ("missing.safetensors", False, ()), ("config.json", False, content), ("a\x00b.safetensors", False, ()),
              ("x" * 300 + ".safetensors", False, ()), (outside, False, ()), (absolute, False, ()),
              (other_shard, False, content), (subfolder, None, ())]
    for maker, valid, lenient in makers:
        def mutate(index, model, rng, maker=maker, valid=valid, lenient=lenient):
            name = rng.choice(sorted(index["weight_map"]))
            shard = index["weight_map"][name]
            value = maker(model, shard) if callable(maker) else maker
            changed = copy.deepcopy(index)
            changed["weight_map"][name] = value
            return Mutation(f"weight_map[{name}] = {short(value)}", valid, frozenset(lenient)), changed
        yield mutate


def index_structure_mutations() -> Iterator[IndexMutator]:
    for value, valid in ((None, False), (5, False), ([], False), ({}, None),
                         ([["model.norm.weight", "model-00001-of-00012.safetensors"]], False)):
        yield lambda index, model, rng, value=value, valid=valid: (
            Mutation(f"weight_map = {short(value)}", valid), {**index, "weight_map": value})
    yield lambda index, model, rng: (Mutation("no weight_map key"), {"metadata": index["metadata"]})
    for value in (5, {"total_size": "abc"}, {"total_size": 2 ** 64}):
        yield lambda index, model, rng, value=value: (
            Mutation(f"metadata = {short(value)}", valid=None), {**index, "metadata": value})
    for value in ([], None):
        yield lambda index, model, rng, value=value: (Mutation(f"index = {short(value)}"), value)

    def renamed(index, model, rng):
        name = rng.choice(sorted(index["weight_map"]))
        changed = copy.deepcopy(index)
        changed["weight_map"][name + ".ghost"] = changed["weight_map"][name]
        return Mutation(f"weight_map lists {name}.ghost, which its shard lacks",
                        lenient=frozenset({"push --dry-run"})), changed

    def dropped(index, model, rng):
        name = rng.choice(sorted(index["weight_map"]))
        changed = copy.deepcopy(index)
        del changed["weight_map"][name]
        return Mutation(f"weight_map without {name}", valid=None), changed

    yield renamed
    yield dropped
    yield lambda index, model, rng: (Mutation("unchanged (re-serialised)", valid=True), index)
    yield lambda index, model, rng: (Mutation("weight_map in reverse order", valid=True), {
        **index, "weight_map": dict(reversed(index["weight_map"].items()))})


def index_text_mutations() -> Iterator[IndexMutator]:
    def text(label: str, make: Callable[[str], str], valid: bool | None = False) -> IndexMutator:
        return lambda index, model, rng: (Mutation(label, valid), make(json.dumps(index, indent=2)))

    yield text(f"metadata nested {DEEP} deep", valid=None,
               make=lambda t: t.replace('"metadata": {', f'"metadata": {{"x": {deep_json()},', 1))
    yield text(f"a weight_map value nested {DEEP} deep",
               lambda t: re.sub(r'("lm_head.weight": )"[^"]*"', lambda m: m[1] + deep_json(), t, count=1))
    yield text("truncated in the middle", lambda t: t[: len(t) // 2])
    yield text("invalid UTF-8", lambda t: t.replace("model", "mod\udcffel", 1))
    yield text("empty file", lambda t: "")
    yield text("NaN as a shard name", lambda t: re.sub(r'("lm_head.weight": )"[^"]*"', r"\1NaN", t, count=1))
    yield text("lm_head.weight listed twice, the last one right", lambda t: t.replace(
        '"weight_map": {', '"weight_map": {"lm_head.weight": "missing.safetensors", ', 1), valid=None)


def index_file_mutations() -> Iterator[IndexMutator]:
    """Leave the index alone and damage the shards it names (push --dry-run does not read shard contents)."""
    lenient = frozenset({"push --dry-run"})

    def deleted(index, model, rng):
        shard = rng.choice(sorted(set(index["weight_map"].values())))
        (model / shard).unlink()
        return Mutation(f"{shard} deleted"), KEEP

    def truncated(index, model, rng):
        shard = rng.choice(sorted(set(index["weight_map"].values())))
        content = (model / shard).read_bytes()
        write_fresh(model / shard, content[: rng.randrange(len(content))])
        return Mutation(f"{shard} truncated", lenient=lenient), KEEP

    def swapped(index, model, rng):
        first, second = rng.sample(sorted(set(index["weight_map"].values())), 2)
        (model / first).rename(model / "swap")
        (model / second).rename(model / first)
        (model / "swap").rename(model / second)
        return Mutation(f"{first} and {second} swapped", lenient=lenient), KEEP

    def replaced(index, model, rng):
        shard = rng.choice(sorted(set(index["weight_map"].values())))
        write_fresh(model / shard, json.dumps(index))
        return Mutation(f"{shard} holds JSON", lenient=lenient), KEEP

    def directory(index, model, rng):
        shard = rng.choice(sorted(set(index["weight_map"].values())))
        (model / shard).unlink()
        (model / shard).mkdir()
        return Mutation(f"{shard} is a directory"), KEEP

    yield from (deleted, truncated, swapped, replaced, directory)


def index_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    index = json.loads((sources.sharded / INDEX).read_text())
    mutators = [*index_value_mutations(), *index_structure_mutations(), *index_text_mutations(),
                *index_file_mutations()]
    cases = []
    for number, mutator in enumerate(mutators):
        workdir = root / f"case-{number:03d}"
        model = link_tree(sources.sharded, workdir / "model", skip={INDEX})
        mutation, content = mutator(index, model, rng)
        if content is KEEP:
            shutil.copy(sources.sharded / INDEX, model / INDEX)
        else:
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            write_fresh(model / INDEX, text.encode("utf-8", "surrogateescape"))
        for command in ("inspect", "convert", "push --dry-run"):
            output = workdir / "out-convert"
            argv = {"inspect": ["inspect", model], "convert": ["convert", model, "-o", output],
                    "push --dry-run": ["push", model, "me/fuzz", "--dry-run"]}[command]
            cases.append(make_case("index", len(cases), mutation, command, argv, workdir, (".safetensors", model),
                                   output=str(output) if command == "convert" else None, writes=True))
    return cases


# ---- config.json

CONFIG_VALUES: dict[str, list] = {  # field → values that make the config bad
    "tie_word_embeddings": ["yes"],
    "hidden_size": [1.5, "64", 2 ** 63],
    "num_attention_heads": [0, 3, "4"],
    "num_key_value_heads": [0, 3, 8],
    "num_hidden_layers": [-1, 1.5, 2 ** 63],
    "intermediate_size": [0, "128"],
    "vocab_size": [0, 2 ** 63],
    "max_position_embeddings": [-1, "256", 2 ** 63],
    "model_type": [["llama"], 5, None],
    "dtype": ["float128", 5],
    "architectures": [[None], "LlamaForCausalLM", [5]],
    "rope_parameters": [5, "linear", {"rope_type": "default", "rope_theta": "big"},
                        {"rope_type": "default", "rope_theta": -1}, {"rope_type": "bogus", "rope_theta": 10000.0},
                        {"rope_type": "linear", "rope_theta": 10000.0, "factor": "two"}],
    "rms_norm_eps": ["x"],
    "head_dim": [0, 7],
}
CONFIG_MAYBE = {"tie_word_embeddings": [True], "model_type": ["nonexistent_family"]}  # odd but perhaps valid
CONFIG_WRITERS = ("merge", "quantize", "extend")  # each mutation runs inspect, convert and one of these


def config_mutations(config: dict, rng: random.Random) -> Iterator[tuple[Mutation, str]]:
    def with_value(key: str, value: Any, valid: bool | None = False) -> tuple[Mutation, str]:
        return Mutation(f"{key} = {short(value)}", valid, names=(key,)), json.dumps({**config, key: value}, indent=2)

    for key, values in CONFIG_VALUES.items():
        for value in values:
            yield with_value(key, value)
    for key, values in CONFIG_MAYBE.items():
        for value in values:
            yield with_value(key, value, valid=None)
    legacy = {key: value for key, value in config.items() if key != "dtype"}
    yield Mutation("torch_dtype (legacy spelling) = 'float128'", names=("torch_dtype",)), json.dumps(
        {**legacy, "torch_dtype": "float128"})
    yield Mutation("rope_scaling (legacy spelling, beside rope_parameters) = 5", valid=None, names=("rope_scaling",)), \
        json.dumps({**config, "rope_scaling": 5})
    key = rng.choice(sorted(CONFIG_VALUES))
    yield Mutation(f"{key} nested {DEEP} deep", names=(key,)), json.dumps(config).replace(
        f'"{key}": ', f'"{key}": {deep_json()}, "_was": ', 1)
    yield Mutation(f"config nested {DEEP} deep"), deep_json()
    for value in ([], 5, None):
        yield Mutation(f"config = {short(value)}"), json.dumps(value)
    yield Mutation("hidden_size = NaN", names=("hidden_size",)), json.dumps({**config, "hidden_size": float("nan")})
    yield Mutation("vocab_size = Infinity", names=("vocab_size",)), json.dumps({**config, "vocab_size": float("inf")})
    text = json.dumps(config, indent=2)
    yield Mutation("truncated in the middle"), text[: len(text) // 2]
    yield Mutation("invalid UTF-8"), text.replace("llama", "lla\udcffma", 1)
    yield Mutation("empty file"), ""
    yield Mutation("an unknown extra key", valid=True), json.dumps({**config, "fuzz_note": [1, {"a": None}]})
    yield Mutation("unchanged (re-serialised)", valid=True), json.dumps(config)


def config_argv(command: str, source: Path, other: Path, output: Path) -> list:
    return {"inspect": ["inspect", source],
            "convert": ["convert", source, "-o", output],
            "merge": ["merge", "--method", "linear", source, other, "-o", output],
            "quantize": ["quantize", source, "-o", output, "--group-size", "32"],
            "extend": ["extend", source, "--rope", "linear", "--factor", "2", "-o", output]}[command]


def config_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    config = json.loads((sources.llama / "config.json").read_text())
    cases = []
    for number, (mutation, text) in enumerate(config_mutations(config, rng)):
        workdir = root / f"case-{number:03d}"
        model = link_tree(sources.llama, workdir / "model", skip={"config.json"})
        write_fresh(model / "config.json", text.encode("utf-8", "surrogateescape"))
        for command in ("inspect", "convert", rng.choice(CONFIG_WRITERS)):
            output = workdir / f"out-{command}"
            argv = config_argv(command, model, sources.llama, output)
            cases.append(make_case("config", len(cases), mutation, command, argv, workdir, ("config.json", model),
                                   output=None if command == "inspect" else str(output), writes=True))
    return cases


# ---- GGUF

STRING, ARRAY, UINT32, UINT64, INT32, FLOAT32, BOOL = 8, 9, 4, 10, 5, 6, 7
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
ALIGNMENT = 32
F32_TENSOR, F64 = 0, 28  # ggml tensor types


@dataclass
class GGUFModel:
    """A GGUF file as data: metadata (key, value type, value, array item type) and tensors (name, dims in GGUF
    order, ggml type, raw bytes), serialised by :func:`serialize_gguf` with full control over every field."""

    metadata: list
    tensors: list


def read_gguf_model(path: Path) -> GGUFModel:
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = []
    for item in reader.fields.values():
        if item.name.startswith("GGUF."):
            continue
        kind = int(item.types[0])
        metadata.append([item.name, kind, item.contents(), int(item.types[-1]) if kind == ARRAY else None])
    tensors = [[t.name, [int(d) for d in t.field.parts[3]], int(t.tensor_type), t.data.tobytes()]
               for t in reader.tensors]
    return GGUFModel(metadata, tensors)


def encode_gguf_string(text: str | bytes) -> bytes:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def encode_gguf_value(kind: int, value: Any, item_kind: int | None = None) -> bytes:
    if kind == STRING:
        return encode_gguf_string(value)
    if kind == ARRAY:
        return struct.pack("<IQ", item_kind, len(value)) + b"".join(encode_gguf_value(item_kind, v) for v in value)
    return struct.pack("<" + SCALAR_FORMATS[kind], value)


def serialize_gguf(model: GGUFModel) -> tuple[bytearray, dict]:
    """The file's bytes, and where its fields are: {"tensor_offset": {name: pos}, "tensor_type", "tensor_dims",
    "n_dims", "value": {key: pos}, "data_start"}."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(model.tensors), len(model.metadata)))
    layout: dict = {"value": {}, "key_length": {}, "n_dims": {}, "tensor_dims": {}, "tensor_type": {},
                    "tensor_offset": {}}
    for key, kind, value, item_kind in model.metadata:
        layout["key_length"][key] = len(out)
        out += encode_gguf_string(key) + struct.pack("<I", kind)
        layout["value"][key] = len(out)
        out += encode_gguf_value(kind, value, item_kind)
    offset = 0
    for name, dims, kind, data in model.tensors:
        out += encode_gguf_string(name)
        layout["n_dims"][name] = len(out)
        out += struct.pack("<I", len(dims))
        layout["tensor_dims"][name] = len(out)
        out += struct.pack(f"<{len(dims)}Q", *dims)
        layout["tensor_type"][name] = len(out)
        out += struct.pack("<I", kind)
        layout["tensor_offset"][name] = len(out)
        out += struct.pack("<Q", offset)
        offset += -(-len(data) // ALIGNMENT) * ALIGNMENT
    out += b"\x00" * (-len(out) % ALIGNMENT)
    layout["data_start"] = len(out)
    for name, dims, kind, data in model.tensors:
        out += data + b"\x00" * (-len(data) % ALIGNMENT)
    return out, layout


GGUF_VALUES = [  # key, value type, value, valid
    ("llama.attention.head_count_kv", UINT32, 3, False), ("llama.attention.head_count_kv", UINT32, 0, False),
    ("llama.attention.head_count", UINT32, 0, False), ("llama.attention.head_count", UINT32, 3, False),
    ("llama.attention.head_count", STRING, "4", False), ("llama.attention.head_count", FLOAT32, 4.0, False),
    ("llama.attention.head_count", INT32, 4, None), ("llama.block_count", UINT32, 0, False),
    ("llama.block_count", UINT32, 2 ** 32 - 1, False), ("llama.embedding_length", UINT32, 48, False),
    ("llama.context_length", UINT32, 0, False), ("llama.rope.freq_base", FLOAT32, float("nan"), False),
    ("llama.rope.freq_base", STRING, "big", False),
    ("llama.attention.layer_norm_rms_epsilon", FLOAT32, float("nan"), False),
    ("general.architecture", STRING, "", False), ("general.architecture", UINT32, 5, False),
    ("general.alignment", UINT32, 0, False), ("general.alignment", UINT32, 3, False),
    ("tokenizer.ggml.model", STRING, "bogus", False), ("tokenizer.ggml.bos_token_id", UINT32, 10 ** 6, False),
    ("general.name", STRING, "n\udcffame", False), ("fuzz.extra", STRING, "an unknown key", True),
]
GGUF_REMOVED = [("llama.attention.head_count", False), ("tokenizer.ggml.tokens", False)]


TOKENIZER_ONLY = frozenset({"inspect"})  # inspect reports no tokenizer: damage there is convert's to find


def gguf_metadata_mutations(model: GGUFModel) -> Iterator[tuple[Mutation, bytes]]:
    def lenient(key: str) -> frozenset:
        return TOKENIZER_ONLY if key.startswith("tokenizer.") else frozenset()

    for key, kind, value, valid in GGUF_VALUES:
        changed = copy.deepcopy(model)
        entries = [entry for entry in changed.metadata if entry[0] != key]
        position = next((i for i, entry in enumerate(changed.metadata) if entry[0] == key), len(entries))
        entries.insert(position, [key, kind, value, None])
        changed.metadata = entries
        yield Mutation(f"{key} = {short(value)} ({GGUF_TYPE_NAMES[kind]})", valid, lenient(key), names=(key,)), \
            bytes(serialize_gguf(changed)[0])
    for key, valid in GGUF_REMOVED:
        changed = copy.deepcopy(model)
        changed.metadata = [entry for entry in changed.metadata if entry[0] != key]
        yield Mutation(f"{key} removed", valid, lenient(key), names=(key,)), bytes(serialize_gguf(changed)[0])
    changed = copy.deepcopy(model)
    tokens = next(entry for entry in changed.metadata if entry[0] == "tokenizer.ggml.tokens")
    tokens[3], tokens[2] = INT32, list(range(len(tokens[2])))
    yield Mutation("tokenizer.ggml.tokens is an array of INT32", lenient=TOKENIZER_ONLY, names=("tokenizer",)), \
        bytes(serialize_gguf(changed)[0])
    changed = copy.deepcopy(model)
    changed.metadata.append(copy.deepcopy(changed.metadata[2]))
    yield Mutation(f"{changed.metadata[2][0]} listed twice"), bytes(serialize_gguf(changed)[0])
    yield Mutation("unchanged (re-serialised)", valid=True), bytes(serialize_gguf(model)[0])


GGUF_TYPE_NAMES = {UINT32: "UINT32", UINT64: "UINT64", INT32: "INT32", FLOAT32: "FLOAT32", BOOL: "BOOL",
                   STRING: "STRING"}


def patched(content: bytearray, position: int, fmt: str, value: Any) -> bytes:
    copy_ = bytearray(content)
    struct.pack_into(fmt, copy_, position, value)
    return bytes(copy_)


def gguf_layout_mutations(model: GGUFModel, rng: random.Random) -> Iterator[tuple[Mutation, bytes]]:
    content, layout = serialize_gguf(model)
    names = [tensor[0] for tensor in model.tensors]
    last = names[-1]
    name = rng.choice(names[:-1])
    for value in (2 ** 64 - 1, 1, len(content)):
        yield Mutation(f"offset of {name} = {value}"), patched(content, layout["tensor_offset"][name], "<Q", value)
    end = struct.unpack_from("<Q", content, layout["tensor_offset"][last])[0]
    yield Mutation(f"offset of {last} (the last) + 32"), patched(content, layout["tensor_offset"][last], "<Q", end + 32)
    for value in (0, 5):
        yield Mutation(f"n_dims of {name} = {value}"), patched(content, layout["n_dims"][name], "<I", value)
    for value in (0, 2 ** 63, 3):
        yield Mutation(f"first dim of {name} = {value}"), patched(content, layout["tensor_dims"][name], "<Q", value)
    wide = next(tensor for tensor in model.tensors if len(tensor[1]) == 2 and tensor[1][0] != tensor[1][1])
    swapped = bytearray(content)
    struct.pack_into("<QQ", swapped, layout["tensor_dims"][wide[0]], wide[1][1], wide[1][0])
    yield Mutation(f"dims of {wide[0]} swapped", valid=None), bytes(swapped)
    yield Mutation(f"ggml type of {name} = 999"), patched(content, layout["tensor_type"][name], "<I", 999)
    larger = F64 if model.tensors[-1][2] == F32_TENSOR else F32_TENSOR
    yield Mutation(f"ggml type of {last} (the last) = {larger} (larger than its data)"), patched(
        content, layout["tensor_type"][last], "<I", larger)
    yield from gguf_header_mutations(content, layout, rng)


def gguf_header_mutations(content: bytearray, layout: dict, rng: random.Random) -> Iterator[tuple[Mutation, bytes]]:
    yield Mutation("magic GGUX"), b"GGUX" + bytes(content[4:])
    for version in (1, 4):
        yield Mutation(f"version {version}"), patched(content, 4, "<I", version)
    tensors, kvs = struct.unpack_from("<QQ", content, 8)
    for label, position, value in (("tensor_count", 8, tensors + 1), ("tensor_count", 8, tensors - 1),
                                   ("tensor_count", 8, 2 ** 64 - 1), ("kv_count", 16, kvs + 1),
                                   ("kv_count", 16, 2 ** 64 - 1)):
        yield Mutation(f"{label} = {value}"), patched(content, position, "<Q", value)
    key = rng.choice(sorted(layout["key_length"]))
    yield Mutation(f"length of key {key} = 2^64-1"), patched(content, layout["key_length"][key], "<Q", 2 ** 64 - 1)
    tokens = layout["value"]["tokenizer.ggml.tokens"]
    yield Mutation("tokenizer.ggml.tokens array length = 2^40"), patched(content, tokens + 4, "<Q", 2 ** 40)
    data_start = layout["data_start"]
    for cut in (3, rng.randrange(24, data_start), rng.randrange(data_start, len(content) - 64), len(content) - 1):
        yield Mutation(f"truncated to {cut} of {len(content)} bytes"), bytes(content[:cut])


def gguf_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    model = read_gguf_model(sources.gguf)
    cases = []
    mutations = [*gguf_metadata_mutations(model), *gguf_layout_mutations(model, rng)]
    for number, (mutation, content) in enumerate(mutations):
        workdir = root / f"case-{number:03d}"
        workdir.mkdir(parents=True)
        target = workdir / sources.gguf.name
        target.write_bytes(content)
        for command in ("inspect", "convert"):
            output = workdir / "out-convert"
            argv = ["inspect", target] if command == "inspect" else ["convert", target, "-o", output]
            cases.append(make_case("gguf", len(cases), mutation, command, argv, workdir, (target.name,),
                                   output=str(output) if command == "convert" else None, writes=True))
    return cases


# ---- YAML texts shared by recipes and pipelines

def billion_laughs(indent: str = "") -> str:
    """Nine anchors of ten aliases each: 10^9 leaves once expanded."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        aliases = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"{indent}a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def nested_yaml(indent: str, depth: int = DEEP) -> str:
    """A list nested ``depth`` deep as a YAML block value (``- - - ... 0.5``): flow style (``[[[...]]]``) would
    make PyYAML's scanner look ahead quadratically, seconds before any library code runs."""
    return "\n" + indent + "- " * depth + "0.5\n"


# ---- recipes

def recipe_templates(a: str, b: str) -> dict[str, tuple[str, dict]]:
    """name → (file name, content) of valid recipes over the models ``a`` and ``b``."""
    return {
        "linear": ("recipe.yaml", {"method": "linear", "models": [{"model": a, "parameters": {"weight": 0.6}},
                                                                 {"model": b, "parameters": {"weight": 0.4}}]}),
        "ties": ("recipe.yaml", {"method": "ties", "base": a, "parameters": {"lambda": 1.0},
                                 "models": [{"model": b, "parameters": {"density": 0.5, "weight": 1.0}}]}),
        "dare_ties": ("recipe.yaml", {"method": "dare_ties", "base": a, "seed": 3, "parameters": {"density": 0.5},
                                      "models": [{"model": b}]}),
        "slerp": ("recipe.yaml", {"method": "slerp", "base": a, "models": [{"model": b}], "parameters": {"t": 0.5}}),
        "slices": ("recipe.yaml", {"method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 2]}]}]}),
        "mergekit": ("mergekit.yml", {"merge_method": "ties", "base_model": a, "dtype": "float32", "models": [
            {"model": a}, {"model": b, "parameters": {"density": 0.5, "weight": 1.0}}]}),
        "manifest": ("surgery.json", {"command": "merge", "surgery_version": "0.1.0", "inputs": [], "recipe": {
            "method": "ties", "base": a, "models": [{"model": b, "parameters": {"density": 0.5}, "layer_range": None}],
            "parameters": {"lambda": 1.0}, "seed": 0, "slices": None, "dtype": None, "tokenizer_source": "base",
            "dare_rescale": "l1", "aim": None}}),
    }


# (template kind: "ours" draws one of our recipes; path of keys; value; valid)
RECIPE_FIELDS = [
    ("ours", ("method",), 5, False), ("ours", ("method",), {"a": 1}, False), ("ours", ("method",), ["ties"], False),
    ("ours", ("method",), None, False), ("ours", ("seed",), "abc", False), ("ours", ("seed",), [1], False),
    ("ours", ("seed",), 1.5, False), ("ours", ("seed",), 2 ** 70, None), ("ours", ("parameters",), 5, False),
    ("ours", ("parameters",), [1, 2], False),
    ("ours", ("parameters", "density"), "heavy", False), ("ours", ("parameters", "lambda"), "heavy", False),
    ("ours", ("parameters", "density"), 2.0, False), ("ours", ("parameters", "lambda"), float("nan"), False),
    ("ours", ("parameters", "density"), [0.1, "heavy"], False),
    ("ours", ("parameters", "density"), [{"filter": 5, "value": 0.3}], False),
    ("ours", ("parameters", "t"), "half", False), ("ours", ("parameters", "weight"), 1e308, None),
    ("ours", ("models",), "x", False), ("ours", ("models",), 5, False), ("ours", ("models",), [None], False),
    ("ours", ("models",), [{"model": ["a", "b"]}], False), ("ours", ("models",), [{"model": "org/.."}], False),
    ("ours", ("models", 0, "parameters"), 5, False), ("ours", ("models", 0, "parameters", "weight"), "heavy", False),
    ("ours", ("base",), 5, False), ("ours", ("base",), ["x"], False),
    ("ours", ("slices",), [{"sources": "x"}], False), ("ours", ("slices",), 5, False),
    ("ours", ("slices",), [{"sources": [{"model": "A", "layer_range": [0, "a"]}]}], False),
    ("ours", ("slices",), [{"sources": [{"model": "A", "layer_range": [0, 100]}]}], False),
    ("ours", ("dtype",), "float128", False),
    ("ours", ("tokenizer_source",), 5, False), ("ours", ("tokenizer_source",), "nonexistent", False),
    ("ours", ("dare_rescale",), "bogus", False), ("ours", ("aim",), 5, False),
    ("ours", ("aim",), {"omega": "heavy"}, False), ("ours", ("mehtod",), "ties", False),
    ("mergekit", ("merge_method",), 5, False), ("mergekit", ("models",), 5, False),
    ("mergekit", ("models",), [{"model": {"lora": "x"}}], False), ("mergekit", ("base_model",), ["a"], False),
    ("mergekit", ("slices",), [{"sources": 5}], False),
    ("mergekit", ("out_dtype",), "float128", False),
    ("mergekit", ("models", 1, "parameters", "density"), "heavy", False),
    ("manifest", ("recipe", "method"), 5, False), ("manifest", ("recipe",), 5, False),
    ("manifest", ("recipe", "models", 0, "layer_range"), "all", False),
    ("manifest", ("recipe", "seed"), "abc", False),
]


def mention_words(path: tuple, value: Any) -> tuple:
    """Words an error line about ``value`` at ``path`` may name instead of the file: the keys (also as options,
    ``dare_rescale`` → ``dare-rescale``, and their last part, ``out_dtype`` → ``dtype``), a scalar value."""
    words = []
    for key in path:
        if isinstance(key, str):
            words += [key, key.replace("_", "-"), key.split("_")[-1], key.rstrip("s")]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        words.append(str(value))
    return tuple(dict.fromkeys(word for word in words if word))


def set_path(data: Any, path: tuple, value: Any) -> Any:
    """A copy of ``data`` with ``value`` at ``path`` (missing mappings on the way are created)."""
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else target[key]
    target[path[-1]] = value
    return data


def substitute(value: Any, names: dict) -> Any:
    """``value`` with the placeholder strings in ``names`` (e.g. "A": a model path) replaced."""
    if isinstance(value, list):
        return [substitute(item, names) for item in value]
    if isinstance(value, dict):
        return {key: substitute(item, names) for key, item in value.items()}
    return names.get(value, value) if isinstance(value, str) else value


def dump_recipe(file_name: str, content: Any) -> str:
    if file_name.endswith(".json"):
        return json.dumps(content, indent=2)
    return yaml.safe_dump(content, sort_keys=False)


def recipe_field_mutations(templates: dict, rng: random.Random) -> Iterator[tuple[Mutation, str, str]]:
    """(mutation, file name, text) for every field mutation, on a template drawn for it."""
    ours = [name for name in templates if name not in ("mergekit", "manifest")]
    model_a = templates["linear"][1]["models"][0]["model"]
    for kind, path, value, valid in RECIPE_FIELDS:
        name = rng.choice(ours) if kind == "ours" else kind
        if kind == "ours" and path[0] == "models" and len(path) > 1:
            name = "linear"  # the template whose model entries carry parameters
        file_name, content = templates[name]
        if path[0] == "slices" and "models" in content:
            content = {key: v for key, v in content.items() if key != "models"}
        if path == ("models",) and "slices" in content:
            content = {key: v for key, v in content.items() if key != "slices"}
        changed = set_path(content, path, substitute(value, {"A": model_a}))
        label = f"{name} recipe: {'.'.join(map(str, path))} = {short(value)}"
        yield Mutation(label, valid, names=mention_words(path, value)), file_name, dump_recipe(file_name, changed)


def recipe_text_mutations(templates: dict, rng: random.Random) -> Iterator[tuple[Mutation, str, str]]:
    file_name, content = templates["ties"]

    def without(key: str) -> str:
        return yaml.safe_dump({k: v for k, v in content.items() if k != key}, sort_keys=False)

    yield Mutation("ties recipe: billion-laughs anchors in parameters.density", isolated=True,
                   names=("density", "parameter")), file_name, \
        without("parameters") + "parameters:\n  density:\n" + billion_laughs("    ") + "    all: *a8\n"
    yield Mutation(f"ties recipe: models nested {DEEP} deep", names=("models",)), file_name, \
        without("models") + "models:" + nested_yaml("  ")
    yield Mutation(f"ties recipe: parameters.density nested {DEEP} deep", names=("density",)), file_name, \
        without("parameters") + "parameters:\n  density:" + nested_yaml("    ")
    yield Mutation("ties recipe: parameters a self-referencing anchor", names=("parameters", "density")), file_name, \
        without("parameters") + "parameters: &p {density: *p}\n"
    yield Mutation("ties recipe: models a self-referencing list", names=("models", "model")), file_name, \
        without("models") + "models: &m [*m]\n"
    first, second = (json.dumps(entry["model"]) for entry in templates["linear"][1]["models"])
    yield Mutation("linear recipe: both models' parameters one anchor", valid=True), "recipe.yaml", (
        f"method: linear\nmodels:\n  - {{model: {first}, parameters: &w {{weight: 0.5}}}}\n"
        f"  - {{model: {second}, parameters: *w}}\n")
    text = dump_recipe(file_name, content)
    for label, bad in (("syntax error", "method: [ties\n"), ("recipe = a list", "- ties\n"), ("empty file", ""),
                       ("python object tag", "method: !!python/object:os.system\n"),
                       ("binary tag in method", text.replace("method: ties", "method: !!binary aGVsbG8=", 1))):
        yield Mutation(label, names=("method",)), "recipe.yaml", bad
    yield Mutation("invalid UTF-8"), "recipe.yaml", text.replace("method", "meth\udcffod", 1)
    for template, (file_name, content) in templates.items():
        yield Mutation(f"{template} recipe, unchanged", valid=True), file_name, dump_recipe(file_name, content)


def recipe_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    templates = recipe_templates(str(sources.llama), str(sources.sharded))
    mutations = [*recipe_field_mutations(templates, rng), *recipe_text_mutations(templates, rng)]
    cases = []
    for number, (mutation, file_name, text) in enumerate(mutations):
        workdir = root / f"case-{number:03d}"
        workdir.mkdir(parents=True)
        recipe = workdir / file_name
        recipe.write_bytes(text.encode("utf-8", "surrogateescape"))
        for command in ("merge --dry-run", "merge"):
            output = workdir / ("out-dry" if command.endswith("dry-run") else "out")
            argv = ["merge", "--recipe", recipe, "-o", output] + (["--dry-run"] if "dry" in command else [])
            cases.append(make_case("recipe", len(cases), mutation, command, argv, workdir, (file_name,),
                                   output=str(output), writes=command == "merge"))
    return cases


# ---- mergekit-multi configs

def multi_template(a: str, b: str) -> list[dict]:
    """A valid multi-merge file over the models ``a`` and ``b``: a named linear merge, and a final TIES on it."""
    return [{"name": "pair", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]},
            {"merge_method": "ties", "base_model": a, "dtype": "float32",
             "models": [{"model": "pair", "parameters": {"density": 0.5, "weight": 1.0}}, {"model": b}]}]


JUNK = [5, -1, 2.5, "", "x", "org/..", None, True, [], [1, "a"], {}, {"a": 1}, "../../etc", "pair", 1e308]


def multi_mutations(template: list[dict], rng: random.Random, draws: int = 120) -> Iterator[tuple[Mutation, str]]:
    """(mutation, text): structure and name mutations, then seeded junk at random keys of a random document."""
    def dump(documents) -> str:
        return yaml.safe_dump_all(documents, sort_keys=False)

    first, final = template
    yield Mutation("unchanged", valid=True), dump(template)
    yield Mutation("final merge first", valid=True), dump([final, first])
    structural = [
        ("name an int", [{**first, "name": 5}, final], ("name",)),
        ("name empty", [{**first, "name": ""}, final], ("name",)),
        ("name a path", [{**first, "name": "../up"}, final], ("name",)),
        ("name twice", [first, {**first}, final], ("name", "pair")),
        ("two unnamed", [first, final, {**final}], ("name",)),
        ("self reference", [{**first, "models": [{"model": "pair"}, first["models"][1]]}, final], ("pair",)),
        ("cycle", [{**first, "models": [{"model": "other"}, first["models"][1]]},
                   {**first, "name": "other", "models": [{"model": "pair"}, first["models"][1]]}, final],
         ("other", "pair", "cycle")),
        ("unknown reference", [first, {**final, "models": [{"model": "missing-merge"}]}], ("missing-merge",)),
        ("document a list", [first, ["merge_method", "ties"]], ("document",)),
        ("document a scalar", [first, "ties"], ("document",)),
        ("no merge_method", [{k: v for k, v in first.items() if k != "merge_method"}, final], ("merge_method",)),
        ("unknown key", [{**first, "mehtod": 1}, final], ("mehtod",)),
        ("no documents", [], ("merge",)),
    ]
    for label, documents, names in structural:
        yield Mutation(label, names=names), dump(documents)
    text = dump(template)
    for label, bad in (("syntax error", text + "---\nmerge_method: [ties\n"), ("empty file", ""),
                       ("only separators", "---\n---\n"), ("python object tag", "merge_method: !!python/object:os.system\n"),
                       ("billion laughs in a document", text + "---\nname: bomb\nmerge_method: linear\nparameters:\n"
                        "  weight:\n" + billion_laughs("    ") + "    all: *a8\n"),
                       ("nested deep", text + "---\nname: deep\nmerge_method: linear\nmodels:" + nested_yaml("  "))):
        yield Mutation(label, names=("merge_method", "models", "weight", "parameter"),
                       isolated="laughs" in label), bad
    yield Mutation("invalid UTF-8"), text.replace("merge_method", "merge\udcffmethod", 1)
    for _ in range(draws):
        index = rng.randrange(2)
        documents = copy.deepcopy(template)
        target = documents[index]
        path = rng.choice([("merge_method",), ("dtype",), ("base_model",), ("models",), ("models", 0, "model"),
                           ("models", 0, "parameters"), ("models", 0, "parameters", "weight"),
                           ("models", 1, "model"), ("parameters",), ("parameters", "density"), ("name",)])
        if path[0] == "base_model" and index == 0 or path == ("name",) and index == 1:
            continue
        value = rng.choice(JUNK)
        documents[index] = set_path(target, path, value)
        yield Mutation(f"document {index + 1}: {'.'.join(map(str, path))} = {short(value)}", valid=None,
                       names=mention_words(path, value) + ("document",)), dump(documents)


def multi_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    cases = []
    template = multi_template(str(sources.llama), str(sources.sharded))
    for number, (mutation, text) in enumerate(multi_mutations(template, rng)):
        workdir = root / f"case-{number:03d}"
        workdir.mkdir(parents=True)
        config = workdir / "multi.yaml"
        config.write_bytes(text.encode("utf-8", "surrogateescape"))
        output = workdir / "out"
        cases.append(make_case("multi", len(cases), mutation, "merge-multi",
                               ["merge-multi", config, "-I", workdir / "work", "-o", output], workdir,
                               ("multi.yaml",), output=str(output), writes=True))
    return cases


# ---- mergekit-moe configs

def moe_template(model: str) -> dict:
    return {"base_model": model, "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
            "experts": [{"source_model": model, "positive_prompts": ["w1 w2 w3"]},
                        {"source_model": model, "positive_prompts": ["w10 w11"], "negative_prompts": ["w1"]}]}


# (path of keys, value, valid)
MOE_FIELDS = [
    (("base_model",), 5, False), (("base_model",), None, False), (("base_model",), "", False),
    (("base_model",), ["A"], False), (("base_model",), {"model": "A"}, False), (("base_model",), "/no/such", False),
    (("experts",), None, False), (("experts",), 5, False), (("experts",), "A", False), (("experts",), [], False),
    (("experts",), [5], False), (("experts",), [None], False), (("experts",), [{}], False),
    (("experts",), [{"source_model": 5}], False), (("experts", 0, "source_model"), None, False),
    (("experts", 0, "source_model"), "", False), (("experts", 0, "source_model"), "/no/such/model", False),
    (("experts", 0, "source_model"), "A+org/lora", False), (("experts", 0, "source_model"), {"model": "A"}, False),
    (("experts", 0, "positive_prompts"), "w1", False), (("experts", 0, "positive_prompts"), [5], False),
    (("experts", 0, "positive_prompts"), [""], False), (("experts", 0, "positive_prompts"), [], False),
    (("experts", 0, "positive_prompts"), None, False), (("experts", 0, "positive_prompts"), [["w1"]], False),
    (("experts", 0, "positive_prompts"), {"a": 1}, False), (("experts", 0, "negative_prompts"), "w9", False),
    (("experts", 0, "negative_prompts"), [5], False), (("experts", 0, "negative_prompts"), ["w9"], True),
    (("experts", 0, "noise_scale"), "x", False), (("experts", 0, "noise_scale"), True, False),
    (("experts", 0, "noise_scale"), float("nan"), False), (("experts", 0, "noise_scale"), float("inf"), False),
    (("experts", 0, "noise_scale"), [1], False), (("experts", 0, "noise_scale"), 0.01, True),
    (("experts", 0, "residual_scale"), "x", False), (("experts", 0, "residual_scale"), 0.5, True),
    (("experts", 0, "colour"), 1, False), (("experts", 1, "positive_prompts"), ["w1 w2 w3"], None),
    (("gate_mode",), "smart", False), (("gate_mode",), 5, False), (("gate_mode",), ["hidden"], False),
    (("gate_mode",), "random", True), (("gate_mode",), "cheap_embed", True), (("gate_mode",), None, True),
    (("experts_per_token",), 0, False), (("experts_per_token",), -1, False), (("experts_per_token",), 3, False),
    (("experts_per_token",), 1.5, False), (("experts_per_token",), "2", False), (("experts_per_token",), True, False),
    (("experts_per_token",), 2 ** 63, False), (("experts_per_token",), [1], False), (("experts_per_token",), 2, True),
    (("shared_experts",), "x", False), (("shared_experts",), [5], False),
    (("shared_experts",), [{"source_model": "A", "positive_prompts": ["w1"]}], False),
    (("architecture",), "qwen", False), (("architecture",), "qwen3", False), (("architecture",), "gpt", False),
    (("architecture",), 5, False), (("architecture",), "mixtral", True),
    (("dtype",), "float128", False), (("dtype",), 5, False), (("dtype",), "bfloat16", True),
    (("colour",), "blue", False),
]


def moe_mutations(template: dict, rng: random.Random, pairs: int = 150) -> Iterator[tuple[Mutation, str]]:
    model = template["base_model"]
    for path, value, valid in MOE_FIELDS:
        changed = set_path(template, path, substitute(value, {"A": model}))
        yield Mutation(f"moe: {'.'.join(map(str, path))} = {short(value)}", valid,
                       names=mention_words(path, value)), yaml.safe_dump(changed, sort_keys=False)
    bad = [(path, value) for path, value, valid in MOE_FIELDS if valid is False and len(path) == 1]
    for _ in range(pairs):  # two bad top-level fields at once: either may be the one named
        (first, one), (second, two) = rng.sample(bad, 2)
        if first == second:
            continue
        changed = set_path(set_path(template, first, substitute(one, {"A": model})), second,
                           substitute(two, {"A": model}))
        yield Mutation(f"moe: {first[0]} = {short(one)} and {second[0]} = {short(two)}",
                       names=mention_words(first, one) + mention_words(second, two)), \
            yaml.safe_dump(changed, sort_keys=False)
    text = yaml.safe_dump(template, sort_keys=False)
    without_experts = yaml.safe_dump({k: v for k, v in template.items() if k != "experts"}, sort_keys=False)
    yield Mutation("moe: billion-laughs anchors in experts", isolated=True, names=("experts",)), \
        without_experts + "experts:\n" + billion_laughs("  ") + "  all: *a8\n"
    yield Mutation(f"moe: experts nested {DEEP} deep", names=("experts",)), without_experts + "experts:" + \
        nested_yaml("  ")
    yield Mutation("moe: experts a self-referencing list", names=("experts",)), without_experts + "experts: &e [*e]\n"
    for label, bad in (("syntax error", "base_model: [x\n"), ("a list", "- base_model\n"), ("empty file", ""),
                       ("python object tag", "base_model: !!python/object:os.system\n")):
        yield Mutation(f"moe: {label}", names=("base_model", "mapping")), bad
    yield Mutation("moe: invalid UTF-8"), text.replace("base_model", "base\udcff_model", 1)
    yield Mutation("moe: unchanged", valid=True), text


def moe_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    cases = []
    for number, (mutation, text) in enumerate(moe_mutations(moe_template(str(sources.llama)), rng)):
        workdir = root / f"case-{number:03d}"
        workdir.mkdir(parents=True)
        config = workdir / "moe.yaml"
        config.write_bytes(text.encode("utf-8", "surrogateescape"))
        output = workdir / "out"
        cases.append(make_case("moe", len(cases), mutation, "moe", ["moe", config, "-o", output], workdir,
                               ("moe.yaml",), output=str(output), writes=True))
    return cases


# ---- gpt-oss MXFP4 inputs (read decoded by surgery/io/mxfp4_input.py)

def mxfp4_mutations(tensors: dict, config: dict, rng: random.Random) -> Iterator[tuple[Mutation, dict, dict]]:
    """(mutation, tensors, config): valid safetensors files whose MXFP4 pairs or quantization_config are wrong."""
    import torch

    pairs = sorted(name.removesuffix("_blocks") for name in tensors if name.endswith("_blocks"))

    def changed(name: str, value) -> dict:
        out = dict(tensors)
        if value is None:
            del out[name]
        else:
            out[name] = value
        return out

    data = frozenset({"inspect"})  # damage in the data, or in what it means, which inspect does not read
    for base in pairs:
        blocks, scales = tensors[base + "_blocks"], tensors[base + "_scales"]
        words = (base.rsplit(".", 1)[-1],)
        yield Mutation(f"{base}: no _scales", names=words), changed(base + "_scales", None), config
        yield Mutation(f"{base}: no _blocks", names=words), changed(base + "_blocks", None), config
        yield Mutation(f"{base}: _scales one row short", names=words), changed(
            base + "_scales", scales[:, :-1].contiguous()), config
        yield Mutation(f"{base}: _blocks of 8 bytes", names=words), changed(
            base + "_blocks", blocks[..., :8].contiguous()), config
        yield Mutation(f"{base}: _blocks 3-D", names=words), changed(
            base + "_blocks", blocks.reshape(*blocks.shape[:2], -1).contiguous()), config
        yield Mutation(f"{base}: _scales int8", names=words), changed(base + "_scales", scales.to(torch.int8)), config
        yield Mutation(f"{base}: _blocks float32", names=words), changed(base + "_blocks", blocks.float()), config
        yield Mutation(f"{base}: _scales float16", names=words), changed(base + "_scales", scales.half()), config
        yield Mutation(f"{base}: one expert fewer", names=words, lenient=data), {
            **tensors, base + "_blocks": blocks[1:].contiguous(), base + "_scales": scales[1:].contiguous()}, config
        yield Mutation(f"{base}: an E8M0 scale of 255 (NaN)", names=words, lenient=data), changed(
            base + "_scales", scales.clone().index_fill_(0, torch.tensor([rng.randrange(scales.shape[0])]), 255)), \
            config
        yield Mutation(f"{base}: E8M0 scales of 254 (2^127, overflowing)", names=words, lenient=data), changed(
            base + "_scales", torch.full_like(scales, 254)), config
        yield Mutation(f"{base}: random block bytes", valid=True), changed(
            base + "_blocks", torch.randint(0, 256, blocks.shape, dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))), config
        yield Mutation(f"{base}: _blocks and _scales of another pair", names=words, lenient=data), {
            **tensors, base + "_blocks": tensors[pairs[-1 - pairs.index(base)] + "_blocks"].clone(),
            base + "_scales": tensors[pairs[-1 - pairs.index(base)] + "_scales"].clone()}, config
    quantization = config["quantization_config"]
    for value in ({"quant_method": "mxfp4", "modules_to_not_convert": 5}, {"quant_method": "mxfp5"},
                  {**quantization, "quant_method": None}, 5, [quantization]):
        yield Mutation(f"quantization_config = {short(value)}", valid=None, names=("quantization_config",)), \
            tensors, {**config, "quantization_config": value}
    yield Mutation("config without quantization_config", names=("_blocks", "_scales"), lenient=data), tensors, {
        key: value for key, value in config.items() if key != "quantization_config"}
    yield Mutation("unchanged", valid=True), tensors, config


def mxfp4_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sources.mxfp4 / "model.safetensors"))
    config = json.loads((sources.mxfp4 / "config.json").read_text())
    cases = []
    for number, (mutation, changed, changed_config) in enumerate(mxfp4_mutations(tensors, config, rng)):
        workdir = root / f"case-{number:03d}"
        model = link_tree(sources.mxfp4, workdir / "model", skip={"model.safetensors", "config.json"})
        save_file(changed, str(model / "model.safetensors"), metadata={"format": "pt"})
        write_fresh(model / "config.json", json.dumps(changed_config, indent=2))
        for command in ("inspect", "quantize", "merge"):
            output = workdir / f"out-{command}"
            argv = {"inspect": ["inspect", model],
                    "quantize": ["quantize", model, "-o", output, "--format", "mxfp4"],
                    "merge": ["merge", model, sources.gpt_oss, "--method", "linear", "-o", output]}[command]
            cases.append(make_case("mxfp4", len(cases), mutation, command, argv, workdir,
                                   ("model.safetensors", "config.json", model),
                                   output=None if command == "inspect" else str(output), writes=True))
    return cases


# ---- quantized inputs (read decoded by surgery/io/quantized_input.py)

QUANTIZED_INPUTS = ("compressed-tensors", "fp8-dynamic", "nvfp4a16", "gptq", "deepseek-fp8", "awq")


def quantized_mutations(tensors: dict, config: dict, rng: random.Random) -> Iterator[tuple[Mutation, dict, dict]]:
    """(mutation, tensors, config): valid safetensors files whose quantized modules' stored tensors (missing,
    shapes, dtypes, non-finite scales, another module's) or quantization_config are wrong."""
    import torch

    def changed(name: str, value) -> dict:
        out = dict(tensors)
        if value is None:
            del out[name]
        else:
            out[name] = value
        return out

    stored = sorted(name for name in tensors if ".layers." in name and not name.endswith(("norm.weight", ".bias"))
                    and (not name.endswith(".weight") or tensors[name].dtype == torch.float8_e4m3fn))
    modules = sorted({name.rpartition(".")[0] for name in stored})
    data = frozenset({"inspect"})
    for module in rng.sample(modules, 2):
        other = next(m for m in modules if m != module and m.rsplit(".", 1)[-1] != module.rsplit(".", 1)[-1])
        for name in [n for n in stored if n.rpartition(".")[0] == module]:
            tensor, local = tensors[name], name.rpartition(".")[2]
            words = (local, module)
            optional = local == "g_idx"  # GPTQ without g_idx: groups in order, a valid checkpoint
            yield Mutation(f"{name}: missing", valid=None if optional else False, names=words), \
                changed(name, None), config
            if tensor.ndim and tensor.shape[0] > 1:
                yield Mutation(f"{name}: one row short", names=words, lenient=data), \
                    changed(name, tensor[:-1].contiguous()), config
            yield Mutation(f"{name}: as float32", valid=None if tensor.is_floating_point() else False,
                           names=words, lenient=data), changed(name, tensor.float()), config
            if tensor.is_floating_point():
                yield Mutation(f"{name}: as int8", names=words, lenient=data), changed(
                    name, torch.ones(tensor.shape, dtype=torch.int8)), config
                if tensor.dtype != torch.float8_e4m3fn:
                    yield Mutation(f"{name}: a NaN", names=words, lenient=data), changed(
                        name, tensor.clone().reshape(-1).index_fill_(0, torch.tensor([0]), float("nan"))
                        .reshape(tensor.shape)), config
            yield Mutation(f"{name}: 3-D", valid=None, names=words, lenient=data), changed(
                name, tensor.reshape(1, *tensor.shape).contiguous()), config
            mate = f"{other}.{local}"
            if mate in tensors:
                yield Mutation(f"{name}: {other}'s", valid=None, names=words, lenient=data), changed(
                    name, tensors[mate].clone()), config
            if tensor.dtype in (torch.int32, torch.uint8):
                generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
                noise = torch.randint(0, 1 << 8, tensor.shape, dtype=torch.uint8, generator=generator)
                yield Mutation(f"{name}: random bytes", valid=None, names=words), changed(
                    name, noise if tensor.dtype == torch.uint8 else tensor ^ noise.to(torch.int32)), config
    quantization = config["quantization_config"]
    for value in ({**quantization, "format": "float-quantized"}, {**quantization, "format": "nvfp4-pack-quantized"},
                  {**quantization, "config_groups": {}}, {**quantization, "bits": 3}, {**quantization, "bits": "4"},
                  {**quantization, "weight_block_size": [16, 32]}, {**quantization, "group_size": 0},
                  {"quant_method": "compressed-tensors"}, {**quantization, "quant_method": "fp8"}):
        yield Mutation(f"quantization_config = {short(value)}", valid=None, names=("quantization_config",)), \
            tensors, {**config, "quantization_config": value}
    yield Mutation("config without quantization_config", valid=None, names=("weight",), lenient=data), tensors, {
        key: value for key, value in config.items() if key != "quantization_config"}
    yield Mutation("unchanged", valid=True), tensors, config


def quantized_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    from safetensors.torch import load_file, save_file

    cases = []
    for kind in QUANTIZED_INPUTS:
        pristine = sources.quantized[kind]
        tensors = load_file(str(pristine / "model.safetensors"))
        config = json.loads((pristine / "config.json").read_text())
        for mutation, changed, changed_config in quantized_mutations(tensors, config, rng):
            workdir = root / f"case-{len(cases):03d}"
            model = link_tree(pristine, workdir / kind, skip={"model.safetensors", "config.json", "surgery.json"})
            save_file(changed, str(model / "model.safetensors"), metadata={"format": "pt"})
            write_fresh(model / "config.json", json.dumps(changed_config, indent=2))
            output = workdir / "out"
            cases.append(make_case("quantized", len(cases), Mutation(f"{kind}: {mutation.label}", mutation.valid,
                                                                      mutation.lenient, mutation.names),
                                   "convert", ["convert", model, "-o", output], workdir,
                                   ("model.safetensors", "config.json", model), output=str(output), writes=True))
    return cases


# ---- pipelines

def pipeline_templates(llama: str, sharded: str, lora: str) -> dict[str, list]:
    return {
        "merge-lora": [{"merge-lora": {"adapters": [lora, lora], "base": llama, "method": "ties", "density": 0.5,
                                       "output": "out/lora"}}],
        "convert": [{"convert": {"input": llama, "dtype": "bfloat16", "output": "out/bf16"}}],
        "extend": [{"extend": {"input": llama, "rope": "linear", "factor": 2, "output": "out/long"}}],
        "quantize": [{"quantize": {"input": llama, "bits": 4, "group_size": 32, "output": "out/q4"}}],
        "merge": [{"merge": {"models": [llama, sharded], "method": "linear", "output": "out/merged"}}],
        "merge+extend": [{"merge": {"models": [llama, sharded], "method": "ties", "density": 0.5,
                                    "output": "out/merged"}},
                         {"extend": {"input": "out/merged", "rope": "linear", "factor": 2, "output": "out/long"}}],
        "push": [{"push": {"input": llama, "repo": "me/fuzz", "dry_run": True}}],
    }


RUN_DRY = frozenset({"run --dry-run"})
PIPELINE_VALUES = {  # command → (option, value, valid): values the command rejects when it runs (not in a dry run)
    "quantize": [("bits", "abc", False), ("bits", 3, False), ("group_size", 0, False), ("input", "--help", False)],
    "extend": [("factor", "heavy", False), ("rope", "bogus", False), ("input", ["a", "b"], False)],
    "merge": [("method", {"a": 1}, False), ("density", "heavy", False), ("models", 5, False),
              ("models", ["--help"], False)],
    "convert": [("dtype", "float128", False), ("input", "--help", False)],
    "merge-lora": [("rank", 0, False), ("adapters", 5, False), ("density", "heavy", False),
                   ("method", "slerp", False), ("base", 5, False)],
    "push": [("repo", "a/..", False), ("repo", "org/..", False), ("repo", 5, None), ("input", "--help", False)],
}
PIPELINE_KEYS = [("output=x", True), ("", 1), ("help", True), (5, "x"), (None, "x"), ("frobnicate", 1)]
PIPELINE_OUTPUTS = [5, True, ["a", "b"], {"a": 1}]
PIPELINE_SHAPES = [("pipeline = a list", lambda steps: steps), ("steps = 5", lambda steps: {"steps": 5}),
                   ("steps = []", lambda steps: {"steps": []}), ("steps = [5]", lambda steps: {"steps": [5]}),
                   ("two commands in one step", lambda steps: {"steps": [{**steps[0], "extend": {"input": "x"}}]}),
                   ("unknown command", lambda steps: {"steps": [{"frobnicate": {"output": "out/x"}}]}),
                   ("options = 5", lambda steps: {"steps": [{"merge": 5}]}),
                   ("extend without input", lambda steps: {"steps": [{"extend": {"output": "out/x"}}]})]
PIPELINE_CONTROLS = ("convert", "quantize", "merge+extend", "push", "merge-lora")


def pipeline_option_mutations(templates: dict, rng: random.Random) -> Iterator[tuple[Mutation, str]]:
    def on_step(template: str, change: Callable[[dict], None], label: str) -> tuple[Mutation, str]:
        steps = copy.deepcopy(templates[template])
        number = rng.randrange(len(steps))
        (command, options), = steps[number].items()
        change(options)
        return Mutation(f"{template} pipeline, step {number + 1} ({command}): {label}"), \
            yaml.safe_dump({"steps": steps}, sort_keys=False)

    for command, changes in PIPELINE_VALUES.items():
        for option, value, valid in changes:
            template = rng.choice([name for name, steps in templates.items() if any(command in s for s in steps)])
            steps = copy.deepcopy(templates[template])
            number = next(i for i, step in enumerate(steps) if command in step)
            steps[number][command][option] = value
            yield Mutation(f"{template} pipeline, step {number + 1} ({command}): {option} = {short(value)}",
                           valid, lenient=RUN_DRY), yaml.safe_dump({"steps": steps}, sort_keys=False)
    for key, value in PIPELINE_KEYS:
        template = rng.choice(sorted(templates))
        yield on_step(template, lambda o, k=key, v=value: o.__setitem__(k, v), f"option key {key!r} = {short(value)}")
    for value in PIPELINE_OUTPUTS:
        template = rng.choice([name for name in sorted(templates) if name != "push"])
        yield on_step(template, lambda o, v=value: o.__setitem__("output", v), f"output = {short(value)}")


def pipeline_structure_mutations(templates: dict, rng: random.Random) -> Iterator[tuple[Mutation, str]]:
    template = rng.choice(sorted(templates))
    steps = templates[template]
    for label, shape in PIPELINE_SHAPES:
        yield Mutation(f"{template} pipeline: {label}"), yaml.safe_dump(shape(steps), sort_keys=False)
    yield Mutation(f"{template} pipeline with an extra top-level key", valid=None), yaml.safe_dump(
        {"steps": steps, "note": "x"})
    text = yaml.safe_dump({"steps": steps}, sort_keys=False)
    option = "output:" if "output:" in text else "repo:"
    yield Mutation(f"{template} pipeline with billion-laughs anchors in a step option", isolated=True), \
        billion_laughs() + text.replace(option, "note: *a8\n    " + option, 1)
    yield Mutation(f"steps nested {DEEP} deep"), "steps:" + nested_yaml("  ")
    convert_input = json.dumps(templates["convert"][0]["convert"]["input"])
    yield Mutation("a step's options are a self-referencing anchor"), \
        "steps:\n  - convert: &c {input: *c, output: out/x}\n"
    yield Mutation("extend reuses convert's options by alias"), (
        f"steps:\n  - convert: &c {{input: {convert_input}, output: out/bf16}}\n  - extend: *c\n")
    yield Mutation("the same convert step twice, by alias", valid=True), (
        f"steps:\n  - &s {{convert: {{input: {convert_input}, output: out/bf16}}}}\n  - *s\n")
    for label, bad in (("syntax error", "steps: [\n"), ("python object tag", "steps: !!python/object:os.system\n"),
                       ("empty file", ""), ("a date as output",
                                            f"steps:\n  - convert: {{input: {convert_input}, output: 2024-01-01}}\n")):
        yield Mutation(label), bad
    yield Mutation("invalid UTF-8"), text.replace("steps", "st\udcffeps", 1)
    for name in PIPELINE_CONTROLS:
        yield Mutation(f"{name} pipeline, unchanged", valid=True), yaml.safe_dump({"steps": templates[name]},
                                                                                  sort_keys=False)


def step_outputs(text: str) -> list[str]:
    """The string outputs of the pipeline's steps, where it parses (for the leftover checks)."""
    try:
        data = yaml.safe_load(text)
        return [options["output"] for step in data["steps"] for options in step.values()
                if isinstance(options.get("output"), str)]
    except Exception:  # noqa: BLE001 - anything unparsable has no outputs to check
        return []


def pipeline_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    templates = pipeline_templates("models/llama", "models/sharded", "models/lora")
    mutations = [*pipeline_option_mutations(templates, rng), *pipeline_structure_mutations(templates, rng)]
    cases = []
    for number, (mutation, text) in enumerate(mutations):
        workdir = root / f"case-{number:03d}"
        link_tree(sources.llama, workdir / "models" / "llama")
        link_tree(sources.sharded, workdir / "models" / "sharded")
        link_tree(sources.lora, workdir / "models" / "lora")
        pipeline = workdir / "pipeline.yaml"
        pipeline.write_bytes(text.encode("utf-8", "surrogateescape"))
        outputs = [str(workdir / output) for output in step_outputs(text)]
        for command in ("run --dry-run", "run"):  # in this order: the dry run must find no outputs
            argv = ["run", pipeline] + (["--dry-run"] if "dry" in command else [])
            cases.append(make_case("pipeline", len(cases), mutation, command, argv, workdir,
                                   ("pipeline.yaml", "step "), outputs=outputs, writes=command == "run"))
    return cases


# ---- LoRA adapters applied as MODEL+ADAPTER

LORA_CONFIG_VALUES = {  # adapter_config.json key → (value, valid)
    "peft_type": [("PREFIX_TUNING", False), (None, False), (5, False), ("lora", False)],
    "r": [(0, False), (-4, False), ("4", False), (True, False), (3, False), (8, False), (None, False), (1e300, False)],
    "lora_alpha": [(0, False), ("x", False), (None, False), (-1, False), (16, None), (float("nan"), False)],
    "rank_pattern": [(5, False), ([1], False), ({"up_proj": 3}, False), ({"up_proj": "x"}, False),
                     ({"(": 2}, False), ({"q_proj": 2}, False), ({}, False), ({"nothing": 4}, False)],
    "alpha_pattern": [(5, False), ({"v_proj": "x"}, False), ({"v_proj": 0}, False), ({"[": 1}, False),
                      ({"v_proj": 100}, None), ({}, None)],
    "use_dora": [(True, False), ("yes", False), (False, None)],
    "lora_bias": [(True, False)],
    "use_rslora": [(True, None), ("no", None)],
    "fan_in_fan_out": [(True, None)],  # PEFT ignores it on nn.Linear, so does surgery
}


def lora_config_mutations(config: dict) -> Iterator[tuple[Mutation, str]]:
    for key, values in LORA_CONFIG_VALUES.items():
        for value, valid in values:
            changed = {**config, key: value}
            yield Mutation(f"{key}={short(value)}", valid, names=(key, CONFIG_FILE_LORA)), json.dumps(changed)
    for label, text in (("broken JSON", "{\"peft_type\": "), ("a list", "[1, 2]"), ("empty", ""),
                        ("deep nesting", deep_json()), ("not UTF-8", b"\xff\xfe{")):
        yield Mutation(label, False, names=(CONFIG_FILE_LORA,)), text


CONFIG_FILE_LORA = "adapter_config.json"
WEIGHTS_FILE_LORA = "adapter_model.safetensors"


def lora_tensor_mutations(tensors: dict, rng: random.Random) -> Iterator[tuple[Mutation, dict]]:
    import torch

    factors = sorted(name for name in tensors if ".lora_A" in name or ".lora_embedding_A" in name)
    for a in rng.sample(factors, min(8, len(factors))):
        b = a.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        module = a.split(".lora_")[0]
        names = (module.removeprefix("base_model.model."), WEIGHTS_FILE_LORA)
        yield Mutation(f"{module}: A missing", False, names=names), {k: v for k, v in tensors.items() if k != a}
        yield Mutation(f"{module}: B missing", False, names=names), {k: v for k, v in tensors.items() if k != b}
        yield Mutation(f"{module}: A a row short", False, names=names), {**tensors, a: tensors[a][:-1].clone()}
        yield Mutation(f"{module}: B a column short", False, names=names), {**tensors, b: tensors[b][:, :-1].clone()}
        yield Mutation(f"{module}: B transposed", False, names=names), {**tensors, b: tensors[b].T.contiguous()}
        yield Mutation(f"{module}: A 1-D", False, names=names), {**tensors, a: tensors[a].reshape(-1).clone()}
        unread = frozenset({"inspect"})  # inspect reads no values
        yield Mutation(f"{module}: B NaN", False, unread, names), {**tensors, b: torch.full_like(tensors[b], float("nan"))}
        yield Mutation(f"{module}: B inf", False, unread, names), {**tensors, b: torch.full_like(tensors[b], float("inf"))}
        yield Mutation(f"{module}: B 1e30", None, names=names), {**tensors, b: torch.full_like(tensors[b], 1e30)}
        yield Mutation(f"{module}: int factors", None, names=names), {**tensors, a: tensors[a].to(torch.int32)}
        yield Mutation(f"{module}: bfloat16 factors", True), {**tensors, a: tensors[a].to(torch.bfloat16),
                                                              b: tensors[b].to(torch.bfloat16)}
        moved = a.replace("layers.0.", "layers.7.").replace("layers.1.", "layers.7.")
        if moved != a:
            yield Mutation(f"{module}: of a layer the model lacks", False, names=names), {
                **{k: v for k, v in tensors.items() if k not in (a, b)}, moved: tensors[a].clone(),
                moved.replace("lora_A", "lora_B"): tensors[b].clone()}
        yield Mutation(f"{module}: a third factor", False, names=names), {
            **tensors, a[:a.rindex("_A")] + "_C" + a[a.rindex("_A") + 2:]: tensors[a].clone()}
    yield Mutation("an unknown tensor", False, names=(WEIGHTS_FILE_LORA,)), {**tensors, "base_model.model.x": torch.ones(2)}
    saved = next(name for name in tensors if name.endswith("lm_head.weight"))
    yield Mutation("lm_head copy a row short", False, names=(WEIGHTS_FILE_LORA, "lm_head")), {
        **tensors, saved: tensors[saved][:-1].clone()}
    yield Mutation("no tensors", False, names=(WEIGHTS_FILE_LORA,)), {}


def lora_cases(root: Path, sources: "Sources", rng: random.Random) -> list[Case]:
    from safetensors.torch import load_file, save_file

    pristine = sources.lora
    tensors = load_file(str(pristine / WEIGHTS_FILE_LORA))
    config = json.loads((pristine / CONFIG_FILE_LORA).read_text())
    inputs: list[tuple[Mutation, Callable[[Path], None]]] = []
    for mutation, text in lora_config_mutations(config):
        inputs.append((mutation, lambda adapter, text=text: write_fresh(adapter / CONFIG_FILE_LORA, text)))
    for mutation, changed in lora_tensor_mutations(tensors, rng):
        inputs.append((mutation, lambda adapter, changed=changed: (
            (adapter / WEIGHTS_FILE_LORA).unlink(), save_file(changed, str(adapter / WEIGHTS_FILE_LORA)))))
    content = (pristine / WEIGHTS_FILE_LORA).read_bytes()
    for label, data in (("truncated", content[:len(content) // 2]), ("random bytes", rng.randbytes(4096)),
                        ("header only", content[:8])):
        inputs.append((Mutation(f"weights {label}", False, names=(WEIGHTS_FILE_LORA,)),
                       lambda adapter, data=data: write_fresh(adapter / WEIGHTS_FILE_LORA, data)))
    for missing in (CONFIG_FILE_LORA, WEIGHTS_FILE_LORA):
        inputs.append((Mutation(f"{missing} missing", False, names=(missing,)),
                       lambda adapter, missing=missing: (adapter / missing).unlink()))
    cases = []
    for mutation, damage in inputs:
        workdir = root / f"case-{len(cases):03d}"
        adapter = link_tree(pristine, workdir / "adapter")
        damage(adapter)
        for command in ("inspect", "convert", "merge-lora"):
            output = workdir / f"out-{command}"
            argv = {"inspect": ["inspect", f"{sources.llama}+{adapter}"],
                    "convert": ["convert", f"{sources.llama}+{adapter}", "-o", output],
                    "merge-lora": ["merge-lora", adapter, pristine, "--base", sources.llama, "--method", "ties",
                                   "-o", output]}[command]
            cases.append(make_case("lora", len(cases), mutation, command, argv, workdir, (adapter,),
                                   output=None if command == "inspect" else str(output),
                                   writes=command != "inspect"))
    return cases


FAMILIES: dict[str, Callable[[Path, "Sources", random.Random], list[Case]]] = {
    "safetensors": safetensors_cases, "index": index_cases, "config": config_cases, "gguf": gguf_cases,
    "recipe": recipe_cases, "pipeline": pipeline_cases, "moe": moe_cases, "mxfp4": mxfp4_cases,
    "quantized": quantized_cases, "lora": lora_cases, "multi": multi_cases,
}


# ---- sources

@dataclass
class Sources:
    llama: Path  # tiny llama saved by transformers, with a tokenizer
    sharded: Path  # a second tiny llama in 12 shards with an index
    gguf: Path  # a Q8_0 GGUF written by surgery quantize --format gguf
    gpt_oss: Path  # a tiny gpt-oss saved by transformers
    mxfp4: Path  # that gpt-oss written by surgery quantize --format mxfp4
    quantized: dict  # QUANTIZED_INPUTS kind → the llama quantized so (deepseek-fp8: written by conftest's formula)
    lora: Path  # a PEFT LoRA adapter of the llama (conftest.save_peft_lora)


def make_gpt_oss(root: Path) -> tuple[Path, Path]:
    """A tiny gpt-oss fine-tune (seed 1), and its base (seed 0) quantized to MXFP4."""
    from conftest import make_family_model, run_surgery, save_tokenizer

    for seed, name in ((0, "gpt-oss"), (1, "gpt-oss-ft")):
        make_family_model("gpt_oss", seed).save_pretrained(root / name)
        save_tokenizer(root / name)
    done = run_surgery("quantize", root / "gpt-oss", "-o", root / "gpt-oss-mxfp4", "--format", "mxfp4")
    assert done.returncode == 0, done.stderr
    return root / "gpt-oss-ft", root / "gpt-oss-mxfp4"


def make_gguf(root: Path) -> Path:
    """A tiny llama with a byte-level BPE tokenizer (what --format gguf exports), quantized to one Q8_0 .gguf."""
    from conftest import run_surgery, save_bpe_llama

    source = save_bpe_llama(root / "bpe-llama")
    done = run_surgery("quantize", source, "-o", root / "gguf", "--format", "gguf", "--bits", "8",
                       "--group-size", "32")
    assert done.returncode == 0, done.stderr
    (path,) = (root / "gguf").glob("*.gguf")
    return path


def build_sources(root: Path, llama: Path | None = None, sharded: Path | None = None) -> Sources:
    """The fuzz's pristine inputs; ``llama`` and ``sharded`` are conftest's when pytest has them already."""
    from conftest import make_tiny_model, save_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    if llama is None:
        llama = root / "llama"
        make_tiny_model("llama").save_pretrained(llama)
        save_tokenizer(llama)
    if sharded is None:
        sharded = root / "sharded"
        make_tiny_model("llama", seed=1).save_pretrained(sharded, max_shard_size="40KB")
    from conftest import save_peft_lora

    return Sources(llama, sharded, make_gguf(root), *make_gpt_oss(root), make_quantized(root, llama),
                   save_peft_lora(llama, root / "lora"))


def make_quantized(root: Path, llama: Path) -> dict[str, Path]:
    """The tiny llama in each of QUANTIZED_INPUTS (NVFP4A16 from a bfloat16 copy, which it needs; deepseek-fp8 and
    awq written by conftest's restatements of their layouts)."""
    from conftest import run_surgery, save_awq, save_deepseek_fp8

    assert run_surgery("convert", llama, "-o", root / "llama-bf16", "--dtype", "bfloat16").returncode == 0
    made = {"deepseek-fp8": save_deepseek_fp8(llama, root / "deepseek-fp8", block=32)}
    save_awq(llama, root / "awq")
    made["awq"] = root / "awq"
    for kind, source, options in (("compressed-tensors", llama, ["--scheme", "asym", "--group-size", "32"]),
                                  ("fp8-dynamic", llama, ["--preset", "FP8_DYNAMIC"]),
                                  ("nvfp4a16", root / "llama-bf16", ["--preset", "NVFP4A16"]),
                                  ("gptq", llama, ["--format", "gptq", "--group-size", "32"])):
        done = run_surgery("quantize", source, "-o", root / kind, *options)
        assert done.returncode == 0, done.stderr
        made[kind] = root / kind
    return made


# ---- running

class Runaway(BaseException):
    """Raised in the main thread by the watchdog; not an Exception, so the CLI cannot turn it into exit 1."""


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def watchdog(seconds: float = LIMIT_SECONDS, growth: int = MEMORY_GROWTH) -> Iterator[None]:
    """Raise :class:`Runaway` in the main thread once the block has run ``seconds`` or grown by ``growth`` bytes."""
    start, baseline = time.monotonic(), resident_bytes()

    def check(signum, frame):
        if time.monotonic() - start > seconds:
            raise Runaway(f"still running after {seconds:g} s")
        if resident_bytes() - baseline > growth:
            raise Runaway(f"resident memory grew by more than {growth >> 30} GB")

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def working_directory(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def offline_hub(cache: Path) -> Iterator[None]:
    """No network and an empty Hub cache: repo ids resolve (or fail) at once."""
    from huggingface_hub import constants

    saved = {name: getattr(constants, name) for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(cache)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_case(case: Case) -> Outcome:
    from conftest import run_surgery

    start = time.monotonic()
    with working_directory(case.workdir), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with watchdog():
                result = run_surgery(*case.argv)
        except Runaway as err:
            return Outcome(None, f"hang: {err}", time.monotonic() - start)
        except Exception as err:  # noqa: BLE001 - escaped even the CLI's last-resort handler
            return Outcome(1, f"{type(err).__name__} escaping the command: {err}", time.monotonic() - start)
    return Outcome(result.returncode, result.stderr, time.monotonic() - start)


def start_isolated(cases: list[Case], scratch: Path) -> subprocess.Popen:
    """Start one mutation's ``cases``, in order, in a subprocess (``--isolated``), in the background while this
    process runs the others: an address-space limit stops memory growth, a CPU-time limit per case a loop in C
    code that no signal handler can interrupt. Each judged outcome is appended to ``<first case id>.jsonl``."""
    request = scratch / f"{cases[0].id}.cases.json"
    request.write_text(json.dumps([asdict(case) for case in cases]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--isolated", str(request), str(scratch / f"{cases[0].id}.jsonl")]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_isolated(process: subprocess.Popen, cases: list[Case], scratch: Path) -> list[Outcome]:
    """The judged outcomes of the cases :func:`start_isolated` runs. A case that kills its runner is a hang (CPU
    limit) or a crash; the cases after it run in a new runner."""
    outcomes: list[Outcome] = []
    while True:
        first = cases[len(outcomes)]
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        answers = scratch / f"{first.id}.jsonl"
        outcomes += [Outcome(**json.loads(line)) for line in (answers.read_text().splitlines()
                                                              if answers.exists() else [])]
        if len(outcomes) == len(cases):
            return outcomes
        if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            reason = f"hang: past {LIMIT_SECONDS:g} s of CPU in code the watchdog cannot interrupt"
        else:
            reason = f"the isolated runner died (exit {process.returncode}): {stderr.strip()[-300:]}"
        outcomes.append(judge(cases[len(outcomes)], Outcome(None, reason, 0.0)))
        if len(outcomes) == len(cases):
            return outcomes
        process = start_isolated(cases[len(outcomes):], scratch)


def isolated_main(request: str, answer: str) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ISOLATED_ADDRESS_SPACE, ISOLATED_ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the CPU limit's SIGXCPU would dump core otherwise
    sys.path.insert(0, str(Path(__file__).parent))
    cases = [Case(**case) for case in json.loads(Path(request).read_text())]
    for module in ("surgery.cli", "surgery.merge", "surgery.pipeline"):  # imported before the CPU clock starts
        importlib.import_module(module)

    with offline_hub(Path(tempfile.mkdtemp(prefix="fuzz-hub-", dir=Path(request).parent))):
        for case in cases:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(usage.ru_utime + usage.ru_stime + LIMIT_SECONDS + 1)  # whole seconds, at least LIMIT
            resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))
            outcome = run_case(case)
            if outcome.code == 1 and "MemoryError" in outcome.stderr:
                outcome = Outcome(None, f"hang: ran out of its {ISOLATED_ADDRESS_SPACE >> 30} GB address space "
                                        f"({outcome.error_line})", outcome.seconds)
            with open(answer, "a") as answers:
                answers.write(json.dumps(asdict(judge(case, outcome))) + "\n")


# ---- judging

def staging_leftovers(output: Path) -> list[str]:
    return sorted(path.name for path in output.parent.glob(f".{output.name}.*")
                  if ".partial-" in path.name or ".replaced-" in path.name)


def all_staging_leftovers(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob(".*")
                  if ".partial-" in path.name or ".replaced-" in path.name)


def incomplete(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint (config.json, or an adapter's adapter_config.json; every
    weight file, finite), or None."""
    import torch
    from safetensors import safe_open

    if not directory.is_dir():
        return f"no output {directory.name}"
    config = CONFIG_FILE_LORA if (directory / CONFIG_FILE_LORA).is_file() else "config.json"
    try:
        if not isinstance(json.loads((directory / config).read_text()), dict):
            return f"{config} is not an object"
    except (OSError, ValueError):
        return f"no readable {config}"
    if (directory / INDEX).is_file():
        try:
            missing = [shard for shard in set(json.loads((directory / INDEX).read_text())["weight_map"].values())
                       if not (directory / shard).is_file()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "unreadable shard index"
        if missing:
            return f"missing shard {missing[0]}"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "no weights"
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        return f"non-finite values in {name}"
        except Exception as err:  # noqa: BLE001 - an unreadable output is incomplete, whatever the reason
            return f"unreadable {file.name} ({type(err).__name__})"
    return None


def output_problem(case: Case, code: int) -> str | None:
    """Leftovers or an incomplete output, given the exit code."""
    if case.family == "pipeline":
        workdir = Path(case.workdir)
        leftovers = all_staging_leftovers(workdir)
        if leftovers:
            return f"left {leftovers[0]}"
        for output in map(Path, case.outputs):
            if not case.writes and output.exists():
                return f"a dry run wrote {output.name}"
            if case.writes and (output.exists() or code == 0) and incomplete(output):
                return f"step output {output.name}: {incomplete(output)}"
        return None
    if case.output is None:
        return None
    output = Path(case.output)
    leftovers = staging_leftovers(output)
    if leftovers:
        return f"left {leftovers[0]}"
    if code != 0 or not case.writes:
        return f"left {output.name}" if output.exists() else None
    return incomplete(output)


def error_line_problem(case: Case, stderr: str) -> str | None:
    lines = stderr.strip().splitlines()
    names = case.names
    if "Traceback" in stderr:
        return "exit 2 with a traceback"
    if case.family == "pipeline":  # the steps that ran before the failing one log their results on stderr
        logs, lines = lines[:-1], lines[-1:]
        if any(line.startswith(("surgery: error", "surgery: internal error", "Usage:", "Error:")) for line in logs):
            return "exit 2 with several error lines"
    if len(lines) != 1:
        return f"exit 2 with {len(lines)} stderr lines"
    if not lines[0].startswith("surgery: error:"):
        return "exit 2 without 'surgery: error:'"
    if names and not any(name in lines[0] for name in names):
        return f"exit 2 not naming {names[0]}"
    return None


def judge(case: Case, outcome: Outcome) -> Outcome:
    if outcome.code is None:
        outcome.verdict, outcome.reason = HANG, outcome.stderr
    elif outcome.code == 1:
        outcome.verdict = EXIT1
    elif outcome.code == 2:
        problem = "exit 2 on a valid control input" if case.valid is True else None
        problem = problem or error_line_problem(case, outcome.stderr) or output_problem(case, 2)
        outcome.verdict, outcome.reason = (OTHER, problem) if problem else (CLEAN2, "")
    elif outcome.code == 0:
        problem = output_problem(case, 0)
        if case.valid is False:
            problem = "exit 0 on bad input" + (f" ({problem})" if problem else "")
        outcome.verdict, outcome.reason = (OTHER, problem) if problem else (COMPLETE0, "")
    else:
        outcome.verdict, outcome.reason = OTHER, f"exit {outcome.code}"
    return outcome


def run_family(family: str, sources: Sources, root: Path) -> list[tuple[Case, Outcome]]:
    """Generate the family's cases from its seed under ``root`` and run them: (case, judged outcome) in order."""
    cases = FAMILIES[family](root, sources, random.Random(SEEDS[family]))
    groups: dict[tuple, list[Case]] = {}  # isolated cases that share a directory and output run in order
    for case in cases:
        if case.isolated:
            groups.setdefault((case.workdir, case.output), []).append(case)
    background = [(group, start_isolated(group, root)) for group in groups.values()]
    outcomes: dict[str, Outcome] = {}
    with offline_hub(root / "hub-cache"):
        for case in cases:
            if not case.isolated:  # judged at once: a later command of the same mutation may write beside it
                outcomes[case.id] = judge(case, run_case(case))
    for group, process in background:
        outcomes.update(zip((case.id for case in group), finish_isolated(process, group, root)))
    return [(case, outcomes[case.id]) for case in cases]


def warm_up(sources: Sources, root: Path) -> None:
    """Import what the commands import, outside any watchdog (an import cut short would poison later cases)."""
    from conftest import run_surgery

    root.mkdir(parents=True, exist_ok=True)
    for argv in (["inspect", sources.llama], ["inspect", sources.gguf], ["push", sources.sharded, "me/x", "--dry-run"],
                 ["merge", "--method", "linear", sources.llama, sources.sharded, "-o", root / "merge"],
                 ["quantize", sources.llama, "-o", root / "quantize", "--group-size", "32"],
                 ["extend", sources.llama, "--rope", "linear", "--factor", "2", "-o", root / "extend"],
                 ["convert", sources.gguf, "-o", root / "convert"],
                 ["inspect", sources.mxfp4], ["quantize", sources.mxfp4, "-o", root / "mxfp4", "--group-size", "32"],
                 ["merge", "--method", "linear", sources.mxfp4, sources.gpt_oss, "-o", root / "mxfp4-merge"]):
        done = run_surgery(*argv)
        assert done.returncode == 0, (argv, done.stderr)
    (root / "mergekit.yml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(sources.llama), "parameters": {"weight": 0.5}},
        {"model": str(sources.sharded), "parameters": {"weight": 0.5}}]}))
    assert run_surgery("merge", "--recipe", root / "mergekit.yml", "-o", root / "mergekit").returncode == 0
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"steps": [
        {"convert": {"input": str(sources.llama), "output": str(root / "run")}}]}))
    assert run_surgery("run", root / "pipeline.yaml").returncode == 0


# ---- reporting

def table_row(family: str, results: list[tuple[Case, Outcome]]) -> dict:
    counts = {verdict: sum(outcome.verdict == verdict for _, outcome in results) for verdict in VERDICTS}
    return {"family": family, "cases": len(results), **counts}


def format_table(rows: list[dict]) -> str:
    header = ["family", "cases", CLEAN2, COMPLETE0, EXIT1, "hangs",
              "other (2 with traceback/multiple lines, leftovers)"]
    total = {"family": "total", **{key: sum(row[key] for row in rows) for key in ("cases", *VERDICTS)}}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in [*rows, total]:
        lines.append("| " + " | ".join(str(row[key]) for key in ("family", "cases", *VERDICTS)) + " |")
    return "\n".join(lines)


def failure_line(case: Case, outcome: Outcome) -> str:
    what = outcome.verdict if outcome.verdict != OTHER else outcome.reason
    code = "hang" if outcome.code is None else f"exit {outcome.code}"
    first = outcome.error_line.replace(case.workdir, "<case>")
    return f"{case.id} {case.command} | {case.mutation} | {code} | {what} | {first[:200]}"


def failures(results: list[tuple[Case, Outcome]]) -> list[str]:
    return [failure_line(case, outcome) for case, outcome in results if outcome.verdict not in PASSING]


def failure_kind(case: Case, outcome: Outcome) -> tuple:
    """What groups failures: command, exit code, verdict or reason, and the stderr line with paths and numbers
    reduced (so one library bug is one kind however many mutations reach it)."""
    line = outcome.error_line.replace(case.workdir, "<case>")
    line = re.sub(r"(/[\w.@+-]+)+", "<path>", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    line = re.sub(r"\d+", "N", line)[:140]
    reason = outcome.reason.split(" (")[0] if outcome.verdict == OTHER else outcome.verdict
    return case.family, case.command, "hang" if outcome.code is None else outcome.code, reason, line


def format_kinds(results: list[tuple[Case, Outcome]]) -> str:
    kinds: dict[tuple, list[str]] = {}
    for case, outcome in results:
        if outcome.verdict not in PASSING:
            kinds.setdefault(failure_kind(case, outcome), []).append(f"{case.id}: {case.mutation}")
    lines = []
    for (family, command, code, reason, line), members in sorted(kinds.items(), key=lambda item: str(item[0])):
        lines.append(f"- [{family}] {command}: {code}, {reason}: {line}  ({len(members)} cases, e.g. "
                     + "; ".join(members[:3]) + ")")
    return "\n".join(lines)


def save_results(path: Path, family: str, results: list[tuple[Case, Outcome]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"family": family, "results": [
        {"case": asdict(case), "outcome": asdict(outcome)} for case, outcome in results]}, indent=1))


def load_results(directory: Path) -> dict[str, list[tuple[Case, Outcome]]]:
    loaded = {}
    for file in sorted(directory.glob("*.json")):
        data = json.loads(file.read_text())
        loaded[data["family"]] = [(Case(**r["case"]), Outcome(**r["outcome"])) for r in data["results"]]
    return {family: loaded[family] for family in FAMILIES if family in loaded}


def run_everything() -> dict[str, list[tuple[Case, Outcome]]]:
    """Every family, as the pytest run does, in a temporary directory removed afterwards."""
    from contextlib import redirect_stdout

    sys.path.insert(0, str(Path(__file__).parent))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="surgery-fuzz-") as scratch, redirect_stdout(sys.stderr):
        root = Path(scratch)
        os.environ.setdefault("SURGERY_CACHE", str(root / "cache"))
        sources = build_sources(root / "sources")
        warm_up(sources, root / "warm-up")
        everything = {family: run_family(family, sources, root / family) for family in FAMILIES}
    print(f"ran {sum(map(len, everything.values()))} cases in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return everything


def main(argv: list[str]) -> None:
    if argv[:1] == ["--isolated"]:
        return isolated_main(argv[1], argv[2])
    if argv[:1] != ["--table"]:
        sys.exit("usage: python tests/fuzz_inputs.py --table [--from RESULTS_DIR]")
    if argv[1:2] == ["--from"]:
        everything = load_results(Path(argv[2]))
    else:
        everything = run_everything()
    print(format_table([table_row(family, results) for family, results in everything.items()]))
    print("\nfailure kinds:")
    print(format_kinds([item for results in everything.values() for item in results]))


if __name__ == "__main__":
    main(sys.argv[1:])
