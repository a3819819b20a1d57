"""surgery.runtime: the model runtime AIM, selfcal, verify and the adapters share, against transformers' own model."""

from __future__ import annotations

import pytest
import torch

from surgery.io import open_checkpoint
from surgery.runtime import (LayerStream, Loader, agreement, build_model, input_hooks, loaded_model, mean_kl,
                             overridden_weights, parameter_aliases, sampled_ids, top1_agreement)


def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(rows: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_layers_run_by_hand_give_the_model_logits(tiny_checkpoints, family):
    """LayerStream: captured inputs, each layer loaded, run and freed in turn, then the head: transformers' logits."""
    tokens = ids()
    with torch.no_grad():
        expected = reference(tiny_checkpoints[family])(tokens).logits
    with open_checkpoint(tiny_checkpoints[family]) as ckpt:
        stream = LayerStream(ckpt, chunk=2)
        hidden, kwargs = stream.layer_inputs(tokens)
        for index, layer in stream.each_layer():
            assert not any(p.is_meta for p in layer.parameters())
            hidden = [stream.run(index, h, kwargs[c]) for c, h in enumerate(hidden)]
        assert all(p.is_meta for layer in stream.layers for p in layer.parameters())
        actual = torch.cat([stream.logits(chunk, h) for chunk, h in zip(stream.chunks(tokens), hidden)])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_input_hooks_see_what_the_module_receives_and_overrides_are_undone(tiny_checkpoints):
    tokens = ids(2, 8)
    with open_checkpoint(tiny_checkpoints["llama"]) as ckpt:
        model = loaded_model(ckpt)
        name = "model.layers.1.mlp.down_proj"
        module = model.get_submodule(name)
        seen = []
        with input_hooks(model, {name: seen.append}), torch.no_grad():
            before = model(tokens, use_cache=False).logits
        with torch.no_grad():
            output = module(seen[0])
        outputs = []
        handle = module.register_forward_hook(lambda m, args, out: outputs.append(out))
        with torch.no_grad():
            model(tokens, use_cache=False)
        handle.remove()
        torch.testing.assert_close(outputs[0], output)
        assert len(seen) == 1  # the hook is gone after the block

        original = module.weight
        with overridden_weights({name: module}, {name: torch.zeros_like(original)}), torch.no_grad():
            changed = model(tokens, use_cache=False).logits
        assert module.weight is original
        assert not torch.allclose(changed, before)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens, use_cache=False).logits, before)


def test_loader_keeps_ties_and_frees_to_meta(tiny_checkpoints):
    with open_checkpoint(tiny_checkpoints["qwen2"]) as ckpt:  # tied embedding and lm_head
        model = build_model(ckpt.config, ckpt.source)
        loader = Loader(model, ckpt)
        loader.load(model)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(model.lm_head.weight, ckpt.get("model.embed_tokens.weight").float())
        loader.free(model)
        assert all(p.is_meta for p in model.parameters())
        assert any(len(names) == 2 for names in parameter_aliases(model).values())  # still one tied parameter


def test_sampling_is_seeded_and_scores_are_kl_and_top1(tiny_checkpoints):
    with open_checkpoint(tiny_checkpoints["llama"]) as ckpt:
        model = loaded_model(ckpt)
    state = torch.random.get_rng_state()
    first, again, other = (sampled_ids(model, 1, 2, tokens=16, seed=seed, sequences=4) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is restored
    assert first.shape == (4, 5) and torch.equal(first, again) and not torch.equal(first, other)
    assert (first[:, 0] == 1).all()

    log_p = torch.log_softmax(torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), -1)
    log_q = torch.log_softmax(torch.tensor([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]]), -1)
    kl_second = float((log_p[0, 1].exp() * (log_p[0, 1] - log_q[0, 1])).sum())
    assert agreement(log_p, log_q) == pytest.approx({"kl": kl_second / 2, "top1_agreement": 0.5, "tokens": 2})
    mask = torch.tensor([[False, True]])
    assert float(mean_kl(log_p.half(), log_q, mask)) == pytest.approx(kl_second, rel=1e-2)
    assert top1_agreement(log_p, log_q, mask) == 0.0 and top1_agreement(log_p, log_p) == 1.0
