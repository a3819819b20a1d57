"""``surgery quantize`` and ``verify``."""

from __future__ import annotations

from typing import Optional

import typer

from surgery.cli.options import (JSON_OPTION, SHARD_OPTION, check_device, print_json, progress,
                                 human_size)

app = typer.Typer()


QUANTIZE_HELP = " ".join("""
Quantize the Linear weights of SRC's language model (MoE experts one by one; never routers, norms or
embeddings; a vision tower too when --ignore does not name it) to 4- or 8-bit integers or floats, group-wise, streaming one
tensor at a time, into a format stock loaders read: compressed-tensors pack-quantized (vLLM; transformers +
compressed-tensors), its float formats by preset name (--preset FP8_DYNAMIC: FP8 E4M3 weights per output channel;
FP8_BLOCK: per 128x128 block; both with FP8 activations the loader quantizes at run time; NVFP4A16: FP4 E2M1 with
FP8 scales per 16 and one global scale, shared by q/k/v and by gate/up; MXFP4A16: FP4 with power-of-two scales per
32; all rtn), GPTQ v1 (no MoE experts), GGUF (llama family; one .gguf file, Q4_0 or Q8_0 blocks of 32, or --gguf-type K-quant
mixes or Q4_1 / Q5_0 / Q5_1, read by llama.cpp and transformers), or mxfp4: gpt-oss's 3-D expert tensors in its own MXFP4 layout (FP4 E2M1 in blocks of 32, one
E8M0 scale each; rtn only; attention and the rest kept), which transformers and vLLM load (the other formats leave
those tensors in full precision, with a warning). An MXFP4 gpt-oss input is read decoded. Methods: rtn (round to nearest), hqq (half-quadratic refinement of the scales, and integer zero
points when asymmetric; kept per group only where it lowers the squared error without any weight erring more than
under rtn, so outlier weights are never clipped), selfcal (data-free self-calibration after AdaDFQ: the model
samples its own text, twice --calibration-sequences sequences of 128 tokens from random start tokens (4 greedy
tokens, then sampling; --seed); the hqq model scores each by its mean next-token KL from the full-precision one; the
25% lowest-KL ones plus an even spread of those between the 20th and 80th KL percentiles, --calibration-sequences in
all, drive GPTQ rounding (H = XᵀX per layer, damping 0.01, per-group scales re-fitted on the format's grid,
layers quantized in sequence), for --rounds rounds, each re-scored by the previous round's model; one decoder layer
in memory at a time after the generation, which loads the whole model; parameters recorded in surgery.json).
--imatrix (rtn into the integer formats): the model samples its own text the same way, the streaming runtime
records every quantized Linear's mean squared input per column, and each group's scale and integer zero point
(GGUF: each block's, as llama-quantize --imatrix) is searched to lower the error weighted by it. Where
--group-size does not divide a module's input dimension: compressed-tensors puts those modules in a second config group at 64 or 32,
GPTQ lowers its one group size to the largest power of two that divides all (both reported).
""".split("\n")).strip()


@app.command(help=QUANTIZE_HELP)
def quantize(
    source: str = typer.Argument(..., help="Model directory, .safetensors or .gguf file, or Hub repo id."),
    output: str = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A compressed-tensors scheme, which sets the format, "
                                                               "bits, scheme and group size: W4A16, W4A16_ASYM, "
                                                               "W8A16, FP8_DYNAMIC, FP8_BLOCK, NVFP4A16 or "
                                                               "MXFP4A16."),
    bits: Optional[int] = typer.Option(None, "--bits", help="4 or 8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns sharing a scale (multiple "
                                                                         "of 8; default 128, GGUF: 32)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="sym (default) or asym (integer zero points)."),
    method: str = typer.Option("rtn", "--method", help="rtn, hqq or selfcal."),
    fmt: Optional[str] = typer.Option(None, "--format", help="compressed-tensors (default), fp8-dynamic, "
                                                             "fp8-block, nvfp4a16, mxfp4a16, gptq, gguf or mxfp4."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="GGUF: Q4_K_M, Q5_K_M, Q6_K, Q4_K_S, Q8_0, "
                                                                      "Q4_0, Q4_1, Q5_0 or Q5_1, with llama.cpp's "
                                                                      "per-tensor mix (implies --format gguf; all "
                                                                      "but Q4_0 / Q8_0 rtn only)."),
    ignore: str = typer.Option("lm_head,vision,projector", "--ignore",
                               help="Comma-separated modules left unquantized: names, trailing parts "
                                    "(mlp.down_proj), re:REGEX, or vision / projector (those parts of a "
                                    "vision-language model). Routers, norms and embeddings are never quantized."),
    seed: Optional[int] = typer.Option(None, "--seed", help="selfcal, --imatrix: seed of the generated text (0)."),
    calibration_sequences: Optional[int] = typer.Option(None, "--calibration-sequences",
                                              help="selfcal: sequences kept for calibration per round (32; twice "
                                                   "as many are generated); --imatrix: sequences generated (8)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="selfcal: score → select → calibrate rounds (2)."),
    imatrix: bool = typer.Option(False, "--imatrix", help="rtn into compressed-tensors, GPTQ or GGUF: search each "
                                                          "group's scale (and zero point) under a data-free "
                                                          "importance matrix, the mean squared input of every "
                                                          "column over text the model writes itself "
                                                          "(--calibration-sequences sequences of 256 tokens, "
                                                          "default 8; --seed), as llama.cpp's --imatrix does with "
                                                          "a calibration file."),
    device: str = typer.Option("cpu", "--device", help="Where each tensor's grid is fitted (rtn, hqq, selfcal's GPTQ "
                                                       "rounding): cpu or cuda[:N]; reading, the layers and writing "
                                                       "stay on the CPU. rtn writes the same bytes on either."),
    max_shard_size: str = SHARD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists (once the new one is complete)."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.quantize import QuantizeConfig, quantize as run_quantize

    check_device(device)
    config = QuantizeConfig(source, output, bits=bits, group_size=group_size, scheme=scheme, method=method,
                            format=fmt, preset=preset, gguf_type=gguf_type, ignore=tuple(part.strip() for part in ignore.split(",") if part.strip()),
                            seed=seed, calibration_sequences=calibration_sequences, rounds=rounds, imatrix=imatrix,
                            device=device,
                            max_shard_size=max_shard_size, force=force)
    with progress(None, "B", "quantize") as advance:
        summary = run_quantize(config, progress=advance).summary()
    if as_json:
        return print_json(summary)
    typer.echo(f"wrote {summary['output']}: {summary['modules']} modules at {config.bits} bits "
               f"({config.preset or method}, {config.format}), "
               f"weight relative error {summary['weight_relative_error']:.4f}, {human_size(summary['total_bytes'])}, "
               f"{summary['seconds']:.1f} s")


VERIFY_HELP = " ".join("""
Compare a quantized checkpoint with its reference, print the report, and fail (exit 1, one line on stderr) when it
is too far from it. The reference samples its own text from BOS (seeded; --tokens). Per quantized Linear, on the
inputs it sees in that text: the output relative error and cosine (fused dequantize-matmul kernel) and the weight
relative error; the text lists the --top worst. End to end: next-token KL(P‖Q) and top-1 agreement on that text,
the quantized side with all of the output's own tensors. Fails when a Linear's output cosine is below --min-cosine,
the KL is above --max-kl, or loaders would not read the output as written (a quantized module that is not a
Linear, a missing tensor, what transformers' loader refuses). The defaults are measured (seeds 0-2, 128 tokens;
benchmarks/verify_bench.py --thresholds): SmolLM2-135M at 4 bits (rtn, hqq, GPTQ; group 64 and 128) has a lowest
cosine of 0.970-0.978 and a KL of 0.60-0.90 nats, at 8 bits 0.9999 and 0.004, tiny test models 0.991 and up and
0.005; an unrelated reference gives cosines of 0 or below and, on SmolLM2, a KL of 4.2; a module with zeroed scales
or shuffled bits a cosine of 0 (its KL, 0.9-1.3, is not told from 4-bit noise). So 0.9 sits in a wide gap, and
1.5 nats is 1.7x the worst real 4-bit figure, a third of a wrong reference's. Models of billions of parameters reach
far lower KLs: tighten --max-kl for them. The reference must be the model the output was quantized from: the file
hashes its surgery.json records are checked (a difference exits 2 unless --any-reference; no manifest: a warning).
""".split("\n")).strip()


@app.command(help=VERIFY_HELP)
def verify(
    quantized: str = typer.Argument(..., help="A checkpoint written by quantize, in any of its formats (GGUF: the "
                                               "output directory or its .gguf file)."),
    reference: str = typer.Option(..., "--reference", help="The unquantized model it was quantized from."),
    tokens: int = typer.Option(128, "--tokens", help="Self-generated tokens scored end to end, in 8 sequences "
                                                     "(more narrow the KL; a decode step per 8)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated text and of the probed positions."),
    max_kl: float = typer.Option(1.5, "--max-kl", help="Fail above this mean next-token KL(P‖Q), in nats (4-bit "
                                                       "SmolLM2-135M: up to 0.9)."),
    min_cosine: float = typer.Option(0.9, "--min-cosine", help="Fail when a quantized Linear's output cosine is "
                                                               "below this (real 4-bit outputs: 0.97 and up)."),
    any_reference: bool = typer.Option(False, "--any-reference", help="Compare with a reference whose files differ "
                                                                      "from those surgery.json records."),
    top: int = typer.Option(5, "--top", help="Modules listed, worst output relative error first (--json: all)."),
    as_json: bool = JSON_OPTION,
) -> None:
    from surgery.quantize.verify import VerifyConfig, raise_if_failed, report_lines, verify as run_verify

    config = VerifyConfig(quantized, reference=reference, tokens=tokens, seed=seed, max_kl=max_kl,
                          min_cosine=min_cosine, any_reference=any_reference, top=top)
    report = run_verify(config).summary()
    if as_json:
        print_json(report)
    else:
        typer.echo("\n".join(report_lines(report)))
    raise_if_failed(report)
