"""The built-in merge methods: importing this module registers them (``surgery.merge`` imports it).

A built-in method is a module of its own registering its functions with :func:`surgery.merge.registry.register`,
and one line here.
"""

from surgery.merge import methods, selection, spectral, spherical  # noqa: F401  (each registers its methods)
