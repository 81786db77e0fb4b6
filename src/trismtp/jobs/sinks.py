"""Where the pusher's batches go: a trismtp jobs service, or a NATS JetStream stream.

The pusher (:mod:`trismtp.jobs.pusher`) batches, retries and answers the
sessions; a *sink* only delivers one batch durably or says why not. Both
sinks keep the pusher's contract:

* ``push_batch`` returns only once every job of the batch is durable
  (committed by the jobs service; acknowledged by JetStream with a PubAck);
* it raises :class:`~trismtp.jobs.rpc.JobsUnavailable` when the connection
  failed (the pusher reconnects and sends the same ids again) and
  :class:`~trismtp.jobs.rpc.RpcError` when the destination refused the batch
  (the sessions get 451);
* sending the same job id again stores nothing new: the jobs service keys
  jobs by id. JetStream cannot promise that for trismtp's jobs (below), so
  the NATS sink never sends a job again whose fate it does not know: it
  raises :class:`JobsUncertain` instead, and those sessions answer 451.

Why no ``Nats-Msg-Id``: JetStream deduplicates on that header, but it stays
in the stored message, and RoadRunner's NATS driver (v6) requeues a job by
publishing its body again *with the headers it consumed*, then deleting the
original. Inside the stream's duplicate window JetStream drops the requeued
copy as a duplicate, the driver deletes the original, and the job is gone.
So trismtp publishes without it, and a batch whose PubAcks were lost with
the connection is not sent again: the jobs that got a PubAck are stored
(250), the others get 451 and their MTA sends them again later, as a new
job. A RoadRunner requeue can then never lose a job, and no job id is ever
stored twice; the price is that a lost connection can turn into a second
job for a message (a 451 whose publish had landed), which the consumer sees
under a new id (docs/guarantees.md).

The sink is chosen by the scheme of ``jobs.url``: ``ws://``/``wss://`` for a
jobs service, ``nats+ws://``/``nats+wss://`` for JetStream.
"""

from __future__ import annotations

import logging
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from trismtp.jobs.rpc import JobsClient, JobsUnavailable, RpcError
from trismtp.nats import (
    JetStreamError,
    NatsClient,
    NatsMessage,
    PublishIncomplete,
    ensure_stream,
)
from trismtp.nats.protocol import DEFAULT_MAX_PAYLOAD
from trismtp.nats.roadrunner import JobTooLarge, accepted_message_size, fit_roadrunner_message
from trismtp.settings import JobsSettings, NatsSettings

log = logging.getLogger("trismtp.pusher")

__all__ = [
    "JETSTREAM_ERROR",
    "JobsTooLarge",
    "JobsUncertain",
    "Sink",
    "connect_nats",
    "expected_message_size",
    "is_nats_url",
    "open_sink",
]

# The RpcError code a JetStream refusal is reported with (storage unavailable).
JETSTREAM_ERROR = -32003

# JSON-RPC framing around the pre-encoded jobs (sent in parts, never joined).
_BATCH_OPEN = '{"jobs":['
_BATCH_CLOSE = "]}"


class JobsTooLarge(Exception):
    """Some jobs of a batch are larger than the destination takes; the rest are durable.

    Retrying cannot help these: their sessions answer 552, not 451.
    """

    def __init__(self, ids: Sequence[str], limit: int) -> None:
        super().__init__(f"larger than the NATS server's max_payload of {limit} bytes")
        self.ids = list(ids)
        self.limit = limit


class JobsUncertain(JobsUnavailable):
    """The connection failed with a batch in flight: some jobs are stored, the
    fate of the others is unknown, and they must not be sent again.

    ``stored`` are the ids that are durable (answer 250); ``unknown`` the
    ids that may or may not be (answer 451, never send again).
    """

    def __init__(self, message: str, stored: Sequence[str], unknown: Sequence[str]) -> None:
        super().__init__(message)
        self.stored = list(stored)
        self.unknown = list(unknown)


class Sink(Protocol):
    """One open connection to a destination."""

    @property
    def closed(self) -> bool:
        """True once the connection failed; the pusher then opens another."""
        ...

    @property
    def max_message_size(self) -> int | None:
        """The largest email whose job this destination always takes, if it has a limit."""
        ...

    async def push_batch(self, jobs: Sequence[tuple[str, str]], expires_at: float | None) -> None:
        """Store ``(job id, job JSON)`` pairs durably; see the module docstring.

        ``expires_at`` (wall-clock time) asks the destination to store nothing
        if the batch reaches it later; a sink that cannot do that ignores it.
        """
        ...


def expected_message_size(url: str) -> int | None:
    """:attr:`Sink.max_message_size` for *url* before a connection tells it:
    for NATS, what a server with the default ``max_payload`` takes."""
    return accepted_message_size(DEFAULT_MAX_PAYLOAD) if is_nats_url(url) else None


def is_nats_url(url: str) -> bool:
    """Does ``url`` name a NATS server (``nats+ws://`` or ``nats+wss://``)?"""
    return url.startswith(("nats+ws://", "nats+wss://"))


@asynccontextmanager
async def open_sink(url: str, token: str, settings: JobsSettings) -> AsyncIterator[Sink]:
    """Connect to the destination ``url`` names; raise JobsUnavailable if it cannot."""
    if is_nats_url(url):
        async with _open_nats(url, settings) as nats_sink:
            yield nats_sink
    else:
        async with JobsClient.connect(url, token=token) as client:
            yield RpcSink(client)


class RpcSink:
    """``jobs.PushBatch`` to a trismtp jobs service (or anything speaking its RPC)."""

    def __init__(self, client: JobsClient) -> None:
        self._client = client

    @property
    def closed(self) -> bool:
        return self._client.closed

    @property
    def max_message_size(self) -> int | None:
        return None

    async def push_batch(self, jobs: Sequence[tuple[str, str]], expires_at: float | None) -> None:
        # In parts, never joined: see JobsClient.call_encoded.
        params = [_BATCH_OPEN]
        for n, (_, encoded) in enumerate(jobs):
            params += (",", encoded) if n else (encoded,)
        if expires_at is not None:
            params.append(f'],"expires_at":{expires_at:.6f}}}')
        else:
            params.append(_BATCH_CLOSE)
        await self._client.call_encoded("jobs.PushBatch", params)


class NatsSink:
    """Publishes each job to a JetStream stream in RoadRunner's NATS format."""

    def __init__(self, client: NatsClient, settings: NatsSettings, timeout: float) -> None:
        self._client = client
        self._settings = settings
        self._timeout = timeout
        self._subjects = [subject for _, subject in settings.targets()]

    def _subject(self, job_id: str) -> str:
        # A job's partition follows from its id alone: the same everywhere,
        # spread evenly over the partitions.
        if len(self._subjects) == 1:
            return ""
        return self._subjects[zlib.crc32(job_id.encode()) % len(self._subjects)]

    @property
    def closed(self) -> bool:
        return self._client.closed

    @property
    def max_message_size(self) -> int | None:
        return accepted_message_size(self._client.max_payload)

    async def push_batch(self, jobs: Sequence[tuple[str, str]], expires_at: float | None) -> None:
        # JetStream has no deadline for a publish: the pusher's own deadline
        # stands in for it.
        timeout = self._timeout
        if expires_at is not None:
            timeout = max(0.001, min(timeout, expires_at - time.time()))
        limit = self._client.max_payload
        messages: list[NatsMessage] = []
        ids: list[str] = []
        too_large: list[str] = []
        for job_id, encoded in jobs:
            try:
                fitted = fit_roadrunner_message(encoded, limit)
            except JobTooLarge:
                too_large.append(job_id)
                continue
            if fitted.omitted:
                log.warning(
                    "job %s is larger than the NATS server's max_payload of %d bytes whole: "
                    "sent without %s (the raw message has them; see docs/scaling.md)",
                    job_id,
                    limit,
                    ", ".join(fitted.omitted),
                )
            # No Nats-Msg-Id: see the module docstring.
            messages.append(NatsMessage("", fitted.data, fitted.headers, self._subject(job_id)))
            ids.append(job_id)
        if messages:
            try:
                await self._client.publish_batch(self._settings.subject, messages, timeout)
            except JetStreamError as exc:
                raise RpcError(JETSTREAM_ERROR, f"JetStream: {exc}") from None
            except PublishIncomplete as exc:
                stored = [i for i, ack in zip(ids, exc.acks, strict=True) if ack is not None]
                unknown = [i for i, ack in zip(ids, exc.acks, strict=True) if ack is None]
                raise JobsUncertain(str(exc), stored, unknown) from exc
        if too_large:
            raise JobsTooLarge(too_large, limit)


def connect_nats(
    url: str, nats: NatsSettings, timeout: float = 5.0
) -> AbstractAsyncContextManager[NatsClient]:
    """A :class:`NatsClient` for ``url`` with the credentials and TLS of ``[jobs.nats]``."""
    context: ssl.SSLContext | None = None
    if url.startswith("nats+wss://"):
        context = ssl.create_default_context(cafile=nats.tls_ca or None)
    return NatsClient.connect(
        url,
        user=nats.user,
        password=nats.password.get_secret_value(),
        token=nats.token.get_secret_value(),
        ssl_context=context,
        timeout=timeout,
    )


@asynccontextmanager
async def _open_nats(url: str, settings: JobsSettings) -> AsyncIterator[NatsSink]:
    nats = settings.nats
    async with connect_nats(url, nats, timeout=min(5.0, settings.push_timeout)) as client:
        if nats.create_stream:
            for stream, subject in nats.targets():
                try:
                    info = await ensure_stream(
                        client,
                        stream,
                        [subject],
                        retention=nats.retention,
                        duplicate_window=nats.duplicate_window,
                        replicas=nats.replicas,
                    )
                except JetStreamError as exc:
                    raise JobsUnavailable(
                        f"cannot create JetStream stream {stream!r}: {exc}"
                    ) from None
                _warn_if_fewer_replicas(stream, info, nats.replicas)
        log.debug(
            "NATS max_payload is %d bytes: SMTP advertises a SIZE of at most %d",
            client.max_payload,
            accepted_message_size(client.max_payload),
        )
        yield NatsSink(client, nats, settings.push_timeout)


def _warn_if_fewer_replicas(stream: str, info: dict[str, Any], wanted: int) -> None:
    # RoadRunner's pipeline declaration rewrites the stream's config with
    # num_replicas 0 (read as 1): on a cluster that quietly drops R3 to R1.
    config = info.get("config")
    have = config.get("num_replicas") if isinstance(config, dict) else None
    if isinstance(have, int) and have < wanted:
        log.warning(
            "JetStream stream %s has %d replica(s), [jobs.nats] replicas asks for %d: "
            "a RoadRunner pipeline declaration resets it (docs/scaling.md); "
            "nats stream edit %s --replicas %d",
            stream,
            max(have, 1),
            wanted,
            stream,
            wanted,
        )
