"""Give freed message memory back to the operating system (glibc's malloc).

A big message is a few objects of tens of megabytes (its bytes, the parsed
parts, the job's JSON) plus many small ones, allocated in the event loop and
in worker threads (parsing, SQLite). Freed, they stayed in the process: glibc
raises its mmap threshold after the first big free, so later big buffers come
from the heap, and a heap (or a worker thread's arena) with a live object at
its top cannot shrink. After 200 × 5 MB messages the daemon held 2.3 GiB
while idle.

Given back too eagerly, it costs CPU instead: each freed buffer that leaves
more than glibc's 128 KiB trim threshold free at the top of a heap is handed
back at once, and the next message faults the same pages in again (zeroed
by the kernel, page by page). Under a load of 100 KB messages that was a
fifth of the daemon's CPU.

So, no-ops where the C library is not glibc:

* :func:`configure` fixes the mmap threshold (which also stops glibc from
  raising it): every block of :data:`MMAP_THRESHOLD` or more is its own
  mapping, returned to the system the moment it is freed. It puts every
  thread on the one main heap, and lets that heap keep up to ``retain``
  (at most :data:`RETAIN_MAX`) of free memory at its top for the next
  message;
* :func:`trim` (``malloc_trim``) returns the free pages of the heap,
  whatever is still allocated around them. The SMTP server calls it one
  second after the last large message in flight has been answered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

__all__ = ["ARENAS", "GLIBC", "MMAP_THRESHOLD", "RETAIN_MAX", "configure", "trim"]

log = logging.getLogger("trismtp.allocator")

# glibc's mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8
# Blocks of this size or more get a mapping of their own.
# The most glibc takes (half its 64 MiB heap size). Smaller blocks come from
# the heaps and are reused while a load lasts; trim() gives them back after.
# At 1 MiB every buffer of a big message was a fresh mapping, faulted in page
# by page and unmapped again: 12 x 10 MiB messages cost 5.3-5.9 s of system
# time instead of 3.1 s, for the same memory at rest (97 MiB) and a peak
# 7-17 % lower (275 vs 296-322 MiB).
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
# glibc gives a thread that allocates while another holds the heap's lock
# a heap (arena) of its own, up to 8 per CPU. malloc_trim() cannot shrink the
# top of those heaps, so with free memory kept at their tops it stayed after
# the load (20 x 20 MB at once: 187 MiB at rest instead of 130). One heap
# for all threads keeps what trim() returns whole; the threads (event loop,
# SQLite writer, parse workers) mostly allocate under the GIL, and glibc's
# per-thread cache serves small blocks without the lock.
ARENAS: Final = 1
# The most free memory the heap keeps at its top for the next message; less
# when the memory budget is small (configure's ``retain``).
RETAIN_MAX: Final = 64 * 1024 * 1024
# Measured with 2 workers (python -m bench.run, 2-core VM, 2026-12-03),
# against glibc's 128 KiB and a heap per thread: 100 KB messages 253 -> 348
# msg/s (server CPU 13.4 -> 9.8 s for 3,000), 10 MiB messages 29 -> 30-34
# MB/s, the mix 89-93 -> 98 msg/s with its peak RSS 540-573 -> 400 MiB.


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
GLIBC: Final = _LIBC is not None
"""Whether the C library is glibc (else configure and trim do nothing)."""


def configure(retain: int = RETAIN_MAX) -> bool:
    """Set glibc's thresholds for a process of big buffers; False if not glibc.

    *retain* is the most free memory the heap keeps for the next message
    (capped at :data:`RETAIN_MAX`, at least glibc's own 128 KiB); the daemon
    passes its share of the memory budget.
    """
    if _LIBC is None:
        return False
    keep = max(128 * 1024, min(retain, RETAIN_MAX))
    return (
        bool(_LIBC.mallopt(_M_ARENA_MAX, ARENAS))
        and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, keep))
        and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    )


def trim() -> None:
    """Return the free memory of every heap to the system (glibc; else nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
