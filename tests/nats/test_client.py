"""The NATS JetStream client against a real nats-server (JetStream on, WebSocket
listener on 127.0.0.1), and the RoadRunner message format it publishes."""

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import count
from pathlib import Path

import pytest
import trio
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
    ensure_stream,
    first_messages,
    get_message,
    roadrunner_message,
    stream_info,
)
from trismtp.nats.protocol import (
    PING,
    PONG,
    Parser,
    Ping,
    Pong,
    encode_connect,
    encode_sub,
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
        assert info["config"]["retention"] == "limits"
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


async def test_messages_without_msg_id_or_with_their_own_subject(nats: NatsServer) -> None:
    """trismtp's jobs carry no Nats-Msg-Id (a RoadRunner requeue would be taken
    for a duplicate), and with partitions each goes to its own subject."""
    stream, subject = unique("plain")
    async with NatsClient.connect(nats.url) as client:
        await ensure_stream(client, stream, [f"{subject}.*"])
        batch = [
            NatsMessage("", b"zero", {"n": ["0"]}, f"{subject}.0"),
            NatsMessage("", b"one", {"n": ["1"]}, f"{subject}.1"),
            NatsMessage("", b"zero", {"n": ["0"]}, f"{subject}.0"),
        ]
        acks = await client.publish_batch(f"{subject}.0", batch, timeout=10)
        assert [ack.seq for ack in acks] == [1, 2, 3]  # the same body twice: stored twice
        stored = await first_messages(client, stream, 10)
        assert [m.headers for m in stored] == [{"n": ["0"]}, {"n": ["1"]}, {"n": ["0"]}]

        async def subject_of(seq: int) -> str:
            reply = await client.request(
                f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(), 5
            )
            value: str = json.loads(reply)["message"]["subject"]
            return value

        assert [await subject_of(seq) for seq in (1, 2, 3)] == [
            f"{subject}.0",
            f"{subject}.1",
            f"{subject}.0",
        ]


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


async def test_ensure_stream_from_many_connections_at_once_all_succeed(nats: NatsServer) -> None:
    # What the daemon's lanes and workers do at start: each connection
    # creates the stream if missing. The losers of the race get "name in
    # use" or, from nats-server 2.9, "subjects overlap" for the very stream
    # the winner just made; neither is an error for them.
    async def ensure(client: NatsClient, stream: str, subject: str, into: list[str]) -> None:
        info = await ensure_stream(client, stream, [subject])
        into.append(info["config"]["name"])

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(NatsClient.connect(nats.url)) for _ in range(8)]
        for round_ in range(20):
            stream, subject = unique(f"race{round_}")
            names: list[str] = []
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(ensure, client, stream, subject, names)
            assert names == [stream] * len(clients)


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
