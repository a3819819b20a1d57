"""Context extension: RoPE scalings and Giraffe's bases written as configs stock loaders honour, then verified
against what transformers derives from the written config::

    from surgery.extend import ExtendConfig, extend, verify_rope
    extend(ExtendConfig("HuggingFaceTB/SmolLM2-135M", "smol-16k", "linear", factor=2))
    report = verify_rope("smol-16k")          # per-pair table; report["problems"] is empty when all agree
"""

from surgery.extend.context import ExtendConfig, ExtendResult, extend, pair_table, plan, verify_rope
from surgery.extend.rope import METHODS, ExtensionPlan, plan_extension

__all__ = ["ExtendConfig", "ExtendResult", "extend", "plan", "pair_table", "verify_rope", "plan_extension",
           "ExtensionPlan", "METHODS"]
