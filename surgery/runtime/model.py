"""Building transformers' causal LM for a checkpoint with its parameters on the meta device::

    with opened("org/model") as checkpoint:
        model = build_model(checkpoint.config, checkpoint.source)     # parameters on meta, buffers real
        decoder = decoder_of(model, checkpoint.source)                # the module whose ``layers`` run one by one
        whole = loaded_model(checkpoint)                              # every parameter loaded (float32)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from surgery.errors import BadInput
from surgery.io import open_checkpoint
from surgery.io.checkpoint import Checkpoint


@contextmanager
def opened(source: str | Checkpoint) -> Iterator[Checkpoint]:
    """An already open checkpoint as is (left open), or ``source`` opened for the duration.

    Args:
        source: a path, Hub repo id or ``.gguf`` file, or an open :class:`~surgery.io.Checkpoint`.

    Returns:
        A context manager yielding the checkpoint::

            with opened("org/model") as checkpoint:
                checkpoint.config["model_type"]
    """
    if isinstance(source, Checkpoint):
        yield source
    else:
        with open_checkpoint(source) as checkpoint:
            yield checkpoint


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device while their buffers are computed for real.

    The same trick as accelerate's ``init_empty_weights(include_buffers=False)``: each parameter is moved to meta
    as it is registered, so the initialisation that follows in the module's constructor costs nothing. accelerate's
    version re-wraps a parameter registered again by ``tie_weights``, so a tied lm_head stops being the embedding
    (tests/test_aim.py, qwen2, fails with it); this one keeps an already-meta parameter as the same object.

    Returns:
        A context manager::

            with parameters_on_meta():
                layer = torch.nn.Linear(4096, 4096)     # layer.weight.is_meta
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a meta parameter may be a tie: keep it the same object
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_model(config: dict | None, source: str, device: str = "cpu") -> nn.Module:
    """transformers' causal LM for ``config``, in eval mode, parameters on meta, buffers on ``device``.

    Built by ``AutoModelForCausalLM.from_config`` (float32) with every parameter on meta but its buffers for real,
    so the values transformers computes at construction (rotary frequencies, gemma's embedding scale) are exact.

    Args:
        config: the checkpoint's config.json as a dict.
        source: the checkpoint's name, for error messages.
        device: where the buffers go.

    Returns:
        The model; BadInput when transformers cannot build it::

            model = build_model(checkpoint.config, checkpoint.source)
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not config or config.get("model_type") not in CONFIG_MAPPING:
        raise BadInput(f"{source}: needs a config.json with a model_type transformers knows")
    try:
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        with torch.device(device), parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (ValueError, KeyError) as err:
        raise BadInput(f"{source}: transformers cannot build a causal LM from its config "
                       f"({str(err).splitlines()[0]})") from None
    leftover = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if leftover:
        raise BadInput(f"{source}: buffer {leftover[0]!r} could not be computed outside the meta device")
    return model.eval()


def decoder_of(model: nn.Module, source: str) -> nn.Module:
    """The decoder of a causal LM: the module with the ``layers`` list that can run one layer at a time.

    Args:
        model: a model from :func:`build_model`.
        source: the checkpoint's name, for error messages.

    Returns:
        The decoder (``model.model`` for most families); BadInput when there is none::

            layers = decoder_of(model, "org/model").layers
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise BadInput(f"{source}: {type(model).__name__} has no decoder with a list of layers to run one by one")
    return decoder


def loaded_model(checkpoint: Checkpoint, device: str = "cpu") -> nn.Module:
    """The whole model of ``checkpoint`` with every parameter loaded (float32, on ``device``): for generating.

    Args:
        checkpoint: an open checkpoint with a config.
        device: where the parameters go.

    Returns:
        The model, in eval mode::

            text_ids = loaded_model(checkpoint).generate(prompt, max_new_tokens=32)
    """
    from surgery.runtime.weights import Loader

    model = build_model(checkpoint.config, checkpoint.source, device)
    Loader(model, checkpoint, device).load(model)
    return model


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run with one torch thread, as merge does on CPU: the work is many small operations (decode steps of 8
    tokens, per-module measures), where fanning each out to more threads costs more than it gains, and collapses
    when another process keeps the other cores busy (SmolLM2-135M on 2 shared cores: 25 s instead of 65 s).

    Returns:
        A context manager; the caller's thread count is restored after it::

            with one_torch_thread():
                log_p = log_probs(model, ids)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_device(device: str) -> None:
    """BadInput when ``device`` names CUDA and none is available.

    Args:
        device: cpu, cuda or cuda:N.

    Returns:
        None::

            check_device("cuda")     # BadInput on a machine without a GPU
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")
