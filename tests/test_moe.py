"""`surgery moe`: dense models → Mixtral / Qwen2-MoE / Qwen3-MoE, on mergekit-moe's YAML.

The outputs are loaded by transformers: each expert's prompts must be routed to that expert, every tensor must be
the one its source holds, and the routers must be the formulas written here (and mergekit-moe's, run on the same
YAML).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import make_tiny_model, run_surgery, save_bpe_tokenizer, save_tokenizer

MERGEKIT_MOE = Path(sys.executable).parent / "mergekit-moe"
PROMPTS = [["w1 w2 w3", "w4 w5 w3"], ["w10 w11 w12", "w13 w12"], ["w20 w21 w22"]]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """family → [base, expert 1, expert 2, expert 3] directories (tiny transformers models with a tokenizer)."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        paths = []
        for seed in range(4):
            path = root / family / str(seed)
            # transformers reads a qwen directory's tokenizer as Qwen2Tokenizer: a byte-level BPE one, then
            qwen = family.startswith("qwen")
            model = make_tiny_model(family, seed=seed, **({"vocab_size": 300} if qwen else {}))
            with torch.no_grad():  # qwen2's q/k/v biases of about 1 would make every prompt's attention alike
                for name, parameter in model.named_parameters():
                    if name.endswith("bias"):
                        parameter.normal_(0, 0.02)
            model.save_pretrained(path)
            (save_bpe_tokenizer if qwen else save_tokenizer)(path)
            paths.append(path)
        out[family] = paths
    return out


def write_config(tmp_path, base, experts, **fields) -> Path:
    config = {"base_model": str(base), "dtype": "float32",
              "experts": [{"source_model": str(path), "positive_prompts": prompts}
                          for path, prompts in zip(experts, PROMPTS)], **fields}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tensors_of(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def routed(directory, prompts, tokenizer_of=None) -> list[list[int]]:
    """For each prompt, the top expert of every layer's router at its last token, in transformers (the prompts
    tokenized as ``tokenizer_of``'s tokenizer does, by default the output's own)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_of or directory)
    tops = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids, output_router_logits=True).router_logits
            tops.append([int(layer.reshape(ids.shape[1], -1)[-1].argmax()) for layer in logits])
    return tops


def mlp_inputs(directory, prompt) -> list[torch.Tensor]:
    """What each layer's MLP receives at the prompt's last token, in transformers' own model of ``directory``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    seen = []
    handles = [layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, -1]))
               for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


def expected_gate(base, prompts, layer) -> torch.Tensor:
    mean = torch.stack([mlp_inputs(base, prompt)[layer] for prompt in prompts]).mean(0)
    return mean / mean.norm()


def test_mixtral_from_llama_routes_each_prompt_to_its_expert(dense, tmp_path):
    base, *experts = dense["llama"]
    result = run_surgery("moe", write_config(tmp_path, base, experts), "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "mixtral, 3 experts (2 per token), 2 layers, gates hidden" in result.stdout
    for expert, prompts in enumerate(PROMPTS):
        assert routed(tmp_path / "out", prompts) == [[expert, expert]] * len(prompts)
    out, base_tensors = tensors_of(tmp_path / "out"), tensors_of(base)
    for index, path in enumerate(experts):
        source = tensors_of(path)
        for local, projection in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            assert torch.equal(out[f"model.layers.1.block_sparse_moe.experts.{index}.{local}.weight"],
                               source[f"model.layers.1.mlp.{projection}.weight"])
    for name, tensor in base_tensors.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], tensor), name
    for layer in range(2):
        gate = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        for expert, prompts in enumerate(PROMPTS):
            torch.testing.assert_close(gate[expert], expected_gate(base, prompts, layer), atol=1e-5, rtol=1e-4)


def test_same_weights_and_routing_as_mergekit_moe(dense, tmp_path):
    """mergekit-moe on the same YAML: the same tensors but the routers, and the same routing of every prompt. Its
    gate rows are the hidden states entering each layer (in bfloat16); ours what the layer's MLP, where the router
    sits, receives: after the attention and its norm."""
    if not MERGEKIT_MOE.exists():
        pytest.fail("mergekit is not installed (make test installs it with the test extra)")
    base, *experts = dense["llama"]
    config = write_config(tmp_path, base, experts)
    done = subprocess.run([str(MERGEKIT_MOE), str(config), str(tmp_path / "mergekit"), "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_surgery("moe", config, "-o", tmp_path / "ours").returncode == 0
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mergekit", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(theirs_state)
    for name, tensor in theirs_state.items():
        if not name.endswith("mlp.gate.weight"):
            assert torch.equal(ours_state[name], tensor), name
    for expert, prompts in enumerate(PROMPTS):
        assert routed(tmp_path / "ours", prompts) == routed(tmp_path / "mergekit", prompts)


def test_qwen2_moe_with_a_shared_expert(dense, tmp_path):
    base, first, second, shared = dense["qwen2"]
    config = write_config(tmp_path, base, [first, second],
                          shared_experts=[{"source_model": str(shared), "positive_prompts": ["w30 w31"]}])
    result = run_surgery("moe", config, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for expert, prompts in enumerate(PROMPTS[:2]):
        assert routed(tmp_path / "out", prompts, tokenizer_of=base) == [[expert, expert]] * len(prompts)
    out, source = tensors_of(tmp_path / "out"), tensors_of(shared)
    assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"],
                       source["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.1.mlp.shared_expert_gate.weight"][0],
                               expected_gate(base, ["w30 w31"], 1), atol=1e-5, rtol=1e-4)
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(out[bias], tensors_of(base)[bias])


def test_qwen3_moe_from_cheap_embeddings(dense, tmp_path):
    base, *experts = dense["qwen3"]
    result = run_surgery("moe", write_config(tmp_path, base, experts, gate_mode="cheap_embed",
                                              experts_per_token=1), "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    import transformers

    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == ("qwen3_moe", 3, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    embedding = tensors_of(base)["model.embed_tokens.weight"]
    gate = tensors_of(tmp_path / "out")["model.layers.1.mlp.gate.weight"]
    for expert, prompts in enumerate(PROMPTS):
        ids = [i for prompt in prompts
               for i in tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False)["input_ids"]]
        total = embedding[ids].sum(0)
        torch.testing.assert_close(gate[expert], total / total.norm(), atol=1e-6, rtol=1e-5)


def test_random_gates_are_seeded_and_residual_scale_applies(dense, tmp_path):
    base, *experts = dense["llama"]
    config = write_config(tmp_path, base, experts, gate_mode="random")
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["residual_scale"] = 0.5
    config.write_text(yaml.safe_dump(data))
    for name in ("a", "b"):
        assert run_surgery("moe", config, "--seed", "3", "-o", tmp_path / name).returncode == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    out = tensors_of(tmp_path / "a")
    torch.testing.assert_close(out["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                               0.5 * tensors_of(experts[1])["model.layers.0.mlp.down_proj.weight"])
    assert run_surgery("moe", config, "--seed", "4", "-o", tmp_path / "c").returncode == 0
    assert not torch.equal(out["model.layers.0.block_sparse_moe.gate.weight"],
                           tensors_of(tmp_path / "c")["model.layers.0.block_sparse_moe.gate.weight"])


@pytest.mark.parametrize(("change", "words"), [
    ({"gate_mode": "smart"}, "gate_mode 'smart'"),
    ({"experts_per_token": 4}, "experts_per_token 4"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"shared_experts": [{"source_model": "{qwen}", "positive_prompts": ["w1"]}]}, "takes no shared experts"),
    ({"architecture": "qwen3"}, "made from qwen3 models"),
    ({"experts": [{"source_model": "{e1}", "positive_prompts": ["w1"]}, {"source_model": "{e2}",
                                                                         "positive_prompts": ["w1"]}]},
     "same prompts"),
    ({"experts": [{"source_model": "{e1}"}, {"source_model": "{e2}", "positive_prompts": ["w1"]}]},
     "needs positive_prompts"),
    ({"experts": [{"source_model": "{e1}", "positive_prompts": ["w1"]}, {"source_model": "{qwen}",
                                                                         "positive_prompts": ["w2"]}]},
     "experts come from the base's family"),
])
def test_bad_configs_are_exit_2_and_write_nothing(change, words, dense, tmp_path):
    base, *experts = dense["llama"]
    config = write_config(tmp_path, base, experts)
    data = yaml.safe_load(config.read_text())
    text = yaml.safe_dump({**data, **change}).replace("{e1}", str(experts[0])).replace("{e2}", str(experts[1]))
    config.write_text(text.replace("{qwen}", str(dense["qwen2"][1])))
    result = run_surgery("moe", config, "-o", tmp_path / "out")
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_pipeline_step_builds_the_moe_and_reruns_when_its_yaml_changes(dense, tmp_path):
    """``moe: {config: moe.yaml, output: ...}`` in a pipeline: the same output as the command, then quantized; a
    second run skips both, a changed YAML reruns both."""
    from test_pipeline import statuses

    base, *experts = dense["llama"]
    config = write_config(tmp_path, base, experts)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"steps": [
        {"moe": {"config": str(config), "output": str(tmp_path / "moe"), "seed": 3}},
        {"quantize": {"input": str(tmp_path / "moe"), "group_size": 32, "output": str(tmp_path / "q4")}}]}))
    first = run_surgery("run", pipeline)
    assert first.returncode == 0, first.stderr
    assert statuses(first.stdout) == ["ran (no output yet)", "ran (an earlier step ran)"]
    direct = run_surgery("moe", config, "-o", tmp_path / "direct", "--seed", "3")
    assert direct.returncode == 0, direct.stderr
    piped, alone = tensors_of(tmp_path / "moe"), tensors_of(tmp_path / "direct")
    assert piped.keys() == alone.keys() and all(torch.equal(piped[name], alone[name]) for name in piped)
    assert statuses(run_surgery("run", pipeline).stdout) == ["up to date"] * 2

    write_config(tmp_path, base, experts, experts_per_token=1)
    changed = run_surgery("run", pipeline)
    assert changed.returncode == 0, changed.stderr
    assert statuses(changed.stdout) == ["ran (inputs changed)", "ran (an earlier step ran)"]
    assert '"num_experts_per_tok": 1' in (tmp_path / "moe" / "config.json").read_text()

    pipeline.write_text(yaml.safe_dump({"steps": [{"moe": {"config": str(config), "output": str(tmp_path / "x"),
                                                           "gate_mode": "random"}}]}))
    refused = run_surgery("run", pipeline)
    assert refused.returncode == 2 and "'gate_mode' is not an option of moe" in refused.stderr
