"""Read a GGUF file as a transformers-layout checkpoint, one dequantized tensor at a time.

The heavy lifting is done by the maintained libraries: ``gguf`` parses and dequantizes, and transformers' own GGUF
support supplies the config, the tokenizer, the GGUF → transformers tensor names and the per-architecture fix-ups
(for the llama family, undoing llama.cpp's Q/K row permutation). What this module adds is streaming: the file is
memory-mapped and each tensor is dequantized only when asked for.
"""

from __future__ import annotations

import io
import logging
import tempfile
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import numpy as np
import torch

from surgery.errors import BadInput, one_line
from surgery.io.checkpoint import Checkpoint, TensorInfo, natural_key
from surgery.io.config_check import validate_config

log = logging.getLogger(__name__)


def _processor_classes():
    """Transformers' tensor processors that transform each tensor on its own, keeping its name and shape."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    return (
        gguf_utils.TensorProcessor,
        gguf_utils.LlamaTensorProcessor,
        gguf_utils.Gemma2TensorProcessor,
        gguf_utils.NemotronTensorProcessor,
    )


@contextmanager
def _reusing(reader):
    """Let transformers' GGUF helpers use our already-parsed reader instead of parsing the file again.

    Parsing the metadata (the whole vocabulary) is what makes opening a GGUF file slow, and transformers' helpers
    each construct their own ``gguf.GGUFReader``. If transformers stops looking the class up on the module, this is
    merely slower, never wrong.
    """
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = lambda *args, **kwargs: reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


class _ParametersOnly:
    """A model seen as its parameter names only, so transformers maps GGUF names in one pass, not per submodule."""

    def __init__(self, model):
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self):
        return self._state

    def named_children(self):
        return []


def _check_tensor_extents(reader, path: Path) -> None:
    """BadInput unless every tensor's bytes lie inside the file's data section. The gguf library adds offsets in
    uint64 (an offset of 2^64 − 1 wraps around into the metadata) and numpy clips slices past the end."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        raw_offset = int(tensor.field.parts[-1][0])
        elements = 1
        for dim in tensor.shape.tolist():
            elements *= int(dim)
        start = int(reader.data_offset) + raw_offset
        if elements != int(tensor.n_elements) or start + int(tensor.n_bytes) > size or start < reader.data_offset:
            raise BadInput(f"{path}: tensor {tensor.name!r} lies outside the file (offset {raw_offset}, "
                           f"{int(tensor.n_bytes)} bytes, file of {size} bytes)")
        if raw_offset % reader.alignment:
            raise BadInput(f"{path}: tensor {tensor.name!r} starts at offset {raw_offset}, not a multiple of the "
                           f"file's alignment {reader.alignment}")
        if int(tensor.data.nbytes) != int(tensor.n_bytes):
            raise BadInput(f"{path}: tensor {tensor.name!r} holds {int(tensor.data.nbytes)} bytes, its shape needs "
                           f"{int(tensor.n_bytes)}")


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file seen through transformers' names; every tensor is exposed as float32."""

    format = "gguf"

    def __init__(self, source: str, path: Path):
        import gguf
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        self.source = source
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
            _check_tensor_extents(self._reader, path)
            with redirect_stderr(io.StringIO()), _reusing(self._reader):
                parsed = gguf_utils.load_gguf_checkpoint(str(path), return_tensors=False)
        except BadInput:
            raise
        except Exception as err:  # noqa: BLE001 - gguf and transformers parse untrusted bytes: any failure is the file's
            raise BadInput(f"{path}: not a readable GGUF file ({one_line(err)})") from None

        architecture = gguf_utils.read_field(self._reader, "general.architecture")[0]
        processor_class = gguf_utils.TENSOR_PROCESSORS.get(architecture, gguf_utils.TensorProcessor)
        if processor_class not in _processor_classes():
            raise BadInput(f"{path}: GGUF architecture {architecture!r} is not supported for streaming reads")
        self._processor = processor_class(config=parsed["config"])

        config_fields = dict(parsed["config"])
        validate_config(config_fields, f"{path} (GGUF metadata)")
        model_type = config_fields.pop("model_type")
        config_fields.pop("_model_name_or_path", None)
        try:
            hf_config = AutoConfig.for_model(model_type, **config_fields)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(hf_config)
        except Exception as err:  # noqa: BLE001 - the metadata's values reach transformers' own validation
            raise BadInput(f"{path}: GGUF model type {model_type!r} has no transformers equivalent ({err})") from None
        hf_config.architectures = [type(skeleton).__name__]
        self._hf_config = hf_config
        self._tokenizer_config = parsed.get("tokenizer_config", {})
        self.config = hf_config.to_dict()
        self.config["dtype"] = "float32"

        gguf_to_hf = gguf_utils.get_gguf_hf_weights_map(_ParametersOnly(skeleton), self._processor)
        parameters = skeleton.state_dict()
        expected = set(parameters)
        if hf_config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        self._gguf_tensors = {}
        infos = {}
        for tensor in self._reader.tensors:
            hf_name = gguf_to_hf.get(tensor.name)
            if hf_name is None:
                log.info("%s: skipping GGUF tensor %s, which transformers does not use", path, tensor.name)
                continue
            self._gguf_tensors[hf_name] = tensor
            shape = tuple(int(size) for size in reversed(tensor.shape.tolist()))
            if hf_name in parameters and tuple(parameters[hf_name].shape) != shape:
                raise BadInput(f"{path}: tensor {tensor.name!r} has shape {shape}, the model's {hf_name} needs "
                               f"{tuple(parameters[hf_name].shape)}")
            infos[hf_name] = TensorInfo(hf_name, torch.float32, shape, path.name)
        missing = sorted(expected - set(infos), key=natural_key)
        if missing:
            raise BadInput(f"{path}: the GGUF file lacks {len(missing)} tensors the model needs, e.g. {missing[0]!r}")
        self.tensors = {name: infos[name] for name in sorted(infos, key=natural_key)}

    def get(self, name: str) -> torch.Tensor:
        import gguf

        tensor = self._gguf_tensors[name]
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights = self._processor.process(weights=weights, name=tensor.name).weights
        result = torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))
        expected = self.tensors[name].shape
        if tuple(result.shape) != expected:
            raise BadInput(f"{self.path}: tensor {tensor.name!r} decodes to shape {tuple(result.shape)}, "
                           f"expected {expected}")
        return result

    def files(self) -> dict[str, int]:
        return {self.path.name: self.path.stat().st_size}

    def auxiliary_files(self) -> dict[str, bytes]:
        """tokenizer files rebuilt by transformers from the GGUF vocabulary, and a generation config."""
        from transformers import AutoTokenizer, GenerationConfig

        with tempfile.TemporaryDirectory() as scratch, redirect_stderr(io.StringIO()), _reusing(self._reader):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except Exception as err:  # noqa: BLE001 - the tokenizer metadata is untrusted bytes too
                raise BadInput(f"{self.path}: its tokenizer metadata is unreadable ({one_line(err)})") from None
            tokenizer.save_pretrained(scratch)
            GenerationConfig.from_model_config(self._hf_config).save_pretrained(scratch)
            return {file.name: file.read_bytes() for file in sorted(Path(scratch).iterdir()) if file.is_file()}

    def close(self) -> None:
        self._reader = None
