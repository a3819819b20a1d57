"""Hub model cards (``README.md``): the one written beside every output, and the one ``surgery push`` sends.

A card is YAML front matter (base_model, base_model_relation, tags, library_name, the license the inputs agree on)
and a body saying what was done. Commands describe theirs with a :class:`Card`; a push rebuilds one from the
directory's ``surgery.json`` when it has no README.md, or completes the front matter of the one it has::

    card = Card(title="A ties merge", relation="merge", method="ties", body="...")
    readme = model_card_bytes(card, [ckpt_a, ckpt_b])          # base_model: the inputs that are Hub repo ids
    content, status = model_card_for(Path("merged"), "model", "me/tiny-merge")   # what a push sends
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from surgery.errors import BadInput
from surgery.io.sources import REPO_ID, hub_repo, looks_like_repo_id
from surgery.provenance import read_manifest

RELATIONS = {"merge": "merge", "quantize": "quantized", "adapter": "adapter", "extend": "finetune"}  # the Hub's names
CARD_FIELDS = ("base_model", "base_model_relation", "library_name", "license", "tags")
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(?P<yaml>.*?)(?P<close>^---[ \t]*\r?$)", re.S | re.M)


@dataclass(frozen=True)
class Card:
    """What a command says about its output in the model card.

    ``relation`` is the Hub's base_model_relation (merge, quantized, adapter; None: none stated), ``method`` the tag
    naming what was done, ``library`` the library_name when it is not transformers (peft for adapters).
    """

    title: str
    relation: str | None
    method: str
    body: str
    library: str | None = None


def model_name(source: str) -> str:
    """How a card names an input: a Hub repo id as given, a local path by its file or directory name (never the
    absolute path of the machine that made it), ``MODEL+ADAPTER`` as both names.

    Args:
        source: the input as the user gave it.

    Returns:
        The name a card shows.

    Example: ``model_name("/home/me/build/final/extended")   # "extended"``
    """
    from surgery.io.lora_input import split_model_and_adapter

    pair = split_model_and_adapter(source)
    if pair:
        return " + ".join(map(model_name, pair))
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve().name
    return source if looks_like_repo_id(source) else path.name


class CardInput(Protocol):
    """What a card reads of an input: ``source`` (base_model when a Hub repo id) and ``path``, a file or directory
    whose README.md gives the input's license (an opened :class:`surgery.io.Checkpoint` is one)."""

    source: str
    path: Path


def _license(item: CardInput) -> str | None:
    directory = item.path if item.path.is_dir() else item.path.parent
    card = directory / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - an unreadable input card just means "license unknown"
        return None


def model_card_bytes(card: Card, inputs: Sequence[CardInput]) -> bytes:
    """The README.md of an output made from ``inputs``.

    Args:
        card: what the command says (title, relation, method tag, body, library).
        inputs: the inputs, as opened checkpoints or anything with ``source`` and ``path``.

    Returns:
        The card's bytes: front matter (base_model list, base_model_relation, tags, library_name, the license when
        the inputs agree on one), then ``# title`` and the body.

    Example::

        model_card_bytes(Card("A ties merge", "merge", "ties", "Merged with ..."), inputs.checkpoints)
    """
    from huggingface_hub import ModelCard, ModelCardData

    licenses = {_license(item) for item in inputs}
    data = ModelCardData(
        base_model=[item.source for item in inputs if hub_repo(item.source) is not None] or None,
        base_model_relation=card.relation,
        tags=["surgery", *([card.relation] if card.relation else []), card.method],
        library_name="transformers",
        license=licenses.pop() if len(licenses) == 1 and None not in licenses else None,
    )
    content = f"---\n{data.to_yaml()}\n---\n\n# {card.title}\n\n{card.body}\n"
    readme = ModelCard(content).content.encode()
    if card.library is not None:
        parsed = ModelCard(readme.decode())
        parsed.data.library_name = card.library
        readme = str(parsed).encode()
    return readme


# ---- the card a push sends


def model_card_for(directory: Path, kind: str, repo_id: str) -> tuple[bytes | None, str]:
    """The README.md a push sends in place of the directory's, and the card's status.

    Args:
        directory: the checkpoint directory being pushed.
        kind: "model" or "adapter" (:func:`surgery.hub.checkpoint_kind`).
        repo_id: the repository pushed to (its name is the generated card's title).

    Returns:
        ``(card, status)``: card None means the directory's own file (or no card); status is "generated" from
        surgery.json, "completed" (the existing card with the front-matter fields it lacked), "kept", or "none"
        (neither a card nor a manifest to make one from).

    Example::

        card, status = model_card_for(Path("merged"), "model", "me/tiny-merge")   # (b"---\\n...", "generated")
    """
    manifest = read_manifest(directory)
    readme = directory / "README.md"
    if not manifest:
        return None, "kept" if readme.is_file() else "none"
    card = card_from_manifest(manifest, kind, repo_id, directory)
    if not readme.is_file():
        return card, "generated"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{readme}: cannot read the model card ({err})") from None
    ours = front_matter(card.decode(), "generated card")
    completed = complete_front_matter(text, {key: ours.get(key) for key in CARD_FIELDS}, str(readme))
    return (None, "kept") if completed == text else (completed.encode(), "completed")


@dataclass
class _RecordedInput:
    """An input named in surgery.json, as :func:`model_card_bytes` reads it (:class:`CardInput`)."""

    source: str
    path: Path


def card_from_manifest(manifest: dict, kind: str, repo_id: str, directory: Path) -> bytes:
    """A Hub model card for what ``manifest`` records.

    Args:
        manifest: the directory's surgery.json (:func:`surgery.provenance.read_manifest`).
        kind: "model" or "adapter".
        repo_id: the repository pushed to (the title is its name).
        directory: the directory pushed (an adapter's adapter_config.json names its base model).

    Returns:
        The card: base_model (inputs that are Hub repo ids), base_model_relation, tags (surgery, the relation, the
        method or command), library_name, the license the inputs' cards agree on, and a body with the recipe and
        the figures measured.

    Example::

        card_from_manifest(read_manifest(Path("merged")), "model", "me/tiny-merge", Path("merged"))
    """
    command = str(manifest.get("command") or "surgery")
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    method = recipe.get("method") or (f"rope-{recipe['rope']}" if recipe.get("rope") else command)
    records = [record for record in manifest.get("inputs") or [] if isinstance(record, dict)]
    with tempfile.TemporaryDirectory() as nowhere:  # the path of an input whose card is not at hand
        inputs = [_recorded_input(record, Path(nowhere)) for record in records]
        if kind == "adapter":
            inputs += _adapter_base(directory, Path(nowhere), {i.source for i in inputs})
        card = Card(title=repo_id.split("/")[-1], relation="adapter" if kind == "adapter" else RELATIONS.get(command),
                    method=str(method), body=_card_body(manifest, command, recipe, records),
                    library="peft" if kind == "adapter" else None)
        return model_card_bytes(card, inputs)


def _recorded_input(record: dict, nowhere: Path) -> _RecordedInput:
    source = str(record.get("source") or "")
    local = Path(source).expanduser()
    if local.exists():
        return _RecordedInput(source, local)
    match = REPO_ID.match(source)
    if match is None or not record.get("revision"):
        # A local path that is gone (or relative to another directory): "./" keeps it out of base_model.
        return _RecordedInput(source if local.is_absolute() else f"./{source}", nowhere)
    from huggingface_hub import try_to_load_from_cache

    card = try_to_load_from_cache(match["repo"], "README.md", revision=record["revision"])
    return _RecordedInput(match["repo"], Path(card).parent if isinstance(card, str) else nowhere)


def _adapter_base(directory: Path, nowhere: Path, known: set[str]) -> list[_RecordedInput]:
    """The base model adapter_config.json names, when it is a Hub repo id the manifest does not list already."""
    try:
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(base, str) or not looks_like_repo_id(base) or Path(base).exists() or base in known:
        return []
    return [_RecordedInput(base, nowhere)]


def _card_body(manifest: dict, command: str, recipe: dict, records: list[dict]) -> str:
    version = manifest.get("surgery_version")
    lines = [f"Made with [surgery](https://pypi.org/project/surgery/){f' {version}' if version else ''}: "
             f"`surgery {command}`. `surgery.json` records the inputs (with SHA-256 content hashes) and the full "
             "recipe.", ""]
    for record in records:
        revision = record.get("revision")
        lines.append(f"- input: `{record.get('source')}`" + (f" at revision `{revision}`" if revision else ""))
    reproduce = " (reproduce with `surgery merge --recipe surgery.json -o OUT`)" if command == "merge" else ""
    lines += ["", f"Recipe{reproduce}:", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```"]
    figures = list(_numbers({key: manifest[key] for key in ("output", "measurements") if key in manifest}))
    if figures:
        lines += ["", "## Measurements", "", "| field | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in figures]
    return "\n".join(lines)


def _numbers(value, name: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, text) for every number in ``value``; a long list of numbers is shown by its ends."""
    def text(number) -> str:
        return f"{number:.6g}" if isinstance(number, float) else str(number)

    def is_number(item) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if is_number(value):
        yield name, text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list) and len(value) > 8 and all(is_number(item) for item in value):
        yield name, f"{len(value)} values: {text(value[0])} … {text(value[-1])}"
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{name}[{index}]")


# ---- front matter


def front_matter(text: str, label: str) -> dict:
    """The YAML front matter of a model card.

    Args:
        text: the card.
        label: how a BadInput names the card (invalid YAML, not a mapping).

    Returns:
        The front matter as a dict ({} when the card has none).

    Example::

        front_matter("---\\nlicense: mit\\n---\\n# M\\n", "card")   # {"license": "mit"}
    """
    import yaml

    match = FRONT_MATTER.match(text)
    try:
        data = yaml.safe_load(match["yaml"]) if match else {}
    except yaml.YAMLError as err:
        raise BadInput(f"{label}: the front matter is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data or {}, dict):
        raise BadInput(f"{label}: the front matter is not a YAML mapping")
    return data or {}


def complete_front_matter(text: str, fields: dict, label: str) -> str:
    """``text`` with the ``fields`` its front matter lacks (absent or null) appended to it.

    Args:
        text: the card as its author wrote it (kept byte for byte).
        fields: front-matter fields to add where missing (None values are skipped).
        label: how a BadInput names the card.

    Returns:
        The completed card (``text`` itself when nothing was missing).

    Example::

        complete_front_matter("---\\nlicense: mit\\n---\\n# M\\n", {"license": "apache-2.0", "tags": ["x"]}, "card")
        # '---\\nlicense: mit\\ntags:\\n- x\\n---\\n# M\\n'
    """
    import yaml

    present = front_matter(text, label)
    missing = {key: value for key, value in fields.items() if value is not None and present.get(key) is None}
    if not missing:
        return text
    block = yaml.safe_dump(missing, sort_keys=False, allow_unicode=True)
    if "\r\n" in text:
        block = block.replace("\n", "\r\n")
    match = FRONT_MATTER.match(text)
    if match is None:
        return f"---\n{block}---\n\n{text}"
    return text[:match.start("close")] + block + text[match.start("close"):]
