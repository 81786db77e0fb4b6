"""The jobs RPC over one WebSocket, on anyio: the consumer's connection.

The anyio twin of :class:`trismtp.jobs.rpc.JobsClient` (which is trio-bound):
the JSON-RPC framing is the same sans-io :class:`~trismtp.jsonrpc.ClientProtocol`,
and the same two tasks do the I/O:

* the **writer** takes requests from an unbuffered memory stream and sends
  them, so that a caller cancelled while its request is on the wire never
  leaves half a frame behind it (which would break every other call);
* the **reader** feeds every message to the protocol and wakes the callers
  its replies name.

When the connection ends, every waiting call and every later one raises
:class:`JobsUnavailable`, and :meth:`RpcClient.wait_closed` returns: the
consumer's link then opens a new client. This class never reconnects.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trismtp.consumer.websocket import WebSocket, open_websocket
from trismtp.jobs.websocket import FailureLatch, JobsUnavailable, Target
from trismtp.jsonrpc import ClientProtocol, ProtocolError, ReplySlot, encode_params

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "RpcClient"]

logger = logging.getLogger(__name__)

# Reserve replies are bounded by max_bytes (16 MiB by default, 64 MiB at most)
# but a single job larger than that still comes alone.
DEFAULT_MAX_MESSAGE_SIZE: Final = 256 * 1024 * 1024


class RpcClient:
    """A JSON-RPC connection to the jobs service; open it with :meth:`connect`."""

    def __init__(self, ws: WebSocket, target: Target) -> None:
        self._ws = ws
        self._target = target
        self._protocol = ClientProtocol()
        self._pending: dict[int, ReplySlot[anyio.Event]] = {}
        self._failure = FailureLatch()
        self._closed = anyio.Event()
        self._outbox: MemoryObjectSendStream[str]
        self._inbox: MemoryObjectReceiveStream[str]
        self._outbox, self._inbox = anyio.create_memory_object_stream[str](0)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
    ) -> AsyncIterator[RpcClient]:
        """Connect to the jobs service at *url* (``ws://`` or ``wss://``).

        A non-empty *token* is sent as ``Authorization: Bearer <token>``.
        Raises :class:`JobsUnavailable` (a
        :class:`~trismtp.consumer.websocket.HandshakeRejected` for an HTTP
        refusal such as 401) and ValueError for a URL that is not ``ws(s)://``.
        """
        target = Target.parse(url, schemes=("ws", "wss"), what="jobs URL", token_sent=bool(token))
        headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
        async with open_websocket(
            target,
            max_message_size=max_message_size,
            ssl_context=ssl_context,
            extra_headers=headers,
            connect_timeout=connect_timeout,
        ) as ws:
            client = cls(ws, target)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client._read_loop)
                tasks.start_soon(client._write_loop)
                try:
                    yield client
                finally:
                    client._fail(JobsUnavailable(f"the connection to {target} was closed"))
                    tasks.cancel_scope.cancel()

    @property
    def closed(self) -> bool:
        """True once the connection has failed or was closed."""
        return self._failure.failure is not None

    @property
    def failure(self) -> JobsUnavailable | None:
        """Why the connection ended, once it has."""
        return self._failure.failure

    async def wait_closed(self) -> None:
        """Return once the connection has failed or was closed."""
        await self._closed.wait()

    async def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """Call *method* and return the ``result``.

        Raises :class:`~trismtp.jsonrpc.RpcError` for an error reply and :class:`JobsUnavailable`
        if the connection is gone or lost before the reply.
        """
        self._failure.check()
        request_id, request = self._protocol.request(method, encode_params(params))
        slot = ReplySlot(anyio.Event())
        self._pending[request_id] = slot
        try:
            try:
                await self._outbox.send(request)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._failure.check()
                raise
            await slot.done.wait()
        finally:
            self._pending.pop(request_id, None)
            self._protocol.forget(request_id)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _fail(self, failure: JobsUnavailable) -> None:
        if not self._failure.trip(failure):
            return
        logger.debug("jobs RPC connection ends: %s", failure)
        self._closed.set()
        self._inbox.close()  # callers handing a request over get BrokenResourceError
        for slot in self._pending.values():
            slot.resolve(error=self._failure.copy())

    async def _write_loop(self) -> None:
        try:
            async for request in self._inbox:
                await self._ws.send(request)
        except JobsUnavailable as exc:
            self._fail(exc)
        except anyio.ClosedResourceError:
            pass

    async def _read_loop(self) -> None:
        try:
            while True:
                for reply in self._protocol.receive(await self._ws.receive()):
                    slot = self._pending.pop(reply.id, None)
                    if slot is not None:
                        slot.resolve(result=reply.result, error=reply.error)
        except JobsUnavailable as exc:
            self._fail(exc)
        except ProtocolError as exc:
            self._fail(JobsUnavailable(f"{self._target} sent an invalid reply: {exc}"))
            await self._ws.aclose(1002, "invalid JSON-RPC reply")
