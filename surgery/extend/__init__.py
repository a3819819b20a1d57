"""Context extension (RoPE scalings, Giraffe bases) and prompt adapters, written as configs stock loaders honour.

Not implemented yet: see the project's [extend] and [adapters] issues.
"""
