"""The protocol machine's STARTTLS, AUTH, HTTP and recipient-domain rules.

The handshake itself is the server's business; here "TLS" is the call to
``tls_established()`` that the server makes after a successful handshake.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import pytest

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

from .test_protocol import DATA, EHLO, END, MAIL, QUIT, RCPT, status

TLS = ProtocolConfig(starttls=True)
AUTH_AFTER_TLS = ProtocolConfig(starttls=True, auth_mechanisms=("PLAIN", "LOGIN"))
AUTH_PLAINTEXT = ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), auth_without_tls=True)
HANDSHAKE = b"<handshake>"
"""In a conversation: the server completes the TLS handshake here."""


class Session:
    """A conversation: the events seen, the replies sent, the statuses."""

    def __init__(self, config: ProtocolConfig) -> None:
        self.conn = ServerConnection(config)
        self.output = self.conn.greeting()
        self.events: list[Command | MessageReceived] = []
        self.closed = False

    def feed(self, data: bytes, answer: dict[str, Reply] | None = None) -> list[str]:
        """Feed ``data``; answer each event (``answer`` overrides by verb); new statuses."""
        before = len(self.output)
        if data == HANDSHAKE:
            self.conn.tls_established()
        else:
            self.conn.receive_data(data)
        while not self.closed:
            if self.conn.state is State.TLS:
                break  # the server would do the handshake now
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, ConnectionClosed):
                self.closed = True
                break
            assert isinstance(event, Command | MessageReceived)
            self.events.append(event)
            reply = event.reply or Reply(250, "2.0.0", "OK: queued as X")
            if answer and isinstance(event, Command) and event.verb in answer:
                reply = answer[event.verb]
            self.output += self.conn.send(reply)
        return [status(r) for r in _replies(self.output[before:])]

    def run(self, chunks: Iterable[bytes]) -> list[str]:
        statuses: list[str] = []
        for chunk in chunks:
            statuses += self.feed(chunk)
        return statuses


def _replies(output: bytes) -> list[str]:
    replies, current = [], ""
    for line in output.decode().split("\r\n")[:-1]:
        current += line + "\r\n"
        if len(line) == 3 or line[3] == " ":
            replies.append(current)
            current = ""
    return replies


def ehlo_keywords(session: Session) -> list[str]:
    session.output = b""
    session.feed(EHLO)
    return [line[4:] for line in session.output.decode().split("\r\n")[1:-1]]


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# -- STARTTLS -----------------------------------------------------------------


def test_starttls_offered_only_with_a_certificate_and_before_tls() -> None:
    assert "STARTTLS" not in ehlo_keywords(Session(ProtocolConfig()))
    session = Session(TLS)
    assert "STARTTLS" in ehlo_keywords(session)
    session.run([b"STARTTLS\r\n", HANDSHAKE])
    assert "STARTTLS" not in ehlo_keywords(session)


def test_starttls_without_certificate_is_not_implemented() -> None:
    assert Session(ProtocolConfig()).run([EHLO, b"STARTTLS\r\n"]) == ["250", "502 5.5.1"]


def test_starttls_discards_what_was_pipelined_after_it() -> None:
    # CVE-2011-0411: commands injected into the plaintext must not be run
    # inside the TLS session.
    session = Session(TLS)
    assert session.run([EHLO, b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nNOOP\r\n"]) == [
        "250",
        "220 2.0.0",
    ]
    assert session.conn.state is State.TLS
    with pytest.raises(RuntimeError):
        session.conn.next_event()
    # Inside TLS the first reply is to the first command sent inside TLS.
    assert session.run([HANDSHAKE, b"NOOP\r\n"]) == ["250 2.0.0"]
    verbs = [e.verb for e in session.events if isinstance(e, Command)]
    assert verbs == ["EHLO", "STARTTLS", "NOOP"]


def test_starttls_forgets_the_plaintext_session() -> None:
    session = Session(TLS)
    session.run([EHLO, b"STARTTLS\r\n", HANDSHAKE])
    assert session.conn.secure
    assert session.conn.helo == ""
    # RFC 3207 §4.2: the client must say EHLO again.
    assert session.run([MAIL]) == ["503 5.5.1"]
    assert session.run([EHLO, MAIL]) == ["250", "250 2.1.0"]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([EHLO, b"STARTTLS now\r\n"], "501 5.5.4"),
        ([EHLO, b"STARTTLS\r\n", HANDSHAKE, EHLO, b"STARTTLS\r\n"], "503 5.5.1"),
        ([EHLO, MAIL, b"STARTTLS\r\n"], "503 5.5.1"),
    ],
    ids=["argument", "twice", "in-transaction"],
)
def test_starttls_refusals(chunks: list[bytes], expected: str) -> None:
    assert Session(TLS).run(chunks)[-1] == expected


def test_tls_required_refuses_mail_before_starttls() -> None:
    session = Session(ProtocolConfig(starttls=True, require_tls=True))
    assert session.run([EHLO, MAIL]) == ["250", "530 5.7.0"]
    assert session.run([b"STARTTLS\r\n", HANDSHAKE, EHLO, MAIL]) == [
        "220 2.0.0",
        "250",
        "250 2.1.0",
    ]


def test_refused_starttls_changes_nothing() -> None:
    session = Session(TLS)
    assert session.feed(EHLO + b"STARTTLS\r\nNOOP\r\n", {"STARTTLS": Reply(454, "4.7.0", "No")})
    assert session.conn.state is State.READY
    assert not session.conn.secure
    assert [e.verb for e in session.events if isinstance(e, Command)] == [
        "EHLO",
        "STARTTLS",
        "NOOP",
    ]


# -- AUTH -----------------------------------------------------------------------


def test_auth_advertised_after_tls_only() -> None:
    session = Session(AUTH_AFTER_TLS)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(session))
    assert session.run([b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n"]) == ["538 5.7.11"]
    session.run([b"STARTTLS\r\n", HANDSHAKE])
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(session)


def test_auth_advertised_in_plaintext_when_allowed() -> None:
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(Session(AUTH_PLAINTEXT))


def test_auth_not_configured_is_not_implemented() -> None:
    assert Session(ProtocolConfig()).run([EHLO, b"AUTH PLAIN\r\n"]) == ["250", "502 5.5.1"]


def test_plain_with_initial_response() -> None:
    session = Session(AUTH_PLAINTEXT)
    line = b"AUTH PLAIN " + b64("\0alice\0s3cret") + b"\r\n"
    assert session.run([EHLO, line]) == ["250", "235 2.7.0"]
    event = session.events[-1]
    assert isinstance(event, Command)
    assert event.credentials is not None
    assert (event.credentials.username, event.credentials.password) == ("alice", "s3cret")
    # The event holds the mechanism, never the response with the password.
    assert event.argument == "PLAIN"
    assert "s3cret" not in repr(event)
    assert session.conn.authenticated == ("PLAIN", "alice")


def test_plain_without_initial_response() -> None:
    session = Session(AUTH_PLAINTEXT)
    assert session.run([EHLO, b"AUTH PLAIN\r\n"]) == ["250", "334"]
    assert session.output.endswith(b"334 \r\n")  # RFC 4954: "334" SP
    assert session.run([b64("\0alice\0pw") + b"\r\n"]) == ["235 2.7.0"]


def test_login_exchange() -> None:
    session = Session(AUTH_PLAINTEXT)
    assert session.run([EHLO, b"AUTH LOGIN\r\n"]) == ["250", "334"]
    assert session.output.endswith(b"334 VXNlcm5hbWU6\r\n")
    assert session.run([b64("alice") + b"\r\n"]) == ["334"]
    assert session.output.endswith(b"334 UGFzc3dvcmQ6\r\n")
    assert session.run([b64("pw") + b"\r\n"]) == ["235 2.7.0"]
    assert session.conn.authenticated == ("LOGIN", "alice")
    # The username line is not a command: no NOOP/MAIL ever ran from it.
    assert all(e.verb == "AUTH" for e in session.events[1:] if isinstance(e, Command))


def test_login_with_initial_username() -> None:
    session = Session(AUTH_PLAINTEXT)
    assert session.run([EHLO, b"AUTH LOGIN " + b64("alice") + b"\r\n"]) == ["250", "334"]
    assert session.run([b64("pw") + b"\r\n"]) == ["235 2.7.0"]


def test_refused_credentials_end_the_exchange() -> None:
    session = Session(AUTH_PLAINTEXT)
    session.run([EHLO])
    failed = Reply(535, "5.7.8", "Authentication credentials invalid")
    assert session.feed(b"AUTH PLAIN " + b64("\0alice\0bad") + b"\r\n", {"AUTH": failed}) == [
        "535 5.7.8"
    ]
    assert session.conn.authenticated is None
    assert session.conn.state is State.READY
    # The next line is a command again, and AUTH may be tried again.
    assert session.run([b"NOOP\r\n", b"AUTH PLAIN " + b64("\0alice\0ok") + b"\r\n"]) == [
        "250 2.0.0",
        "235 2.7.0",
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"AUTH PLAIN\r\n", b"*\r\n"], ["334", "501 5.7.0"]),
        ([b"AUTH PLAIN\r\n", b"not base64!\r\n"], ["334", "501 5.5.2"]),
        ([b"AUTH PLAIN " + b64("alice") + b"\r\n"], ["501 5.5.2"]),
        ([b"AUTH PLAIN =\r\n"], ["501 5.5.2"]),
        ([b"AUTH LOGIN\r\n", b64("alice") + b"\r\n", b"*\r\n"], ["334", "334", "501 5.7.0"]),
        ([b"AUTH CRAM-MD5\r\n"], ["504 5.5.4"]),
        ([b"AUTH\r\n"], ["504 5.5.4"]),
        ([b"AUTH PLAIN\r\n", b"\xff\xfe\r\n"], ["334", "501 5.5.2"]),
    ],
    ids=["cancel", "bad-base64", "no-nuls", "empty", "login-cancel", "mechanism", "none", "8bit"],
)
def test_bad_auth_exchanges(lines: list[bytes], expected: list[str]) -> None:
    session = Session(AUTH_PLAINTEXT)
    session.run([EHLO])
    assert session.run(lines) == expected
    assert session.conn.authenticated is None
    assert session.run([b"NOOP\r\n"]) == ["250 2.0.0"]  # back to commands


def test_auth_sequence_errors() -> None:
    assert Session(AUTH_PLAINTEXT).run([b"AUTH PLAIN\r\n"]) == ["503 5.5.1"]  # no EHLO
    session = Session(AUTH_PLAINTEXT)
    session.run([EHLO, b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n"])
    assert session.run([b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n"]) == ["503 5.5.1"]
    session = Session(AUTH_PLAINTEXT)
    assert session.run([EHLO, MAIL, b"AUTH PLAIN\r\n"])[-1] == "503 5.5.1"


def test_auth_required_before_mail() -> None:
    config = ProtocolConfig(auth_mechanisms=("PLAIN",), auth_without_tls=True, require_auth=True)
    session = Session(config)
    assert session.run([EHLO, MAIL]) == ["250", "530 5.7.0"]
    assert session.run([b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n", MAIL]) == [
        "235 2.7.0",
        "250 2.1.0",
    ]


def test_mail_auth_parameter_accepted_when_auth_offered() -> None:
    mail = b"MAIL FROM:<a@example.org> AUTH=<>\r\n"
    assert Session(AUTH_PLAINTEXT).run([EHLO, mail]) == ["250", "250 2.1.0"]
    assert Session(ProtocolConfig()).run([EHLO, mail]) == ["250", "555 5.5.4"]


def test_starttls_forgets_authentication() -> None:
    config = ProtocolConfig(starttls=True, auth_mechanisms=("PLAIN",), auth_without_tls=True)
    session = Session(config)
    session.run([EHLO, b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n"])
    assert session.conn.authenticated is not None
    session.run([b"STARTTLS\r\n", HANDSHAKE])
    assert session.conn.authenticated is None


def test_over_long_sasl_line_ends_the_exchange() -> None:
    session = Session(AUTH_PLAINTEXT)
    assert session.run([EHLO, b"AUTH PLAIN\r\n", b"A" * 600 + b"\r\n"]) == [
        "250",
        "334",
        "500 5.5.2",
    ]
    assert session.run([b"NOOP\r\n"]) == ["250 2.0.0"]


# -- HTTP on the SMTP port ---------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /login HTTP/1.0\r\n",
        b"CONNECT mail.example:25 HTTP/1.1\r\n",
        b"Host: example.com\r\n",
        b"User-Agent: curl/8\r\n",
    ],
)
def test_http_is_answered_and_closed(line: bytes) -> None:
    session = Session(ProtocolConfig())
    assert session.run([line + b"NOOP\r\n"]) == ["421 4.7.0"]
    assert session.closed
    assert session.conn.state is State.CLOSED


def test_smtp_commands_are_not_mistaken_for_http() -> None:
    session = Session(ProtocolConfig())
    assert session.run([EHLO, b"MAIL FROM:<a@b>\r\n", b"HELP\r\n"]) == [
        "250",
        "250 2.1.0",
        "214 2.0.0",
    ]


# -- recipient domains ----------------------------------------------------------------

DOMAINS = ProtocolConfig(recipient_domains=frozenset({"example.net", ".corp.example"}))


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        (b"RCPT TO:<b@example.net>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@EXAMPLE.NET>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@example.net.>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@sub.example.net>\r\n", "550 5.7.1"),
        (b"RCPT TO:<b@corp.example>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@a.b.corp.example>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@evilcorp.example>\r\n", "550 5.7.1"),
        (b"RCPT TO:<b@example.org>\r\n", "550 5.7.1"),
        (b"RCPT TO:<Postmaster>\r\n", "250 2.1.5"),
        (b"RCPT TO:<b@example.net@evil.example>\r\n", "550 5.7.1"),
    ],
)
def test_recipient_domain_allow_list(rcpt: bytes, expected: str) -> None:
    assert Session(DOMAINS).run([EHLO, MAIL, rcpt])[-1] == expected


def test_refused_recipients_are_not_in_the_envelope() -> None:
    session = Session(DOMAINS)
    session.run([EHLO, MAIL, b"RCPT TO:<x@example.org>\r\n", RCPT, DATA, b"x\r\n", END, QUIT])
    (message,) = [e for e in session.events if isinstance(e, MessageReceived)]
    assert message.recipients == ("b@example.net",)
