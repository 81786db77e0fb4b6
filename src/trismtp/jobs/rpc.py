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

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from trismtp.jobs.websocket import (
    JobsUnavailable,
    Stream,
    Target,
    collapse,
    map_exceptions,
    open_websocket,
    send_text,
    unavailable,
)

__all__ = [
    "BATCH_EXPIRED",
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NO_SUCH_PIPELINE",
    "PARSE_ERROR",
    "STORAGE_UNAVAILABLE",
    "TOO_LARGE",
    "JobsClient",
    "JobsUnavailable",
    "RpcError",
]

logger = logging.getLogger(__name__)

# JSON-RPC 2.0 error codes, and the jobs service's own (SPEC §6).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
NO_SUCH_PIPELINE: Final = -32001
STORAGE_UNAVAILABLE: Final = -32003
TOO_LARGE: Final = -32004
# trismtp extension: PushBatch reached the store after its expires_at.
BATCH_EXPIRED: Final = -32005

DEFAULT_MAX_MESSAGE_SIZE: Final = 256 * 1024 * 1024
# Leaving the client waits this long for the close handshake, even when the
# caller is being cancelled, so the service sees a clean close.
CLOSE_TIMEOUT: Final = 2.0


class RpcError(Exception):
    """The jobs service answered the call with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (JSON-RPC error {self.code})"


class _BadReply(Exception):
    """The service sent something that is not a JSON-RPC 2.0 response."""


class _Slot:
    """Where the reader leaves the reply for one waiting call."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def resolve(self, *, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class JobsClient:
    """A JSON-RPC connection to the jobs service; open it with :meth:`connect`.

    Safe to share between tasks: calls may overlap and replies are matched to
    them by id. Once :attr:`closed`, every call raises :class:`JobsUnavailable`.
    """

    def __init__(self, ws: WebSocketConnection, stream: Stream, target: Target) -> None:
        self._ws = ws
        self._stream = stream
        self._target = target
        self._next_id = 1
        self._pending: dict[int, _Slot] = {}
        self._failure: JobsUnavailable | None = None
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
        body_error: BaseException | None = None
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                with map_exceptions(target), trio.fail_after(connect_timeout):
                    ws, stream = await open_websocket(
                        nursery, target, max_message_size=max_message_size, extra_headers=headers
                    )
                client = cls(ws, stream, target)
                nursery.start_soon(client._read_loop)
                nursery.start_soon(client._write_loop)
                try:
                    yield client
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    await client._aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = collapse(group, body_error=body_error, target=target)
        if error is not None:
            # Raised here, outside the except clause, so that the group does
            # not become the error's __context__.
            raise error

    @property
    def closed(self) -> bool:
        """True once the connection has failed or the client was closed."""
        return self._failure is not None

    async def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """Call *method* with *params* and return the reply's ``result``.

        Raises :class:`RpcError` if the service answers with an error, and
        :class:`JobsUnavailable` if there is no connection or it is lost
        before the reply.
        """
        return await self.call_encoded(
            method, json.dumps(params, ensure_ascii=False, separators=(",", ":"))
        )

    async def call_encoded(self, method: str, params_json: str | Sequence[str]) -> Any:
        """Like :meth:`call`, with *params_json* already encoded as a JSON object.

        The text goes on the wire as it is; it may come in parts, sent one
        after the other (the pusher encodes each job once and never joins
        them: a batch of big jobs would be copied whole). It must be valid
        JSON, or the service answers with a parse error that no call can be
        matched to (see :meth:`_deliver`).
        """
        self._raise_if_failed()
        request_id = self._next_id
        self._next_id += 1
        params = [params_json] if isinstance(params_json, str) else params_json
        request = [
            f'{{"jsonrpc":"2.0","id":{request_id},"method":{json.dumps(method)},"params":',
            *params,
            "}",
        ]
        slot = _Slot()
        self._pending[request_id] = slot
        try:
            try:
                await self._outbox.send(request)
            except trio.BrokenResourceError:
                self._raise_if_failed()  # _fail() closed the writer's end
                raise
            await slot.done.wait()
        finally:
            self._pending.pop(request_id, None)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure_copy()

    def _failure_copy(self) -> JobsUnavailable:
        # One instance per raise: tasks raising the same object concurrently
        # would tangle its traceback.
        assert self._failure is not None
        error = JobsUnavailable(str(self._failure), close_code=self._failure.close_code)
        error.__cause__ = self._failure.__cause__
        return error

    def _fail(self, failure: JobsUnavailable) -> None:
        """Stop for good: wake every waiting call with *failure*."""
        if self._failure is not None:
            return
        logger.debug("jobs RPC client stops: %s", failure)
        self._failure = failure
        # Callers blocked handing a request to the writer get BrokenResourceError.
        self._outbox_receive.close()
        for slot in self._pending.values():
            slot.resolve(error=self._failure_copy())

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
        except _BadReply as exc:
            self._fail(JobsUnavailable(f"{self._target} sent an invalid reply: {exc}"))
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(1002, "invalid JSON-RPC reply")

    def _lost(self, exc: BaseException) -> JobsUnavailable:
        mapped = unavailable(exc, self._target)
        assert mapped is not None, exc
        return mapped

    def _dispatch(self, message: str | bytes) -> None:
        try:
            data = json.loads(message)
        except (ValueError, RecursionError) as exc:
            raise _BadReply(f"not JSON ({exc})") from None
        for reply in data if isinstance(data, list) else [data]:
            self._deliver(reply)

    def _deliver(self, reply: Any) -> None:
        if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
            raise _BadReply("not a JSON-RPC 2.0 response object")
        reply_id = reply.get("id")
        if "error" in reply:
            error = _rpc_error(reply["error"])
            if reply_id is None:
                # The service could not tell which request this answers (it
                # could not parse one), so no call can be matched to it. Fail
                # every waiting call rather than let the culprit wait forever;
                # the others learn nothing about their fate either way.
                logger.error("the jobs service rejected a request it could not read: %s", error)
                for waiting in self._pending.values():
                    waiting.resolve(error=_rpc_error(reply["error"]))
                return
            result = None
        elif "result" in reply:
            error, result = None, reply["result"]
        else:
            raise _BadReply("a response needs a result or an error")
        slot = self._pending.pop(reply_id, None) if type(reply_id) is int else None
        if slot is None:
            # The caller gave up (was cancelled) before its reply came.
            logger.debug("reply to request %r, which no call waits for", reply_id)
            return
        slot.resolve(result=result, error=error)


def _rpc_error(error: Any) -> RpcError:
    if not isinstance(error, dict):
        raise _BadReply("an error must be an object")
    code, message = error.get("code"), error.get("message")
    if type(code) is not int or not isinstance(message, str):
        raise _BadReply("an error needs an integer code and a string message")
    return RpcError(code, message, error.get("data"))
