"""What the ``surgery adapter`` commands take and give back: frozen configs checked when made (BadInput with the
commands' messages, so the CLI, the pipeline and API callers get the same checks), and typed results::

    config = NTKAdapterConfig("org/model", "persona-ntk", prompt_file="persona.txt", steps=100)
    make_ntk_adapter(config).summary()         # what `surgery adapter ntk --json` prints
    evaluate(AdapterEvalConfig("org/model", "persona-ntk", "persona.txt")).kl_adapter
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.errors import BadInput
from surgery.runtime import check_device

NTK_STEPS = 200
NTK_LR = 1e-2
NTK_BATCH = 8
NTK_QUERIES = 512
NTK_QUERY_LENGTH = 32
NTK_EXACT_TOKENS = 16  # prompt tokens per layer and KV head kept exactly (0: the paper's pure NTK-attention)
EVAL_QUERIES = 64  # 16 queries proved a noisy measure: disjoint sets of 16 differed by 2×
EVAL_QUERY_LENGTH = 32


@dataclass(frozen=True)
class PrefixAdapterConfig:
    """``surgery adapter prefix``: the prompt's KV cache as a PEFT prefix-tuning adapter.

    Args:
        source: model directory, .gguf file or Hub repo id.
        prompt_file: UTF-8 text of the prompt.
        output: the adapter directory (written atomically).
        force: replace ``output`` if it exists.
        device: cpu, cuda or cuda:N.

    Example::

        make_prefix_adapter(PrefixAdapterConfig("org/model", "persona.txt", "persona-prefix"))
    """

    source: str
    prompt_file: str | Path
    output: str | Path
    force: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(frozen=True)
class NTKAdapterConfig:
    """``surgery adapter ntk``: an NTK-attention adapter distilled from a prompt, or trained on task data.

    Args:
        source: model directory, .gguf file or Hub repo id (llama, mistral, qwen2).
        output: the adapter directory (written atomically).
        prompt_file: the prompt to distil (exclusive with ``train_file``).
        train_file: task data to train on instead (.jsonl with "text", or paragraphs).
        queries: distillation queries (default: ``count`` continuations the model samples).
        steps: Adam steps (at most, when distilling: validated early stopping).
        lr: learning rate.
        batch: queries (or texts) per step.
        count: self-generated queries.
        length: tokens per query.
        exact_tokens: prompt tokens per layer and KV head kept exactly.
        least_squares: fit each layer by least squares before distillation.
        seed: seed of the queries, the minibatches and a from-scratch start.
        force: replace ``output`` if it exists.
        device: cpu, cuda or cuda:N.

    Example::

        make_ntk_adapter(NTKAdapterConfig("org/model", "task-ntk", train_file="task.jsonl", steps=500, lr=1e-3))
    """

    source: str
    output: str | Path
    prompt_file: str | Path | None = None
    train_file: str | Path | None = None
    queries: str | Path | None = None
    steps: int = NTK_STEPS
    lr: float = NTK_LR
    batch: int = NTK_BATCH
    count: int = NTK_QUERIES
    length: int = NTK_QUERY_LENGTH
    exact_tokens: int = NTK_EXACT_TOKENS
    least_squares: bool = True
    seed: int = 0
    force: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device(self.device)
        if (self.prompt_file is None) == (self.train_file is None):
            raise BadInput("give either --prompt-file (distil a prompt) or --train-file (train on task data)")
        if self.queries is not None and self.train_file is not None:
            raise BadInput("--queries is for distilling a prompt; with --train-file the data is the training signal")
        for value, option in ((self.steps, "--steps"), (self.exact_tokens, "--exact-tokens"), (self.batch, "--batch"),
                              (self.count, "--count"), (self.length, "--length")):
            if value < (0 if option in ("--steps", "--exact-tokens") else 1):
                raise BadInput(f"{option} {value}: must be "
                               f"{'non-negative' if option in ('--steps', '--exact-tokens') else 'positive'}")
        if not self.lr > 0:
            raise BadInput(f"--lr {self.lr}: must be positive")


@dataclass(frozen=True)
class AdapterEvalConfig:
    """``surgery adapter eval``: how well an adapter stands in for its prompt.

    Args:
        model: the model the adapter was made for.
        adapter: a prefix or NTK-attention adapter directory.
        prompt_file: the prompt it stands for.
        queries: held-out queries (default: ``count`` continuations the model samples).
        count: self-generated queries.
        length: tokens per query.
        seed: seed of the held-out queries (never those training drew).
        device: cpu, cuda or cuda:N.

    Example::

        evaluate(AdapterEvalConfig("org/model", "persona-ntk", "persona.txt", count=16))
    """

    model: str
    adapter: str | Path
    prompt_file: str | Path
    queries: str | Path | None = None
    count: int = EVAL_QUERIES
    length: int = EVAL_QUERY_LENGTH
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.count < 1 or self.length < 1:
            raise BadInput("--count and --length must be positive")
        check_device(self.device)


@dataclass(frozen=True)
class AdapterResult:
    """What :func:`~surgery.adapters.make_prefix_adapter` or :func:`~surgery.adapters.make_ntk_adapter` wrote: the
    directory, the method, the figures measured (also in its surgery.json), its files and the seconds taken."""

    output: str
    method: str
    measurements: dict
    files: list[str]
    seconds: float

    def summary(self) -> dict:
        """What ``surgery adapter prefix|ntk --json`` prints::

            make_prefix_adapter(config).summary()["adapter_bytes"]
        """
        return {"output": self.output, "method": self.method, **self.measurements, "files": self.files,
                "seconds": self.seconds}


@dataclass(frozen=True)
class Fidelity:
    """What :func:`~surgery.adapters.evaluate` measured: next-token KL against the model run with the real prompt
    (for the adapter and for no prompt), top-1 agreement, and sizes."""

    model: str
    prompt_file: str
    adapter: str
    kind: str
    queries: int
    positions: int
    kl_adapter: float
    kl_no_prompt: float
    top1_adapter: float
    top1_no_prompt: float
    prompt_tokens: int
    adapter_bytes: int
    prompt_kv_cache_bytes: int
    seconds: float

    def summary(self) -> dict:
        """What ``surgery adapter eval --json`` prints::

            evaluate(config).summary()["kl_adapter"]
        """
        return asdict(self)
