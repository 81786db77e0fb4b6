"""Open-loop SMTP load at a fixed rate; measures the time from the final dot to the reply.

Usage (run.py calls it; it also runs alone)::

    python -m bench.latency --port 2525 --rate 400 --count 8000 --connections 20 \\
        --out latency.json [--raw samples.raw]

Method. N connections are opened first (greeting and EHLO are not timed).
Message *i* is due at ``t0 + i / rate``, whatever happened to earlier ones:
that is the open loop. A free connection takes the oldest due message,
writes MAIL, RCPT and DATA at once (PIPELINING), waits for 250/250/354,
writes the message with its final dot in one write, and timestamps the
moment that write returned (``dot``) and the moment the whole reply was read
(``reply``). ``dot → reply`` is the server's time to answer the final dot,
here: parse, push, group commit with fsync, then 250.

When all connections are busy a due message waits; that wait is reported
separately (``due → reply`` and ``late``), so a server that cannot keep the
rate shows up instead of being hidden by the generator slowing down.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from bench.smtpclient import SmtpError, SmtpStream, make_message, open_smtp

__all__ = ["LatencyResult", "Sample", "percentile", "run_latency", "summarize_ms"]

HOST = "127.0.0.1"
MAIL_FROM = "latency@localhost"
RCPT = "sink@localhost"
LATE_AFTER = 0.005
"""A message that starts more than this many seconds after it was due is late."""
DRAIN_GRACE = 30.0
"""Seconds after the last message is due before the run is cut off."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One message: when it was due, started, its dot was written, its reply read."""

    index: int
    due: float
    started: float
    dot: float
    reply: float
    code: int


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """What one open-loop run measured (times in milliseconds)."""

    rate: float
    count: int
    connections: int
    body_size: int
    sent: int
    ok: int
    codes: dict[str, int]
    errors: dict[str, int]
    duration_s: float
    achieved_rate: float
    late: int
    dot_to_reply_ms: dict[str, float]
    due_to_reply_ms: dict[str, float]
    cut_off: bool


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank *q*-th percentile (0-100) of an ascending list; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9, max and mean of durations given in seconds, in ms."""
    values = sorted(s * 1000 for s in seconds)
    mean = sum(values) / len(values) if values else math.nan
    summary = {f"p{q:g}": percentile(values, q) for q in (50, 90, 99, 99.9)}
    summary |= {"max": values[-1] if values else math.nan, "mean": mean}
    return {k: round(v, 3) for k, v in summary.items()}


@dataclass(frozen=True, slots=True)
class _Ticket:
    index: int
    due: float


class _Run:
    """The state of one run: the schedule, the connections' samples and errors."""

    def __init__(self, rate: float, count: int, body_size: int) -> None:
        self.rate = rate
        self.count = count
        self.body_size = body_size
        self.samples: list[Sample] = []
        self.errors: Counter[str] = Counter()
        self.t0 = 0.0

    async def schedule(self, send: trio.MemorySendChannel[_Ticket]) -> None:
        """Release message *i* at ``t0 + i / rate``; several at once if behind."""
        async with send:
            for index in range(self.count):
                due = self.t0 + index / self.rate
                if due > trio.current_time():
                    await trio.sleep_until(due)
                send.send_nowait(_Ticket(index, due))

    async def connection(
        self, smtp: SmtpStream, receive: trio.MemoryReceiveChannel[_Ticket]
    ) -> None:
        """Send the due messages one after the other over one connection."""
        async with receive:
            async for ticket in receive:
                try:
                    self.samples.append(await self._transaction(smtp, ticket))
                except (SmtpError, trio.BrokenResourceError, OSError) as exc:
                    self.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                    return  # this connection is done; the others carry on
        with trio.move_on_after(5):
            await smtp.quit()

    async def _transaction(self, smtp: SmtpStream, ticket: _Ticket) -> Sample:
        started = trio.current_time()
        await smtp.start_transaction(MAIL_FROM, RCPT)
        message = make_message(ticket.index, self.body_size, MAIL_FROM, RCPT)
        await smtp.send(message)
        dot = trio.current_time()
        code = await smtp.reply()
        return Sample(ticket.index, ticket.due, started, dot, trio.current_time(), code)


async def run_latency(
    port: int, rate: float, count: int, connections: int, body_size: int
) -> tuple[LatencyResult, list[Sample]]:
    """Open *connections*, send *count* messages at *rate* a second, summarize."""
    run = _Run(rate, count, body_size)
    streams = [await open_smtp(HOST, port) for _ in range(connections)]
    send, receive = trio.open_memory_channel[_Ticket](count)
    run.t0 = trio.current_time() + 0.05
    cut_off = True
    try:
        with trio.move_on_after(count / rate + DRAIN_GRACE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run.schedule, send)
                for smtp in streams:
                    nursery.start_soon(run.connection, smtp, receive.clone())
                await receive.aclose()
            cut_off = False
    finally:
        for smtp in streams:
            await trio.aclose_forcefully(smtp.stream)
    return _summarize(run, connections, cut_off), run.samples


def _summarize(run: _Run, connections: int, cut_off: bool) -> LatencyResult:
    samples = run.samples
    ok = [s for s in samples if s.code == 250]
    end = max((s.reply for s in samples), default=run.t0)
    duration = max(end - run.t0, 1e-9)
    return LatencyResult(
        rate=run.rate,
        count=run.count,
        connections=connections,
        body_size=run.body_size,
        sent=len(samples),
        ok=len(ok),
        codes={str(k): v for k, v in sorted(Counter(s.code for s in samples).items())},
        errors=dict(run.errors),
        duration_s=round(duration, 3),
        achieved_rate=round(len(ok) / duration, 1),
        late=sum(1 for s in samples if s.started - s.due > LATE_AFTER),
        dot_to_reply_ms=summarize_ms([s.reply - s.dot for s in ok]),
        due_to_reply_ms=summarize_ms([s.reply - s.due for s in ok]),
        cut_off=cut_off,
    )


def write_raw(path: Path, samples: list[Sample], t0: float) -> None:
    """One line a message: index, due, started, dot, reply (ms from the first due), code."""
    with path.open("w", encoding="ascii") as out:
        out.write("# index due_ms started_ms dot_ms reply_ms code\n")
        for s in sorted(samples, key=lambda s: s.index):
            times = (s.due, s.started, s.dot, s.reply)
            out.write(f"{s.index} " + " ".join(f"{(t - t0) * 1000:.3f}" for t in times))
            out.write(f" {s.code}\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: run once, write the JSON summary (and the raw samples)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages per second")
    parser.add_argument("--count", type=int, required=True, help="messages in all")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048, help="body bytes")
    parser.add_argument("--out", type=Path, help="write the summary JSON here (else stdout)")
    parser.add_argument("--raw", type=Path, help="write one line per message here")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.count <= 0 or args.connections <= 0:
        parser.error("--rate, --count and --connections must be positive")
    result, samples = trio.run(
        run_latency, args.port, args.rate, args.count, args.connections, args.size
    )
    text = json.dumps(asdict(result), indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    if args.raw and samples:
        write_raw(args.raw, samples, min(s.due for s in samples))
    print(
        f"latency: {result.ok}/{result.count} ok at {result.achieved_rate}/s, "
        f"dot->reply p50 {result.dot_to_reply_ms['p50']} ms "
        f"p99 {result.dot_to_reply_ms['p99']} ms, late {result.late}",
        file=sys.stderr,
    )
    return 0 if result.ok == result.count else 1


if __name__ == "__main__":
    sys.exit(main())
