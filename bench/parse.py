"""CPU per message of turning received bytes into the job JSON (issue 16).

Runs what the SMTP server runs for each accepted message, ``_encode_job``
(parse with the standard library's ``email``, build the SPEC §5 payload,
encode the job), in a loop, and reports the CPU time (``process_time``, so a
busy machine does not count) per message for each set::

    python -m bench.parse                 # every set
    python -m bench.parse --sets smtp-2k,mix-small --seconds 5
    python -m bench.parse --profile mix-small   # cProfile of one set instead
    python -m bench.parse --cold          # forget cached headers/addresses each message

Each set is measured in alternation with the code as it was at 54c2b1c
(tests/reference/message_54c2b1c.py and that commit's job encoding), so the
ratio holds even when other work on the machine slows both down. Run it from
the repository root (it imports ``tests.reference``).

The sets are the messages the benchmark sends: ``smtp-2k`` and ``smtp-10m``
are what ``smtp-source -l 2048`` / ``-l 10485760`` sends, ``mix-small``
(2–10 KB text + html) and ``mix-large`` (2–5 MB with a base64 attachment)
are bench/mix.py's bodies; ``client-3m`` is what a mail client sends with
a 2.5 MB attachment (text + html in a multipart/alternative, nested in a
multipart/mixed with the file).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import email.feedparser
import email.policy
import pstats
import random
import time
from collections.abc import Callable
from email.message import EmailMessage

import orjson

from bench.mix import build_bodies
from trismtp import message
from trismtp.jobs.email import EmailJob
from trismtp.jobs.model import PAYLOAD_CLASS, Job, JobOptions
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


def client_message(attachment: int) -> bytes:
    """What a mail client sends with an attachment: multipart/mixed holding a
    multipart/alternative (text and html) and the file, written by ``email``
    with CRLF line ends, as it arrives over SMTP."""
    msg = EmailMessage()
    msg["From"] = "J\u00f6rg Client <joerg@example.org>"
    msg["To"] = "orders@example.com"
    msg["Subject"] = "Gr\u00fc\u00dfe, the report"
    msg["Message-ID"] = "<client.1@example.org>"
    text = "Hello, the report is attached. Gr\u00fc\u00dfe\n" * 40
    msg.set_content(text)
    msg.add_alternative(f"<html><body><p>{text}</p></body></html>", subtype="html")
    data = random.Random(16).randbytes(attachment)
    msg.add_attachment(data, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


SETS: dict[str, Callable[[], list[bytes]]] = {
    "smtp-2k": lambda: [smtp_source_message(2048, i) for i in range(4)],
    "mix-small": lambda: _mix("small", 6),
    "smtp-10m": lambda: [smtp_source_message(10 * 1024 * 1024)],
    "mix-large": lambda: _mix("large", 3),
    "client-3m": lambda: [client_message(2_500_000)],
}


def messages(name: str) -> list[bytes]:
    """The messages of set ``name``."""
    return SETS[name]()


def _encode_all(raws: list[bytes], jobs: JobsSettings, cold: bool = False) -> int:
    total = 0
    for raw in raws:
        if cold:
            _forget()
        email = EmailJob(raw=raw, envelope=ENVELOPE)
        _, text = _encode_job(email, jobs, True)
        total += len(text)
    return total


def _forget() -> None:
    """Empty the parser's caches shared between messages (a worst case: every value new)."""
    shared = getattr(message, "_SHARED_HEADERS", None)
    if shared is not None:
        shared.clear()
    pairs = getattr(message, "_legacy_pairs", None)
    if pairs is not None:
        pairs.cache_clear()


def _encode_reference(raws: list[bytes], jobs: JobsSettings, cold: bool = False) -> int:
    """What 54c2b1c ran for each message: its build_payload, the Job model, orjson."""
    # trismtp.message replaces the feed parser's NLCRE_eol: the reference
    # runs with the library's own.
    patched = email.feedparser.NLCRE_eol  # type: ignore[attr-defined]
    email.feedparser.NLCRE_eol = getattr(message, "_NLCRE_EOL", patched)  # type: ignore[attr-defined]
    try:
        return _encode_reference_unpatched(raws, jobs)
    finally:
        email.feedparser.NLCRE_eol = patched  # type: ignore[attr-defined]


def _encode_reference_unpatched(raws: list[bytes], jobs: JobsSettings) -> int:
    from tests.reference import message_54c2b1c as reference

    total = 0
    for raw in raws:
        email = EmailJob(raw=raw, envelope=ENVELOPE)
        payload = orjson.dumps(
            reference.build_payload(
                raw,
                uuid=email.id,
                envelope=reference.Envelope(
                    helo=ENVELOPE.helo,
                    mail_from=ENVELOPE.mail_from,
                    recipients=ENVELOPE.recipients,
                    remote_addr=ENVELOPE.remote_addr,
                ),
                received_at=email.received_at,
                include_raw=True,
            )
        ).decode()
        headers = {"uuid": [email.id], "payload_class": [PAYLOAD_CLASS]}
        headers.update(jobs.headers)
        job = Job(
            job=jobs.job_name,
            id=email.id,
            payload=payload,
            headers=headers,
            options=JobOptions(
                priority=jobs.priority,
                pipeline=jobs.pipeline,
                delay=jobs.delay,
                auto_ack=jobs.auto_ack,
            ),
        )
        total += len(orjson.dumps(job.to_dict()).decode())
    return total


Encoder = Callable[[list[bytes], JobsSettings, bool], int]


def measure(raws: list[bytes], seconds: float, cold: bool = False) -> tuple[float, float, int]:
    """CPU µs per message now and at 54c2b1c (best of alternating rounds), and messages."""
    jobs = JobsSettings()
    encoders: list[Encoder] = [_encode_all, _encode_reference]
    best = [float("inf"), float("inf")]
    for encode in encoders:
        encode(raws, jobs, cold)  # warm up
    spent = 0.0
    done = 0
    while spent < seconds or done == 0:
        for which, encode in enumerate(encoders):
            start = time.process_time()
            encode(raws, jobs, cold)
            took = time.process_time() - start
            spent += took
            best[which] = min(best[which], took / len(raws))
        done += len(raws)
    return best[0] * 1e6, best[1] * 1e6, done


def main(argv: list[str] | None = None) -> None:
    """Measure (or profile) the chosen sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per set")
    parser.add_argument("--profile", metavar="SET", help="cProfile this set instead")
    parser.add_argument(
        "--cold", action="store_true", help="empty the shared caches before each message"
    )
    args = parser.parse_args(argv)
    if args.profile:
        raws = messages(args.profile)
        jobs = JobsSettings()
        profiler = cProfile.Profile()
        profiler.enable()
        start = time.process_time()
        while time.process_time() - start < args.seconds:
            _encode_all(raws, jobs, args.cold)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, cold={args.cold}")
    print(f"{'set':10} {'bytes':>9}  {'now µs':>10}  {'54c2b1c µs':>10}  ratio")
    for name in args.sets.split(","):
        raws = messages(name)
        now, before, _ = measure(raws, args.seconds, args.cold)
        size = sum(map(len, raws)) // len(raws)
        print(f"{name:10} {size:>9}  {now:>10.1f}  {before:>10.1f}  {now / before:5.2f}")


if __name__ == "__main__":
    main()
