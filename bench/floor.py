"""trismtp's SMTP server with the durable path taken out: how fast can it be?

Usage: ``python -m bench.floor --port 2527 [--no-parse]``; stops on SIGTERM
or SIGINT, binds 127.0.0.1 only.

This is *not* a mode of the product. It runs the real session loop and
protocol machine of ``trismtp.smtp.server`` but answers ``250`` as soon as the
job is built, without pushing it anywhere (``--no-parse``: without building
it either). Load it with the same ``smtp-source`` command as the benchmark to
see the ceiling any optimisation of the push and parse paths runs into.
"""

from __future__ import annotations

import argparse
import logging
import signal

import trio

from trismtp.settings import JobsSettings, SmtpSettings
from trismtp.smtp import server as smtp_server
from trismtp.smtp.protocol import MessageReceived

__all__ = ["main"]


async def _discard(job_id: str, job_json: str, pipeline: str, /, *, last: bool = False) -> None:
    """A push that is "durable" at once."""


async def _no_job(
    self: smtp_server.SmtpServer, session: object, event: MessageReceived
) -> tuple[str, str, int, int]:
    return "floor", "{}", event.size, len(event.recipients)


async def _serve(port: int, parse: bool) -> None:
    if not parse:
        smtp_server.SmtpServer._encode_message = _no_job  # type: ignore[method-assign]
    smtp = SmtpSettings(listen=[f"127.0.0.1:{port}"])
    server = smtp_server.SmtpServer(smtp, JobsSettings(pipeline="smtp"), _discard)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                server.shutdown(0)
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=2527)
    parser.add_argument(
        "--no-parse", action="store_true", help="do not build the job either (SMTP only)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(_serve, args.port, not args.no_parse)


if __name__ == "__main__":
    main()
