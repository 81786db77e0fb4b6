"""The SMTP server: trio streams around the sans-io protocol.

Theory of operation
===================

:class:`SmtpServer.serve` opens one listener per ``smtp.listen`` address and
runs one task per connection, all in one handler nursery. A session reads
in bulk (up to 64 KiB a read), feeds the bytes to its
:class:`~trismtp.smtp.protocol.ServerConnection`, and answers events until it
needs more input; replies are collected and written in one ``send_all``
before the next read, so a pipelined burst costs one write.

Every read sits under a timeout: ``command_timeout`` between commands, and a
deadline of ``data_timeout`` for a whole DATA upload. When it expires the
client gets ``421 4.4.2`` and the connection closes.

At the end of DATA the session turns the message into a job and awaits the
pusher (:class:`~trismtp.jobs.pusher.Pusher`): ``250 … queued as <id>`` once
the jobs service acknowledged it as durable, ``451 4.3.0`` otherwise.

Graceful shutdown (:meth:`SmtpServer.shutdown`), after hypercorn: the
listeners close, the handler nursery gets a deadline of ``shutdown.grace``,
and sessions that are between transactions are told ``421 4.3.2`` at once
(their pending read is interrupted). A session inside a transaction carries
on until its message is answered, and is then told ``421 4.3.2`` at once
without waiting for another command.
Sessions still open when the grace period ends are cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from itertools import count

import trio

from trismtp.jobs.email import EmailJob
from trismtp.jobs.pusher import PushFailed
from trismtp.message import Envelope
from trismtp.settings import HostPort, JobsSettings, SmtpSettings
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

__all__ = ["PushJob", "SmtpServer"]

log = logging.getLogger("trismtp.smtp")

READ_SIZE = 64 * 1024
# Messages from this size on are parsed in a worker thread.
PARSE_IN_THREAD = 256 * 1024
# A refused or closing connection gets this long to take its last reply.
LAST_WORDS_TIMEOUT = 5.0

TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

PushJob = Callable[[str, str, str], Awaitable[None]]
"""``push(job_id, job_json, pipeline)``: returns once durable, else PushFailed."""


@dataclass(eq=False)
class _Session:
    id: int
    remote: str
    conn: ServerConnection
    read_scope: trio.CancelScope | None = None

    @property
    def idle(self) -> bool:
        return not self.conn.in_transaction and not self.conn.awaiting_reply


class SmtpServer:
    """Accepts SMTP connections and turns each accepted DATA into one job."""

    def __init__(self, settings: SmtpSettings, jobs: JobsSettings, push: PushJob) -> None:
        self._settings = settings
        self._jobs = jobs
        self._push = push
        self._config = ProtocolConfig(
            hostname=settings.hostname,
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
        )
        self._sessions: set[_Session] = set()
        self._session_ids = count(1)
        self._accept_scope = trio.CancelScope()
        self._handler_scope: trio.CancelScope | None = None
        self._shutting_down = False

    @property
    def connections(self) -> int:
        """Open SMTP connections."""
        return len(self._sessions)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[HostPort]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`shutdown` and every session ended."""
        listeners: list[trio.SocketListener] = []
        for address in self._settings.addresses():
            try:
                listeners.extend(await trio.open_tcp_listeners(address.port, host=address.host))
            except OSError as exc:
                for listener in listeners:
                    await listener.aclose()
                reason = exc.strerror or str(exc)
                raise OSError(exc.errno, f"SMTP cannot listen on {address}: {reason}") from exc
        bound = [_host_port(listener.socket.getsockname()) for listener in listeners]
        async with trio.open_nursery() as handlers:
            self._handler_scope = handlers.cancel_scope
            with self._accept_scope:
                async with trio.open_nursery() as acceptors:
                    await acceptors.start(
                        partial(
                            trio.serve_listeners, self._handle, listeners, handler_nursery=handlers
                        )
                    )
                    log.info("SMTP listening on %s", ", ".join(map(str, bound)))
                    task_status.started(bound)
                    if self._shutting_down:
                        self._accept_scope.cancel()
            # Accepting has stopped; the handler nursery waits for the sessions.

    def shutdown(self, grace: float) -> None:
        """Stop accepting; let sessions finish within ``grace`` seconds."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._accept_scope.cancel()
        if self._handler_scope is not None:
            self._handler_scope.deadline = min(
                self._handler_scope.deadline, trio.current_time() + grace
            )
        for session in self._sessions:
            if session.idle and session.read_scope is not None:
                session.read_scope.cancel()
        log.info(
            "SMTP stopped accepting; %d open sessions have %g s to finish",
            len(self._sessions),
            grace,
        )

    async def _handle(self, stream: trio.SocketStream) -> None:
        session: _Session | None = None
        try:
            remote = str(_host_port(stream.socket.getpeername()))
            session = _Session(next(self._session_ids), remote, ServerConnection(self._config))
            if len(self._sessions) >= self._settings.max_connections:
                log.warning("refusing %s: max_connections reached", remote)
                with trio.move_on_after(LAST_WORDS_TIMEOUT):
                    await stream.send_all(session.conn.send(TOO_MANY_CONNECTIONS))
                return
            self._sessions.add(session)
            await self._converse(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            where = f"session {session.id} from {session.remote}" if session else "session"
            log.debug("%s: connection lost: %s", where, exc)
        finally:
            if session is not None:
                self._sessions.discard(session)
            with trio.move_on_after(LAST_WORDS_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()

    async def _converse(self, stream: trio.SocketStream, session: _Session) -> None:
        conn = session.conn
        out = bytearray(conn.greeting())
        data_deadline = float("inf")
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if self._shutting_down and session.idle:
                    out += conn.send(SHUTTING_DOWN)
                    await stream.send_all(out)
                    return
                if out:
                    await stream.send_all(out)
                    out.clear()
                if conn.state is State.DATA:
                    deadline = min(
                        data_deadline, trio.current_time() + self._settings.command_timeout
                    )
                else:
                    deadline = trio.current_time() + self._settings.command_timeout
                data = await self._read(stream, session, deadline)
                if data is None:
                    if self._shutting_down and session.idle:
                        continue  # interrupted by shutdown: say 421 4.3.2 above
                    log.info("session %d from %s: timeout", session.id, session.remote)
                    await stream.send_all(conn.send(_timeout_reply(conn)))
                    return
                conn.receive_data(data)
            elif isinstance(event, ConnectionClosed):
                if out:
                    await stream.send_all(out)
                return
            elif isinstance(event, Command):
                reply = event.reply
                if self._shutting_down and not conn.in_transaction and event.verb != "QUIT":
                    reply = SHUTTING_DOWN
                out += conn.send(reply)
                if reply.code == 354:
                    data_deadline = trio.current_time() + self._settings.data_timeout
            else:
                assert isinstance(event, MessageReceived)
                if out:
                    await stream.send_all(out)
                    out.clear()
                encoded = await self._encode_message(session, event)
                # Drop the received bytes before the wait for the ack: the job
                # carries them now, and a waiting session should hold one copy.
                event = NEED_DATA
                if isinstance(encoded, Reply):
                    out += conn.send(encoded)
                else:
                    out += conn.send(await self._push_job(session, *encoded))

    async def _read(
        self, stream: trio.SocketStream, session: _Session, deadline: float
    ) -> bytes | None:
        """Read what is there; None on timeout or shutdown interrupting an idle wait."""
        with trio.CancelScope(deadline=deadline) as scope:
            session.read_scope = scope
            if self._shutting_down and session.idle:
                scope.cancel()
            try:
                return await stream.receive_some(READ_SIZE)
            finally:
                session.read_scope = None
        return None

    async def _encode_message(
        self, session: _Session, event: MessageReceived
    ) -> Reply | tuple[str, str, int, int]:
        """The job for a received message as (id, JSON, size, recipients), or a refusal."""
        if event.reply is not None:
            log.info(
                "session %d from %s: message refused: %d %s",
                session.id,
                session.remote,
                event.reply.code,
                event.reply.lines()[0],
            )
            return event.reply
        email = EmailJob(
            raw=event.data,
            envelope=Envelope(
                helo=event.helo,
                mail_from=event.mail_from,
                recipients=event.recipients,
                remote_addr=session.remote,
            ),
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
        try:
            await self._push(job_id, job_json, self._jobs.pipeline)
        except PushFailed as exc:
            log.error(
                "session %d from %s: message %s not queued: %s",
                session.id,
                session.remote,
                job_id,
                exc,
            )
            return TEMPORARY_FAILURE
        log.info(
            "session %d from %s: queued as %s (%d bytes, %d recipients)",
            session.id,
            session.remote,
            job_id,
            size,
            recipients,
        )
        return Reply(250, "2.0.0", f"OK: queued as {job_id}")


def _encode_job(email: EmailJob, jobs: JobsSettings, include_raw: bool) -> tuple[str, str]:
    job = email.to_job(jobs, include_raw=include_raw)
    return job.id, job.to_json()


def _timeout_reply(conn: ServerConnection) -> Reply:
    what = "DATA" if conn.state is State.DATA else "command"
    return Reply(421, "4.4.2", f"Timeout waiting for {what}, closing connection")


def _host_port(sockname: object) -> HostPort:
    assert isinstance(sockname, tuple)
    host, port = sockname[0], sockname[1]
    return HostPort(str(host), int(port))
