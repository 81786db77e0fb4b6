"""The baseline: aiosmtpd 1.4.6 with a handler that answers 250 and stores nothing.

Usage: ``python -m bench.aiosmtpd_null --port 2526 [--backlog 1024]``; stops on
SIGTERM or SIGINT. It binds 127.0.0.1 only. Plain asyncio (no uvloop), the
hostname is given so that aiosmtpd does not call ``getfqdn()`` per connection,
and its logging stays unconfigured (warnings only), like trismtp's
``log.level = "warning"`` in the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["NullHandler", "main", "serve"]

HOST = "127.0.0.1"


class NullHandler:
    """Accepts every message and throws it away."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


async def serve(port: int, backlog: int, handler: object | None = None) -> None:
    """Listen on 127.0.0.1:*port* with *handler* (the null one by default)
    until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    handler = handler if handler is not None else NullHandler()

    def factory() -> SMTP:
        return SMTP(handler, hostname="localhost", loop=loop)

    server = await loop.create_server(factory, HOST, port, backlog=backlog)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
