"""surgery: streaming model surgery for LLM checkpoints.

>>> from surgery import open_checkpoint, write_checkpoint
>>> with open_checkpoint("HuggingFaceTB/SmolLM2-135M") as ckpt:          # doctest: +SKIP
...     print(ckpt.config["model_type"], len(ckpt.tensors))

The names below are imported on first use, so that ``import surgery`` (and ``surgery --version``) loads no torch.
"""

__version__ = "0.1.0"

__all__ = ["BadInput", "Checkpoint", "TensorInfo", "open_checkpoint", "write_checkpoint", "__version__"]


def __getattr__(name: str):
    if name == "BadInput":
        from surgery.errors import BadInput

        return BadInput
    if name in __all__:
        import surgery.io

        return getattr(surgery.io, name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
