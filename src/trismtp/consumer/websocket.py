"""A WebSocket client on anyio streams: wsproto's state machine, our I/O.

Why wsproto over anyio streams (and not httpx-ws, websockets, aiohttp)
----------------------------------------------------------------------
The consumer must run unchanged under asyncio and trio, so its socket code is
written against anyio alone. wsproto (python-hyper, the authors of h11) is a
sans-io WebSocket implementation: it never touches a socket, so it runs on
any event loop, and it is the protocol engine trio-websocket already uses for
the pusher, so both of trismtp's clients speak the same WebSocket code and
the package gains no dependency but anyio. httpx-ws would also work under
anyio, but brings httpx and httpcore along for one GET with an Upgrade
header, and hides the stream we want to close ourselves on a rejected
handshake. websockets and aiohttp are asyncio-only.

What this adapter adds to wsproto: the TCP (or TLS) stream from
``anyio.connect_tcp``, the handshake with an ``Authorization`` header, the
reassembly of fragmented messages with a size limit (close code 1009 beyond
it, as trio-websocket does), answers to pings, and the close handshake.
Every failure becomes :class:`~trismtp.jobs.websocket.JobsUnavailable`, the
same exception the trio client raises, with the same wording.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Final

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from trismtp.jobs.websocket import JobsUnavailable, Target, unavailable

__all__ = ["HandshakeRejected", "WebSocket", "open_websocket"]

RECEIVE_BUFFER_SIZE: Final = 64 * 1024
CLOSE_TIMEOUT: Final = 2.0
_CLOSE_TOO_BIG: Final = 1009


class HandshakeRejected(JobsUnavailable):
    """The server answered the WebSocket handshake with an HTTP error."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        #: The HTTP status of the refusal (401: token missing or refused).
        self.status_code = status_code


class WebSocket:
    """One open client WebSocket; text and binary messages in, text out.

    Not safe for concurrent senders or concurrent receivers: the RPC client
    has one writer task and one reader task.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        connection: WSConnection,
        target: Target,
        max_message_size: int,
    ) -> None:
        self._stream = stream
        self._ws = connection
        self._target = target
        self._max_message_size = max_message_size
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        self._ready: list[str | bytes] = []
        self.close_code: int | None = None
        # The writer sends messages while the reader answers pings: one at a
        # time, or anyio refuses (BusyResourceError) and frames could mix.
        self._send_lock = anyio.Lock()

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send(data)

    async def send(self, text: str) -> None:
        """Send one text message whole."""
        with _mapped(self._target):
            await self._send(self._ws.send(TextMessage(data=text)))

    async def receive(self) -> str | bytes:
        """The next whole message; raises JobsUnavailable once the connection ends."""
        while not self._ready:
            with _mapped(self._target):
                try:
                    data = await self._stream.receive(RECEIVE_BUFFER_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = None
                self._ws.receive_data(data)
                await self._handle_events()
            if data is None and not self._ready:
                raise self._closed(1006, "")
        return self._ready.pop(0)

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_message_size:
                    await self.aclose(_CLOSE_TOO_BIG, "message too big")
                    raise self._closed(_CLOSE_TOO_BIG, "")
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts = self._parts, []
                    if isinstance(event, TextMessage):
                        self._ready.append("".join(p for p in parts if isinstance(p, str)))
                    else:
                        self._ready.append(b"".join(p for p in parts if not isinstance(p, str)))
                    self._size = 0
            elif isinstance(event, Ping):
                await self._send(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send(self._ws.send(event.response()))
                raise self._closed(event.code, event.reason or "")

    def _closed(self, code: int, reason: str) -> JobsUnavailable:
        self.close_code = code
        if code == _CLOSE_TOO_BIG:
            why = f"a message was larger than the receiver accepts (close code 1009{reason})"
        elif code == 1001:
            why = "the server is going away (close code 1001)"
        elif code == 1006:
            why = "the connection dropped (close code 1006)"
        else:
            why = f"closed with code {code}" + (f": {reason}" if reason else "")
        return JobsUnavailable(f"lost the connection to {self._target}: {why}", close_code=code)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake (if still open); the stream is closed by the owner."""
        if self._ws.state is ConnectionState.OPEN:
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def wait_closed(self) -> None:
        """After :meth:`aclose`: read until the server's close frame (or EOF)."""
        while self._ws.state is not ConnectionState.CLOSED:
            try:
                data = await self._stream.receive(RECEIVE_BUFFER_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            except OSError:
                return
            self._ws.receive_data(data)
            for _event in self._ws.events():
                pass  # replies still on their way are not wanted any more


@asynccontextmanager
async def open_websocket(
    target: Target,
    *,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    connect_timeout: float = 10.0,
) -> AsyncIterator[WebSocket]:
    """Connect to *target* and complete the handshake; close it all on leaving."""
    with _mapped(target):
        with anyio.fail_after(connect_timeout):
            if target.tls:
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                    target.host,
                    target.port,
                    tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    tls_hostname=target.host,
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(target.host, target.port)
    try:
        with _mapped(target):
            with anyio.fail_after(connect_timeout):
                ws = await _handshake(stream, target, max_message_size, extra_headers)
        try:
            yield ws
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose()
                await ws.wait_closed()
    finally:
        await anyio.aclose_forcefully(stream)


async def _handshake(
    stream: anyio.abc.ByteStream,
    target: Target,
    max_message_size: int,
    extra_headers: Sequence[tuple[bytes, bytes]],
) -> WebSocket:
    connection = WSConnection(ConnectionType.CLIENT)
    await stream.send(
        connection.send(
            Request(
                host=target.host_header,
                target=target.resource,
                extra_headers=list(extra_headers),
            )
        )
    )
    ws = WebSocket(stream, connection, target, max_message_size)
    while True:
        try:
            data: bytes | None = await stream.receive(RECEIVE_BUFFER_SIZE)
        except anyio.EndOfStream:
            data = None
        connection.receive_data(data)
        for event in connection.events():
            if isinstance(event, AcceptConnection):
                # Bytes after the 101 (a message sent at once) are already in
                # wsproto's buffer; receive() hands them out first.
                await ws._handle_events()
                return ws
            if isinstance(event, RejectConnection):
                raise _rejected(event.status_code, target)
        if data is None:
            raise JobsUnavailable(f"cannot connect to {target}: closed during the handshake")


def _rejected(status: int, target: Target) -> HandshakeRejected:
    if status == 401 and target.token_sent:
        text = f"{target} refused the token (HTTP 401)"
    elif status == 401:
        text = f"{target} requires a token (HTTP 401) and none was given"
    else:
        text = f"{target} rejected the WebSocket handshake with HTTP {status}"
    return HandshakeRejected(text, status_code=status)


@contextmanager
def _mapped(target: Target) -> Iterator[None]:
    """anyio's, the OS's and wsproto's exceptions as JobsUnavailable."""
    try:
        yield
    except JobsUnavailable:
        raise
    except TimeoutError as exc:
        raise JobsUnavailable(f"timed out connecting to {target}") from exc
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream) as exc:
        raise JobsUnavailable(f"lost the connection to {target}") from exc
    except (LocalProtocolError, RemoteProtocolError) as exc:
        raise JobsUnavailable(f"{target} broke the WebSocket protocol: {exc}") from exc
    except OSError as exc:  # ssl.SSLError too
        # anyio says "All connection attempts failed" and chains the reason
        # (Connection refused, …) when there was one address: show that.
        cause = exc.__cause__
        reason = cause if not exc.strerror and isinstance(cause, OSError) else exc
        if reason.errno and not isinstance(reason, ssl.SSLError):
            # asyncio words ECONNREFUSED "Connect call failed (…)"; trio as the OS does.
            text = f"cannot connect to {target}: {os.strerror(reason.errno)}"
            raise JobsUnavailable(text) from exc
        mapped = unavailable(reason, target)
        assert mapped is not None
        raise mapped from exc
