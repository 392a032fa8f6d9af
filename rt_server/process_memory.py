"""This process's memory as the operating system sees it: resident size, and handing free heap back.

The C allocator (glibc malloc) keeps memory freed by the model's steps for reuse; the resident size then shows
the high-water mark of the activations, not what is live. `release_free_heap` asks glibc to return free pages
(`malloc_trim(0)`), so that a resident size read after it shows what is really held: a leak shows there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

_PAGE_SIZE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None where that is not available."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE_BYTES
    except (OSError, ValueError, IndexError):
        return None


@cache
def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the allocator's free pages to the operating system; False where that is not possible (not glibc).

    It costs the next allocations their page faults: for measurements and idle moments, not the hot path.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
