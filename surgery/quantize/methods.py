"""The registered quantization methods: what fits each module's grid.

A :class:`QuantMethod` checks its own parameters, adds them to the recipe, and prepares ``fit(module, weight,
scheme) → Grid`` for the engine (rtn and hqq fit each weight as it is streamed; selfcal computes every grid
beforehand from the checkpoint)::

    from surgery.quantize.methods import method_named
    method = method_named("hqq")
    fit, report = method.prepare(ckpt, schemes, config, torch.bfloat16, torch.device("cpu"))
    grid = fit("model.layers.0.mlp.up_proj", weight, schemes["model.layers.0.mlp.up_proj"])

What a format with its own reference quantizer stores (GGUF: llama.cpp's blocks) is the method's to say:
``reference_rounding`` (rtn *is* that quantizer: store the reference), ``precomputed`` (selfcal: keep its grids as
they are, since it trades weight error for output error); otherwise per block the closer of the two (hqq).
"""

from __future__ import annotations

from typing import Callable

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint
from surgery.quantize.grid import Grid, Scheme, hqq, rtn

Fit = Callable[[str, torch.Tensor, Scheme], Grid]


class QuantMethod:
    """A grid-fitting method. ``grid`` (rtn, hqq) fits one weight; subclasses may override :meth:`prepare`."""

    name: str = ""
    options: tuple[str, ...] = ()  # the QuantizeConfig fields of engine.METHOD_OPTIONS it takes
    reference_rounding = False
    precomputed = False
    row_separable = False  # each row's grid depends on that row alone, so rows may be fitted a chunk at a time

    def grid(self, weight: torch.Tensor, scheme: Scheme, stored: torch.dtype) -> Grid:
        raise NotImplementedError

    def check(self, config) -> None:
        """BadInput for a parameter of ``config`` (a QuantizeConfig) this method refuses (default: none)."""

    def recipe(self, config) -> dict:
        """What the method adds to the recipe recorded in surgery.json (default: nothing)."""
        return {}

    def prepare(self, ckpt: Checkpoint, schemes: dict[str, Scheme], config, stored: torch.dtype,
                device: torch.device) -> tuple[Fit, dict]:
        """``fit(module, weight, scheme)`` run on ``device`` and returned on the CPU, scales rounded to ``stored``
        (the dtype they are written in), and the calibration report ({} for data-free methods).

        Args:
            ckpt: the source checkpoint.
            schemes: module → grid.
            config: the QuantizeConfig.
            stored: the scale dtype the format writes.
            device: where the grids are fitted.

        Returns:
            (fit, report).
        """
        return (lambda module, weight, scheme: self.grid(weight.to(device), scheme, stored).to("cpu")), {}


class RTN(QuantMethod):
    name = "rtn"
    reference_rounding = True
    row_separable = True

    def grid(self, weight: torch.Tensor, scheme: Scheme, stored: torch.dtype) -> Grid:
        return rtn(weight, scheme, stored)


class HQQ(QuantMethod):
    name = "hqq"

    def grid(self, weight: torch.Tensor, scheme: Scheme, stored: torch.dtype) -> Grid:
        return hqq(weight, scheme, stored)


class SelfCal(QuantMethod):
    """selfcal.py: GPTQ rounding on self-generated text, every grid computed before the output is streamed."""

    name = "selfcal"
    options = ("seed", "calibration_sequences", "rounds")
    precomputed = True

    @staticmethod
    def parameters(config) -> dict:
        """selfcal.py's resolved parameters for ``config``'s options."""
        from surgery.quantize.selfcal import resolve

        return resolve({"sequences": config.calibration_sequences, "rounds": config.rounds})

    def check(self, config) -> None:
        self.parameters(config)

    def recipe(self, config) -> dict:
        return {"selfcal": self.parameters(config)}

    def prepare(self, ckpt: Checkpoint, schemes: dict[str, Scheme], config, stored: torch.dtype,
                device: torch.device) -> tuple[Fit, dict]:
        """selfcal.py's grids for every module (they are small), handed out once each, and its report."""
        from surgery.quantize.selfcal import self_calibrate

        grids, report = self_calibrate(ckpt, schemes, self.parameters(config), config.seed or 0, stored, device)
        return (lambda module, weight, scheme: grids.pop(module)), report


METHODS: dict[str, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    """Make ``method`` available as ``--method method.name``.

    Args:
        method: the method object.

    Returns:
        ``method``.

    Example::

        register_method(MyMethod())
    """
    METHODS[method.name] = method
    return method


for _builtin in (RTN(), HQQ(), SelfCal()):
    register_method(_builtin)


def method_named(name: str) -> QuantMethod:
    """The registered method called ``name``.

    Args:
        name: a ``--method`` value.

    Returns:
        The method; BadInput naming ``--method`` for an unknown one.

    Example::

        method_named("rtn").reference_rounding   # True
    """
    if name not in METHODS:
        raise BadInput(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]
