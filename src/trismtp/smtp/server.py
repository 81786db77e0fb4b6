"""The SMTP server: trio streams around the sans-io protocol.

Theory of operation
===================

:class:`SmtpServer.serve` opens one listener per ``smtp.listen`` address and
runs one task per connection, all in one handler nursery. A session reads
in bulk (up to 64 KiB a read), feeds the bytes to its
:class:`~trismtp.smtp.protocol.ServerConnection`, and answers events until it
needs more input; replies are collected and written in one write before
the next read, so a pipelined burst costs one write. On a plain socket the
reads and writes are ``os.read``/``os.write`` on its descriptor, waiting in
trio only when there is nothing to read or no room to write: trio's
``receive_some``/``send_all`` take a trip through the scheduler per call,
which at four round trips a message was a large part of the CPU it costs.

Every read sits under a timeout: ``command_timeout`` between commands, and a
deadline of ``data_timeout`` for a whole DATA upload. When it expires the
client gets ``421 4.4.2`` and the connection closes. The deadlines are not
a cancel scope per read (entering and leaving one, and trio keeping its
deadline, cost more than the rest of the read): a session notes its read's
deadline, and one task per server (:meth:`SmtpServer._watch_reads`) keeps
a heap of when each session's next deadline may fall, wakes at the earliest,
and cancels the conversation of a session still waiting for that read. A
session moves its deadline later at every reply without touching the heap;
the task finds the later deadline when it wakes, and sleeps again.

At the end of DATA the session turns the message into a job and awaits the
pusher (:class:`~trismtp.jobs.pusher.Pusher`): ``250 … queued as <id>`` once
the jobs service acknowledged it as durable, ``451 4.3.0`` otherwise.

While the pusher knows it has no destination (``destination_down``), RCPT
and DATA get ``451 4.3.0`` at once, before any upload: the answer at the end
would be ``451`` anyway, ``push_timeout`` later. RCPT rather than the
greeting or MAIL because a 4xx to RCPT is what greylisting sends, so every
MTA retries it correctly, and some clients mishandle an early refusal (which
is why Postfix delays its own to RCPT, ``smtpd_delay_reject``); DATA too,
for a transaction whose recipients were accepted before the outage began.
The connection stays open, so a pooled client can go on once it is over.

Graceful shutdown (:meth:`SmtpServer.shutdown`), after hypercorn: the
listeners close, the handler nursery gets a deadline of ``shutdown.grace``,
and sessions that are between transactions are told ``421 4.3.2`` at once
(their pending read is interrupted). A session inside a transaction carries
on until its message is answered, and is then told ``421 4.3.2`` at once
without waiting for another command.
Sessions still open when the grace period ends are cancelled.

Observability: each connection's task tags its log lines with the session id
and client address (:func:`trismtp.log.set_session`), so the messages here do
not repeat the id; they keep ``from <address>`` for readers of the console
format. What the server counts goes to the :class:`~trismtp.metrics.Metrics`
it was given: a few increments of pre-bound children per message.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import count
from typing import Literal, Protocol

import trio

from trismtp import allocator
from trismtp.auth import AuthFileError, Credentials, UsersFile
from trismtp.jobs.email import EmailJob
from trismtp.jobs.pusher import PushFailed
from trismtp.log import RepeatLimiter, set_session
from trismtp.message import Envelope
from trismtp.metrics import Metrics
from trismtp.settings import ConfigError, HostPort, JobsSettings, SmtpSettings
from trismtp.smtp.budget import SMALL_OCTETS, Claim, MemoryBudget, cost, next_step
from trismtp.smtp.limits import TOO_MANY_NEW_CONNECTIONS, AddressLimits
from trismtp.smtp.protocol import (
    NEED_DATA,
    Command,
    ConnectionClosed,
    MessageReceived,
    ProtocolConfig,
    Reply,
    ServerConnection,
    State,
)
from trismtp.smtp.proxy import ProxyError, is_trusted, parse_networks, parse_proxy_header
from trismtp.smtp.tls import ServerTls, session_tls

__all__ = ["Listeners", "PushJob", "SmtpServer", "load_security", "open_listeners"]

log = logging.getLogger("trismtp.smtp")

# Bytes asked for per read: a whole 64 KiB socket buffer in one call.
READ_SIZE = 65536
# Seconds without a large message in flight before freed memory is trimmed.
TRIM_AFTER = 1.0
# Messages from this size on are parsed in a worker thread.
PARSE_IN_THREAD = 256 * 1024
# A refused or closing connection gets this long to take its last reply.
LAST_WORDS_TIMEOUT = 5.0
# A TLS handshake (implicit or after STARTTLS) must finish within this (or
# command_timeout, if shorter).
HANDSHAKE_TIMEOUT = 30.0
# After accept failed for want of descriptors or memory, try again this much later.
ACCEPT_RETRY = 0.1
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Password checks (scrypt: ~50 ms and 16 MiB each) running at once.
AUTH_THREADS = 2

TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")
TOO_LARGE_FOR_STORE = Reply(552, "5.3.4", "Message too large for the jobs store")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
TOO_SLOW = Reply(421, "4.4.2", "Data arriving too slowly, closing connection")
NO_DESTINATION = Reply(
    451, "4.3.0", "Temporary failure, try again later (the jobs store is unreachable)"
)
NO_MEMORY = Reply(452, "4.3.1", "Insufficient system storage, try again later")
NO_MEMORY_CLOSING = Reply(421, "4.3.1", "Insufficient system storage, closing connection")


class PushJob(Protocol):
    """``push(job_id, job_json, pipeline)``: returns once durable, else PushFailed."""

    def __call__(
        self, job_id: str, job_json: str, pipeline: str, /, *, last: bool = False
    ) -> Awaitable[None]:
        """``last``: every other session already waits for its own ack, so no
        job can join this one's batch; the pusher sends it without lingering."""


DestinationDown = Callable[[], str | None]
"""Why jobs are known to have nowhere to go right now, else None."""


def load_security(settings: SmtpSettings) -> tuple[ServerTls | None, UsersFile | None]:
    """Load the certificate and the users file named in ``settings``.

    Raises ConfigError naming the key, so that a broken file stops the
    daemon at start rather than at the first STARTTLS or AUTH.
    """
    tls = ServerTls(settings.tls) if settings.tls.enabled else None
    users = None
    if settings.auth.users_file:
        try:
            users = UsersFile.load(settings.auth.users_file)
        except AuthFileError as exc:
            raise ConfigError(f"smtp.auth.users_file: {exc}") from None
    return tls, users


@dataclass(eq=False)
class _Session:
    id: int
    remote: str  # "203.0.113.5:53211": the client, from the PROXY header if trusted
    address: str  # its IP address alone, for the limits
    conn: ServerConnection
    stream: trio.abc.Stream
    # The socket's descriptor while ``stream`` is the plain socket (no TLS,
    # no PROXY prefix), else -1: see _read and _send.
    fd: int = -1
    scope: trio.CancelScope | None = None  # the whole conversation
    # While a read waits, its deadline (else inf); see _watch_reads.
    read_deadline: float = math.inf
    # While in DATA: when the upload is too slow (smtp.limits.min_data_rate).
    slow_after: float = math.inf
    # When the session's earliest entry in the server's read alarms falls.
    alarm: float = math.inf
    # Why the conversation's scope was cancelled.
    ending: Literal["timeout", "shutdown", "stalled"] | None = None
    sending_since: float = math.inf  # when the write in progress began
    tls: dict[str, str] | None = None
    errors: int = 0
    auth_failures: int = 0
    limited: bool = False  # counted in the per-address limits (see _admit)
    claim: Claim = field(default_factory=Claim)  # of the memory budget

    @property
    def idle(self) -> bool:
        return not self.conn.in_transaction and not self.conn.awaiting_reply


class _PrefixedStream(trio.abc.Stream):
    """A stream that first gives back bytes already read from it.

    Reading the PROXY header may read past it; what followed is the client's
    first bytes (SMTP, or a TLS ClientHello), handed out here before the
    socket is read again.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(frozen=True, slots=True)
class Listeners:
    """Bound, listening sockets: ``smtp.listen``'s and ``smtp.tls.implicit_listen``'s."""

    plain: list[trio.SocketListener]
    implicit: list[trio.SocketListener]

    def bound(self) -> list[HostPort]:
        """The bound addresses, plain first."""
        return [_host_port(item.socket.getsockname()) for item in self.plain + self.implicit]

    def filenos(self) -> tuple[list[int], list[int]]:
        """The sockets' file descriptors, plain and implicit TLS."""
        return (
            [listener.socket.fileno() for listener in self.plain],
            [listener.socket.fileno() for listener in self.implicit],
        )

    @classmethod
    def from_filenos(cls, plain: list[int], implicit: list[int]) -> Listeners:
        """Listeners over inherited, already listening file descriptors."""

        def listener(fd: int) -> trio.SocketListener:
            return trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))

        return cls([listener(fd) for fd in plain], [listener(fd) for fd in implicit])

    async def aclose(self) -> None:
        """Close every socket (in this process)."""
        for listener in self.plain + self.implicit:
            await listener.aclose()


# As trio.open_tcp_listeners: as long a queue as the kernel allows.
_BACKLOG = 0xFFFF


async def open_listeners(settings: SmtpSettings, copies: int = 1) -> list[Listeners]:
    """Bind ``smtp.listen`` and ``smtp.tls.implicit_listen``, *copies* times.

    With ``smtp.workers`` > 1 each worker gets a copy of its own: sockets
    bound to the same addresses with ``SO_REUSEPORT``, among which the
    kernel spreads new connections evenly (by a hash of the client's address
    and port). One accept queue shared by all workers would give most
    connections to whichever worker was idle at that instant: a burst of
    kept connections all went to one. Port 0 is resolved by the first copy
    and the others bind the same port. Raises ``OSError(errno, "SMTP cannot
    listen on ADDRESS: reason")``.
    """
    sets = [Listeners([], []) for _ in range(copies)]
    addresses = [(a, False) for a in settings.addresses()]
    addresses += [(a, True) for a in settings.tls.addresses()]
    try:
        for address, is_implicit in addresses:
            try:
                if copies == 1:
                    groups = [await trio.open_tcp_listeners(address.port, host=address.host)]
                else:
                    groups = await _bind_copies(address, copies)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise OSError(exc.errno, f"SMTP cannot listen on {address}: {reason}") from exc
            for listeners, opened in zip(sets, groups, strict=True):
                (listeners.implicit if is_implicit else listeners.plain).extend(opened)
    except BaseException:
        for listeners in sets:
            await listeners.aclose()
        raise
    return sets


async def _bind_copies(address: HostPort, copies: int) -> list[list[trio.SocketListener]]:
    """*copies* listening sockets on each of *address*'s addresses, with ``SO_REUSEPORT``."""
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    groups: list[list[trio.SocketListener]] = [[] for _ in range(copies)]
    try:
        for family, kind, proto, _, sockaddr in infos:
            port: int | None = None
            for group in groups:
                sock = trio.socket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    target = sockaddr if port is None else (sockaddr[0], port, *sockaddr[2:])
                    await sock.bind(target)
                    sock.listen(_BACKLOG)
                except BaseException:
                    sock.close()
                    raise
                port = sock.getsockname()[1]
                group.append(trio.SocketListener(sock))
    except BaseException:
        for group in groups:
            for listener in group:
                await listener.aclose()
        raise
    return groups


class SmtpServer:
    """Accepts SMTP connections and turns each accepted DATA into one job.

    With ``smtp.workers`` > 1 one instance runs in each worker process and
    takes an equal share (``share``) of ``smtp.max_connections`` and of the
    memory budget.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        jobs: JobsSettings,
        push: PushJob,
        *,
        tls: ServerTls | None = None,
        users: UsersFile | None = None,
        metrics: Metrics | None = None,
        size_limit: Callable[[], int | None] | None = None,
        destination_down: DestinationDown | None = None,
        share: int = 1,
    ) -> None:
        self._settings = settings
        self._max_connections = -(-settings.max_connections // share)
        # The destination's own limit (NATS max_payload), read per session so
        # that SIZE in EHLO never promises more than the job can carry.
        self._size_limit = size_limit
        self._jobs = jobs
        self._push = push
        self._destination_down = destination_down
        # Without the daemon's metrics, count into a registry nobody reads.
        self._metrics = metrics if metrics is not None else Metrics()
        if (tls is None and settings.tls.enabled) or (users is None and settings.auth.users_file):
            loaded_tls, loaded_users = load_security(settings)
            tls = tls or loaded_tls
            users = users or loaded_users
        self._tls = tls
        self._users = users
        self._config = ProtocolConfig(
            hostname=settings.hostname,
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
            starttls=tls is not None and settings.tls.starttls,
            require_tls=settings.tls.required,
            auth_mechanisms=tuple(settings.auth.mechanisms) if users is not None else (),
            auth_without_tls=settings.auth.allow_without_tls,
            require_auth=settings.auth.required,
            bare_newlines=settings.bare_newlines,
            max_line_length=settings.max_line_length,
            recipient_domains=frozenset(settings.recipient_domains),
        )
        limits = settings.limits
        self._limits = AddressLimits(
            limits.max_connections_per_address, limits.max_new_connections_per_minute
        )
        self._exempt = parse_networks(limits.exempt_networks)
        self._proxy_networks = parse_networks(settings.proxy_protocol.trusted_networks)
        self._auth_limiter = trio.CapacityLimiter(AUTH_THREADS)
        # Warnings a flood of connections repeats (refusals, bad PROXY headers).
        self._repeats = RepeatLimiter(log)
        self._budget = MemoryBudget(settings.memory_budget_bytes() // share)
        self._large_done = trio.Event()  # set when the last large claim is given back
        # Octets of a message that can be held at once: the limit and one
        # read past it (beyond the limit the protocol keeps only a tail).
        self._claim_cap = settings.max_message_size + READ_SIZE
        self._sessions: set[_Session] = set()
        # (time, session id, session): see _watch_reads.
        self._alarms: list[tuple[float, int, _Session]] = []
        self._alarm_wait: trio.CancelScope | None = None
        self._reads_watch = trio.CancelScope()
        self._waiting_for_ack = 0  # sessions inside _push_job
        self._session_ids = count(1)
        self._accept_scope = trio.CancelScope()
        self._handler_scope: trio.CancelScope | None = None
        self._shutting_down = False
        self._listening = False
        self._metrics.watch_connections(self._sessions.__len__)
        budget = self._budget
        self._metrics.watch_memory_budget(budget.total, lambda: budget.used, lambda: budget.waiting)
        log.info(
            "memory budget for messages in flight: %d MiB (smtp.memory_budget)",
            budget.total >> 20,
        )

    def _session_config(self) -> ProtocolConfig:
        limit = self._size_limit() if self._size_limit is not None else None
        if limit is None or limit >= self._config.max_message_size:
            return self._config
        return replace(self._config, max_message_size=limit)

    @property
    def connections(self) -> int:
        """Open SMTP connections."""
        return len(self._sessions)

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget of the messages in flight."""
        return self._budget

    @property
    def listening(self) -> bool:
        """Every listener accepts connections (from start until :meth:`shutdown`)."""
        return self._listening

    async def serve(
        self,
        listeners: Listeners | None = None,
        *,
        task_status: trio.TaskStatus[list[HostPort]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until :meth:`shutdown` and every session ended.

        Binds the settings' addresses unless given *listeners* (which it
        then closes when done). Reports the bound addresses:
        ``smtp.listen`` first, then ``smtp.tls.implicit_listen``.
        """
        if listeners is None:
            (listeners,) = await open_listeners(self._settings)
        plain, implicit = listeners.plain, listeners.implicit
        bound = listeners.bound()
        async with trio.open_nursery() as handlers:
            self._handler_scope = handlers.cancel_scope
            # Beside the sessions, not the acceptors: deadlines still hold for
            # the sessions that finish their transaction after shutdown.
            handlers.start_soon(self._watch_reads)
            with self._accept_scope:
                async with trio.open_nursery() as acceptors:
                    acceptors.start_soon(self._watch_writes)
                    acceptors.start_soon(self._trim_when_quiet)
                    acceptors.start_soon(self._repeats.run)
                    for group, handler in (
                        (plain, self._handle),
                        (implicit, partial(self._handle, implicit_tls=True)),
                    ):
                        if group:
                            await acceptors.start(partial(self._accept, handler, group, handlers))
                    log.info("SMTP listening on %s", ", ".join(map(str, bound[: len(plain)])))
                    if implicit:
                        log.info(
                            "SMTP with implicit TLS listening on %s",
                            ", ".join(map(str, bound[len(plain) :])),
                        )
                    task_status.started(bound)
                    if self._shutting_down:
                        self._accept_scope.cancel()
                    else:
                        self._listening = True
            # Accepting has stopped; the handler nursery waits for the sessions.
        self._repeats.flush(final=True)

    def shutdown(self, grace: float) -> None:
        """Stop accepting; let sessions finish within ``grace`` seconds."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._listening = False
        self._accept_scope.cancel()
        if self._handler_scope is not None:
            self._handler_scope.deadline = min(
                self._handler_scope.deadline, trio.current_time() + grace
            )
        for session in self._sessions:
            if session.idle and session.read_deadline < math.inf:
                self._interrupt(session, "shutdown")
        if not self._sessions:
            self._reads_watch.cancel()
        log.info(
            "SMTP stopped accepting; %d open sessions have %g s to finish",
            len(self._sessions),
            grace,
        )

    def reload(self) -> None:
        """SIGHUP: read the TLS certificate and the users file again.

        What fails to load is logged and the previous one kept.
        """
        if self._tls is not None:
            self._tls.reload()
        path = self._settings.auth.users_file
        if self._users is not None and path:
            try:
                self._users = UsersFile.load(path)
            except AuthFileError as exc:
                log.error("users file reload failed, keeping the previous one: %s", exc)
            else:
                log.info("users file reloaded: %d users", len(self._users))

    # -- one connection ---------------------------------------------------

    async def _handle(self, stream: trio.SocketStream, *, implicit_tls: bool = False) -> None:
        session: _Session | None = None
        self._metrics.connection_accepted(implicit_tls)
        try:
            peer = _host_port(stream.socket.getpeername())
            transport: trio.abc.Stream = stream
            if self._proxy_networks and is_trusted(peer.host, self._proxy_networks):
                proxied = await self._read_proxy_header(stream, peer)
                if proxied is None:
                    return
                peer, prefix = proxied
                if prefix:
                    transport = _PrefixedStream(stream, prefix)
            session = _Session(
                next(self._session_ids),
                str(peer),
                peer.host,
                ServerConnection(self._session_config()),
                transport,
            )
            if transport is stream:
                session.fd = stream.socket.fileno()
            # From here on, every line this task logs names the session. The
            # handler is a task of its own, so the value ends with it.
            set_session(session.id, session.remote)
            refusal = self._admit(session)
            if refusal is not None:
                reason, reply = refusal
                self._metrics.connection_refused(reason)
                self._repeats.warning(
                    f"refused: {reason}", "refusing %s: %s", session.remote, reply.lines()[0]
                )
                if not implicit_tls:  # a client waiting for TLS would not understand it
                    with trio.move_on_after(LAST_WORDS_TIMEOUT):
                        await transport.send_all(session.conn.send(reply))
                return
            self._sessions.add(session)
            log.debug(
                "from %s: connected%s", session.remote, " (implicit TLS)" if implicit_tls else ""
            )
            if implicit_tls and not await self._start_tls(session):
                return
            with trio.CancelScope() as session.scope:
                await self._converse(session)
            if session.scope.cancelled_caught:
                await self._interrupted(session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            where = f"from {session.remote}" if session else "before the session began"
            log.debug("%s: connection lost: %s", where, exc)
        finally:
            if session is not None:
                session.alarm = -1.0  # its entries in the read alarms are void
                self._release(session)
                if session in self._sessions:
                    self._sessions.discard(session)
                    if session.limited:
                        self._limits.close(session.address)
                    if self._shutting_down and not self._sessions:
                        self._reads_watch.cancel()  # the last one: serve() may end
                closing = session.stream
            else:
                closing = stream
            # A TLS stream's close says goodbye, which may block; the socket
            # under it is closed in any case, and at once (no checkpoint: the
            # connection is over).
            if closing is not stream:
                with trio.move_on_after(LAST_WORDS_TIMEOUT) as scope:
                    scope.shield = True
                    await closing.aclose()
            stream.socket.close()

    async def _accept(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listeners``; each runs ``handler`` in ``handlers``.

        As :func:`trio.serve_listeners`, except that the handler closes its
        own socket: serve_listeners closes it again with
        :func:`trio.aclose_forcefully`, whose cancelled checkpoint costs more
        than the rest of a connection's bookkeeping.
        """
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_from, listener, handler, handlers)
            task_status.started()

    async def _accept_from(
        self,
        listener: trio.SocketListener,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
        handlers: trio.Nursery,
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Out of file descriptors or memory: the sessions that
                    # end free some; until then, do not spin on accept (nor
                    # log ten lines a second).
                    self._repeats.warning(
                        "accept failed",
                        "cannot accept SMTP connections: %s; retrying every %g s",
                        exc,
                        ACCEPT_RETRY,
                    )
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                handlers.start_soon(handler, stream)

    def _admit(self, session: _Session) -> tuple[str, Reply] | None:
        """The refusal for a new connection (its metrics reason and reply), or None.

        An admitted connection from an address that is not exempt is counted
        in the per-address limits; :meth:`_handle` uncounts it at the end.
        """
        if len(self._sessions) >= self._max_connections:
            return "max_connections", TOO_MANY_CONNECTIONS
        if is_trusted(session.address, self._exempt):
            return None
        refusal = self._limits.open(session.address)
        if refusal is None:
            session.limited = True
            return None
        reason = "rate" if refusal == TOO_MANY_NEW_CONNECTIONS else "per_address"
        return reason, Reply(421, "4.7.0", f"{refusal[0].upper()}{refusal[1:]}, try again later")

    async def _read_proxy_header(
        self, stream: trio.SocketStream, peer: HostPort
    ) -> tuple[HostPort, bytes] | None:
        """The client's address from the PROXY header, and the bytes after it."""
        buf = bytearray()
        with trio.move_on_after(self._settings.proxy_protocol.header_timeout):
            while True:
                try:
                    header = parse_proxy_header(buf)
                except ProxyError as exc:
                    self._metrics.connection_refused("proxy_header")
                    self._repeats.warning(
                        "bad PROXY header", "%s: bad PROXY protocol header: %s; closing", peer, exc
                    )
                    return None
                if header is not None:
                    client = peer if header.source is None else HostPort(*header.source)
                    return client, bytes(buf[header.consumed :])
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return None
                buf += data
        self._metrics.connection_refused("proxy_header")
        self._repeats.warning(
            "no PROXY header", "%s: no PROXY protocol header in time; closing", peer
        )
        return None

    async def _start_tls(self, session: _Session) -> bool:
        """The TLS handshake on the session's stream; False (logged) if it failed."""
        assert self._tls is not None
        tls_stream = self._tls.wrap(session.stream)
        with trio.move_on_after(min(HANDSHAKE_TIMEOUT, self._settings.command_timeout)):
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self._metrics.tls_handshake(False)
                log.info("from %s: TLS handshake failed: %s", session.remote, exc.__cause__ or exc)
                return False
            session.stream = tls_stream
            session.fd = -1
            session.tls = session_tls(tls_stream)
            session.conn.tls_established()
            self._metrics.tls_handshake(True, session.tls["version"])
            log.debug(
                "from %s: TLS %s %s", session.remote, session.tls["version"], session.tls["cipher"]
            )
            return True
        self._metrics.tls_handshake(False)
        log.info("from %s: TLS handshake timed out", session.remote)
        return False

    async def _converse(self, session: _Session) -> None:
        conn = session.conn
        settings = self._settings
        out = bytearray(conn.greeting())
        # A command line must be complete within command_timeout of the last
        # reply: trickling it in a byte at a time does not extend that.
        command_deadline = trio.current_time() + settings.command_timeout
        data_deadline = math.inf
        data_started = 0.0
        data_received = 0
        while True:
            if session.claim.held and not conn.in_transaction:
                # Answered, reset or refused: the message's memory is free.
                self._release(session)
            event = conn.next_event()
            if event is NEED_DATA:
                if self._shutting_down and session.idle:
                    out += conn.send(SHUTTING_DOWN)
                    await self._send(session, out)
                    return
                if out:
                    await self._send(session, out)
                    out.clear()
                    # The client's time for its next command starts now.
                    command_deadline = trio.current_time() + settings.command_timeout
                if conn.state is State.DATA:
                    session.slow_after = self._rate_deadline(data_started, data_received)
                    deadline = min(
                        data_deadline,
                        session.slow_after,
                        trio.current_time() + settings.command_timeout,
                    )
                else:
                    deadline = command_deadline
                data = await self._read(session, deadline)
                if data is None:
                    if self._shutting_down and session.idle:
                        continue  # interrupted by shutdown: say 421 4.3.2 above
                    await self._send(session, conn.send(self._timed_out(session)))
                    return
                if conn.state is State.DATA:
                    data_received += len(data)
                    waited = await self._claim_data(session, data_received, data_deadline)
                    if isinstance(waited, str):
                        self._metrics.memory_refusal()
                        log.warning(
                            "from %s: %s: %s", session.remote, NO_MEMORY_CLOSING.lines()[0], waited
                        )
                        await self._send(session, conn.send(NO_MEMORY_CLOSING))
                        await self._discard_rest(session)
                        return
                    # Time spent waiting for memory is ours, not the client's.
                    data_started += waited
                conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                if out:
                    await self._send(session, out)
                return
            if isinstance(event, Command):
                reply = event.reply
                if self._shutting_down and not conn.in_transaction and event.verb != "QUIT":
                    reply = SHUTTING_DOWN
                elif event.credentials is not None:
                    if out:
                        await self._send(session, out)
                        out.clear()
                    reply = await self._authenticate(session, event, event.credentials)
                elif reply.positive and event.verb in ("MAIL", "RCPT", "DATA"):
                    if event.verb != "MAIL":
                        reply = self._check_destination(session, event.verb, reply)
                    # No memory is claimed for a message that would be refused.
                    if reply.positive and event.verb != "RCPT":
                        reply = self._claim_upfront(session, event, reply)
                out += conn.send(reply)
                if reply.code == 354:
                    data_started = trio.current_time()
                    data_deadline = data_started + settings.data_timeout
                    data_received = 0
                elif reply.code == 220 and event.verb == "STARTTLS":
                    await self._send(session, out)
                    out.clear()
                    if not await self._start_tls(session):
                        return
                elif reply.code == 421:
                    if reply is TOO_MANY_AUTH_FAILURES:
                        self._metrics.session_closed_for_abuse("auth_failures")
                    elif reply is not SHUTTING_DOWN:
                        # The protocol closes with 421 on a command only when
                        # it is an HTTP request sent to the SMTP port.
                        self._metrics.session_closed_for_abuse("http")
                    log.info("from %s: %s", session.remote, reply.lines()[0])
                elif reply.code >= 500:
                    out += self._count_error(session)
                continue
            assert isinstance(event, MessageReceived)
            # Its size is known now: what its claim holds beyond its cost (a
            # step not filled, a SIZE= larger than what came) is for others.
            self._budget.shrink(session.claim, cost(len(event.data)))
            if out:
                await self._send(session, out)
                out.clear()
            encoded = await self._encode_message(session, event)
            # Drop the received bytes before the wait for the ack: the job
            # carries them now, and a waiting session should hold one copy.
            event = NEED_DATA
            if isinstance(encoded, Reply):
                self._metrics.message_answered(encoded.code)
                out += conn.send(encoded)
                if encoded.code >= 500:  # too large, bare newline, line too long
                    out += self._count_error(session)
            else:
                reply = await self._push_job(session, *encoded)
                self._metrics.message_answered(reply.code)
                out += conn.send(reply)
            # The job's JSON goes now, not when the next message replaces it.
            del encoded

    async def _interrupted(self, session: _Session) -> None:
        """The last words of a conversation cancelled for ``session.ending``."""
        if session.ending == "stalled":
            log.info("from %s: the client stopped reading its replies; closing", session.remote)
            return
        reply = SHUTTING_DOWN if session.ending == "shutdown" else self._timed_out(session)
        with trio.move_on_after(LAST_WORDS_TIMEOUT):
            await self._send(session, session.conn.send(reply))

    def _timed_out(self, session: _Session) -> Reply:
        """Count and log a session's read timeout; the reply that closes it."""
        conn = session.conn
        reply = _timeout_reply(conn)
        if conn.state is State.DATA and trio.current_time() >= session.slow_after:
            reply = TOO_SLOW
        self._metrics.session_closed_for_abuse("slow_data" if reply is TOO_SLOW else "timeout")
        log.info("from %s: %s", session.remote, reply.lines()[0])
        return reply

    def _release(self, session: _Session) -> None:
        """Give the session's claim back; after the last large one, have the heaps trimmed."""
        large = session.claim.large
        self._budget.release(session.claim)
        if large and not self._budget.large_used:
            self._large_done.set()

    async def _trim_when_quiet(self) -> None:
        """Give freed message memory back to the system once large messages pause.

        Not after every one: trimmed at once, the heap's pages were given
        back between two 100 KB messages and faulted in again by the next,
        ~0.5 ms of system time a message. TRIM_AFTER seconds without a large
        message in flight costs nothing under load and returns the memory at
        rest all the same.
        """
        while True:
            await self._large_done.wait()
            self._large_done = trio.Event()
            await trio.sleep(TRIM_AFTER)
            if not self._budget.large_used:
                allocator.trim()

    def _claim_upfront(self, session: _Session, event: Command, reply: Reply) -> Reply:
        """``reply`` to MAIL or DATA, or ``452 4.3.1`` when the memory budget is full.

        MAIL with ``SIZE=`` claims the declared size at once; DATA without
        it claims a small message's worth. Refusing here, before the upload, lets the client
        retry later instead of waiting with its message half sent.
        """
        if event.verb == "MAIL":
            declared = event.params.get("SIZE")
            if declared is None:
                return reply
            target = cost(min(int(declared), self._claim_cap))
        else:
            target = max(session.claim.held, cost(SMALL_OCTETS))
        if self._budget.try_claim(session.claim, target):
            return reply
        self._metrics.memory_refusal()
        log.info(
            "from %s: %s refused: the memory budget (%d bytes) is full",
            session.remote,
            event.verb,
            self._budget.total,
        )
        return NO_MEMORY

    async def _claim_data(self, session: _Session, received: int, deadline: float) -> float | str:
        """Claim memory for ``received`` octets of DATA: the seconds waited.

        While the claim waits, the session does not read: the client's
        writes block (TCP back-pressure) until other messages are answered.
        Why not, for the log, when it cannot wait (too much is parked, see
        :mod:`trismtp.smtp.budget`) or waited until ``deadline``.
        """
        needed = min(received, self._claim_cap)
        if cost(needed) <= session.claim.held:
            return 0.0
        # Outgrown: all or nothing, a step at a time (see trismtp.smtp.budget).
        target = cost(min(next_step(needed, self._claim_cap), self._claim_cap))
        if self._budget.try_claim(session.claim, target):
            return 0.0
        started = trio.current_time()
        log.debug("from %s: waiting for memory (%d bytes)", session.remote, target)
        budget = self._budget
        full = (
            "the memory budget for messages in flight"
            f" (this process's {budget.total >> 20} MiB of smtp.memory_budget)"
        )
        with trio.move_on_at(deadline):
            if not await budget.claim(session.claim, target, parking=received):
                return (
                    f"{full} is full, and the uploads waiting for it already hold"
                    f" {budget.parked >> 20} MiB of its {budget.park_limit >> 20} MiB park limit"
                )
            return trio.current_time() - started
        return f"{full} stayed full until smtp.data_timeout ran out"

    async def _discard_rest(self, session: _Session) -> None:
        """After a 421 mid-upload: let the client read it before the connection goes.

        Closing a socket with the client's upload still unread sends a reset,
        and a client that is still sending usually loses the reply with it.
        So: end our side, then read and drop what comes, for a few seconds
        at most, until the client closes its side.
        """
        stream = session.stream
        with trio.move_on_after(LAST_WORDS_TIMEOUT):
            if isinstance(stream, trio.SocketStream):
                await stream.send_eof()
            while await stream.receive_some(READ_SIZE):
                pass

    async def _send(self, session: _Session, data: bytes | bytearray | memoryview) -> None:
        """Write replies; a client that stops reading is dropped after command_timeout.

        Without a deadline, a client that pipelines commands and never reads
        its replies would hold the session (and its buffers) for ever.
        """
        if session.fd >= 0:
            # Replies are small and the socket buffer is almost always empty:
            # one write(2), without trio's checkpoint around it (a trip
            # through the scheduler per reply; the next read yields anyway).
            try:
                sent = os.write(session.fd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        # Not a cancel scope per write (they add up at thousands of writes a
        # second): _watch_writes cancels the session of a write that stalls.
        session.sending_since = trio.current_time()
        await session.stream.send_all(data)
        session.sending_since = math.inf

    async def _watch_writes(self) -> None:
        """Close sessions whose reply has waited command_timeout to be read."""
        timeout = self._settings.command_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 2))
            stalled_since = trio.current_time() - timeout
            for session in self._sessions:
                if session.sending_since < stalled_since:
                    self._interrupt(session, "stalled")

    def _interrupt(self, session: _Session, why: Literal["timeout", "shutdown", "stalled"]) -> None:
        """Cancel the session's conversation; :meth:`_interrupted` has the last word."""
        if session.scope is not None and session.ending is None:
            session.ending = why
            session.scope.cancel()

    async def _watch_reads(self) -> None:
        """Interrupt the sessions whose read passed its deadline (module docstring).

        ``_alarms`` holds (time, session id, session): a session's read may
        be due no earlier than its entry's time, and ``session.alarm`` is the
        time of its one live entry. Entries are added only for a deadline
        earlier than that (the first read, or a shorter one in DATA), so the
        heap holds about one entry a session, whatever the number of reads.
        """
        alarms = self._alarms
        with self._reads_watch:  # until shutdown, once no session is left
            while True:
                with trio.CancelScope(deadline=alarms[0][0] if alarms else math.inf) as wait:
                    self._alarm_wait = wait
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._alarm_wait = None
                now = trio.current_time()
                while alarms and alarms[0][0] <= now:
                    when, _, session = heapq.heappop(alarms)
                    if when != session.alarm:
                        continue  # replaced by an earlier entry, or the session is over
                    session.alarm = math.inf
                    if session.read_deadline <= now:
                        self._interrupt(session, "timeout")
                    elif session.read_deadline < math.inf:
                        self._set_alarm(session, session.read_deadline)

    def _set_alarm(self, session: _Session, when: float) -> None:
        """Have :meth:`_watch_reads` look at ``session`` at ``when``."""
        alarms = self._alarms
        if len(alarms) > 2 * len(self._sessions) + 64:
            # Void entries (sessions over, alarms replaced) wait in the heap
            # until their time; this bounds them by the live sessions.
            alarms[:] = [(s.alarm, s.id, s) for s in self._sessions if s.alarm < math.inf]
            heapq.heapify(alarms)
        session.alarm = when
        heapq.heappush(alarms, (when, session.id, session))
        wait = self._alarm_wait
        if wait is not None and when < wait.deadline:
            wait.deadline = when

    def _check_destination(self, session: _Session, verb: str, reply: Reply) -> Reply:
        """``reply``, or 451 while jobs are known to have nowhere to go (module docstring)."""
        down = self._destination_down() if self._destination_down is not None else None
        if down is None:
            return reply
        log.info("from %s: %s refused with 451: %s", session.remote, verb, down)
        return NO_DESTINATION

    def _count_error(self, session: _Session) -> bytes:
        """Count a 5xx reply; at ``max_errors``, the ``421`` that closes the session."""
        session.errors += 1
        if 0 < self._settings.limits.max_errors <= session.errors:
            self._metrics.session_closed_for_abuse("errors")
            log.info("from %s: too many errors", session.remote)
            return session.conn.send(TOO_MANY_ERRORS)
        return b""

    def _rate_deadline(self, started: float, received: int) -> float:
        """When DATA is too slow: ``min_data_rate`` on average, after a grace period."""
        limits = self._settings.limits
        if limits.min_data_rate <= 0:
            return math.inf
        return started + limits.data_rate_grace + received / limits.min_data_rate

    async def _authenticate(
        self, session: _Session, event: Command, credentials: Credentials
    ) -> Reply:
        """Check AUTH credentials: the proposed 235, or 535 after a delay."""
        users = self._users
        assert users is not None
        ok = await trio.to_thread.run_sync(
            users.verify,
            credentials.username,
            credentials.password,
            limiter=self._auth_limiter,
        )
        self._metrics.auth_attempt(event.argument, ok)
        if ok:
            log.info(
                "from %s: authenticated as %r (%s)",
                session.remote,
                credentials.username,
                event.argument,
            )
            return event.reply
        session.auth_failures += 1
        log.warning(
            "from %s: AUTH %s failed for %r", session.remote, event.argument, credentials.username
        )
        # Slow down guessing; other sessions go on meanwhile.
        await trio.sleep(self._settings.auth.failure_delay)
        if session.auth_failures >= self._settings.auth.max_failures:
            return TOO_MANY_AUTH_FAILURES
        return AUTH_FAILED

    async def _read(self, session: _Session, deadline: float) -> bytes | bytearray | None:
        """Read what is there; None if ``deadline`` passed, or shutdown began while idle.

        A read that is still waiting at ``deadline`` is interrupted by
        :meth:`_watch_reads`, which cancels the whole conversation.
        """
        if self._shutting_down and session.idle:
            return None
        if trio.current_time() >= deadline:
            return None
        fd = session.fd
        if fd >= 0:
            # The plain socket: read(2) first, and the deadline only when
            # there is nothing to read yet. This is what trio's receive_some
            # does, less its wrappers.
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                pass
            else:
                # Data was waiting: yield once, so that a client that always
                # has more to send cannot keep the other sessions from running.
                await trio.lowlevel.checkpoint()
                return data
        session.read_deadline = deadline
        if deadline < session.alarm:
            self._set_alarm(session, deadline)
        try:
            while True:
                if fd < 0:
                    received = await session.stream.receive_some(READ_SIZE)
                else:
                    await trio.lowlevel.wait_readable(fd)
                if session.ending is not None:
                    # Interrupted as the wait ended: what came is not read.
                    await trio.lowlevel.checkpoint()  # raises Cancelled
                if fd < 0:
                    return received
                try:
                    return os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
        finally:
            session.read_deadline = math.inf

    async def _encode_message(
        self, session: _Session, event: MessageReceived
    ) -> Reply | tuple[str, str, int, int]:
        """The job for a received message as (id, JSON, size, recipients), or a refusal."""
        if event.reply is not None:
            log.info(
                "from %s: message refused: %d %s",
                session.remote,
                event.reply.code,
                event.reply.lines()[0],
            )
            return event.reply
        authenticated = session.conn.authenticated
        email = EmailJob(
            raw=event.data,
            envelope=Envelope(
                helo=event.helo,
                mail_from=event.mail_from,
                recipients=event.recipients,
                remote_addr=session.remote,
            ),
            authentication=(
                {"mechanism": authenticated[0], "username": authenticated[1]}
                if authenticated is not None
                else None
            ),
            tls=session.tls,
        )
        encode = partial(_encode_job, email, self._jobs, self._settings.include_raw)
        if len(event.data) >= PARSE_IN_THREAD:
            # A big message takes milliseconds to seconds to parse and encode;
            # other sessions must not stall meanwhile.
            job_id, job_json = await trio.to_thread.run_sync(encode)
        else:
            job_id, job_json = encode()
        return job_id, job_json, event.size, len(event.recipients)

    async def _push_job(
        self, session: _Session, job_id: str, job_json: str, size: int, recipients: int
    ) -> Reply:
        """Wait for the job's durable ack: 250 with its id, or 451."""
        # When every other session already waits for its ack (in a batch in
        # flight, or queued), no job can join this one's batch before it is
        # sent: lingering for one would only delay all of them.
        last = self._waiting_for_ack + 1 >= len(self._sessions)
        self._waiting_for_ack += 1
        try:
            await self._push(job_id, job_json, self._jobs.pipeline, last=last)
        except PushFailed as exc:
            log.error("from %s: message %s not queued: %s", session.remote, job_id, exc)
            return TOO_LARGE_FOR_STORE if exc.permanent else TEMPORARY_FAILURE
        finally:
            self._waiting_for_ack -= 1
        self._metrics.message_accepted(size)
        log.info(
            "from %s: queued as %s (%d bytes, %d %s)",
            session.remote,
            job_id,
            size,
            recipients,
            "recipient" if recipients == 1 else "recipients",
        )
        return Reply(250, "2.0.0", f"OK: queued as {job_id}")


def _encode_job(email: EmailJob, jobs: JobsSettings, include_raw: bool) -> tuple[str, str]:
    return email.id, email.to_job_json(jobs, include_raw=include_raw)


def _timeout_reply(conn: ServerConnection) -> Reply:
    what = "DATA" if conn.state is State.DATA else "command"
    return Reply(421, "4.4.2", f"Timeout waiting for {what}, closing connection")


def _host_port(sockname: object) -> HostPort:
    assert isinstance(sockname, tuple)
    host, port = sockname[0], sockname[1]
    return HostPort(str(host), int(port))
