"""``MODEL+ADAPTER``: a model read with a PEFT LoRA adapter applied, one tensor at a time (never a merged copy on
disk). Every command that opens a checkpoint takes it: ``surgery merge base tuned+tuned-lora ...``.

Each adapted module's weight is read as W + s·B·A (transposed for ``fan_in_fan_out`` Conv1D weights and for
``lora_embedding_A/B``), s = α/r or α/√r with ``use_rslora``, r and α from ``rank_pattern`` / ``alpha_pattern``
when they name the module (PEFT's rule: the pattern is the module's name or a dotted suffix of it); the adapter's
``modules_to_save`` copies and saved embedding layers replace the model's tensors (before the LoRA applies). Adapters this cannot apply exactly (DoRA, LoRA biases,
tensors naming no module of the model, ranks that disagree with the config) are refused with one line::

    with open_checkpoint("org/base+org/base-lora") as ckpt:
        ckpt.get("model.layers.0.self_attn.q_proj.weight")        # W + s·B·A in the model's dtype
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from surgery.arch import Architecture
from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.weight)?$")


def split_model_and_adapter(source: str) -> tuple[str, str] | None:
    """``MODEL+ADAPTER`` → (model, adapter), for a source that is not itself an existing path.

    Args:
        source: what the user gave.

    Returns:
        The pair, split at the last ``+``; None for a source without one or naming an existing path.

    Example: ``split_model_and_adapter("org/base+org/lora")   # ("org/base", "org/lora")``
    """
    if "+" not in source or Path(source).expanduser().exists():
        return None
    model, _, adapter = source.rpartition("+")
    if not model or not adapter:
        raise BadInput(f"{source}: expected MODEL+ADAPTER (a model and a PEFT LoRA adapter directory)")
    return model, adapter


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank_pattern / alpha_pattern lookup: a key (a regular expression) matching the module's name or a
    dotted suffix of it."""
    for key, value in patterns.items():
        try:
            matched = re.fullmatch(rf"(.*\.)?{key}", module)
        except re.error as err:
            raise BadInput(f"{where}: pattern {key!r} is not a regular expression ({err})") from None
        if matched:
            return _number({key: value}, key, where)
    return default


def _number(config: dict, key: str, where: str, default=None):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{where}: {key} {value!r} must be a positive number")
    return value


class LoraApplied(Checkpoint):
    """``inner`` read with the PEFT LoRA adapter in ``adapter_dir`` applied (see the module docstring).

    Example: ``LoraApplied(open_checkpoint("base"), Path("lora"), "base+lora").get(name)``
    """

    def __init__(self, inner: Checkpoint, adapter_dir: Path, source: str):
        from safetensors import SafetensorError, safe_open

        self.inner, self.source, self.path, self.format = inner, source, inner.path, inner.format
        self.config, self.adapter_dir = inner.config, adapter_dir
        config_file, weights_file = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
        for file in (config_file, weights_file):
            if not file.is_file():
                raise BadInput(f"{file}: missing (a PEFT LoRA adapter holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            adapter = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise BadInput(f"{config_file}: not JSON ({err})") from None
        if not isinstance(adapter, dict) or adapter.get("peft_type") != "LORA":
            kind = adapter.get("peft_type") if isinstance(adapter, dict) else None
            raise BadInput(f"{config_file}: peft_type {kind!r}: only LORA adapters can be applied to a model")
        for key in ("use_dora", "lora_bias"):
            if adapter.get(key):
                raise BadInput(f"{config_file}: {key} adapters are not supported (plain LoRA only)")
        patterns = {key: adapter.get(key) or {} for key in ("rank_pattern", "alpha_pattern")}
        if not all(isinstance(value, dict) for value in patterns.values()):
            raise BadInput(f"{config_file}: rank_pattern and alpha_pattern must be mappings")
        rank, alpha = _number(adapter, "r", str(config_file)), _number(adapter, "lora_alpha", str(config_file), 8)
        try:
            self._handle = safe_open(str(weights_file), framework="pt")
            stored = {name: self._handle.get_slice(name).get_shape() for name in self._handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise BadInput(f"{weights_file}: not a readable safetensors file ({err})") from None
        arch = Architecture.from_config(inner.config or {}) if adapter.get("fan_in_fan_out") else None
        pairs: dict[str, dict[str, str]] = {}
        self.replaced: dict[str, str] = {}  # model tensor → adapter tensor (modules_to_save)
        for name in stored:
            local = name.removeprefix(PREFIX)
            for wrapper in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
                local = local.replace(wrapper, ".")  # saved copies of the module's own weights
            match = LORA_TENSOR.match(local)
            if match:
                pairs.setdefault(match["module"], {})[match["kind"]] = name
            elif local in inner.tensors and tuple(inner.tensors[local].shape) == tuple(stored[name]):
                self.replaced[local] = name
            else:
                raise BadInput(f"{weights_file}: tensor {name!r} is neither a LoRA factor nor a tensor of "
                               f"{inner.source} of its shape")
        self.deltas: dict[str, tuple[str, str, float, bool]] = {}  # weight → (A, B, scale, transposed)
        self.ranks: dict[str, int] = {}  # weight → its LoRA's rank
        self.embeddings: set[str] = set()  # weights whose factors are lora_embedding_A/B
        self.adapter_config = adapter
        for module, factors in sorted(pairs.items()):
            embedding = "lora_embedding_A" in factors or "lora_embedding_B" in factors
            a, b = factors.get("lora_embedding_A" if embedding else "lora_A"), \
                factors.get("lora_embedding_B" if embedding else "lora_B")
            target = f"{module}.weight"
            if a is None or b is None or len(factors) != 2:
                raise BadInput(f"{weights_file}: module {module!r} needs exactly one A and one B factor, found "
                               f"{sorted(factors)}")
            if target not in inner.tensors:
                raise BadInput(f"{weights_file}: LoRA module {module!r}: {inner.source} has no tensor {target!r}")
            shape_a, shape_b = stored[a], stored[b]
            # fan_in_fan_out is for Conv1D weights stored (in, out); on an nn.Linear PEFT turns it off, as here
            transposed = embedding or (arch is not None and not arch.role(target).linear)
            out_features, in_features = inner.tensors[target].shape[::-1] if transposed else \
                inner.tensors[target].shape
            module_rank = _pattern_value(patterns["rank_pattern"], module, rank, str(config_file))
            if (len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1] or shape_a[0] != module_rank
                    or (shape_b[0], shape_a[1]) != (out_features, in_features)):
                raise BadInput(f"{weights_file}: LoRA module {module!r}: factors {list(shape_b)} @ {list(shape_a)} "
                               f"do not make rank {module_rank} of {target!r} {list(inner.tensors[target].shape)}")
            module_alpha = _pattern_value(patterns["alpha_pattern"], module, alpha, str(config_file))
            scale = module_alpha / (math.sqrt(module_rank) if adapter.get("use_rslora") else module_rank)
            self.deltas[target] = (a, b, float(scale), transposed)
            self.ranks[target] = module_rank
            if embedding:
                self.embeddings.add(target)
        if not self.deltas and not self.replaced:
            raise BadInput(f"{weights_file}: holds no LoRA factors")
        self.tensors = inner.tensors

    def get(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            weight = self.saved(name)
        else:
            weight = self.inner.get(name)
        if name not in self.deltas:
            return weight
        applied = weight.to(torch.float32) + self.delta(name)
        if not bool(torch.isfinite(applied).all()):
            raise BadInput(f"{self.adapter_dir / WEIGHTS_FILE}: applying it to {name!r} gives NaN or Inf")
        return applied.to(weight.dtype)

    def saved(self, name: str) -> torch.Tensor:
        """The whole tensor the adapter saves for model tensor ``name`` (one of ``replaced``), in the model's dtype.

        Example: ``applied.saved("lm_head.weight")``
        """
        return self._handle.get_tensor(self.replaced[name]).to(self.inner.tensors[name].dtype)

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's float32 change to weight ``name`` (one of ``deltas``), scale · B @ A in the weight's layout.

        Example: ``applied.delta("model.layers.0.self_attn.q_proj.weight").shape``
        """
        a, b, scale, transposed = self.deltas[name]
        delta = self._handle.get_tensor(b).to(torch.float32) @ self._handle.get_tensor(a).to(torch.float32)
        return scale * (delta.T if transposed else delta)

    def auxiliary_files(self) -> dict[str, bytes]:
        return self.inner.auxiliary_files()

    def files(self) -> dict[str, int]:
        """The model's files and the adapter's (by absolute path: they live in another directory)."""
        adapter = {str((self.adapter_dir / name).resolve()): (self.adapter_dir / name).stat().st_size
                   for name in (CONFIG_FILE, WEIGHTS_FILE)}
        return {**self.inner.files(), **adapter}

    def close(self) -> None:
        self._handle = None
        self.inner.close()

    def __getattr__(self, name: str):  # what else the model's reader offers
        return getattr(self.inner, name)
