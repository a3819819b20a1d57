"""Token-aligned vocabularies: merging models whose tokenizers differ (ids, sizes or tokens).

Embedding and lm_head rows are matched by token, not by id. The output vocabulary is the tokenizer source's —
``base`` (the default), one of the merged models, or ``union`` (the base's tokens, then every other model's tokens it
lacks, appended in model order; the output gets that extended tokenizer). For each output row, a model that lacks the
token gets a stand-in row, so it adds no task vector there: the base's row when the base has the token, else the mean
of the models that have it (the one model's row when only one does), else zeros — mergekit's rules. Rows past the
tokenizer's last token (padding) are matched by id and kept (mergekit, when given a tokenizer_source, cuts the
embedding to the tokenizer's length instead). A model without tokenizer files is taken to share the tokenizer
source's::

    plan = plan_vocabulary([VocabularySource("base", files, 32000), ...], tokenizer_source="union", base="base")
    base_rows, *model_rows = align_rows([base_embedding, *model_embeddings], [plan.index[s] for s in sources],
                                        plan.rows, base_position=0)
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.errors import BadInput

log = logging.getLogger(__name__)

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt"}


@dataclass
class VocabularySource:
    """One input: its name, its auxiliary files (name → bytes) and how many embedding rows it has."""

    name: str
    files: dict[str, bytes]
    rows: int

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        return {name: data for name, data in self.files.items() if name in TOKENIZER_FILES}


@dataclass
class VocabularyPlan:
    rows: int  # output embedding rows
    index: dict[str, torch.Tensor | None]  # per source: output row → its row, −1 where it lacks the token; None = same
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # the output tokenizer, when it is a new one


def _transformers_tokenizer(files: dict[str, bytes], source: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as scratch:
        for name, data in files.items():
            (Path(scratch) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(scratch)
        except Exception as err:  # noqa: BLE001 — any loader failure is reported as the input's problem
            if "tokenizer.json" in files:
                return PreTrainedTokenizerFast(tokenizer_file=str(Path(scratch) / "tokenizer.json"))
            raise BadInput(f"{source}: its tokenizer cannot be loaded ({str(err).splitlines()[0]})") from None


def _token_ids(source: VocabularySource) -> tuple[dict[str, int], dict[str, object]] | None:
    """token → id and the added tokens (content → AddedToken) of ``source``'s tokenizer; None without one."""
    files = source.tokenizer_files
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as err:  # noqa: BLE001
            raise BadInput(f"{source.name}: tokenizer.json cannot be read ({err})") from None
        added = {token.content: token for token in tokenizer.get_added_tokens_decoder().values()}
        return tokenizer.get_vocab(with_added_tokens=True), added
    if not files.keys() & {"tokenizer.model", "vocab.json", "vocab.txt"}:
        return None
    tokenizer = _transformers_tokenizer(files, source.name)
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    return tokenizer.get_vocab(), added


def _union_tokenizer(base: VocabularySource, others: list[tuple[VocabularySource, dict, dict]]) -> dict[str, bytes]:
    """The base tokenizer extended with the other models' tokens it lacks (plain tokens, then added ones)."""
    tokenizer = _transformers_tokenizer(base.tokenizer_files, base.name)
    known = set(tokenizer.get_vocab())
    plain, special = [], []
    for source, ids, added in others:
        for token, token_id in sorted(ids.items(), key=lambda item: item[1]):
            if token_id >= source.rows or token in known:
                continue
            known.add(token)
            (special if token in added else plain).append(added.get(token, token))
    tokenizer.add_tokens(plain)
    tokenizer.add_tokens(special)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return {file.name: file.read_bytes() for file in Path(scratch).iterdir()
                if file.is_file() and file.name in TOKENIZER_FILES | {"chat_template.jinja"}}


def _index(ids: dict[str, int], rows: int, out_tokens: dict[int, str], out_rows: int) -> torch.Tensor | None:
    """Output row → this model's row (−1 where it lacks the token); None when that is the identity."""
    own_rows = []
    for row in range(out_rows):
        token = out_tokens.get(row)
        own = ids.get(token, -1) if token is not None else row
        own_rows.append(own if 0 <= own < rows else -1)
    index = torch.tensor(own_rows, dtype=torch.long)
    return None if out_rows == rows and torch.equal(index, torch.arange(out_rows)) else index


def plan_vocabulary(sources: list[VocabularySource], tokenizer_source: str, base: str | None) -> VocabularyPlan:
    """How each source's embedding rows map onto the output's (``tokenizer_source``: base, union or a name)."""
    by_name = {source.name: source for source in sources}
    reference = by_name[base] if base is not None else sources[0]
    target = reference if tokenizer_source in ("base", "union") else by_name[tokenizer_source]
    same_files = all(not s.tokenizer_files or s.tokenizer_files == target.tokenizer_files for s in sources)
    vocabularies = {} if same_files else {s.name: _token_ids(s) for s in sources}
    if same_files or vocabularies[target.name] is None:
        # one tokenizer (or none known): rows match by id, cut or padded to the tokenizer source's count
        index = {s.name: None if s.rows == target.rows else _index({}, s.rows, {}, target.rows) for s in sources}
        return VocabularyPlan(target.rows, index)
    target_ids = vocabularies[target.name][0]
    new_files = {}
    if tokenizer_source == "union":
        others = [(s, *vocabularies[s.name]) for s in sources if s is not target and vocabularies[s.name]]
        new_files = _union_tokenizer(target, others)
        target_ids = _token_ids(VocabularySource("union", new_files, 0))[0]
    out_rows = max(target.rows, max(target_ids.values(), default=-1) + 1) if tokenizer_source == "union" \
        else target.rows
    out_tokens = {token_id: token for token, token_id in target_ids.items() if token_id < out_rows}
    index = {}
    for source in sources:
        ids = (vocabularies[source.name] or (target_ids, None))[0]
        index[source.name] = _index(ids, source.rows, out_tokens, out_rows)
    log.info("vocabulary: %d output rows, aligned by token across %d models", out_rows, len(sources))
    return VocabularyPlan(out_rows, index, new_files)


def align_rows(tensors: list[torch.Tensor], indices: list[torch.Tensor | None], rows: int,
               base_position: int | None) -> list[torch.Tensor]:
    """Each tensor's rows put in output order; rows a model lacks filled with the base's row where the base has
    the token, else the mean of the models that have it, else zeros (see the module docstring)."""
    if all(index is None for index in indices):
        return tensors
    device = tensors[0].device
    present = [torch.ones(rows, dtype=torch.bool, device=device) if index is None else index >= 0
               for index in indices]
    gathered = [tensor if index is None else tensor[index.clamp(min=0)] for tensor, index in zip(tensors, indices)]
    if all(bool(p.all()) for p in present):
        return gathered
    total = torch.zeros((rows, *tensors[0].shape[1:]), dtype=torch.float32, device=device)
    count = torch.zeros(rows, dtype=torch.float32, device=device)
    for rows_of, has in zip(gathered, present):
        total[has] += rows_of[has].to(torch.float32)
        count += has
    stand_in = total / count.clamp(min=1).reshape(-1, *([1] * (total.dim() - 1)))
    if base_position is not None:
        has = present[base_position]
        stand_in[has] = gathered[base_position][has].to(torch.float32)
    for rows_of, has in zip(gathered, present):
        if not has.all():  # a gathered copy (an identity index never lacks a row), so writing to it is safe
            rows_of[~has] = stand_in[~has].to(rows_of.dtype)
    return gathered

