"""An SMTP load generator that behaves like a crowd of MTAs, on raw trio streams.

Theory of operation
===================

:class:`LoadGenerator` runs *clients* tasks in one nursery, in the test
process. Each client keeps one SMTP connection and sends message after
message over it, one command at a time (no pipelining, so a reply is never
ambiguous): ``MAIL``, ``RCPT``, ``DATA``, the message, the final dot, and then
it waits for the reply to the dot. Every message carries a unique
``Message-ID`` and the same token as a marker in its ``Subject``, so the
faults suite can find each message in the store and tell a job that was
stored twice from two different messages.

What a client does with the reply to the dot is what an MTA does:

* ``250 … queued as <id>``: the message is delivered, the id recorded; next.
* ``451``: the same message (same Message-ID) is sent again after a short
  pause, on the same connection.
* no reply (the connection closed, or nothing within ``reply_timeout``): the
  attempt is *unanswered*; the client reconnects and sends the same message
  again.

A ``4xx`` (but ``421``) to RCPT or DATA, which the daemon answers while it
knows its store is down, is what greylisting sends and what an MTA retries:
the client sends RSET and, after a short pause, the same message again on the
same connection. No dot was sent, so it is not an attempt; it is counted in
``deferred_before_upload``.

A refused connection, a ``421`` or a broken connection before the dot is not
an attempt: the client reconnects, with a short jittered pause, and tries the
same message again.

:meth:`LoadGenerator.stop` sets a :class:`trio.Event`. A client then starts no
new message and no retry; an attempt already under way is finished (its
reply is awaited, bounded by ``reply_timeout``), and the whole generator is
bounded by ``finish_timeout`` after the stop. Independently of any stop, the
generator stops itself after ``max_duration`` seconds or ``max_messages``
messages, so a failing test never leaves it running.

Every read and every write has a deadline. Timings are taken with
``trio.current_time()``: the latency of an attempt is the time from the end
of the final dot's ``send_all`` to the complete reply line.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import trio

__all__ = [
    "Attempt",
    "LoadGenerator",
    "LoadReport",
    "MessageRecord",
    "Outcome",
]

HOST: Final = "127.0.0.1"
DOMAIN: Final = "faults.trismtp.test"
QUEUED_RE: Final = re.compile(
    r"250 2\.0\.0 OK: queued as "
    r"([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})"
)
READ_SIZE: Final = 65536
LINE: Final = 74  # octets of body text per line, before the CRLF


class Outcome(Enum):
    """How one attempt (one final dot) ended."""

    ACKED = "250"
    TEMPFAIL = "451"
    UNANSWERED = "unanswered"
    """The dot was sent; the connection closed or timed out before any reply."""
    OTHER = "other"
    """A reply other than 250/451 to the dot (a bug for every scenario here)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One final dot and what came back."""

    outcome: Outcome
    sent_at: float
    """trio.current_time() when the final dot was written."""
    latency: float | None
    """Seconds from the final dot to the reply; None when unanswered."""
    reply: str = ""
    job_id: str | None = None


@dataclass(slots=True)
class MessageRecord:
    """One message (one Message-ID) and every attempt to deliver it."""

    message_id: str
    """Without angle brackets, as it is compared with the stored payload."""
    client: int
    size: int
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def job_id(self) -> str | None:
        """The id of the ``250``, if the message got one."""
        for attempt in self.attempts:
            if attempt.outcome is Outcome.ACKED:
                return attempt.job_id
        return None


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the generator saw, message by message, and the figures derived from it."""

    clients: int
    messages: tuple[MessageRecord, ...]
    connect_failures: int
    dropped_before_dot: int
    """Attempts cut off before their final dot (421, reset, refused mid-way)."""
    protocol_errors: tuple[str, ...]
    """Replies that no MTA expects to MAIL/RCPT/DATA, or unknown replies to the dot."""
    duration: float
    deferred_before_upload: int = 0
    """4xx replies to RCPT or DATA: the daemon knew its store was down."""

    @property
    def acked(self) -> dict[str, str]:
        """Message-ID → job id, for every message that got ``250``."""
        return {m.message_id: job for m in self.messages if (job := m.job_id) is not None}

    @property
    def acked_job_ids(self) -> list[str]:
        """Every job id a ``250`` named (with repeats, if there were any)."""
        return [a.job_id for m in self.messages for a in m.attempts if a.job_id is not None]

    def attempts(self, outcome: Outcome | None = None) -> list[Attempt]:
        return [
            a for m in self.messages for a in m.attempts if outcome is None or a.outcome is outcome
        ]

    @property
    def replies_451(self) -> int:
        """``451`` replies to a final dot."""
        return len(self.attempts(Outcome.TEMPFAIL))

    @property
    def deferred(self) -> int:
        """Every ``451``: to a final dot, or to RCPT/DATA before the upload."""
        return self.replies_451 + self.deferred_before_upload

    @property
    def unanswered(self) -> int:
        return len(self.attempts(Outcome.UNANSWERED))

    @property
    def other(self) -> list[str]:
        return [a.reply for a in self.attempts(Outcome.OTHER)]

    def max_latency(self, outcome: Outcome | None = None) -> float | None:
        latencies = [a.latency for a in self.attempts(outcome) if a.latency is not None]
        return max(latencies) if latencies else None

    def min_latency(self, outcome: Outcome | None = None) -> float | None:
        latencies = [a.latency for a in self.attempts(outcome) if a.latency is not None]
        return min(latencies) if latencies else None


class _Lost(Exception):
    """The connection closed, broke, or a read/write missed its deadline."""


class _Refused(Exception):
    """The server answered a command with something that ends this attempt."""

    def __init__(self, code: int, text: str, *, deferrable: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.deferrable = deferrable
        """A reply to RCPT or DATA, which an MTA may get 4xx to and retry."""


class _Conn:
    """One SMTP client connection: bounded writes, reads of whole replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, limit: float) -> _Conn:
        with trio.move_on_after(limit):
            try:
                stream = await trio.open_tcp_stream(HOST, port)
            except OSError as exc:
                raise _Lost(f"connect: {exc}") from None
            return cls(stream)
        raise _Lost("connect: timed out")

    async def send(self, data: bytes, limit: float) -> None:
        with trio.move_on_after(limit):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Lost(f"send: {exc!r}") from None
            return
        raise _Lost("send: timed out")

    async def reply(self, limit: float) -> tuple[int, str]:
        """The next complete reply: its code and its last line (as sent)."""
        with trio.move_on_after(limit):
            while True:
                while b"\r\n" in self.buffer:
                    raw, self.buffer = self.buffer.split(b"\r\n", 1)
                    line = raw.decode("utf-8", errors="replace")
                    if len(line) < 3 or not (line[:3].isascii() and line[:3].isdigit()):
                        raise _Refused(0, f"not a reply line: {line!r}")
                    if len(line) == 3 or line[3] == " ":
                        return int(line[:3]), line
                try:
                    chunk = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _Lost(f"receive: {exc!r}") from None
                if not chunk:
                    raise _Lost(f"receive: closed by the server; pending {self.buffer!r}")
                self.buffer += chunk
        raise _Lost(f"receive: no reply within {limit:g} s; pending {self.buffer!r}")

    async def command(self, line: str, expect: int, limit: float) -> None:
        await self.send(line.encode() + b"\r\n", limit)
        code, text = await self.reply(limit)
        if code != expect:
            verb = line.split(":")[0]
            deferrable = verb in ("RCPT TO", "DATA")
            raise _Refused(code, f"{verb!r} got {text!r}", deferrable=deferrable)

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _body(lines: int) -> bytes:
    """*lines* lines of plain text, CRLF-terminated, none starting with a dot."""
    out = bytearray()
    for i in range(lines):
        text = f"{i:06d} The quick brown fox jumps over the lazy dog; fault suite body text."
        out += text.ljust(LINE, "=")[:LINE].encode() + b"\r\n"
    return bytes(out)


class LoadGenerator:
    """*clients* concurrent SMTP clients sending until :meth:`stop`; see the module doc.

    *body_sizes* are approximate body sizes in octets; each message picks one
    at random. ``big_clients`` of the clients send ``big_size`` bodies instead
    (a 1 MB message, say). ``messages_per_client`` makes each client send only
    that many messages (then it quits, its connection closed with QUIT).
    """

    def __init__(
        self,
        port: int,
        *,
        clients: int = 8,
        tag: str = "load",
        body_sizes: tuple[int, ...] = (1024, 2048, 3072, 4096),
        big_clients: int = 0,
        big_size: int = 1024 * 1024,
        reply_timeout: float = 10.0,
        command_timeout: float = 5.0,
        retry_pause: tuple[float, float] = (0.05, 0.2),
        max_duration: float = 90.0,
        max_messages: int = 100_000,
        messages_per_client: int | None = None,
        finish_timeout: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.port = port
        self.clients = clients
        self.tag = tag
        self.reply_timeout = reply_timeout
        self.command_timeout = command_timeout
        self.retry_pause = retry_pause
        self.max_duration = max_duration
        self.max_messages = max_messages
        self.messages_per_client = messages_per_client
        self.finish_timeout = (
            finish_timeout if finish_timeout is not None else reply_timeout + command_timeout
        )
        self._random = random.Random(seed)
        self._run_id = f"{self._random.getrandbits(32):08x}"
        self._bodies = [_body(max(1, size // (LINE + 2))) for size in body_sizes]
        self._big_clients = big_clients
        self._big_body = _body(max(1, big_size // (LINE + 2))) if big_clients else b""
        self._stop = trio.Event()
        self._all_done = trio.Event()
        self._running = 0
        self._messages: list[MessageRecord] = []
        self._connect_failures = 0
        self._dropped_before_dot = 0
        self._deferred_before_upload = 0
        self._protocol_errors: list[str] = []
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._acks = 0
        self._tempfails = 0
        self._unanswered = 0
        self.in_flight = 0
        """Attempts whose final dot was sent and whose reply is awaited."""

    # -- control and live counters ---------------------------------------------

    def stop(self) -> None:
        """Start no new message or retry; finish the attempts under way."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def acks(self) -> int:
        """``250`` replies so far."""
        return self._acks

    @property
    def tempfails(self) -> int:
        """``451`` replies so far: to a final dot, or to RCPT/DATA before the upload
        (the daemon knew its store was down)."""
        return self._tempfails + self._deferred_before_upload

    @property
    def unanswered(self) -> int:
        return self._unanswered

    @property
    def finished(self) -> bool:
        return self._ended_at is not None

    def acked_now(self) -> dict[str, str]:
        """Message-ID → job id of every ``250`` so far (a snapshot)."""
        return {m.message_id: job for m in list(self._messages) if (job := m.job_id) is not None}

    def report(self) -> LoadReport:
        """The record so far (complete once :meth:`run` has returned)."""
        start = self._started_at or 0.0
        end = self._ended_at if self._ended_at is not None else trio.current_time()
        return LoadReport(
            clients=self.clients,
            messages=tuple(self._messages),
            connect_failures=self._connect_failures,
            dropped_before_dot=self._dropped_before_dot,
            protocol_errors=tuple(self._protocol_errors),
            duration=end - start,
            deferred_before_upload=self._deferred_before_upload,
        )

    # -- running ---------------------------------------------------------------

    async def run(self) -> LoadReport:
        """Run the clients until stopped (or a bound is reached); return the report."""
        self._started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._running = self.clients
            for n in range(self.clients):
                nursery.start_soon(self._client, n)
            with trio.move_on_after(self.max_duration):
                async with trio.open_nursery() as waiters:
                    # Told to stop, or every client is done (messages_per_client).
                    for event in (self._stop, self._all_done):
                        waiters.start_soon(_set_then_cancel, event, waiters.cancel_scope)
            self._stop.set()
            # In-flight attempts get their reply (each bounded by its own
            # deadlines); this bounds the whole finish once more.
            nursery.cancel_scope.deadline = trio.current_time() + self.finish_timeout
        self._ended_at = trio.current_time()
        return self.report()

    async def _pause(self, low: float | None = None, high: float | None = None) -> None:
        """A jittered pause that ends early on stop."""
        delay = self._random.uniform(
            self.retry_pause[0] if low is None else low,
            self.retry_pause[1] if high is None else high,
        )
        with trio.move_on_after(delay):
            await self._stop.wait()

    def _new_message(self, client: int, seq: int) -> tuple[MessageRecord, bytes, bytes]:
        """A record, the message's header block, and its body (with the final dot)."""
        token = f"{self.tag}.{self._run_id}.c{client:04d}.m{seq:06d}"
        message_id = f"{token}@{DOMAIN}"
        big = client < self._big_clients
        body = self._big_body if big else self._random.choice(self._bodies)
        headers = (
            f"From: Load Client {client} <client{client}@{DOMAIN}>\r\n"
            f"To: Sink <sink@{DOMAIN}>\r\n"
            f"Subject: fault marker {token}\r\n"
            f"Message-ID: <{message_id}>\r\n"
            "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        ).encode()
        record = MessageRecord(message_id, client, len(headers) + len(body))
        return record, headers, body

    async def _client(self, n: int) -> None:
        conn: _Conn | None = None
        current: tuple[MessageRecord, bytes, bytes] | None = None
        seq = 0
        try:
            while True:
                if current is None:
                    if self._stop.is_set() or len(self._messages) >= self.max_messages:
                        return
                    if self.messages_per_client is not None and seq >= self.messages_per_client:
                        return
                    seq += 1
                    current = self._new_message(n, seq)
                    self._messages.append(current[0])
                elif self._stop.is_set():
                    return  # a retry is due, but we were told to stop
                if conn is None:
                    try:
                        conn = await self._connect()
                    except (_Lost, _Refused):
                        self._connect_failures += 1
                        await self._pause()
                        continue
                try:
                    outcome = await self._attempt(conn, *current)
                except _Refused as exc:
                    if 400 <= exc.code < 500 and exc.code != 421 and exc.deferrable:
                        # Deferred before the upload: RSET, and again later.
                        self._deferred_before_upload += 1
                        try:
                            await conn.command("RSET", 250, self.command_timeout)
                        except (_Lost, _Refused):
                            await conn.close()
                            conn = None
                        await self._pause()
                        continue
                    # Before the dot: not an attempt; reconnect and send it again.
                    if exc.code != 421:
                        self._protocol_errors.append(str(exc))
                    self._dropped_before_dot += 1
                    await conn.close()
                    conn = None
                    await self._pause()
                    continue
                except _Lost:
                    # Before the dot: not an attempt; reconnect and send it again.
                    self._dropped_before_dot += 1
                    await conn.close()
                    conn = None
                    await self._pause()
                    continue
                if outcome is Outcome.ACKED:
                    current = None
                elif outcome is Outcome.TEMPFAIL:
                    await self._pause()
                else:  # unanswered or an unexpected reply: a new connection
                    await conn.close()
                    conn = None
                    await self._pause()
        finally:
            self._running -= 1
            if self._running == 0:
                self._all_done.set()
            if conn is not None:
                with trio.move_on_after(1.0) as scope:
                    scope.shield = True
                    try:
                        await conn.send(b"QUIT\r\n", 1.0)
                        await conn.reply(1.0)
                    except (_Lost, _Refused):
                        pass
                    await conn.close()

    async def _connect(self) -> _Conn:
        conn = await _Conn.open(self.port, self.command_timeout)
        try:
            await self._greet(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _greet(self, conn: _Conn) -> None:
        code, text = await conn.reply(self.command_timeout)
        if code != 220:
            raise _Refused(code, f"greeting {text!r}")
        await conn.command(f"EHLO client.{DOMAIN}", 250, self.command_timeout)

    async def _attempt(
        self, conn: _Conn, record: MessageRecord, headers: bytes, body: bytes
    ) -> Outcome:
        """MAIL … dot, and the reply; raises _Lost/_Refused before the dot."""
        timeout = self.command_timeout
        await conn.command(f"MAIL FROM:<client{record.client}@{DOMAIN}>", 250, timeout)
        await conn.command(f"RCPT TO:<sink@{DOMAIN}>", 250, timeout)
        await conn.command("DATA", 354, timeout)
        await conn.send(headers, timeout)
        # Bodies of a megabyte take a while on a busy machine.
        await conn.send(body, timeout + len(body) / 1e6 * 10)
        await conn.send(b".\r\n", timeout)
        sent_at = trio.current_time()
        self.in_flight += 1
        attempt: Attempt | None = None
        try:
            try:
                code, text = await conn.reply(self.reply_timeout)
            except (_Lost, _Refused) as exc:
                attempt = Attempt(Outcome.UNANSWERED, sent_at, None, str(exc))
                self._unanswered += 1
                return Outcome.UNANSWERED
            latency = trio.current_time() - sent_at
            if code == 250 and (match := QUEUED_RE.fullmatch(text)):
                attempt = Attempt(Outcome.ACKED, sent_at, latency, text, match.group(1))
                self._acks += 1
                return Outcome.ACKED
            # 421 4.3.1: the memory budget closed the session mid-upload; the
            # reply is read after the dot. A retry on a new connection.
            if code == 451 or text.startswith("421 4.3.1 "):
                attempt = Attempt(Outcome.TEMPFAIL, sent_at, latency, text)
                self._tempfails += 1
                return Outcome.TEMPFAIL
            attempt = Attempt(Outcome.OTHER, sent_at, latency, text)
            self._protocol_errors.append(f"reply to the dot: {text!r}")
            return Outcome.OTHER
        finally:
            self.in_flight -= 1
            if attempt is None:  # cancelled by the finish bound while waiting
                attempt = Attempt(Outcome.UNANSWERED, sent_at, None, "cancelled by the generator")
                self._unanswered += 1
            record.attempts.append(attempt)
