"""surgery: streaming model surgery for LLM checkpoints.

>>> from surgery import open_checkpoint, write_checkpoint
>>> with open_checkpoint("HuggingFaceTB/SmolLM2-135M") as ckpt:          # doctest: +SKIP
...     print(ckpt.config["model_type"], len(ckpt.tensors))
"""

__version__ = "0.1.0"

from surgery.errors import BadInput
from surgery.io import Checkpoint, TensorInfo, open_checkpoint, write_checkpoint

__all__ = ["BadInput", "Checkpoint", "TensorInfo", "open_checkpoint", "write_checkpoint", "__version__"]
