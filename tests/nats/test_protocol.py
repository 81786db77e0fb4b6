"""The NATS client protocol, sans-io: the parser of what the server sends and the
encoders of what a client sends, fed bytes (recorded from nats-server 2.9.10) and
hypothesis-chosen chunkings; no server, no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trismtp.nats import (
    Msg,
    NatsProtocolError,
)
from trismtp.nats.protocol import (
    PING,
    PONG,
    Err,
    Event,
    Info,
    Ok,
    Parser,
    Ping,
    Pong,
    encode_connect,
    encode_headers,
    encode_hpub,
    encode_pub,
    encode_sub,
    encode_unsub,
    parse_headers,
)

# -- the parser -----------------------------------------------------------------

# What nats-server 2.9.10 sent over its WebSocket listener (recorded with a bare
# trio-websocket client), plus messages with headers, +OK and a payload that
# looks like protocol. Note the double space in the PubAck MSG lines.
_PAYLOAD_LIKE_PROTOCOL = b"PING\r\nMSG x 1 3\r\n\r\n"
_HEADERS = b"NATS/1.0\r\nNats-Msg-Id: a\r\nx: 1\r\nx:  2 \r\n\r\n"
RECORDED = b"".join(
    [
        b'INFO {"server_id":"NDFSHXQ2IQLHO7XHXLYMAMPG4BSBMJW2J23BAULMDRQQAAURRIARZJUS",'
        b'"version":"2.9.10","proto":1,"go":"go1.19.8","host":"127.0.0.1","port":14222,'
        b'"headers":true,"max_payload":1048576,"jetstream":true,"client_id":4,'
        b'"client_ip":"127.0.0.1"} \r\n',
        b"PONG\r\n",
        b"MSG _INBOX.x.1 1 158\r\n"
        b'{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":404,'
        b'"err_code":10059,"description":"stream not found"},"total":0,"offset":0,"limit":0}\r\n',
        b'MSG _INBOX.x.10 1  23\r\n{"stream":"S", "seq":1}\r\n',
        b'MSG _INBOX.x.11 1  41\r\n{"stream":"S", "seq":1,"duplicate": true}\r\n',
        b"HMSG _INBOX.x.20 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        b"PING\r\n",
        b"HMSG s.a 2 reply.to %d %d\r\n%s%s\r\n"
        % (
            len(_HEADERS),
            len(_HEADERS) + len(_PAYLOAD_LIKE_PROTOCOL),
            _HEADERS,
            _PAYLOAD_LIKE_PROTOCOL,
        ),
        b"MSG empty 3 0\r\n\r\n",
        b"+OK\r\n",
        b"-ERR 'Stale Connection'\r\n",
    ]
)


def parse_in_chunks(data: bytes, cuts: list[int]) -> list[Event]:
    parser = Parser()
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    return events


def test_parser_reads_a_recorded_stream() -> None:
    events = Parser().feed(RECORDED)
    assert [type(e) for e in events] == [
        Info,
        Pong,
        Msg,
        Msg,
        Msg,
        Msg,
        Ping,
        Msg,
        Msg,
        Ok,
        Err,
    ]
    info = events[0]
    assert isinstance(info, Info)
    assert info.data["max_payload"] == 1048576
    ack, duplicate, no_responders, with_headers, empty = (
        e for e in events if isinstance(e, Msg) and e.subject != "_INBOX.x.1"
    )
    assert ack == Msg("_INBOX.x.10", "1", None, b'{"stream":"S", "seq":1}')
    assert json.loads(duplicate.payload)["duplicate"] is True
    assert no_responders.status == 503
    assert no_responders.payload == b""
    assert with_headers.reply == "reply.to"
    assert with_headers.headers == {"Nats-Msg-Id": ["a"], "x": ["1", "2"]}
    assert with_headers.status is None
    assert with_headers.payload == _PAYLOAD_LIKE_PROTOCOL
    assert empty == Msg("empty", "3", None, b"")
    assert events[-1] == Err("Stale Connection")


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_parser_events_do_not_depend_on_chunking(cuts: list[int]) -> None:
    assert parse_in_chunks(RECORDED, cuts) == Parser().feed(RECORDED)


def test_parser_byte_by_byte() -> None:
    assert parse_in_chunks(RECORDED, list(range(len(RECORDED)))) == Parser().feed(RECORDED)


def test_parser_bounds_a_line_without_end_as_soon_as_it_is_too_long() -> None:
    parser = Parser(max_line=64)
    data = b"INFO " + b"x" * 1000
    for byte in data[:63]:
        assert parser.feed(bytes([byte])) == []
    # The 64th byte without LF: the line cannot fit any more.
    with pytest.raises(NatsProtocolError, match="longer than 64 bytes"):
        parser.feed(data[63:64])
    # Broken for good: the next call raises again.
    with pytest.raises(NatsProtocolError, match="longer than 64 bytes"):
        parser.feed(b"\r\n")


def test_parser_accepts_a_line_of_exactly_max_line() -> None:
    line = b"-ERR '" + b"e" * 55 + b"'\r\n"
    assert len(line) == 64
    assert Parser(max_line=64).feed(line) == [Err("e" * 55)]
    with pytest.raises(NatsProtocolError):
        Parser(max_line=63).feed(line)


def test_parser_bounds_a_payload_before_it_arrives() -> None:
    parser = Parser(max_payload=10)
    assert parser.feed(b"MSG a 1 10\r\n0123456789\r\n") == [Msg("a", "1", None, b"0123456789")]
    assert parser.feed(b"HMSG a 1 12 11") == []  # not even the end of the line yet…
    with pytest.raises(NatsProtocolError, match="exceeds max_payload"):
        parser.feed(b"\r\n")  # …the size is known here, before any payload


@pytest.mark.parametrize(
    "data",
    [
        b"FOO bar\r\n",
        b"MSG a 1\r\n",
        b"MSG a 1 x\r\n",
        b"MSG a 1 2\r\nabXY",
        b"HMSG a 1 5 3\r\n",
        b"HMSG a 1 3 3\r\nabc\r\n",
        b"HMSG a 1 12 12\r\nNATS/1.0 5x\r\n\r\n",
        b"HMSG a 1 18 18\r\nNATS/1.0\r\nno-colon\r\n\r\n",
        b"INFO [1]\r\n",
        b"INFO {\r\n",
        b"\r\n",
    ],
)
def test_parser_rejects_what_is_not_nats(data: bytes) -> None:
    with pytest.raises(NatsProtocolError):
        Parser().feed(data)


def test_parser_err_and_case() -> None:
    events = Parser().feed(b"-ERR 'Authorization Violation'\r\nping\r\n-err 'x y'\r\n")
    assert events == [Err("Authorization Violation"), Ping(), Err("x y")]


def test_parse_headers_status_and_description() -> None:
    assert parse_headers(b"NATS/1.0 408 Request Timeout\r\n\r\n") == (408, "Request Timeout", {})
    assert parse_headers(b"NATS/1.0\r\nA: 1\r\na: 2\r\n\r\n") == (
        None,
        "",
        {"A": ["1"], "a": ["2"]},
    )


# -- the encoders ---------------------------------------------------------------


def test_encode_connect() -> None:
    line = encode_connect()
    assert line.startswith(b"CONNECT ")
    assert line.endswith(b"\r\n")
    options = json.loads(line[len(b"CONNECT ") :])
    assert options["verbose"] is False
    assert options["pedantic"] is False
    assert options["headers"] is True
    assert options["no_responders"] is True
    assert options["lang"] == "python-trismtp"
    assert options["protocol"] == 1
    assert options["version"]
    assert not {"user", "pass", "auth_token"} & options.keys()
    with_password = json.loads(encode_connect(user="u", password="p")[8:])
    assert (with_password["user"], with_password["pass"]) == ("u", "p")
    assert json.loads(encode_connect(token="t")[8:])["auth_token"] == "t"


def test_encode_hpub_round_trips_through_the_parser() -> None:
    frame = encode_hpub("a.b", b"hi\r\n", {"X-One": ["1", "uno"], "Two": ["2"]}, reply="_INBOX.r.1")
    block = b"NATS/1.0\r\nX-One: 1\r\nX-One: uno\r\nTwo: 2\r\n\r\n"
    assert frame == b"HPUB a.b _INBOX.r.1 %d %d\r\n%shi\r\n\r\n" % (
        len(block),
        len(block) + 4,
        block,
    )
    # What the server would deliver is the same bytes with HMSG and a sid.
    (event,) = Parser().feed(b"HMSG" + frame[4:].replace(b"a.b ", b"a.b 7 ", 1))
    assert event == Msg("a.b", "7", "_INBOX.r.1", b"hi\r\n", {"X-One": ["1", "uno"], "Two": ["2"]})


def test_encode_pub_sub_unsub_ping_pong() -> None:
    assert encode_pub("a", b"xyz") == b"PUB a 3\r\nxyz\r\n"
    assert encode_pub("a", b"", reply="r") == b"PUB a r 0\r\n\r\n"
    assert encode_sub("_INBOX.abc.*", "1") == b"SUB _INBOX.abc.* 1\r\n"
    assert encode_sub("a.>", "2", queue="q") == b"SUB a.> q 2\r\n"
    assert encode_unsub("1") == b"UNSUB 1\r\n"
    assert encode_unsub("1", 5) == b"UNSUB 1 5\r\n"
    assert (PING, PONG) == (b"PING\r\n", b"PONG\r\n")


@pytest.mark.parametrize(
    "headers",
    [
        {"X": ["a\r\nInjected: 1"]},
        {"X": ["a\nb"]},
        {"X": ["a\rb"]},
        {"X:Y": ["1"]},
        {"X Y": ["1"]},
        {"": ["1"]},
        {"Ü": ["1"]},
    ],
)
def test_encode_headers_refuses_what_breaks_the_framing(headers: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="NATS header"):
        encode_headers(headers)


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB", "a..b", ".a", "a.*", "a.>"])
def test_encoders_refuse_bad_publish_subjects(subject: str) -> None:
    with pytest.raises(ValueError, match="invalid NATS subject"):
        encode_pub(subject, b"")
    with pytest.raises(ValueError, match="invalid NATS subject"):
        encode_hpub(subject, b"", {})


def test_non_ascii_header_values_are_utf8() -> None:
    block = encode_headers({"X": ["é"]})
    assert parse_headers(block) == (None, "", {"X": ["é"]})
