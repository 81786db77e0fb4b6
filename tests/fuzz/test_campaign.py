"""A byte-stream fuzz campaign against the SMTP state machine and the message parser.

Where ``test_protocol_stateful`` checks a dialogue against a model, this file
throws bytes: arbitrary ones, and "SMTP-shaped" streams built from a grammar
of command fragments, line ends (CRLF, LF, CR), dots, NULs and long runs, fed
to a :class:`~trismtp.smtp.protocol.ServerConnection` in arbitrary chunks
(an empty chunk is EOF) and answered the way the server does: every event
with its proposed reply (a message with 250 unless the protocol refused it),
finishing the TLS handshake after a 220 to STARTTLS. Asserted:

* no exception escapes, and every example ends within
  :data:`~tests.fuzz.support.HANG_SECONDS` (a watchdog);
* no spinning: every event consumes input, so the events taken out never
  outnumber the octets fed, and next_event is called at most once per octet
  fed + once per chunk (its NEED_DATA) + once (ConnectionClosed);
* bounded memory: at rest, ``_buf`` holds under 512 octets (one partial
  command line) and none in DATA, ``_body`` at most max_message_size + 7
  (see ``SmtpDialogue.check_buffers`` in test_protocol_stateful.py); while
  one chunk is being processed ``_buf`` holds under 512 + that chunk;
* replies are well formed, and each message follows exactly one accepted DATA;
* an accepted message holds at most max_message_size octets, also with
  ``bare_newlines = "normalize"``, where each bare CR or LF received becomes
  two (this campaign found messages of twice the limit before the protocol
  checked the normalised size).

Misuse of the API raises RuntimeError, as documented, and nothing else: a
random sequence of calls (next_event before the greeting, during the TLS
handshake or while an event awaits its reply; send with nothing pending;
greeting twice) raises RuntimeError exactly when misused, leaves the
connection as it was, and raises nothing otherwise.

The parser: ``build_payload`` on arbitrary bytes, on MIME-shaped messages from
a grammar, and on mutations of real and hostile messages never raises, ends
within the watchdog, and returns a payload that orjson serialises (what the
job carries) and whose raw/raw_base64 gives back exactly the input.

The budget is :func:`~tests.fuzz.support.examples`; ``make fuzz`` runs::

    TRISMTP_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/fuzz -q
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from trismtp.message import Envelope, build_payload
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

from ..corpus import hostile
from .support import check_reply_wire, fuzz_settings, split_at, watchdog

# -- driving a connection ---------------------------------------------------------

QUEUED = Reply(250, "2.0.0", "OK: queued as X")

CONFIGS = {
    "default": ProtocolConfig(),
    "reject": ProtocolConfig(bare_newlines="reject"),
    "small": ProtocolConfig(max_message_size=200, max_recipients=2),
    "normalize": ProtocolConfig(max_message_size=1500, bare_newlines="normalize"),
    "tls-auth": ProtocolConfig(
        max_message_size=600,
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_without_tls=True,
        recipient_domains=frozenset({"b", "example.net", ".example.com"}),
    ),
    "require": ProtocolConfig(
        starttls=True, require_tls=True, auth_mechanisms=("PLAIN",), require_auth=True
    ),
}
config_names = st.sampled_from(sorted(CONFIGS))


@dataclass
class Run:
    """What driving one stream produced."""

    conn: ServerConnection
    fed: int = 0  # octets fed
    feeds: int = 0  # receive_data calls
    calls: int = 0  # next_event calls
    events: int = 0  # Command and MessageReceived events
    messages: list[MessageReceived] = field(default_factory=list)
    closed: bool = False


def drive(chunks: list[bytes], config: ProtocolConfig) -> Run:
    """Feed ``chunks`` (``b""`` is EOF), answer every event as the server does, check as we go."""
    conn = ServerConnection(config)
    check_reply_wire(conn.greeting(), Reply(220, "", ""))
    run = Run(conn)
    data_accepted = False  # the last reply was 354 to DATA
    for chunk in chunks:
        conn.receive_data(chunk)
        run.feeds += 1
        run.fed += len(chunk)
        while True:
            run.calls += 1
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                check_at_rest(conn)
                break
            run.events += 1
            # Every event consumed at least one octet (a LF, or ".\r\n").
            assert run.events <= run.fed, (run.events, run.fed)
            assert len(conn._buf) < MAX_COMMAND_LINE + len(chunk)
            assert len(conn._body) <= config.max_message_size + 7
            if isinstance(event, MessageReceived):
                assert data_accepted, "a message without an accepted DATA"
                run.messages.append(event)
                reply = event.reply or QUEUED
                if event.reply is None:
                    assert len(event.data) <= config.max_message_size
            else:
                assert isinstance(event, Command)
                assert not data_accepted, f"{event!r} parsed inside DATA"
                reply = event.reply
            check_reply_wire(conn.send(reply), reply)
            data_accepted = (
                isinstance(event, Command) and event.verb == "DATA" and reply.code == 354
            )
            if conn.state is State.TLS:
                conn.tls_established()  # the handshake, which the server would do here
        if isinstance(event, ConnectionClosed):
            run.closed = True
            break
    # NEED_DATA once a chunk, ConnectionClosed once, every other call an event.
    assert run.calls <= run.fed + run.feeds + 1, (run.calls, run.fed, run.feeds)
    return run


def check_at_rest(conn: ServerConnection) -> None:
    """The buffers when the connection waits for input (see the module docstring)."""
    assert len(conn._body) <= conn.config.max_message_size + 7
    if conn.state in (State.DATA, State.CLOSED):
        assert len(conn._buf) == 0
    else:
        assert len(conn._buf) < MAX_COMMAND_LINE


def chunked(stream: bytes, data: st.DataObject) -> list[bytes]:
    """``stream`` cut at random points, one octet at a time, or whole; maybe EOF after."""
    how = data.draw(st.sampled_from(["cuts", "cuts", "whole", "bytes"]), label="chunking")
    if how == "bytes" and len(stream) <= 2000:
        chunks = [stream[i : i + 1] for i in range(len(stream))]
    elif how == "cuts":
        cut = st.integers(1, max(len(stream) - 1, 1))
        chunks = split_at(stream, data.draw(st.lists(cut, max_size=20), label="cuts"))
    else:
        chunks = [stream] if stream else []
    if data.draw(st.booleans(), label="eof"):
        chunks.append(b"")
    return chunks


# -- SMTP-shaped streams ------------------------------------------------------------

VERBS = [
    b"EHLO", b"HELO", b"ehlo", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT",
    b"VRFY", b"HELP", b"EXPN", b"BDAT", b"STARTTLS", b"AUTH", b"GET", b"Host:",
    b"MAIL FROM:", b"RCPT TO:", b"MAI\xc4\xb1L", b"", b" ",
]  # fmt: skip
FRAGMENTS = [
    b" ", b"FROM:", b"TO:", b"<", b">", b"<>", b"@", b"a@b", b"<a@b>", b"<c@example.net>",
    b"client.example", b"SIZE=", b"SIZE=100", b"SIZE=99999999999999999999", b"SIZE=\xc2\xb2",
    b"BODY=8BITMIME", b"BODY=", b"SMTPUTF8", b"AUTH=<>", b"=", b"PLAIN", b"LOGIN",
    b"AGFAAGI=", b"dXNlcg==", b"*", b"\x00", b"\xff", b"\xc3\xa9", b"\t", b"0",
    b"<@a,@b:c@d>", b"postmaster", b"\\",
]  # fmt: skip
EOLS = [b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n", b""]
DATA_BITS = [b".", b"..", b"\r\n.\r\n", b".\r\n", b"\r\n..", b"\n.\n", b"\r.\r", b"\x00", b"\r\n"]
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
OPENINGS = [
    b"",
    ENVELOPE,
    b"EHLO c\r\nAUTH PLAIN\r\nAGFAAGI=\r\n",
    b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n",
    b"EHLO c\r\nSTARTTLS\r\nEHLO c\r\n",
]

command_lines = st.builds(
    lambda verb, args, eol: verb + b"".join(args) + eol,
    st.sampled_from(VERBS),
    st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=6),
    st.sampled_from(EOLS),
)
long_runs = st.builds(
    lambda n, octet: octet * n,
    st.sampled_from([510, 511, 512, 513, 997, 998, 999, 1000, 1001, 5000]),
    st.sampled_from([b"x", b".", b"\x00", b" ", b"\r"]),
)
smtp_tokens = (
    command_lines
    | st.sampled_from(DATA_BITS + EOLS + [ENVELOPE])
    | long_runs
    | st.binary(max_size=8)
)
smtp_streams = st.builds(
    lambda opening, tokens: opening + b"".join(tokens),
    st.sampled_from(OPENINGS),
    st.lists(smtp_tokens, max_size=40),
)


@fuzz_settings(weight=1.0)
@given(stream=st.binary(max_size=3000), config=config_names, data=st.data())
def test_arbitrary_bytes(stream: bytes, config: str, data: st.DataObject) -> None:
    with watchdog("ServerConnection on arbitrary bytes"):
        drive(chunked(stream, data), CONFIGS[config])


@fuzz_settings(weight=1.5)
@given(stream=smtp_streams, config=config_names, data=st.data())
def test_smtp_shaped_streams(stream: bytes, config: str, data: st.DataObject) -> None:
    with watchdog("ServerConnection on an SMTP-shaped stream"):
        drive(chunked(stream, data), CONFIGS[config])


def test_a_burst_of_pipelined_sessions_stays_bounded() -> None:
    # One large read holding many complete sessions' worth of commands and
    # messages: the answers keep coming, one event per command, in bounded memory.
    session = ENVELOPE + b"Subject: x\r\n\r\n" + b"..dot\r\n" * 50 + b".\r\n" + b"RSET\r\n"
    run = drive([session * 200 + b"QUIT\r\n"], CONFIGS["small"])
    assert run.closed
    assert len(run.messages) == 200


# -- the API used wrongly ----------------------------------------------------------

calls = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), smtp_tokens),
        st.tuples(st.just("next_event"), st.just(b"")),
        st.tuples(st.just("send"), st.sampled_from([b"proposed", b"refuse", b"421", b"250"])),
        st.tuples(st.just("greeting"), st.just(b"")),
        st.tuples(st.just("tls_established"), st.just(b"")),
        st.tuples(st.just("eof"), st.just(b"")),
    ),
    max_size=60,
)


@fuzz_settings(weight=1.0)
@given(ops=calls, config=config_names)
def test_misuse_raises_runtime_error_and_nothing_else(
    ops: list[tuple[str, bytes]], config: str
) -> None:
    conn = ServerConnection(CONFIGS[config])
    pending: Command | MessageReceived | None = None
    for op, arg in ops:
        before = (conn.state, conn.awaiting_reply, conn.helo, list(conn.recipients))
        if op == "greeting":
            misuse = conn.state is not State.GREETING
        elif op == "next_event":
            misuse = conn.awaiting_reply or conn.state in (State.GREETING, State.TLS)
        elif op == "send":
            misuse = not conn.awaiting_reply and arg != b"421"
        else:
            misuse = False
        try:
            if op == "feed":
                conn.receive_data(arg)
            elif op == "eof":
                conn.receive_data(b"")
            elif op == "greeting":
                check_reply_wire(conn.greeting(), Reply(220, "", ""))
            elif op == "tls_established":
                conn.tls_established()
            elif op == "next_event":
                event = conn.next_event()
                if isinstance(event, Command | MessageReceived):
                    pending = event
            else:
                reply = answer(pending, arg)
                check_reply_wire(conn.send(reply), reply)
                pending = None
        except RuntimeError:
            assert misuse, f"RuntimeError from a correct {op}"
            after = (conn.state, conn.awaiting_reply, conn.helo, list(conn.recipients))
            assert after == before, f"a refused {op} changed the connection"
        else:
            assert not misuse, f"{op} misused without a RuntimeError"


def answer(pending: Command | MessageReceived | None, how: bytes) -> Reply:
    """The reply the misuse test sends: the event's own, a refusal, 421, or 250 to nothing."""
    if how == b"421":
        return Reply(421, "4.3.2", "Shutting down")
    if how == b"refuse" and pending is not None:
        return Reply(451, "4.3.0", "Try again later")
    if pending is None:
        return Reply(250, "2.0.0", "OK")  # nothing to answer: misuse
    return pending.reply or QUEUED


# -- the parser -----------------------------------------------------------------------

ENV = Envelope(
    helo="client.example",
    mail_from="a@example.org",
    recipients=("b@example.com",),
    remote_addr="203.0.113.5:53211",
)
RECEIVED_AT = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def check_payload(raw: bytes, *, include_raw: bool = True) -> dict[str, Any]:
    """build_payload: no exception, no hang, JSON-able, and raw given back exactly."""
    with watchdog("build_payload"):
        result = build_payload(
            raw, uuid="u", envelope=ENV, received_at=RECEIVED_AT, include_raw=include_raw
        )
    # What the job carries: orjson refuses lone surrogates and other non-JSON.
    payload: dict[str, Any] = json.loads(orjson.dumps(result))
    assert payload["size"] == len(raw)
    message = payload["message"]
    if include_raw:
        # raw is always a string (SPEC §5); raw_base64 is added, exact, when
        # the bytes are not UTF-8.
        assert isinstance(message["raw"], str)
        if "raw_base64" in message:
            assert base64.b64decode(message["raw_base64"], validate=True) == raw
            assert message["raw"] == raw.decode("utf-8", "replace")
        else:
            assert message["raw"].encode("utf-8") == raw
    else:
        assert "raw" not in message
        assert "raw_base64" not in message
    for attachment in payload["attachments"]:
        content = base64.b64decode(attachment["content"], validate=True)
        assert attachment["size"] == len(content)
    return payload


@fuzz_settings(weight=1.0)
@given(raw=st.binary(max_size=4000), include_raw=st.booleans())
def test_parser_on_arbitrary_bytes(raw: bytes, include_raw: bool) -> None:
    check_payload(raw, include_raw=include_raw)


CHARSETS = ["utf-8", "iso-8859-1", "x-unknown", "utf-7", "utf-16", "", "\x00", "hex", "gb2312"]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "binary", "b64", ""]
leaf_bodies = st.sampled_from(
    [
        "hello\n",
        "SGVsbG8=\n",
        "!!!bad base64",
        "=C3=A9 =ZZ =\n",
        "begin 644 x\nM86)C\n`\nend\n",
        "=?utf-8?B?w6k=?=",
        "caf\udce9\n",  # a raw 0xE9 octet
        "\x00\x01\x02",
    ]
) | st.text(max_size=40)
parameters = st.lists(
    st.sampled_from(
        [
            '; name="a.txt"',
            "; name*=utf-8''%C3%A9.txt",
            "; filename*0*=utf-8''%E2; filename*1=x",
            '; name="../../etc/passwd"',
            "; x=",
            ";;;",
            '; q="unterminated',
        ]
    ),
    max_size=3,
).map("".join)


@st.composite
def leaves(draw: st.DrawFn) -> list[str]:
    """The header lines and body lines of one non-multipart part."""
    kind = draw(
        st.sampled_from(["text/plain", "text/html", "application/octet-stream", "image/png"])
    )
    headers = [f"Content-Type: {kind}; charset={draw(st.sampled_from(CHARSETS))}{draw(parameters)}"]
    if draw(st.booleans()):
        headers.append(f"Content-Transfer-Encoding: {draw(st.sampled_from(ENCODINGS))}")
    if draw(st.booleans()):
        disposition = draw(st.sampled_from(["attachment", "inline", "weird", ""]))
        headers.append(f"Content-Disposition: {disposition}{draw(parameters)}")
    if draw(st.booleans()):
        headers.append(f"Content-ID: <{draw(st.text(max_size=10))}>")
    return [*headers, "", draw(leaf_bodies)]


def multipart(children: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    @st.composite
    def build(draw: st.DrawFn) -> list[str]:
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest", "report"]))
        boundary = draw(st.sampled_from(["b", "=_x", "a b", '"q"', "", "--", "é"]))
        declared = draw(st.sampled_from([f"; boundary={boundary}", f'; boundary="{boundary}"', ""]))
        lines = [f"Content-Type: multipart/{subtype}{declared}", "", "preamble"]
        for child in draw(st.lists(children, min_size=1, max_size=4)):
            lines += [f"--{boundary}", *child]
        if draw(st.booleans()):
            lines.append(f"--{boundary}--")
        if draw(st.booleans()):
            lines.append("epilogue")
        return lines

    def embedded(draw: st.DrawFn) -> list[str]:
        return ["Content-Type: message/rfc822", "", *draw(children)]

    return build() | st.composite(embedded)()


mime_parts = st.recursive(leaves(), multipart, max_leaves=12)
top_headers = st.lists(
    st.sampled_from(
        [
            "From: =?utf-8?B?SsO2cmc=?= <a@example.org>",
            "To: a@b, (comment) c@d, Group: e@f;",
            "Subject: =?utf-8?Q?caf=C3=A9?= =?broken",
            "Subject: caf\udce9",
            "Message-ID: <x@y>",
            "MIME-Version: 1.0",
            "Reply-To: <<<>>>",
            "X-Empty:",
            "no colon here",
            " leading continuation",
        ]
    ),
    max_size=5,
)


@fuzz_settings(weight=1.0)
@given(
    headers=top_headers,
    part=mime_parts,
    newline=st.sampled_from(["\r\n", "\n", "\r"]),
    tail=st.sampled_from(["", "\r\n", "\n"]),
)
def test_parser_on_mime_shaped_messages(
    headers: list[str], part: list[str], newline: str, tail: str
) -> None:
    raw = (newline.join([*headers, *part]) + tail).encode("utf-8", "surrogateescape")
    check_payload(raw)


SEEDS = [
    "missing-closing-boundary",
    "rfc822-part-with-broken-message",
    "attachment-filenames-control-characters",
    "outlook-winmail-dat",
    "spam-mixed-encodings",
    "charset-oddities",
    "bad-base64",
    "broken-encoded-words",
]
mutations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]),
        st.integers(0, 2000),
        st.integers(0, 64),
        st.binary(max_size=8)
        | st.sampled_from([b"\r\n", b"\n", b"--", b"\r\n--", b";", b'"', b"=?", b"?=", b"\x00"]),
    ),
    min_size=1,
    max_size=8,
)


def mutate(raw: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    for op, position, length, octets in ops:
        at = position % (len(raw) + 1)
        if op == "insert":
            raw = raw[:at] + octets + raw[at:]
        elif op == "delete":
            raw = raw[:at] + raw[at + length :]
        elif op == "replace":
            raw = raw[:at] + octets + raw[at + len(octets) :]
        elif op == "duplicate":
            raw = raw[: at + length] + raw[at : at + length] + raw[at + length :]
        else:
            raw = raw[:at]
    return raw


@fuzz_settings(weight=1.0)
@given(seed=st.sampled_from(SEEDS), ops=mutations)
def test_parser_on_mutated_messages(seed: str, ops: list[tuple[str, int, int, bytes]]) -> None:
    check_payload(mutate(hostile.build(seed), ops))
