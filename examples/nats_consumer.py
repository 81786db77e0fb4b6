"""A worker that takes trismtp's jobs from NATS JetStream, processes and acknowledges them.

With ``[jobs] url = "nats+ws://HOST:PORT"``, ``trismtp serve`` publishes every
accepted email as one message of a JetStream stream (``[jobs.nats] stream``,
default ``trismtp``), in the format of RoadRunner's NATS jobs driver: the body
is ``{"job", "id", "payload", "options"}`` where ``payload`` is the email
payload JSON (docs/payload.md) in base64, and the job's headers (``uuid``,
``payload_class``…) are the message's NATS headers.

This worker:

1. connects to the NATS server's WebSocket listener with trismtp's own client
   (:class:`trismtp.nats.NatsClient`, the one ``trismtp serve`` uses);
2. creates the durable pull consumer ``--durable`` on ``--stream`` if it does
   not exist yet, with explicit acknowledgements: a message that is not
   acknowledged within ``--ack-wait`` seconds is delivered again (started
   before trismtp has created the stream, it says so and waits for it);
3. fetches up to ``--batch`` messages at a time, decodes each job, processes
   it (here: prints one line: job id, envelope sender and recipients,
   subject) and acknowledges it with ``+ACK``; a job whose processing raises
   is given back with ``-NAK`` and delivered again a little later (at most
   ``MAX_DELIVER`` times; then it stays in the stream, where
   ``trismtp jobs peek`` shows it);
4. stops after ``--max`` messages, or on Ctrl-C / SIGTERM: it then fetches no
   more, and gives back at once (``-NAK``) what it fetched but did not process
   (a message on its way at that very moment comes back after ``--ack-wait``).

It fetches what is waiting, up to ``--batch`` messages, in one pull request
(``no_wait``); when nothing is, it waits (``FETCH_EXPIRES`` seconds per pull
request, again and again) for the next message.

An acknowledged message is then deleted from the stream (``--keep`` leaves
it), as RoadRunner's ``delete_after_ack`` does: trismtp's stream has
``limits`` retention by default, so that RoadRunner can declare its pipeline
on it, and would otherwise keep every message. To share the work, run
several copies with the same ``--durable``: each message goes to one of them.

Run it with trismtp's virtualenv, from the repository root::

    .venv/bin/python examples/nats_consumer.py --url nats+ws://127.0.0.1:8080
    .venv/bin/python examples/nats_consumer.py --url nats+ws://127.0.0.1:8080 --max 10
    NATS_PASSWORD=secret .venv/bin/python examples/nats_consumer.py \\
        --url nats+ws://127.0.0.1:8080 --user worker

To do real work, replace :func:`process` (or import this module and call
``trio.run(consume, options, my_handler)``). Exit status: 0 after ``--max``
messages or a stop; 1 when the server cannot be reached or JetStream refuses;
2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from trismtp.jobs.rpc import JobsUnavailable
from trismtp.nats import JetStreamError, Msg, NatsClient
from trismtp.nats.jetstream import ERR_NO_MESSAGE, ERR_STREAM_NOT_FOUND

API_TIMEOUT = 5.0
"""Seconds to wait for each JetStream API reply (and for each acknowledgement)."""
FETCH_EXPIRES = 2.0
"""Seconds one pull request waits for messages before JetStream ends it."""
MAX_DELIVER = 5
"""Deliveries of one message at most; after that it stays in the stream, undelivered."""
NAK_DELAY = 2.0
"""Seconds before a message given back with -NAK is delivered again."""
ERR_CONSUMER_NOT_FOUND = 10014
STREAM_WAIT = 1.0
"""Seconds between looks for a stream that does not exist yet."""
"""JetStream's err_code for "consumer not found"."""
NANOSECONDS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Job:
    """One job, decoded from a JetStream message."""

    id: str
    name: str
    pipeline: str
    headers: dict[str, list[str]]
    payload: dict[str, Any]
    """The email payload (docs/payload.md): event, uuid, envelope, message…"""


Handler = Callable[[Job], None]


def decode_job(message: Msg) -> Job:
    """The job a message carries; ValueError if it is not in RoadRunner's format."""
    try:
        body = json.loads(message.payload)
        payload = json.loads(base64.b64decode(body["payload"], validate=True))
        return Job(
            id=body["id"],
            name=body["job"],
            pipeline=body.get("options", {}).get("pipeline", ""),
            headers=message.headers or {},
            payload=payload,
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ValueError(f"not a trismtp job: {exc!r}") from None


def process(job: Job) -> None:
    """Print one line per job: its id, envelope sender and recipients, subject."""
    envelope = job.payload.get("envelope") or {}
    message = job.payload.get("message") or {}
    recipients = ",".join(envelope.get("allRecipients") or [])
    print(
        f"{job.id}  from {envelope.get('mail_from') or '<>'}  to {recipients}"
        f"  subject {message.get('subject')!r}",
        flush=True,
    )


# -- JetStream ------------------------------------------------------------------


async def ensure_consumer(client: NatsClient, options: argparse.Namespace) -> None:
    """Create the durable pull consumer unless it exists (an existing one is left alone).

    Until the stream exists (trismtp creates it when it first connects to the
    server, so a worker may well start first), look again every STREAM_WAIT
    seconds.
    """
    stream, durable = options.stream, options.durable
    said = False
    while True:
        try:
            await client.request(f"$JS.API.CONSUMER.INFO.{stream}.{durable}", b"", API_TIMEOUT)
        except JetStreamError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                if not said:
                    print(
                        f"waiting for the stream {stream!r}: trismtp creates it when it"
                        " first connects to this NATS server",
                        file=sys.stderr,
                    )
                    said = True
                await trio.sleep(STREAM_WAIT)
                continue
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                raise
            break
        else:
            return
    config: dict[str, Any] = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "ack_wait": round(options.ack_wait * NANOSECONDS),
        "deliver_policy": "all",
        "max_deliver": MAX_DELIVER,
    }
    if options.subject:
        config["filter_subject"] = options.subject
    request = json.dumps({"stream_name": stream, "config": config}).encode()
    await client.request(
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}", request, API_TIMEOUT
    )
    print(f"created durable consumer {durable!r} on stream {stream!r}", file=sys.stderr)


async def fetch(client: NatsClient, options: argparse.Namespace, batch: int) -> list[Msg]:
    """Up to *batch* messages: those waiting now, else the next one to come
    within FETCH_EXPIRES seconds; none if none comes."""
    messages = await pull(client, options, {"batch": batch, "no_wait": True}, batch)
    if not messages:
        # A pull for a whole batch would return only once the batch is full or
        # the request expired: wait for one message, take the rest next time.
        expires = round(FETCH_EXPIRES * NANOSECONDS)
        messages = await pull(client, options, {"batch": 1, "expires": expires}, 1)
    return messages


async def pull(
    client: NatsClient, options: argparse.Namespace, request: dict[str, Any], batch: int
) -> list[Msg]:
    """One pull request: JetStream sends up to *batch* messages to its reply subject."""
    replies = await client.request_many(
        f"$JS.API.CONSUMER.MSG.NEXT.{options.stream}.{options.durable}",
        json.dumps(request).encode(),
        max_messages=batch,
        timeout=FETCH_EXPIRES + API_TIMEOUT,
    )
    # A pull request that ends early ends with a status message: 404 (no
    # messages), 408 (expired, or no_wait with fewer than the batch), 409 (the
    # consumer was deleted…).
    for reply in replies:
        if reply.status is not None and reply.status not in (404, 408):
            raise JetStreamError(reply.status, 0, reply.description or "pull request refused")
    return [reply for reply in replies if reply.status is None and reply.reply]


async def ack(client: NatsClient, message: Msg, options: argparse.Namespace) -> None:
    """``+ACK``, as a request: JetStream answers once it has taken the ack.

    Then, unless ``--keep``, delete the message from the stream, as
    RoadRunner's ``delete_after_ack`` does: on a ``limits`` stream (trismtp's
    default) an acknowledged message otherwise stays until the stream's limits
    drop it. On a work-queue stream the ack removed it already.
    """
    assert message.reply is not None
    await client.request(message.reply, b"+ACK", API_TIMEOUT)
    if not options.keep:
        seq = stream_sequence(message.reply)
        request = json.dumps({"seq": seq, "no_erase": True}).encode()
        try:
            await client.request(
                f"$JS.API.STREAM.MSG.DELETE.{options.stream}", request, API_TIMEOUT
            )
        except JetStreamError as exc:
            if exc.err_code != ERR_NO_MESSAGE:  # a work queue removed it on the ack
                raise


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…`` (9 tokens), or
    with a domain and account hash after ``$JS.ACK`` (12 or more).
    """
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


async def nak(client: NatsClient, message: Msg) -> None:
    """``-NAK``: deliver the message again after NAK_DELAY seconds."""
    assert message.reply is not None
    delay = json.dumps({"delay": round(NAK_DELAY * NANOSECONDS)})
    await client.request(message.reply, f"-NAK {delay}".encode(), API_TIMEOUT)


# -- the loop ---------------------------------------------------------------------


class Worker:
    """Fetches, processes and acknowledges until done; :meth:`stop` ends it early."""

    def __init__(self, client: NatsClient, options: argparse.Namespace, handler: Handler) -> None:
        self.client = client
        self.options = options
        self.handler = handler
        self.done = 0
        self.stopping = False
        self._waiting: trio.CancelScope | None = None

    def stop(self) -> None:
        """Fetch no more: end a fetch (or the wait for the stream) under way;
        give back what is not processed yet."""
        self.stopping = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self) -> int:
        """Make sure the consumer exists, then work until ``--max`` messages
        are done or :meth:`stop`; return how many."""
        with trio.CancelScope() as self._waiting:
            await ensure_consumer(self.client, self.options)
        self._waiting = None
        limit = self.options.max
        while not self.stopping and (limit is None or self.done < limit):
            batch = (
                self.options.batch if limit is None else min(self.options.batch, limit - self.done)
            )
            messages: list[Msg] = []
            with trio.CancelScope() as self._waiting:
                messages = await fetch(self.client, self.options, batch)
            self._waiting = None
            for message in messages:
                await self.handle(message)
        return self.done

    async def handle(self, message: Msg) -> None:
        if self.stopping:
            await nak(self.client, message)  # not processed: give it back at once
            return
        try:
            self.handler(decode_job(message))
        except Exception as exc:
            print(f"failed ({exc!r}): giving the job back", file=sys.stderr)
            await nak(self.client, message)
        else:
            await ack(self.client, message, self.options)
            self.done += 1


async def stop_on_signals(worker: Worker, *, task_status: trio.TaskStatus[None]) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: stop the worker gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            print(f"got {signal.Signals(signum).name}: stopping", file=sys.stderr)
            worker.stop()


async def consume(options: argparse.Namespace, handler: Handler = process) -> int:
    """Connect, make sure the consumer exists, work; return how many jobs were done."""
    async with NatsClient.connect(
        options.url, user=options.user, password=options.password, timeout=API_TIMEOUT
    ) as client:
        worker = Worker(client, options, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, worker)
            try:
                return await worker.run()
            finally:
                nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Consume trismtp's jobs from a NATS JetStream stream (see the module doc)."
    )
    parser.add_argument(
        "--url", default="nats+ws://127.0.0.1:8080", help="the NATS WebSocket listener"
    )
    parser.add_argument("--stream", default="trismtp", help="the stream (default: trismtp)")
    parser.add_argument(
        "--subject", default="trismtp.jobs", help="consume this subject only ('' for all)"
    )
    parser.add_argument("--durable", default="trismtp-worker", help="the durable consumer's name")
    parser.add_argument("--batch", type=_positive, default=10, help="messages per fetch")
    parser.add_argument("--ack-wait", type=float, default=30.0, help="seconds to process one")
    parser.add_argument("--max", type=_positive, default=None, help="stop after N messages")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="do not delete a message from the stream after acknowledging it",
    )
    parser.add_argument("--user", default="", help="NATS user")
    parser.add_argument(
        "--password",
        default=os.environ.get("NATS_PASSWORD", ""),
        help="NATS password (default: $NATS_PASSWORD; prefer that: argv is public)",
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    status = 0
    try:
        done = trio.run(consume, options)
        print(f"processed {done} jobs", file=sys.stderr)
    except* (JobsUnavailable, JetStreamError) as group:
        # Trio's nurseries raise errors as exception groups.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        print(f"nats_consumer: {error}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
