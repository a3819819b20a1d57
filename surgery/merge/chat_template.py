"""A merge recipe's ``chat_template`` (mergekit's key): the chat template the output's tokenizer carries.

``auto`` takes the template most of the input models share (the first model's among equals), ``chatml`` the ChatML
template, and anything containing ``{`` is a Jinja template given verbatim. The output stores it the way
transformers 5 saves tokenizers — ``chat_template.jinja`` — and no other copy of a template is left behind
(``tokenizer_config.json``'s ``chat_template`` key, ``chat_template.json``), so no loader can pick a stale one::

    files = with_chat_template(files, "auto", [inputs_files_a, inputs_files_b], "recipe.yaml")
"""

from __future__ import annotations

import json
from collections import Counter

from surgery.errors import BadInput

TEMPLATE_FILE = "chat_template.jinja"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NAMED = {"chatml": CHATML}


def template_of(files: dict[str, bytes]) -> str | None:
    """The chat template a model's tokenizer files carry (``chat_template.jinja``, else the ``default`` or only
    template of ``tokenizer_config.json`` / ``chat_template.json``), or None.

    Args:
        files: a model's auxiliary files, name → bytes.

    Returns:
        The template text, or None when the files carry none.

    Example: ``template_of({"chat_template.jinja": b"{{ messages }}"})``   # "{{ messages }}"
    """
    if TEMPLATE_FILE in files:
        return files[TEMPLATE_FILE].decode("utf-8", errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            value = json.loads(files[name]).get("chat_template") if name in files else None
        except (ValueError, AttributeError, RecursionError):
            value = None
        if isinstance(value, list):  # [{"name": ..., "template": ...}]
            named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
            value = named.get("default") or (next(iter(named.values())) if len(named) == 1 else None)
        if isinstance(value, str) and value.strip():
            return value
    return None


def resolve_template(setting: str, inputs: list[dict[str, bytes]], origin: str) -> str | None:
    """The template text ``setting`` stands for (None: ``auto`` and no input has one).

    Args:
        setting: ``"auto"``, a named template (``"chatml"``) or a Jinja template (anything with ``{``).
        inputs: the input models' auxiliary files (for ``auto``).
        origin: where the setting comes from, for the BadInput message of an unknown one.

    Returns:
        The template text, or None.

    Example: ``resolve_template("chatml", [], "recipe.yaml") == CHATML``
    """
    if setting == "auto":
        found = [template.strip() for template in map(template_of, inputs) if template]
        return Counter(found).most_common(1)[0][0] if found else None
    if setting in NAMED:
        return NAMED[setting]
    if "{" in setting:
        return setting
    raise BadInput(f"{origin}: chat_template {setting!r}: expected auto, {', '.join(NAMED)} or a Jinja template")


def with_chat_template(files: dict[str, bytes], setting: str | None, inputs: list[dict[str, bytes]],
                       origin: str) -> dict[str, bytes]:
    """``files`` (an output's tokenizer files) carrying the template ``setting`` stands for; unchanged when
    ``setting`` is None, or ``auto`` finds no template among the inputs.

    Args:
        files: the output's tokenizer files, name → bytes.
        setting: the recipe's ``chat_template`` (None: keep the files as they are).
        inputs: the input models' auxiliary files (for ``auto``).
        origin: where the setting comes from, for messages.

    Returns:
        The files with ``chat_template.jinja`` set and no other copy of a template (a new dict when changed).

    Example: ``with_chat_template(files, "chatml", [], "--chat-template")["chat_template.jinja"]``
    """
    template = resolve_template(setting, inputs, origin) if setting else None
    if template is None:
        return files
    files = {name: data for name, data in files.items() if name != "chat_template.json"}
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"])
        except (ValueError, RecursionError):
            config = None
        if isinstance(config, dict) and "chat_template" in config:
            del config["chat_template"]
            files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    files[TEMPLATE_FILE] = template.encode()
    return files
