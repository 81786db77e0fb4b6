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
  jobs by id, JetStream deduplicates on the ``Nats-Msg-Id`` header within the
  stream's duplicate window.

The sink is chosen by the scheme of ``jobs.url``: ``ws://``/``wss://`` for a
jobs service, ``nats+ws://``/``nats+wss://`` for JetStream.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from trismtp.jobs.nats import (
    JetStreamError,
    NatsClient,
    NatsMessage,
    ensure_stream,
    roadrunner_message,
    wire_size,
)
from trismtp.jobs.rpc import JobsClient, JobsUnavailable, RpcError
from trismtp.settings import JobsSettings, NatsSettings

__all__ = ["JETSTREAM_ERROR", "JobsTooLarge", "Sink", "connect_nats", "is_nats_url", "open_sink"]

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


class Sink(Protocol):
    """One open connection to a destination."""

    @property
    def closed(self) -> bool:
        """True once the connection failed; the pusher then opens another."""
        ...

    async def push_batch(self, jobs: Sequence[tuple[str, str]], expires_at: float | None) -> None:
        """Store ``(job id, job JSON)`` pairs durably; see the module docstring.

        ``expires_at`` (wall-clock time) asks the destination to store nothing
        if the batch reaches it later; a sink that cannot do that ignores it.
        """
        ...


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

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def push_batch(self, jobs: Sequence[tuple[str, str]], expires_at: float | None) -> None:
        # JetStream has no deadline for a publish; the pusher's own deadline
        # and Nats-Msg-Id deduplication of its retries stand in for it.
        timeout = self._timeout
        if expires_at is not None:
            timeout = max(0.001, min(timeout, expires_at - time.time()))
        messages = [NatsMessage(job_id, *roadrunner_message(encoded)) for job_id, encoded in jobs]
        limit = self._client.max_payload
        fit = [m for m in messages if wire_size(m) <= limit]
        if fit:
            try:
                await self._client.publish_batch(self._settings.subject, fit, timeout)
            except JetStreamError as exc:
                raise RpcError(JETSTREAM_ERROR, f"JetStream: {exc}") from None
        if len(fit) < len(messages):
            raise JobsTooLarge([m.msg_id for m in messages if wire_size(m) > limit], limit)


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
            try:
                await ensure_stream(
                    client,
                    nats.stream,
                    [nats.subject],
                    retention=nats.retention,
                    duplicate_window=nats.duplicate_window,
                    replicas=nats.replicas,
                )
            except JetStreamError as exc:
                raise JobsUnavailable(
                    f"cannot create JetStream stream {nats.stream!r}: {exc}"
                ) from None
        yield NatsSink(client, nats, settings.push_timeout)
