"""Hand freed heap memory back to the OS after a one-off burst of temporaries (loading, prepacking).

glibc raises its mmap threshold after the first large free, so later multi-MB temporaries come from the heap,
and their freed space stays in the process: after ``prepack_cpu_weights`` on ``bench-small`` the RSS was
226 MiB above what the tensors hold (3734 -> 3508 MiB after a trim). ``malloc_trim`` returns it. Other C
libraries (musl, macOS) have no such call; there this does nothing.
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


def release_freed_heap() -> bool:
    """Return the heap's free pages to the OS (glibc); whether the call exists here."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
