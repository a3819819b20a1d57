"""surgery quantize --format gguf: the Q4_0 / Q8_0 blocks read back with gguf.GGUFReader, decoded here byte by
byte and compared with an independent numpy quantizer (llama.cpp's reference rounding) applied to the source weights
in llama.cpp's Q/K row order; loaded by transformers' GGUF loader with the decoded weights' logits; its tokenizer
round-trips; surgery's own reader opens it; determinism and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, run_surgery

HEADS, KV_HEADS, VOCAB = 4, 2, 300


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    """A tiny llama with a byte-level BPE tokenizer (what --format gguf exports)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("gguf") / "llama"
    make_tiny_model("llama", vocab_size=VOCAB).save_pretrained(path)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 3 + ["hello world"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def written(bpe_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-out")
    outputs = {}
    for name, extra in {"q4": [], "q8": ["--bits", "8"], "hqq4": ["--method", "hqq"]}.items():
        done = run_surgery("quantize", bpe_llama, "-o", root / name, "--format", "gguf", *extra, "--json")
        assert done.returncode == 0, done.stderr
        outputs[name] = root / name
    return outputs


def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute: each head's two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def reference_blocks(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's reference quantizers. Q4_0: d = (value of largest magnitude) / −8, q = min(15, trunc(x/d + 8.5));
    Q8_0: d = amax / 127, q = round-half-away(x/d). Returns (d as float16, q) per block of 32."""
    blocks = weight.astype(np.float64).reshape(weight.shape[0], -1, 32)
    if bits == 4:
        signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        d = signed_max / -8
        inverse = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip(np.trunc(blocks * inverse[..., None] + 8.5), 0, 15)
    else:
        d = np.abs(blocks).max(-1) / 127
        scaled = blocks * np.divide(1, d, out=np.zeros_like(d), where=d != 0)[..., None]
        q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return d.astype(np.float32).astype(np.float16), q.astype(np.int64)


def decode_blocks(raw: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF block bytes → (d float16, q): Q4_0 = 2-byte d + 16 bytes (byte j: q[j] low nibble, q[j+16] high);
    Q8_0 = 2-byte d + 32 int8."""
    size = 18 if bits == 4 else 34
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if bits == 4:
        low, high = blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4
        q = np.concatenate([low, high], axis=-1).astype(np.int64)
    else:
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int64)
    return d, q


def dequantize_blocks(d, q, bits):
    values = (q - (8 if bits == 4 else 0)) * d.astype(np.float32)[..., None]
    return values.reshape(values.shape[0], -1)


def gguf_file(directory):
    (path,) = directory.glob("*.gguf")
    return path


@pytest.mark.parametrize("name,bits", [("q4", 4), ("q8", 8)])
def test_blocks_match_an_independent_quantizer(written, bpe_llama, name, bits):
    import gguf

    source = load_file(bpe_llama / "model.safetensors")
    reader = gguf.GGUFReader(gguf_file(written[name]))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == KV_HEADS
    for layer in range(2):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", HEADS), ("self_attn.k_proj", "attn_k", KV_HEADS),
                              ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            weight = source[f"model.layers.{layer}.{hf}.weight"].float().numpy()
            weight = llama_cpp_rows(weight, heads) if heads else weight
            tensor = tensors[f"blk.{layer}.{gg}.weight"]
            assert tensor.tensor_type.name == ("Q4_0" if bits == 4 else "Q8_0")
            d, q = decode_blocks(np.asarray(tensor.data), bits)
            want_d, want_q = reference_blocks(weight, bits)
            assert np.array_equal(d, want_d) and np.array_equal(q, want_q), (layer, hf)
            assert np.array_equal(dequantize_blocks(d, q, bits),
                                  gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape))
    assert tensors["token_embd.weight"].tensor_type.name == "F32"  # float32 source: embeddings kept float32
    assert tensors["output.weight"].tensor_type.name == "F32"      # lm_head ignored by default


def test_transformers_loads_it_with_the_decoded_logits_and_tokenizer(written, bpe_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.io import open_checkpoint

    path = gguf_file(written["q4"])
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(bpe_llama, dtype=torch.float32).eval()
    expected = AutoModelForCausalLM.from_pretrained(bpe_llama, dtype=torch.float32).eval()
    import gguf

    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for layer in range(2):
            for hf, gg, heads in (("self_attn.q_proj", "attn_q", HEADS), ("self_attn.k_proj", "attn_k", KV_HEADS),
                                  ("self_attn.v_proj", "attn_v", None), ("self_attn.o_proj", "attn_output", None),
                                  ("mlp.gate_proj", "ffn_gate", None), ("mlp.up_proj", "ffn_up", None),
                                  ("mlp.down_proj", "ffn_down", None)):
                values = dequantize_blocks(*decode_blocks(np.asarray(tensors[f"blk.{layer}.{gg}.weight"].data), 4), 4)
                if heads:  # undo the interleaving: llama_cpp_rows is a permutation, invert it by indices
                    index = llama_cpp_rows(np.arange(values.shape[0])[:, None], heads)[:, 0]
                    values = values[np.argsort(index)]
                params[f"model.layers.{layer}.{hf}.weight"].copy_(torch.from_numpy(values))
        ids = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3, 250]])
        got, want, original = loaded(ids).logits, expected(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, original, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    source_tokenizer = AutoTokenizer.from_pretrained(bpe_llama)
    text = "the lazy fox says hello world"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    with open_checkpoint(path) as ckpt:  # surgery's own reader undoes the permutation again
        assert torch.allclose(ckpt.get("model.layers.1.self_attn.k_proj.weight"),
                              params["model.layers.1.self_attn.k_proj.weight"], atol=1e-6)


def test_hqq_lowers_the_weight_error_deterministically(written, bpe_llama, tmp_path):
    rtn = json.loads((written["q4"] / "surgery.json").read_text())["output"]
    hqq = json.loads((written["hqq4"] / "surgery.json").read_text())["output"]
    assert hqq["weight_relative_error"] < rtn["weight_relative_error"]
    again = tmp_path / "again"
    assert run_surgery("quantize", bpe_llama, "-o", again, "--format", "gguf", "--method", "hqq").returncode == 0
    for path in written["hqq4"].iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("model,args,message", [
    ("bpe", ["--scheme", "asym"], "--scheme asym"),
    ("wordlevel", [], "byte-level BPE"),
    ("qwen2", [], "llama family"),
])
def test_bad_input_is_one_line(bpe_llama, tiny_checkpoints, tmp_path, model, args, message):
    source = {"bpe": bpe_llama, "wordlevel": tiny_checkpoints["llama"], "qwen2": tiny_checkpoints["qwen2"]}[model]
    done = run_surgery("quantize", source, "-o", tmp_path / "out", "--format", "gguf", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,bits", [("q4", 4), ("q8", 8)])
def test_verify_reads_the_gguf_output(written, bpe_llama, name, bits):
    """verify on a GGUF output (its directory): per module the weight error of the blocks decoded here against the
    source weight in llama.cpp's row order, output cosines and the end-to-end KL; 8 bits closer than 4."""
    import gguf

    done = run_surgery("verify", written[name], "--reference", bpe_llama, "--tokens", "32", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "gguf" and report["bits"] == bits and report["group_size"] == 32
    assert report["passed"] and report["provenance"]["matches"]
    source = load_file(bpe_llama / "model.safetensors")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(gguf_file(written[name])).tensors}
    layers = {layer["module"]: layer for layer in report["layers"]}
    assert len(layers) == 14
    for layer in range(2):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", HEADS), ("self_attn.k_proj", "attn_k", KV_HEADS),
                              ("mlp.down_proj", "ffn_down", None)):
            weight = source[f"model.layers.{layer}.{hf}.weight"].float().numpy()
            weight = llama_cpp_rows(weight, heads) if heads else weight
            approx = dequantize_blocks(*decode_blocks(np.asarray(tensors[f"blk.{layer}.{gg}.weight"].data), bits),
                                       bits)
            expected = np.linalg.norm(approx - weight) / np.linalg.norm(weight)
            assert layers[f"model.layers.{layer}.{hf}"]["weight_rel_error"] == pytest.approx(expected, rel=1e-4)
    assert report["min_output_cosine"] > (0.98 if bits == 4 else 0.9999)
    assert 0 < report["end_to_end"]["kl"] < (0.05 if bits == 4 else 0.001)
    file_report = json.loads(run_surgery("verify", gguf_file(written[name]), "--reference", bpe_llama, "--tokens",
                                         "32", "--json").stdout)
    assert file_report["layers"] == report["layers"]  # the .gguf file itself reads the same
