"""The client side of a WebSocket connection, shared by the jobs RPC and NATS clients.

Both clients (:mod:`trismtp.jobs.rpc`, :mod:`trismtp.nats`) open a
WebSocket the same way and must report its failures the same way: every
transport problem becomes one :class:`JobsUnavailable` whose message names
the server (never a secret from the URL) and says what went wrong. This
module is that one place: the parsed target, the opening of the stream and
handshake, the translation of trio, trio-websocket and OS errors, and
:func:`run_client`, the life of a client whose connection needs tasks of its
own (a reader, a writer) beside the callers.

It also writes the data frames of big messages itself, for both ends:
:func:`send_text` (the pusher's requests, fragmented and masked) and
:func:`send_message` (the jobs service's replies), with frame masking in C
(:mod:`trismtp.wsmask`, installed when this module loads).
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from trismtp import wsmask

__all__ = [
    "FRAGMENT_CHARS",
    "RECEIVE_BUFFER_SIZE",
    "FailureLatch",
    "JobsUnavailable",
    "PeerProtocolError",
    "Stream",
    "Target",
    "collapse",
    "frame_header",
    "map_exceptions",
    "open_websocket",
    "run_client",
    "send_message",
    "send_text",
    "unavailable",
]

# Frames are masked in C from here on: a big PushBatch is ~25 MB to mask.
wsmask.install()

# trio-websocket reads 4 KiB at a time by default; batches are megabytes.
RECEIVE_BUFFER_SIZE: Final = 64 * 1024

_CLOSE_TOO_BIG: Final = 1009

# A text message longer than this goes out in frames of this many characters.
FRAGMENT_CHARS: Final = 1024 * 1024

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class JobsUnavailable(Exception):
    """Cannot reach where jobs go, or lost it before the reply.

    Raised when the connection is refused or fails, the handshake is rejected
    (HTTP 401: the message says the token was refused or missing), or the
    connection is lost while calls wait. Whether the request took effect is
    unknown; requests keyed by job id are safe to repeat on a new connection.
    """

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        #: The WebSocket close code when the connection was closed, else None
        #: (1009: a message was larger than the receiver accepts).
        self.close_code = close_code


class PeerProtocolError(Exception):
    """The server sent something its protocol does not allow."""

    protocol = "its"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client connects, parsed once; ``str()`` is safe to log."""

    scheme: str
    host: str  # for the TCP connection: IPv6 without brackets
    port: int
    host_header: str  # for the Host header: IPv6 in brackets, port unless default
    resource: str  # path and query
    tls: bool
    token_sent: bool = False

    @classmethod
    def parse(
        cls, url: str, *, schemes: tuple[str, str], what: str, token_sent: bool = False
    ) -> Target:
        """Parse ``url``, whose scheme must be ``schemes`` (plain, TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            raise ValueError(f"{what} {url!r} must start with {schemes[0]}:// or {schemes[1]}://")
        host = parts.hostname
        if not host:
            raise ValueError(f"{what} {url!r} has no host")
        tls = parts.scheme == schemes[1]
        default_port = 443 if tls else 80
        try:
            port = parts.port or default_port
        except ValueError:
            raise ValueError(f"{what} {url!r} has an invalid port") from None
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if port == default_port else f"{bracketed}:{port}"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, host, port, host_header, resource, tls, token_sent)

    def __str__(self) -> str:
        # No user info and no query string: either may hold a secret.
        return f"{self.scheme}://{self.host_header}{self.resource.partition('?')[0]}"


async def open_websocket(
    nursery: trio.Nursery,
    target: Target,
    *,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[WebSocketConnection, Stream]:
    """The stream and the WebSocket over it; ``ssl_context`` for ``tls`` targets."""
    # We open the stream ourselves rather than through connect_websocket_url:
    # we must close it ourselves (trio-websocket leaves it open when the
    # handshake is refused or the peer closes first), and an IPv6 Host header
    # needs its brackets.
    stream: Stream
    if target.tls:
        stream = await trio.open_ssl_over_tcp_stream(
            target.host,
            target.port,
            ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True,
        )
    else:
        stream = await trio.open_tcp_stream(target.host, target.port)
    try:
        ws = await wrap_client_stream(
            nursery,
            stream,
            target.host_header,
            target.resource,
            extra_headers=list(extra_headers),
            max_message_size=max_message_size,
            receive_buffer_size=RECEIVE_BUFFER_SIZE,
        )
    except BaseException:
        # A rejection arrives here as Cancelled: trio-websocket's reader task
        # raised ConnectionRejected into the nursery.
        await trio.aclose_forcefully(stream)
        raise
    return ws, stream


def unavailable(exc: BaseException, target: Target) -> JobsUnavailable | None:
    """The :class:`JobsUnavailable` that *exc* means, or None if it is no
    connection problem. The one place backend exceptions are translated."""
    close_code = None
    if isinstance(exc, JobsUnavailable):
        return exc
    if isinstance(exc, ConnectionRejected):
        if exc.status_code == 401 and target.token_sent:
            text = f"{target} refused the token (HTTP 401)"
        elif exc.status_code == 401:
            text = f"{target} requires a token (HTTP 401) and none was given"
        else:
            text = f"{target} rejected the WebSocket handshake with HTTP {exc.status_code}"
    elif isinstance(exc, ConnectionTimeout | trio.TooSlowError):
        text = f"timed out connecting to {target}"
    elif isinstance(exc, HandshakeError):
        text = f"cannot connect to {target}: {exc.__cause__ or exc!r}"
    elif isinstance(exc, ConnectionClosed):
        close_code = exc.reason.code if exc.reason is not None else None
        text = f"lost the connection to {target}: {_describe_close(exc)}"
    elif isinstance(exc, PeerProtocolError):
        text = f"{target} broke the {exc.protocol} protocol: {exc}"
    elif isinstance(exc, OSError):
        text = f"cannot connect to {target}: {_os_reason(exc)}"
    elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        text = f"lost the connection to {target}"
    else:
        return None
    error = JobsUnavailable(text, close_code=close_code)
    error.__cause__ = exc
    return error


def _describe_close(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "the connection is closed"
    detail = f": {reason.reason}" if reason.reason else ""
    if reason.code == _CLOSE_TOO_BIG:
        return f"a message was larger than the receiver accepts (close code 1009{detail})"
    if reason.code == 1001:
        return "the server is going away (close code 1001)"
    if reason.code == 1006:
        return "the connection dropped (close code 1006)"
    return f"closed with code {reason.code} {reason.name}{detail}"


def _os_reason(exc: OSError) -> str:
    """Why a connect failed: trio says "all attempts … failed" and keeps the
    reasons in the group it chains; show the first, without the address each
    of them repeats (the caller names the target once)."""
    if isinstance(exc, ssl.SSLError):
        # Its errno is OpenSSL's error kind, not an errno: strerror(1) would
        # say "Operation not permitted" for a certificate that fails to verify.
        return str(exc)
    if exc.errno:
        return os.strerror(exc.errno)
    if exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if isinstance(inner, OSError) and inner.errno:
                return os.strerror(inner.errno)
            if isinstance(inner, OSError) and inner.strerror:
                return inner.strerror
    return str(exc)


@contextmanager
def map_exceptions(target: Target) -> Iterator[None]:
    """Raise the :class:`JobsUnavailable` that an exception inside means."""
    try:
        yield
    except Exception as exc:  # Cancelled is a BaseException and passes untouched
        mapped = unavailable(exc, target)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc


def collapse(
    group: BaseExceptionGroup[BaseException], *, body_error: BaseException | None, target: Target
) -> BaseException:
    """The one exception a caller of a client's ``connect()`` should see.

    The client's nursery wraps everything in a group; callers want the error
    itself: theirs unchanged, ours translated. Several real errors at once
    mean a bug, and stay grouped.
    """
    errors = [exc for exc in group.exceptions if not isinstance(exc, trio.Cancelled)]
    if not errors:
        return group.exceptions[0]
    if len(errors) > 1:
        return group
    (error,) = errors
    if error is body_error:
        return error
    return unavailable(error, target) or error


async def send_text(ws: WebSocketConnection, parts: Sequence[str]) -> None:
    """Send the concatenation of ``parts`` as one text message (client side).

    A long message goes out in frames of at most :data:`FRAGMENT_CHARS`
    (RFC 6455 §5.4 fragmentation), each encoded and masked on its own. Sent
    whole, a 40 MB batch was joined, put in a request, encoded to UTF-8,
    copied into a frame and masked: five copies at once, the largest share
    of what a big message cost in memory. The receiver sees one message.
    Raises what ``send_message`` raises (ConnectionClosed).
    """
    if sum(map(len, parts)) <= FRAGMENT_CHARS:
        await _send_frame(ws, "".join(parts).encode(), opcode=_TEXT, finished=True)
        return
    previous: str | None = None
    opcode = _TEXT
    for fragment in _fragments(parts, FRAGMENT_CHARS):
        if previous is not None:
            await _send_frame(ws, previous.encode(), opcode=opcode, finished=False)
            opcode = _CONTINUATION
        previous = fragment
    await _send_frame(ws, (previous or "").encode(), opcode=opcode, finished=True)


# RFC 6455 §5.2: opcodes, and the bits of a frame's first two bytes.
_TEXT: Final = 0x1
_CONTINUATION: Final = 0x0
_FIN: Final = 0x80
_MASKED: Final = 0x80
# Frames longer than this go out as header and payload in two writes, not
# copied into one buffer.
_SEPARATE_HEADER: Final = 64 * 1024


def frame_header(opcode: int, *, finished: bool, length: int, key: bytes = b"") -> bytes:
    """The header of a frame of *length* payload bytes (RFC 6455 §5.2).

    With a 4-byte *key*, a masked (client) frame's, key included; without,
    a server frame's.
    """
    first = opcode | (_FIN if finished else 0)
    masked = _MASKED if key else 0
    if length < 126:
        return bytes((first, masked | length)) + key
    if length < 1 << 16:
        return struct.pack("!BBH", first, masked | 126, length) + key
    return struct.pack("!BBQ", first, masked | 127, length) + key


async def send_message(ws: WebSocketConnection, text: str | bytes) -> None:
    """Send *text* (or its UTF-8) as one text message in one frame, like
    ``ws.send_message``.

    For the service's replies (a Reserve's may be 16 MiB): built here, the
    frame is the reply's UTF-8 and a header, where trio-websocket's path
    would hold four more copies of it at once.
    """
    payload = text if isinstance(text, bytes) else text.encode()
    await _send_frame(ws, payload, opcode=_TEXT, finished=True)


async def _send_frame(
    ws: WebSocketConnection, payload: bytes, *, opcode: int, finished: bool
) -> None:
    """Send one data frame of a message we send whole, frame after frame.

    We build the frame ourselves rather than through ``ws._send(TextMessage)``:
    wsproto copies a frame's payload five times on the way out (into a
    bytearray, into the masker, out of it, into the frame, into the bytes it
    returns), and a big frame's copies are alive at once (bench/wspath.py:
    ~30 ms less CPU for a Peek answered with a 22 MB job, a few ms for a
    PushBatch of one). Here a client's payload is masked once
    (:func:`trismtp.wsmask.mask`, a fresh key from ``os.urandom`` per frame
    as RFC 6455 §5.3 asks; a server's frames are not masked) and written as
    it is.

    What this relies on in trio-websocket (pinned; the tests send through
    it): the stream and its lock, held per frame like its own ``_send``, and
    ``_abort_web_socket`` for a broken stream. wsproto's state is untouched:
    it never sees these frames, and our writers send one message at a time,
    all of it, so fragments of two messages never interleave (control frames
    from trio-websocket may, as RFC 6455 allows). Raises ConnectionClosed, as
    ``send_message`` does.
    """
    if ws.closed is not None:
        raise ConnectionClosed(ws.closed)
    if ws.is_client:
        key = os.urandom(4)
        header = frame_header(opcode, finished=finished, length=len(payload), key=key)
        payload = wsmask.mask(payload, key)
    else:
        header = frame_header(opcode, finished=finished, length=len(payload))
    async with ws._stream_lock:
        if ws.closed is not None:  # a close frame went out while we waited
            raise ConnectionClosed(ws.closed)
        try:
            if len(payload) < _SEPARATE_HEADER:
                await ws._stream.send_all(header + payload)
            else:
                await ws._stream.send_all(header)
                await ws._stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            assert ws.closed is not None
            raise ConnectionClosed(ws.closed) from None


def _fragments(parts: Iterable[str], size: int) -> Iterator[str]:
    """The text of ``parts`` cut or joined into pieces of ``size`` characters (the last shorter)."""
    buffer: list[str] = []
    buffered = 0
    for part in parts:
        start = 0
        while start < len(part):
            take = min(len(part) - start, size - buffered)
            buffer.append(part[start : start + take])
            buffered += take
            start += take
            if buffered >= size:
                yield "".join(buffer)
                buffer.clear()
                buffered = 0
    if buffer:
        yield "".join(buffer)


class FailureLatch:
    """Why a client stopped for good: set once, then raised afresh to every caller.

    Each caller gets its own copy: tasks raising one exception object
    concurrently would tangle its traceback.
    """

    __slots__ = ("_failure",)

    def __init__(self) -> None:
        self._failure: JobsUnavailable | None = None

    @property
    def failure(self) -> JobsUnavailable | None:
        """The failure, once the client stopped."""
        return self._failure

    def trip(self, failure: JobsUnavailable) -> bool:
        """Stop with *failure*; False if already stopped (the first reason stays)."""
        if self._failure is not None:
            return False
        self._failure = failure
        return True

    def copy(self) -> JobsUnavailable:
        """A fresh exception saying what the failure says."""
        assert self._failure is not None
        error = JobsUnavailable(str(self._failure), close_code=self._failure.close_code)
        error.__cause__ = self._failure.__cause__
        return error

    def check(self) -> None:
        """Raise a copy of the failure if the client stopped."""
        if self._failure is not None:
            raise self.copy()


class _Client(Protocol):
    """What :func:`run_client` needs of a client."""

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """Start the tasks the connection needs (reader, writer) in *nursery*."""

    async def _aclose(self) -> None:
        """Fail the calls still waiting and close the connection."""


_C = TypeVar("_C", bound=_Client)


@asynccontextmanager
async def run_client(
    target: Target,
    timeout: float,  # noqa: ASYNC109
    opener: Callable[[trio.Nursery], Awaitable[_C]],
) -> AsyncIterator[_C]:
    """A client open for the block: *opener* connects it (within *timeout*
    seconds), its tasks run in a nursery of their own, and leaving the block
    closes it.

    The nursery is what structured concurrency asks for, and what callers
    should not see: failures of the connection come out as one
    :class:`JobsUnavailable` (:func:`map_exceptions`, :func:`collapse`), the
    block's own exception unchanged, never an exception group.
    """
    body_error: BaseException | None = None
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            with map_exceptions(target), trio.fail_after(timeout):
                client = await opener(nursery)
            client._start_tasks(nursery)
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
        # Raised here, outside the except clause, so that the group does not
        # become the error's __context__.
        raise error
