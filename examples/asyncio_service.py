"""An asyncio service that consumes trismtp's email jobs in the background.

The shape of a FastAPI/aiohttp app, in plain asyncio: the service does its own
work (here a tiny HTTP endpoint, ``GET /stats``, that shows what the consumer
did) while a :class:`trismtp.consumer.Consumer` runs as a background task on
the same event loop. On SIGTERM or Ctrl-C the service cancels that task, and
for the consumer a cancellation is a graceful stop: it takes no new job,
lets the jobs in hand finish (``grace``) or gives them back, then returns.

In FastAPI the same three lines go in the lifespan::

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(consumer.run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

Run it next to ``make run``::

    .venv/bin/python examples/asyncio_service.py --port 8080 &
    curl http://127.0.0.1:8080/stats
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from trismtp.consumer import Consumer, ReservedJob

logger = logging.getLogger("asyncio_service")


async def handle(job: ReservedJob) -> None:
    """Your code: an async handler runs on the service's own loop."""
    email = job.email()
    logger.info("job %s from %s: %r", job.id, email.envelope.mail_from, email.message.subject)
    await asyncio.sleep(0)  # e.g. await a database or an HTTP call here


def stats_endpoint(
    consumer: Consumer,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A one-route HTTP server: ``GET /stats`` answers the consumer's counts as JSON."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            await reader.readuntil(b"\r\n\r\n")
            body = json.dumps(dataclasses.asdict(consumer.stats)).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    return serve


async def main(options: argparse.Namespace) -> None:
    consumer = Consumer(
        options.url,
        handle,
        token=os.environ.get("TRISMTP_JOBS_TOKEN", ""),
        pipeline=options.pipeline,
        concurrency=8,
    )
    server = await asyncio.start_server(stats_endpoint(consumer), "127.0.0.1", options.port)
    consuming = asyncio.create_task(consumer.run())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    logger.info("serving /stats on 127.0.0.1:%d", options.port)
    async with server:
        done, _ = await asyncio.wait(
            [consuming, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if consuming in done:
            consuming.result()  # it failed (wrong token, no such pipeline): say why
        consuming.cancel()  # a graceful stop for the consumer
        with contextlib.suppress(asyncio.CancelledError):
            await consuming
    logger.info("stopped: %s", dataclasses.asdict(consumer.stats))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:6001/rpc")
    parser.add_argument("--pipeline", default="smtp")
    parser.add_argument("--port", type=int, default=8080)
    logging.basicConfig(level=logging.INFO, format="asyncio_service: %(levelname)s: %(message)s")
    asyncio.run(main(parser.parse_args()))
