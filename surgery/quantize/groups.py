"""Group sizes per module when the requested one does not divide every quantized module's input dimension.

SmolLM2-135M has hidden size 576 and intermediate size 1536: ``--group-size 128`` divides the down projection's
input (1536) but not the others' (576). What each format can express decides the fallback::

    sizes = per_module_group_sizes({"model.layers.0.mlp.up_proj": 576, "model.layers.0.mlp.down_proj": 1536},
                                   128)                   # {... up_proj: 64, ... down_proj: 128}
    fallback_targets(sizes, 128)                          # {64: ["re:^model\\.layers\\.\\d+\\.mlp\\.up_proj$"]}

compressed-tensors: config groups target modules by name or ``re:`` regex ahead of the class name ``Linear``, so a
module the request does not divide goes to a second config group with the largest of 64 and 32 (the sizes vLLM's
Marlin kernel takes besides 128 and −1) that divides it and is below the request. GPTQ (one group size in its
config): the largest power of two not above the request that divides every module. GGUF blocks are fixed (32).
Nothing fits → BadInput.
"""

from __future__ import annotations

import re

from surgery.errors import BadInput

FALLBACK_GROUP_SIZES = (64, 32)


def _no_fit(module: str, columns: int, requested: int, tried: str) -> BadInput:
    return BadInput(f"{module}: --group-size {requested} does not divide its input dimension {columns}, nor does "
                    f"{tried} (choose a divisor, or --ignore this module)")


def one_group_size(inputs: dict[str, int], requested: int) -> dict[str, int]:
    """Module name → group size, one for all (GPTQ): the largest power of two not above ``requested`` that divides
    every module's input dimension (``requested`` itself when it does)::

        one_group_size({"a": 96, "b": 128}, 64)   # {"a": 32, "b": 32}

    Args:
        inputs: module name → input dimension.
        requested: the requested group size.

    Returns:
        module name → group size.
    """
    size = requested
    if any(columns % size for columns in inputs.values()):
        size = 1 << (requested.bit_length() - 1)
        while size >= 8 and any(columns % size for columns in inputs.values()):
            size //= 2
        if size < 8:
            module, columns = next((m, c) for m, c in inputs.items() if c % 8)
            raise _no_fit(module, columns, requested, "any power of two from 8 up")
    return {module: size for module in inputs}


def per_module_group_sizes(inputs: dict[str, int], requested: int,
                           together: frozenset[str] = frozenset()) -> dict[str, int]:
    """Module name → group size, per module (compressed-tensors): ``requested`` where it divides the input
    dimension, else the largest of :data:`FALLBACK_GROUP_SIZES` below it that does::

        per_module_group_sizes({"a": 96, "b": 128}, 64)   # {"a": 32, "b": 64}

    Args:
        inputs: module name → input dimension.
        requested: the requested group size.
        together: modules that must share one group size (MoE experts, which transformers dequantizes with one
            scheme): the largest that fits all of them.

    Returns:
        module name → group size.
    """
    sizes = {}
    for module, columns in inputs.items():
        candidates = [requested] + [size for size in FALLBACK_GROUP_SIZES if size < requested]
        size = next((size for size in candidates if columns % size == 0), None)
        if size is None:
            raise _no_fit(module, columns, requested, " or ".join(map(str, candidates[1:])) or "a smaller size")
        sizes[module] = size
    shared = [sizes[module] for module in together if module in sizes]
    for module in together & sizes.keys():
        sizes[module] = min(shared)  # each candidate divides the ones before it: the smallest fits every module
    return sizes


def _pattern(module: str) -> str:
    """The module name with its layer index generalised: model.layers.3.mlp.up_proj → model.layers.N.mlp.up_proj."""
    return re.sub(r"\.\d+\.", ".N.", module)


def fallback_targets(sizes: dict[str, int], requested: int, always: frozenset[str] = frozenset()) \
        -> dict[int, list[str]]:
    """Fallback group size → compressed-tensors targets: one ``re:`` regex per kind of module (layer and expert
    indices generalised) when every module of that kind shares the fallback, else the module names themselves.

    Args:
        sizes: module → the group size it is quantized with.
        requested: the requested group size (modules with it need no target of their own, except ``always``).
        always: modules targeted by name or regex whatever their size: MoE experts, whose config group
            transformers finds by an ``re:`` target naming the experts.

    Returns:
        Each fallback size → its sorted targets: the experts' size first, then the largest first.

    Example::

        fallback_targets({"model.layers.0.mlp.down_proj": 64, "model.layers.1.mlp.down_proj": 64}, 128)
        # {64: ["re:^model\\.layers\\.\\d+\\.mlp\\.down_proj$"]}
    """
    by_pattern: dict[str, set[int]] = {}
    for module, size in sizes.items():
        by_pattern.setdefault(_pattern(module), set()).add(size)
    targets: dict[int, list[str]] = {}
    for module, size in sorted(sizes.items()):
        if size == requested and module not in always:
            continue
        pattern = _pattern(module)
        if by_pattern[pattern] == {size}:
            regex = "re:^" + re.escape(pattern).replace(r"\.N\.", r"\.\d+\.") + "$"
            if regex not in targets.setdefault(size, []):
                targets[size].append(regex)
        else:
            targets.setdefault(size, []).append(module)
    # transformers dequantizes every expert with the first config group whose regex names experts: theirs goes first
    experts = next((sizes[module] for module in always if module in sizes), None)  # they share one size
    order = sorted(targets, key=lambda size: (size != experts, -size))
    return {size: sorted(targets[size]) for size in order}


def _target_matches(module: str, target: str) -> bool:
    """compressed-tensors' name matching: an exact name, or ``re:REGEX`` matched from the start."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target


def group_size_of(module: str, config_groups: dict) -> int:
    """The group size compressed-tensors applies to ``module``: exact-name targets first, then regex, then
    ``Linear``.

    Args:
        module: the module's name.
        config_groups: the ``config_groups`` of a compressed-tensors ``quantization_config``.

    Returns:
        The group size; KeyError when no target matches.

    Example: ``group_size_of("lm_head", {"g": {"targets": ["Linear"], "weights": {"group_size": 128}}})   # 128``
    """
    targets = [(target, group["weights"]["group_size"]) for group in config_groups.values()
               for target in group["targets"]]
    for kind in ("exact", "regex", "class"):
        for target, size in targets:
            is_regex = target.startswith("re:")
            if kind == "exact" and not is_regex and target != "Linear" and target == module:
                return size
            if kind == "regex" and is_regex and _target_matches(module, target):
                return size
            if kind == "class" and target == "Linear":
                return size
    raise KeyError(module)
