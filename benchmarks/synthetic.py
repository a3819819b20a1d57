"""Synthetic Llama-layout checkpoints shared by the benchmarks (``convert_bench.py``, ``merge_bench.py``).

``prepare(size, data_dir)`` makes (or reuses) ``data_dir/<size>/{base,ft1,ft2}``: a base with weights N(0, 0.02)
(norms = 1) and fine-tunes = base + N(0, 0.002) noise, all bf16 in 1 GB shards, written one tensor at a time with
surgery's streaming writer. Every tensor is seeded from its name, so the bytes are reproducible. A ``.complete``
marker in each checkpoint records the layout and noise it was made with; a checkpoint whose marker matches is
reused as is.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

from surgery.io import TensorInfo, write_checkpoint

MARKER = ".complete"
FINE_TUNES = {"ft1": 1, "ft2": 2}  # name -> noise seed offset
NOISE_STD = 0.002

LAYOUTS = {
    "full": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
                 num_attention_heads=16, num_key_value_heads=4),
    "small": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=704, vocab_size=1000,
                  num_attention_heads=4, num_key_value_heads=2),
}


def llama_config(layout: dict) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(**layout, tie_word_embeddings=False, dtype="bfloat16").to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    return config


def llama_specs(layout: dict) -> list[TensorInfo]:
    """Names and shapes of a Hugging Face Llama checkpoint with an untied lm_head, all bf16."""
    hidden, inter, vocab = layout["hidden_size"], layout["intermediate_size"], layout["vocab_size"]
    kv = hidden // layout["num_attention_heads"] * layout["num_key_value_heads"]
    per_layer = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layout["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{suffix}": shape for suffix, shape in per_layer.items()})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return [TensorInfo(name, torch.bfloat16, shape) for name, shape in shapes.items()]


def _normal(name: str, salt: int, shape: tuple, std: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 8 + salt)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def synthetic_tensor(name: str, shape: tuple, noise_salt: int = 0) -> torch.Tensor:
    """Base weight (N(0, 0.02), norms = 1) plus, for a fine-tune, N(0, 0.002) noise; float32 then bf16."""
    tensor = torch.ones(shape) if name.endswith("norm.weight") else _normal(name, 0, shape, 0.02)
    if noise_salt:
        tensor += _normal(name, noise_salt, shape, NOISE_STD)
    return tensor.to(torch.bfloat16)


def ensure_checkpoint(directory: Path, layout: dict, noise_salt: int) -> None:
    """Write one synthetic checkpoint unless a matching one is already complete."""
    stamp = json.dumps({"layout": layout, "noise_salt": noise_salt, "noise_std": NOISE_STD}, sort_keys=True)
    marker = directory / MARKER
    if marker.exists() and marker.read_text() == stamp:
        return
    print(f"generating {directory} ...", file=sys.stderr, flush=True)
    specs = llama_specs(layout)
    shapes = {spec.name: spec.shape for spec in specs}
    write_checkpoint(directory, specs, lambda name: synthetic_tensor(name, shapes[name], noise_salt),
                     config=llama_config(layout), max_shard_size="1GB", force=True)
    marker.write_text(stamp)


def ensure_data(data_dir: Path, layout: dict) -> Path:
    """The base and fine-tune checkpoints; returns the base directory."""
    ensure_checkpoint(data_dir / "base", layout, 0)
    for name, salt in FINE_TUNES.items():
        ensure_checkpoint(data_dir / name, layout, salt)
    return data_dir / "base"


def parameter_count(layout: dict) -> int:
    return sum(spec.numel for spec in llama_specs(layout))


def prepare(size: str, data_dir: Path) -> tuple[Path, int]:
    """Make or reuse the ``size`` layout's checkpoints under ``data_dir/size``; returns that folder and the
    parameter count (and says both on stderr)."""
    layout = LAYOUTS[size]
    params = parameter_count(layout)
    print(f"layout {size}: {params / 1e9:.3f} B parameters ({params:,}), {2 * params / 1e9:.2f} GB in bf16",
          file=sys.stderr)
    folder = data_dir / size
    ensure_data(folder, layout)
    return folder, params


def warm_page_cache(*directories: Path) -> None:
    """Read every file of ``directories`` once so the runs that follow start from a warm page cache."""
    for directory in directories:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                with open(path, "rb") as file:
                    while file.read(64 << 20):
                        pass


def benchmark_arguments(description: str, repeat: int):
    """The options every benchmark takes: --small, --repeat, --data-dir."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true", help="tiny layout for a quick smoke test")
    parser.add_argument("--repeat", type=int, default=repeat, help="runs per command (best wall, max peak reported)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="where the checkpoints are kept")
    return parser
