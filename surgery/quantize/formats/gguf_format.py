"""GGUF output (``--format gguf``): llama-family checkpoints as one ``.gguf`` file, Q4_0 (4 bits) or Q8_0 (8 bits),
or a ``--gguf-type``: llama.cpp's K-quant mixes (Q4_K_M, Q5_K_M, Q6_K, Q4_K_S) or its blocks of 32 (Q4_1, Q5_0,
Q5_1).

    from surgery.quantize import QuantizeConfig, quantize
    quantize(QuantizeConfig("smollm2-dir", "smol-gguf", bits=4, format="gguf"))   # smol-gguf/model-Q4_0.gguf

Written through the ``gguf`` package (``GGUFWriter``, ``gguf.quants``) as llama.cpp's convert_hf_to_gguf.py does for
the llama family: ``llama.*`` hyperparameters, names from ``gguf.TensorNameMap``, and the Q/K rows permuted into
llama.cpp's rotary layout (the inverse of what transformers undoes when reading). Decoder Linear weights are
quantized in blocks of 32 (``--group-size`` does not apply; ignored modules stay float); embeddings and ``lm_head``
are float16 (float32 when the source is float32), norms float32. Q4_0: per block an fp16 scale d and x = (q − 8)·d;
Q8_0: x = q·d with q int8. Method rtn is llama.cpp's own reference quantizer (``gguf.quants.quantize``); hqq fits a
symmetric grid with fp16 scales, packed into the same blocks where it beats llama.cpp's block. The tokenizer: copied from a
GGUF source's ``tokenizer.*`` metadata, or exported from a byte-level BPE ``tokenizer.json`` (tokens, token types,
merges, special ids; pre-tokenizer "default"); anything else is BadInput. Read back (``surgery verify``) with surgery's GGUF reader, which dequantizes each tensor
with ``gguf.quants.dequantize`` and undoes the Q/K permutation (transformers' tensor processor). With ``--imatrix``
(surgery/quantize/imatrix.py) every type but Q8_0 is written by kquants.quantize_k's search under the importance
matrix, and the file records it (``quantize.imatrix.*``, as llama-quantize does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.io.loader_check import check_gguf
from surgery.io.writer import atomic_directory
from surgery.quantize.formats.base import Encoded, Fit, Plan, QuantFormat, Written, finite_float
from surgery.quantize.grid import Grid, Scheme
from surgery.quantize.kquants import IMPORTANCE_KINDS, quantize_k

BLOCK = 32
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# --gguf-type → (its bits, the type of most tensors); the _M / _S mixes raise some tensors (see tensor_types)
GGUF_TYPES = {"Q4_0": (4, "Q4_0"), "Q8_0": (8, "Q8_0"), "Q4_K_S": (4, "Q4_K"), "Q4_K_M": (4, "Q4_K"),
              "Q5_K_M": (5, "Q5_K"), "Q6_K": (6, "Q6_K"), "Q4_1": (4, "Q4_1"), "Q5_0": (5, "Q5_0"),
              "Q5_1": (5, "Q5_1")}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# llama.cpp's fallback where a K-quant's 256-weight super-blocks do not divide a row
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
WRITTEN_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}  # → bits


def gguf_type_of(bits: int, gguf_type: str | None) -> str:
    """The file's quantization type: ``gguf_type``, or Q4_0 for 4 bits and Q8_0 for 8 without one.

    Args:
        bits: the quantization bits.
        gguf_type: a ``--gguf-type`` value, or None.

    Returns:
        A key of GGUF_TYPES.

    Example: ``gguf_type_of(8, None)   # "Q8_0"``
    """
    return gguf_type or ("Q4_0" if bits == 4 else "Q8_0")


def file_name(kind: str) -> str:
    """The name of the GGUF file written for quantization type ``kind``.

    Args:
        kind: a key of GGUF_TYPES.

    Returns:
        The file name inside the output directory.

    Example: ``file_name("Q4_K_M")   # "model-Q4_K_M.gguf"``
    """
    return f"model-{kind}.gguf"


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in the _M mixes: the first and last
    eighth, and every third layer between.

    Args:
        layer: the layer's index.
        layers: how many layers hold such a tensor.

    Returns:
        Whether ``layer`` is one of them.

    Example: ``[i for i in range(8) if use_more_bits(i, 8)]   # [0, 3, 6, 7]``
    """
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_types(kind: str, modules: dict[str, tuple[str, int | None, int]]) -> dict[str, str]:
    """Each quantized module's GGML type under llama.cpp's mix for ``kind`` (llama-quant.cpp, llama family):
    Q4_K_M and Q5_K_M raise attn_v and ffn_down to Q6_K in :func:`use_more_bits` layers; Q4_K_S raises the first
    four attn_v and the first eighth of ffn_down to Q5_K; lm_head, where it is quantized, is Q6_K. A K-quant whose
    super-blocks of 256 do not divide a module's input dimension falls back as llama.cpp's does (Q4_K → Q5_0,
    Q5_K → Q5_1, Q6_K → Q8_0).

    Args:
        kind: a key of GGUF_TYPES.
        modules: module → (its role kind, layer index, input dimension), in the checkpoint's order.

    Returns:
        Module → GGML type name.

    Example: ``tensor_types("Q4_K_M", {"model.layers.0.self_attn.v_proj": ("attn_v", 0, 256)})   # {...: "Q6_K"}``
    """
    base = GGUF_TYPES[kind][1]
    values = [module for module, (role, _, _) in modules.items() if role == "attn_v"]
    layers = 1 + max((layer for _, layer, _ in modules.values() if layer is not None), default=0)
    types = {}
    for module, (role, layer, columns) in modules.items():
        chosen = base
        if role == "lm_head" and base in K_QUANTS:
            chosen = "Q6_K"
        elif role == "attn_v":
            index = values.index(module)
            if kind in ("Q4_K_M", "Q5_K_M") and use_more_bits(index, len(values)):
                chosen = "Q6_K"
            elif kind == "Q4_K_S" and index < 4:
                chosen = "Q5_K"
        elif role == "mlp_down" and layer is not None:
            if kind in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, layers):
                chosen = "Q6_K"
            elif kind == "Q4_K_S" and layer < layers // 8:
                chosen = "Q5_K"
        if chosen in K_QUANTS and columns % 256:
            chosen = K_FALLBACK[chosen]
        types[module] = chosen
    return types


def check_source(config: dict, source: str) -> None:
    """BadInput unless GGUF can write the model: the llama family (llama, mistral without a sliding window) and
    no rope scaling.

    Args:
        config: the source's ``config.json``.
        source: the source's name, for the messages.

    Example: ``check_source({"model_type": "gpt2"}, "org/model")   # BadInput: ... writes the llama family ...``
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BadInput(f"{source}: --format gguf writes the llama family ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                       f"not {model_type!r}")
    if model_type == "mistral" and config.get("sliding_window"):
        raise BadInput(f"{source}: --format gguf: mistral with a sliding window is not written (llama layout only)")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise BadInput(f"{source}: --format gguf: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                       f"written")


def _permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_cpp_rows(name: str, tensor: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """A q/k projection's weight or bias (by ``name``, with or without ``.weight``) in llama.cpp's row order; any
    other tensor as it is."""
    if name.endswith(("self_attn.q_proj", "self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _permute_for_llama_cpp(tensor, heads)
    if name.endswith(("self_attn.k_proj", "self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return _permute_for_llama_cpp(tensor, kv_heads)
    return tensor


def _encode_blocks(grid: Grid) -> np.ndarray:
    """A symmetric grid with group size 32 → Q4_0 / Q8_0 bytes, (rows, blocks · bytes per block) uint8."""
    rows, columns = grid.q.shape
    d = grid.scale.to(torch.float16).numpy().view(np.uint8).reshape(rows, -1, 2)
    q = grid.q.numpy().astype(np.int16).reshape(rows, -1, BLOCK)
    if grid.scheme.bits == 4:
        unsigned = (q + 8).astype(np.uint8)
        packed = unsigned[..., :16] | (unsigned[..., 16:] << 4)  # byte j: q[j] low nibble, q[j + 16] high
    else:
        packed = q.astype(np.int8).view(np.uint8)
    return np.concatenate([d, packed], axis=-1).reshape(rows, -1)


def quantize_weight(weight: torch.Tensor, bits: int, reference_only: bool,
                    fit: Callable[[torch.Tensor, Scheme], Grid], kind: str | None = None,
                    importance: torch.Tensor | None = None) -> np.ndarray:
    """One weight (already in llama.cpp's row order) → block bytes. ``reference_only`` (rtn): llama.cpp's reference
    quantizer. Otherwise per block the fitted grid or llama.cpp's, whichever is closer to the weight (Q4_0's
    reference uses the signed extreme, so all 16 levels, which a symmetric fit started from amax / 7.5 does not
    always beat).

    Args:
        weight: (rows, columns) float weight in llama.cpp's row order.
        bits: 4 (Q4_0) or 8 (Q8_0).
        reference_only: store llama.cpp's blocks as they are (the method is rtn).
        fit: ``fit(weight, scheme) → Grid``, the method's symmetric grid with group size 32.
        kind: the GGML type (default: Q4_0 for 4 bits, Q8_0 for 8); K-quants (surgery/quantize/kquants.py) and
            Q5_0 / Q5_1 are written by their rounding to nearest, whatever the method.
        importance: the input columns' mean squared activations (``--imatrix``): the scales of every type but
            Q8_0 are searched under them (kquants.quantize_k), whatever ``reference_only`` says.

    Returns:
        (rows, blocks · bytes per block) uint8.

    Example::

        data = quantize_weight(weight, 4, False, lambda w, scheme: hqq(w, scheme, torch.float16))
    """
    import gguf

    kind = kind or gguf_type_of(bits, None)
    if importance is not None and kind in IMPORTANCE_KINDS:
        return quantize_k(weight.float().numpy(), kind, importance.float().numpy())
    if kind in K_QUANTS:
        return quantize_k(weight.float().numpy(), kind)
    reference = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType[kind])
    if reference_only or kind not in ("Q4_0", "Q8_0"):
        return reference
    fitted = _encode_blocks(fit(weight.float(), Scheme(bits, BLOCK, True)))
    rows = weight.shape[0]

    def block_errors(data: np.ndarray) -> torch.Tensor:
        return (_dequantize_bytes(data, kind) - weight).reshape(rows, -1, BLOCK).pow(2).sum(-1)

    better = (block_errors(fitted) < block_errors(reference)).numpy()[..., None]
    chosen = np.where(better, fitted.reshape(rows, better.shape[1], -1), reference.reshape(rows, better.shape[1], -1))
    return np.ascontiguousarray(chosen.reshape(rows, -1))


def _dequantize_bytes(data: np.ndarray, kind: str) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])))


# ------------------------------------------------------------------------------------------------- tokenizer

def _copy_gguf_tokenizer(writer, path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(field.name, field.contents(), kind)


def _special_id(tokenizer: dict, config: dict, vocab: dict, name: str) -> int | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return vocab.get(value) if isinstance(value, str) else None


def _export_bpe_tokenizer(writer, files: dict[str, bytes], source: str) -> None:
    if "tokenizer.json" not in files:
        raise BadInput(f"{source}: --format gguf needs the tokenizer: a GGUF source or a tokenizer.json")
    tokenizer = json.loads(files["tokenizer.json"])
    model = tokenizer.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(tokenizer.get("pre_tokenizer")) + json.dumps(tokenizer.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise BadInput(f"{source}: --format gguf exports byte-level BPE tokenizers only (this one is "
                       f"{model.get('type')!r}); quantize from a GGUF source to keep its tokenizer")
    vocab = dict(model["vocab"])
    added = {token["content"]: token for token in tokenizer.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # unused
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = (3 if added[token].get("special") else 4) if token in added else 1
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                      ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        index = _special_id(tokenizer, config, vocab, name)
        if index is not None:
            add(index)
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


# ---------------------------------------------------------------------------------------------------- writer

def write_gguf(path: Path, ckpt: Checkpoint, modules: dict[str, str], kind: str, load: Callable[[str], object],
               name: str, progress: Callable[[int], None] = lambda nbytes: None,
               imatrix: dict | None = None) -> None:
    """Write ``ckpt`` as one GGUF file at ``path``: ``load(hf_name)`` gives each tensor, the block bytes of
    ``modules`` (names without ``.weight``; already in llama.cpp's row order) and float tensors otherwise. The header
    needs every tensor's size before the data: quantized tensors are kept as their (small) block bytes between the
    two passes, float ones are read again.

    Args:
        path: the .gguf file to write.
        ckpt: the source (config, tokenizer, tensor names and order).
        modules: the quantized modules → their GGML type names.
        kind: the file's quantization type (a key of GGUF_TYPES).
        load: ``load(hf_name)``: block bytes for ``modules``' weights, a float tensor otherwise.
        name: the model name recorded in the metadata.
        progress: called with the bytes of each tensor written.
        imatrix: the importance matrix's report (``--imatrix``), written as llama-quantize writes its own
            (``quantize.imatrix.*``), the data set named "self-generated".

    Returns:
        None.

    Example::

        write_gguf(Path("out/model-Q4_0.gguf"), ckpt, {"model.layers.0.mlp.up_proj": "Q4_0", ...}, "Q4_0",
                   quantizer, "smollm2")
    """
    import gguf

    config = ckpt.config
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or {}
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, layers)
    float_dtype = np.float32 if all(info.dtype == torch.float32 for info in ckpt.tensors.values()) else np.float16

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{kind}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if imatrix:
        writer.add_string("quantize.imatrix.dataset", f"self-generated ({imatrix['tokens']} tokens)")
        writer.add_int32("quantize.imatrix.entries_count", imatrix["modules"])
        writer.add_int32("quantize.imatrix.chunks_count", imatrix["sequences"])
    if ckpt.format == "gguf":
        _copy_gguf_tokenizer(writer, ckpt.path)
    else:
        _export_bpe_tokenizer(writer, ckpt.auxiliary_files(), ckpt.source)

    order = []
    for hf_name in ckpt.tensors:
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BadInput(f"{ckpt.source}: tensor {hf_name!r} has no GGUF llama name")
        order.append((hf_name, gguf_name))

    def produce(hf_name: str) -> np.ndarray:
        if hf_name.removesuffix(".weight") in modules:
            return load(hf_name)
        weight = _llama_cpp_rows(hf_name, load(hf_name).float(), heads, kv_heads)
        return weight.numpy().astype(np.float32 if weight.ndim == 1 else float_dtype)

    produced = {}
    for hf_name, gguf_name in order:  # quantize once; keep only the bytes of quantized tensors (small)
        data = produce(hf_name)
        module = hf_name.removesuffix(".weight")
        raw = gguf.GGMLQuantizationType[modules[module]] if module in modules else None
        writer.add_tensor_info(gguf_name, data.shape, data.dtype, data.nbytes, raw_dtype=raw)
        produced[hf_name] = data if raw is not None else None
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, _ in order:
        data = produced.pop(hf_name)
        data = produce(hf_name) if data is None else data
        writer.write_tensor_data(data)
        progress(data.nbytes)
    writer.close()


# ---------------------------------------------------------------------------------------------------- format

def _heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


class GGUF(QuantFormat):
    """One ``model-<type>.gguf``: Q4_0 / Q8_0 blocks of 32 (symmetric, float16 scales) by --bits, or the
    ``--gguf-type`` mix (K-quants in super-blocks of 256)."""

    name = "gguf"
    takes_importance = True
    bits = (4, 5, 6, 8)
    options = ("gguf_type",)
    schemes = ("sym",)
    default_group_size = BLOCK
    model_types = SUPPORTED_MODEL_TYPES
    card_title_note = " (GGUF)"

    def check_group_size(self, group_size: int) -> None:
        if group_size != BLOCK:
            raise BadInput(f"--group-size {group_size}: GGUF's Q4_0 / Q8_0 blocks are {BLOCK} weights")

    def check_scheme(self, scheme: str) -> None:
        if scheme != "sym":
            raise BadInput("--format gguf --scheme asym: only the symmetric Q4_0 / Q8_0 blocks are written")

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float16

    def check_source(self, ckpt: Checkpoint) -> None:
        if not ckpt.config:
            raise BadInput(f"{ckpt.source}: has no config.json, so no GGUF hyperparameters could be written")
        check_source(ckpt.config, ckpt.source)

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        for module, columns in inputs.items():
            if columns % BLOCK:
                raise BadInput(f"{module}: input dimension {columns} is not a multiple of GGUF's block of 32 "
                               f"(--ignore this module)")
        return {module: BLOCK for module in inputs}

    def resolve_bits(self, bits: int | None, options: dict) -> int | None:
        kind = options.get("gguf_type")
        if kind is None:
            if bits is not None and bits not in (4, 8):
                raise BadInput(f"--format gguf --bits {bits}: --bits writes Q4_0 or Q8_0; --gguf-type Q5_K_M or "
                               f"Q6_K writes {bits} bits")
            return bits
        if kind not in GGUF_TYPES:
            raise BadInput(f"--gguf-type {kind!r}: expected {', '.join(GGUF_TYPES)}")
        if bits is not None and bits != GGUF_TYPES[kind][0]:
            raise BadInput(f"--gguf-type {kind} --bits {bits}: {kind} is {GGUF_TYPES[kind][0]}-bit")
        return GGUF_TYPES[kind][0]

    def prepare(self, ckpt: Checkpoint, plan: Plan) -> None:
        """The file's type and each module's (llama.cpp's mix: :func:`tensor_types`), from the module roles."""
        from surgery.arch import Architecture

        arch = Architecture.from_config(ckpt.config)
        kind = gguf_type_of(plan.bits, plan.options.get("gguf_type"))
        roles = {}
        for module, info in plan.modules.items():
            role = arch.role(info.name)
            roles[module] = (role.kind, role.layer, info.shape[1])
        plan.extra.update(gguf_type=kind, ggml_types=tensor_types(kind, roles))

    def module_specs(self, plan: Plan, module: str, shape: tuple[int, ...]) -> list[TensorInfo]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        out, inp = shape
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[plan.extra["ggml_types"][module]]]
        return [TensorInfo(f"{module}.weight", torch.uint8, (out, inp // block * size))]

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        """In llama.cpp's row order. A method whose grids were computed beforehand (selfcal: GPTQ trades weight
        error for output error) is stored as it is; otherwise :func:`quantize_weight` (rtn: llama.cpp's own)."""
        weight = finite_float(weight)
        heads, kv_heads = _heads(plan.config)
        scheme, kind = plan.schemes[module], plan.extra["ggml_types"][module]
        laid = _llama_cpp_rows(module, weight, heads, kv_heads)
        if method.precomputed:
            grid = fit(module, weight, scheme)
            grid = Grid(*(_llama_cpp_rows(module, t, heads, kv_heads) for t in (grid.q, grid.scale, grid.zero)),
                        grid.scheme)
            data = _encode_blocks(grid)
        else:
            data = quantize_weight(laid, scheme.bits, method.reference_rounding,
                                   lambda w, grid_scheme: fit(module, w, grid_scheme), kind,
                                   plan.importance.get(module))
        return Encoded.compared({"weight": data}, laid, _dequantize_bytes(data, kind))

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> None:
        return None  # the GGUF metadata says it (file type, tensor types)

    def plan_extra(self, plan: Plan) -> dict:
        types: dict[str, int] = {}
        for kind in plan.extra["ggml_types"].values():
            types[kind] = types.get(kind, 0) + 1
        return {"gguf_file": file_name(plan.extra["gguf_type"]), "gguf_tensor_types": dict(sorted(types.items()))}

    def write(self, output, ckpt: Checkpoint, plan: Plan, load, files, *, max_shard_size, force,
              progress) -> Written:
        """One GGUF file beside the manifest and card, in one atomic directory."""
        name = file_name(plan.extra["gguf_type"])
        with atomic_directory(output, force=force, check=lambda staging: check_gguf(staging / name)) as staging:
            write_gguf(staging / name, ckpt, plan.extra["ggml_types"], plan.extra["gguf_type"], load,
                       Path(str(ckpt.source)).name, progress, plan.extra.get("imatrix"))
            for file, content in files().items():
                (staging / file).write_bytes(content)
            total = (staging / name).stat().st_size
        return Written(Path(output).absolute(), 1, total)

    def output_file(self, directory: Path) -> Path | None:
        found = sorted(directory.glob("*.gguf"))
        return found[0] if len(found) == 1 else None

    def _types(self, ckpt: Checkpoint) -> dict[str, str]:
        """HF tensor name → GGUF tensor type name, for a GGUF checkpoint."""
        import gguf

        names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, ckpt.config["num_hidden_layers"])
        types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(ckpt.path).tensors}
        found = {}
        for hf_name in ckpt.tensors:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name in types:
                found[hf_name] = types[gguf_name]
        return found

    def reads(self, ckpt: Checkpoint) -> bool:
        return ckpt.format == "gguf" and (ckpt.config or {}).get("model_type") in self.model_types

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        """The bits of the most common quantized type (for the report; each tensor decodes by its own type)."""
        kinds = [kind for kind in self._types(ckpt).values() if kind in WRITTEN_TYPES]
        if not kinds:
            raise BadInput(f"{ckpt.source}: a GGUF file without {', '.join(WRITTEN_TYPES)} tensors (not an output of "
                           f"`surgery quantize --format gguf`)")
        return Scheme(WRITTEN_TYPES[max(set(kinds), key=kinds.count)], BLOCK, True)

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        return [name.removesuffix(".weight") for name, kind in self._types(ckpt).items()
                if kind in WRITTEN_TYPES and name.endswith(".weight")]

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        """gguf.quants.dequantize through surgery's reader, in transformers' row order."""
        return ckpt.get(f"{module}.weight").float()
