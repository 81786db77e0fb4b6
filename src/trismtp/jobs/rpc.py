"""JSON-RPC 2.0 client for the jobs service, over one WebSocket connection.

Theory of operation
-------------------
A :class:`JobsClient` owns one WebSocket and two background tasks, both in the
nursery that :meth:`JobsClient.connect` opens and closes:

* the **writer** takes encoded requests from an unbuffered channel and sends
  them. A caller hands its request over, then waits for the reply. The
  hand-over is atomic under cancellation, so a cancelled caller either never
  sent its request or the writer sends all of it: a request is never cut off
  half-way on the wire, which would corrupt the stream for every other caller.
* the **reader** takes every reply and wakes the caller waiting for that id
  (a dict id → slot). Replies may come in any order; many calls can be in
  flight on one connection.

The JSON-RPC framing itself (ids, matching replies, error objects) is the
sans-io :class:`trismtp.jsonrpc.ClientProtocol`, shared with the anyio
consumer library (:mod:`trismtp.consumer`); this module is its trio adapter.

When the connection fails (refused, rejected, closed, or a reply we cannot
understand) the client *fails*: it keeps the reason, wakes every waiting
caller with :class:`JobsUnavailable`, and refuses new calls at once. It never
reconnects or retries: that policy belongs to the caller (the pusher), which
knows whether a request is safe to repeat and how long to back off.

Exceptions from trio-websocket, trio and the OS become :class:`JobsUnavailable`
in one function, :func:`_unavailable` (like httpcore's ``map_exceptions``), so
callers never see ``ConnectionClosed`` or ``OSError``. Errors the service
*answers* with are :class:`RpcError`, carrying the JSON-RPC code.

Size limits: ``max_message_size`` bounds the replies we accept. The service
bounds requests the same way; trio-websocket enforces both while receiving and
closes the connection with code 1009 when a message is too big. The request's
id is lost with it, so a too-large request shows up here as
:class:`JobsUnavailable` (its ``close_code`` is 1009) for every call in flight,
not as a ``TOO_LARGE`` reply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from trismtp.jobs.websocket import (
    FailureLatch,
    JobsUnavailable,
    Stream,
    Target,
    open_websocket,
    run_client,
    send_text,
    unavailable,
)
from trismtp.jsonrpc import (
    BATCH_EXPIRED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LEASE_LOST,
    METHOD_NOT_FOUND,
    NO_SUCH_PIPELINE,
    PARSE_ERROR,
    STORAGE_UNAVAILABLE,
    TOO_LARGE,
    ClientProtocol,
    LeaseLost,
    ProtocolError,
    ReplySlot,
    RpcError,
    encode_params,
)

__all__ = [
    "BATCH_EXPIRED",
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LEASE_LOST",
    "METHOD_NOT_FOUND",
    "NO_SUCH_PIPELINE",
    "PARSE_ERROR",
    "STORAGE_UNAVAILABLE",
    "TOO_LARGE",
    "JobsClient",
    "JobsUnavailable",
    "LeaseLost",
    "RpcError",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE: Final = 256 * 1024 * 1024
# Leaving the client waits this long for the close handshake, even when the
# caller is being cancelled, so the service sees a clean close.
CLOSE_TIMEOUT: Final = 2.0


class JobsClient:
    """A JSON-RPC connection to the jobs service; open it with :meth:`connect`.

    Safe to share between tasks: calls may overlap and replies are matched to
    them by id. Once :attr:`closed`, every call raises :class:`JobsUnavailable`.
    """

    def __init__(self, ws: WebSocketConnection, stream: Stream, target: Target) -> None:
        self._ws = ws
        self._stream = stream
        self._target = target
        self._protocol = ClientProtocol()
        self._pending: dict[int, ReplySlot[trio.Event]] = {}
        self._failure = FailureLatch()
        self._outbox, self._outbox_receive = trio.open_memory_channel[Sequence[str]](0)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        token: str = "",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
    ) -> AsyncIterator[JobsClient]:
        """Connect to the jobs service at *url* (``ws://`` or ``wss://``).

        A non-empty *token* is sent as ``Authorization: Bearer <token>``.
        *max_message_size* bounds the replies accepted (characters of a text
        message). Raises :class:`JobsUnavailable` if the service cannot be
        reached within *connect_timeout* seconds or rejects the handshake, and
        ValueError for a URL that is not ``ws://HOST…`` or ``wss://HOST…``.
        Leaving the block closes the connection; calls still waiting then raise
        :class:`JobsUnavailable`.
        """
        target = Target.parse(url, schemes=("ws", "wss"), what="jobs URL", token_sent=bool(token))
        headers = [(b"authorization", b"Bearer " + token.encode())] if token else []

        async def opener(nursery: trio.Nursery) -> JobsClient:
            ws, stream = await open_websocket(
                nursery, target, max_message_size=max_message_size, extra_headers=headers
            )
            return cls(ws, stream, target)

        async with run_client(target, connect_timeout, opener) as client:
            yield client

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._read_loop)
        nursery.start_soon(self._write_loop)

    @property
    def closed(self) -> bool:
        """True once the connection has failed or the client was closed."""
        return self._failure.failure is not None

    async def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """Call *method* with *params* and return the reply's ``result``.

        Raises :class:`RpcError` if the service answers with an error, and
        :class:`JobsUnavailable` if there is no connection or it is lost
        before the reply.
        """
        return await self.call_encoded(method, encode_params(params))

    async def call_encoded(self, method: str, params_json: str | Sequence[str]) -> Any:
        """Like :meth:`call`, with *params_json* already encoded as a JSON object.

        The text goes on the wire as it is; it may come in parts, sent one
        after the other (the pusher encodes each job once and never joins
        them: a batch of big jobs would be copied whole). It must be valid
        JSON, or the service answers with a parse error that no call can be
        matched to (see :class:`trismtp.jsonrpc.ClientProtocol`).
        """
        self._failure.check()
        params = [params_json] if isinstance(params_json, str) else params_json
        request_id, request = self._protocol.request_parts(method, params)
        slot = ReplySlot(trio.Event())
        self._pending[request_id] = slot
        try:
            try:
                await self._outbox.send(request)
            except trio.BrokenResourceError:
                self._failure.check()  # _fail() closed the writer's end
                raise
            await slot.done.wait()
        finally:
            self._pending.pop(request_id, None)
            self._protocol.forget(request_id)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _fail(self, failure: JobsUnavailable) -> None:
        """Stop for good: wake every waiting call with *failure*."""
        if not self._failure.trip(failure):
            return
        logger.debug("jobs RPC client stops: %s", failure)
        # Callers blocked handing a request to the writer get BrokenResourceError.
        self._outbox_receive.close()
        for slot in self._pending.values():
            slot.resolve(error=self._failure.copy())

    async def _aclose(self) -> None:
        self._fail(JobsUnavailable(f"the connection to {self._target} was closed by this client"))
        if trio.current_effective_deadline() != -math.inf:
            # Not being cancelled: the reader task still runs and will see
            # the service's close frame, so the handshake can complete.
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._ws.aclose()
        # The close handshake is done (or timed out); the socket goes now even
        # if the service closed first, when trio-websocket leaves it open.
        await trio.aclose_forcefully(self._stream)

    async def _write_loop(self) -> None:
        try:
            async for request in self._outbox_receive:
                await send_text(self._ws, request)
                # Not kept until the next request: it may be megabytes.
                del request
        except ConnectionClosed as exc:
            self._fail(self._lost(exc))
        except trio.ClosedResourceError:
            pass  # _fail() closed our end: the client is done

    async def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(await self._ws.get_message())
        except ConnectionClosed as exc:
            self._fail(self._lost(exc))
        except ProtocolError as exc:
            self._fail(JobsUnavailable(f"{self._target} sent an invalid reply: {exc}"))
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(1002, "invalid JSON-RPC reply")

    def _lost(self, exc: BaseException) -> JobsUnavailable:
        mapped = unavailable(exc, self._target)
        assert mapped is not None, exc
        return mapped

    def _dispatch(self, message: str | bytes) -> None:
        for reply in self._protocol.receive(message):
            slot = self._pending.pop(reply.id, None)
            if slot is not None:
                slot.resolve(result=reply.result, error=reply.error)
