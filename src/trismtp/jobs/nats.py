"""NATS JetStream as a jobs destination: the NATS client protocol over WebSocket.

trismtp can push jobs to a NATS server's JetStream instead of (or besides) its
own jobs service. It speaks the NATS client protocol over the server's
WebSocket listener (``websocket { … }`` in nats-server's configuration), with
trio-websocket, so it needs no NATS library and no extra transport code.

The module has three parts.

The protocol (sans-io)
----------------------
:class:`Parser` turns what the server sends into events (:class:`Info`,
:class:`Msg`, :class:`Ping`, :class:`Pong`, :class:`Ok`, :class:`Err`). It is
fed arbitrary chunks: the server's WebSocket frames (binary) may split a
protocol line or a payload, or carry several operations at once, and the
events do not depend on where the cuts fall. It bounds what it buffers: a
control line is at most ``max_line`` bytes, a payload (headers included) at
most ``max_payload`` bytes, the limit the server announces in INFO. The
encoders (:func:`encode_connect`, :func:`encode_pub`, :func:`encode_hpub`,
:func:`encode_sub`, :func:`encode_unsub`, :data:`PING`, :data:`PONG`) refuse
what would break the framing: a subject with white space, a header name with
a colon, a header value with CR or LF. The server would otherwise read part of
a value as another header, or as another protocol operation.

The client
----------
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

RoadRunner's message format
---------------------------
:func:`roadrunner_message` writes a job the way RoadRunner's NATS jobs driver
writes and reads it: the JetStream-based driver in
github.com/roadrunner-server/nats, directory ``natsjobs/`` (module
``github.com/roadrunner-server/nats/v5`` and later). The files read:

* ``natsjobs/item.go`` at commit 046e36f9: ``type Item struct { Job string
  `json:"job"`; Ident string `json:"id"`; Payload []byte `json:"payload"`;
  headers map[string][]string; Options *Options `json:"options,omitempty"` }``
  and ``Options { Priority int64 `json:"priority"`; Pipeline string
  `json:"pipeline,omitempty"`; Delay int64 `json:"delay,omitempty"`; AutoAck
  bool `json:"auto_ack"`; Queue string }``. ``Payload`` is ``[]byte``, which
  Go's encoding/json writes and reads as standard base64 (with padding);
  ``headers`` is unexported, so it is not part of the JSON at all.
* ``natsjobs/driver.go`` at commit 006bc002, ``Push``: the body is
  ``json.Marshal(item)``, and the job's headers go out as the NATS message's
  headers (``msg.Header = j.headers``), published with JetStream
  (``PublishMsg``).
* ``natsjobs/unpack.go`` and ``natsjobs/listener.go`` (their newest versions,
  which call ``c.unpack(m.Data(), m.Headers(), item)``; ``item_test.go`` at
  commit ecc96b34 tests it): the consumer unmarshals the body into an Item
  and takes the job's headers from the NATS headers. It replaces
  ``options.pipeline`` with its own pipeline's name, uses the pipeline's
  priority when ``priority`` is 0, and adds ``x-nats-subject``. A body that
  does not unmarshal (a payload that is not base64, say) is not rejected: it
  becomes a job named ``deduced_by_rr`` with the raw bytes as its payload, so
  the format must be exact.

An older version (``item.go`` at commit 403fb47a: ``Payload string``,
``Headers `json:"headers"```) is not compatible with this one; we write the
newer one.

So a job whose JSON is::

    {"job":"smtp.email","id":"6f1c…","payload":"{\\"from\\":\\"a@example.org\\"}",
     "headers":{"uuid":["6f1c…"],"payload_class":["smtp:handler"]},
     "options":{"priority":10,"pipeline":"smtp","delay":0,"auto_ack":false}}

is published with the body::

    {"job":"smtp.email","id":"6f1c…","payload":"eyJmcm9tIjoiYUBleGFtcGxlLm9yZyJ9",
     "options":{"priority":10,"pipeline":"smtp","delay":0,"auto_ack":false}}

and the header block (``Nats-Msg-Id`` added by :meth:`NatsClient.publish_batch`)::

    NATS/1.0\\r\\nNats-Msg-Id: 6f1c…\\r\\nuuid: 6f1c…\\r\\npayload_class: smtp:handler\\r\\n\\r\\n

RoadRunner's own Push refuses jobs with a delay ("nats doesn't support delayed
messages"), and its consumer ignores ``delay``: a delayed job runs at once.

Credentials (user and password, or token) go into CONNECT only. They are
never logged nor put into an exception's text.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import math
import re
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import orjson
import trio
from pydantic import ValidationError
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
)

from trismtp import __version__
from trismtp.jobs.model import Job
from trismtp.jobs.websocket import (
    JobsUnavailable,
    PeerProtocolError,
    Stream,
    Target,
    collapse,
    map_exceptions,
    open_websocket,
    unavailable,
)

__all__ = [
    "MSG_ID_HEADER",
    "PING",
    "PONG",
    "Err",
    "Event",
    "Info",
    "JetStreamError",
    "MessageTooLarge",
    "Msg",
    "NatsAuthorizationError",
    "NatsClient",
    "NatsMessage",
    "NatsProtocolError",
    "Ok",
    "Parser",
    "Ping",
    "Pong",
    "PubAck",
    "StoredMessage",
    "encode_connect",
    "encode_headers",
    "encode_hpub",
    "encode_pub",
    "encode_sub",
    "encode_unsub",
    "ensure_stream",
    "first_messages",
    "get_message",
    "parse_headers",
    "roadrunner_message",
    "stream_info",
    "wire_size",
]

logger = logging.getLogger(__name__)

PING: Final = b"PING\r\n"
PONG: Final = b"PONG\r\n"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
"""The header JetStream deduplicates on, within the stream's duplicate window."""

DEFAULT_MAX_LINE: Final = 64 * 1024
"""Longest control line accepted from the server, CRLF included. INFO is the
longest one; in a large cluster it lists every server's URL."""
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
"""nats-server's default ``max_payload``, used until INFO says otherwise."""
DEFAULT_API_TIMEOUT: Final = 5.0
"""Seconds the JetStream helpers wait for each API reply."""
# One WebSocket message from the server: the parser bounds each operation in
# it; this bounds the message trio-websocket assembles before we see it.
MAX_WEBSOCKET_MESSAGE: Final = 64 * 1024 * 1024
CLOSE_TIMEOUT: Final = 2.0
PONG_TIMEOUT: Final = 10.0
"""Seconds the reader may spend sending one PONG before it gives up the connection."""

# JetStream API error codes (``err_code``), from nats-server's errors.json.
ERR_NO_MESSAGE: Final = 10037
ERR_STREAM_NAME_IN_USE: Final = 10058
ERR_STREAM_NOT_FOUND: Final = 10059
# The status of a reply that says nobody subscribes to the request's subject.
STATUS_NO_RESPONDERS: Final = 503

_HEADER_VERSION: Final = "NATS/1.0"
_HEADER_NAME_RE: Final = re.compile(r"[!-9;-~]+")  # visible ASCII but ':'
_FORBIDDEN_IN_SUBJECT: Final = re.compile(r"[\s\x00]")
_STREAM_NAME_FORBIDDEN: Final = re.compile(r"[\s.*>/\\\x00]")
_INBOX_SID: Final = "1"


# -- errors -------------------------------------------------------------------


class NatsProtocolError(PeerProtocolError):
    """The server sent something that is not the NATS client protocol, or more
    of it than the parser's bounds allow."""

    protocol = "NATS"


class NatsAuthorizationError(JobsUnavailable):
    """The server refused the credentials (``-ERR 'Authorization Violation'``).

    A :class:`~trismtp.jobs.rpc.JobsUnavailable`, so that callers that treat
    every connection failure alike need no special case; its text says which
    kind of credential was refused, never the credential itself.
    """


class JetStreamError(Exception):
    """JetStream refused a request, or no stream listens on the subject.

    *code* is the HTTP-like status (503: no responders, so no stream covers the
    subject or JetStream is off; 404: not found; 400: bad request; 0: found
    wrong by this client, not the server); *err_code* is JetStream's own code
    (10059: stream not found, 10077: storage unavailable…), 0 when the server
    gave none.
    """

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(code, err_code, description)
        self.code = code
        self.err_code = err_code
        self.description = description

    def __str__(self) -> str:
        return f"{self.description} (code {self.code}, err_code {self.err_code})"


class MessageTooLarge(JetStreamError):
    """A message (headers and data) is larger than the server's ``max_payload``.

    Raised before anything of the batch is sent: the server would answer an
    oversized message with ``-ERR 'Maximum Payload Violation'`` and close the
    connection, failing every other call on it. Sending it again cannot help.
    """

    def __init__(self, size: int, max_payload: int) -> None:
        super().__init__(
            413, 0, f"a message of {size} bytes exceeds the server's max_payload of {max_payload}"
        )
        self.size = size
        self.max_payload = max_payload


# -- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Info:
    """``INFO {json}``: the server describes itself (first thing it sends, and
    again when something changes, e.g. ``"ldm": true`` before it shuts down)."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Msg:
    """``MSG`` or ``HMSG``: a message delivered on one of our subscriptions.

    *headers* is None for ``MSG``. A reply with a *status* (``NATS/1.0 503``)
    is the server's own answer, not the responder's: 503 means nobody
    subscribes to the request's subject.
    """

    subject: str
    sid: str
    reply: str | None
    payload: bytes
    headers: dict[str, list[str]] | None = None
    status: int | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """``PING``: the server checks that we are alive; answer :data:`PONG`."""


@dataclass(frozen=True, slots=True)
class Pong:
    """``PONG``: the answer to our PING (the end of the handshake)."""


@dataclass(frozen=True, slots=True)
class Ok:
    """``+OK``: sent only in verbose mode, which we do not ask for."""


@dataclass(frozen=True, slots=True)
class Err:
    """``-ERR 'message'``, with the quotes removed. Most errors close the
    connection; 'Permissions Violation…' and 'Invalid Subject' do not."""

    message: str


Event = Info | Msg | Ping | Pong | Ok | Err


# -- the parser ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PendingMsg:
    """The control line of a MSG/HMSG whose payload has not all arrived yet."""

    subject: str
    sid: str
    reply: str | None
    header_size: int  # -1 for MSG
    total_size: int


class Parser:
    """Turns the bytes a NATS server sends into :data:`Event` objects.

    Call :meth:`feed` with each chunk as it arrives; it returns the events
    completed so far. Limits: a control line (CRLF included) longer than
    *max_line*, or a payload longer than *max_payload*, is a
    :class:`NatsProtocolError`, raised as soon as it is known (before the
    payload arrives). Set :attr:`max_payload` from INFO's ``max_payload``. After
    an error the parser is broken and raises it again on every call.
    """

    def __init__(
        self, *, max_line: int = DEFAULT_MAX_LINE, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        self.max_line = max_line
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._scanned = 0  # a prefix of the buffer known to hold no LF
        self._pending: _PendingMsg | None = None
        self._broken: NatsProtocolError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Add *data*; return the events it completed, in order."""
        if self._broken is not None:
            raise NatsProtocolError(*self._broken.args)
        self._buffer += data
        events: list[Event] = []
        try:
            while (event := self._next()) is not None:
                events.append(event)
        except NatsProtocolError as exc:
            self._broken = exc
            raise
        return events

    def _next(self) -> Event | None:
        buffer = self._buffer
        while True:
            pending = self._pending
            if pending is not None:
                size = pending.total_size
                if len(buffer) < size + 2:
                    return None
                if buffer[size : size + 2] != b"\r\n":
                    raise NatsProtocolError("a message's payload is not followed by CRLF")
                body = bytes(buffer[:size])
                del buffer[: size + 2]
                self._pending = None
                return _message(pending, body)
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) >= self.max_line:
                    raise NatsProtocolError(f"a control line is longer than {self.max_line} bytes")
                return None
            if end + 1 > self.max_line:
                raise NatsProtocolError(f"a control line is longer than {self.max_line} bytes")
            line = bytes(buffer[:end]).removesuffix(b"\r")
            del buffer[: end + 1]
            self._scanned = 0
            event = self._control(line)
            if event is not None:
                return event
            # A MSG or HMSG line: go on with its payload, which may be here already.

    def _control(self, line: bytes) -> Event | None:
        parts = line.split(None, 1)
        if not parts:
            raise NatsProtocolError("an empty control line")
        op = parts[0].upper()
        rest = parts[1] if len(parts) > 1 else b""
        if op in (b"MSG", b"HMSG"):
            self._pending = self._message_line(op, rest.split())
            return None
        if op == b"PING":
            return Ping()
        if op == b"PONG":
            return Pong()
        if op == b"+OK":
            return Ok()
        if op == b"-ERR":
            return Err(_text(rest.strip()).strip("'"))
        if op == b"INFO":
            try:
                data = json.loads(rest)
            except (ValueError, RecursionError) as exc:
                raise NatsProtocolError(f"INFO is not JSON ({exc})") from None
            if not isinstance(data, dict):
                raise NatsProtocolError("INFO is not a JSON object")
            return Info(data)
        raise NatsProtocolError(f"unknown protocol operation {_text(op[:16])!r}")

    def _message_line(self, op: bytes, args: list[bytes]) -> _PendingMsg:
        with_headers = op == b"HMSG"
        counts = (4, 5) if with_headers else (3, 4)
        if len(args) not in counts:
            raise NatsProtocolError(f"{op.decode()} has {len(args)} arguments")
        sizes = args[-2:] if with_headers else args[-1:]
        names = args[: len(args) - len(sizes)]
        if not all(size.isdigit() for size in sizes):
            raise NatsProtocolError(f"{op.decode()} has a size that is not a number")
        total = int(sizes[-1])
        header_size = int(sizes[0]) if with_headers else -1
        if total > self.max_payload:
            raise NatsProtocolError(
                f"a message of {total} bytes exceeds max_payload ({self.max_payload})"
            )
        if header_size > total:
            raise NatsProtocolError("HMSG has more header bytes than bytes")
        subject, sid = _text(names[0]), _text(names[1])
        reply = _text(names[2]) if len(names) == 3 else None
        return _PendingMsg(subject, sid, reply, header_size, total)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NatsProtocolError("a control line is not UTF-8") from None


def _message(pending: _PendingMsg, body: bytes) -> Msg:
    if pending.header_size < 0:
        return Msg(pending.subject, pending.sid, pending.reply, body)
    status, description, headers = parse_headers(body[: pending.header_size])
    return Msg(
        pending.subject,
        pending.sid,
        pending.reply,
        body[pending.header_size :],
        headers,
        status,
        description,
    )


def parse_headers(block: bytes) -> tuple[int | None, str, dict[str, list[str]]]:
    """Parse a NATS header block: ``(status, description, headers)``.

    The block starts with ``NATS/1.0``, optionally followed by a status code
    and its description (``NATS/1.0 503``), then ``Name: value`` lines, and
    ends with an empty line. Names keep their case; values lose the white space
    around them; a name given twice has several values.
    """
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise NatsProtocolError("a header block is not UTF-8") from None
    first, _, rest = text.partition("\r\n")
    if not first.startswith(_HEADER_VERSION):
        raise NatsProtocolError(f"a header block does not start with {_HEADER_VERSION}")
    status_text, _, description = first[len(_HEADER_VERSION) :].strip().partition(" ")
    status: int | None = None
    if status_text:
        if not (len(status_text) == 3 and status_text.isdigit()):
            raise NatsProtocolError(f"a header block has an invalid status {status_text[:8]!r}")
        status = int(status_text)
    headers: dict[str, list[str]] = {}
    for line in rest.split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME_RE.fullmatch(name):
            raise NatsProtocolError("a header line is not 'Name: value'")
        headers.setdefault(name, []).append(value.strip())
    return status, description.strip(), headers


# -- encoders -----------------------------------------------------------------


def encode_connect(
    *, user: str = "", password: str = "", token: str = "", name: str = "trismtp"
) -> bytes:
    """``CONNECT {json}``: no +OK for every operation (verbose false), headers
    and no-responders replies on. The result holds the credentials: never log it."""
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "lang": "python-trismtp",
        "version": __version__,
        "protocol": 1,
        "name": name,
    }
    if user or password:
        options["user"] = user
        options["pass"] = password
    if token:
        options["auth_token"] = token
    return b"CONNECT " + orjson.dumps(options) + b"\r\n"


def encode_sub(subject: str, sid: str, queue: str = "") -> bytes:
    """``SUB subject [queue] sid``; *subject* may have wildcards."""
    _check_subject(subject, "subject", wildcards=True)
    _check_token(sid, "sid")
    group = f" {_check_token(queue, 'queue group')}" if queue else ""
    return f"SUB {subject}{group} {sid}\r\n".encode()


def encode_unsub(sid: str, max_msgs: int | None = None) -> bytes:
    """``UNSUB sid [max_msgs]``: end the subscription (after *max_msgs* more)."""
    _check_token(sid, "sid")
    more = "" if max_msgs is None else f" {int(max_msgs)}"
    return f"UNSUB {sid}{more}\r\n".encode()


def encode_pub(subject: str, payload: bytes, *, reply: str = "") -> bytes:
    """``PUB subject [reply] size`` and the payload."""
    _check_subject(subject, "subject", wildcards=False)
    reply_part = f" {_check_subject(reply, 'reply subject', wildcards=False)}" if reply else ""
    return b"".join([f"PUB {subject}{reply_part} {len(payload)}\r\n".encode(), payload, b"\r\n"])


def encode_hpub(
    subject: str, payload: bytes, headers: Mapping[str, Sequence[str]], *, reply: str = ""
) -> bytes:
    """``HPUB subject [reply] header_size total_size``, the header block and the payload."""
    return _hpub(subject, reply, encode_headers(headers), payload)


def encode_headers(headers: Mapping[str, Sequence[str]]) -> bytes:
    """The header block: ``NATS/1.0``, one ``Name: value`` line per value, an empty line.

    Raises ValueError for a name that is not visible ASCII without ':' and
    for a value with CR or LF: either would let the value be read as another
    header. A name may have several values; a name with none is left out.
    """
    lines = [_HEADER_VERSION]
    for name, values in headers.items():
        if not _HEADER_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid NATS header name {name!r}")
        if isinstance(values, str):
            raise TypeError(f"header {name!r}: give a list of values, not a string")
        for value in values:
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of NATS header {name!r} contains CR or LF")
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _hpub(subject: str, reply: str, header_block: bytes, payload: bytes) -> bytes:
    _check_subject(subject, "subject", wildcards=False)
    reply_part = f" {_check_subject(reply, 'reply subject', wildcards=False)}" if reply else ""
    size = len(header_block)
    control = f"HPUB {subject}{reply_part} {size} {size + len(payload)}\r\n"
    return b"".join([control.encode(), header_block, payload, b"\r\n"])


def _check_subject(subject: str, what: str, *, wildcards: bool) -> str:
    if not subject or _FORBIDDEN_IN_SUBJECT.search(subject):
        raise ValueError(f"invalid NATS {what} {subject!r}: empty or has white space")
    tokens = subject.split(".")
    if any(not token for token in tokens):
        raise ValueError(f"invalid NATS {what} {subject!r}: an empty token")
    if not wildcards and any(token in ("*", ">") for token in tokens):
        raise ValueError(f"invalid NATS {what} {subject!r}: wildcards are for subscriptions")
    return subject


def _check_token(value: str, what: str) -> str:
    if not value or _FORBIDDEN_IN_SUBJECT.search(value):
        raise ValueError(f"invalid NATS {what} {value!r}")
    return value


# -- the client ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsMessage:
    """One message to publish to JetStream: its dedup id, body and headers."""

    msg_id: str
    data: bytes
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream stored a message: in *stream* at *seq*; *duplicate* when it
    had already stored one with the same ``Nats-Msg-Id`` (then *seq* is that
    message's)."""

    stream: str
    seq: int
    duplicate: bool = False


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
        self._inbox = inbox
        self._next_reply = itertools.count(1)
        self._pending: dict[str, tuple[_Waiter, int]] = {}
        # The sids of request_many's subscriptions, and their reply subjects.
        self._reply_sids: dict[str, str] = {}
        self._failure: JobsUnavailable | None = None
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
        body_error: BaseException | None = None
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                with map_exceptions(target), trio.fail_after(timeout):
                    ws, stream = await open_websocket(
                        nursery,
                        target,
                        max_message_size=MAX_WEBSOCKET_MESSAGE,
                        ssl_context=ssl_context,
                    )
                    try:
                        handshake = await _handshake(
                            ws, target, inbox, user=user, password=password, token=token
                        )
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
                client = cls(ws, stream, target, handshake, inbox)
                logger.debug("connected to NATS at %s", target)
                nursery.start_soon(client._read_loop, handshake.leftover)
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
            # Raised outside the except clause, so the group is not its context.
            raise error

    @property
    def closed(self) -> bool:
        """True once the connection has failed or the client was closed."""
        return self._failure is not None

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

        All messages go out in one WebSocket message, each with the header
        ``Nats-Msg-Id: <msg_id>`` besides its own headers, then the call waits
        for every acknowledgement, *timeout* seconds at most for the whole.

        Raises:

        * :class:`JetStreamError` if JetStream refused any message, or no stream
          covers *subject* (code 503), once every reply is in or the time is
          up. The other messages may have been stored: publish the batch again
          (duplicates are acknowledged, not stored twice).
        * :class:`MessageTooLarge` (a JetStreamError) before sending anything,
          if a message exceeds the server's ``max_payload``.
        * :class:`~trismtp.jobs.rpc.JobsUnavailable` if the connection is lost
          or some PubAck has not come within *timeout*; whether those messages
          were stored is unknown.
        * ValueError for an invalid subject or header, or a message whose
          headers already name ``Nats-Msg-Id``.
        """
        self._raise_if_failed()
        if not messages:
            return []
        _check_subject(subject, "subject", wildcards=False)
        frames: list[bytes] = []
        replies: list[str] = []
        for message in messages:
            if not message.msg_id:
                raise ValueError("a message needs a msg_id: JetStream deduplicates on it")
            if any(name.lower() == MSG_ID_HEADER.lower() for name in message.headers):
                raise ValueError(f"give the {MSG_ID_HEADER} as msg_id, not as a header")
            block = _header_block(message)
            size = len(block) + len(message.data)
            if size > self.max_payload:
                raise MessageTooLarge(size, self.max_payload)
            reply = self._new_reply()
            frames.append(_hpub(subject, reply, block, message.data))
            replies.append(reply)
        waiter = await self._call(subject, replies, b"".join(frames), timeout)
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
        self._raise_if_failed()
        _check_subject(subject, "subject", wildcards=False)
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
        error = _api_error(message.payload)
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
        self._raise_if_failed()
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        _check_subject(subject, "subject", wildcards=False)
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
        acks: list[PubAck] = []
        refused: list[JetStreamError] = []
        for reply in waiter.replies:
            if reply is None:
                continue
            try:
                acks.append(_pub_ack(subject, reply))
            except JetStreamError as exc:
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
        if waiter.error is not None:
            raise waiter.error
        if waiter.remaining:
            raise JobsUnavailable(
                f"no PubAck from {self._target} within {timeout:g} s for "
                f"{waiter.remaining} of {len(waiter.replies)} messages"
            )
        return acks

    async def _send(self, data: bytes, *, deadline: float | None = None) -> None:
        """Send *data* as one WebSocket message, never cut half-way.

        The send is shielded from cancellation, but not beyond *deadline*
        (default: the caller's): a send still unfinished then may have left a
        partial frame, so the connection fails.
        """
        self._raise_if_failed()
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
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure_copy()

    def _failure_copy(self) -> JobsUnavailable:
        # One instance per raise: tasks raising one object would tangle its traceback.
        assert self._failure is not None
        error = JobsUnavailable(str(self._failure), close_code=self._failure.close_code)
        error.__cause__ = self._failure.__cause__
        return error

    def _fail(self, failure: JobsUnavailable) -> None:
        """Stop for good: wake every waiting call with *failure*."""
        if self._failure is not None:
            return
        logger.debug("NATS client stops: %s", failure)
        self._failure = failure
        for waiter, _ in list(self._pending.values()):
            waiter.fail(self._failure_copy())
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


def _pub_ack(subject: str, reply: Msg) -> PubAck:
    if reply.status == STATUS_NO_RESPONDERS:
        raise JetStreamError(
            STATUS_NO_RESPONDERS,
            0,
            f"no stream for subject {subject!r} (no responders: "
            "no JetStream stream covers it, or JetStream is off)",
        )
    if reply.status is not None and reply.status >= 300:
        raise JetStreamError(reply.status, 0, reply.description or "error status")
    error = _api_error(reply.payload)
    if error is not None:
        raise error
    try:
        data = orjson.loads(reply.payload)
    except orjson.JSONDecodeError:
        data = None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("stream"), str)
        or type(data.get("seq")) is not int
    ):
        raise JetStreamError(0, 0, f"not a PubAck: {reply.payload[:200]!r}")
    return PubAck(data["stream"], data["seq"], data.get("duplicate") is True)


def _api_error(payload: bytes) -> JetStreamError | None:
    """The JetStreamError a JetStream API reply carries, if any."""
    if not payload.lstrip().startswith(b"{"):
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    code, err_code = error.get("code"), error.get("err_code", 0)
    description = error.get("description")
    return JetStreamError(
        code if type(code) is int else 0,
        err_code if type(err_code) is int else 0,
        description if isinstance(description, str) else "JetStream error",
    )


# -- JetStream helpers --------------------------------------------------------


class StoredMessage(NamedTuple):
    """A message read back from a stream."""

    seq: int
    headers: dict[str, list[str]]
    data: bytes


async def _api(
    client: NatsClient,
    api: str,
    payload: bytes,
    timeout: float,  # noqa: ASYNC109
) -> dict[str, Any]:
    subject = f"$JS.API.{api}"
    try:
        reply = await client.request(subject, payload, timeout)
    except JetStreamError as exc:
        if exc.code == STATUS_NO_RESPONDERS and exc.err_code == 0:
            raise JetStreamError(
                STATUS_NO_RESPONDERS, 0, f"JetStream is not enabled (no responders on {subject})"
            ) from None
        raise
    try:
        data = orjson.loads(reply)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise JetStreamError(0, 0, f"the reply to {subject} is not a JSON object")
    return data


def _check_stream_name(stream: str) -> None:
    if not stream or _STREAM_NAME_FORBIDDEN.search(stream):
        raise ValueError(f"invalid stream name {stream!r}")


async def stream_info(
    client: NatsClient,
    stream: str,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> dict[str, Any] | None:
    """The stream's info (``config``, ``state``…), or None if it does not exist."""
    _check_stream_name(stream)
    try:
        return await _api(client, f"STREAM.INFO.{stream}", b"", timeout)
    except JetStreamError as exc:
        if exc.err_code == ERR_STREAM_NOT_FOUND:
            return None
        raise


async def ensure_stream(
    client: NatsClient,
    stream: str,
    subjects: list[str],
    *,
    retention: str = "workqueue",
    duplicate_window: float = 120,
    storage: str = "file",
    replicas: int = 1,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> dict[str, Any]:
    """Create the stream if it is missing; return its info.

    A stream that exists is left as it is (its retention, limits and window
    are its owner's choice), but it must cover every subject in *subjects*,
    else JetStreamError (code 0) says which it lacks: messages published there
    would find no stream. *duplicate_window* is in seconds (the API counts
    nanoseconds); *retention* is ``workqueue``, ``limits`` or ``interest``,
    *storage* ``file`` or ``memory``; *replicas* matters in a cluster only.
    Other JetStream refusals (subjects that overlap another stream's…) are
    JetStreamError as the server words them.
    """
    _check_stream_name(stream)
    if not subjects:
        raise ValueError("a stream needs at least one subject")
    for subject in subjects:
        _check_subject(subject, "stream subject", wildcards=True)
    if retention not in ("workqueue", "limits", "interest"):
        raise ValueError(f"retention must be workqueue, limits or interest, not {retention!r}")
    if storage not in ("file", "memory"):
        raise ValueError(f"storage must be file or memory, not {storage!r}")
    if not 1 <= replicas <= 5:
        raise ValueError("replicas must be 1 to 5")
    if not (duplicate_window > 0 and math.isfinite(duplicate_window)):
        raise ValueError("duplicate_window must be a positive number of seconds")
    info = await stream_info(client, stream, timeout=timeout)
    if info is None:
        config = {
            "name": stream,
            "subjects": list(subjects),
            "retention": retention,
            "storage": storage,
            "num_replicas": replicas,
            "duplicate_window": round(duplicate_window * 1_000_000_000),
            "discard": "old",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": -1,
            "max_age": 0,
            "max_msg_size": -1,
        }
        try:
            created = await _api(client, f"STREAM.CREATE.{stream}", orjson.dumps(config), timeout)
        except JetStreamError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
            # Created by someone else since we looked: check theirs.
            info = await stream_info(client, stream, timeout=timeout)
            if info is None:
                raise
        else:
            logger.info("created JetStream stream %s for %s", stream, ", ".join(subjects))
            return created
    _check_covers(stream, info, subjects)
    return info


def _check_covers(stream: str, info: Mapping[str, Any], subjects: Sequence[str]) -> None:
    config = info.get("config")
    have = config.get("subjects") if isinstance(config, dict) else None
    patterns = [p for p in have if isinstance(p, str)] if isinstance(have, list) else []
    missing = [s for s in subjects if not any(_covers(p, s) for p in patterns)]
    if missing:
        raise JetStreamError(
            0,
            0,
            f"stream {stream!r} exists with subjects {patterns}, which do not cover "
            f"{', '.join(repr(s) for s in missing)}: add them to the stream, "
            "or configure another stream or subject",
        )


def _covers(pattern: str, subject: str) -> bool:
    """Does the subject pattern *pattern* match everything *subject* matches?"""
    want = subject.split(".")
    for index, token in enumerate(pattern.split(".")):
        if token == ">":
            return len(want) > index
        if index >= len(want):
            return False
        if token == "*":
            if want[index] == ">":
                return False
        elif token != want[index]:
            return False
    return len(want) == len(pattern.split("."))


async def get_message(
    client: NatsClient,
    stream: str,
    seq: int,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> tuple[dict[str, list[str]], bytes] | None:
    """The headers and data of the message at *seq*, or None if there is none
    (never stored, deleted, or acknowledged from a work queue)."""
    _check_stream_name(stream)
    found = await _get(client, stream, {"seq": seq}, timeout)
    return None if found is None else (found.headers, found.data)


async def first_messages(
    client: NatsClient,
    stream: str,
    limit: int,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> list[StoredMessage]:
    """Up to *limit* messages of the stream, oldest first, skipping deleted ones.

    One API request per message (``next_by_subj`` jumps over gaps);
    *timeout* bounds each request. Meant for inspection and tests, not for
    consuming: nothing is acknowledged or removed.
    """
    _check_stream_name(stream)
    found: list[StoredMessage] = []
    seq = 1
    while len(found) < limit:
        message = await _get(client, stream, {"seq": seq, "next_by_subj": ">"}, timeout)
        if message is None:
            break
        found.append(message)
        seq = message.seq + 1
    return found


async def _get(
    client: NatsClient,
    stream: str,
    query: Mapping[str, Any],
    timeout: float,  # noqa: ASYNC109
) -> StoredMessage | None:
    try:
        reply = await _api(client, f"STREAM.MSG.GET.{stream}", orjson.dumps(query), timeout)
    except JetStreamError as exc:
        if exc.err_code == ERR_NO_MESSAGE:
            return None
        raise
    message = reply.get("message")
    if not isinstance(message, dict) or type(message.get("seq")) is not int:
        raise JetStreamError(0, 0, "STREAM.MSG.GET replied without a message")
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
        header_block = base64.b64decode(message.get("hdrs") or "", validate=True)
    except (binascii.Error, TypeError):
        raise JetStreamError(0, 0, "STREAM.MSG.GET replied with invalid base64") from None
    headers = parse_headers(header_block)[2] if header_block else {}
    return StoredMessage(message["seq"], headers, data)


# -- RoadRunner's format ------------------------------------------------------


def _header_block(message: NatsMessage) -> bytes:
    return encode_headers({MSG_ID_HEADER: [message.msg_id], **message.headers})


def wire_size(message: NatsMessage) -> int:
    """What *message* counts against the server's ``max_payload``: headers and data."""
    return len(_header_block(message)) + len(message.data)


def roadrunner_message(job_json: str) -> tuple[bytes, dict[str, list[str]]]:
    """The body and NATS headers RoadRunner's NATS jobs driver reads for a job.

    *job_json* is a :class:`~trismtp.jobs.model.Job` as JSON
    (:meth:`~trismtp.jobs.model.Job.to_json`). The body is the job without
    its headers and with ``payload`` as standard base64 of the payload's UTF-8
    bytes (RoadRunner's ``Payload []byte``); the headers are the job's, to be
    sent as the message's NATS headers (see the module docstring). Raises
    ValueError if *job_json* is not a job.
    """
    try:
        job = Job.model_validate_json(job_json)
    except ValidationError as exc:
        raise ValueError(f"not a job: {exc}") from None
    options = job.options
    body = {
        "job": job.job,
        "id": job.id,
        "payload": base64.b64encode(job.payload.encode("utf-8")).decode("ascii"),
        "options": {
            "priority": options.priority,
            "pipeline": options.pipeline,
            "delay": options.delay,
            "auto_ack": options.auto_ack,
        },
    }
    return orjson.dumps(body), {name: list(values) for name, values in job.headers.items()}
