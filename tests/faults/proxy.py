"""A TCP proxy between the pusher and the jobs service that can lose acks on command.

Theory of operation
===================

:class:`FaultProxy` listens on 127.0.0.1 (a free port) and, for every
connection the daemon opens, opens one to the jobs service and pumps bytes
both ways. It also *reads* what passes: a small WebSocket frame decoder per
direction (skipping the HTTP handshake; trio-websocket negotiates no
extensions, so frames are plain, client frames masked) turns the traffic into
JSON-RPC requests and responses. That is how the suite knows which job ids a
``jobs.PushBatch`` carried and whether the service answered it with success.

:meth:`FaultProxy.lose_acks` is the fault: on every open connection it keeps
forwarding daemon → service, but swallows service → daemon; once the service
has answered at least one PushBatch with success (which the daemon therefore
never sees), and after a further *hold* seconds, it closes both sides. The
batch was committed but its ack was lost; the pusher must reconnect and send
the same ids again, which the service takes as a success that stores nothing
new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Final

import trio

__all__ = ["FaultProxy", "RpcRequest", "RpcResponse"]

HOST: Final = "127.0.0.1"
READ_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class RpcRequest:
    """A JSON-RPC request the daemon sent, as seen by the proxy."""

    link: int
    at: float
    id: Any
    method: str
    job_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RpcResponse:
    """A JSON-RPC response of the service, as seen by the proxy."""

    link: int
    at: float
    id: Any
    ok: bool
    swallowed: bool


class _FrameDecoder:
    """Incremental: HTTP head first, then WebSocket frames → complete messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._in_http = True
        self._fragments = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages: list[bytes] = []
        if self._in_http:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return messages
            del self._buffer[: end + 4]
            self._in_http = False
        while True:
            frame = self._next_frame()
            if frame is None:
                return messages
            fin, opcode, payload = frame
            if opcode >= 8:  # close, ping, pong
                continue
            self._fragments += payload
            if fin:
                messages.append(bytes(self._fragments))
                self._fragments.clear()

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        fin = bool(buf[0] & 0x80)
        opcode = buf[0] & 0x0F
        masked = bool(buf[1] & 0x80)
        length = buf[1] & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[2:4], "big")
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = int.from_bytes(buf[2:10], "big")
            pos = 10
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask = bytes(buf[pos : pos + 4])
            pos += 4
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos : pos + length])
        del buf[: pos + length]
        if masked and payload:
            key = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                length, "big"
            )
        return fin, opcode, payload


@dataclass(eq=False)
class _Link:
    number: int
    client: trio.SocketStream
    server: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    swallow: bool = False
    up: _FrameDecoder = field(default_factory=_FrameDecoder)
    down: _FrameDecoder = field(default_factory=_FrameDecoder)


def _decode_json(message: bytes) -> list[dict[str, Any]]:
    try:
        data = json.loads(message)
    except ValueError:
        return []
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


class FaultProxy:
    """See the module docstring. Run :meth:`run` with ``nursery.start``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.requests: list[RpcRequest] = []
        self.responses: list[RpcResponse] = []
        self.links_opened = 0
        self._links: set[_Link] = set()
        self._numbers = count(1)
        self._ack_swallowed = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/rpc"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and proxy until cancelled; ``started`` with the port."""
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(self.port)

    async def _serve(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(HOST, self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        link = _Link(next(self._numbers), client, server)
        self.links_opened += 1
        self._links.add(link)
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_up, link, nursery.cancel_scope)
                    nursery.start_soon(self._pump_down, link, nursery.cancel_scope)
        finally:
            self._links.discard(link)
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)

    async def _pump_up(self, link: _Link, scope: trio.CancelScope) -> None:
        """daemon → service: always forwarded; requests recorded."""
        try:
            while chunk := await link.client.receive_some(READ_SIZE):
                now = trio.current_time()
                for message in link.up.feed(chunk):
                    for item in _decode_json(message):
                        params = item.get("params")
                        jobs = params.get("jobs", []) if isinstance(params, dict) else []
                        ids = tuple(
                            str(job["id"]) for job in jobs if isinstance(job, dict) and "id" in job
                        )
                        self.requests.append(
                            RpcRequest(
                                link.number, now, item.get("id"), str(item.get("method")), ids
                            )
                        )
                await link.server.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async def _pump_down(self, link: _Link, scope: trio.CancelScope) -> None:
        """service → daemon: recorded; forwarded unless the link swallows."""
        try:
            while chunk := await link.server.receive_some(READ_SIZE):
                now = trio.current_time()
                for message in link.down.feed(chunk):
                    for item in _decode_json(message):
                        ok = "result" in item
                        self.responses.append(
                            RpcResponse(link.number, now, item.get("id"), ok, link.swallow)
                        )
                        if ok and link.swallow:
                            self._ack_swallowed.set()
                if not link.swallow:
                    await link.client.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    def _lost_push_acks(self, links: set[int]) -> list[RpcResponse]:
        pushes = {(r.link, r.id) for r in self.requests if r.method == "jobs.PushBatch"}
        return [
            r
            for r in self.responses
            if r.swallowed and r.ok and r.link in links and (r.link, r.id) in pushes
        ]

    async def lose_acks(self, hold: float, within: float = 5.0) -> int:
        """The fault (see the module doc); returns how many PushBatch acks were lost.

        Fails if no PushBatch was answered within *within* s of swallowing.
        """
        links = set(self._links)
        assert links, "the daemon has no connection through the proxy"
        self._ack_swallowed = trio.Event()
        for link in links:
            link.swallow = True
        numbers = {link.number for link in links}
        with trio.move_on_after(within):
            await self._ack_swallowed.wait()
        lost = len(self._lost_push_acks(numbers))
        assert lost, f"no PushBatch was answered within {within:g} s of swallowing"
        await trio.sleep(hold)  # the fault's duration: the pusher waits for an ack that is gone
        for link in links:
            link.scope.cancel()
        return len(self._lost_push_acks(numbers))

    def resent_after_lost_ack(self) -> tuple[set[str], set[str]]:
        """(ids whose ack was lost, those of them sent again in a later PushBatch)."""
        lost_ids: set[str] = set()
        lost_at: dict[str, float] = {}
        swallowed = {(r.link, r.id): r for r in self.responses if r.swallowed and r.ok}
        for request in self.requests:
            if request.method == "jobs.PushBatch" and (request.link, request.id) in swallowed:
                for job_id in request.job_ids:
                    lost_ids.add(job_id)
                    lost_at[job_id] = request.at
        resent = {
            job_id
            for request in self.requests
            if request.method == "jobs.PushBatch"
            for job_id in request.job_ids
            if job_id in lost_at and request.at > lost_at[job_id]
        }
        return lost_ids, resent
