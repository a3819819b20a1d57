"""Give freed tensor memory back to the operating system (glibc), so a streamed output's peak stays a few tensors.

glibc serves an allocation above its mmap threshold with its own mapping, returned on free, but each such free
raises the threshold to the freed size (up to 32 MiB on 64-bit). After the first few weights, tensors below that
size come from the heap, and freed heap space stays resident, fragmented. Streaming a 0.45 B-parameter model
through ``surgery quantize`` (rtn, W4A16) so peaked at 0.6-1.2 GB of anonymous memory, a different amount each
run. Trimming once per quantized module (what ``quantize`` does) measured 0.60-0.80 GB at about 1.3× the time
(the pages given back fault in again); fixing the threshold held 0.55 GB in every run but took 1.5× as long
(every large tensor a fresh mapping). Measured three times each, alternating, with ``benchmarks/procmem.py``::

    from surgery.memory import release_freed_memory
    release_freed_memory()      # a no-op where the C library is not glibc
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Ask glibc to return the free pages of its heaps to the OS (``malloc_trim(0)``).

    Returns:
        Whether glibc returned any (False off glibc).

    Example: ``release_freed_memory()   # after a module's float32 copies are freed``
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


__all__ = ["release_freed_memory"]
