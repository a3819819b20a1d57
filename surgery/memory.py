"""Give freed tensor memory back to the operating system (glibc), so a streamed output's peak stays a few tensors.

glibc serves an allocation above its mmap threshold with its own mapping, returned on free, but each such free
raises the threshold to the freed size (up to 32 MiB on 64-bit). After the first few weights, tensors below that
size come from the heap, and freed heap space stays resident, fragmented. Measured with ``benchmarks/procmem.py``
on a 0.45 B-parameter model through ``surgery quantize`` (rtn, W4A16): fitting whole modules peaked at 0.6-1.2 GB
of anonymous memory, a different amount each run, and 0.60-0.80 GB trimmed once per module at ~1.3× the time
(the pages given back fault in again; the formats that still encode whole modules do that). Fitted a chunk of rows
at a time (formats/base.py ``fit_rows``) the peaks were 370-510 MB untrimmed and 384-390 MB trimmed per module at
~1.2× the time; trimming only once 64 MB have piled up (:class:`TrimAbove`, what rtn does) gave 383-403 MB,
its time within the machine's run-to-run noise::

    from surgery.memory import TrimAbove, release_freed_memory
    release_freed_memory()      # a no-op where the C library is not glibc
    trim = TrimAbove(64 << 20)
    trim()                      # trims when the process grew by more than 64 MB since the last trim
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def _malloc_trim():
    # the C library this process already runs on: ctypes.util.find_library would start ldconfig in a subprocess,
    # which (vforked from a process holding hundreds of MB) doubled the process tree's measured peak memory
    try:
        return ctypes.CDLL(None).malloc_trim
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


def anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (resident minus file-backed pages, /proc/self/statm).

    Returns:
        Bytes, or None where the system has no /proc.

    Example: ``anonymous_bytes()   # 301989888``
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident, shared = (int(field) for field in statm.read().split()[1:3])
    except (OSError, ValueError):
        return None
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


class TrimAbove:
    """Give freed memory back (:func:`release_freed_memory`) once this process's anonymous memory has grown more
    than ``budget`` bytes past what it held after the last trim::

        trim = TrimAbove(64 << 20)
        for module in modules:
            ...                 # allocate and free a module's temporaries
            trim()              # trims only when the growth passed the budget
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.floor = anonymous_bytes()

    def __call__(self) -> bool:
        """Trim if over budget; returns whether it trimmed."""
        now = anonymous_bytes()
        if now is None or self.floor is None or now <= self.floor + self.budget:
            return False
        release_freed_memory()
        self.floor = anonymous_bytes()
        return True


__all__ = ["TrimAbove", "anonymous_bytes", "release_freed_memory"]
