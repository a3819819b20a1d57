"""Reading the YAML (or JSON) files users write — recipes, pipelines — with one-line errors.

YAML's aliases let a few lines stand for an exponentially large document ("billion laughs"), or for one that
contains itself; deep nesting exhausts the parser's recursion. Before anything is built, the document's node graph
is measured: more than MAX_NODES nodes once aliases are expanded, nesting deeper than MAX_DEPTH, or an alias
inside its own anchor is a BadInput naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.errors import BadInput

MAX_NODES = 100_000  # nodes of the document with every alias expanded
MAX_DEPTH = 64  # nested mappings / lists


def _measure(root, path: Path, kind: str) -> None:
    """BadInput when the composed ``root`` node is too large expanded, too deep, or contains itself."""
    import yaml

    sizes: dict[int, int] = {}  # id(node) → nodes under it, aliases expanded (each shared node counted once here)
    on_path: set[int] = set()
    # Iterative depth-first walk: (node, depth, children visited?)
    stack = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node, yaml))
            if sizes[key] > MAX_NODES:
                raise BadInput(f"{path}: the {kind} expands to more than {MAX_NODES:,} values (through aliases?)")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise BadInput(f"{path}: the {kind} contains itself (an alias inside its own anchor)")
        if depth > MAX_DEPTH:
            raise BadInput(f"{path}: the {kind} is nested more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, depth, True))
        for child in _children(node, yaml):
            if id(child) in on_path:
                raise BadInput(f"{path}: the {kind} contains itself (an alias inside its own anchor)")
            stack.append((child, depth + 1, False))


def _children(node, yaml) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_yaml(path: str | Path, kind: str) -> Any:
    """The parsed content of ``path``; BadInput naming the file and ``kind`` ("recipe", "pipeline") otherwise.

    Args:
        path: a YAML (or JSON) file; ``~`` is expanded.
        kind: what the file holds, for messages (``"recipe"``, ``"pipeline"``).

    Returns:
        The parsed YAML (a dict, list, scalar, or None for an empty file); BadInput when the file is missing,
        unreadable, invalid or nested too deeply.

    Example::

        data = read_yaml("pipeline.yaml", "pipeline")
    """
    documents = read_yaml_documents(path, kind)
    if len(documents) > 1:
        raise BadInput(f"{Path(path).expanduser()}: the {kind} must be one YAML document, found {len(documents)}")
    return documents[0] if documents else None


def read_yaml_documents(path: str | Path, kind: str) -> list:
    """Every document of a multi-document YAML file (``---`` between them), each measured as :func:`read_yaml`
    measures one.

    Args:
        path: a YAML file; ``~`` is expanded.
        kind: what the file holds, for messages.

    Returns:
        The parsed documents, in order ([] for an empty file); BadInput as :func:`read_yaml`.

    Example: ``[doc.get("name") for doc in read_yaml_documents("multi.yaml", "multi-merge config")]``
    """
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
        for root in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if root is not None:
                _measure(root, path, kind)
        return [document for document in yaml.safe_load_all(text)]
    except FileNotFoundError:
        raise BadInput(f"{path}: {kind} file not found") from None
    except RecursionError:
        raise BadInput(f"{path}: the {kind} is nested too deeply") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise BadInput(f"{path}: not a valid YAML/JSON {kind} ({reason})") from None
