"""Merging checkpoints: the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA), linear, SLERP,
Model Stock and passthrough, with mergekit's names and parameter meanings; SVD-based STAR, TSV-M, LoRE and ``svd``.

>>> from surgery.merge import ModelEntry, Recipe, merge
>>> recipe = Recipe("ties", [ModelEntry("short-model"), ModelEntry("long-model")],
...                 parameters={"density": 0.2, "lambda": 1.0})
>>> merge(recipe, "merged", max_shard_size="2GB")                  # doctest: +SKIP

Each method is one pure function registered in :mod:`surgery.merge.methods` or :mod:`surgery.merge.spectral`; :mod:`surgery.merge.engine` streams the
inputs through it one tensor at a time.
"""

from surgery.merge.engine import MergeResult, merge, plan_merge
from surgery.merge.recipe import ModelEntry, Recipe, load_recipe
from surgery.merge.registry import METHODS, TensorMerge, get_method, register

__all__ = ["METHODS", "MergeResult", "ModelEntry", "Recipe", "TensorMerge", "get_method", "load_recipe", "merge",
           "plan_merge", "register"]
