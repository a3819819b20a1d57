"""Give freed tensor memory back to the operating system (glibc), so a streamed output's peak is a few tensors.

glibc serves an allocation above its mmap threshold (128 KiB) with its own mapping, returned on free, but each
such free raises the threshold to the freed size (up to 32 MiB on 64-bit). After the first few weights, every
tensor below that size comes from the heap arenas of the threads that made it, and freed heap space stays
resident, fragmented between arenas. Streaming a 0.45 B-parameter model through ``surgery quantize`` so grew from
0.5 to 1.1-1.4 GB of anonymous memory, by a different amount each run; with the threshold fixed it stays at
0.64 GB, the same in every run (``python benchmarks/quantize_peers.py --part speed``). Called by the command
line on start and by :func:`surgery.io.write_checkpoint`, so API callers get it too::

    from surgery.memory import return_freed_tensors
    return_freed_tensors()      # idempotent; a no-op where the C library is not glibc
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
THRESHOLD_BYTES = 128 << 10  # glibc's default, kept fixed


@functools.cache
def return_freed_tensors() -> bool:
    """Fix glibc's mmap threshold at its default, which stops it from growing (see the module docstring).

    Returns:
        Whether the setting took (False off glibc).

    Example: ``return_freed_tensors()   # True on Linux with glibc``
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


__all__ = ["return_freed_tensors"]
