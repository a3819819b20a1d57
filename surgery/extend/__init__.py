"""Context extension: RoPE scalings and Giraffe's bases written as configs stock loaders honour, then verified
against what transformers derives from the written config::

    from surgery.extend import extend, verify_rope
    extend("HuggingFaceTB/SmolLM2-135M", "smol-16k", "linear", factor=2)
    report = verify_rope("smol-16k")          # per-pair table; report["problems"] is empty when all agree

Prompt adapters (prefix, NTK-attention) are not here: they live in :mod:`surgery.adapters`.
"""

from surgery.extend.context import extend, pair_table, plan, verify_rope
from surgery.extend.rope import METHODS, ExtensionPlan, plan_extension

__all__ = ["extend", "plan", "pair_table", "verify_rope", "plan_extension", "ExtensionPlan", "METHODS"]
