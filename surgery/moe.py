"""Dense models → a mixture of experts (mergekit-moe's job, on its YAML): each expert's MLP becomes one expert of
every layer, everything else is the base's, and each layer's router is set from the base's hidden states on the
experts' prompts, so that a prompt like an expert's goes to that expert::

    config = MoeConfig.from_yaml("moe.yaml", "out")     # base_model, experts [{source_model, positive_prompts}]...
    moe(config).summary()["experts"]                    # 4

Outputs: Mixtral from llama or mistral models; Qwen2-MoE from qwen2 models, with one shared expert (run for every
token, scaled by its own sigmoid gate); Qwen3-MoE from qwen3 models. Gate modes (mergekit's): ``hidden`` — per
layer, the mean over an expert's prompts of what the layer's MLP receives at the prompt's last token (the router's
own input, after the attention and its norm; mergekit takes the hidden state entering the layer instead), minus
that of its negative prompts, normalised; ``cheap_embed`` — the normalised sum of the prompts' token embeddings,
the same for every layer; ``random`` — seeded normal rows. Hidden states come from the streaming runtime, one
decoder layer in memory at a time, each prompt run on its own (no padding).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from surgery.arch import Architecture
from surgery.errors import BadInput
from surgery.io import open_checkpoint, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, parse_dtype
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available
from surgery.cards import model_name
from surgery.output import Card, OutputRecord
from surgery.runtime.sampling import tensor_seed

log = logging.getLogger(__name__)

GATE_MODES = ("hidden", "cheap_embed", "random")
YAML_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
DEGENERATE_CONDITION = 5.0  # mergekit's threshold on a layer's gate matrix condition number


@dataclass(frozen=True)
class OutputFamily:
    """How one MoE family lays out a layer: the dense families it is made from, its config fields, and the names
    of an expert's projections, its router and its shared expert."""

    model_type: str
    architecture: str
    sources: tuple[str, ...]
    expert: str  # "{prefix}" is model.layers.L, "{e}" the expert, "{p}" gate/up/down
    router: str
    projections: dict[str, str]  # gate / up / down → the expert's name for it
    shared: str | None = None  # a shared expert's projection, "{p}" its gate_proj/up_proj/down_proj
    shared_gate: str | None = None

    def config(self, base: dict, experts: int, per_token: int, shared: bool) -> dict:
        out = {key: value for key, value in base.items() if key not in ("architectures", "model_type")}
        out |= {"model_type": self.model_type, "architectures": [self.architecture], "num_experts_per_tok": per_token}
        if self.model_type == "mixtral":
            return out | {"num_local_experts": experts, "sliding_window": None}
        out |= {"num_experts": experts, "moe_intermediate_size": base["intermediate_size"], "decoder_sparse_step": 1,
                "mlp_only_layers": [], "norm_topk_prob": True}
        if self.model_type == "qwen2_moe":
            out |= {"shared_expert_intermediate_size": base["intermediate_size"] if shared else 0,
                    "use_sliding_window": False, "sliding_window": None}
        return out


QWEN_EXPERT = dict(expert="{prefix}.mlp.experts.{e}.{p}.weight", router="{prefix}.mlp.gate.weight",
                   projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
FAMILIES = {
    "mixtral": OutputFamily("mixtral", "MixtralForCausalLM", ("llama", "mistral"),
                            "{prefix}.block_sparse_moe.experts.{e}.{p}.weight", "{prefix}.block_sparse_moe.gate.weight",
                            {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen": OutputFamily("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2",), **QWEN_EXPERT,
                         shared="{prefix}.mlp.shared_expert.{p}.weight",
                         shared_gate="{prefix}.mlp.shared_expert_gate.weight"),
    "qwen3": OutputFamily("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), **QWEN_EXPERT),
}
DEFAULT_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen", "qwen3": "qwen3"}
PROJECTION_KINDS = {"mlp_gate": "gate", "mlp_up": "up", "mlp_down": "down"}


def _check_mapping(value: Any, keys: set[str], where: str, expected: str) -> None:
    """BadInput unless ``value`` is a mapping of ``keys`` only."""
    if not isinstance(value, dict):
        raise BadInput(f"{where}: {expected}, found {_short_repr(value)}")
    unknown = set(value) - keys
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")


def _model_reference(entry: dict, key: str, where: str) -> str:
    """``entry[key]`` when it is a model path or Hub id; BadInput naming ``key`` else."""
    model = entry.get(key)
    if not isinstance(model, str) or not model:
        raise BadInput(f"{where}: {key} must be a model path, Hub id or MODEL+ADAPTER, found "
                       f"{_short_repr(model)}")
    return model


def _short_repr(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to ``width`` characters (an error line stays one short line)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass(frozen=True)
class ExpertSource:
    """One expert: the dense model whose MLPs it takes, the prompts that should reach it (and those that should
    not), and mergekit's ``noise_scale`` (seeded Gaussian noise added to its weights) and ``residual_scale``
    (its down projection scaled)."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None

    @classmethod
    def from_yaml(cls, entry: Any, where: str) -> "ExpertSource":
        """An expert from its YAML mapping; BadInput naming ``where`` and the key for anything malformed."""
        _check_mapping(entry, EXPERT_KEYS, where, "each expert must be a mapping with source_model")
        model = _model_reference(entry, "source_model", where)

        def prompts(key: str) -> tuple[str, ...]:
            value = entry.get(key) or []
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise BadInput(f"{where}: {key} must be a list of non-empty strings")
            return tuple(value)

        def number(key: str) -> float | None:
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value == value or abs(value) == float("inf")):
                raise BadInput(f"{where}: {key} must be a finite number, found {value!r}")
            return None if value is None else float(value)

        return cls(model, prompts("positive_prompts"), prompts("negative_prompts"), number("noise_scale"),
                   number("residual_scale"))


@dataclass(frozen=True)
class MoeConfig:
    """What ``surgery moe`` builds, validated on construction (BadInput with the CLI's message).

    ``architecture`` is mergekit's: mixtral, qwen (Qwen2-MoE, with exactly one shared expert) or qwen3; None picks
    the base family's (llama and mistral → mixtral, qwen2 → qwen, qwen3 → qwen3). ``seed`` decides random gates
    and noise. ``device`` is where hidden states are computed.

    Example::

        MoeConfig("base", (ExpertSource("math", ("Solve 2x+1=3",)), ExpertSource("code", ("def f():",))), "out")
    """

    base_model: str
    experts: tuple[ExpertSource, ...]
    output: str | Path
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSource, ...] = ()
    architecture: str | None = None
    dtype: str | None = None
    seed: int = 0
    device: str = "cpu"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    force: bool = False

    def __post_init__(self) -> None:
        if self.gate_mode not in GATE_MODES:
            raise BadInput(f"gate_mode {self.gate_mode!r}: expected {', '.join(GATE_MODES)}")
        if not self.experts:
            raise BadInput("experts: at least one expert is needed")
        if isinstance(self.experts_per_token, bool) or not isinstance(self.experts_per_token, int) \
                or not 1 <= self.experts_per_token <= len(self.experts):
            raise BadInput(f"experts_per_token {self.experts_per_token!r}: expected 1 to the number of experts "
                           f"({len(self.experts)})")
        if self.architecture is not None and self.architecture not in FAMILIES:
            raise BadInput(f"architecture {self.architecture!r}: expected {', '.join(FAMILIES)}")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.gate_mode != "random":
            for index, expert in enumerate((*self.experts, *self.shared_experts)):
                if not expert.positive_prompts:
                    raise BadInput(f"expert {index} ({expert.source_model}): gate_mode {self.gate_mode} needs "
                                   "positive_prompts (or use gate_mode random)")
            prompts = {(e.positive_prompts, e.negative_prompts) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise BadInput("experts: every expert has the same prompts, so the router could not tell them apart")
        from surgery.runtime import check_device

        check_device(self.device)

    @classmethod
    def from_yaml(cls, path: str | Path, output: str | Path, **options: Any) -> "MoeConfig":
        """The config of a mergekit-moe YAML file, with ``options`` (seed, device, max_shard_size, force) added.

        Args:
            path: the YAML file.
            output: the output directory.
            **options: the other fields.

        Returns:
            The validated config; BadInput naming the file and key for anything mergekit-moe would not read.

        Example: ``MoeConfig.from_yaml("moe.yaml", "out", seed=1)``
        """
        from surgery.yamlfile import read_yaml

        where = str(path)
        data = read_yaml(path, "mergekit-moe config")
        _check_mapping(data, YAML_KEYS, where, "expected a mapping with base_model and experts")
        base = _model_reference(data, "base_model", where)

        def experts(key: str) -> tuple[ExpertSource, ...]:
            entries = data.get(key) or []
            if not isinstance(entries, list):
                raise BadInput(f"{where}: {key} must be a list")
            return tuple(ExpertSource.from_yaml(entry, f"{where}: {key}[{index}]")
                         for index, entry in enumerate(entries))

        return cls(base, experts("experts"), output, gate_mode=data.get("gate_mode") or "hidden",
                   experts_per_token=data.get("experts_per_token", 2), shared_experts=experts("shared_experts"),
                   architecture=data.get("architecture"), dtype=data.get("dtype"), **options)

    @classmethod
    def from_file(cls, path: str | Path, output: str | Path, seed: int = 0, device: str = "cpu",
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False) -> "MoeConfig":
        """:meth:`from_yaml` with the command's options spelled out (a pipeline step's keys: ``config`` for the
        YAML file, ``output``, ``seed``, ``device``, ``max_shard_size``, ``force``).

        Example: ``MoeConfig.from_file("moe.yaml", "out", seed=1)``
        """
        return cls.from_yaml(path, output, seed=seed, device=device, max_shard_size=max_shard_size, force=force)

    def recipe(self) -> dict:
        """Everything that decides the output bytes (recorded in surgery.json)."""
        return {"base_model": self.base_model, "gate_mode": self.gate_mode,
                "experts_per_token": self.experts_per_token, "architecture": self.architecture,
                "dtype": self.dtype, "seed": self.seed,
                "experts": [asdict(expert) for expert in self.experts],
                "shared_experts": [asdict(expert) for expert in self.shared_experts]}


@dataclass(frozen=True)
class MoeResult:
    """What :func:`moe` wrote: the output family, the expert count, the layers whose gates are nearly degenerate,
    and the writer's result."""

    config: MoeConfig
    model_type: str
    layers: int
    degenerate_layers: tuple[int, ...]
    written: WriteResult

    def summary(self) -> dict:
        """What ``surgery moe --json`` prints.

        Returns:
            output, model_type, experts, experts_per_token, shared_experts, layers, gate_mode,
            degenerate_layers, shards and total_bytes.

        Example: ``moe(config).summary()["model_type"]   # "mixtral"``
        """
        config = self.config
        return {"output": str(self.written.directory), "model_type": self.model_type,
                "experts": len(config.experts), "experts_per_token": config.experts_per_token,
                "shared_experts": len(config.shared_experts), "layers": self.layers, "gate_mode": config.gate_mode,
                "degenerate_layers": list(self.degenerate_layers), "shards": len(self.written.shards),
                "total_bytes": self.written.total_size}


def _family(config: MoeConfig, base: Checkpoint) -> OutputFamily:
    model_type = (base.config or {}).get("model_type")
    name = config.architecture or DEFAULT_FAMILY.get(model_type)
    if name is None:
        raise BadInput(f"{base.source}: a {model_type} model; surgery moe builds from llama, mistral, qwen2 or qwen3 "
                       "models")
    family = FAMILIES[name]
    if model_type not in family.sources:
        raise BadInput(f"architecture {name}: made from {' or '.join(family.sources)} models, and "
                       f"{base.source} is {model_type}")
    wanted = 1 if family.shared else 0
    if len(config.shared_experts) > wanted or (family.shared and not config.shared_experts):
        raise BadInput(f"architecture {name}: takes " + ("exactly one shared expert" if family.shared
                                                           else "no shared experts")
                       + f", {len(config.shared_experts)} given")
    return family


def _mlp_names(ckpt: Checkpoint, arch: Architecture) -> dict[tuple[int, str], str]:
    """(layer, gate/up/down) → the dense model's tensor name."""
    names = {}
    for name in ckpt.tensors:
        role = arch.role(name)
        if role.kind in PROJECTION_KINDS and role.layer is not None and name.endswith(".weight"):
            names[(role.layer, PROJECTION_KINDS[role.kind])] = name
    return names


def _check_sources(base: Checkpoint, sources: list[Checkpoint]) -> None:
    """BadInput unless every expert source is the base's family with the same tensor names and shapes."""
    for ckpt in sources:
        if (ckpt.config or {}).get("model_type") != (base.config or {}).get("model_type"):
            raise BadInput(f"{ckpt.source} is {(ckpt.config or {}).get('model_type')}, the base "
                           f"{base.source} {(base.config or {}).get('model_type')}: experts come from the base's "
                           "family")
        for name, info in base.tensors.items():
            other = ckpt.tensors.get(name)
            if other is None or other.shape != info.shape:
                found = "missing" if other is None else f"shape {other.shape}"
                raise BadInput(f"{ckpt.source}: tensor {name!r} is {found} (the base has {info.shape})")


def _router_inputs(base: Checkpoint, mlp_modules: list[str], prompt_lists: list[tuple[str, ...]],
                   device: str) -> list[torch.Tensor]:
    """For each list of prompts, (layers, hidden): the mean over its prompts of what each layer's MLP (the router's
    place) receives at the prompt's last token (the base's BOS first, as mergekit tokenizes). Every prompt runs in
    one left-padded batch, so each decoder layer is loaded once."""
    from surgery.runtime import input_hooks, load_tokenizer, streamed_model

    tokenizer = load_tokenizer(base)
    prompts = [prompt for prompts in prompt_lists for prompt in prompts]
    encoded = [tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
               for prompt in prompts]
    empty = next((prompt for prompt, ids in zip(prompts, encoded) if not ids), None)
    if empty is not None:
        raise BadInput(f"prompt {empty!r} has no tokens")
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each prompt from position 0, as when run alone
    seen: list[torch.Tensor] = []
    with streamed_model(base, device) as model, torch.no_grad():
        with input_hooks(model, {name: lambda x: seen.append(x[:, -1].float().cpu()) for name in mlp_modules}):
            model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    states = torch.stack(seen, dim=1)  # (prompts, layers, hidden)
    out, start = [], 0
    for prompts in prompt_lists:
        out.append(states[start:start + len(prompts)].mean(dim=0))
        start += len(prompts)
    return out


def _cheap_embedding(base: Checkpoint, arch: Architecture, prompts: tuple[str, ...], layers: int) -> torch.Tensor:
    """(layers, hidden): the sum of the prompts' token embeddings (with BOS), the same for every layer."""
    from surgery.runtime import load_tokenizer

    tokenizer = load_tokenizer(base)
    embedding = base.get(next(n for n in base.tensors if arch.role(n).kind == "embedding")).float()
    total = torch.zeros(embedding.shape[1])
    for prompt in prompts:
        ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
        total += embedding[ids].sum(0)
    return total.expand(layers, -1).clone()


def gate_vectors(config: MoeConfig, base: Checkpoint, experts: tuple[ExpertSource, ...],
                 mlp_modules: list[str]) -> torch.Tensor:
    """The router rows, (layers, len(experts), hidden), each normalised (random rows are not).

    Args:
        config: the job (gate mode, seed, device).
        base: the open base model.
        experts: the experts (and shared experts) to make rows for, in order.
        mlp_modules: the base's MLP module of each layer, in order (where the routers will sit).

    Returns:
        The rows.

    Example: ``gate_vectors(config, base, config.experts)[0]``   # layer 0's router weight
    """
    arch = Architecture.from_config(base.config)
    layers, hidden = arch.num_layers, arch.hidden_size
    if config.gate_mode == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randn((layers, len(experts), hidden), generator=generator)

    lists = [prompts for expert in experts for prompts in (expert.positive_prompts, expert.negative_prompts)]
    if config.gate_mode == "hidden":
        found = _router_inputs(base, mlp_modules, [prompts for prompts in lists if prompts], config.device)
        vectors = iter(found)
        means = [next(vectors) if prompts else None for prompts in lists]
    else:
        means = [_cheap_embedding(base, arch, prompts, layers) if prompts else None for prompts in lists]
    rows = []
    for positive, negative in zip(means[0::2], means[1::2]):
        row = positive if negative is None else positive - negative
        rows.append(row / row.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def _degenerate_layers(gates: torch.Tensor) -> tuple[int, ...]:
    """Layers whose gate matrix is badly conditioned (the prompts of two experts look alike there)."""
    if gates.shape[1] < 2:
        return ()
    return tuple(index for index, rows in enumerate(gates) if torch.linalg.cond(rows.double()) > DEGENERATE_CONDITION)



def moe(config: MoeConfig, *, progress: Callable[[int], None] | None = None) -> MoeResult:
    """Build the MoE checkpoint ``config`` describes at ``config.output`` (atomically, checked by transformers'
    loader before it appears).

    Args:
        config: the validated job.
        progress: called with the bytes written, as they are.

    Returns:
        A :class:`MoeResult`.

    Example::

        moe(MoeConfig.from_yaml("moe.yaml", "out")).summary()
    """
    check_output_available(config.output, config.force)
    with ExitStack() as stack:
        opened: dict[str, Checkpoint] = {}

        def open_once(source: str) -> Checkpoint:
            if source not in opened:
                opened[source] = stack.enter_context(open_checkpoint(source))
            return opened[source]

        base = open_once(config.base_model)
        family = _family(config, base)
        everyone = (*config.experts, *config.shared_experts)
        sources = [open_once(expert.source_model) for expert in everyone]
        _check_sources(base, sources)
        arch = Architecture.from_config(base.config)
        mlp = _mlp_names(base, arch)
        layers = arch.num_layers
        if len(mlp) != 3 * layers:
            raise BadInput(f"{base.source}: expected gate, up and down projections in each of its {layers} layers")
        modules = [mlp[(layer, "gate")].rsplit(".", 2)[0] for layer in range(layers)]
        gates = gate_vectors(config, base, everyone, modules)
        degenerate = _degenerate_layers(gates[:, :len(config.experts)])
        if degenerate:
            log.warning("the gates of layers %s are nearly degenerate (condition number above %g): the prompts of "
                        "some experts look alike there, so those experts will be routed to less",
                        ", ".join(map(str, degenerate)), DEGENERATE_CONDITION)
        dtype = parse_dtype(config.dtype) if config.dtype else None
        dense = set(mlp.values())
        specs, origin = [], {}  # output name → (checkpoint, tensor name, expert) or a router row block

        def cast(info: TensorInfo) -> torch.dtype:
            return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype

        router_dtype = cast(base.tensors[mlp[(0, "gate")]])

        def add_mlp(layer: int, names: dict[str, str], source: Checkpoint, expert: ExpertSource) -> None:
            for projection, name in names.items():  # gate / up / down → the output's name
                info = base.tensors[mlp[(layer, projection)]]
                specs.append(TensorInfo(name, cast(info), info.shape))
                origin[name] = (source, mlp[(layer, projection)], expert, projection)

        def add_router(name: str, layer: int, rows: slice) -> None:
            specs.append(TensorInfo(name, router_dtype, (rows.stop - rows.start, arch.hidden_size)))
            origin[name] = ("gate", layer, rows)

        for name, info in base.tensors.items():
            if name not in dense:
                specs.append(TensorInfo(name, cast(info), info.shape))
                origin[name] = (base, name, None, None)
        routed = len(config.experts)
        for layer in range(layers):
            prefix = mlp[(layer, "gate")].split(".mlp.")[0]
            for index, expert in enumerate(config.experts):
                add_mlp(layer, {projection: family.expert.format(prefix=prefix, e=index, p=local)
                                for projection, local in family.projections.items()}, sources[index], expert)
            add_router(family.router.format(prefix=prefix), layer, slice(0, routed))
            if family.shared:
                add_mlp(layer, {projection: family.shared.format(prefix=prefix, p=f"{projection}_proj")
                                for projection in ("gate", "up", "down")}, sources[routed], config.shared_experts[0])
                add_router(family.shared_gate.format(prefix=prefix), layer, slice(routed, routed + 1))

        def load(name: str) -> torch.Tensor:
            if origin[name][0] == "gate":
                _, layer, rows = origin[name]
                return gates[layer, rows]
            ckpt, source_name, expert, projection = origin[name]
            tensor = ckpt.get(source_name)
            if expert is None:
                return tensor
            tensor = tensor.float()
            if expert.noise_scale:
                generator = torch.Generator().manual_seed(tensor_seed(config.seed, name))
                tensor = tensor + torch.randn(tensor.shape, generator=generator) * expert.noise_scale
            if projection == "down" and expert.residual_scale is not None:
                tensor = tensor * expert.residual_scale
            return tensor

        out_config = family.config(dict(base.config), len(config.experts), config.experts_per_token,
                                   bool(config.shared_experts))
        if dtype is not None:
            out_config["dtype"] = str(dtype).removeprefix("torch.")
        record = OutputRecord("moe", [base, *dict.fromkeys(sources)])
        card = Card(f"A {len(config.experts)}-expert {family.model_type} of {model_name(config.base_model)}",
                    "merge", "moe", _card_body(config, family))

        def files() -> dict[str, bytes]:
            return base.auxiliary_files() | record.files(config.recipe(), card,
                                                         {"degenerate_layers": list(degenerate)})

        written = write_checkpoint(config.output, specs, load, config=out_config, files=files,
                                   max_shard_size=config.max_shard_size, force=config.force,
                                   progress=progress or (lambda nbytes: None),
                                   check=lambda staging: check_transformers(staging))
    return MoeResult(config, family.model_type, layers, degenerate, written)


def _card_body(config: MoeConfig, family: OutputFamily) -> str:
    def prompts(expert: ExpertSource) -> str:
        return f" (prompts: {', '.join(map(repr, expert.positive_prompts[:3]))})" if expert.positive_prompts else ""

    experts = "\n".join(f"- expert {i}: `{e.source_model}`{prompts(e)}" for i, e in enumerate(config.experts))
    shared = "".join(f"\n- shared expert: `{e.source_model}`" for e in config.shared_experts)
    return (f"A mixture of experts built by [surgery](https://pypi.org/project/surgery/) (`surgery moe`, "
            f"mergekit-moe's configuration): attention, norms and embeddings of `{config.base_model}`, each layer's "
            f"MLP from each expert, {config.experts_per_token} experts per token, routers from gate mode "
            f"**{config.gate_mode}**.\n\n{experts}{shared}")
