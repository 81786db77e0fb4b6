"""What glibc's malloc keeps of freed message memory, in a fresh process each.

The daemon trades resident memory for CPU here: freed buffers stay in the
heaps for the next message (up to the ``retain`` passed to ``configure``),
blocks of ``MMAP_THRESHOLD`` or more go back at once, and ``trim()`` returns
the rest. A child process, so the test run's own allocator is left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trismtp import allocator

pytestmark = pytest.mark.skipif(
    not allocator.GLIBC,
    reason="the C library is not glibc: allocator.configure is a no-op",
)

MiB = 1024 * 1024

CHILD = """
import json, sys, threading
from trismtp import allocator

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

assert allocator.configure(int(sys.argv[1]))
size = int(sys.argv[2])
base = rss()
r = {}

def message():
    # A message's buffers: filled, so their pages are resident.
    bufs = [bytearray(b"x" * size) for _ in range(4)]
    r["held"] = rss() - base
    del bufs
    r["kept"] = rss() - base

if sys.argv[3] == "thread":  # as a parse worker or the SQLite writer would
    t = threading.Thread(target=message)
    t.start()
    t.join()
else:
    message()
allocator.trim()  # from the event loop's thread
r["trimmed"] = rss() - base
print(json.dumps(r))
"""


def _child(retain: int, size: int, where: str = "main") -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(retain), str(size), where],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result: dict[str, int] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_buffers_stay_for_the_next_message_until_trimmed(where: str) -> None:
    r = _child(allocator.RETAIN_MAX, 4 * MiB, where)
    assert r["held"] >= 16 * MiB
    # Kept: the next message reuses these pages instead of faulting them in.
    assert r["kept"] >= 12 * MiB, r
    # trim() (one second after the last large message) gives them back,
    # also what a worker thread freed.
    assert r["trimmed"] <= 4 * MiB, r


def test_a_small_budget_keeps_little() -> None:
    # retain 4 MiB: 1 MiB a heap, so 16 MiB of freed buffers go back at once.
    r = _child(4 * MiB, 4 * MiB)
    assert r["held"] >= 16 * MiB
    assert r["kept"] <= 6 * MiB, r


def test_blocks_over_the_mmap_threshold_go_back_when_freed() -> None:
    r = _child(allocator.RETAIN_MAX, allocator.MMAP_THRESHOLD + MiB)
    assert r["held"] >= 4 * allocator.MMAP_THRESHOLD
    assert r["kept"] <= 4 * MiB, r
