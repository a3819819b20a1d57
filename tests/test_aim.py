"""AIM statistics: the layer-by-layer run against a whole-model forward, its memory, the AIM rule, the stats file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import make_tiny_model, save_tokenizer
from surgery.errors import BadInput
from surgery.merge.aim import (FORMAT, CalibrateConfig, aim_factors, apply_aim, calibrate, collect_activation_stats,
                               load_stats)
from surgery.runtime import calibration_blocks, load_tokenizer, streamed_model
from surgery.io import open_checkpoint


def word_text(count: int, seed: int = 0) -> str:
    """Text of ``count`` words of the tiny tokenizer's vocabulary (one token each)."""
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 100, (count,), generator=generator).tolist())


def random_blocks(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 160, (length,), generator=generator) for length in lengths]


def reference_stats(model_dir, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ_blocks mean_tokens |input| with the whole model loaded and forward pre-hooks on every weighted module."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def record(module, args):
            x = args[0].detach().double()
            assert x.shape[0] == 1  # one block per forward
            sums[name] = sums.get(name, 0) + x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
        return record

    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter) and not isinstance(module, nn.Embedding):
            module.register_forward_pre_hook(hook_for(f"{name}.weight"))
    with torch.no_grad():
        for block in blocks:
            model(block[None])
    return sums


def assert_stats_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == torch.float32 and actual[name].shape == value.shape, name
        torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def sliding_gemma3(tmp_path_factory):
    """gemma3 with a sliding window shorter than the blocks, sliding and full layers mixed."""
    path = tmp_path_factory.mktemp("gemma3-sliding") / "model"
    make_tiny_model("gemma3_text", sliding_window=8, layer_types=["sliding_attention", "full_attention"]) \
        .save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gemma2", "qwen3", "phi3"])
def test_layer_by_layer_stats_match_whole_model_hooks(tiny_checkpoints, family):
    blocks = random_blocks(24, 24, 11)
    stats = collect_activation_stats(str(tiny_checkpoints[family]), blocks, batch_tokens=64)
    expected = reference_stats(tiny_checkpoints[family], blocks)
    assert "lm_head.weight" in stats and "model.norm.weight" in stats
    assert not any("embed" in name for name in stats)
    assert_stats_close(stats, expected)


def test_sliding_window_stats_match(sliding_gemma3):
    blocks = random_blocks(20, 13, 20)
    assert_stats_close(collect_activation_stats(str(sliding_gemma3), blocks), reference_stats(sliding_gemma3, blocks))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_model_gives_the_same_logits(tiny_checkpoints, family):
    from transformers import AutoModelForCausalLM

    ids = random_blocks(16)[0][None]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).eval()(ids).logits
        with streamed_model(str(tiny_checkpoints[family])) as model:
            actual = model(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_only_the_running_layer_is_in_memory(tiny_checkpoints, family):
    with open_checkpoint(tiny_checkpoints[family]) as checkpoint:
        layer_bytes = {layer: sum(info.numel * 4 for name, info in checkpoint.tensors.items()
                                  if name.startswith(f"model.layers.{layer}."))
                       for layer in range(2)}
    seen = []
    with streamed_model(str(tiny_checkpoints[family])) as model:
        def check(name):
            def during_call(module, args):
                resident = {n: p for n, p in model.named_parameters() if not p.is_meta}
                seen.append((name, sorted(resident), sum(p.numel() * p.element_size() for p in resident.values())))
            return during_call

        for name, module in model.named_modules():
            if module._parameters.get("weight") is not None:
                module.register_forward_pre_hook(check(name))
        with torch.no_grad():
            model.get_decoder()(input_ids=random_blocks(12)[0][None], use_cache=False)
        assert all(p.is_meta for p in model.parameters())
    layer_calls = [entry for entry in seen if entry[0].startswith("model.layers.")]
    assert len(layer_calls) >= 2 * 7
    for name, resident, nbytes in layer_calls:
        layer = int(name.split(".")[2])
        assert resident and all(n.startswith(f"model.layers.{layer}.") for n in resident), (name, resident)
        assert nbytes == layer_bytes[layer]
    embedding_call = next(entry for entry in seen if entry[0] == "model.embed_tokens")
    assert embedding_call[1] == ["model.embed_tokens.weight"]


def reference_factors(stats: list[float], omega: float) -> list[float]:
    peak = max(stats)
    return [1.0 if peak == 0 else 1.0 - (a / peak) * (1.0 - omega) for a in stats]


def test_aim_factors_follow_the_formula():
    stats = [0.5, 2.0, 0.0, 1.5]
    for omega in (0.0, 0.4, 1.0):
        expected = torch.tensor(reference_factors(stats, omega))
        torch.testing.assert_close(aim_factors(torch.tensor(stats), omega), expected)
    assert aim_factors(torch.tensor(stats), 0.4).min() == pytest.approx(0.4)
    assert torch.equal(aim_factors(torch.zeros(3), 0.2), torch.ones(3))
    for omega in (-0.1, 1.5):
        with pytest.raises(BadInput, match="omega"):
            aim_factors(torch.tensor(stats), omega)


def test_three_dimensional_experts_get_factors_per_expert_and_input_row():
    """gpt-oss stores experts as (experts, inputs, outputs): each expert is normalised by its own peak, and the factor
    of input channel j scales row j of that expert's matrix."""
    per_expert = [[0.5, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.5]]
    factors = aim_factors(torch.tensor(per_expert).unsqueeze(-1), 0.4)
    expected = torch.tensor([reference_factors(row, 0.4) if max(row) > 0 else [1.0] * 3 for row in per_expert])
    torch.testing.assert_close(factors.squeeze(-1), expected)
    generator = torch.Generator().manual_seed(1)
    base, merged = torch.randn(3, 3, 5, generator=generator), torch.randn(3, 3, 5, generator=generator)
    result = apply_aim(base, merged, factors)
    for expert in range(3):
        for row in range(3):
            torch.testing.assert_close(result[expert, row],
                                       base[expert, row] + (merged[expert, row] - base[expert, row])
                                       * float(expected[expert, row]))
    with pytest.raises(BadInput):
        apply_aim(base, merged, factors.squeeze(-1))


def test_apply_aim_scales_the_change_per_input_channel():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=generator).bfloat16()
    merged = torch.randn(3, 4, generator=generator).bfloat16()
    stats = [0.5, 2.0, 0.0, 1.5]
    factors = reference_factors(stats, 0.4)
    expected = torch.tensor([[float(base[i, j]) + (float(merged[i, j]) - float(base[i, j])) * factors[j]
                              for j in range(4)] for i in range(3)])
    result = apply_aim(base, merged, aim_factors(torch.tensor(stats), 0.4))
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected)

    unchanged = apply_aim(base, merged, aim_factors(torch.tensor(stats), 1.0))
    assert torch.equal(unchanged, merged.float())
    pulled_back = apply_aim(base, merged, aim_factors(torch.tensor(stats), 0.0))
    assert torch.equal(pulled_back[:, 1], base[:, 1].float())  # the most active channel returns to the base
    assert torch.equal(pulled_back[:, 2], merged[:, 2].float())  # a silent channel keeps the merge

    norm_base, norm_merged = torch.ones(4), torch.full((4,), 3.0)
    expected_norm = torch.tensor([1.0 + 2.0 * r for r in factors])
    torch.testing.assert_close(apply_aim(norm_base, norm_merged, torch.tensor(factors)), expected_norm)
    with pytest.raises(BadInput):
        apply_aim(base, merged, torch.ones(3))


def test_calibration_blocks_cut_the_text(tiny_checkpoints):
    with open_checkpoint(tiny_checkpoints["llama"]) as checkpoint:
        tokenizer = load_tokenizer(checkpoint)
    blocks = calibration_blocks(tokenizer, word_text(1300), max_tokens=1200)
    assert [len(block) for block in blocks] == [512, 512, 176]
    assert torch.equal(torch.cat(blocks), torch.tensor(tokenizer(word_text(1300))["input_ids"][:1200]))
    with pytest.raises(BadInput, match="no tokens"):
        calibration_blocks(tokenizer, "   ", max_tokens=100)


def test_every_block_starts_with_bos_when_the_tokenizer_adds_it():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, **{f"w{i}": i + 3 for i in range(100)}}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    words = torch.tensor(tokenizer(word_text(30))["input_ids"][1:])
    blocks = calibration_blocks(tokenizer, word_text(30), max_tokens=25, block_size=10)
    assert [len(block) for block in blocks] == [10, 10, 5]
    assert all(block[0] == 1 for block in blocks)
    assert torch.equal(torch.cat([block[1:] for block in blocks]), words[:22])


def test_calibrate_writes_a_loadable_stats_file(tiny_checkpoints, tmp_path):
    source = str(tiny_checkpoints["llama"])
    text_file = tmp_path / "calibration.txt"
    text_file.write_text(word_text(700), encoding="utf-8")
    summary = calibrate(CalibrateConfig(source, tmp_path / "out" / "stats.safetensors", calibration=text_file,
                                        max_tokens=600)).summary()
    assert (summary["tokens"], summary["blocks"], summary["modules"]) == (600, 2, 20)

    stats = load_stats(tmp_path / "out" / "stats.safetensors")
    with open_checkpoint(source) as checkpoint:
        blocks = calibration_blocks(load_tokenizer(checkpoint), word_text(700), max_tokens=600)
    assert_stats_close(stats, reference_stats(source, blocks))
    with safe_open(str(tmp_path / "out" / "stats.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT
    assert (metadata["source"], metadata["tokens"], metadata["blocks"], metadata["block_size"], metadata["seed"]) \
        == (source, "600", "2", "512", "0")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["stats.safetensors"]


def test_self_generated_calibration_is_deterministic(tiny_checkpoints, tmp_path):
    source = str(tiny_checkpoints["llama"])
    outputs = []
    for run, seed in enumerate((5, 5, 6)):
        path = tmp_path / f"run{run}.safetensors"
        summary = calibrate(CalibrateConfig(source, path, max_tokens=96, seed=seed)).summary()
        assert summary["tokens"] > 48
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_bad_inputs_are_one_line_errors(tiny_checkpoints, tmp_path):
    source = str(tiny_checkpoints["llama"])
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(BadInput, match="nowhere.txt"):
        calibrate(CalibrateConfig(source, tmp_path / "stats.safetensors", calibration=missing))
    assert not (tmp_path / "stats.safetensors").exists()

    not_text = tmp_path / "binary.txt"
    not_text.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(BadInput, match="binary.txt"):
        calibrate(CalibrateConfig(source, tmp_path / "stats.safetensors", calibration=not_text))

    weights = tiny_checkpoints["llama"] / "model.safetensors"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not safetensors")
    for path in (weights, garbage, tmp_path / "absent.safetensors"):
        with pytest.raises(BadInput) as raised:
            load_stats(path)
        assert path.name in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(BadInput, match="no tokens"):
        collect_activation_stats(source, [])
