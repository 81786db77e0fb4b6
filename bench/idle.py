"""Hold N idle SMTP connections open from one process, until told to let go.

Usage (run.py drives it over stdin/stdout)::

    python -m bench.idle --port 2525 --connections 10000 [--hold-max 600]

Each connection reads the 220 greeting, says EHLO, reads the 250 and then
stays silent. At most ``--parallel`` connections are being opened at once, so
the server's listen backlog does not overflow. When every connection is open
(or failed), one JSON line ``{"event": "ready", ...}`` goes to stdout. The
process then holds the connections until a line or EOF arrives on stdin, or
``--hold-max`` seconds pass, closes them all, and prints ``{"event": "done",
...}`` with how many the server closed on its own meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import trio

from bench.procs import raise_nofile
from bench.smtpclient import SmtpError, open_smtp

__all__ = ["Holder", "main"]

HOST = "127.0.0.1"


@dataclass
class Holder:
    """The connections of one run, and how each one fared."""

    port: int
    total: int
    opened: int = 0
    dropped: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    settled: trio.Event = field(default_factory=trio.Event)
    scopes: set[trio.CancelScope] = field(default_factory=set)

    def _settle_one(self) -> None:
        if self.opened + sum(self.failures.values()) >= self.total:
            self.settled.set()

    async def hold(self, limiter: trio.CapacityLimiter) -> None:
        """Open one connection, then wait silently until released or dropped."""
        try:
            async with limiter:
                smtp = await open_smtp(HOST, self.port)
        except (SmtpError, trio.BrokenResourceError, OSError) as exc:
            self.failures[type(exc).__name__ + ": " + str(exc)[:60]] += 1
            self._settle_one()
            return
        self.opened += 1
        self._settle_one()
        scope = trio.CancelScope()
        self.scopes.add(scope)
        try:
            with scope:
                await smtp.stream.receive_some(4096)
                self.dropped += 1  # the server spoke or closed: no longer idle
        except (trio.BrokenResourceError, OSError):
            self.dropped += 1
        finally:
            self.scopes.discard(scope)
            await trio.aclose_forcefully(smtp.stream)

    def release(self) -> None:
        """End every hold (each task then closes its connection)."""
        for scope in list(self.scopes):
            scope.cancel()


async def _wait_for_stdin() -> None:
    """Return on the first line or EOF on stdin."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while True:
            data = await stdin.receive_some(1024)
            if not data or b"\n" in data:
                return


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def run(port: int, total: int, parallel: int, open_timeout: float, hold_max: float) -> None:
    """Open, report ready, hold, release, report done."""
    holder = Holder(port, total)
    limiter = trio.CapacityLimiter(parallel)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(total):
            nursery.start_soon(holder.hold, limiter)
        with trio.move_on_after(open_timeout):
            await holder.settled.wait()
        _emit(
            "ready",
            opened=holder.opened,
            failed=sum(holder.failures.values()),
            failures=dict(holder.failures.most_common(5)),
            seconds=round(trio.current_time() - started, 3),
        )
        with trio.move_on_after(hold_max):
            await _wait_for_stdin()
        still_open = len(holder.scopes)
        holder.release()
        nursery.cancel_scope.deadline = trio.current_time() + 30  # connects still pending
    _emit("done", opened=holder.opened, still_open=still_open, dropped=holder.dropped)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--parallel", type=int, default=256, help="connects in flight at once")
    parser.add_argument("--open-timeout", type=float, default=180.0)
    parser.add_argument("--hold-max", type=float, default=900.0, help="seconds, at most")
    args = parser.parse_args(argv)
    limit = raise_nofile(args.connections + 1024)
    if limit < args.connections + 64:
        print(f"idle: RLIMIT_NOFILE is {limit}, too low for {args.connections}", file=sys.stderr)
        return 1
    trio.run(run, args.port, args.connections, args.parallel, args.open_timeout, args.hold_max)
    return 0


if __name__ == "__main__":
    sys.exit(main())
