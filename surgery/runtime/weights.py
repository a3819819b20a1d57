"""Putting checkpoint tensors into a meta-built model, whole or one module at a time, and overriding weights::

    loader = Loader(model, checkpoint)
    loader.load(model.model.layers[0])           # that layer's parameters from the checkpoint (float32)
    loader.free(model.model.layers[0])           # back on meta
    missing = load_parameters(model, checkpoint, skip=set(), what="model")
    with overridden_weights({"q": model.model.layers[0].self_attn.q_proj}, {"q": approx}):
        ...                                      # q_proj runs with ``approx`` as its weight

Tied parameters (one Parameter under several names) stay tied: they are loaded from whichever of their names the
checkpoint stores, so a tied lm_head finds the embedding. Parameters transformers renames or fuses as it loads
(Mixtral's ``block_sparse_moe``, per-expert MoE tensors stacked into one) are assembled the same way
(:meth:`surgery.layout.ModelLayout.sources`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint


def parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → every name it has (a tied lm_head shares the embedding's).

    Args:
        model: any module.

    Returns:
        The names of each parameter, grouped::

            [names for names in parameter_aliases(model).values() if len(names) > 1]   # the ties
    """
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return aliases


def set_parameter(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Make ``value`` the parameter under every one of ``names`` (so ties stay ties).

    Args:
        model: the module the names are relative to.
        names: the parameter's names, e.g. from :func:`parameter_aliases`.
        value: the tensor (wrapped in an ``nn.Parameter`` without gradient).

    Returns:
        None::

            set_parameter(model, ["model.embed_tokens.weight", "lm_head.weight"], embedding)
    """
    param = nn.Parameter(value, requires_grad=False)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[leaf] = param


def load_parameters(model: nn.Module, ckpt: Checkpoint, skip: set[str], what: str) -> list[str]:
    """Fill every parameter of ``model`` except those named in ``skip`` from ``ckpt`` (float32).

    Args:
        model: a model built for the checkpoint's config (renamed and fused parameters are assembled as
            :class:`Loader` does).
        ckpt: the open checkpoint.
        skip: parameter names to leave as they are.
        what: what needs the tensors, for the shape-mismatch message.

    Returns:
        The names of the parameters the checkpoint lacks (left as they were); a shape mismatch is BadInput naming
        the tensor::

            missing = load_parameters(model, reference, set(), "model its config builds")
    """
    loader = Loader(model, ckpt)
    missing = []
    for names in parameter_aliases(model).values():
        if skip & set(names):
            continue
        if names[0] in loader.fused:  # MoE experts stored one tensor each, fused as transformers loads them
            set_parameter(model, names, loader.read(names[0], model.get_parameter(names[0]).shape))
            continue
        stored = loader.stored_name[names[0]]
        if stored not in ckpt.tensors:
            missing.append(names[0])
            continue
        expected = tuple(model.get_parameter(names[0]).shape)
        if tuple(ckpt.tensors[stored].shape) != expected:
            raise BadInput(f"{ckpt.source}: tensor {stored} has shape {tuple(ckpt.tensors[stored].shape)}, but the "
                           f"{what} needs {expected}")
        set_parameter(model, names, ckpt.get(stored).to(torch.float32))
    loader.load_buffers(model)
    return missing


class Loader:
    """Puts checkpoint tensors into (and takes them out of) a module of a meta-built model.

    Args:
        model: the whole model (from :func:`surgery.runtime.build_model`), for the modules' full names.
        checkpoint: the open checkpoint the tensors come from.
        device: where loaded parameters go.

    Example::

        loader = Loader(model, checkpoint)
        loader.load(model.lm_head)     # a tied head is read from the embedding's tensor
        loader.free(model.lm_head)
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: str = "cpu"):
        self.checkpoint = checkpoint
        self.device = device
        from surgery.layout import ModelLayout

        self.module_names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        layout = ModelLayout.build(checkpoint.config)
        renamed, self.fused = layout.sources(checkpoint.tensors) if layout is not None else ({}, {})
        self.stored_name = dict(renamed)
        for names in parameter_aliases(model).values():
            stored = next((name for name in names if name in checkpoint.tensors),
                          next((renamed[name] for name in names if name in renamed), names[0]))
            self.stored_name.update({name: stored for name in names})

    def load(self, module: nn.Module) -> None:
        """Materialise every parameter of ``module`` (float32, on the device) from the checkpoint.

        Args:
            module: the model or one of its submodules.

        Returns:
            None; BadInput when a tensor is missing or of another shape::

                loader.load(model.model.layers[3])
        """
        name = self.module_names[id(module)]
        prefix = f"{name}." if name else ""
        for names in parameter_aliases(module).values():
            param = module.get_parameter(names[0])
            set_parameter(module, names, self.read(prefix + names[0], param.shape))
        self.load_buffers(module)

    def load_buffers(self, module: nn.Module) -> None:
        """Replace the buffers of ``module`` the checkpoint stores (DeepSeek's router correction bias) with the
        stored values; those it does not (rotary frequencies) keep the values computed when the model was built.

        Args:
            module: the model or one of its submodules.

        Returns:
            None::

                loader.load_buffers(model.model.layers[3])
        """
        name = self.module_names[id(module)]
        prefix = f"{name}." if name else ""
        for local, buffer in module.named_buffers():
            stored = self.stored_name.get(prefix + local, prefix + local)
            info = self.checkpoint.tensors.get(stored)
            if info is not None and tuple(info.shape) == tuple(buffer.shape):
                owner, _, leaf = local.rpartition(".")
                target = module.get_submodule(owner) if owner else module
                target._buffers[leaf] = self.checkpoint.get(stored).to(buffer.device, buffer.dtype)

    def read(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The float32 value of the model's parameter ``name`` (of ``shape``) from the checkpoint, on the device:
        stored under it or another name, or assembled from per-expert tensors; BadInput when missing or of
        another shape."""
        if name in self.fused:  # experts stacked, gate and up halves side by side
            parts = [torch.stack([self.checkpoint.get(part) for part in pattern]) for pattern in self.fused[name]]
            tensor = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if tuple(tensor.shape) != tuple(shape):
                raise BadInput(f"{self.checkpoint.source}: the tensors transformers fuses into {name!r} give shape "
                               f"{tuple(tensor.shape)}, the config implies {tuple(shape)}")
            return tensor.to(self.device, torch.float32)
        stored = self.stored_name[name]
        if stored not in self.checkpoint.tensors:
            raise BadInput(f"{self.checkpoint.source}: tensor {name!r} is missing (the model built from its config "
                           f"needs it)")
        tensor = self.checkpoint.get(stored)
        if tuple(tensor.shape) != tuple(shape):
            raise BadInput(f"{self.checkpoint.source}: tensor {stored!r} has shape {tuple(tensor.shape)}, the "
                           f"config implies {tuple(shape)}")
        return tensor.to(self.device, torch.float32)

    @staticmethod
    def free(module: nn.Module) -> None:
        """Put every parameter of ``module`` back on the meta device.

        Args:
            module: the model or one of its submodules.

        Returns:
            None::

                loader.free(model.model.layers[3])
        """
        for names in parameter_aliases(module).values():
            param = module.get_parameter(names[0])
            if not param.is_meta:
                set_parameter(module, names, torch.empty_like(param, device="meta"))


@contextmanager
def overridden_weights(modules: Mapping[str, nn.Module], values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named modules the weights in ``values`` (those present).

    Args:
        modules: name → module (e.g. :meth:`surgery.runtime.LayerStream.linears`).
        values: name → the weight to use instead; names missing here keep theirs.

    Returns:
        A context manager; the original weights are back after it::

            with overridden_weights(stream.linears(0), {name: grid.dequantize() for name, grid in grids.items()}):
                hidden = stream.run(0, hidden, kwargs)
    """
    saved = {}
    for name, module in modules.items():
        if name in values:
            saved[name] = module._parameters["weight"]
            module._parameters["weight"] = nn.Parameter(values[name], requires_grad=False)
    try:
        yield
    finally:
        for name, param in saved.items():
            modules[name]._parameters["weight"] = param
