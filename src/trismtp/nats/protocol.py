"""The NATS client protocol, sans-io: bytes in, events out; values in, bytes out.

No sockets, no clock (as :mod:`trismtp.smtp.protocol` for SMTP), so it can be
fed anything by hypothesis. :mod:`trismtp.nats.client` is the I/O around it.

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

JetStream's replies are plain NATS messages: :func:`parse_pub_ack` and
:func:`api_error` read them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from trismtp import __version__
from trismtp.jobs.websocket import (
    PeerProtocolError,
)

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

# The status of a reply that says nobody subscribes to the request's subject.
STATUS_NO_RESPONDERS: Final = 503

_HEADER_VERSION: Final = "NATS/1.0"
_HEADER_NAME_RE: Final = re.compile(r"[!-9;-~]+")  # visible ASCII but ':'
_FORBIDDEN_IN_SUBJECT: Final = re.compile(r"[\s\x00]")


# -- errors -------------------------------------------------------------------


class NatsProtocolError(PeerProtocolError):
    """The server sent something that is not the NATS client protocol, or more
    of it than the parser's bounds allow."""

    protocol = "NATS"


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
    check_subject(subject, "subject", wildcards=True)
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
    check_subject(subject, "subject", wildcards=False)
    reply_part = f" {check_subject(reply, 'reply subject', wildcards=False)}" if reply else ""
    return b"".join([f"PUB {subject}{reply_part} {len(payload)}\r\n".encode(), payload, b"\r\n"])


def encode_hpub(
    subject: str, payload: bytes, headers: Mapping[str, Sequence[str]], *, reply: str = ""
) -> bytes:
    """``HPUB subject [reply] header_size total_size``, the header block and the payload."""
    return encode_hpub_block(subject, reply, encode_headers(headers), payload)


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


def encode_hpub_block(subject: str, reply: str, header_block: bytes, payload: bytes) -> bytes:
    check_subject(subject, "subject", wildcards=False)
    reply_part = f" {check_subject(reply, 'reply subject', wildcards=False)}" if reply else ""
    size = len(header_block)
    control = f"HPUB {subject}{reply_part} {size} {size + len(payload)}\r\n"
    return b"".join([control.encode(), header_block, payload, b"\r\n"])


def check_subject(subject: str, what: str, *, wildcards: bool) -> str:
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


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream stored a message: in *stream* at *seq*; *duplicate* when it
    had already stored one with the same ``Nats-Msg-Id`` (then *seq* is that
    message's)."""

    stream: str
    seq: int
    duplicate: bool = False


def parse_pub_ack(subject: str, reply: Msg) -> PubAck:
    if reply.status == STATUS_NO_RESPONDERS:
        raise JetStreamError(
            STATUS_NO_RESPONDERS,
            0,
            f"no stream for subject {subject!r} (no responders: "
            "no JetStream stream covers it, or JetStream is off)",
        )
    if reply.status is not None and reply.status >= 300:
        raise JetStreamError(reply.status, 0, reply.description or "error status")
    error = api_error(reply.payload)
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


def api_error(payload: bytes) -> JetStreamError | None:
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
