"""CPU per message of turning received bytes into the job JSON (issue 16).

Runs what the SMTP server runs for each accepted message, ``_encode_job``
(parse with the standard library's ``email``, build the SPEC §5 payload,
encode the job), in a loop, and reports the CPU time (``process_time``, so a
busy machine does not count) per message for each set::

    python -m bench.parse                 # every set
    python -m bench.parse --sets smtp-2k,mix-small --seconds 5
    python -m bench.parse --profile mix-small   # cProfile of one set instead

The sets are the messages the benchmark sends: ``smtp-2k`` and ``smtp-10m``
are what ``smtp-source -l 2048`` / ``-l 10485760`` sends, ``mix-small``
(2–10 KB text + html) and ``mix-large`` (2–5 MB with a base64 attachment)
are bench/mix.py's bodies.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats
import time
from collections.abc import Callable

from bench.mix import build_bodies
from trismtp.jobs.email import EmailJob
from trismtp.message import Envelope
from trismtp.settings import JobsSettings
from trismtp.smtp.server import _encode_job

__all__ = ["SETS", "main", "messages", "smtp_source_message"]

ENVELOPE = Envelope(
    helo="vm",
    mail_from="a@example.com",
    recipients=("b@example.com",),
    remote_addr="127.0.0.1:40000",
)


def smtp_source_message(length: int, index: int = 1) -> bytes:
    """The message ``smtp-source -l LENGTH`` sends, as the server receives it.

    Its four headers, then numbered lines of 80 ``X`` (postfix 3.7), each
    with CRLF, about ``length`` bytes of body in all.
    """
    head = (
        "From: <a@example.com>\r\nTo: <b@example.com>\r\n"
        "Date: Thu,  3 Dec 2026 11:30:28 +0000 (UTC)\r\n"
        f"Message-Id: <03c8.{index:04x}.0000@vm>\r\n\r\n"
    )
    lines: list[str] = []
    size = 0
    number = 0
    while size < length:
        number += 1
        line = (str(number % 10) + "X" * 79)[: max(length - size, 1)]
        lines.append(line)
        size += len(line) + 2
    return head.encode("ascii") + "".join(line + "\r\n" for line in lines).encode("ascii")


def _mix(kind: str, count: int) -> list[bytes]:
    bodies = build_bodies(seed=16)[kind][:count]
    out = []
    for index, body in enumerate(bodies):
        head = (
            f"From: Mix Sender <mix@localhost>\r\nTo: <sink@localhost>\r\n"
            f"Subject: mix {kind} {index}\r\n"
            f"Message-ID: <mix.{index}@bench.localhost>\r\n"
        ).encode("ascii")
        assert body.endswith(b"\r\n.\r\n")
        out.append(head + body[: -len(b".\r\n")])
    return out


SETS: dict[str, Callable[[], list[bytes]]] = {
    "smtp-2k": lambda: [smtp_source_message(2048, i) for i in range(4)],
    "mix-small": lambda: _mix("small", 6),
    "smtp-10m": lambda: [smtp_source_message(10 * 1024 * 1024)],
    "mix-large": lambda: _mix("large", 3),
}


def messages(name: str) -> list[bytes]:
    """The messages of set ``name``."""
    return SETS[name]()


def _encode_all(raws: list[bytes], jobs: JobsSettings) -> int:
    total = 0
    for raw in raws:
        email = EmailJob(raw=raw, envelope=ENVELOPE)
        _, text = _encode_job(email, jobs, True)
        total += len(text)
    return total


def measure(raws: list[bytes], seconds: float) -> tuple[float, int]:
    """CPU µs per message over at least ``seconds`` of CPU (best of 3 rounds), and rounds."""
    jobs = JobsSettings()
    _encode_all(raws, jobs)  # warm up caches
    best = float("inf")
    rounds = 0
    for _ in range(3):
        start = time.process_time()
        done = 0
        while time.process_time() - start < seconds / 3 or done == 0:
            _encode_all(raws, jobs)
            done += len(raws)
        rounds += done
        best = min(best, (time.process_time() - start) / done)
    return best * 1e6, rounds


def main(argv: list[str] | None = None) -> None:
    """Measure (or profile) the chosen sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per set")
    parser.add_argument("--profile", metavar="SET", help="cProfile this set instead")
    args = parser.parse_args(argv)
    if args.profile:
        raws = messages(args.profile)
        jobs = JobsSettings()
        profiler = cProfile.Profile()
        profiler.enable()
        start = time.process_time()
        while time.process_time() - start < args.seconds:
            _encode_all(raws, jobs)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    for name in args.sets.split(","):
        raws = messages(name)
        micros, count = measure(raws, args.seconds)
        size = sum(map(len, raws)) // len(raws)
        print(f"{name:10} {size:>9} B  {micros:>10.1f} µs CPU/message  ({count} encoded)")


if __name__ == "__main__":
    main()
