"""Reading the YAML (or JSON) files users write — recipes, pipelines — with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.errors import BadInput


def read_yaml(path: str | Path, kind: str) -> Any:
    """The parsed content of ``path``; BadInput naming the file and ``kind`` ("recipe", "pipeline") otherwise::

        data = read_yaml("pipeline.yaml", "pipeline")
    """
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise BadInput(f"{path}: not a valid YAML/JSON {kind} ({reason})") from None
