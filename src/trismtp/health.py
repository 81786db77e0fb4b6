"""The observability endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

Theory of operation
===================

:func:`serve_metrics` listens on ``metrics.listen`` and answers one GET per
connection, then closes it (``Connection: close``). That is all a Prometheus
scraper or a load balancer's health check needs, and it keeps the server
small: no keep-alive, no request bodies, no streaming. h11 does the parsing,
so the protocol details (framing, header limits, malformed input) are not
ours to get wrong.

* ``/metrics``: the text exposition of the daemon's own registry
  (:class:`~trismtp.metrics.Metrics`), with ``CONTENT_TYPE_LATEST``.
* ``/healthz``: ``200 ok`` while the process runs its event loop; nothing
  else is checked, so a supervisor restarts the process only when it is wedged.
* ``/readyz``: ``200 ready`` when the daemon takes mail and delivers it,
  else ``503`` and one line saying why (the daemon's ``not_ready`` callback:
  still starting, shutting down, no connection to the jobs service).
* Any other path ``404``, any other method ``405``.

The endpoint must not be a way to hurt the daemon, which it shares an event
loop with: the request line and headers are bounded (``431`` past
``max_request_bytes``), a request must arrive within ``read_timeout``
(``408``), malformed ones get ``400``, and at most :data:`MAX_CONNECTIONS`
are served at once (more are closed at once). Scraping runs in the event
loop, not a thread, because the gauges read live state (sessions open, jobs
queued) that is not thread-safe; rendering the page takes about half a
millisecond, once per scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from trismtp.metrics import merge_expositions
from trismtp.settings import HostPort

__all__ = ["MAX_CONNECTIONS", "NotReady", "serve_metrics"]

log = logging.getLogger("trismtp.metrics")

NotReady = Callable[[], str | None]
"""Returns None when the daemon is ready, else one line saying why it is not."""

OtherMetrics = Callable[[], Awaitable[list[str]]]
"""The other worker processes' expositions, added into ``/metrics``."""

# A GET's request line and headers: a scraper's take a few hundred bytes.
MAX_REQUEST_BYTES = 8192
# Seconds a client gets to send its whole request.
READ_TIMEOUT = 10.0
# Seconds to send a response (a slow reader must not hold a connection).
SEND_TIMEOUT = 10.0
# Seconds a closed response's connection is drained; see _close.
CLOSE_TIMEOUT = 1.0
# Connections served at once; more are closed without an answer.
MAX_CONNECTIONS = 32
READ_SIZE = 4096


async def serve_metrics(
    address: HostPort,
    registry: CollectorRegistry,
    not_ready: NotReady,
    *,
    others: OtherMetrics | None = None,
    read_timeout: float = READ_TIMEOUT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoint on ``address`` until cancelled; reports the bound address."""
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"metrics cannot listen on {address}: {reason}") from exc
    host, port = listeners[0].socket.getsockname()[:2]
    bound = HostPort(str(host), int(port))
    server = _HttpServer(registry, not_ready, read_timeout, max_request_bytes, others)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        log.info("metrics and health checks on http://%s (/metrics, /healthz, /readyz)", bound)
        task_status.started(bound)


class _HttpServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        not_ready: NotReady,
        read_timeout: float,
        max_request_bytes: int,
        others: OtherMetrics | None = None,
    ) -> None:
        self._others = others
        self._registry = registry
        self._not_ready = not_ready
        self._read_timeout = read_timeout
        self._max_request_bytes = max_request_bytes
        self._open = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        if self._open >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_request_bytes)
            response = await self._answer(stream, conn)
            if response is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(response.encode(conn))
                    await _close(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics connection lost: %s", exc)
        except Exception:
            # A bug here must not take the SMTP side down with it: this task
            # runs in the daemon's nursery.
            log.exception("metrics endpoint failed to answer a request")
        finally:
            self._open -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection) -> _Response | None:
        """Read the request and work out the response; None: say nothing."""
        with trio.move_on_after(self._read_timeout):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    return _Response.error(exc.error_status_hint)
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(READ_SIZE))
                elif isinstance(event, h11.Request):
                    return await self._route(event)
                else:  # the client closed before sending a request
                    return None
        return _Response.error(408)

    async def _route(self, request: h11.Request) -> _Response:
        path = request.target.partition(b"?")[0]
        if request.method != b"GET":
            response = _Response(
                405, b"Method Not Allowed: GET only\n", head=request.method == b"HEAD"
            )
        elif path == b"/metrics":
            others = await self._others() if self._others is not None else []
            page = merge_expositions(self._registry, others)
            response = _Response(200, page, CONTENT_TYPE_LATEST)
        elif path == b"/healthz":
            response = _Response(200, b"ok\n")
        elif path == b"/readyz":
            reason = self._not_ready()
            if reason is None:
                response = _Response(200, b"ready\n")
            else:
                line = " ".join(reason.split())  # one line, whatever the reason held
                response = _Response(503, f"not ready: {line}\n".encode())
        else:
            response = _Response.error(404)
        log.debug(
            "%s %s %d",
            request.method.decode("ascii", "replace"),
            request.target.decode("ascii", "replace"),
            response.status,
        )
        return response


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    head: bool = False
    """Answering HEAD: the headers of the full response, without its body."""

    @classmethod
    def error(cls, status: int) -> _Response:
        return cls(status, f"{HTTPStatus(status).phrase}\n".encode())

    def encode(self, conn: h11.Connection) -> bytes:
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
        if self.status == 405:
            headers.append(("Allow", "GET"))
        phrase = HTTPStatus(self.status).phrase.encode()
        data = conn.send(h11.Response(status_code=self.status, headers=headers, reason=phrase))
        if not self.head:
            data += conn.send(h11.Data(data=self.body))
        return data + conn.send(h11.EndOfMessage())


async def _close(stream: trio.SocketStream) -> None:
    """Half-close, then read what the client still sends until it closes.

    Closing a socket with unread input makes the kernel send a reset, which
    can destroy the response before the client read it (an oversized or
    pipelined request leaves input unread).
    """
    with trio.move_on_after(CLOSE_TIMEOUT):
        await stream.send_eof()
        while await stream.receive_some(READ_SIZE):
            pass
