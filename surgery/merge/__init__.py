"""Merging checkpoints: the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA), linear, SLERP,
Model Stock and passthrough, with mergekit's names and parameter meanings; SVD-based STAR, TSV-M, LoRE and ``svd``.

>>> from surgery.merge import MergeJob, merge
>>> job = MergeJob.from_options(["short-model", "long-model"], method="ties", density=0.2, output="merged")
>>> merge(job)                                                     # doctest: +SKIP

Each method is one pure function registered with the parameters it takes (:mod:`surgery.merge.registry`); the
built-in ones are listed in :mod:`surgery.merge.builtin`; :mod:`surgery.merge.engine` streams the inputs through a
method one tensor at a time.
"""

from surgery.merge import builtin  # noqa: F401  (registers the built-in methods)
from surgery.merge.engine import MergeResult, merge, plan_merge
from surgery.merge.job import MergeJob, build_recipe
from surgery.merge.recipe import ModelEntry, Recipe, load_recipe
from surgery.merge.registry import METHODS, PARAMETERS, TensorMerge, get_method, register

__all__ = ["METHODS", "PARAMETERS", "MergeJob", "MergeResult", "ModelEntry", "Recipe", "TensorMerge", "build_recipe",
           "get_method", "load_recipe", "merge", "plan_merge", "register"]
