"""The SMTP server protocol as a sans-io state machine.

Theory of operation
===================

A :class:`ServerConnection` knows RFC 5321 and nothing else: no sockets, no
clocks, no jobs. The server feeds it the bytes it reads
(:meth:`~ServerConnection.receive_data`, ``b""`` for end of file), takes
events out (:meth:`~ServerConnection.next_event`) and writes whatever
:meth:`~ServerConnection.send` returns. Because it is pure, hypothesis can
drive it with arbitrary byte streams and no server at all.

Each command becomes a :class:`Command` event that carries the reply the
protocol proposes (``event.reply``). The application answers every event
with exactly one :meth:`send`; usually it sends the proposed reply, but it may
send another one (``421`` when shutting down, a policy refusal later). The
state transition a command asks for happens only when a *positive* reply
(2xx/3xx) to it is sent, so a refused ``RCPT`` adds no recipient and a
refused ``DATA`` does not start a message. A reply of ``421`` closes the
connection whatever the command was.

The end of ``DATA`` is a :class:`MessageReceived` event with the envelope and
the unstuffed message. Its reply is the application's to choose (``250`` once
the job is durable, ``451`` otherwise); until it is sent no further input is
processed, which is what keeps replies to pipelined commands in order.

Limits are enforced as bytes arrive, never after buffering them whole:

* a command line longer than 512 octets is discarded as it streams in and
  answered ``500`` when its end arrives;
* in ``DATA``, bytes past ``max_message_size`` or in a text line longer than
  ``max_line_length`` octets (1000) are dropped as they arrive, only a short
  tail is kept to find the terminator, and the reply after the final dot is
  ``552`` or ``500``.

Only ``<CRLF>.<CRLF>`` ends ``DATA``; a dot is removed only where it starts a
line that follows a CRLF. A bare LF or CR is data, never a line end for the
purpose of ending the message, which is what defeats SMTP smuggling. A
message that holds one then has every bare CR and LF turned into CRLF
(``bare_newlines = "normalize"``, the default) or is refused (``554 5.6.0``,
``"reject"``).

STARTTLS and AUTH
-----------------

The machine does the SMTP side of both and leaves cryptography to the
application. ``220`` sent to ``STARTTLS`` puts it in ``State.TLS``: whatever
the client pipelined after the command is discarded (RFC 3207, CVE-2011-0411),
HELO and AUTH are forgotten, and :meth:`~ServerConnection.next_event` refuses
to run until the application has done the handshake and called
:meth:`~ServerConnection.tls_established`.

``AUTH`` (PLAIN, LOGIN) is a short exchange of ``334`` challenges; each step
is a ``Command`` with verb ``AUTH`` and the mechanism as its argument (never
the response, which holds the password). The last step proposes ``235`` and
carries the decoded :class:`~trismtp.auth.Credentials`: the application
checks them and sends ``235``, or ``535`` to refuse. Any non-``334`` reply
ends the exchange.

States (``State``) and the commands each accepts::

    GREETING  --send(220)-->          READY
    READY     EHLO/HELO         -->   READY (hello known)
    READY     MAIL (after hello) -->  MAIL
    MAIL      RCPT              -->   RCPT
    RCPT      RCPT              -->   RCPT
    RCPT      DATA --send(354)-->     DATA
    DATA      <CRLF>.<CRLF>     -->   MESSAGE  (MessageReceived pending)
    MESSAGE   --send(any)-->          READY
    READY     STARTTLS --send(220)--> TLS --tls_established()--> READY (hello forgotten)
    READY     AUTH --send(334)-->     AUTH --send(334)--> AUTH --send(any)--> READY
    any       RSET              -->   READY (envelope cleared)
    any       QUIT --send(221)-->     CLOSED
    any       --send(421)-->          CLOSED
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from trismtp.auth import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    Credentials,
    SaslError,
    decode_login_field,
    decode_plain,
)

__all__ = [
    "NEED_DATA",
    "Command",
    "ConnectionClosed",
    "Event",
    "MessageReceived",
    "ProtocolConfig",
    "Reply",
    "ServerConnection",
    "State",
]

MAX_COMMAND_LINE = 512  # octets, CRLF included (RFC 5321 §4.5.3.1.4)
MAX_TEXT_LINE = 1000  # octets, CRLF included (RFC 5321 §4.5.3.1.6)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status code (may be empty), text lines."""

    code: int
    enhanced: str
    text: str | tuple[str, ...]
    # The encoded reply, made on first use: most replies are module
    # constants sent thousands of times a second.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def lines(self) -> tuple[str, ...]:
        """The text as one or more lines."""
        return (self.text,) if isinstance(self.text, str) else self.text

    def encode(self) -> bytes:
        """The reply as it goes on the wire, multi-line where needed."""
        wire = self._wire
        if wire is None:
            wire = self._encode()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _encode(self) -> bytes:
        lines = self.lines() or ("",)
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(lines) - 1
        parts = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            # Only the first line carries the enhanced code in our replies
            # (EHLO keywords must stand alone on theirs).
            text = prefix + line if i == 0 else line
            line_out = f"{self.code}{sep}{text}"
            # "334 " with an empty challenge keeps its space (RFC 4954).
            if self.code != 334:
                line_out = line_out.rstrip(" ")
            parts.append(line_out + "\r\n")
        return "".join(parts).encode("utf-8")

    @property
    def positive(self) -> bool:
        """2xx or 3xx: the command was accepted."""
        return 200 <= self.code < 400


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """The protocol's limits and names; built from ``[smtp]`` settings."""

    hostname: str = "localhost"
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    #: Offer STARTTLS (the server has a certificate).
    starttls: bool = False
    #: MAIL (and AUTH) before STARTTLS get 530 5.7.0.
    require_tls: bool = False
    #: SASL mechanisms offered ("PLAIN", "LOGIN"); empty: no AUTH.
    auth_mechanisms: tuple[str, ...] = ()
    #: Offer AUTH on a connection that is not encrypted.
    auth_without_tls: bool = False
    #: MAIL before a successful AUTH gets 530 5.7.0.
    require_auth: bool = False
    #: A bare CR or LF in a message: "normalize" it to CRLF or "reject" it (554).
    bare_newlines: Literal["reject", "normalize"] = "normalize"
    #: The longest text line accepted in DATA, CRLF included (RFC 5321: 1000).
    max_line_length: int = MAX_TEXT_LINE
    #: Recipient domains accepted (lower case; ".example.com" also takes its
    #: subdomains); empty: any. Others get 550 5.7.1.
    recipient_domains: frozenset[str] = frozenset()


class State(enum.Enum):
    """Where the conversation stands."""

    GREETING = "greeting"
    READY = "ready"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    MESSAGE = "message"
    AUTH = "auth"  # in a SASL exchange: the next line is a response, not a command
    TLS = "tls"  # 220 sent to STARTTLS; waiting for the handshake
    CLOSED = "closed"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`ServerConnection.next_event` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command line was received; answer it with one ``send``.

    ``verb`` is upper-cased (``""`` for an unparseable line); ``reply`` is
    what the protocol proposes. For MAIL and RCPT, ``address`` is the path
    without angle brackets and ``params`` the ESMTP parameters. For the
    last step of AUTH, ``credentials`` are what the client sent, to check
    before sending the proposed ``235``.
    """

    verb: str
    argument: str
    reply: Reply
    address: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    credentials: Credentials | None = None


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """``DATA`` ended with ``<CRLF>.<CRLF>``: one message, to be answered.

    ``data`` is the message with dot-stuffing removed, ending in CRLF (or
    empty). ``reply`` is set when the protocol itself refuses the message
    (too large, line too long); otherwise it is None and the application
    decides between 250 and 451.
    """

    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    params: dict[str, str | None]
    data: bytes
    size: int
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side (or the connection is closed)."""


Event = Command | MessageReceived | ConnectionClosed

# Replies used in more than one place.
_OK = Reply(250, "2.0.0", "OK")
_MAIL_OK = Reply(250, "2.1.0", "OK")
_RCPT_OK = Reply(250, "2.1.5", "OK")
_GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
_TOO_LARGE = Reply(552, "5.3.4", "Message size exceeds fixed limit")

_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_NOT_HTTP = Reply(421, "4.7.0", "This is an SMTP server, not HTTP; closing connection")
# Names the setting: the sender's operator may be the daemon's too.
_BARE_NEWLINE = Reply(
    554,
    "5.6.0",
    "Message has a bare CR or LF; lines must end with CRLF (smtp.bare_newlines = reject)",
)
_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_NEWLINE_RE = re.compile(rb"\r\n|\r|\n")
_KNOWN_UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML", "BDAT"})
_PATH_RE = re.compile(r"\s*<([^<>]*)>(.*)\Z|\s*([^\s<>]+)(.*)\Z", re.DOTALL)
_PARAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# What str.isspace() calls white space (\s in a str pattern is the same
# test), and the other control characters below 32.
_BAD_ADDRESS_CHAR = re.compile(r"[\s\x00-\x1f]")
_BAD_HOSTNAME_CHAR = re.compile(r"[\x00-\x20\x7f]")
_TERMINATOR = b"\r\n.\r\n"


class ServerConnection:
    """One SMTP server conversation, without I/O. See the module docstring."""

    def __init__(self, config: ProtocolConfig | None = None) -> None:
        self.config = config or ProtocolConfig()
        # Names the setting: the sender's postmaster reads this reply, and
        # the catch-all's operator is often the same person.
        self._text_line_too_long = Reply(
            500,
            "5.5.2",
            f"Line too long (over {self.config.max_line_length} octets, "
            "the server's smtp.max_line_length)",
        )
        self.state = State.GREETING
        self.helo = ""
        self.mail_from = ""
        self.mail_params: dict[str, str | None] = {}
        self.recipients: list[str] = []
        # Command mode: bytes not yet parsed into lines.
        self._buf = bytearray()
        self._discarding_line = False
        self._eof = False
        # The event awaiting its reply, and what a positive reply would do.
        self._pending: Event | None = None
        # DATA mode, see _receive_message.
        self._body = bytearray()
        self._scanned = 0
        self._line_start = 0
        self._body_size = 0
        self._body_error: Reply | None = None
        #: True once TLS is up (see :meth:`tls_established`).
        self.secure = False
        #: ``(mechanism, username)`` after a successful AUTH.
        self.authenticated: tuple[str, str] | None = None
        # SASL: the exchange in progress as (mechanism, username so far), and
        # the one a positive reply to the pending event would continue with.
        self._sasl: tuple[str, str | None] | None = None
        self._next_sasl: tuple[str, str | None] | None = None

    # -- input ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the client; ``b""`` means it closed its side."""
        if not data:
            self._eof = True
        elif self.state is not State.CLOSED:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises RuntimeError when the previous event still awaits its reply.
        """
        if self._pending is not None:
            raise RuntimeError(f"{self._pending!r} has not been answered")
        if self.state is State.CLOSED:
            return ConnectionClosed()
        if self.state is State.GREETING:
            raise RuntimeError("send the greeting first")
        if self.state is State.TLS:
            raise RuntimeError("complete the TLS handshake and call tls_established() first")
        event = self._message_event() if self.state is State.DATA else self._command_event()
        if event is None:
            if self._eof:
                self._close()  # also drops a partial message
                return ConnectionClosed()
            return NEED_DATA
        self._pending = event
        return event

    # -- output -----------------------------------------------------------

    def greeting(self, text: str = "ESMTP trismtp") -> bytes:
        """The 220 greeting; must be the first thing sent."""
        if self.state is not State.GREETING:
            raise RuntimeError("greeting already sent")
        self.state = State.READY
        return Reply(220, "", f"{self.config.hostname} {text}").encode()

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event with ``reply``; returns the bytes to write.

        With no event pending, only a 421 may be sent (a server may close
        any time it must, RFC 5321 §3.8); it closes the connection.
        """
        event = self._pending
        if (
            isinstance(event, Command)
            and reply.positive
            and not event.reply.positive
            and reply.code != 421
        ):
            raise RuntimeError(
                f"cannot accept {event.verb or 'a line'} the protocol refused "
                f"({event.reply.code}); send a refusal or the proposed reply"
            )
        self._pending = None
        if reply.code == 421:
            self._close()
        elif event is None:
            raise RuntimeError("no event awaits a reply")
        elif isinstance(event, MessageReceived):
            self._reset_transaction()
            self.state = State.READY
        elif isinstance(event, Command) and reply.positive:
            self._apply(event)
        elif self.state is State.AUTH:
            # Any refusal ends a SASL exchange (RFC 4954: 501, 535, …).
            self.state = State.READY
            self._sasl = None
        return reply.encode()

    def tls_established(self) -> None:
        """The TLS handshake that followed ``220`` to STARTTLS succeeded.

        Also call it right after the greeting on an implicit-TLS listener.
        """
        if self.state is State.TLS:
            self.state = State.READY
        self.secure = True

    @property
    def in_transaction(self) -> bool:
        """True from an accepted MAIL until the message is answered or reset."""
        return self.state in (State.MAIL, State.RCPT, State.DATA, State.MESSAGE)

    @property
    def awaiting_reply(self) -> bool:
        """True while an event awaits its ``send``."""
        return self._pending is not None

    # -- transitions --------------------------------------------------------

    def _apply(self, event: Command) -> None:
        verb = event.verb
        if verb == "AUTH":
            if event.reply.code == 334:
                self._sasl = self._next_sasl
                self.state = State.AUTH
            elif event.credentials is not None:
                self.authenticated = (event.argument, event.credentials.username)
                self._sasl = None
                self.state = State.READY
        elif verb == "STARTTLS":
            # RFC 3207 §4.2: forget everything learnt in plaintext, and
            # discard what the client sent after STARTTLS before the
            # handshake (CVE-2011-0411: commands injected into the
            # plaintext part must not run inside the TLS session).
            self._buf.clear()
            self._discarding_line = False
            self.helo = ""
            self.authenticated = None
            self._reset_transaction()
            self.state = State.TLS
        elif verb in ("EHLO", "HELO"):
            self.helo = event.argument
            self._reset_transaction()
            self.state = State.READY
        elif verb == "MAIL":
            assert event.address is not None
            self.mail_from = event.address
            self.mail_params = event.params
            self.state = State.MAIL
        elif verb == "RCPT":
            assert event.address is not None
            self.recipients.append(event.address)
            self.state = State.RCPT
        elif verb == "DATA":
            self.state = State.DATA
            self._body = bytearray(b"\r\n")  # see _message_event
            self._scanned = 0
            self._line_start = 2
            self._body_size = 0
            self._body_error = None
        elif verb == "RSET":
            self._reset_transaction()
            self.state = State.READY
        elif verb == "QUIT":
            self._close()

    def _reset_transaction(self) -> None:
        self.mail_from = ""
        self.mail_params = {}
        self.recipients = []
        self._body = bytearray()

    def _close(self) -> None:
        self.state = State.CLOSED
        self._buf.clear()
        self._body = bytearray()

    # -- command mode -------------------------------------------------------

    def _command_event(self) -> Command | None:
        while True:
            end = self._buf.find(b"\n")
            if self._discarding_line:
                if end < 0:
                    self._buf.clear()
                    return None
                del self._buf[: end + 1]
                self._discarding_line = False
                return Command("", "", _LINE_TOO_LONG)
            if end < 0:
                if len(self._buf) >= MAX_COMMAND_LINE:
                    # Never buffer an over-long line: drop it as it streams in.
                    self._buf.clear()
                    self._discarding_line = True
                    continue
                return None
            if end + 1 > MAX_COMMAND_LINE:
                del self._buf[: end + 1]
                return Command("", "", _LINE_TOO_LONG)
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self.state is State.AUTH:
                return self._sasl_response(line.removesuffix(b"\r"))
            return self._parse_command(line.removesuffix(b"\r"))

    def _parse_command(self, raw: bytes) -> Command:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Command("", "", Reply(500, "5.5.2", "Command line is not valid UTF-8"))
        verb, _, argument = line.partition(" ")
        # ASCII only: Unicode would upper-case "maıl" (dotless i) to MAIL.
        verb = verb.upper() if verb.isascii() else ""
        argument = argument.strip()
        handler = _HANDLERS.get(verb)
        if handler is None and (verb in _HTTP_METHODS or (len(verb) > 1 and verb[-1] == ":")):
            # An HTTP request (or a header line) sent to the SMTP port: a
            # browser, a scanner, or a cross-protocol attack. Do not answer
            # it line by line; close.
            return Command(verb, "", _NOT_HTTP)
        if handler is None:
            if verb in _KNOWN_UNIMPLEMENTED:
                return Command(verb, argument, _NOT_IMPLEMENTED)
            if not verb.isascii():
                verb = ""
            return Command(verb, argument, Reply(500, "5.5.2", "Command unrecognized"))
        return handler(self, verb, argument)

    def _hello(self, verb: str, argument: str) -> Command:
        if not argument or _BAD_HOSTNAME_CHAR.search(argument) is not None:
            return Command(verb, argument, Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
        if verb == "HELO":
            return Command(verb, argument, Reply(250, "", self.config.hostname))
        lines: tuple[str, ...] = (
            self.config.hostname,
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            f"SIZE {self.config.max_message_size}",
        )
        if self.config.starttls and not self.secure:
            lines += ("STARTTLS",)
        if self._auth_offered():
            lines += ("AUTH " + " ".join(self.config.auth_mechanisms),)
        return Command(verb, argument, Reply(250, "", lines))

    def _auth_offered(self) -> bool:
        config = self.config
        if not config.auth_mechanisms or (config.require_tls and not self.secure):
            return False
        return self.secure or config.auth_without_tls

    def _mail(self, verb: str, argument: str) -> Command:
        if not self.helo:
            return Command(verb, argument, Reply(503, "5.5.1", "Send EHLO or HELO first"))
        if self.in_transaction:
            return Command(verb, argument, Reply(503, "5.5.1", "Nested MAIL command"))
        if self.config.require_tls and not self.secure:
            return Command(verb, argument, _TLS_REQUIRED)
        if self.config.require_auth and self.authenticated is None:
            return Command(verb, argument, Reply(530, "5.7.0", "Authentication required"))
        parsed = _parse_path(argument, "FROM:")
        if isinstance(parsed, Reply):
            return Command(verb, argument, parsed)
        address, params = parsed
        for name, value in params.items():
            if name == "SIZE":
                # isascii(): isdigit() is also true for "²", which int() refuses.
                if value is None or not (value.isascii() and value.isdigit()):
                    return Command(verb, argument, Reply(501, "5.5.4", "Syntax: SIZE=<number>"))
                if int(value) > self.config.max_message_size:
                    return Command(verb, argument, _TOO_LARGE)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Command(
                        verb, argument, Reply(501, "5.5.4", "Syntax: BODY=7BIT|8BITMIME")
                    )
            elif name == "SMTPUTF8":
                if value is not None:
                    return Command(verb, argument, Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            elif name == "AUTH" and self._auth_offered():
                pass  # RFC 4954 §5: the submitter's identity; not used
            else:
                return Command(
                    verb, argument, Reply(555, "5.5.4", f"Parameter {name} not recognized")
                )
        return Command(verb, argument, _MAIL_OK, address, params)

    def _rcpt(self, verb: str, argument: str) -> Command:
        if self.state not in (State.MAIL, State.RCPT):
            return Command(verb, argument, Reply(503, "5.5.1", "Send MAIL first"))
        parsed = _parse_path(argument, "TO:")
        if isinstance(parsed, Reply):
            return Command(verb, argument, parsed)
        address, params = parsed
        if not address:
            return Command(verb, argument, Reply(501, "5.1.3", "Empty recipient address"))
        if params:
            name = next(iter(params))
            return Command(verb, argument, Reply(555, "5.5.4", f"Parameter {name} not recognized"))
        if self.config.recipient_domains and not _domain_accepted(
            address, self.config.recipient_domains
        ):
            return Command(
                verb, argument, Reply(550, "5.7.1", "Recipient domain not accepted here")
            )
        if len(self.recipients) >= self.config.max_recipients:
            return Command(verb, argument, Reply(452, "4.5.3", "Too many recipients"))
        return Command(verb, argument, _RCPT_OK, address, params)

    def _data(self, verb: str, argument: str) -> Command:
        if argument:
            return Command(verb, argument, Reply(501, "5.5.4", "Syntax: DATA"))
        if self.state is State.MAIL:
            return Command(verb, argument, Reply(503, "5.5.1", "No valid recipients"))
        if self.state is not State.RCPT:
            return Command(verb, argument, _BAD_SEQUENCE)
        return Command(verb, argument, _GO_AHEAD)

    def _starttls(self, verb: str, argument: str) -> Command:
        if not self.config.starttls:
            return Command(verb, argument, _NOT_IMPLEMENTED)
        if argument:
            return Command(verb, argument, Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.secure:
            return Command(verb, argument, Reply(503, "5.5.1", "TLS already active"))
        if self.in_transaction:
            return Command(verb, argument, Reply(503, "5.5.1", "STARTTLS inside a transaction"))
        return Command(verb, argument, Reply(220, "2.0.0", "Ready to start TLS"))

    def _auth(self, verb: str, argument: str) -> Command:
        # The argument may hold an initial response, i.e. a password: the
        # event carries only the mechanism, so that nothing logs it.
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper() if mechanism.isascii() else ""
        config = self.config
        if not config.auth_mechanisms:
            return Command(verb, mechanism, _NOT_IMPLEMENTED)
        if not self._auth_offered():
            if config.require_tls:
                return Command(verb, mechanism, _TLS_REQUIRED)
            return Command(
                verb,
                mechanism,
                Reply(538, "5.7.11", "Encryption required for requested authentication mechanism"),
            )
        if not self.helo:
            return Command(verb, mechanism, Reply(503, "5.5.1", "Send EHLO first"))
        if self.authenticated is not None:
            return Command(verb, mechanism, Reply(503, "5.5.1", "Already authenticated"))
        if self.in_transaction:
            return Command(verb, mechanism, Reply(503, "5.5.1", "AUTH inside a transaction"))
        if mechanism not in config.auth_mechanisms:
            return Command(verb, mechanism, Reply(504, "5.5.4", "Unrecognized authentication type"))
        initial = initial.strip()
        if not initial:
            challenge = "" if mechanism == "PLAIN" else LOGIN_USERNAME_CHALLENGE
            return self._challenge(mechanism, None, challenge)
        # RFC 4954 §4: "=" is an empty initial response.
        return self._sasl_step(mechanism, None, "" if initial == "=" else initial)

    def _sasl_response(self, raw: bytes) -> Command:
        assert self._sasl is not None
        mechanism, username = self._sasl
        try:
            response = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            response = "\x00"  # not base64: refused below
        if response == "*":
            return Command("AUTH", mechanism, Reply(501, "5.7.0", "Authentication cancelled"))
        return self._sasl_step(mechanism, username, response)

    def _sasl_step(self, mechanism: str, username: str | None, response: str) -> Command:
        try:
            if mechanism == "PLAIN":
                credentials = decode_plain(response)
            elif username is None:
                return self._challenge(
                    mechanism, decode_login_field(response), LOGIN_PASSWORD_CHALLENGE
                )
            else:
                credentials = Credentials(username, decode_login_field(response))
        except SaslError as exc:
            return Command("AUTH", mechanism, Reply(501, "5.5.2", f"Invalid response: {exc}"))
        return Command(
            "AUTH",
            mechanism,
            Reply(235, "2.7.0", "Authentication successful"),
            credentials=credentials,
        )

    def _challenge(self, mechanism: str, username: str | None, challenge: str) -> Command:
        self._next_sasl = (mechanism, username)
        return Command("AUTH", mechanism, Reply(334, "", challenge))

    def _rset(self, verb: str, argument: str) -> Command:
        if argument:
            return Command(verb, argument, Reply(501, "5.5.4", "Syntax: RSET"))
        return Command(verb, argument, _OK)

    def _noop(self, verb: str, argument: str) -> Command:
        return Command(verb, argument, _OK)

    def _quit(self, verb: str, argument: str) -> Command:
        if argument:
            return Command(verb, argument, Reply(501, "5.5.4", "Syntax: QUIT"))
        return Command(verb, argument, Reply(221, "2.0.0", f"{self.config.hostname} closing"))

    def _vrfy(self, verb: str, argument: str) -> Command:
        if not argument:
            return Command(verb, argument, Reply(501, "5.5.4", "Syntax: VRFY address"))
        return Command(
            verb, argument, Reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
        )

    def _help(self, verb: str, argument: str) -> Command:
        return Command(
            verb,
            argument,
            Reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
            ),
        )

    # -- DATA mode ----------------------------------------------------------

    def _message_event(self) -> MessageReceived | None:
        # The body buffer starts with a virtual CRLF, so that a terminator
        # or a stuffed dot on the very first line needs no special case:
        # ".\r\n" right after DATA is "\r\n.\r\n" here.
        if self._buf:
            self._body_size += len(self._buf)
            self._body += self._buf
            self._buf.clear()
        body = self._body
        end = body.find(_TERMINATOR, max(self._scanned - 4, 0))
        limit = len(body) if end < 0 else end + 2
        if self._body_error is None:
            if _has_long_line(body, self._line_start, limit, self.config.max_line_length):
                self._body_error = self._text_line_too_long
            elif end < 0 and self._body_size > self.config.max_message_size + len(_TERMINATOR):
                # Only while the terminator is missing: once it is found,
                # _body_size also counts the pipelined commands after it.
                self._body_error = _TOO_LARGE
        if end < 0:
            self._scanned = len(body)
            last_lf = body.rfind(b"\n", self._line_start)
            if last_lf >= 0:
                self._line_start = last_lf + 1
            if self._body_error is not None and len(body) > 4:
                # Once the message is refused, keep only enough to see the
                # terminator arrive; the rest is dropped as it streams in.
                del body[:-4]
                self._scanned = len(body)
                self._line_start = len(body)
            return None
        # Everything after the terminator is the next pipelined command.
        rest = bytes(body[end + len(_TERMINATOR) :])
        self._buf[:0] = rest
        self._body_size -= len(rest)
        self._body = bytearray()
        # In place where that is possible: the message may be megabytes, and
        # each copy of it counts against the memory budget's factor.
        del body[end + 2 :]
        if body.find(b"\r\n..") >= 0:
            # Thanks to the virtual CRLF, one replace unstuffs the first line too.
            body = body.replace(b"\r\n..", b"\r\n.")
        del body[:2]  # the virtual CRLF; a bytearray drops its head without a copy
        data = bytes(body)
        del body
        # The octets received for the message, dot-stuffed, without ".\r\n".
        # It is known exactly however the bytes arrived, so being too large
        # takes precedence over a long line: the reply does not depend on
        # which limit the read that completed the message crossed first.
        received = self._body_size - (len(_TERMINATOR) - 2)
        self.state = State.MESSAGE
        error = self._body_error
        if received > self.config.max_message_size:
            error = _TOO_LARGE
        crlf = data.count(b"\r\n")
        if error is None and (data.count(b"\n") != crlf or data.count(b"\r") != crlf):
            if self.config.bare_newlines == "reject":
                error = _BARE_NEWLINE
            else:
                data = _NEWLINE_RE.sub(b"\r\n", data)
                if len(data) > self.config.max_message_size:
                    # Each bare CR or LF became two octets: the stored
                    # message must still fit the limit.
                    error = _TOO_LARGE
        size = len(data) if error is None else received
        return MessageReceived(
            helo=self.helo,
            mail_from=self.mail_from,
            recipients=tuple(self.recipients),
            params=self.mail_params,
            data=b"" if error is not None else data,
            size=size,
            reply=error,
        )


_HANDLERS: dict[str, Callable[[ServerConnection, str, str], Command]] = {
    "EHLO": ServerConnection._hello,
    "HELO": ServerConnection._hello,
    "MAIL": ServerConnection._mail,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "VRFY": ServerConnection._vrfy,
    "HELP": ServerConnection._help,
    "STARTTLS": ServerConnection._starttls,
    "AUTH": ServerConnection._auth,
}


def _parse_path(argument: str, keyword: str) -> tuple[str, dict[str, str | None]] | Reply:
    """Split ``FROM:<path> PARAM=VALUE …`` into the address and parameters."""
    if argument[: len(keyword)].upper() != keyword:
        return Reply(501, "5.5.4", f"Syntax: {keyword}<address>")
    match = _PATH_RE.match(argument[len(keyword) :])
    if match is None:
        return Reply(501, "5.5.4", f"Syntax: {keyword}<address>")
    if match.group(1) is not None:
        address, rest = match.group(1), match.group(2)
    else:
        address, rest = match.group(3), match.group(4)
    address = address.strip()
    # A source route (<@a,@b:user@c>) is obsolete; keep only the mailbox.
    if address.startswith("@") and ":" in address:
        address = address.partition(":")[2]
    if _BAD_ADDRESS_CHAR.search(address) is not None:
        return Reply(501, "5.1.7", "Bad address syntax")
    params: dict[str, str | None] = {}
    for item in rest.split():
        name, eq, value = item.partition("=")
        if not _PARAM_RE.match(name) or (eq and not value):
            return Reply(501, "5.5.4", f"Bad parameter {item!r}")
        params[name.upper()] = value if eq else None
    return address, params


def _domain_accepted(address: str, domains: frozenset[str]) -> bool:
    """Is ``address``'s domain in ``domains`` (``.example.com`` takes subdomains)?"""
    _, at, domain = address.rpartition("@")
    if not at:
        # RFC 5321 §4.5.1: <postmaster> without a domain must be accepted.
        return address.lower() == "postmaster"
    domain = domain.lower().rstrip(".")
    if domain in domains:
        return True
    return any(d.startswith(".") and (domain.endswith(d) or domain == d[1:]) for d in domains)


def _has_long_line(buf: bytearray, start: int, end: int, longest: int) -> bool:
    """Is there a text line of over ``longest`` octets (CRLF included) in ``buf[start:end]``?

    ``start`` is the start of a line. A line is too long when ``longest``
    octets in a row hold no LF (with RFC 5321's 1000: 998 characters, CR,
    LF). Rather than walk line by line, look at ``longest`` octets at a time
    and jump past the last LF among them: a few C-level scans per 100 KB.
    """
    pos = start
    while end - pos >= longest:
        lf = buf.rfind(b"\n", pos, pos + longest)
        if lf < 0:
            return True
        pos = lf + 1
    return False
