"""A connection to the jobs service that comes back by itself.

:class:`Link` runs one task, :meth:`Link.maintain`, that opens an
:class:`~trismtp.consumer.client.RpcClient`, waits until it fails, waits a
little (doubling from ``reconnect_first`` up to ``reconnect_max``, with
jitter so that many consumers do not knock all at once) and opens another.
Callers never hold a client: :meth:`Link.call` waits for the current one.

Whether a failed call is repeated is the caller's choice (``retry``): Ack,
Nack and Extend name a lease token, so repeating them is harmless (a second
Ack of a job answers "lease lost", nothing more). Reserve is never repeated
blindly: if its reply was lost the jobs it leased come back after the lease.

An HTTP refusal of the handshake with a 4xx status (401: the token) will not
get better by retrying and ends :meth:`Link.maintain` with that error. So
does a failure of the very first connection, unless ``retry_on_failed_connect``
(as in nats.py): a wrong URL is said at once, while a service that restarts
under a running consumer is waited for.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Mapping
from typing import Any

import anyio

from trismtp.consumer.client import RpcClient
from trismtp.consumer.websocket import HandshakeRejected
from trismtp.jobs.websocket import JobsUnavailable, Target

__all__ = ["Link"]

logger = logging.getLogger("trismtp.consumer")


class Link:
    """The current connection to the jobs service, reopened when it fails."""

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int,
        connect_timeout: float,
        reconnect_first: float,
        reconnect_max: float,
        retry_on_failed_connect: bool = False,
    ) -> None:
        self.url = url
        self._token = token
        self._ssl_context = ssl_context
        self._max_message_size = max_message_size
        self._connect_timeout = connect_timeout
        self._reconnect_first = reconnect_first
        self._reconnect_max = reconnect_max
        self._retry_first = retry_on_failed_connect
        self._client: RpcClient | None = None
        # Replaced (and the old one set) whenever _client changes.
        self._changed = anyio.Event()
        #: Connections opened so far (1 after the first; more after reconnects).
        self.connections = 0

    async def maintain(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep a connection open until cancelled; started() once the first is up.

        Raises :class:`HandshakeRejected` for a 4xx refusal of the handshake,
        and :class:`JobsUnavailable` if the first connection fails (unless
        ``retry_on_failed_connect``: then it keeps trying, and calls wait).
        """
        delay = self._reconnect_first
        started = False
        complained = False
        while True:
            try:
                async with RpcClient.connect(
                    self.url,
                    token=self._token,
                    ssl_context=self._ssl_context,
                    max_message_size=self._max_message_size,
                    connect_timeout=self._connect_timeout,
                ) as client:
                    self.connections += 1
                    again = " again" if complained or self.connections > 1 else ""
                    logger.info("connected to %s%s", client_target(self.url), again)
                    complained = False
                    delay = self._reconnect_first
                    self._set_client(client)
                    if not started:
                        task_status.started()
                        started = True
                    await client.wait_closed()
                    logger.warning("%s", client.failure)
            except JobsUnavailable as exc:
                if isinstance(exc, HandshakeRejected) and 400 <= exc.status_code < 500:
                    raise
                if not started and not self._retry_first:
                    raise
                self._complain(exc, complained, delay)
                complained = True
            finally:
                self._set_client(None)
            if not started:
                # The caller waits for the first connection: let it go on; its
                # calls wait for the link to come up.
                task_status.started()
                started = True
            await anyio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, self._reconnect_max)

    def _set_client(self, client: RpcClient | None) -> None:
        self._client = client
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    @staticmethod
    def _complain(exc: JobsUnavailable, complained: bool, delay: float) -> None:
        # Once per outage at WARNING, then quietly: a service down for an
        # hour must not fill the log.
        level = logging.DEBUG if complained else logging.WARNING
        logger.log(level, "%s; trying again (every %.3g s at first)", exc, delay)

    async def wait_connected(self) -> None:
        """Return once a connection is up (at once if one is)."""
        while self._client is None or self._client.closed:
            await self._changed.wait()

    async def call(self, method: str, params: Mapping[str, Any], *, retry: bool) -> Any:
        """Call *method* on the current connection, waiting for one if needed.

        With *retry*, a call whose connection is lost is sent again on the
        next one, until it gets an answer (or the caller is cancelled).
        Raises :class:`~trismtp.jsonrpc.RpcError` for an error reply, and
        :class:`JobsUnavailable` (without *retry*) when the connection is lost.
        """
        while True:
            client = self._client
            if client is None or client.closed:
                await self._changed.wait()
                continue
            try:
                return await client.call(method, params)
            except JobsUnavailable:
                if not retry:
                    raise


def client_target(url: str) -> str:
    """The URL as safe to log: no user info, no query string."""
    try:
        return str(Target.parse(url, schemes=("ws", "wss"), what="jobs URL"))
    except ValueError:
        return "the jobs service"
