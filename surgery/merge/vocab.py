"""Token-aligned vocabularies: merging models whose tokenizers differ (ids, sizes or tokens).

Embedding and lm_head rows are matched by token, not by id. The output vocabulary is the tokenizer source's —
``base`` (the default), one of the merged models, or ``union`` (the base's tokens at the base's ids, then each other
model's tokens the base lacks, model by model in that model's id order, then their added tokens; the output gets
that extended tokenizer). For each output row, a model that lacks the token gets a stand-in row, so it adds no task
vector there: the base's row when the base has the token, else the mean of the models that have it (the one model's
row when only one does), else zeros — mergekit's rules. A model without tokenizer files is taken to share the
tokenizer source's.

How many rows (``pad_to_multiple_of``):

- None (the default): the tokenizer source's embedding size, grown when the union holds more tokens. Rows that hold
  no token (the models' padding, e.g. Qwen2.5's 152064 rows for 151665 tokens) are matched by id and kept, so the
  output keeps the inputs' shape — often a multiple chosen for the kernels — and new union tokens first fill padding
  rows. mergekit, given any tokenizer setting, cuts the embedding to the tokenizer's length instead (its issue
  #425): two 256-row models whose union holds 203 tokens give 256 rows here and 203 there, the same row for every
  token. The plan's ``note`` (logged as a warning) says so.
- N: mergekit's ``tokenizer: {pad_to_multiple_of: N}``: the output tokenizer's token count rounded up to a multiple
  of N, each model's rows past the last token set to the mean of its (aligned) token rows before merging, as
  mergekit does; N = 1 sizes the embedding exactly as mergekit does without padding.

The union holds mergekit's tokens, the base's at the same ids, and its added tokens after the plain ones as there;
the new plain tokens' order differs: mergekit takes the models in the order of a Python set and each one's tokens in
``tokenizer.get_vocab()``'s order, hash orders that change from run to run; here they go model by model, in the
recipe's order, each in its own id order, so the same inputs always give the same tokenizer::

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

PADDING = -2  # in a VocabularyPlan index: a row past the last token, the mean of the model's token rows

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
    # per source: output row → its row, −1 where it lacks the token, PADDING past the last token; None = the same
    index: dict[str, torch.Tensor | None]
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # the output tokenizer, when it is a new one
    tokens: int | None = None  # output rows that hold a token of the output tokenizer; None when it was not read
    note: str = ""  # one line for people: the row count and why


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


def _index(ids: dict[str, int], rows: int, out_tokens: dict[int, str], out_rows: int,
           padding_from: int | None = None) -> torch.Tensor | None:
    """Output row → this model's row (−1 where it lacks the token, PADDING from ``padding_from`` on); None when that
    is the identity."""
    own_rows = []
    for row in range(out_rows):
        if padding_from is not None and row >= padding_from:
            own_rows.append(PADDING)
            continue
        token = out_tokens.get(row)
        own = ids.get(token, -1) if token is not None else row
        own_rows.append(own if 0 <= own < rows else -1)
    index = torch.tensor(own_rows, dtype=torch.long)
    return None if out_rows == rows and torch.equal(index, torch.arange(out_rows)) else index


def _round_up(count: int, multiple: int | None) -> int:
    return count if not multiple else -(-count // multiple) * multiple


MAX_MULTIPLE = 1 << 20  # beyond any tokenizer: rows are planned one by one


def check_pad_to_multiple_of(value, where: str = "pad_to_multiple_of") -> int | None:
    """``value`` when it is None or a whole number from 1 to 2^20; BadInput naming ``where`` otherwise.

    Args:
        value: the ``pad_to_multiple_of`` given (None: not given).
        where: how messages name it (``"--pad-to-multiple-of"``, a recipe key).

    Returns:
        ``value`` unchanged.

    Example: ``check_pad_to_multiple_of(64, "--pad-to-multiple-of")``   # 64 (0 or True: BadInput)
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= MAX_MULTIPLE):
        raise BadInput(f"{where} {value!r}: expected a whole number from 1 to {MAX_MULTIPLE}")
    return value


def plan_vocabulary(sources: list[VocabularySource], tokenizer_source: str, base: str | None,
                    pad_to_multiple_of: int | None = None) -> VocabularyPlan:
    """How each source's embedding rows map onto the output's (``tokenizer_source``: base, union or a name).

    ``pad_to_multiple_of`` None keeps the tokenizer source's row count (grown when the union needs more rows);
    N sizes the output from its tokenizer, as mergekit does: its token count rounded up to a multiple of N, rows
    past the last token holding the mean of the token rows (1: exactly one row per token). The plan's ``note``
    says how many rows and why; it is logged, as a warning where mergekit would give another row count.

    Args:
        sources: every input's name, auxiliary files and embedding row count.
        tokenizer_source: ``"base"``, ``"union"`` or the name of one of ``sources``.
        base: the base's name (None: the first source is the reference).
        pad_to_multiple_of: None, or N to size the output from its tokenizer's token count (see above).

    Returns:
        The :class:`VocabularyPlan`: output rows, each source's row index, new tokenizer files, token count, note.

    Example: ``plan_vocabulary([VocabularySource("base", {}, 8), VocabularySource("ft", {}, 8)], "base", "base")``
    (8 rows, both indices None: matched by id)
    """
    check_pad_to_multiple_of(pad_to_multiple_of)
    by_name = {source.name: source for source in sources}
    reference = by_name[base] if base is not None else sources[0]
    target = reference if tokenizer_source in ("base", "union") else by_name[tokenizer_source]
    same_files = all(not s.tokenizer_files or s.tokenizer_files == target.tokenizer_files for s in sources)
    sized = pad_to_multiple_of is not None  # mergekit's sizing: from the output tokenizer's token count
    vocabularies = {} if same_files else {s.name: _token_ids(s) for s in sources}
    if same_files and (sized or tokenizer_source == "union"):  # the token count is needed (union: for the note)
        vocabularies = {target.name: _token_ids(target)}
    if vocabularies.get(target.name) is None:
        # no tokenizer vocabulary known: rows match by id, cut or padded to the tokenizer source's count
        out_rows = _round_up(target.rows, pad_to_multiple_of)
        padding = target.rows if out_rows > target.rows else None
        index = {s.name: None if s.rows == out_rows and padding is None else
                 _index({}, s.rows, {}, out_rows, padding) for s in sources}
        why = "the models share one tokenizer" if same_files and not sized else \
            f"{target.name} has no tokenizer vocabulary to size it from"
        note = (f"{out_rows} embedding rows: {target.name}'s {target.rows}"
                + (f", padded to a multiple of {pad_to_multiple_of} with the mean of its rows" if padding else "")
                + f", matched by id ({why})")
        return _planned(VocabularyPlan(out_rows, index, note=note), warn=False)
    target_ids = vocabularies[target.name][0]
    union = tokenizer_source == "union"
    new_files = {}
    if union and not same_files:
        others = [(s, *vocabularies[s.name]) for s in sources if s is not target and vocabularies[s.name]]
        new_files = _union_tokenizer(target, others)
        target_ids = _token_ids(VocabularySource("union", new_files, 0))[0]
    elif not union:  # as mergekit, the tokenizer source's tokens past its embedding are not part of the output
        target_ids = {token: token_id for token, token_id in target_ids.items() if token_id < target.rows}
    kind = "the union" if union else f"{target.name}'s"
    last = max(target_ids.values(), default=-1) + 1  # one past the last token's id
    if sized:
        out_rows = _round_up(last, pad_to_multiple_of)
        padding = last if out_rows > last else None
    else:  # one tokenizer: its rows as they are; else grown when the union needs more
        out_rows, padding = target.rows if same_files else max(target.rows, last), None
    out_tokens = {token_id: token for token, token_id in target_ids.items() if token_id < out_rows}
    tokens = len(out_tokens)
    index = {}
    for source in sources:
        ids = (vocabularies.get(source.name) or (target_ids, None))[0]
        index[source.name] = _index(ids, source.rows, out_tokens, out_rows, padding)
    if sized:
        note = (f"{out_rows} embedding rows, one per token of {kind} vocabulary" if padding is None else
                f"{out_rows} embedding rows: {kind} vocabulary's {tokens} tokens, padded to a multiple of "
                f"{pad_to_multiple_of} with the mean of the token rows") + " (sized from the tokenizer, as mergekit)"
    elif out_rows > tokens:
        note = (f"{out_rows} embedding rows for {kind} vocabulary's {tokens} tokens: the {out_rows - tokens} rows "
                f"holding no token are kept from the input models, matched by id, so the embedding keeps "
                f"{target.name}'s {target.rows} rows; mergekit cuts it to {tokens} rows (pad_to_multiple_of sizes "
                "it from the tokenizer, as mergekit does)")
    else:
        note = f"{out_rows} embedding rows, one per token of {kind} vocabulary" + (
            f" (more than {target.name}'s {target.rows})" if out_rows > target.rows else "")
    plan = VocabularyPlan(out_rows, index, new_files, tokens, note)
    # a warning where mergekit would size the embedding differently, or where it is resized from the source's
    return _planned(plan, warn=(not sized and out_rows > tokens) or out_rows != target.rows)


def _planned(plan: VocabularyPlan, warn: bool) -> VocabularyPlan:
    """``plan``, its row count and why logged: as a warning where mergekit would size the embedding differently."""
    (log.warning if warn else log.info)("vocabulary: %s", plan.note)
    return plan


def align_rows(tensors: list[torch.Tensor], indices: list[torch.Tensor | None], rows: int,
               base_position: int | None) -> list[torch.Tensor]:
    """Each tensor's rows put in output order; rows a model lacks filled with the base's row where the base has
    the token, else the mean of the models that have it, else zeros; PADDING rows with the mean of that model's
    other (token) rows, once those are filled (see the module docstring).

    Args:
        tensors: each source's embedding (or lm_head) rows.
        indices: each one's index from the :class:`VocabularyPlan` (None: already in output order).
        rows: the output row count.
        base_position: the base's position in ``tensors`` (None: no base).

    Returns:
        The tensors with ``rows`` rows each, in output order (``tensors`` itself when every index is None).

    Example: ``align_rows([torch.ones(2, 4), torch.zeros(3, 4)], [torch.tensor([0, 1, -1]), None], 3, 0)``
    """
    if all(index is None for index in indices):
        return tensors
    device = tensors[0].device
    present = [torch.ones(rows, dtype=torch.bool, device=device) if index is None else index >= 0
               for index in indices]
    gathered = [tensor if index is None else tensor[index.clamp(min=0)] for tensor, index in zip(tensors, indices)]
    if all(bool(p.all()) for p in present):
        return gathered
    padding = torch.zeros(rows, dtype=torch.bool, device=device)
    for index in indices:
        if index is not None:
            padding |= index == PADDING
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
            if padding.any():
                rows_of[padding] = rows_of[~padding].to(torch.float32).mean(dim=0).to(rows_of.dtype)
    return gathered
