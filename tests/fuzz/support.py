"""What the fuzz tests share: the budget, a hang watchdog, reply checks, chunking.

The budget
==========

Every fuzz test takes its ``max_examples`` from :func:`examples`: the
environment variable ``TRISMTP_FUZZ_EXAMPLES`` (default
:data:`DEFAULT_EXAMPLES`) times the test's weight (the state machine, whose
examples are 30-step dialogues, weighs 0.5). The default keeps the whole
``tests/fuzz`` folder at about 20 s on a 2-core machine, so it runs in every
``make test``. A campaign runs it 25 times harder (about 9 minutes)::

    make fuzz       # TRISMTP_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/fuzz -q
    make fuzz FUZZ_EXAMPLES=100000      # harder still

Examples are random (``derandomize`` is off): every run explores new inputs,
and hypothesis keeps the failing ones in ``.hypothesis/`` to replay first.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType

from hypothesis import HealthCheck, settings

from trismtp.smtp.protocol import Reply

__all__ = [
    "DEFAULT_EXAMPLES",
    "HANG_SECONDS",
    "Hang",
    "check_reply_wire",
    "examples",
    "fuzz_settings",
    "split_at",
    "watchdog",
]

DEFAULT_EXAMPLES = 800
"""Examples per unit of weight when ``TRISMTP_FUZZ_EXAMPLES`` is not set."""

HANG_SECONDS = 10.0
"""How long one example may run before :func:`watchdog` calls it a hang.

Every example here takes milliseconds; this is a safety net that turns an
endless loop into a failure, not a speed test.
"""


def examples(weight: float = 1.0) -> int:
    """``max_examples`` for a test of this weight under the current budget."""
    budget = int(os.environ.get("TRISMTP_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    return max(1, round(budget * weight))


def fuzz_settings(weight: float = 1.0, *, stateful_step_count: int = 50) -> settings:
    """Hypothesis settings of a fuzz test: the budget, no deadline, random examples."""
    return settings(
        max_examples=examples(weight),
        deadline=None,
        derandomize=False,
        stateful_step_count=stateful_step_count,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Hang(BaseException):
    """Raised by :func:`watchdog`.

    A BaseException, so that the ``except Exception`` of code that must never
    raise (build_payload) cannot swallow it.
    """


@contextmanager
def watchdog(what: str, seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise :class:`Hang` in the block if it runs longer than ``seconds``.

    SIGALRM, so only in the main thread of a Unix process; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what}: still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def split_at(stream: bytes, points: Iterable[int]) -> list[bytes]:
    """``stream`` cut at ``points``; never an empty chunk (that would be EOF)."""
    cuts = [0, *sorted({p for p in points if 0 < p < len(stream)}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(cuts) if b > a]


_REPLY_LINE = re.compile(rb"([2-5]\d\d)(?:([ -])([^\r\n]*))?")


def check_reply_wire(wire: bytes, reply: Reply) -> None:
    """``wire`` is ``reply`` well formed on the wire (RFC 5321 §4.2).

    One or more lines, each CRLF-terminated with no other CR or LF; each
    starts with the reply's three-digit code; every line but the last has
    ``-`` after the code, the last a space (or nothing after the code).
    """
    assert wire.endswith(b"\r\n"), wire
    lines = wire[:-2].split(b"\r\n")
    for i, line in enumerate(lines):
        match = _REPLY_LINE.fullmatch(line)
        assert match is not None, f"malformed reply line {line!r} in {wire!r}"
        code, sep, _ = match.groups()
        assert int(code) == reply.code, wire
        last = i == len(lines) - 1
        if last:
            assert sep in (b" ", None), f"last line continues: {wire!r}"
        else:
            assert sep == b"-", f"line {i} of a multi-line reply lacks '-': {wire!r}"
