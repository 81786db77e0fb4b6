"""A NATS client over the server's WebSocket listener, for JetStream publishing.

:meth:`NatsClient.connect` opens the WebSocket, reads INFO, sends CONNECT, one
wildcard subscription for replies (``_INBOX.<random>.*``) and PING, and waits
for PONG: then the server has accepted the credentials and the subscription.
One reader task, in the nursery the context manager owns (as in
:class:`~trismtp.jobs.rpc.JobsClient`), answers the server's PINGs and hands
each reply to the call waiting on its reply subject. Every transport failure
becomes :class:`~trismtp.jobs.rpc.JobsUnavailable`, so the pusher handles a
lost NATS connection exactly like a lost jobs service; a refusal by JetStream
is :class:`JetStreamError`.

:meth:`NatsClient.publish_batch` writes all HPUBs of a batch in one WebSocket
message, each with its own reply subject, then waits for every PubAck. Each
message carries ``Nats-Msg-Id``: JetStream stores one message per id within
the stream's duplicate window, so a batch sent again after a lost connection
stores nothing twice (the PubAck says ``duplicate``).

A send is never cut half-way (a partial frame would corrupt the stream for
everyone): it is shielded from cancellation, but not beyond the call's
timeout. A send that cannot finish by then fails the connection.

For consumers (see ``examples/nats_consumer.py``), :meth:`NatsClient.request_many`
collects the several messages that answer one request, such as a JetStream
pull request, each with its own reply subject to acknowledge it on.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
)

from trismtp.jobs.websocket import (
    FailureLatch,
    JobsUnavailable,
    Stream,
    Target,
    open_websocket,
    run_client,
    unavailable,
)
from trismtp.nats.protocol import (
    MSG_ID_HEADER,
    PING,
    PONG,
    STATUS_NO_RESPONDERS,
    Err,
    Event,
    Info,
    JetStreamError,
    MessageTooLarge,
    Msg,
    NatsProtocolError,
    Parser,
    Ping,
    Pong,
    PubAck,
    api_error,
    check_subject,
    encode_connect,
    encode_headers,
    encode_hpub_block,
    encode_pub,
    encode_sub,
    encode_unsub,
    parse_pub_ack,
)

logger = logging.getLogger(__name__)

# One WebSocket message from the server: the parser bounds each operation in
# it; this bounds the message trio-websocket assembles before we see it.
MAX_WEBSOCKET_MESSAGE: Final = 64 * 1024 * 1024
CLOSE_TIMEOUT: Final = 2.0
PONG_TIMEOUT: Final = 10.0
"""Seconds the reader may spend sending one PONG before it gives up the connection."""
_INBOX_SID: Final = "1"


class NatsAuthorizationError(JobsUnavailable):
    """The server refused the credentials (``-ERR 'Authorization Violation'``).

    A :class:`~trismtp.jobs.rpc.JobsUnavailable`, so that callers that treat
    every connection failure alike need no special case; its text says which
    kind of credential was refused, never the credential itself.
    """


# -- the client ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsMessage:
    """One message to publish to JetStream (on its own *subject*, if it has one).

    *msg_id*, when not empty, goes out as ``Nats-Msg-Id``: JetStream then
    stores one message per id within the stream's duplicate window. trismtp's
    own jobs carry none (see :mod:`trismtp.jobs.sinks` for why).
    """

    msg_id: str
    data: bytes
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    subject: str = ""
    """Where to publish it, when not the batch's subject."""


class PublishIncomplete(JobsUnavailable):
    """The connection failed, or time ran out, before every PubAck of a batch came.

    :attr:`acks` holds, in the batch's order, the PubAck of each message that
    got one (it is stored) and None for the others, whose fate is unknown:
    they may be stored or not.
    """

    def __init__(self, message: str, acks: Sequence[PubAck | None]) -> None:
        super().__init__(message)
        self.acks = list(acks)


def _parse_target(url: str) -> Target:
    if "@" in urlsplit(url).netloc:
        # Not echoed: the URL holds a secret.
        raise ValueError("a NATS URL must not carry credentials: give user and password, or token")
    return Target.parse(url, schemes=("nats+ws", "nats+wss"), what="NATS URL")


class _Waiter:
    """Where the reader leaves the replies to one call: a request or a batch."""

    __slots__ = ("done", "error", "remaining", "replies", "subject")

    def __init__(self, count: int, subject: str) -> None:
        self.done = trio.Event()
        self.replies: list[Msg | None] = [None] * count
        self.remaining = count
        self.error: BaseException | None = None
        self.subject = subject  # where the call published: for permission errors

    def deliver(self, index: int, reply: Msg) -> None:
        if self.done.is_set() or self.replies[index] is not None:
            return
        self.replies[index] = reply
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def wants_more(self) -> bool:
        """Does the call still wait for messages on a reply subject it got one on?"""
        return False


class _Collector(_Waiter):
    """Where the reader leaves the replies to a request answered by several
    messages on one reply subject: up to *limit* of them, or up to the first
    that carries a status (see :meth:`NatsClient.request_many`)."""

    __slots__ = ("limit", "messages")

    def __init__(self, limit: int, subject: str) -> None:
        super().__init__(1, subject)
        self.limit = limit
        self.messages: list[Msg] = []

    def deliver(self, index: int, reply: Msg) -> None:
        if self.done.is_set():
            return
        self.messages.append(reply)
        if len(self.messages) >= self.limit or reply.status is not None:
            self.done.set()

    def wants_more(self) -> bool:
        return not self.done.is_set()


def _as_bytes(message: str | bytes) -> bytes:
    # nats-server sends binary frames; a text frame is the same bytes in UTF-8.
    return message.encode() if isinstance(message, str) else message


class _Handshake(NamedTuple):
    parser: Parser
    info: dict[str, Any]
    leftover: list[Event]


async def _handshake(
    ws: WebSocketConnection,
    target: Target,
    inbox: str,
    *,
    user: str,
    password: str,
    token: str,
) -> _Handshake:
    """INFO, then CONNECT + SUB + PING, then PONG: the server accepted us."""
    parser = Parser()
    events: deque[Event] = deque()

    async def next_event() -> Event:
        while not events:
            events.extend(parser.feed(_as_bytes(await ws.get_message())))
        return events.popleft()

    first = await next_event()
    if not isinstance(first, Info):
        raise NatsProtocolError(f"the server began with {type(first).__name__}, not INFO")
    info = first.data
    if not info.get("headers"):
        raise JobsUnavailable(f"{target} does not support message headers (nats-server < 2.2)")
    _apply_info(parser, info)
    await ws.send_message(
        encode_connect(user=user, password=password, token=token)
        + encode_sub(inbox + "*", _INBOX_SID)
        + PING
    )
    while True:
        event = await next_event()
        if isinstance(event, Pong):
            return _Handshake(parser, info, list(events))
        if isinstance(event, Err):
            raise _refusal(event.message, target, user=user, password=password, token=token)
        if isinstance(event, Ping):
            await ws.send_message(PONG)
        elif isinstance(event, Info):
            info = event.data
            _apply_info(parser, info)


def _apply_info(parser: Parser, info: Mapping[str, Any]) -> None:
    max_payload = info.get("max_payload")
    if type(max_payload) is int and max_payload > 0:
        parser.max_payload = max_payload


def _refusal(
    message: str, target: Target, *, user: str, password: str, token: str
) -> JobsUnavailable:
    """The error for an ``-ERR`` during the handshake, with no secret in it."""
    for secret in (password, token):
        if secret:
            message = message.replace(secret, "***")
    if "authorization" in message.lower() or "authentication" in message.lower():
        if token:
            sent = "refused the token"
        elif user or password:
            sent = "refused the user and password"
        else:
            sent = "requires credentials and none were given"
        return NatsAuthorizationError(f"{target} {sent}: {message}")
    return JobsUnavailable(f"{target} refused the connection: {message}")


class NatsClient:
    """A NATS connection for JetStream publishing; open it with :meth:`connect`.

    Safe to share between tasks: calls may overlap, and each reply goes to its
    own reply subject. Once :attr:`closed`, every call raises
    :class:`~trismtp.jobs.rpc.JobsUnavailable`.

    Calls take a *timeout* rather than leaving it to the caller's cancel
    scope: running out of it is a verdict (JobsUnavailable: no answer in
    time), and the send that began is finished rather than cut.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: Stream,
        target: Target,
        handshake: _Handshake,
        inbox: str,
    ) -> None:
        self._ws = ws
        self._stream = stream
        self._target = target
        self._parser = handshake.parser
        self._info = handshake.info
        # Events read with the handshake's last frame, for the reader to handle first.
        self._leftover = handshake.leftover
        self._inbox = inbox
        self._next_reply = itertools.count(1)
        self._pending: dict[str, tuple[_Waiter, int]] = {}
        # The sids of request_many's subscriptions, and their reply subjects.
        self._reply_sids: dict[str, str] = {}
        self._failure = FailureLatch()
        #: PINGs the server sent and this client answered (for monitoring and tests).
        self.pings_answered = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        user: str = "",
        password: str = "",
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> AsyncIterator[NatsClient]:
        """Connect to the NATS server's WebSocket listener at *url*.

        *url* is ``nats+ws://HOST:PORT[/path]`` (plain WebSocket) or
        ``nats+wss://…`` (TLS, verified with *ssl_context*, by default the
        system's CAs). Give *user* and *password*, or *token*, if the server
        requires them; never in the URL.

        Raises :class:`~trismtp.jobs.rpc.JobsUnavailable` if the server cannot
        be reached, is no NATS server, or has not completed the handshake
        within *timeout* seconds; :class:`NatsAuthorizationError` (a
        JobsUnavailable) if it refuses the credentials; ValueError for a URL
        that is not one of the above. Leaving the block closes the connection;
        calls still waiting then raise JobsUnavailable.
        """
        target = _parse_target(url)
        if token and (user or password):
            raise ValueError("give either a token or a user and password, not both")
        inbox = f"_INBOX.{secrets.token_hex(11)}."

        async def opener(nursery: trio.Nursery) -> NatsClient:
            ws, stream = await open_websocket(
                nursery, target, max_message_size=MAX_WEBSOCKET_MESSAGE, ssl_context=ssl_context
            )
            try:
                handshake = await _handshake(
                    ws, target, inbox, user=user, password=password, token=token
                )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            logger.debug("connected to NATS at %s", target)
            return cls(ws, stream, target, handshake, inbox)

        async with run_client(target, timeout, opener) as client:
            yield client

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._read_loop, self._leftover)
        self._leftover = []

    @property
    def closed(self) -> bool:
        """True once the connection has failed or the client was closed."""
        return self._failure.failure is not None

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's latest INFO (``version``, ``max_payload``, ``jetstream``…)."""
        return dict(self._info)

    @property
    def max_payload(self) -> int:
        """The largest message (headers and data) the server accepts, in bytes."""
        return self._parser.max_payload

    async def publish_batch(
        self,
        subject: str,
        messages: Sequence[NatsMessage],
        timeout: float,  # noqa: ASYNC109
    ) -> list[PubAck]:
        """Publish *messages* to JetStream on *subject*; return their PubAcks in order.

        All messages go out in one WebSocket message, each with its headers
        (and ``Nats-Msg-Id: <msg_id>`` where the message has a msg_id), then
        the call waits for every acknowledgement, *timeout* seconds at most for
        the whole.

        Raises:

        * :class:`JetStreamError` if JetStream refused any message, or no stream
          covers *subject* (code 503), once every reply is in or the time is
          up. The other messages may have been stored.
        * :class:`MessageTooLarge` (a JetStreamError) before sending anything,
          if a message exceeds the server's ``max_payload``.
        * :class:`PublishIncomplete` (a JobsUnavailable) if the connection is
          lost or some PubAck has not come within *timeout*: it tells which
          messages are stored (those with a PubAck); the others may or may
          not be.
        * :class:`~trismtp.jobs.rpc.JobsUnavailable` if the connection had
          already failed: nothing was sent.
        * ValueError for an invalid subject or header, or a message whose
          headers already name ``Nats-Msg-Id``.
        """
        self._failure.check()
        if not messages:
            return []
        check_subject(subject, "subject", wildcards=False)
        frames: list[bytes] = []
        replies: list[str] = []
        for message in messages:
            if any(name.lower() == MSG_ID_HEADER.lower() for name in message.headers):
                raise ValueError(f"give the {MSG_ID_HEADER} as msg_id, not as a header")
            block = _header_block(message)
            size = len(block) + len(message.data)
            if size > self.max_payload:
                raise MessageTooLarge(size, self.max_payload)
            target = subject
            if message.subject:
                target = check_subject(message.subject, "subject", wildcards=False)
            reply = self._new_reply()
            frames.append(encode_hpub_block(target, reply, block, message.data))
            replies.append(reply)
        try:
            waiter = await self._call(subject, replies, b"".join(frames), timeout)
        except JobsUnavailable as exc:
            # The send began: some of the batch may have reached the server.
            raise PublishIncomplete(str(exc), [None] * len(messages)) from exc
        return self._pub_acks(subject, waiter, timeout)

    async def request(
        self,
        subject: str,
        data: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> bytes:
        """Send *data* to *subject* and return the one reply's payload.

        For the JetStream API (``$JS.API.…``). Raises :class:`JetStreamError`
        if nobody listens on *subject* (code 503) or the reply is a JSON object
        with an ``error`` (a JetStream API error);
        :class:`~trismtp.jobs.rpc.JobsUnavailable` if the connection is lost
        or no reply came within *timeout* seconds.
        """
        self._failure.check()
        check_subject(subject, "subject", wildcards=False)
        if len(data) > self.max_payload:
            raise MessageTooLarge(len(data), self.max_payload)
        reply = self._new_reply()
        waiter = await self._call(subject, [reply], encode_pub(subject, data, reply=reply), timeout)
        message = waiter.replies[0]
        if message is None:
            if waiter.error is not None:
                raise waiter.error
            raise JobsUnavailable(f"no reply from {self._target} to {subject} within {timeout:g} s")
        if message.status is not None and message.status >= 300:
            if message.status == STATUS_NO_RESPONDERS:
                raise JetStreamError(
                    STATUS_NO_RESPONDERS, 0, f"no responders on {subject}: nobody serves it"
                )
            raise JetStreamError(message.status, 0, message.description or "error status")
        error = api_error(message.payload)
        if error is not None:
            raise error
        return message.payload

    async def request_many(
        self,
        subject: str,
        data: bytes,
        *,
        max_messages: int,
        timeout: float,  # noqa: ASYNC109
    ) -> list[Msg]:
        """Send *data* to *subject* and collect the messages that answer it, in order.

        For requests that several messages answer on one reply subject, such
        as JetStream's pull request (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``,
        ``{"batch": N, "expires": NANOSECONDS}``). Those messages keep their
        own subject (the one they were published on), so the reply subject
        gets a subscription of its own (removed by the server after
        *max_messages* messages, by the client when the call ends earlier).
        Each :class:`Msg` keeps its own :attr:`~Msg.reply` subject: for
        JetStream, where to send its acknowledgement (``+ACK``, ``-NAK``…,
        e.g. with :meth:`request`).

        The collection ends after *max_messages* messages, after a message
        with a status (``NATS/1.0 404 No Messages``, ``408 Request Timeout``…),
        which is then the last of the list, or after *timeout* seconds, which
        is no error: the list holds what came. Raises :class:`JetStreamError`
        (code 503) if nobody listens on *subject*;
        :class:`~trismtp.jobs.rpc.JobsUnavailable` if the connection is lost
        (what was collected is lost with it).
        """
        self._failure.check()
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        check_subject(subject, "subject", wildcards=False)
        if len(data) > self.max_payload:
            raise MessageTooLarge(len(data), self.max_payload)
        # A subject the inbox's wildcard (one token) does not match, and its own sid.
        sid = f"r{next(self._next_reply)}"
        reply = f"{self._inbox}{sid}.replies"
        request = (
            encode_sub(reply, sid)
            + encode_unsub(sid, max_messages)
            + encode_pub(subject, data, reply=reply)
        )
        collector = _Collector(max_messages, subject)
        self._reply_sids[sid] = reply
        try:
            await self._call(subject, [reply], request, timeout, collector)
        finally:
            del self._reply_sids[sid]
        if collector.error is not None:
            raise collector.error
        messages = collector.messages
        if len(messages) < max_messages and not self.closed:
            await self._send(encode_unsub(sid))
        if len(messages) == 1 and messages[0].status == STATUS_NO_RESPONDERS:
            raise JetStreamError(
                STATUS_NO_RESPONDERS, 0, f"no responders on {subject}: nobody serves it"
            )
        return messages

    # -- internals ----------------------------------------------------------

    def _new_reply(self) -> str:
        return f"{self._inbox}{next(self._next_reply)}"

    async def _call(
        self,
        subject: str,
        replies: list[str],
        data: bytes,
        timeout: float,  # noqa: ASYNC109
        waiter: _Waiter | None = None,
    ) -> _Waiter:
        """Send *data*, then wait until every reply subject got its reply (or
        *waiter* says it is done), the connection fails or *timeout* passes;
        the waiter tells which."""
        if waiter is None:
            waiter = _Waiter(len(replies), subject)
        for index, reply in enumerate(replies):
            self._pending[reply] = (waiter, index)
        try:
            with trio.move_on_after(timeout):
                await self._send(data)
                await waiter.done.wait()
        finally:
            for reply in replies:
                self._pending.pop(reply, None)
        return waiter

    def _pub_acks(self, subject: str, waiter: _Waiter, timeout: float) -> list[PubAck]:
        acks: list[PubAck | None] = []
        refused: list[JetStreamError] = []
        for reply in waiter.replies:
            if reply is None:
                acks.append(None)
                continue
            try:
                acks.append(parse_pub_ack(subject, reply))
            except JetStreamError as exc:
                acks.append(None)
                refused.append(exc)
        if refused:
            first = refused[0]
            total = len(waiter.replies)
            if total > 1:
                first = JetStreamError(
                    first.code,
                    first.err_code,
                    f"{first.description} ({len(refused)} of {total} messages refused)",
                )
            raise first
        if isinstance(waiter.error, JetStreamError):
            raise waiter.error
        if waiter.error is not None:
            raise PublishIncomplete(str(waiter.error), acks) from waiter.error
        if waiter.remaining:
            raise PublishIncomplete(
                f"no PubAck from {self._target} within {timeout:g} s for "
                f"{waiter.remaining} of {len(waiter.replies)} messages",
                acks,
            )
        return [ack for ack in acks if ack is not None]

    async def _send(self, data: bytes, *, deadline: float | None = None) -> None:
        """Send *data* as one WebSocket message, never cut half-way.

        The send is shielded from cancellation, but not beyond *deadline*
        (default: the caller's): a send still unfinished then may have left a
        partial frame, so the connection fails.
        """
        self._failure.check()
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing sent yet: safe to stop
        if deadline is None:
            deadline = trio.current_effective_deadline()
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await self._ws.send_message(data)
            except ConnectionClosed as exc:
                self._fail(self._lost(exc))
        if scope.cancelled_caught:
            self._fail(
                JobsUnavailable(f"timed out sending to {self._target}: dropped the connection")
            )
        self._failure.check()

    def _fail(self, failure: JobsUnavailable) -> None:
        """Stop for good: wake every waiting call with *failure*."""
        if not self._failure.trip(failure):
            return
        logger.debug("NATS client stops: %s", failure)
        for waiter, _ in list(self._pending.values()):
            waiter.fail(self._failure.copy())
        self._pending.clear()

    def _lost(self, exc: BaseException) -> JobsUnavailable:
        mapped = unavailable(exc, self._target)
        assert mapped is not None, exc
        return mapped

    async def _aclose(self) -> None:
        self._fail(JobsUnavailable(f"the connection to {self._target} was closed by this client"))
        if trio.current_effective_deadline() != -math.inf:
            # Not being cancelled: the reader still runs and sees the close frame.
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._ws.aclose()
        await trio.aclose_forcefully(self._stream)

    async def _read_loop(self, leftover: list[Event]) -> None:
        try:
            await self._handle(leftover)
            while True:
                await self._handle(self._parser.feed(_as_bytes(await self._ws.get_message())))
        except ConnectionClosed as exc:
            self._fail(self._lost(exc))
        except NatsProtocolError as exc:
            self._fail(self._lost(exc))
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(1002, "NATS protocol error")
        except JobsUnavailable:
            pass  # _send failed the client while answering a PING

    async def _handle(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, Msg):
                self._deliver(event)
            elif isinstance(event, Ping):
                await self._send(PONG, deadline=trio.current_time() + PONG_TIMEOUT)
                self.pings_answered += 1
            elif isinstance(event, Info):
                self._info = event.data
                _apply_info(self._parser, event.data)
                if event.data.get("ldm"):
                    logger.info("the NATS server at %s is shutting down (lame duck)", self._target)
            elif isinstance(event, Err):
                self._server_error(event.message)

    def _deliver(self, message: Msg) -> None:
        if message.sid == _INBOX_SID:
            reply = message.subject
        else:  # on a subscription of request_many, with the subject it was published on
            reply = self._reply_sids.get(message.sid, "")
        entry = self._pending.get(reply)
        if entry is None:
            # The caller gave up (timed out or was cancelled) before its reply.
            logger.debug("NATS reply on %s, which no call waits for", message.subject)
            return
        waiter, index = entry
        waiter.deliver(index, message)
        if not waiter.wants_more():
            del self._pending[reply]

    def _server_error(self, message: str) -> None:
        lowered = message.lower()
        if lowered.startswith("permissions violation for publish"):
            # No reply will come for these publishes: fail their calls now.
            waiters = {id(w): w for w, _ in self._pending.values()}.values()
            hit = [w for w in waiters if f'"{w.subject}"' in message] or list(waiters)
            for waiter in hit:
                waiter.fail(JetStreamError(403, 0, message))
            logger.warning("NATS server at %s: %s", self._target, message)
        elif lowered.startswith(("permissions violation", "invalid subject")):
            logger.warning("NATS server at %s: %s", self._target, message)
        else:
            # Every other -ERR comes right before the server closes the connection.
            self._fail(JobsUnavailable(f"{self._target} reported an error: {message}"))


def _header_block(message: NatsMessage) -> bytes:
    if not message.msg_id:
        return encode_headers(message.headers)
    return encode_headers({MSG_ID_HEADER: [message.msg_id], **message.headers})


def wire_size(message: NatsMessage) -> int:
    """What *message* counts against the server's ``max_payload``: headers and data."""
    return len(_header_block(message)) + len(message.data)
