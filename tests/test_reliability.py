"""Each fault a fuzz of malformed inputs found (issue #17), pinned: exit 2 with one line, nothing lost or half-written.

The seeded fuzz over whole families of such inputs is tests/test_fuzz.py; these are the exact reproductions.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_surgery
from surgery.errors import BadInput
from surgery.io import TensorInfo, write_checkpoint


def assert_bad_input(result, *names: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("surgery: WARNING")]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("surgery: error:"), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def copy_of(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


# ---- data loss and trust


def pipeline_file(tmp_path: Path, steps: list) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"steps": steps}))
    return path


def test_pipeline_never_deletes_a_directory_it_did_not_make(tiny_checkpoints, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for force in (False, True):
        step = {"convert": {"input": str(tiny_checkpoints["llama"]), "output": str(mine), "force": force}}
        result = run_surgery("run", pipeline_file(tmp_path, [step]))
        assert_bad_input(result, str(mine))
        assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"


def test_pipeline_replaces_an_unstamped_output_only_with_force(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    assert run_surgery("convert", tiny_checkpoints["llama"], "-o", out).returncode == 0  # made by hand, no stamp
    before = (out / "model.safetensors").read_bytes()
    step = {"convert": {"input": str(tiny_checkpoints["llama"]), "output": str(out), "dtype": "bfloat16"}}
    refused = run_surgery("run", pipeline_file(tmp_path, [step]))
    assert_bad_input(refused, str(out), "force: true")
    assert (out / "model.safetensors").read_bytes() == before
    step["convert"]["force"] = True
    done = run_surgery("run", pipeline_file(tmp_path, [step]))
    assert done.returncode == 0, done.stderr
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    again = run_surgery("run", pipeline_file(tmp_path, [step]))  # now stamped: up to date, and replaceable
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.parametrize("where", ["outside", "absolute"])
def test_shard_index_cannot_name_a_file_outside_the_model(where, sharded_llama, tmp_path):
    model = copy_of(sharded_llama, tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    shutil.copy(model / shard, outside / "x.safetensors")
    index["weight_map"][name] = "../outside/x.safetensors" if where == "outside" else str(outside / "x.safetensors")
    index_path.write_text(json.dumps(index))
    for command in (["inspect", model], ["push", model, "me/repo", "--dry-run"], ["convert", model, "-o",
                                                                                  tmp_path / "out"]):
        assert_bad_input(run_surgery(*command), "x.safetensors")
    assert not (tmp_path / "out").exists()


def gguf_copy(smollm2_gguf: Path, target: Path):
    """A writable copy of the SmolLM2 GGUF and its parsed reader (to find where fields lie in the file)."""
    import gguf

    shutil.copy(smollm2_gguf, target)
    return gguf.GGUFReader(target, "r")


def patch(path: Path, reader, part: np.ndarray, value: bytes) -> None:
    position = part.ctypes.data - reader.data.ctypes.data
    with open(path, "r+b") as file:
        file.seek(position)
        file.write(value)


def test_gguf_offset_wrapping_around_is_refused(smollm2_gguf, tmp_path):
    path = tmp_path / "model.gguf"
    reader = gguf_copy(smollm2_gguf, path)
    tensor = reader.tensors[3]
    patch(path, reader, tensor.field.parts[-1], (2 ** 64 - 1).to_bytes(8, "little"))
    del reader
    assert_bad_input(run_surgery("convert", path, "-o", tmp_path / "out"), str(path), tensor.name, "outside the file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value", [("llama.attention.head_count_kv", 7), ("llama.attention.head_count", 0)])
def test_gguf_head_counts_are_validated(key, value, smollm2_gguf, tmp_path):
    path = tmp_path / "model.gguf"
    reader = gguf_copy(smollm2_gguf, path)
    field = reader.fields[key]
    patch(path, reader, field.parts[field.data[0]], np.array([value], dtype=field.parts[field.data[0]].dtype).tobytes())
    del reader
    assert_bad_input(run_surgery("inspect", path), str(path))


class Payload:
    """A pickle that, when loaded, writes a marker file: proof that something unpickled untrusted data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_evaluations_never_unpickle(tiny_checkpoints, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_checkpoints["llama"] / "config.json", model)
    marker = tmp_path / "marker"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    for command in (["eval", "perplexity", model, "--lengths", "16"], ["eval", "passkey", model, "--lengths", "64"]):
        assert_bad_input(run_surgery(*command), str(model))
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    lines += ["steps: [{convert: {input: x, output: y}}]"]
    for kind, argv in (("pipeline", ["run"]), ("recipe", ["merge", "-o", tmp_path / "out", "--recipe"])):
        path = tmp_path / f"{kind}.yaml"
        path.write_text("\n".join(lines) + "\n")
        started = time.monotonic()
        assert_bad_input(run_surgery(*argv, path), str(path), "aliases")
        assert time.monotonic() - started < 10


def with_weight(source: Path, target: Path, name: str, value: float) -> Path:
    model = copy_of(source, target)
    tensors = load_file(model / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("name,value", [("model.layers.0.self_attn.q_proj.weight", float("nan")),
                                        ("model.layers.1.input_layernorm.weight", float("inf"))])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_quantize_refuses_nan_and_inf(name, value, fmt, tiny_checkpoints, tmp_path):
    model = with_weight(tiny_checkpoints["llama"], tmp_path / "model", name, value)
    result = run_surgery("quantize", model, "-o", tmp_path / "out", "--group-size", "32", "--format", fmt)
    assert_bad_input(result, name, "NaN or Inf")
    assert not (tmp_path / "out").exists()


# ---- wrong exit codes


def test_deeply_nested_json_and_yaml(tiny_checkpoints, sharded_llama, tmp_path):
    model = copy_of(tiny_checkpoints["llama"], tmp_path / "model")
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_bad_input(run_surgery("inspect", model), "config.json", "nested")
    sharded = copy_of(sharded_llama, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_bad_input(run_surgery("inspect", sharded), "model.safetensors.index.json")
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_bad_input(run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out"), str(recipe), "nested")


RECIPE_FIELDS = [
    ("seed: abc", "seed"), ("seed: [1]", "seed"), ("method: {a: 1}", "method"), ("parameters: 5", "parameters"),
    ("parameters: {density: heavy}", "density"), ("parameters: {lambda: heavy}", "lambda"),
    ("parameters: {density: -0.2}", "density"), ("parameters: {density: 1.5}", "density"),
    ("dtype: []", "dtype"), ("dtype: float128", "dtype"), ("tokenizer_source: []", "tokenizer_source"),
    ("dare_rescale: sometimes", "dare_rescale"), ("chat_template: nonsense", "chat_template"),
]


@pytest.mark.parametrize("line,key", RECIPE_FIELDS)
def test_recipe_fields_of_the_wrong_type(line, key, tiny_checkpoints, tmp_path):
    base, other = tiny_checkpoints["llama"], tiny_checkpoints["llama"]
    fields = {"method": "ties", "base": str(base), "models": [{"model": str(other)}]}
    extra = yaml.safe_load(line)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**fields, **extra}))
    for dry in ([], ["--dry-run"]):
        assert_bad_input(run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out", *dry), key)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry,key", [({"model": "M", "parameters": {"weight": 1e308}}, "weight"),
                                       ({"model": "M", "colour": "red"}, "colour"),
                                       ({"model": {"x": 1}}, "model")])
def test_model_entries_are_validated(entry, key, tiny_checkpoints, tmp_path):
    entry = json.loads(json.dumps(entry).replace('"M"', json.dumps(str(tiny_checkpoints["llama"]))))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(tiny_checkpoints["llama"]), "models": [entry]}))
    assert_bad_input(run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out"), key)


def test_slices_and_manifest_recipes_are_validated(tiny_checkpoints, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "passthrough", "slices": [{"sources": "x"}]}))
    assert_bad_input(run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out"), "sources")
    manifest = tmp_path / "surgery.json"
    manifest.write_text(json.dumps({"surgery_version": "0.1.0", "command": "merge", "recipe": {
        "method": 5, "models": [{"model": str(tiny_checkpoints["llama"])}]}}))
    assert_bad_input(run_surgery("merge", "--recipe", manifest, "-o", tmp_path / "out"), "method")
    anchor = tmp_path / "anchor.yaml"
    anchor.write_text("method: ties\nmodels: &m [*m]\n")
    assert_bad_input(run_surgery("merge", "--recipe", anchor, "-o", tmp_path / "out", "--dry-run"), "itself")


CONFIG_VALUES = [("tie_word_embeddings", "yes"), ("hidden_size", 1.5), ("num_attention_heads", 0),
                 ("model_type", ["llama"]), ("torch_dtype", "float128"), ("architectures", [None]),
                 ("vocab_size", 2 ** 63), ("num_key_value_heads", 3)]


@pytest.mark.parametrize("key,value", CONFIG_VALUES)
def test_config_values_are_validated_where_the_config_is_read(key, value, tiny_checkpoints, tmp_path):
    model = copy_of(tiny_checkpoints["llama"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    for command in (["inspect", model], ["convert", model, "-o", tmp_path / "out"],
                    ["quantize", model, "-o", tmp_path / "out"], ["merge", model, model, "--method", "linear", "-o",
                                                                   tmp_path / "out"]):
        assert_bad_input(run_surgery(*command), "config.json", key)
    assert not (tmp_path / "out").exists()


def test_push_with_a_null_shard_name(sharded_llama, tmp_path):
    model = copy_of(sharded_llama, tmp_path / "model")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = None
    index_path.write_text(json.dumps(index))
    assert_bad_input(run_surgery("push", model, "me/repo", "--dry-run"), "model.safetensors.index.json")


@pytest.mark.parametrize("options,key", [({"output": 5}, "output"), ({"output=x": True}, "output=x"),
                                         ({"": 1}, "''"), ({"help": True}, "help"), ({"dry_run": True}, "dry_run"),
                                         ({"dtype": {"a": 1}}, "dtype"), ({"force": "yes"}, "force")])
def test_pipeline_step_keys_are_the_commands_options(options, key, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = {"convert": {"input": str(tiny_checkpoints["llama"]), "output": str(tmp_path / "out"), **options}}
    result = run_surgery("run", pipeline_file(tmp_path, [step]))
    assert_bad_input(result, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # no output, no stamp, no "x"


@pytest.mark.parametrize("repo", ["a/..", "org/.."])
def test_malformed_repo_ids(repo):
    assert_bad_input(run_surgery("inspect", repo), repo)


def test_full_disk_names_the_output_and_the_space_needed(tmp_path):
    huge = TensorInfo("t", torch.float32, (1 << 40,))  # 4.4 TB planned: more than this disk has
    with pytest.raises(BadInput, match=r"out: no space left on the device \(4398\.05 GB needed"):
        write_checkpoint(tmp_path / "out", [huge], lambda name: pytest.fail("nothing is computed"))
    assert list(tmp_path.iterdir()) == []


def test_dry_run_plans_earlier_outputs_as_local_paths(tiny_checkpoints, tmp_path):
    """The README's own pipeline shape: relative outputs read by later steps are never looked up on the Hub."""
    steps = [{"convert": {"input": str(tiny_checkpoints["llama"]), "output": "out/converted"}},
             {"extend": {"input": "out/converted", "rope": "linear", "factor": 2, "output": "out/extended"}}]
    pipeline = pipeline_file(tmp_path, steps)
    result = subprocess.run([sys.executable, "-m", "surgery", "run", str(pipeline), "--dry-run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "no-hub")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("would run") == 2 and not (tmp_path / "out").exists()


def test_kill_between_the_two_renames_is_repaired_by_the_next_run(tiny_checkpoints, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = finished.stdout.strip()
    out = tmp_path / "out"
    assert run_surgery("convert", tiny_checkpoints["llama"], "-o", out).returncode == 0
    old = (out / "model.safetensors").read_bytes()
    aside = tmp_path / f".out.replaced-{dead}-abc"  # killed after moving the old output aside
    aside.mkdir()
    out.rename(aside / "out")
    (tmp_path / f".out.partial-{dead}-def").mkdir()
    refused = run_surgery("convert", tiny_checkpoints["llama"], "-o", out)  # the old output is back, so it exists
    assert_bad_input(refused, "already exists")
    assert (out / "model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    aside.mkdir()  # killed after moving the new output in: the old one is deleted
    (aside / "out").mkdir()
    assert run_surgery("convert", tiny_checkpoints["llama"], "-o", out, "--force").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_layer_count_mismatch_names_the_models(tiny_checkpoints, tmp_path):
    from conftest import make_tiny_model

    deeper = tmp_path / "deeper"
    make_tiny_model("llama", num_hidden_layers=3).save_pretrained(deeper)
    result = run_surgery("merge", tiny_checkpoints["llama"], deeper, "--method", "ties", "-o", tmp_path / "out")
    assert_bad_input(result, f"{tiny_checkpoints['llama']} 2", f"{deeper} 3")


def test_the_rope_types_configs_are_checked_against_are_transformers_own():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from surgery.io.config_check import ROPE_TYPES

    assert set(ROPE_INIT_FUNCTIONS) | {"default"} <= ROPE_TYPES


def test_infinite_rank_and_huge_padding_are_bad_input(family_pairs, tmp_path):
    base, ft = family_pairs["llama"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "tsv", "base": str(base), "models": [str(ft)],
                                      "parameters": {"rank": float("inf")}}))
    assert_bad_input(run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out"), "rank")
    started = time.monotonic()
    result = run_surgery("merge", base, ft, "--method", "ties", "--pad-to-multiple-of", "100000000", "--dry-run",
                         "-o", tmp_path / "out")
    assert_bad_input(result, "--pad-to-multiple-of")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("manifest", ["[]", '{"command": "quantize", "inputs": {"a": 1}}',
                                      '{"command": "quantize", "inputs": [5]}', "{not json"])
def test_verify_with_a_malformed_manifest(manifest, tiny_checkpoints, tmp_path):
    out = tmp_path / "q"
    assert run_surgery("quantize", tiny_checkpoints["llama"], "-o", out, "--group-size", "32").returncode == 0
    (out / "surgery.json").write_text(manifest)
    assert_bad_input(run_surgery("verify", out, "--reference", tiny_checkpoints["llama"]), "surgery.json")


@pytest.mark.parametrize("manifest", ['{"command": "extend", "output": {"rope": {"attention_factor": 1}}}',
                                      '{"command": "extend", "output": {"rope": {"inv_freq": "x", '
                                      '"attention_factor": 1}}}', "{not json"])
def test_verify_rope_with_a_malformed_manifest(manifest, tiny_checkpoints, tmp_path):
    out = tmp_path / "long"
    assert run_surgery("extend", tiny_checkpoints["llama"], "-o", out, "--rope", "linear", "--factor", "2") \
        .returncode == 0
    (out / "surgery.json").write_text(manifest)
    assert_bad_input(run_surgery("verify-rope", out), "surgery.json")


def test_verify_of_a_checkpoint_with_no_quantized_module(tiny_checkpoints, tmp_path):
    fake = copy_of(tiny_checkpoints["llama"], tmp_path / "fake")
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                         "num_bits": 4, "group_size": 32, "symmetric": True}}}}
    (fake / "config.json").write_text(json.dumps(config))
    assert_bad_input(run_surgery("verify", fake, "--reference", tiny_checkpoints["llama"], "--any-reference"),
                     "no quantized module")


def test_a_failed_command_leaves_no_parent_directories_it_made(tiny_checkpoints, tmp_path):
    model = with_weight(tiny_checkpoints["llama"], tmp_path / "model", "model.norm.weight", float("nan"))
    assert_bad_input(run_surgery("quantize", model, "-o", tmp_path / "new" / "deep" / "out"), "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_force_does_not_replace_a_directory_with_only_a_config(tiny_checkpoints, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert_bad_input(run_surgery("convert", tiny_checkpoints["llama"], "-o", mine, "--force"), "holds no checkpoint")
    assert [p.name for p in mine.iterdir()] == ["config.json"]
