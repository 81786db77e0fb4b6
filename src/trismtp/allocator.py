"""Give freed message memory back to the operating system (glibc's malloc).

A big message is a few objects of tens of megabytes (its bytes, the parsed
parts, the job's JSON) plus many small ones, allocated in the event loop and
in worker threads (parsing, SQLite). Freed, they stayed in the process: glibc
raises its mmap threshold after the first big free, so later big buffers come
from the heap, and a heap (or a worker thread's arena) with a live object at
its top cannot shrink. After 200 × 5 MB messages the daemon held 2.3 GiB
while idle.

Two remedies, both no-ops where the C library is not glibc:

* :func:`configure` fixes the mmap threshold (which also stops glibc from
  raising it): every block of :data:`MMAP_THRESHOLD` or more is its own
  mapping, returned to the system the moment it is freed;
* :func:`trim` (``malloc_trim``) returns the free pages inside the heaps,
  whatever is still allocated around them. The SMTP server calls it when the
  last large message in flight has been answered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

__all__ = ["MMAP_THRESHOLD", "configure", "trim"]

log = logging.getLogger("trismtp.allocator")

# glibc's mallopt() parameter numbers (malloc.h).
_M_MMAP_THRESHOLD: Final = -3
# Blocks of this size or more get a mapping of their own.
# The most glibc takes (half its 64 MiB heap size). Smaller blocks come from
# the heaps and are reused while a load lasts; trim() gives them back after.
# At 1 MiB every buffer of a big message was a fresh mapping, faulted in page
# by page and unmapped again: 12 x 10 MiB messages cost 5.3-5.9 s of system
# time instead of 3.1 s, for the same memory at rest (97 MiB) and a peak
# 7-17 % lower (275 vs 296-322 MiB).
MMAP_THRESHOLD: Final = 32 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # malloc_trim exists in glibc only (musl, macOS: no such function).
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC = _glibc()


def configure() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; False if not glibc."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Return the free memory of every heap to the system (glibc; else nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
