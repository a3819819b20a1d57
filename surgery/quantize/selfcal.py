"""``--method selfcal``: data-free self-calibration in the spirit of AdaDFQ (arXiv 2303.06869), carried to LLMs.

No data set and no download: the full-precision model writes its own calibration text, the current quantized model
says where it disagrees with it, and the sequences of moderate disagreement drive a GPTQ rounding search on the
output format's own grid::

    from surgery.quantize import quantize
    quantize("org/model", "model-w4", bits=4, group_size=32, method="selfcal",
             selfcal={"sequences": 32, "rounds": 2})

1. Pool. The full-precision model generates ``candidates`` sequences of ``length`` tokens (LLM-QAT's recipe): a
   start token drawn uniformly from the vocabulary, the next ``greedy_tokens`` tokens greedy, the rest sampled at
   temperature 1 from the full distribution; seeded by ``--seed``. The pool is generated once and re-scored every
   round. (Generating loads the whole model once, float32, as self-generated calibration text does; everything
   after it runs one decoder layer at a time, :class:`surgery.runtime.LayerStream`.)
2. Score. The current quantized model (round 1: ``round0``, hqq by default — on the same grid, so the run starts
   from the better data-free method — or rtn) and the full-precision model both read the pool; each sequence's
   disagreement is its mean next-token KL(P_full ‖ P_quantized).
3. Select (:func:`select_sequences`). "The largest disagreement is not the best": of the ``sequences`` kept, a
   share ``agreeing_share`` are the lowest-KL (agreeing) candidates, the rest are spread evenly by rank over the
   candidates whose KL lies inside the margin [``margin_low``, ``margin_high``] percentiles of the pool's KL
   (fewer when the margin holds fewer).
4. Calibrate (:func:`gptq`). Layer by layer, the kept sequences' inputs to every quantized Linear give
   H = Σ xᵀx; GPTQ rounds the weight column by column with error feedback through the Cholesky factor of
   (H + ``damp``·mean(diag H)·I)⁻¹, in blocks of ``block`` columns. The grid is the format's: when a group starts, its
   scale (and integer zero point) is re-fitted by ``round0``'s fitter on the error-updated columns, as GPTQ
   re-fits per group, with scales rounded to the stored dtype — so every writer (compressed-tensors, GPTQ v1, GGUF
   Q4_0 / Q8_0 blocks of 32) stores the result unchanged. Sequential, as GPTQ: each layer is calibrated on the
   outputs of the already-quantized layers before it, and its quantized outputs feed the next.
5. Repeat for ``rounds`` rounds: round r re-selects from the pool with the round r − 1 model and re-runs step 4
   from the full-precision weights. The last round's grids are written.

Parameters (``selfcal`` dict; the resolved values are recorded in surgery.json) and defaults:

=================  =======  ================================================================================
sequences          32       calibration sequences kept per round (``--calibration-sequences``)
candidates         64       sequences generated for the pool (default: 2 × sequences)
length             128      tokens per sequence (start token included)
greedy_tokens      4        greedy tokens after the random start token
margin_low         20       lower percentile of the pool's per-sequence KL bounding the margin
margin_high        80       upper percentile
agreeing_share     0.25     share of the kept sequences taken from the lowest KL (agreeing ones)
rounds             2        score → select → calibrate rounds (``--rounds``)
damp               0.01     GPTQ damping, a fraction of mean(diag H)
block              128      GPTQ's lazy-update block (columns; rounded to a multiple of the group size)
round0             hqq      the starting quantizer and the per-group fitter: hqq or rtn
chunk              8        sequences run through a layer at once
=================  =======  ================================================================================

Memory: the embedding, the final norm and the lm_head, one decoder layer, and the activations of the pool (two
streams of candidates × length × hidden floats while scoring) at a time; the grids of finished layers (int8 values,
scales) are kept until the writer streams the output. Modules outside the decoder layers (an lm_head that is not
ignored) keep the ``round0`` grid. Deterministic for a seed on a given machine and thread count: no sampling after
the pool, and every reduction runs in a fixed order.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, require_finite
from surgery.quantize.grid import Grid, Scheme, hqq, rtn
from surgery.runtime import (LayerStream, cache_kwargs, input_hooks, kl_per_position, loaded_model, output_cache,
                             overridden_weights, sample_next)

log = logging.getLogger(__name__)

DEFAULTS = {"sequences": 32, "candidates": None, "length": 128, "greedy_tokens": 4, "margin_low": 20.0,
            "margin_high": 80.0, "agreeing_share": 0.25, "rounds": 2, "damp": 0.01, "block": 128, "round0": "hqq",
            "chunk": 8}

Fit = Callable[[torch.Tensor, Scheme], Grid]


def resolve(given: dict | None) -> dict:
    """The full parameter set: ``given`` over :data:`DEFAULTS`, checked (BadInput names the bad one).

    Args:
        given: the parameters set (a None value keeps the default), or None for all defaults.

    Returns:
        Every parameter of :data:`DEFAULTS`; ``candidates`` defaults to twice ``sequences``.

    Example: ``resolve({"sequences": 8, "rounds": None})["candidates"]   # 16``
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise BadInput(f"--method selfcal: unknown parameter {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    params = {**DEFAULTS, **{key: value for key, value in given.items() if value is not None}}
    if params["candidates"] is None:
        params["candidates"] = 2 * params["sequences"]
    for key in ("sequences", "candidates", "length", "rounds", "block", "chunk"):
        if not isinstance(params[key], int) or params[key] < 1:
            raise BadInput(f"--method selfcal: {key} {params[key]!r} must be a positive integer")
    if params["candidates"] < params["sequences"]:
        raise BadInput(f"--method selfcal: candidates ({params['candidates']}) must be at least sequences "
                       f"({params['sequences']})")
    if params["length"] < 2 or not 0 <= params["greedy_tokens"] < params["length"]:
        raise BadInput("--method selfcal: length must be at least 2 and greedy_tokens between 0 and length − 1")
    if not 0 <= params["margin_low"] <= params["margin_high"] <= 100:
        raise BadInput(f"--method selfcal: margin percentiles {params['margin_low']}–{params['margin_high']} must "
                       f"satisfy 0 ≤ low ≤ high ≤ 100")
    if not 0 <= params["agreeing_share"] <= 1:
        raise BadInput(f"--method selfcal: agreeing_share {params['agreeing_share']} must be in [0, 1]")
    if not params["damp"] > 0:
        raise BadInput(f"--method selfcal: damp {params['damp']} must be positive")
    if params["round0"] not in ("hqq", "rtn"):
        raise BadInput(f"--method selfcal: round0 {params['round0']!r}: expected hqq or rtn")
    return params


# ---------------------------------------------------------------------------------------------- selection


def select_sequences(kl: torch.Tensor, keep: int, *, low: float = 20.0, high: float = 80.0,
                     agreeing_share: float = 0.25) -> list[int]:
    """Indices (ascending) of the sequences to calibrate on, given each candidate's KL.

    ``round(agreeing_share · keep)`` are the lowest-KL candidates (ties: lower index first); the rest, up to
    ``keep``, are spread evenly by rank over the not-yet-chosen candidates whose KL lies in [q_low, q_high], the
    ``low`` and ``high`` percentiles of ``kl`` (linear interpolation, as ``torch.quantile``).

    Args:
        kl: each candidate's KL from the reference (any shape; flattened).
        keep: how many sequences to keep (all of them when there are no more candidates).
        low: the lower percentile of the margin.
        high: the upper percentile of the margin.
        agreeing_share: the share of ``keep`` taken from the lowest KL.

    Returns:
        The kept candidates' indices, ascending.

    Example::

        select_sequences(torch.tensor([0.1, 5.0, 0.3, 0.2, 9.0]), 2, agreeing_share=0.5)   # [0, 2]
    """
    kl = kl.double().flatten()
    if keep >= kl.numel():
        return list(range(kl.numel()))
    order = sorted(range(kl.numel()), key=lambda i: (float(kl[i]), i))
    agreeing = order[:round(agreeing_share * keep)]
    q_low, q_high = (float(torch.quantile(kl, p / 100)) for p in (low, high))
    chosen = set(agreeing)
    margin = [i for i in order if q_low <= float(kl[i]) <= q_high and i not in chosen]
    wanted = keep - len(agreeing)
    if len(margin) <= wanted:
        picked = margin
    else:  # evenly spaced ranks across the margin: its low, middle and high disagreement all represented
        picked = [margin[(2 * k + 1) * len(margin) // (2 * wanted)] for k in range(wanted)]
    return sorted(chosen | set(picked))


# --------------------------------------------------------------------------------------------------- GPTQ


def group_fitter(fit: Fit, scheme: Scheme) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(columns of one group, group index) → (scale, zero)`` re-fitted by ``fit`` (rtn / hqq) on those columns.

    Args:
        fit: the quantizer whose parameters are taken (``rtn``, ``hqq`` or one with the same signature).
        scheme: the module's scheme (its group size is replaced by the columns' width).

    Returns:
        The ``fit_group`` callable :func:`gptq` takes: per-row scale and zero point of one group.

    Example: ``gptq(weight, hessian, scheme, group_fitter(rtn, scheme))``
    """
    def fit_group(columns: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        grid = fit(columns, replace(scheme, group_size=columns.shape[1]))
        return grid.scale[:, 0], grid.zero[:, 0]

    return fit_group


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme,
         fit_group: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], *, damp: float = 0.01,
         block: int = 128) -> Grid:
    """GPTQ (Frantar et al., 2022) on a group-wise integer grid: minimise ‖XWᵀ − XŴᵀ‖ given H = XᵀX.

    Columns are rounded left to right; each rounding error, divided by the pivot of the upper Cholesky factor U of
    H⁻¹ (damped by ``damp``·mean(diag H)), is spread over the columns not yet rounded (lazily, in blocks of
    ``block`` columns). When a group starts, ``fit_group(columns, g)`` gives its scale and integer zero point (per
    row) — fitted on the error-updated columns, or fixed in advance (return a given grid's). Input channels that
    never fire (diag H = 0) are set to zero first, as GPTQ does. Runs on ``weight``'s device (``hessian`` is moved
    there).

    Args:
        weight: the 2-D weight (out, in).
        hessian: H = XᵀX of the module's inputs (in, in).
        scheme: bits, group size and symmetry.
        fit_group: ``(columns, group index) → (scale, zero)``, e.g. :func:`group_fitter`'s.
        damp: the damping added to H's diagonal, a fraction of its mean.
        block: the lazy-update block in columns (rounded to a multiple of the group size).

    Returns:
        The grid (int8 values, float32 scales, int8 zero points).

    Example: ``gptq(weight, hessian, scheme, lambda columns, g: (base.scale[:, g], base.zero[:, g]), damp=0.01)``
    """
    group = scheme.group_size
    rows, columns = weight.shape
    block = max(group, block // group * group)
    device = weight.device
    w = weight.float().clone()
    h = hessian.to(device, torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    extra = damp * float(torch.diagonal(h).mean())
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(h + extra * torch.eye(columns, dtype=h.dtype, device=device))
        if not int(info):
            break
        extra *= 10
    else:
        raise BadInput("--method selfcal: the calibration Hessian is not positive definite even with damping")
    inverse = torch.cholesky_inverse(factor)
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    q = torch.zeros(rows, columns, dtype=torch.int8, device=device)
    scales = torch.zeros(rows, columns // group, device=device)
    zeros = torch.zeros(rows, columns // group, dtype=torch.int8, device=device)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1 = w[:, start:end].clone()
        errors = torch.zeros_like(w1)
        u1 = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                index = column // group
                scale, zero = fit_group(w1[:, i:i + group], index)
                scales[:, index], zeros[:, index] = scale.float(), zero.to(torch.int8)
                scale, zero_f = scales[:, index], zeros[:, index].float()
            values = w1[:, i]
            level = (torch.round(values / scale) + zero_f).clamp(scheme.qmin, scheme.qmax)
            q[:, column] = level.to(torch.int8)
            error = (values - (level - zero_f) * scale) / u1[i, i]
            w1[:, i:] -= error.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return Grid(q, scales, zeros, scheme)


# --------------------------------------------------------------------------------------------- the pool


@torch.no_grad()
def generate_pool(ckpt: Checkpoint, params: dict, seed: int) -> torch.Tensor:
    """(candidates, length) token ids the full-precision model writes itself: a uniformly random start token,
    ``greedy_tokens`` greedy tokens, then sampling at temperature 1. Loads the whole model once (float32).

    Args:
        ckpt: the full-precision checkpoint.
        params: the resolved parameters (:func:`resolve`).
        seed: the generator's seed.

    Returns:
        The ids::

            pool = generate_pool(ckpt, resolve({"candidates": 16, "length": 64}), seed=0)
    """
    model = loaded_model(ckpt)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(ckpt.config["vocab_size"])
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (params["candidates"], 1), generator=generator)
    out = model(input_ids=ids, use_cache=True)
    for step in range(params["length"] - 1):
        logits = out.logits[:, -1].float()
        token = logits.argmax(-1) if step < params["greedy_tokens"] else sample_next(logits, generator).squeeze(1)
        ids = torch.cat([ids, token.unsqueeze(1)], 1)
        if step < params["length"] - 2:
            out = model(input_ids=token.unsqueeze(1), **cache_kwargs(model, output_cache(out)))
    del model
    return ids


# ------------------------------------------------------------------------------------------------ the run


class SelfCalibration:
    """Runs steps 2–5 for a checkpoint; :meth:`run` returns module → Grid (on the CPU) and a report for the
    manifest. The grids (round 0 and GPTQ) are fitted on ``device``; the layers run on the CPU."""

    def __init__(self, ckpt: Checkpoint, modules: dict[str, Scheme], fit: Fit, params: dict, seed: int,
                 device: torch.device = torch.device("cpu")):
        self.ckpt, self.schemes, self.fit, self.params, self.seed = ckpt, modules, fit, params, seed
        self.device = device

    def _dequantized(self, grids: dict[str, Grid]) -> dict[str, torch.Tensor]:
        return {module: grid.dequantize() for module, grid in grids.items()}

    def round0(self) -> dict[str, Grid]:
        return {module: self.fit(require_finite(self.ckpt.get(f"{module}.weight"), self.ckpt.source,
                                                 f"{module}.weight").float().to(self.device), scheme).to("cpu")
                for module, scheme in self.schemes.items()}

    @torch.no_grad()
    def score(self, stream: LayerStream, pool: torch.Tensor, inputs, grids: dict[str, Grid],
              full_cache: dict) -> torch.Tensor:
        """Per-sequence mean next-token KL(P_full ‖ P_quantized) over the pool; the full-precision stream's last
        hidden states are computed once and kept in ``full_cache``."""
        hidden, kwargs = inputs
        need_full = "hidden" not in full_cache
        full = [h for h in hidden]
        quant = [h for h in hidden]
        for index, _ in stream.each_layer():
            linears = stream.linears(index)
            for c in range(len(quant)):
                if need_full:
                    full[c] = stream.run(index, full[c], kwargs[c])
            values = {name: grids[name].dequantize() for name in linears if name in grids}
            with overridden_weights(linears, values):
                for c in range(len(quant)):
                    quant[c] = stream.run(index, quant[c], kwargs[c])
        if need_full:
            full_cache["hidden"] = full
        full = full_cache["hidden"]
        head = {name: module for name, module in stream.model.named_modules() if isinstance(module, nn.Linear)
                and name in grids and not any(name.startswith(prefix + ".") for prefix in stream.layer_names)}
        head_values = {name: grids[name].dequantize() for name in head}
        kl = []
        chunks = stream.chunks(pool)
        for c, ids in enumerate(chunks):
            for row in range(ids.shape[0]):  # one sequence at a time: its (length, vocab) logits twice
                log_p = torch.log_softmax(stream.logits(ids[row:row + 1], full[c][row:row + 1]), -1)
                with overridden_weights(head, head_values):
                    log_q = torch.log_softmax(stream.logits(ids[row:row + 1], quant[c][row:row + 1]), -1)
                kl.append(kl_per_position(log_p, log_q).mean())
        return torch.stack(kl)

    @torch.no_grad()
    def calibrate(self, stream: LayerStream, inputs, fallback: dict[str, Grid]) -> dict[str, Grid]:
        """One GPTQ pass over the decoder layers on the kept sequences' layer inputs, sequentially."""
        hidden, kwargs = inputs
        grids = {}
        for index, layer in stream.each_layer():
            linears = {name: module for name, module in stream.linears(index).items() if name in self.schemes}
            hessians = {name: torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
                        for name, module in linears.items()}

            def accumulate(name):
                def add(inputs: torch.Tensor) -> None:
                    x = inputs.reshape(-1, inputs.shape[-1]).double()
                    hessians[name] += x.T @ x
                return add

            with input_hooks(stream.model, {name: accumulate(name) for name in linears}):
                for c in range(len(hidden)):
                    stream.run(index, hidden[c], kwargs[c])
            for name, module in linears.items():
                scheme = self.schemes[name]
                grids[name] = gptq(module.weight.detach().to(self.device), hessians[name], scheme,
                                   group_fitter(self.fit, scheme), damp=self.params["damp"],
                                   block=self.params["block"]).to("cpu")
            with overridden_weights(linears, self._dequantized({n: grids[n] for n in linears})):
                hidden = [stream.run(index, hidden[c], kwargs[c]) for c in range(len(hidden))]
        for name in self.schemes:
            if name not in grids:  # outside the decoder layers (a quantized lm_head): the round-0 grid
                grids[name] = fallback[name]
        return grids

    def run(self, progress: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Grid], dict]:
        params = self.params
        pool = generate_pool(self.ckpt, params, self.seed)
        progress(f"selfcal: generated {pool.shape[0]} × {pool.shape[1]} tokens")
        stream = LayerStream(self.ckpt, params["chunk"])
        pool_inputs = stream.layer_inputs(pool)
        grids = first = self.round0()
        full_cache: dict = {}
        rounds = []
        for number in range(1, params["rounds"] + 1):
            kl = self.score(stream, pool, pool_inputs, grids, full_cache)
            keep = select_sequences(kl, params["sequences"], low=params["margin_low"], high=params["margin_high"],
                                    agreeing_share=params["agreeing_share"])
            progress(f"selfcal round {number}: pool KL {float(kl.mean()):.5f}, calibrating on {len(keep)} sequences")
            inputs = stream.layer_inputs(pool[keep])
            grids = self.calibrate(stream, inputs, first)
            rounds.append({"round": number, "scored_by": params["round0"] if number == 1 else f"round {number - 1}",
                           "pool_kl": round(float(kl.mean()), 6), "kept": len(keep),
                           "kept_kl": [round(float(kl[keep].min()), 6), round(float(kl[keep].max()), 6)]})
        return grids, {"pool": list(pool.shape), "rounds": rounds}


def _fitter(round0: str, stored: torch.dtype) -> Fit:
    """The round-0 quantizer (and GPTQ's per-group fitter), with scales rounded to the stored dtype."""
    if round0 == "hqq":
        return lambda weight, scheme: hqq(weight, scheme, stored)
    return lambda weight, scheme: rtn(weight, scheme, stored)


def self_calibrate(ckpt: Checkpoint, schemes: dict[str, Scheme], params: dict, seed: int,
                   stored: torch.dtype, device: torch.device = torch.device("cpu")) -> tuple[dict[str, Grid], dict]:
    """module → Grid for every module in ``schemes`` (HF row order), and the report for the manifest; the grids are
    fitted on ``device`` and returned on the CPU.

    Args:
        ckpt: the source checkpoint (it needs a config.json: the model is built from it).
        schemes: module → its scheme, for every module to quantize.
        params: the parameters, as :func:`resolve` returns them.
        seed: the seed of the self-generated pool.
        stored: the dtype the scales are stored in.
        device: where the model runs and the grids are fitted.

    Returns:
        ``(grids, report)``: module → :class:`Grid` on the CPU, and ``{"pool": shape, "rounds": [...]}``.

    Example::

        grids, report = self_calibrate(ckpt, {"model.layers.0.mlp.up_proj": Scheme()}, resolve(None), 0, torch.bfloat16)
    """
    if not ckpt.config:
        raise BadInput(f"{ckpt.source}: --method selfcal needs a config.json to build the model")
    run = SelfCalibration(ckpt, schemes, _fitter(params["round0"], stored), params, seed, device)
    torch.set_flush_denormal(True)  # subnormal activations slow CPU matmuls tenfold (tiny random models hit them)
    try:
        return run.run(lambda message: log.info("%s", message))
    finally:
        torch.set_flush_denormal(False)


__all__ = ["DEFAULTS", "resolve", "select_sequences", "gptq", "group_fitter", "generate_pool", "self_calibrate"]
