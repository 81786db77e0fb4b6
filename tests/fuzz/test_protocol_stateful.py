"""A model-based test of the SMTP dialogue: hypothesis drives a ``ServerConnection``
against a small model of RFC 5321.

The model
=========

:class:`Model` is what RFC 5321 and the protocol module's docstring say the
server knows after each reply that was actually sent: the state (READY, MAIL,
RCPT, DATA, CLOSED), the HELO name, the envelope, and how many DATA commands
were accepted and how many messages came out. The test never asks the
protocol what it would do. Each client command is a :class:`Step` that
carries its own prediction: the reply code the protocol must propose in the
model's current state, and the transition a positive reply applies. The
application then answers, usually with the proposal, sometimes with another
text, a refusal (451, 550) or 421, and the model follows the reply sent.

Each example draws a configuration (a small max_message_size, max_recipients,
bare_newlines "reject" or "normalize") and then runs up to 30 rules:
pipelined bursts of commands (EHLO/HELO, MAIL with and without
SIZE near the limit, RCPT, DATA, RSET, NOOP, HELP, VRFY, QUIT, unimplemented
and unoffered commands, garbage and over-long lines) cut at random points;
the message (dot-stuffing, bare CR/LF, lines near 1000 octets, sizes near a
small ``max_message_size``) with commands pipelined behind its final dot; a
message abandoned by EOF or an unsolicited 421; EOF or 421 in the middle of a
command line; input after close; a new connection.

Invariants, checked for every event and after every rule:

* every reply is well formed (:func:`~tests.fuzz.support.check_reply_wire`);
* there is one event per command sent, in the order sent, with the verb,
  address and proposed reply code the model predicts, so the replies to
  pipelined commands come in order;
* ``state``, ``helo``, ``mail_from``, ``mail_params`` and ``recipients``
  are the model's;
* one MessageReceived per accepted DATA, only once the final dot is in, with
  exactly the unstuffed data, size and refusal (552, 500, 554) the model
  computes; accepted DATA = messages + messages abandoned + the one open;
* the private buffers stay bounded (:meth:`SmtpDialogue.check_buffers`).

Adding a command (STARTTLS, AUTH, ...)
======================================

Write a strategy of :class:`Step` (the line, the expected verb, and a
``predict`` function of the model returning an :class:`Outcome`) and add it to
:data:`COMMANDS`. A command that leads to a new phase (``State.TLS`` until
``tls_established()``, a SASL exchange) also gets that state in the model and a
rule with a precondition on it; :meth:`SmtpDialogue.message` shows how a phase
that is not command lines is driven. Today STARTTLS and AUTH are sent to the
default configuration, which does not offer them, and only have to be refused.

The budget is :func:`~tests.fuzz.support.examples`; ``make fuzz`` runs this
with ``TRISMTP_FUZZ_EXAMPLES=20000``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from trismtp.smtp.protocol import (
    MAX_COMMAND_LINE,
    NEED_DATA,
    Command,
    ConnectionClosed,
    MessageReceived,
    ProtocolConfig,
    Reply,
    ServerConnection,
    State,
)

from .support import check_reply_wire, fuzz_settings, split_at

# -- the model ----------------------------------------------------------------


@dataclass
class Model:
    """What the server should know, from the replies sent so far."""

    config: ProtocolConfig
    state: State = State.READY
    helo: str = ""
    mail_from: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    accepted_data: int = 0  # DATA commands answered 354
    messages: int = 0  # MessageReceived events
    abandoned: int = 0  # DATA phases ended by EOF or 421 before the final dot

    @property
    def in_transaction(self) -> bool:
        return self.state in (State.MAIL, State.RCPT, State.DATA, State.MESSAGE)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def reset(self) -> None:
        self.mail_from = ""
        self.mail_params = {}
        self.recipients = []

    def close(self) -> None:
        if self.state is State.DATA:
            self.abandoned += 1
        self.state = State.CLOSED


Transition = Callable[[Model], None]
Predict = Callable[[Model], "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """The reply code the protocol must propose, and what a positive reply does."""

    code: int | None  # None: any refusal (4xx/5xx) will do
    accept: Transition | None = None


@dataclass(frozen=True)
class Step:
    """One command line as the client sends it, with its prediction."""

    line: bytes
    verb: str | None  # the Command's verb; None: not checked (garbage)
    predict: Predict = field(repr=False)
    address: str | None = None  # the Command's address (MAIL, RCPT)


@dataclass(frozen=True)
class Body:
    """A message as the client means it (``content``) and as it goes on the wire."""

    content: bytes  # ends in CRLF, or empty
    stuffed: bytes  # dot-stuffed, without the final ".\r\n"

    @property
    def wire(self) -> bytes:
        return self.stuffed + b".\r\n"

    def expect(self, config: ProtocolConfig) -> tuple[int | None, bytes, int]:
        """The refusal code (None: accepted), the data and the size of the event."""
        received = len(self.stuffed)
        if received > config.max_message_size:
            return 552, b"", received
        if longest_run(self.stuffed) >= 1000:  # a line of over 1000 octets, CRLF included
            return 500, b"", received
        data = self.content
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            if config.bare_newlines == "reject":
                return 554, b"", received
            data = _NEWLINE.sub(b"\r\n", data)
            if len(data) > config.max_message_size:
                return 552, b"", received  # normalised, it no longer fits
        return None, data, len(data)


_NEWLINE = re.compile(rb"\r\n|\r|\n")


def longest_run(data: bytes) -> int:
    """The longest run of octets without LF: a text line's length as the limit counts it."""
    return max(len(part) for part in data.split(b"\n"))


def dot_stuff(content: bytes) -> bytes:
    """What a client sends for ``content`` (ending in CRLF): a dot doubled at each line start."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def filler(octets: int) -> bytes:
    """Exactly ``octets`` octets of short CRLF lines without dots (b"" below 2)."""
    if octets < 2:
        return b""
    lines = []
    while octets >= 82:
        lines.append(b"z" * 78 + b"\r\n")
        octets -= 80
    lines.append(b"z" * (octets - 2) + b"\r\n")
    return b"".join(lines)


def make_body(pieces: list[bytes], fill: int | None, max_size: int) -> Body:
    """A message from ``pieces``; with ``fill``, of ``max_size + fill`` octets received.

    To reach that size exactly, short CRLF lines go in front, and ``pieces``
    are replaced with one dot-stuffed line when they are too long already.
    """
    content = b"".join(pieces)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    if fill is not None:
        target = max_size + fill
        if len(dot_stuff(content)) > target - 2:
            content = b".\r\n" if target >= 6 else b""
        content = filler(target - len(dot_stuff(content))) + content
    return Body(content, dot_stuff(content))


# -- the commands -----------------------------------------------------------------


def _fixed(code: int | None, accept: Transition | None = None) -> Predict:
    def predict(model: Model) -> Outcome:
        return Outcome(code, accept)

    return predict


def _hello_accepted(name: str) -> Transition:
    def accept(model: Model) -> None:
        model.helo = name
        model.reset()
        model.state = State.READY

    return accept


def _mail(address: str, params: dict[str, str | None], size: int | None) -> Predict:
    def accept(model: Model) -> None:
        model.mail_from = address
        model.mail_params = dict(params)
        model.state = State.MAIL

    def predict(model: Model) -> Outcome:
        if not model.helo or model.in_transaction:
            return Outcome(503)
        if size is not None and size > model.config.max_message_size:
            return Outcome(552)
        return Outcome(250, accept)

    return predict


def _mail_refused(code: int) -> Predict:
    def predict(model: Model) -> Outcome:
        if not model.helo or model.in_transaction:
            return Outcome(503)
        return Outcome(code)

    return predict


def _rcpt(address: str) -> Predict:
    def accept(model: Model) -> None:
        model.recipients.append(address)
        model.state = State.RCPT

    def predict(model: Model) -> Outcome:
        if model.state not in (State.MAIL, State.RCPT):
            return Outcome(503)
        if len(model.recipients) >= model.config.max_recipients:
            return Outcome(452)
        return Outcome(250, accept)

    return predict


def _rcpt_refused(code: int) -> Predict:
    def predict(model: Model) -> Outcome:
        if model.state not in (State.MAIL, State.RCPT):
            return Outcome(503)
        return Outcome(code)

    return predict


def _data(model: Model) -> Outcome:
    def accept(model: Model) -> None:
        model.state = State.DATA
        model.accepted_data += 1

    if model.state is State.RCPT:
        return Outcome(354, accept)
    return Outcome(503)


def _rset_accepted(model: Model) -> None:
    model.reset()
    model.state = State.READY


eols = st.sampled_from([b"\r\n", b"\n"])
verb_case = st.sampled_from([str.upper, str.lower, str.title])
hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,30}[A-Za-z0-9])?", fullmatch=True) | (
    st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::1]", "bücher.example", "x"])
)
addresses = st.builds(
    "{}@{}".format,
    st.from_regex(r"[A-Za-z0-9._+=-]{1,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9-]{1,15}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True),
) | st.sampled_from(["jörg@bücher.example", "postmaster", "a@[192.0.2.1]", '"q"@x'])


@st.composite
def hello_steps(draw: st.DrawFn) -> Step:
    verb = draw(st.sampled_from(["EHLO", "HELO"]))
    name = draw(hostnames)
    before = draw(st.sampled_from([" ", "  ", " \t"]))
    after = draw(st.sampled_from(["", " ", "\t"]))
    line = f"{draw(verb_case)(verb)}{before}{name}{after}".encode() + draw(eols)
    return Step(line, verb, _fixed(250, _hello_accepted(name)))


bad_hello_steps = st.builds(
    lambda line, eol: Step(line.encode() + eol, line.split()[0].upper(), _fixed(501)),
    st.sampled_from(["EHLO", "HELO ", "EHLO a b", "HELO a\x7fb", "ehlo \x01"]),
    eols,
)


@st.composite
def mail_steps(draw: st.DrawFn) -> Step:
    address = draw(st.just("") | addresses)
    params: dict[str, str | None] = {}
    text = []
    size = None
    if draw(st.booleans()):
        size = draw(st.integers(0, 5000) | st.sampled_from([0, 10**9, 10**20 - 1]))
        params["SIZE"] = str(size)
        text.append(f"{draw(verb_case)('size')}={size}")
    if draw(st.booleans()):
        params["BODY"] = draw(st.sampled_from(["7BIT", "8BITMIME", "8bitmime"]))
        text.append(f"BODY={params['BODY']}")
    if draw(st.booleans()):
        params["SMTPUTF8"] = None
        text.append("SMTPUTF8")
    space = draw(st.sampled_from(["", " "]))
    argument = " ".join([f"{draw(verb_case)('from:')}{space}<{address}>", *text])
    line = f"{draw(verb_case)('MAIL')} {argument}".encode() + draw(eols)
    return Step(line, "MAIL", _mail(address, params, size), address)


bad_mail_steps = st.builds(
    lambda item, eol: Step(item[0].encode() + eol, "MAIL", _mail_refused(item[1])),
    st.sampled_from(
        [
            ("MAIL", 501),
            ("MAIL TO:<a@b>", 501),
            ("MAIL FROM:", 501),
            ("MAIL FROM:<a@b", 501),
            ("MAIL FROM:<a@b> =x", 501),
            ("MAIL FROM:<a b@c>", 501),
            ("MAIL FROM:<a@b> FOO=bar", 555),
            ("MAIL FROM:<a@b> SIZE=abc", 501),
            ("MAIL FROM:<a@b> SIZE=²", 501),
            ("MAIL FROM:<a@b> BODY=BINARYMIME", 501),
            ("MAIL FROM:<a@b> SMTPUTF8=yes", 501),
        ]
    ),
    eols,
)


@st.composite
def rcpt_steps(draw: st.DrawFn) -> Step:
    address = draw(addresses)
    space = draw(st.sampled_from(["", " "]))
    line = f"{draw(verb_case)('RCPT')} {draw(verb_case)('to:')}{space}<{address}>".encode()
    return Step(line + draw(eols), "RCPT", _rcpt(address), address)


bad_rcpt_steps = st.builds(
    lambda item, eol: Step(item[0].encode() + eol, "RCPT", _rcpt_refused(item[1])),
    st.sampled_from(
        [
            ("RCPT TO:<>", 501),
            ("RCPT TO:", 501),
            ("RCPT FROM:<c@d>", 501),
            ("RCPT TO:<c d@e>", 501),
            ("RCPT TO:<c@d> NOTIFY=NEVER", 555),
        ]
    ),
    eols,
)

DATA_STEP = Step(b"DATA\r\n", "DATA", _data)

SIMPLE: list[tuple[bytes, str | None, Predict]] = [
    (b"RSET", "RSET", _fixed(250, _rset_accepted)),
    (b"rset", "RSET", _fixed(250, _rset_accepted)),
    (b"RSET all", "RSET", _fixed(501)),
    (b"NOOP", "NOOP", _fixed(250)),
    (b"NOOP whatever \xc3\xa9", "NOOP", _fixed(250)),
    (b"HELP", "HELP", _fixed(214)),
    (b"HELP MAIL", "HELP", _fixed(214)),
    (b"VRFY postmaster", "VRFY", _fixed(252)),
    (b"VRFY", "VRFY", _fixed(501)),
    (b"EXPN list", "EXPN", _fixed(502)),
    (b"BDAT 10 LAST", "BDAT", _fixed(502)),
    (b"DATA now", "DATA", _fixed(501)),
    (b"QUIT now", "QUIT", _fixed(501)),
    (b"QUIT", "QUIT", _fixed(221, Model.close)),
    # Not offered by the default configuration: refused, whatever the code.
    (b"STARTTLS", None, _fixed(None)),
    (b"AUTH PLAIN AHVzZXIAcGFzcw==", None, _fixed(None)),
    (b"AUTH LOGIN", None, _fixed(None)),
    (b"", "", _fixed(500)),
]
simple_steps = st.builds(
    lambda item, eol: Step(item[0] + eol, item[1], item[2]), st.sampled_from(SIMPLE), eols
)

# Garbage: "?" never starts a verb; any refusal will do (an HTTP-looking line
# even gets 421, which closes).
garbage_steps = st.builds(
    lambda junk, eol: Step(b"?" + junk.replace(b"\n", b"") + eol, None, _fixed(None)),
    st.binary(max_size=300),
    eols,
)


@st.composite
def long_line_steps(draw: st.DrawFn) -> Step:
    """A command line near or over the 512-octet limit (CRLF included)."""
    eol = draw(eols)
    if draw(st.booleans()):
        total = draw(st.integers(505, 520))
        line = b"NOOP " + b"x" * (total - 5 - len(eol)) + eol
        return Step(line, "NOOP", _fixed(250)) if total <= 512 else Step(line, "", _fixed(500))
    prefix = draw(st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b"EHLO ", b"QUIT"]))
    total = draw(st.integers(513, 3000))
    return Step(prefix + b"x" * (total - len(prefix) - len(eol)) + eol, "", _fixed(500))


COMMANDS: list[st.SearchStrategy[Step]] = [
    hello_steps(),
    bad_hello_steps,
    mail_steps(),
    bad_mail_steps,
    rcpt_steps(),
    bad_rcpt_steps,
    simple_steps,
    garbage_steps,
    long_line_steps(),
]
"""Every kind of command line but DATA (which ends a burst). Add new commands here."""

command_steps = st.one_of(COMMANDS)

random_bursts = st.builds(
    lambda steps, data: [*steps, DATA_STEP] if data else steps,
    st.lists(command_steps, min_size=1, max_size=6),
    st.booleans(),
)
# A whole envelope in one burst, the way a PIPELINING client sends it.
transaction_bursts = st.builds(
    lambda hello, mail, rcpts: [*hello, mail, *rcpts, DATA_STEP],
    st.lists(hello_steps(), max_size=1),
    mail_steps(),
    st.lists(rcpt_steps(), min_size=1, max_size=3),
)

# Lines that start with dots, end in CRLF or (less often) a bare LF or CR or
# nothing, and hold text, NULs, 8-bit octets or dots.
body_lines = st.builds(
    bytes.__add__,
    st.builds(
        bytes.__add__,
        st.sampled_from([b"", b".", b"..", b"...", b".x", b"x", b" ", b"From: a", b"\x00"]),
        st.sampled_from([b"", b"text", b".", b"\xff\xfe", b"\r\n.", b"\n.\n"])
        | st.binary(max_size=8),
    ),
    st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]),
)
near_1000 = st.integers(995, 1003).map(lambda n: b"y" * n)
# Short lines, and sometimes one run of octets near the 1000-octet line limit.
body_pieces = st.builds(
    lambda pieces, long, at: [*pieces[:at], *long, *pieces[at:]],
    st.lists(body_lines, max_size=16),
    st.lists(near_1000, max_size=1),
    st.integers(0, 16),
)
fills = st.none() | st.integers(-2, 2) | st.integers(-8, 8)

BareNewlines = Literal["reject", "normalize"]
BARE_NEWLINES: tuple[BareNewlines, ...] = ("reject", "normalize")
configs = st.builds(
    ProtocolConfig,
    hostname=st.sampled_from(["localhost", "mx.example.org"]),
    max_message_size=st.sampled_from([64, 300, 1200, 2500]) | st.integers(1, 3000),
    max_recipients=st.integers(1, 4),
    bare_newlines=st.sampled_from(BARE_NEWLINES),
)

# -- the application's answers -------------------------------------------------

QUEUED = Reply(250, "2.0.0", "OK: queued as X")
CLOSING = Reply(421, "4.3.2", "Service shutting down")
REFUSALS = (Reply(451, "4.3.0", "Try again later"), Reply(550, "5.7.1", "Refused by policy"))


def command_answer(data: st.DataObject, proposed: Reply) -> Reply:
    """Mostly the proposal; sometimes other text, a refusal or (rarely) 421."""
    choice = data.draw(st.integers(0, 19), label="answer")
    if choice <= 14:
        return proposed
    if choice <= 16:
        text = "Answered by the application"
        return Reply(proposed.code, proposed.enhanced, text) if proposed.positive else proposed
    if choice <= 18:
        return REFUSALS[choice - 17]
    return CLOSING


def message_answer(data: st.DataObject, event: MessageReceived) -> Reply:
    """The protocol's refusal as proposed, else 250, 451 or 554; rarely 421."""
    choice = data.draw(st.integers(0, 9), label="message answer")
    if choice == 9 and data.draw(st.booleans(), label="close"):
        return CLOSING
    if event.reply is not None:
        return event.reply
    if choice <= 5:
        return QUEUED
    if choice <= 7:
        return REFUSALS[0]
    return Reply(554, "5.7.1", "Message refused by policy")


def cut_points(length: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(length - 1, 1)), max_size=8)


# -- the machine ------------------------------------------------------------------


class SmtpDialogue(RuleBasedStateMachine):
    """One client's conversation with a ServerConnection, checked against a Model."""

    def __init__(self) -> None:
        super().__init__()
        self.start(ProtocolConfig())

    def start(self, config: ProtocolConfig) -> None:
        self.conn = ServerConnection(config)
        self.model = Model(config)
        self.data_fed = b""  # what the current DATA phase received so far
        greeting = self.conn.greeting()
        check_reply_wire(greeting, Reply(220, "", ""))

    @initialize(config=configs)
    def configure(self, config: ProtocolConfig) -> None:
        self.start(config)

    # -- rules ------------------------------------------------------------------

    @precondition(lambda self: self.model.state in (State.READY, State.MAIL, State.RCPT))
    @rule(steps=st.one_of(random_bursts, transaction_bursts, transaction_bursts), data=st.data())
    def commands(self, steps: list[Step], data: st.DataObject) -> None:
        """A burst of pipelined command lines, in chunks cut anywhere."""
        wire = b"".join(step.line for step in steps)
        cuts = data.draw(cut_points(len(wire)), label="cuts")
        self.exchange(split_at(wire, cuts), [*steps], data)

    @precondition(lambda self: self.model.state is State.DATA)
    @rule(
        pieces=body_pieces,
        fill=fills,
        ending=st.sampled_from(["dot", "eof", "421"]) | st.just("dot"),
        after=st.lists(command_steps, max_size=3),
        data=st.data(),
    )
    def message(
        self,
        pieces: list[bytes],
        fill: int | None,
        ending: str,
        after: list[Step],
        data: st.DataObject,
    ) -> None:
        """The message and its final dot, with commands pipelined behind it.

        Or (``ending`` "eof" or "421") only part of it, never the terminator,
        then the client's EOF or the server's timeout (an unsolicited 421).
        """
        body = make_body(pieces, fill, self.model.config.max_message_size)
        if ending == "dot":
            wire = body.wire + b"".join(step.line for step in after)
            cuts = data.draw(cut_points(len(wire)), label="cuts")
            self.exchange(split_at(wire, cuts), [body, *after], data)
            return
        partial = body.stuffed + b".\r"
        partial = partial[: data.draw(st.integers(0, len(partial)), label="sent")]
        cuts = data.draw(cut_points(len(partial)), label="cuts")
        self.exchange(split_at(partial, cuts), [], data)
        self.hang_up(ending)

    @precondition(lambda self: self.model.state in (State.READY, State.MAIL, State.RCPT))
    @rule(partial=st.binary(max_size=700), how=st.sampled_from(["eof", "421"]))
    def abandon_command(self, partial: bytes, how: str) -> None:
        """Part of a command line (never its LF), then EOF or a timeout's 421."""
        partial = partial.replace(b"\n", b"")
        if partial:
            self.conn.receive_data(partial)
            assert self.conn.next_event() is NEED_DATA
            self.check_buffers()
        self.hang_up(how)

    @precondition(lambda self: self.model.state is State.CLOSED)
    @rule(junk=st.binary(min_size=1, max_size=200))
    def input_after_close(self, junk: bytes) -> None:
        body = len(self.conn._body)
        self.conn.receive_data(junk)
        assert self.conn.next_event() == ConnectionClosed()
        assert len(self.conn._buf) == 0
        assert len(self.conn._body) == body  # nothing is buffered any more

    @precondition(lambda self: self.model.state is State.CLOSED)
    @rule()
    def reconnect(self) -> None:
        self.start(self.model.config)

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        conn, model = self.conn, self.model
        assert not conn.awaiting_reply
        assert conn.state is model.state
        if model.state is not State.CLOSED:
            assert conn.helo == model.helo
            assert conn.mail_from == model.mail_from
            assert conn.mail_params == model.mail_params
            assert conn.recipients == model.recipients
            assert conn.in_transaction is model.in_transaction
        open_data = 1 if model.state is State.DATA else 0
        assert model.accepted_data == model.messages + model.abandoned + open_data
        self.check_buffers()

    def check_buffers(self, chunk: int | None = None) -> None:
        """The private buffers stay within bounds set by the limits and the chunk size.

        ``_buf`` holds received bytes not yet parsed as commands. At rest
        (``chunk`` None: the connection said NEED_DATA or closed) that is at
        most one partial command line, under MAX_COMMAND_LINE (512) octets,
        because a line that reaches 512 octets without a LF is dropped as it
        streams in; in DATA it is empty, every byte having moved to ``_body``.
        While the events of one chunk are being taken out, it also holds the
        rest of that chunk: under 512 + ``chunk`` octets.

        ``_body`` holds the message being received: a virtual CRLF (2 octets)
        and what was received, which is at most max_message_size + 5 octets
        while the message can still be accepted (past that it is refused and
        the bytes are dropped), so at most max_message_size + 7 whatever the
        chunk sizes. Once the message is known to be refused (over the size,
        or a run of 1000 octets without LF) only a 4-octet tail is kept, to
        see the terminator arrive. Outside DATA it is empty, except after EOF
        in DATA: that close keeps the partial message (within the same bound)
        until the connection object goes, where QUIT and 421 free it.
        """
        conn = self.conn
        buf, body = len(conn._buf), len(conn._body)
        max_size = self.model.config.max_message_size
        assert body <= max_size + 7, (body, max_size)
        if chunk is not None:
            assert buf < MAX_COMMAND_LINE + chunk, (buf, chunk)
            return
        if conn.state is State.CLOSED:
            assert buf == 0, buf
        elif conn.state is State.DATA:
            assert buf == 0, buf
            fed = self.data_fed
            if len(fed) > max_size + 5 or longest_run(fed) >= 1000:
                assert body <= 4, (body, len(fed))
        else:
            assert buf < MAX_COMMAND_LINE, buf
            assert body == 0, body

    # -- driving the connection -------------------------------------------------------

    def exchange(
        self, chunks: list[bytes], expected: list[Step | Body], data: st.DataObject
    ) -> None:
        """Feed ``chunks`` one at a time, answering each event; one event per ``expected``."""
        conn = self.conn
        pending = deque(expected)
        for chunk in chunks:
            conn.receive_data(chunk)
            if self.model.closed:
                assert conn.next_event() == ConnectionClosed()
                assert len(conn._buf) == 0
                continue
            if self.model.state is State.DATA:
                self.data_fed += chunk
            while True:
                event = conn.next_event()
                if not isinstance(event, Command | MessageReceived):
                    # NEED_DATA, or ConnectionClosed, which is the model's doing
                    # (QUIT, 421), never the connection's own.
                    assert self.model.closed == isinstance(event, ConnectionClosed), event
                    self.check_buffers()
                    break
                self.check_buffers(len(chunk))
                assert pending, f"an event no command asked for: {event!r}"
                expectation = pending.popleft()
                if isinstance(expectation, Body):
                    self.answer_message(expectation, event, data)
                else:
                    self.answer_command(expectation, event, data)
        if not self.model.closed:
            assert not pending, f"no event (yet) for {list(pending)!r}"

    def answer_command(
        self, step: Step, event: Command | MessageReceived, data: st.DataObject
    ) -> None:
        assert isinstance(event, Command), f"{step!r} gave {event!r}"
        outcome = step.predict(self.model)
        if step.verb is not None:
            assert event.verb == step.verb, (step, event)
        if step.address is not None and event.reply.positive:
            assert event.address == step.address, (step, event)
        if outcome.code is None:
            assert not event.reply.positive, (step, event)
        else:
            assert event.reply.code == outcome.code, (step, event, self.model)
        reply = command_answer(data, event.reply)
        check_reply_wire(self.conn.send(reply), reply)
        note_event(f"{event.verb or '(unparsed)'} {event.reply.code} -> {reply.code}")
        if reply.code == 421:
            self.model.close()
        elif reply.positive and outcome.accept is not None:
            outcome.accept(self.model)
            if self.model.state is State.DATA:
                self.data_fed = b""

    def answer_message(
        self, body: Body, event: Command | MessageReceived, data: st.DataObject
    ) -> None:
        assert isinstance(event, MessageReceived), f"the message gave {event!r}"
        model = self.model
        code, expected, size = body.expect(model.config)
        assert (event.reply.code if event.reply else None) == code, (event.reply, body)
        assert event.data == expected
        assert event.size == size
        assert event.helo == model.helo
        assert event.mail_from == model.mail_from
        assert event.params == model.mail_params
        assert event.recipients == tuple(model.recipients)
        model.state = State.MESSAGE
        model.messages += 1
        reply = message_answer(data, event)
        note_event(f"message: protocol {code or 'accepts'}, answered {reply.code}")
        check_reply_wire(self.conn.send(reply), reply)
        if reply.code == 421:
            model.close()
        else:
            model.reset()
            model.state = State.READY

    def hang_up(self, how: str) -> None:
        """The client closes (``eof``), or the server times out (an unsolicited 421)."""
        if how == "eof":
            self.conn.receive_data(b"")
        else:
            reply = Reply(421, "4.4.2", "Timeout, closing connection")
            check_reply_wire(self.conn.send(reply), reply)
        assert self.conn.next_event() == ConnectionClosed()
        self.model.close()


def test_smtp_dialogue_follows_the_model() -> None:
    run_state_machine_as_test(
        SmtpDialogue, settings=fuzz_settings(weight=0.5, stateful_step_count=30)
    )
