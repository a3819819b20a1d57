"""What a quantized-output format is to the engine and to ``verify``: :class:`QuantFormat`.

A format declares what it supports (bits, schemes, a fixed or default group size, the model types it writes), how
it lays out one module's tensors (:meth:`~QuantFormat.specs`, :meth:`~QuantFormat.encode`) and its config entry
(:meth:`~QuantFormat.quantization_config`), how the output is written (:meth:`~QuantFormat.write`: a checkpoint
directory by default, GGUF one file) and how it is read back (:meth:`~QuantFormat.reads`,
:meth:`~QuantFormat.stored_scheme`, :meth:`~QuantFormat.quantized_modules`, :meth:`~QuantFormat.decoded_weight`)::

    from surgery.quantize.formats import register_format
    from surgery.quantize.formats.base import QuantFormat

    class MyFormat(QuantFormat):
        name = "my-format"
        ...                                   # specs, encode, quantization_config, reads, stored_scheme, ...

    register_format(MyFormat())               # --format my-format: QuantizeConfig accepts it, quantize writes it
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo, all_finite
from surgery.io.loader_check import check_transformers
from surgery.io.writer import write_checkpoint
from surgery.quantize.grid import Grid, Scheme, dequantize

# fit(module, weight, scheme) → the method's grid (surgery.quantize.methods)
Fit = Callable[[str, torch.Tensor, Scheme], Grid]


# A method whose grids are fitted row by row (``row_separable``) is given this many weights at a time: the float32
# copy and its temporaries (4 MB each) stay in the CPU's cache, and memory does not grow with the module's size.
# On a 4096×1536 bf16 weight, rtn W4A16 so measured 290-560 M weights/s against 55-80 M/s for the whole-module
# path (one process, 2 cores, the same bytes).
ROW_CHUNK_ELEMENTS = 1 << 20


class NonFiniteWeight(ValueError):
    """Raised by :meth:`QuantFormat.encode` when the weight holds NaN or Inf (the engine names the tensor)."""


@dataclass
class Encoded:
    """One module as the format stores it: ``tensors`` (local name → tensor, or block bytes), and the squared error
    ‖W − Ŵ‖² of its stored approximation and ‖W‖², which the engine's error accounting sums. ``by_rows``: encoded a
    chunk of rows at a time, so no whole-module float copies were made (the engine need not give memory back)."""

    tensors: dict[str, Any]
    error_sq: float
    norm_sq: float
    by_rows: bool = False

    @classmethod
    def compared(cls, tensors: dict[str, Any], weight: torch.Tensor, approx: torch.Tensor) -> "Encoded":
        """``tensors`` with the errors of ``approx`` against ``weight`` (both as the format lays them out)."""
        return cls(tensors, float((weight - approx).pow(2).sum()), float(weight.pow(2).sum()))


def finite_float(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32; NonFiniteWeight when it holds NaN or Inf.

    Args:
        weight: a module's weight as stored.

    Returns:
        Its float32 copy (the tensor itself when it is float32).

    Example: ``weight = finite_float(weight)   # first line of a format's encode()``
    """
    if weight.is_floating_point() and not all_finite(weight):
        raise NonFiniteWeight("NaN or Inf")
    return weight.float()


def _row_chunks(weight: torch.Tensor, multiple: int = 1) -> Iterator[tuple[int, torch.Tensor, float]]:
    """(first row, the rows in float32, their ‖·‖²) for consecutive chunks of about :data:`ROW_CHUNK_ELEMENTS`
    weights, each a multiple of ``multiple`` rows (but the last); NonFiniteWeight when a chunk holds NaN or Inf
    (its ‖·‖² is then not finite, which costs no extra pass)."""
    rows, columns = weight.shape
    step = max(multiple, ROW_CHUNK_ELEMENTS // columns // multiple * multiple)
    for start in range(0, rows, step):
        part = weight[start:start + step].float()
        flat = part.reshape(-1)
        norm = float(torch.dot(flat, flat))
        if not math.isfinite(norm):
            if not bool(torch.isfinite(part).all()):
                raise NonFiniteWeight("NaN or Inf")
            norm = float(part.double().square().sum())  # finite, but its squares overflow float32
        yield start, part, norm


def fit_rows(fit: Fit, module: str, weight: torch.Tensor, scheme: Scheme) -> tuple[Grid, float, float]:
    """A row-separable method's grid for ``weight`` (any float dtype), fitted :data:`ROW_CHUNK_ELEMENTS` weights at a
    time, with ‖W − Ŵ‖² and ‖W‖²; NonFiniteWeight when the weight holds NaN or Inf.

    Args:
        fit: the method's fit (its rows' grids depend on those rows alone).
        module: the module, for ``fit``.
        weight: the 2-D weight as stored.
        scheme: its grid.

    Returns:
        (grid, error_sq, norm_sq): the same grid as ``fit`` on the whole weight.

    Example: ``grid, error_sq, norm_sq = fit_rows(fit, "model.layers.0.mlp.up_proj", weight, scheme)``
    """
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales, zeros = [], []
    error_sq = norm_sq = 0.0
    for start, part, norm in _row_chunks(weight):
        grid = fit(module, part, scheme)
        q[start:start + part.shape[0]] = grid.q
        scales.append(grid.scale)
        zeros.append(grid.zero)
        norm_sq += norm
        error_sq += float(grid.dequantize().sub_(part).square_().sum())
    return Grid(q, torch.cat(scales), torch.cat(zeros), scheme), error_sq, norm_sq


def encode_rows(encode_part: Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]],
                weight: torch.Tensor, multiple: int = 1, per_module: tuple[str, ...] = ()) -> Encoded:
    """A row-separable encoding of ``weight`` (any float dtype), a chunk of rows at a time (a multiple of
    ``multiple`` rows: FP8's 128-row blocks); NonFiniteWeight when the weight holds NaN or Inf.

    Args:
        encode_part: float32 rows → (their stored tensors, each split along dim 0 with the rows; their float32
            approximation).
        weight: the 2-D weight as stored.
        multiple: the chunks' row count is a multiple of it.
        per_module: stored tensors that are the module's, the same for every chunk (the first chunk's is kept).

    Returns:
        The :class:`Encoded` module, its tensors those of the whole weight.

    Example: ``encode_rows(lambda rows: ({"weight": rows.half()}, rows.half().float()), weight)``
    """
    pieces: dict[str, list[torch.Tensor]] = {}
    error_sq = norm_sq = 0.0
    for _, part, norm in _row_chunks(weight, multiple):
        tensors, approx = encode_part(part)
        for name, tensor in tensors.items():
            pieces.setdefault(name, []).append(tensor)
        norm_sq += norm
        error_sq += float(approx.sub_(part).square_().sum())
    tensors = {name: parts[0] if name in per_module else torch.cat(parts) for name, parts in pieces.items()}
    return Encoded(tensors, error_sq, norm_sq, by_rows=True)


@dataclass
class Plan:
    """Which weights are quantized (module name → input TensorInfo), their grids, the output specs and config."""

    modules: dict[str, TensorInfo]
    schemes: dict[str, Scheme]  # module → its grid (group sizes may differ, see groups.py)
    fallbacks: dict[int, list[str]]  # fallback group size → config targets (empty when the request fits all)
    specs: list[TensorInfo]
    config: dict
    dtype: torch.dtype
    source_of: dict[str, str]  # output tensor name → module it belongs to (quantized ones only)
    extra: dict = field(default_factory=dict)  # what the format's prepare() computed (NVFP4: global scales)
    options: dict = field(default_factory=dict)  # the format's options (engine.FORMAT_OPTIONS) as requested
    importance: dict = field(default_factory=dict)  # module → mean x² per input column (--imatrix; GGUF reads it)

    @property
    def bits(self) -> int:
        return next(iter(self.schemes.values())).bits


@dataclass
class Written:
    """Where the output went: its directory (as the summary prints it), shard count and tensor bytes."""

    directory: Path
    shards: int
    total_bytes: int


def module_tensors(ckpt: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    """The format's tensors of one quantized module, by local name (``weight_packed``, ``qweight``...): those
    directly under ``module``, except a plain ``weight`` and ``bias``.

    Args:
        ckpt: the quantized checkpoint.
        module: the module's name.

    Returns:
        ``{local name: tensor}``.

    Example::

        module_tensors(ckpt, "model.layers.0.mlp.up_proj")["weight_scale"]
    """
    prefix = module + "."
    local = {name: name[len(prefix):] for name in ckpt.tensors if name.startswith(prefix)}
    return {short: ckpt.get(name) for name, short in local.items()
            if "." not in short and short not in ("weight", "bias")}


def require_dtypes(tensors: dict[str, torch.Tensor], expected: dict[str, torch.dtype | str]) -> None:
    """ValueError unless each tensor named in ``expected`` has that dtype: what the readers of quantized inputs
    check before decoding someone else's file.

    Args:
        tensors: local name → tensor (one module's stored tensors).
        expected: local name → dtype, or "float" for any floating dtype.

    Returns:
        None.

    Example: ``require_dtypes(tensors, {"weight_packed": torch.int32, "weight_scale": "float"})``
    """
    for name, dtype in expected.items():
        got = tensors[name].dtype
        if got != dtype if dtype != "float" else not got.is_floating_point:
            raise ValueError(f"{name} is {str(got).removeprefix('torch.')}, expected "
                             f"{dtype if dtype == 'float' else str(dtype).removeprefix('torch.')}")


class QuantFormat:
    """A loader-native layout of quantized Linear weights. Subclasses set the class attributes and implement
    ``specs``, ``encode``, ``quantization_config`` and the reading side (``reads``, ``stored_scheme``,
    ``quantized_modules``, and ``decode`` or ``decoded_weight``); ``write`` defaults to a safetensors checkpoint
    directory that transformers must load."""

    name: str = ""
    bits: tuple[int, ...] = (4, 8)
    schemes: tuple[str, ...] = ("sym", "asym")
    default_group_size: int = 128
    model_types: tuple[str, ...] | None = None  # the model types it writes (None: any transformers loads)
    card_title_note: str = ""  # appended to the model card's title (GGUF: " (GGUF)")
    # whether its loader fills transformers' fused MoE expert tensors from per-expert quantized modules, and if
    # not, what it does with them (the refusal says)
    loads_per_expert: bool = True
    per_expert_problem: str = "does not fill"
    # what it quantizes: "linear" (the weights of Linear modules, per-expert ones included) or "fused experts" (the
    # 3-D expert tensors a checkpoint stores, such as gpt-oss's)
    quantizes: str = "linear"
    # whether commands read its checkpoints decoded (surgery/io/quantized_input.py; needs decoded_shape)
    reads_inputs: bool = False
    writes_outputs: bool = True  # False: an input format only (AWQ), not a --format value
    stored_names: tuple[str, ...] = ()  # the local names of what it stores beside (or instead of) a weight
    options: tuple[str, ...] = ()  # the QuantizeConfig fields of engine.FORMAT_OPTIONS it takes (gguf: gguf_type)
    # whether --imatrix applies: its grids come from the method's fit (weighted_grid.py searches them under the
    # importance) or it reads plan.importance itself (GGUF's blocks)
    takes_importance: bool = False

    # ------------------------------------------------------------------------------------------- options

    def check_group_size(self, group_size: int) -> None:
        """BadInput for a requested group size the format cannot write (default: any; groups.py decides)."""

    def resolve_bits(self, bits: int | None, options: dict) -> int | None:
        """The bits to write given the requested ones (None: not given) and the format's options; BadInput for a
        combination it refuses (default: ``bits`` as they are)."""
        return bits

    def check_method(self, method: str) -> None:
        """BadInput for a method (rtn, hqq, selfcal) the format does not write (default: any)."""

    def grid_words(self, bits: int, group_size: int, symmetric: bool) -> str:
        """The grid in words, for the model card."""
        return f"{bits}-bit integers, group size {group_size}, {'symmetric' if symmetric else 'asymmetric'}"

    def check_scheme(self, scheme: str) -> None:
        """BadInput for a scheme (sym, asym) the format does not write."""
        if scheme not in self.schemes:
            raise BadInput(f"--format {self.name} --scheme {scheme}: it writes {' or '.join(self.schemes)} grids")

    def scheme(self, bits: int, group_size: int, symmetric: bool) -> Scheme:
        """The grid the methods fit for this format::

            CompressedTensors().scheme(4, 128, True)   # Scheme(bits=4, group_size=128, symmetric=True)
        """
        return Scheme(bits, group_size, symmetric)

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the format stores scales in, given the model's (default: the model's)."""
        return dtype

    # ------------------------------------------------------------------------------------------- writing

    def check_source(self, ckpt: Checkpoint) -> None:
        """BadInput when the format cannot be written for ``ckpt`` (default: it needs a config.json)."""
        if not ckpt.config:
            raise BadInput(f"{ckpt.source}: has no config.json, so the quantized model could not be loaded")

    def check_dtype(self, ckpt: Checkpoint, dtype: torch.dtype) -> None:
        """BadInput when the format's loaders cannot run a model of ``dtype`` (default: any)."""

    def check_shape(self, name: str, shape: tuple[int, ...], scheme: Scheme) -> None:
        """BadInput unless the weight ``name`` of ``shape`` fits ``scheme`` (default: 2-D, the group size dividing its
        input dimension)."""
        scheme.check(name, shape)

    def tensor_name(self, module: str, local: str) -> str:
        """The output name of a module's stored tensor ``local`` (default: ``module.local``)."""
        return f"{module}.{local}"

    def group_sizes(self, inputs: dict[str, int], requested: int,
                    together: frozenset[str] = frozenset()) -> dict[str, int]:
        """Module → group size, given each module's input dimension (groups.py's fallbacks); ``together``: modules
        (MoE experts) that must share one size."""
        raise NotImplementedError

    def fallbacks(self, sizes: dict[str, int], requested: int,
                  always: frozenset[str] = frozenset()) -> dict[int, list[str]]:
        """Fallback group size → config targets, for formats whose config names them (default: none); ``always``:
        modules to target whatever their size."""
        return {}

    def specs(self, module: str, shape: tuple[int, int], scheme: Scheme, dtype: torch.dtype) -> list[TensorInfo]:
        """The output tensors of one quantized module of weight ``shape`` (out, in)."""
        raise NotImplementedError

    def prepare(self, ckpt: Checkpoint, plan: Plan) -> None:
        """Once the modules and their grids are chosen, before their output tensors are laid out: what laying out
        and encoding need beyond one module's weight, into ``plan.extra`` (default: nothing; NVFP4 reads every
        weight's amax for its shared global scales, GGUF picks each tensor's type)."""

    def module_specs(self, plan: Plan, module: str, shape: tuple[int, ...]) -> list[TensorInfo]:
        """The output tensors of one quantized module (default: :meth:`specs` for its grid)."""
        return self.specs(module, shape, plan.schemes[module], plan.dtype)

    def planned_tensors(self, plan: Plan, module: str) -> dict[str, torch.Tensor]:
        """The stored tensors of ``module`` that follow from the plan alone, without its weight (compressed-tensors'
        ``weight_shape``, GPTQ's ``g_idx``): the writer may ask for them before the module is encoded, and they
        must equal what :meth:`encode` returns for them (default: none)."""
        return {}

    def encode(self, plan: Plan, module: str, weight: torch.Tensor, fit: Fit, method) -> Encoded:
        """One module's stored tensors, given its ``weight`` as stored (any float dtype; NonFiniteWeight when it
        holds NaN or Inf: :func:`finite_float`) and the method (``fit`` its grid-fitting function, ``method`` the
        :class:`~surgery.quantize.methods.QuantMethod`): by default the method's grid in the format's layout
        (:meth:`encode_grid`), fitted in chunks of rows where the method is ``row_separable``."""
        scheme = plan.schemes[module]
        if method.row_separable:
            grid, error_sq, norm_sq = fit_rows(fit, module, weight, scheme)
            return Encoded(self.encode_grid(grid, plan.dtype), error_sq, norm_sq, by_rows=True)
        weight = finite_float(weight)
        grid = fit(module, weight, scheme)
        return Encoded.compared(self.encode_grid(grid, plan.dtype), weight, grid.dequantize())

    def encode_grid(self, grid: Grid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A grid → local tensor name → tensor."""
        raise NotImplementedError

    def quantization_config(self, schemes: dict[str, Scheme], scheme: Scheme, ignore: list[str],
                            dtype: torch.dtype, fallbacks: dict[int, list[str]]) -> dict | None:
        """The config.json ``quantization_config`` entry (None: the format writes no config.json)."""
        raise NotImplementedError

    def plan_extra(self, plan: Plan) -> dict:
        """What the format adds to the summary and manifest measurements (default: nothing)."""
        return {}

    def write(self, output: str | Path, ckpt: Checkpoint, plan: Plan, load: Callable[[str], Any],
              files: Callable[[], dict[str, bytes]], *, max_shard_size: int | str, force: bool,
              progress: Callable[[int], None]) -> Written:
        """Write the output atomically, pulling each tensor through ``load(name)``; ``files()`` (manifest, card)
        is called once the tensors are written. Default: safetensors shards, config.json and the source's other
        files, checked by transformers' loader."""
        result = write_checkpoint(output, plan.specs, load, config=plan.config,
                                  files=lambda: {**ckpt.auxiliary_files(), **files()},
                                  max_shard_size=max_shard_size, force=force, progress=progress,
                                  check=lambda staging: check_transformers(staging, [ckpt]))
        return Written(result.directory, len(result.shards), result.total_size)

    # ------------------------------------------------------------------------------------------- reading

    def output_file(self, directory: Path) -> Path | None:
        """The file to open inside an output directory, for single-file formats (default: the directory)."""
        return None

    def reads(self, ckpt: Checkpoint) -> bool:
        """Whether ``ckpt`` is an output of this format."""
        raise NotImplementedError

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        """The grid the output's config (or metadata) declares."""
        raise NotImplementedError

    def module_scheme(self, ckpt: Checkpoint, module: str, default: Scheme) -> Scheme:
        """The grid of one module (default: the declared one)."""
        return default

    def quantized_modules(self, ckpt: Checkpoint) -> list[str]:
        """Names of the quantized modules."""
        raise NotImplementedError

    def decode(self, tensors: dict[str, torch.Tensor], scheme: Scheme) -> tuple[torch.Tensor, ...]:
        """A module's stored tensors → (q, scale, zero) on the grid."""
        raise NotImplementedError

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        """The shape of a quantized module's decoded weight, from its stored tensors' shapes (for the formats that
        set ``reads_inputs``)."""
        raise NotImplementedError

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        """The float32 weight of one quantized module, decoded from the stored bits."""
        scheme = self.module_scheme(ckpt, module, self.stored_scheme(ckpt))
        q, scale, zero = self.decode(module_tensors(ckpt, module), scheme)
        return dequantize(q, scale, zero, scheme.group_size)

    def decoded_parameters(self, ckpt: Checkpoint):
        """``(parameter name, float32 tensor)`` of every quantized module, as the model's parameter holds it
        (default: ``module.weight``, the decoded weight)."""
        for module in self.quantized_modules(ckpt):
            yield f"{module}.weight", self.decoded_weight(ckpt, module)

    def matmul(self, ckpt: Checkpoint, module: str, x: torch.Tensor, approx: torch.Tensor, scheme: Scheme,
               backend: str) -> torch.Tensor:
        """``x @ Ŵᵀ`` as the format's loaders compute it (default: with the decoded weight)."""
        return x @ approx.T
