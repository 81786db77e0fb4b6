"""The bounds of one RPC connection: calls in flight, unsent replies, stalled sends.

Theory of operation
-------------------
A client controls how much the service holds for it in three ways, and each
has its own bound here, so that no client can run the service out of memory:

* **Calls being answered.** :class:`CallBudget` counts calls, not messages: a
  batch array of 50 calls takes 50 of the connection's ``MAX_IN_FLIGHT``
  permits. While the budget is spent, the connection's read loop stops
  reading, and TCP pushes back on the client.

* **Replies waiting to be sent.** A WebSocket send waits while the socket
  is full, so the replies of a client that does not read pile up in
  memory, each waiting its turn. :class:`ReplyOutbox` sends them
  one at a time (so only the reply on the wire has its WebSocket frame
  built) and counts the bytes of those waiting behind it. The calls whose
  replies carry jobs (Reserve, Peek: up to 16 MiB each) run at most a few at
  a time per connection and start only while less than ``max_unsent_bytes``
  wait (:meth:`ReplyOutbox.wait_for_room`). So what waits is bounded by
  ``max_unsent_bytes`` plus the replies of the calls already running, and a
  client that reads slowly is slowed down, not disconnected.

* **A send that makes no progress.** :class:`SendGuard` wraps the TCP stream
  under trio-websocket and sends in chunks, each under ``send_timeout``: a
  client that reads nothing for that long is dropped, with its calls not yet
  handed to the store, so what it holds is given back.

Dropping means resetting the TCP connection at once. A close frame cannot be
delivered to a peer that does not read, and a frame half sent cannot be
followed by another; the client sees the connection reset (1006 abnormal
closure) and the service logs why, with the code it would have sent (1008,
policy violation).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Final

import trio
from trio_websocket import WebSocketConnection

from trismtp.jobs.websocket import send_message

__all__ = ["CHUNK", "CallBudget", "ReplyOutbox", "SendGuard", "SendStalled"]

# Each chunk of a reply must leave within send_timeout; small enough that a
# client reading slowly but steadily is never taken for a stalled one.
CHUNK: Final = 64 * 1024


class CallBudget:
    """The calls a connection may have in flight; :meth:`acquire` waits for room."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, calls: int) -> None:
        """Take *calls* permits (at most the limit), waiting until they are free."""
        if calls > self._limit:
            raise ValueError(f"{calls} calls exceed the limit of {self._limit}")
        if self._used + calls <= self._limit:
            await trio.lowlevel.checkpoint()
        while self._used + calls > self._limit:
            await self._lot.park()
        self._used += calls

    def release(self, calls: int) -> None:
        """Give back *calls* permits."""
        self._used -= calls
        self._lot.unpark_all()


class SendStalled(trio.BrokenResourceError):
    """The peer read nothing for ``send_timeout`` seconds; the stream is closed."""


class SendGuard(trio.abc.Stream):
    """A TCP stream whose sends fail (:exc:`SendStalled`) when they make no progress.

    trio-websocket treats the failure as a broken network: every task waiting
    on the connection gets ``ConnectionClosed``.
    """

    def __init__(self, stream: trio.SocketStream, send_timeout: float) -> None:
        self.stream = stream
        self._send_timeout = send_timeout
        #: Set when a send stalled and the stream was closed because of it.
        self.stalled = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send *data*, a chunk at a time, each within the send timeout."""
        with memoryview(data) as view:
            for start in range(0, max(len(view), 1), CHUNK):
                with trio.move_on_after(self._send_timeout) as scope:
                    await self.stream.send_all(view[start : start + CHUNK])
                if scope.cancelled_caught:
                    self.stalled = True
                    await self.abort()
                    raise SendStalled(f"the peer read nothing for {self._send_timeout:g} s")

    async def abort(self) -> None:
        """Reset the connection: what is unsent is thrown away.

        A plain close would queue the FIN behind the unsent bytes, which a
        peer that does not read never takes: the kernel would keep them, and
        the peer would not learn that it was dropped.
        """
        with contextlib.suppress(OSError):
            linger = struct.pack("ii", 1, 0)
            self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await trio.aclose_forcefully(self.stream)

    async def wait_send_all_might_not_block(self) -> None:
        """As the wrapped stream's."""
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """As the wrapped stream's."""
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        """Close the wrapped stream."""
        await self.stream.aclose()


class ReplyOutbox:
    """A connection's replies, sent in turn; tells when too many bytes wait."""

    def __init__(self, ws: WebSocketConnection, max_unsent_bytes: int) -> None:
        self._ws = ws
        self._limit = max_unsent_bytes
        self._lock = trio.StrictFIFOLock()
        self._waiting = 0  # bytes of the replies queued behind the one being sent
        self._room = trio.lowlevel.ParkingLot()

    @property
    def waiting_bytes(self) -> int:
        """Bytes of the replies waiting behind the one being sent."""
        return self._waiting

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_unsent_bytes`` wait unsent (at once if so)."""
        await trio.lowlevel.checkpoint()
        while self._waiting >= self._limit:
            await self._room.park()

    async def send(self, reply: str | bytes) -> None:
        """Send *reply* after those before it; raises what ``send_message`` raises."""
        size = len(reply)
        self._waiting += size
        try:
            async with self._lock:
                self._waiting -= size
                size = 0
                self._room.unpark_all()
                await send_message(self._ws, reply)
        finally:
            if size:  # cancelled while waiting
                self._waiting -= size
                self._room.unpark_all()
