"""Model families beyond the dense ones: MoE, vision-language, MLA, Conv1D, custom Linear classes.

Every family here is a tiny checkpoint transformers itself builds and saves (tests/conftest.py). Roles are checked
against the modules of the model transformers builds; quantized outputs are loaded by transformers and their logits
compared with the model whose weights are the decoded ones; merges of MoE models are checked expert by expert
against formulas written here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import MORE_FAMILIES, MULTIMODAL, ROLE_FAMILIES, make_family_model, run_surgery
from surgery.arch import Architecture

FAMILIES = sorted({*MORE_FAMILIES, *ROLE_FAMILIES})
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "phimoe", "granitemoe", "glm4_moe",
       "llama4"}
# How each family names an expert's projections in its checkpoint (the test's own table).
EXPERT_LEAVES = {"w1": "mlp_gate", "gate_proj": "mlp_gate", "w3": "mlp_up", "up_proj": "mlp_up", "w2": "mlp_down",
                 "down_proj": "mlp_down"}
PROJECTIONS = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "attn_q_a", "attn_q_b", "attn_kv_a",
               "attn_kv_b", "mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up", "linear"}
TOKENS = torch.tensor([[1, 5, 9, 13, 40, 77]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (model, directory it was saved to) for every family, made once."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        model = make_family_model(family)
        model.save_pretrained(root / family)
        out[family] = (model, root / family)
    return out


def names_in(directory):
    names = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names += list(handle.keys())
    return names


def config_of(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_come_from_the_modules_transformers_builds(family, saved, caplog):
    model, directory = saved[family]
    with caplog.at_level(logging.WARNING):
        arch = Architecture.from_config(config_of(directory))
    assert arch.known and "unknown architecture" not in caplog.text and "guessed" not in caplog.text
    state = model.state_dict()
    vision = model.get_encoder(modality="image") if family in MULTIMODAL else None
    vision_ids = {id(t) for t in vision.state_dict(keep_vars=True).values()} if vision is not None else set()
    text_ids = {id(t) for module in (model.get_decoder(), model.get_output_embeddings())
                for t in module.state_dict(keep_vars=True).values()}
    seen_experts = {}
    for name in names_in(directory):
        role = arch.role(name)
        if name in state:  # stored as the model holds it: check against the module itself
            path, _, leaf = name.rpartition(".")
            module = model.get_submodule(path)
            parameter = getattr(module, leaf)
            expected_part = "vision" if id(parameter) in vision_ids else "text" if id(parameter) in text_ids \
                else "projector"
            assert role.part == expected_part, (name, role)
            if role.kind == "embedding":
                assert module is model.get_input_embeddings() or expected_part != "text", name
            elif role.kind == "lm_head":
                assert module is model.get_output_embeddings(), name
            elif role.kind == "norm":
                assert "norm" in type(module).__name__.lower() or "norm" in leaf, name
            elif role.kind == "router":
                assert re.search(r"router|gate", path.rsplit(".", 1)[-1] + type(module).__name__, re.I), name
            elif role.kind in PROJECTIONS and role.experts is None:
                assert isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D", (name, module)
                assert role.linear == isinstance(module, torch.nn.Linear)
            if role.experts is not None:  # a fused 3-D expert tensor
                assert type(module).__name__.endswith("Experts") and parameter.shape[0] == role.experts
            if role.part == "text":
                assert role.kind != "other", name
        else:  # a per-expert checkpoint tensor transformers fuses as it loads, or a renamed one
            match = re.search(r"experts\.(\d+)\.(\w+)\.weight$", name)
            if match:
                assert role.expert == int(match.group(1)) and role.kind == EXPERT_LEAVES[match.group(2)], name
                seen_experts.setdefault(role.layer, set()).add(role.expert)
            else:
                assert role.kind != "other" or role.part != "text", (name, role)
        if role.layer is not None:
            assert f".{role.layer}." in name
    summary = arch.summary()
    if family in MOE:
        text = model.config.get_text_config()
        count = next(getattr(text, key) for key in ("num_local_experts", "num_experts", "n_routed_experts")
                     if getattr(text, key, None))
        assert summary["experts_per_layer"] == count and summary["active_experts"] == text.num_experts_per_tok
        assert all(experts == set(range(count)) for experts in seen_experts.values())
        assert summary["shared_experts"] == (family in {"qwen2_moe", "deepseek_v3", "glm4_moe", "llama4"})
    else:
        assert "experts_per_layer" not in summary
    if family in MULTIMODAL:
        assert set(summary["parameters_by_part"]) >= {"text", "vision"}
        assert sum(summary["parameters_by_part"].values()) == sum(p.numel() for p in model.parameters())


def test_inspect_shows_experts_and_parts(saved):
    result = run_surgery("inspect", saved["qwen2_moe"][1], "--tensors")
    assert result.returncode == 0, result.stderr
    assert "experts       4 per layer in 2 MoE layers, 2 active per token, with shared experts" in result.stdout
    assert re.search(r"mlp\.experts\.3\.up_proj\.weight .* mlp_up L1 expert 3", result.stdout)
    assert re.search(r"mlp\.shared_expert_gate\.weight .* router L0 shared", result.stdout)
    result = run_surgery("inspect", saved["llava"][1], "--json", "--tensors")
    report = json.loads(result.stdout)
    parts = report["architecture"]["parameters_by_part"]
    assert parts["vision"] > 0 and parts["projector"] > 0 and parts["text"] > 0
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["vision_tower.encoder.layers.0.self_attn.q_proj.weight"]["part"] == "vision"
    assert rows["multi_modal_projector.linear_1.weight"]["part"] == "projector"
    assert result.stderr == ""


def test_unknown_model_type_falls_back_to_names_with_a_warning(saved, tmp_path, caplog):
    directory = tmp_path / "custom"
    shutil.copytree(saved["mixtral"][1], directory)
    config = config_of(directory)
    config["model_type"] = "my_custom_moe"  # custom code: transformers has no such type
    (directory / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        arch = Architecture.from_config(config)
    assert not arch.known and "unknown architecture 'my_custom_moe'" in caplog.text
    assert arch.role("model.layers.1.self_attn.q_proj.weight").kind == "attn_q"
    assert arch.role("model.layers.0.block_sparse_moe.gate.weight").kind == "router"


# ---------------------------------------------------------------------------------------------------------------
# Quantization


def decoded_reference(source, quantized, destination):
    """A copy of ``source`` whose quantized weights are replaced by the decoded ones, saved with the source's own
    names and config: transformers loads it through the same conversions as the quantized output."""
    from surgery.quantize.verify import dequantized_weights, open_quantized

    shutil.copytree(source, destination)
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    with open_quantized(str(quantized)) as ckpt:
        decoded = dict(dequantized_weights(ckpt))
    assert decoded and set(decoded) <= set(tensors)
    for name, weight in decoded.items():
        tensors[name] = weight.to(tensors[name].dtype)
    for path in destination.glob("*.safetensors"):
        path.unlink()
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination, set(decoded)


def logits_of(directory):
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    extra = {}
    if (getattr(config, "quantization_config", None) or {}).get("quant_method") == "mxfp4":
        # transformers' CPU path; with `kernels` installed it would otherwise fetch Triton kernels from the Hub
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model, info = cls.from_pretrained(directory, output_loading_info=True, dtype=torch.float32, **extra)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


QUANTIZED = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "phimoe", "glm4_moe", "llava",
             "qwen2_vl", "gemma3", "olmo2", "cohere", "granite", "starcoder2"]


@pytest.mark.parametrize("family", QUANTIZED)
def test_quantized_output_loads_with_the_logits_of_its_decoded_weights(family, saved, tmp_path):
    _, source = saved[family]
    out = tmp_path / "w4"
    result = run_surgery("quantize", source, "-o", out)
    assert result.returncode == 0, result.stderr
    reference, quantized = decoded_reference(source, out, tmp_path / "decoded")
    torch.testing.assert_close(logits_of(out), logits_of(reference), atol=2e-4, rtol=1e-4)
    arch = Architecture.from_config(config_of(source))
    roles = {name: arch.role(name) for name in names_in(source)}
    for name, role in roles.items():
        if role.kind in {"router", "norm", "embedding", "position_embedding"} or role.part != "text":
            assert name not in quantized, name  # never quantized; vision and projector: not by default
    expected = {name for name, role in roles.items() if role.kind in PROJECTIONS and role.part == "text"
                and name.endswith(".weight") and (role.linear or role.expert is not None)}
    assert quantized == expected
    if family in MOE:
        assert any(roles[name].expert is not None for name in quantized)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_verify_measures_each_expert_against_the_reference(family, saved, tmp_path):
    source = shutil.copytree(saved[family][1], tmp_path / "source")
    config = config_of(source)
    (source / "config.json").write_text(json.dumps({**config, "bos_token_id": 1}))  # verify generates from BOS
    assert run_surgery("quantize", source, "-o", tmp_path / "w4").returncode == 0
    result = run_surgery("verify", tmp_path / "w4", "--reference", source, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    layers = {layer["module"]: layer for layer in report["layers"]}
    reference, _ = decoded_reference(source, tmp_path / "w4", tmp_path / "decoded")
    decoded, exact = tensors_of(reference), tensors_of(source)
    experts = [module for module in layers if ".experts." in module]
    assert len(experts) == 24
    for module in experts:  # against the decoded weights, computed here from the files
        name = f"{module}.weight"
        want = float((decoded[name] - exact[name]).norm() / exact[name].norm())
        assert layers[module]["weight_rel_error"] == pytest.approx(want, rel=1e-5)
    assert report["end_to_end"]["kl"] < 0.05 and report["passed"]


def test_vision_tower_is_quantized_when_not_ignored(saved, tmp_path):
    _, source = saved["llava"]
    out = tmp_path / "w4"
    result = run_surgery("quantize", source, "--ignore", "lm_head", "-o", out)
    assert result.returncode == 0, result.stderr
    reference, quantized = decoded_reference(source, out, tmp_path / "decoded")
    assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in quantized  # its 32 inputs: the 32 fallback
    assert "multi_modal_projector.linear_1.weight" in quantized
    torch.testing.assert_close(logits_of(out), logits_of(reference), atol=2e-4, rtol=1e-4)


def test_fused_experts_are_reported_not_silently_kept(saved, tmp_path):
    _, source = saved["gpt_oss"]
    result = run_surgery("quantize", source, "-o", tmp_path / "w4")
    assert result.returncode == 0, result.stderr
    assert "4 fused MoE expert tensors" in result.stderr and "mlp.experts" in result.stderr
    reference, quantized = decoded_reference(source, tmp_path / "w4", tmp_path / "decoded")
    assert not [name for name in quantized if "experts" in name or "router" in name]
    torch.testing.assert_close(logits_of(tmp_path / "w4"), logits_of(reference), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "words", "options"), [
    ("falcon", "FalconLinear", ()), ("gpt2", "Conv1D", ()),
    ("mixtral", "--format gptq cannot hold MoE experts", ("--format", "gptq"))])
def test_unloadable_quantizations_are_refused_by_name(family, words, options, saved, tmp_path):
    result = run_surgery("quantize", saved[family][1], "-o", tmp_path / "w4", *options)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w4").exists()


# ---------------------------------------------------------------------------------------------------------------
# Merging


def tensors_of(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def ties_one_model(base: torch.Tensor, model: torch.Tensor, density: float) -> torch.Tensor:
    """TIES with one model and weight 1: the base plus the top ``density`` of the task vector by magnitude."""
    delta = (model - base).reshape(-1)
    keep = delta.abs().topk(max(1, int(density * delta.numel()))).indices
    trimmed = torch.zeros_like(delta)
    trimmed[keep] = delta[keep]
    return base + trimmed.reshape(base.shape)


@pytest.fixture(scope="module")
def moe_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    pairs = {}
    for family in ("mixtral", "gpt_oss", "llava"):
        for seed, name in ((0, "base"), (1, "ft")):
            make_family_model(family, seed).save_pretrained(root / family / name)
        pairs[family] = (root / family / "base", root / family / "ft")
    return pairs


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_ties_merges_experts_one_by_one(family, moe_pairs, tmp_path):
    base, ft = moe_pairs[family]
    result = run_surgery("merge", base, ft, "--method", "ties", "--density", "0.3", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, before, after = tensors_of(tmp_path / "out"), tensors_of(base), tensors_of(ft)
    arch = Architecture.from_config(config_of(base))
    experts = [name for name in merged if arch.role(name).expert is not None or arch.role(name).experts]
    assert experts
    for name in experts:
        if arch.role(name).experts:  # fused (weights and gpt-oss's biases): each expert trimmed on its own
            want = torch.stack([ties_one_model(b, f, 0.3) for b, f in zip(before[name], after[name])])
            whole = ties_one_model(before[name], after[name], 0.3)
            if merged[name].ndim == 3:  # (the tiny models' biases are zeros)
                assert not torch.equal(want, whole)  # the test tells per-expert from whole-tensor trimming
        else:
            want = ties_one_model(before[name], after[name], 0.3)
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=0)
    logits_of(tmp_path / "out")


def test_svd_merges_fused_experts_per_expert_matrix(moe_pairs, tmp_path):
    base, ft = moe_pairs["gpt_oss"]
    result = run_surgery("merge", base, ft, "--method", "star", "--eta", "0.4", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, before, after = tensors_of(tmp_path / "out"), tensors_of(base), tensors_of(ft)
    name = "model.layers.0.mlp.experts.down_proj"
    for expert in range(before[name].shape[0]):  # STAR: the truncated spectrum of each expert's task matrix
        delta = (after[name][expert] - before[name][expert]).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        kept = int((torch.cumsum(s, 0) / s.sum() < 0.4).sum()) + 1
        rescaled = s[:kept] * s.sum() / s[:kept].sum()
        want = before[name][expert].double() + (u[:, :kept] * rescaled) @ vh[:kept]
        torch.testing.assert_close(merged[name][expert].double(), want, atol=2e-4, rtol=0)


def test_routers_merge_by_default_or_stay_the_base(moe_pairs, tmp_path):
    base, ft = moe_pairs["mixtral"]
    router = "model.layers.1.block_sparse_moe.gate.weight"
    for option, expect_base in (((), False), (("--routers", "base"), True)):
        out = tmp_path / f"out{len(option)}"
        result = run_surgery("merge", base, ft, "--method", "task_arithmetic", "--weights", "0.5", *option,
                             "-o", out)
        assert result.returncode == 0, result.stderr
        merged, before, after = tensors_of(out), tensors_of(base), tensors_of(ft)
        want = before[router] if expect_base else before[router] + 0.5 * (after[router] - before[router])
        torch.testing.assert_close(merged[router], want, atol=1e-6, rtol=0)
        expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
        torch.testing.assert_close(merged[expert], before[expert] + 0.5 * (after[expert] - before[expert]),
                                   atol=1e-6, rtol=0)


def test_different_expert_counts_are_refused(moe_pairs, tmp_path):
    import transformers

    from conftest import COMMON

    other = tmp_path / "eight"
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, num_local_experts=8,
                                                               num_experts_per_tok=2)).save_pretrained(other)
    result = run_surgery("merge", moe_pairs["mixtral"][0], other, "--method", "ties", "-o", tmp_path / "out")
    assert result.returncode == 2 and "experts per MoE layer differ" in result.stderr
    assert ": 4" in result.stderr and ": 8" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("modules", ["text", "vision", "all"])
def test_vision_language_merges_the_chosen_parts(modules, moe_pairs, tmp_path):
    base, ft = moe_pairs["llava"]
    options = () if modules == "text" else ("--modules", modules)
    result = run_surgery("merge", base, ft, "--method", "task_arithmetic", "--weights", "0.5", *options,
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, before, after = tensors_of(tmp_path / "out"), tensors_of(base), tensors_of(ft)
    arch = Architecture.from_config(config_of(base))
    for name, tensor in merged.items():
        part = arch.role(name).part
        chosen = modules == "all" or (part == "text") == (modules == "text")
        want = before[name] + 0.5 * (after[name] - before[name]) if chosen else before[name]
        torch.testing.assert_close(tensor, want, atol=1e-6, rtol=0, msg=name)
    logits_of(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Extending


def yarn_inv_freq(base: float, dim: int, s: float, trained: int, fast: float = 32, slow: float = 1):
    """YaRN's reference ramp (its pair indices rounded outwards), as in tests/test_extend.py."""
    import math

    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def pair(rotations):
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(pair(fast)), 0), min(math.ceil(pair(slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return theta / s * ramp + theta * (1 - ramp)


def extended(saved, family, factor, tmp_path):
    """``family``'s tiny model extended by yarn ``factor``, loaded by transformers, and its text rotary module."""
    import transformers

    result = run_surgery("extend", saved[family][1], "--rope", "yarn", "--factor", str(factor), "-o", tmp_path / "x")
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "x")
    return model, model.model.language_model.rotary_emb


def test_gemma3_extends_its_full_attention_layers_only(saved, tmp_path):
    model, rotary = extended(saved, "gemma3", 4, tmp_path)
    text = config_of(saved["gemma3"][1])["text_config"]
    full = text["rope_parameters"]["full_attention"]
    local = text["rope_parameters"]["sliding_attention"]
    torch.testing.assert_close(rotary.full_attention_inv_freq.double(),
                               yarn_inv_freq(full["rope_theta"], 16, 4.0, 256), atol=1e-6, rtol=1e-5)
    unchanged = local["rope_theta"] ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(rotary.sliding_attention_inv_freq.double(), unchanged, atol=1e-7, rtol=1e-6)
    assert model.config.text_config.max_position_embeddings == 1024


def test_qwen2_vl_keeps_its_mrope_sections_over_yarn_frequencies(saved, tmp_path):
    model, rotary = extended(saved, "qwen2_vl", 2, tmp_path)
    torch.testing.assert_close(rotary.inv_freq.double(), yarn_inv_freq(10000.0, 16, 2.0, 256), atol=1e-6,
                               rtol=1e-5)
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=TOKENS).logits).all()


def test_vision_language_model_merges_with_its_text_only_fine_tune(moe_pairs, tmp_path):
    """mergekit's modular definitions: a llava base and a llama fine-tune of its language model (other tensor names,
    another class) merge by language-model position; the vision tower and projector stay the base's."""
    import transformers

    from conftest import COMMON

    base = moe_pairs["llava"][0]
    vlm = transformers.LlavaForConditionalGeneration.from_pretrained(base)
    text = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    text.load_state_dict({name.replace("model.language_model.", "model."): value
                          for name, value in vlm.state_dict().items()
                          if "language_model" in name or name == "lm_head.weight"})
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in text.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    text.save_pretrained(tmp_path / "llama-ft")
    result = run_surgery("merge", base, tmp_path / "llama-ft", "--method", "task_arithmetic", "--weights", "0.5",
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, before, fine_tune = tensors_of(tmp_path / "out"), tensors_of(base), tensors_of(tmp_path / "llama-ft")
    assert set(merged) == set(before)
    arch = Architecture.from_config(config_of(base))
    for name, tensor in merged.items():
        if arch.role(name).part == "text":
            counterpart = fine_tune[name.replace("language_model.model.", "model.").replace("language_model.", "")]
            torch.testing.assert_close(tensor, before[name] + 0.5 * (counterpart - before[name]), atol=1e-6, rtol=0)
        else:
            assert torch.equal(tensor, before[name]), name
    logits_of(tmp_path / "out")
    result = run_surgery("merge", base, tmp_path / "llama-ft", "--method", "task_arithmetic", "--modules", "all",
                         "-o", tmp_path / "all")
    assert result.returncode == 2 and "missing" in result.stderr and "--modules text" in result.stderr
    assert not (tmp_path / "all").exists()


def aim_ratio(aim: torch.Tensor, plain: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per input channel, the share of the merge's change AIM kept (rows where the change is zero ignored)."""
    change = plain - base
    ratio = torch.where(change.abs() > 1e-6, (aim - base) / change, torch.nan)
    return ratio.nanmean(dim=0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_aim_scales_moe_experts_by_their_own_inputs(family, moe_pairs, tmp_path):
    """Each expert's statistics are its routed tokens' inputs: its change is scaled per input channel, the most
    active channel keeping ω of it — per expert matrix of gpt-oss's 3-D tensors (experts, inputs, outputs) too."""
    from conftest import save_tokenizer

    base = shutil.copytree(moe_pairs[family][0], tmp_path / "base")
    save_tokenizer(base)
    (tmp_path / "text.txt").write_text(" ".join(f"w{i * 7 % 90}" for i in range(300)))
    common = ("merge", base, moe_pairs[family][1], "--method", "task_arithmetic")
    result = run_surgery(*common, "--aim", "--omega", "0.4", "--calibration", tmp_path / "text.txt",
                         "--max-tokens", "128", "-o", tmp_path / "aim")
    assert result.returncode == 0, result.stderr
    assert run_surgery(*common, "-o", tmp_path / "plain").returncode == 0
    aim, plain, before = tensors_of(tmp_path / "aim"), tensors_of(tmp_path / "plain"), tensors_of(base)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(aim[query], plain[query])
    assert "without AIM" not in result.stderr
    if family == "gpt_oss":  # (experts, inputs, outputs): each expert's input channels are its rows
        matrices = [(name, expert, lambda t, e=expert: t[e].T) for name in aim
                    if name.endswith(("experts.gate_up_proj", "experts.down_proj")) for expert in range(4)]
    else:
        matrices = [(name, None, lambda t: t) for name in aim if ".experts." in name and name.endswith(".weight")]
    scaled = 0
    for name, expert, matrix in matrices:
        ratio = aim_ratio(*(matrix(t[name].double()) for t in (aim, plain, before)))
        ratio = ratio[~ratio.isnan()]
        assert ratio.min() >= 0.4 - 1e-4 and ratio.max() <= 1 + 1e-4, (name, expert)
        if expert is not None and ratio.min() > 1 - 1e-4:
            continue  # no token routed to it: silent channels keep all of the change
        torch.testing.assert_close(ratio.min(), torch.tensor(0.4, dtype=torch.float64), atol=1e-4, rtol=0)
        scaled += 1
    # mixtral: 2 layers × 4 experts × w1, w2, w3; gpt-oss: top-2 routing reaches ≥ 2 experts of each layer's 2
    assert scaled >= 8 if family == "gpt_oss" else scaled == 24


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_the_runtime_runs_moe_checkpoints_as_transformers_does(family, tmp_path):
    """The streaming runtime assembles fused experts and renamed tensors, and reads stored buffers (DeepSeek's
    router correction bias, made non-zero here) instead of their values at construction."""
    import transformers

    from surgery.io import open_checkpoint
    from surgery.runtime import loaded_model, streamed_model

    model = make_family_model(family)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer))
    model.save_pretrained(tmp_path / "model")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=TOKENS).logits
        with open_checkpoint(str(tmp_path / "model")) as ckpt:
            torch.testing.assert_close(loaded_model(ckpt)(input_ids=TOKENS).logits, want, atol=1e-5, rtol=1e-5)
            with streamed_model(ckpt) as streamed:
                torch.testing.assert_close(streamed(input_ids=TOKENS).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_routed_inputs_rebuild_the_experts_forward(family):
    """What AIM and verify see of each expert (its routed tokens, act(gate) * up) recombined by hand gives what
    transformers' experts module computes."""
    from surgery.runtime.experts import expert_intermediate, routed_inputs

    model = make_family_model(family)
    experts = next(module for module in model.modules() if type(module).__name__.endswith("Experts"))
    torch.manual_seed(0)
    hidden = torch.randn(7, 64)
    top_k = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    with torch.no_grad():
        want = experts(hidden, top_k, weights)
        got = torch.zeros_like(want)
        seen = 0
        for expert, x in routed_inputs(experts, (hidden, top_k, weights), {}):
            tokens = (top_k == expert).any(dim=-1).nonzero().flatten()
            share = (weights * (top_k == expert)).sum(dim=-1)[tokens, None]
            down = torch.nn.functional.linear(expert_intermediate(experts, expert, x), experts.down_proj[expert])
            got.index_add_(0, tokens, down * share)
            seen += x.shape[0]
    assert seen == 14
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
