"""The NATS JetStream client: its protocol parser and encoders, and the client
against a real nats-server (JetStream on, WebSocket listener on 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from trismtp.jobs.model import Job, JobOptions
from trismtp.jobs.rpc import JobsUnavailable
from trismtp.nats import (
    MSG_ID_HEADER,
    JetStreamError,
    MessageTooLarge,
    Msg,
    NatsAuthorizationError,
    NatsClient,
    NatsMessage,
    NatsProtocolError,
    ensure_stream,
    first_messages,
    get_message,
    roadrunner_message,
    stream_info,
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

from ..e2e.trismtp_e2e import free_port
from .nats_server import NatsServer

USER = "trismtp"
PASSWORD = "pw-Zq8vR2mX5tLw"  # distinctive, to look for in error texts and logs

_names = count(1)


def unique(prefix: str) -> tuple[str, str]:
    """A fresh stream name and subject: tests share the module's server."""
    n = next(_names)
    return f"{prefix.upper()}{n}", f"{prefix}{n}.jobs"


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The module's server. It PINGs every second and drops a client after two
    unanswered PINGs, so every test also checks that the client answers them."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), ping_interval="1s", ping_max=2)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A second server that requires a user and password."""
    server = NatsServer(tmp_path_factory.mktemp("nats-auth"), user=USER, password=PASSWORD)
    try:
        yield server.start()
    finally:
        server.stop()


def messages(n: int, prefix: str = "m") -> list[NatsMessage]:
    return [NatsMessage(f"{prefix}-{i}", f"body {i}".encode(), {"n": [str(i)]}) for i in range(n)]


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


# -- RoadRunner's format ----------------------------------------------------------


def make_job(payload: str = '{"from":"a@example.org","subject":"Grüße ✓"}') -> Job:
    job_id = "6f1c2a9e-3b7d-4c1e-9a2f-0d8e7b6c5a41"
    return Job(
        job="smtp.email",
        id=job_id,
        payload=payload,
        headers={"uuid": [job_id], "payload_class": ["smtp:handler"], "x-tenant": ["a", "b"]},
        options=JobOptions(priority=7, pipeline="smtp", delay=0, auto_ack=True),
    )


def test_roadrunner_message_matches_the_documented_example() -> None:
    job = make_job('{"from":"a@example.org"}')
    body, headers = roadrunner_message(job.to_json())
    assert json.loads(body) == {
        "job": "smtp.email",
        "id": job.id,
        "payload": "eyJmcm9tIjoiYUBleGFtcGxlLm9yZyJ9",
        "options": {"priority": 7, "pipeline": "smtp", "delay": 0, "auto_ack": True},
    }
    assert headers == job.headers


def test_roadrunner_payload_is_base64_of_the_utf8_bytes() -> None:
    job = make_job()
    body, _ = roadrunner_message(job.to_json())
    data = json.loads(body)
    # Go's encoding/json reads []byte as standard base64 with padding.
    assert base64.b64decode(data["payload"], validate=True) == job.payload.encode("utf-8")
    assert "headers" not in data  # RoadRunner's Item keeps headers out of the JSON


def test_roadrunner_message_refuses_what_is_not_a_job() -> None:
    with pytest.raises(ValueError, match="not a job"):
        roadrunner_message('{"job": "x"}')
    with pytest.raises(ValueError, match="not a job"):
        roadrunner_message("not json")


# -- the client against nats-server ---------------------------------------------


class Holder:
    """A bare NATS subscriber that never replies: a publish to its subject waits."""

    def __init__(self) -> None:
        self.received = 0
        self.changed = trio.Event()

    async def run(self, url: str, subject: str, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_url(url) as ws:
            parser = Parser()
            await ws.send_message(encode_connect() + encode_sub(subject, "1") + PING)
            started = False
            try:
                while True:
                    message = await ws.get_message()
                    data = message if isinstance(message, bytes) else message.encode()
                    for event in parser.feed(data):
                        if isinstance(event, Pong) and not started:
                            started = True
                            task_status.started()
                        elif isinstance(event, Ping):
                            await ws.send_message(PONG)
                        elif isinstance(event, Msg):
                            self.received += 1
                            self.changed.set()
                            self.changed = trio.Event()
            except ConnectionClosed:
                pass

    async def wait_for(self, n: int) -> None:
        while self.received < n:
            await self.changed.wait()


@asynccontextmanager
async def holding(url: str, subject: str) -> AsyncIterator[Holder]:
    holder = Holder()
    async with trio.open_nursery() as nursery:
        await nursery.start(holder.run, url, subject)
        yield holder
        nursery.cancel_scope.cancel()


async def test_publish_batch_of_100_in_one_websocket_message(nats: NatsServer) -> None:
    stream, subject = unique("batch")
    async with NatsClient.connect(nats.url) as client:
        info = await ensure_stream(client, stream, [subject])
        assert info["config"]["retention"] == "workqueue"
        assert info["config"]["duplicate_window"] == 120 * 10**9

        sent: list[bytes] = []
        send = client._ws.send_message

        async def counting_send(message: str | bytes) -> None:
            assert isinstance(message, bytes)
            sent.append(message)
            await send(message)

        client._ws.send_message = counting_send  # type: ignore[method-assign]
        acks = await client.publish_batch(subject, messages(100), timeout=10)
        client._ws.send_message = send  # type: ignore[method-assign]

        assert len(sent) == 1
        assert sent[0].count(b"HPUB ") == 100
        assert [ack.seq for ack in acks] == list(range(1, 101))
        assert {ack.stream for ack in acks} == {stream}
        assert not any(ack.duplicate for ack in acks)
        state = (await stream_info(client, stream) or {})["state"]
        assert (state["messages"], state["first_seq"], state["last_seq"]) == (100, 1, 100)
        stored = await first_messages(client, stream, 1000)
        assert [m.data for m in stored] == [m.data for m in messages(100)]
        assert stored[3].headers == {MSG_ID_HEADER: ["m-3"], "n": ["3"]}


async def test_same_msg_id_twice_is_stored_once(nats: NatsServer) -> None:
    stream, subject = unique("dup")
    async with NatsClient.connect(nats.url) as client:
        await ensure_stream(client, stream, [subject])
        message = NatsMessage("same-id", b"payload", {})
        (first,) = await client.publish_batch(subject, [message], timeout=10)
        (second,) = await client.publish_batch(subject, [message], timeout=10)
        assert (first.seq, first.duplicate) == (1, False)
        assert (second.seq, second.duplicate) == (1, True)
        # Twice in one batch, too.
        acks = await client.publish_batch(subject, [message, message], timeout=10)
        assert [(a.seq, a.duplicate) for a in acks] == [(1, True), (1, True)]
        assert (await stream_info(client, stream) or {})["state"]["messages"] == 1


async def test_publish_to_a_subject_no_stream_covers(nats: NatsServer) -> None:
    _, subject = unique("nostream")
    async with NatsClient.connect(nats.url) as client:
        with pytest.raises(JetStreamError) as caught:
            await client.publish_batch(subject, messages(3), timeout=10)
        assert caught.value.code == 503
        assert f"no stream for subject {subject!r}" in str(caught.value)
        assert "3 of 3" in str(caught.value)
        # A refusal says nothing about the connection.
        assert not client.closed
        stream, covered = unique("after")
        await ensure_stream(client, stream, [covered])
        assert len(await client.publish_batch(covered, messages(1), timeout=10)) == 1


async def test_get_message_and_roadrunner_round_trip(nats: NatsServer) -> None:
    stream, subject = unique("rr")
    job = make_job()
    body, headers = roadrunner_message(job.to_json())
    async with NatsClient.connect(nats.url) as client:
        await ensure_stream(client, stream, [subject])
        (ack,) = await client.publish_batch(subject, [NatsMessage(job.id, body, headers)], 10)
        found = await get_message(client, stream, ack.seq)
        assert found is not None
        stored_headers, stored_body = found
        assert stored_headers == {MSG_ID_HEADER: [job.id], **job.headers}
        assert stored_body == body
        data = json.loads(stored_body)
        assert base64.b64decode(data["payload"], validate=True).decode() == job.payload
        assert (data["job"], data["id"]) == (job.job, job.id)
        assert data["options"] == {"priority": 7, "pipeline": "smtp", "delay": 0, "auto_ack": True}
        assert await get_message(client, stream, ack.seq + 1) is None


async def test_ensure_stream_leaves_an_existing_stream_alone(nats: NatsServer) -> None:
    stream, subject = unique("exist")
    wildcard = subject.rsplit(".", 1)[0] + ".>"
    async with NatsClient.connect(nats.url) as client:
        created = await ensure_stream(client, stream, [wildcard], retention="limits")
        assert created["config"]["subjects"] == [wildcard]
        # Covered by the wildcard: accepted as it is, retention untouched.
        again = await ensure_stream(client, stream, [subject], retention="workqueue")
        assert again["config"]["retention"] == "limits"
        with pytest.raises(JetStreamError, match=r"do not cover 'elsewhere\.jobs'"):
            await ensure_stream(client, stream, ["elsewhere.jobs"])
        assert await stream_info(client, "NO_SUCH_STREAM") is None
        with pytest.raises(JetStreamError) as caught:
            await client.request("$JS.API.STREAM.INFO.NO_SUCH_STREAM", b"", 5)
        assert caught.value.err_code == 10059


async def test_message_larger_than_max_payload_is_refused_before_sending(
    nats: NatsServer,
) -> None:
    stream, subject = unique("big")
    async with NatsClient.connect(nats.url) as client:
        await ensure_stream(client, stream, [subject])
        big = NatsMessage("big", b"x" * client.max_payload, {})
        with pytest.raises(MessageTooLarge, match="exceeds the server's max_payload"):
            await client.publish_batch(subject, [*messages(2), big], timeout=10)
        assert not client.closed
        assert (await stream_info(client, stream) or {})["state"]["messages"] == 0


async def test_pubacks_that_do_not_come_in_time(nats: NatsServer) -> None:
    _, subject = unique("held")
    async with NatsClient.connect(nats.url) as client, holding(nats.ws_url, subject) as held:
        start = trio.current_time()
        with pytest.raises(JobsUnavailable, match=r"no PubAck .* within 0\.5 s for 2 of 2"):
            await client.publish_batch(subject, messages(2), timeout=0.5)
        assert trio.current_time() - start < 3
        assert held.received == 2
        # Late is not lost: the connection still works.
        assert not client.closed
        stream, covered = unique("late")
        await ensure_stream(client, stream, [covered])
        assert len(await client.publish_batch(covered, messages(1), timeout=10)) == 1


async def test_server_pings_are_answered(nats: NatsServer) -> None:
    stream, subject = unique("ping")
    async with NatsClient.connect(nats.url) as client:
        await ensure_stream(client, stream, [subject])
        # The server PINGs every second and gives up after two unanswered
        # ones: a third PING proves the first two were answered.
        for _ in range(300):  # 15 s at most
            if client.pings_answered >= 3:
                break
            await trio.sleep(0.05)
        assert client.pings_answered >= 3, "the server sent fewer than 3 PINGs in 15 s"
        assert not client.closed
        (ack,) = await client.publish_batch(subject, messages(1), timeout=10)
        assert ack.seq == 1


async def test_wrong_password_is_a_clear_error_without_the_password(
    nats_auth: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = PASSWORD[::-1]
    with pytest.raises(NatsAuthorizationError) as caught:
        async with NatsClient.connect(nats_auth.url, user=USER, password=wrong):
            pytest.fail("connected with a wrong password")
    assert isinstance(caught.value, JobsUnavailable)
    text = "".join(traceback.format_exception(caught.value))
    assert "refused the user and password: Authorization Violation" in str(caught.value)
    assert wrong not in text
    assert wrong not in caplog.text

    with pytest.raises(NatsAuthorizationError, match="requires credentials and none were given"):
        async with NatsClient.connect(nats_auth.url):
            pass

    stream, subject = unique("auth")
    async with NatsClient.connect(nats_auth.url, user=USER, password=PASSWORD) as client:
        await ensure_stream(client, stream, [subject])
        (ack,) = await client.publish_batch(subject, messages(1), timeout=10)
        assert ack.seq == 1
    assert PASSWORD not in caplog.text


async def test_server_killed_while_a_batch_waits(tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with (
            NatsClient.connect(server.url) as client,
            holding(server.ws_url, "hold.>") as held,
        ):
            failed_at: list[float] = []

            async def publish() -> None:
                with pytest.raises(JobsUnavailable, match="lost the connection"):
                    await client.publish_batch("hold.jobs", messages(3), timeout=30)
                failed_at.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                with trio.fail_after(10):
                    await held.wait_for(3)  # the batch is out, waiting for PubAcks
                killed_at = trio.current_time()
                server.kill()
            assert failed_at, "publish_batch did not fail"
            assert failed_at[0] - killed_at < 5  # not the 30 s timeout
            assert client.closed
            with pytest.raises(JobsUnavailable):
                await client.publish_batch("hold.jobs", messages(1), timeout=5)
    finally:
        server.stop()


async def test_connection_refused_is_jobs_unavailable() -> None:
    with trio.fail_after(10), pytest.raises(JobsUnavailable, match="cannot connect"):
        async with NatsClient.connect(f"nats+ws://127.0.0.1:{free_port()}", timeout=5):
            pass


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ws://127.0.0.1:4222", "must start with nats\\+ws:// or nats\\+wss://"),
        ("nats://127.0.0.1:4222", "must start with nats\\+ws:// or nats\\+wss://"),
        (f"nats+ws://u:{PASSWORD}@127.0.0.1:4222", "must not carry credentials"),
        ("nats+ws://:4222", "has no host"),
    ],
)
async def test_invalid_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        async with NatsClient.connect(url):
            pass
    assert PASSWORD not in str(caught.value)
