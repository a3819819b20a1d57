"""Loading a model to evaluate it: a transformers model and its tokenizer from any source a command accepts::

    from surgery.evaluation import load_model
    model, tokenizer = load_model("merged", "cuda")
"""

from __future__ import annotations

import sys

import torch

from surgery.errors import BadInput


def load_model(source: str, device: str = "cpu"):
    """A transformers model (float32, eval mode) and tokenizer from a directory, a Hub repo id (local cache) or a
    .gguf file. The source is opened as every command opens it first (config and safetensors headers checked;
    pickled ``pytorch_model.bin`` weights are refused, never unpickled).

    Args:
        source: a model directory, a ``.gguf`` file or a Hub repo id.
        device: where the model goes (cpu, cuda, cuda:N).

    Returns:
        ``(model, tokenizer)``.

    Example::

        model, tokenizer = load_model("merged")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from surgery.io import open_checkpoint

    if not sys.stderr.isatty():  # progress bars only on a terminal, as everywhere in surgery
        transformers_logging.disable_progress_bar()
    with open_checkpoint(source) as ckpt:
        path, gguf = ckpt.path, ckpt.format == "gguf"
    if not gguf and not path.is_dir():
        raise BadInput(f"{source}: a model directory is needed (config.json + safetensors), not a single file")
    kwargs = {"gguf_file": path.name} if gguf else {"use_safetensors": True}
    directory = path.parent if gguf else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **({"gguf_file": path.name} if gguf else {}))
        # use_kernels=False: the eager layers everywhere, not Hub kernels fetched over the network (transformers >= 5.25
        # kernelizes by default when `kernels` is installed), so an evaluation repeats bit for bit offline.
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_kernels=False, **kwargs)
    except (OSError, ValueError) as err:
        raise BadInput(f"{source}: transformers cannot load it ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer
