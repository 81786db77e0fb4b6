"""The production-like mix of issue 16: mixed sizes, open loop, a consumer draining meanwhile.

Two commands, both started by :mod:`bench.run` (they also run alone)::

    python -m bench.mix send --port 2525 --rate 100 --seconds 60 --out send.json
    python -m bench.mix consume --url ws://127.0.0.1:PORT/rpc --out drained.json

``send``: message *i* is due at ``t0 + i / rate`` whatever happened to the
earlier ones (open loop). Its kind is drawn (seeded) from the mix: 80 %
small (2–10 KB, multipart/alternative text + html), 15 % medium (100–500 KB)
and 5 % large (2–5 MB), the last two with a base64 attachment; half of the
messages go over kept connections (``--kept`` of them, each sends the due
messages one after the other), the other half each over a new connection
(``--new`` workers: connect, EHLO, one transaction, QUIT). The bodies are
built once at start-up (a few variants per kind); per message only the
headers change, so the generator spends its CPU on the sockets. Timed, as in
:mod:`bench.latency`: final dot → reply, and due → reply (queueing for a free
connection included). Its own CPU time is reported, to show it is not the
bottleneck. Each message carries ``Message-ID: <mix.INDEX@bench.localhost>``.

``consume``: a :class:`trismtp.consumer.Consumer` on the jobs service,
``--concurrency`` handlers, each finding the message's index in its job's
payload and acking. On SIGUSR1 it drains: it stops once no job came for
``--idle-stop`` seconds; it then writes how many times each index was
delivered, so the harness can check that every 250 was stored and drained
exactly once.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import re
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import trio

from bench.latency import summarize_ms
from bench.smtpclient import SmtpError, SmtpStream, open_smtp

__all__ = ["KINDS", "Kind", "MixResult", "build_bodies", "main"]

HOST = "127.0.0.1"
MAIL_FROM = "mix@localhost"
RCPT = "sink@localhost"
LATE_AFTER = 0.005
DRAIN_GRACE = 120.0
"""Seconds after the last message is due before ``send`` cuts the run off."""
VARIANTS = 6
"""Bodies built per kind; a message picks one (its size is drawn within the kind's range)."""
INDEX_RE = re.compile(r"mix\.(\d+)@bench\.localhost")


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of message in the mix: its share and its size range in bytes."""

    name: str
    share: float
    low: int
    high: int
    attachment: bool


KINDS = (
    Kind("small", 0.80, 2_000, 10_000, False),
    Kind("medium", 0.15, 100_000, 500_000, True),
    Kind("large", 0.05, 2_000_000, 5_000_000, True),
)


def _text_lines(rng: random.Random, size: int) -> str:
    words = ("mail", "order", "invoice", "shipping", "the", "of", "and", "trismtp", "queue")
    out: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(12))
        out.append(line)
        total += len(line) + 2
    return "\r\n".join(out)


def _base64_lines(data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _body(kind: Kind, size: int, rng: random.Random) -> bytes:
    """Headers after the per-message ones, and the body: ~*size* bytes, dot-safe, final dot."""
    if not kind.attachment:
        text = _text_lines(rng, size // 3)
        html = "<html><body><p>" + _text_lines(rng, size // 2) + "</p></body></html>"
        parts = [
            ("text/plain; charset=utf-8", text),
            ("text/html; charset=utf-8", html),
        ]
        boundary = "alt-boundary-0001"
        mime = "multipart/alternative"
        disposition = ""
    else:
        text = _text_lines(rng, 1500)
        raw = rng.randbytes(max(size * 3 // 4 - 2000, 1000))
        parts = [
            ("text/plain; charset=utf-8", text),
            ("application/pdf", _base64_lines(raw)),
        ]
        boundary = "mixed-boundary-0001"
        mime = "multipart/mixed"
        disposition = 'Content-Disposition: attachment; filename="report.pdf"\r\n'
    chunks = [f"MIME-Version: 1.0\r\nContent-Type: {mime}; boundary={boundary}\r\n\r\n"]
    for ctype, content in parts:
        encoding = "base64" if ctype == "application/pdf" else "8bit"
        extra = disposition if ctype == "application/pdf" else ""
        chunks.append(
            f"--{boundary}\r\nContent-Type: {ctype}\r\n"
            f"Content-Transfer-Encoding: {encoding}\r\n{extra}\r\n{content}\r\n"
        )
    chunks.append(f"--{boundary}--\r\n.\r\n")
    return "".join(chunks).encode("utf-8")


def build_bodies(seed: int) -> dict[str, list[bytes]]:
    """VARIANTS bodies per kind, their sizes spread over the kind's range."""
    rng = random.Random(seed)
    bodies: dict[str, list[bytes]] = {}
    for kind in KINDS:
        step = (kind.high - kind.low) / max(VARIANTS - 1, 1)
        bodies[kind.name] = [_body(kind, round(kind.low + k * step), rng) for k in range(VARIANTS)]
    return bodies


def _headers(index: int, kind: str) -> bytes:
    return (
        f"From: Mix Sender <{MAIL_FROM}>\r\nTo: <{RCPT}>\r\n"
        f"Subject: mix {kind} {index}\r\n"
        f"Message-ID: <mix.{index}@bench.localhost>\r\n"
    ).encode("ascii")


@dataclass(frozen=True, slots=True)
class _Ticket:
    index: int
    due: float
    kind: str
    variant: int


@dataclass(frozen=True, slots=True)
class _Sample:
    index: int
    kind: str
    kept: bool
    size: int
    due: float
    started: float
    dot: float
    reply: float
    code: int


@dataclass
class MixResult:
    """What one ``send`` run measured (times in ms)."""

    rate: float
    seconds: float
    count: int
    sent: int
    ok: int
    codes: dict[str, int]
    errors: dict[str, int]
    duration_s: float
    achieved_rate: float
    mb_per_s: float
    late: int
    cut_off: bool
    in_flight_at_cut_off: int
    """Messages sent but unanswered when the run was cut off (stored or not: unknown)."""
    generator_cpu_s: float
    generator_cpu_pct: float
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    ok_indices: list[int] = field(default_factory=list)
    not_ok_indices: list[int] = field(default_factory=list)


class _Sender:
    def __init__(self, port: int, rate: float, count: int, seed: int) -> None:
        self.port = port
        self.rate = rate
        self.count = count
        self.rng = random.Random(seed)
        self.bodies = build_bodies(seed)
        self.samples: list[_Sample] = []
        self.errors: Counter[str] = Counter()
        self.failed: list[int] = []
        self.in_flight: set[int] = set()
        """Messages whose transaction began and has no reply yet (cut off, if any at the end)."""
        self.t0 = 0.0
        self.cut_off = False

    def _ticket(self, index: int) -> tuple[_Ticket, bool]:
        draw = self.rng.random()
        cumulative = 0.0
        kind = KINDS[-1]
        for k in KINDS:
            cumulative += k.share
            if draw < cumulative:
                kind = k
                break
        variant = self.rng.randrange(VARIANTS)
        kept = self.rng.random() < 0.5
        return _Ticket(index, self.t0 + index / self.rate, kind.name, variant), kept

    async def schedule(
        self, kept: trio.MemorySendChannel[_Ticket], new: trio.MemorySendChannel[_Ticket]
    ) -> None:
        async with kept, new:
            for index in range(self.count):
                ticket, on_kept = self._ticket(index)
                if ticket.due > trio.current_time():
                    await trio.sleep_until(ticket.due)
                (kept if on_kept else new).send_nowait(ticket)

    async def _transaction(self, smtp: SmtpStream, ticket: _Ticket, kept: bool) -> None:
        started = trio.current_time()
        self.in_flight.add(ticket.index)
        await smtp.start_transaction(MAIL_FROM, RCPT)
        headers = _headers(ticket.index, ticket.kind)
        body = self.bodies[ticket.kind][ticket.variant]
        await smtp.send(headers + body)
        dot = trio.current_time()
        code = await smtp.reply()
        size = len(headers) + len(body)
        sample = _Sample(
            ticket.index, ticket.kind, kept, size, ticket.due, started, dot,
            trio.current_time(), code,
        )  # fmt: skip
        self.samples.append(sample)
        self.in_flight.discard(ticket.index)

    def _error(self, ticket: _Ticket, exc: BaseException) -> None:
        self.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        self.failed.append(ticket.index)
        self.in_flight.discard(ticket.index)

    async def kept_worker(self, receive: trio.MemoryReceiveChannel[_Ticket]) -> None:
        """One kept connection; reconnects if the server closed it."""
        smtp: SmtpStream | None = None
        async with receive:
            async for ticket in receive:
                try:
                    if smtp is None:
                        smtp = await open_smtp(HOST, self.port)
                    await self._transaction(smtp, ticket, True)
                except (SmtpError, trio.BrokenResourceError, OSError) as exc:
                    self._error(ticket, exc)
                    if smtp is not None:
                        await trio.aclose_forcefully(smtp.stream)
                    smtp = None
        if smtp is not None:
            with trio.move_on_after(5):
                await smtp.quit()
            await trio.aclose_forcefully(smtp.stream)

    async def new_worker(self, receive: trio.MemoryReceiveChannel[_Ticket]) -> None:
        """A new connection per message: connect, EHLO, one transaction, QUIT."""
        async with receive:
            async for ticket in receive:
                smtp: SmtpStream | None = None
                try:
                    smtp = await open_smtp(HOST, self.port)
                    await self._transaction(smtp, ticket, False)
                    with trio.move_on_after(5):
                        await smtp.quit()
                except (SmtpError, trio.BrokenResourceError, OSError) as exc:
                    self._error(ticket, exc)
                finally:
                    if smtp is not None:
                        await trio.aclose_forcefully(smtp.stream)


async def _send(port: int, rate: float, count: int, kept: int, new: int, seed: int) -> _Sender:
    sender = _Sender(port, rate, count, seed)
    kept_send, kept_receive = trio.open_memory_channel[_Ticket](math.inf)
    new_send, new_receive = trio.open_memory_channel[_Ticket](math.inf)
    sender.t0 = trio.current_time() + 0.1
    with trio.move_on_after(count / rate + DRAIN_GRACE) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.schedule, kept_send, new_send)
            for _ in range(kept):
                nursery.start_soon(sender.kept_worker, kept_receive.clone())
            for _ in range(new):
                nursery.start_soon(sender.new_worker, new_receive.clone())
            await kept_receive.aclose()
            await new_receive.aclose()
    sender.cut_off = scope.cancelled_caught
    return sender


def _summarize(sender: _Sender, rate: float, seconds: float, cpu: float) -> MixResult:
    samples = sender.samples
    ok = [s for s in samples if s.code == 250]
    end = max((s.reply for s in samples), default=sender.t0)
    duration = max(end - sender.t0, 1e-9)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [s for s in samples if s.kind == kind.name]
        good = [s for s in mine if s.code == 250]
        by_kind[kind.name] = {
            "sent": len(mine),
            "ok": len(good),
            "codes": {str(k): v for k, v in sorted(Counter(s.code for s in mine).items())},
            "dot_to_reply_ms": summarize_ms([s.reply - s.dot for s in good]),
            "due_to_reply_ms": summarize_ms([s.reply - s.due for s in good]),
        }
    codes = Counter(s.code for s in samples)
    return MixResult(
        rate=rate,
        seconds=seconds,
        count=sender.count,
        sent=len(samples),
        ok=len(ok),
        codes={str(k): v for k, v in sorted(codes.items())},
        errors=dict(sender.errors),
        duration_s=round(duration, 3),
        achieved_rate=round(len(ok) / duration, 1),
        mb_per_s=round(sum(s.size for s in ok) / duration / 1e6, 2),
        late=sum(1 for s in samples if s.started - s.due > LATE_AFTER),
        cut_off=sender.cut_off,
        generator_cpu_s=round(cpu, 2),
        generator_cpu_pct=round(100 * cpu / duration, 1),
        by_kind=by_kind,
        ok_indices=sorted(s.index for s in ok),
        in_flight_at_cut_off=len(sender.in_flight),
        not_ok_indices=sorted(
            {s.index for s in samples if s.code != 250} | set(sender.failed) | sender.in_flight
        ),
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send_main(args: argparse.Namespace) -> int:
    """``send``: the open-loop generator; writes the summary JSON."""
    count = max(1, round(args.rate * args.seconds))
    cpu_before = _cpu_seconds()  # the bodies are built inside _send's _Sender: counted
    sender = trio.run(_send, args.port, args.rate, count, args.kept, args.new, args.seed)
    result = _summarize(sender, args.rate, args.seconds, _cpu_seconds() - cpu_before)
    args.out.write_text(json.dumps(asdict(result)) + "\n", encoding="utf-8")
    small = result.by_kind["small"]["dot_to_reply_ms"]
    print(
        f"mix send: {result.ok}/{count} got 250 at {result.achieved_rate}/s "
        f"({result.mb_per_s} MB/s), codes {result.codes}, small dot->250 p50 {small['p50']} "
        f"p99 {small['p99']} ms, generator CPU {result.generator_cpu_pct} %",
        file=sys.stderr,
    )
    return 0


async def _consume(url: str, concurrency: int, idle_stop: float) -> dict[str, Any]:
    from trismtp.consumer import Consumer, ReservedJob

    delivered: Counter[int] = Counter()
    unknown = 0
    redelivered = 0
    last = time.monotonic()

    async def handle(job: ReservedJob) -> None:
        nonlocal unknown, redelivered, last
        found = INDEX_RE.search(job.payload)
        if found is None:
            unknown += 1
        else:
            delivered[int(found.group(1))] += 1
        if job.lease.attempt > 1:
            redelivered += 1
        last = time.monotonic()

    consumer = Consumer(url, handle, concurrency=concurrency, retry_on_failed_connect=True)
    started = time.monotonic()

    async def drain_on_signal() -> None:
        nonlocal last
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                break
        last = max(last, time.monotonic())
        while True:  # until no job came for idle_stop seconds
            wait = idle_stop - (time.monotonic() - last)
            if wait <= 0:
                break
            await anyio.sleep(wait)
        consumer.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_on_signal)
        stats = await consumer.run()
        tg.cancel_scope.cancel()
    return {
        "acked": stats.acked,
        "failed": stats.failed,
        "lease_lost": stats.lease_lost,
        "connections": stats.connections,
        "unknown": unknown,
        "redelivered": redelivered,
        "seconds": round(time.monotonic() - started, 2),
        "delivered": {str(k): v for k, v in sorted(delivered.items())},
    }


def consume_main(args: argparse.Namespace) -> int:
    """``consume``: drain the jobs service until SIGUSR1 and then idle; write the counts."""
    result = anyio.run(_consume, args.url, args.concurrency, args.idle_stop, backend="trio")
    result["consumer_cpu_s"] = round(_cpu_seconds(), 2)
    args.out.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="the open-loop generator")
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--rate", type=float, required=True, help="messages per second")
    send.add_argument("--seconds", type=float, required=True, help="how long messages fall due")
    send.add_argument("--kept", type=int, default=20, help="kept connections (default 20)")
    send.add_argument("--new", type=int, default=20, help="new-connection workers (default 20)")
    send.add_argument("--seed", type=int, default=16)
    send.add_argument("--out", type=Path, required=True)
    consume = sub.add_parser("consume", help="drain the jobs service")
    consume.add_argument("--url", required=True, help="ws://HOST:PORT/rpc")
    consume.add_argument("--concurrency", type=int, default=16)
    consume.add_argument("--idle-stop", type=float, default=3.0)
    consume.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "send":
        if args.rate <= 0 or args.seconds <= 0 or args.kept < 1 or args.new < 1:
            parser.error("--rate, --seconds, --kept and --new must be positive")
        return send_main(args)
    return consume_main(args)


if __name__ == "__main__":
    sys.exit(main())
