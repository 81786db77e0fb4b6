"""The SMTP server on real loopback sockets, pushing to the real jobs service."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from trismtp.jobs.pusher import Pusher
from trismtp.metrics import Metrics
from trismtp.service.server import serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings, JobsSettings, SmtpSettings, embedded_url
from trismtp.smtp.server import SmtpServer

from ..stored import payload_of


class Client:
    """A line-oriented SMTP client on a trio stream, for exact byte control."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def reply(self) -> str:
        """Read one whole (possibly multi-line) reply; returns its last line."""
        with trio.fail_after(10):
            while True:
                end = self.buffer.find(b"\r\n")
                while end >= 0:
                    line = bytes(self.buffer[:end]).decode()
                    del self.buffer[: end + 2]
                    if len(line) < 4 or line[3] != "-":
                        return line
                    end = self.buffer.find(b"\r\n")
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"connection closed; unread: {bytes(self.buffer)!r}")
                self.buffer += data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        with trio.fail_after(10):
            return await self.stream.receive_some(1) == b""


@dataclass
class Harness:
    smtp: SmtpServer
    address: HostPort
    database: Path

    async def connect(self) -> Client:
        client = Client(await trio.open_tcp_stream(self.address.host, self.address.port))
        assert (await client.reply()).startswith("220 localhost")
        return client

    def stored(self) -> list[dict[str, object]]:
        with sqlite3.connect(self.database) as db:
            return [
                json.loads(payload_of(self.database, *row))
                for row in db.execute("SELECT payload, payload_file FROM jobs")
            ]


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    jobs_url: str | None = None,
    jobs: JobsSettings | None = None,
    metrics: Metrics | None = None,
    **smtp: object,
) -> Harness:
    database = tmp_path / "jobs.sqlite3"
    service = JobsServiceSettings(listen="127.0.0.1:0", database=database)
    if jobs_url is None:
        jobs_url = embedded_url(await nursery.start(serve_jobs, service))
    jobs = jobs or JobsSettings(push_timeout=1)
    pusher = Pusher(jobs, jobs_url, metrics=metrics)
    await nursery.start(pusher.run)
    settings = SmtpSettings.model_validate({"listen": ["127.0.0.1:0"], **smtp})
    server = SmtpServer(settings, jobs, pusher.push, metrics=metrics)
    bound = await nursery.start(server.serve)
    return Harness(server, bound[0], database)


@pytest.fixture
async def harness(nursery: trio.Nursery, tmp_path: Path) -> Harness:
    return await start(nursery, tmp_path)


async def test_pipelined_transaction_is_answered_in_order_and_stored(harness: Harness) -> None:
    client = await harness.connect()
    await client.send(
        b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<c@example.com>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    replies = [await client.reply() for _ in range(7)]
    assert replies[0] == "250 SIZE 26214400"
    assert replies[1:5] == ["250 2.1.0 OK", "250 2.1.5 OK", "250 2.1.5 OK", replies[4]]
    assert replies[4].startswith("354 ")
    assert replies[5].startswith("250 2.0.0 OK: queued as ")
    assert replies[6].startswith("221 2.0.0")
    job_id = replies[5].rsplit(" ", 1)[1]
    [payload] = harness.stored()
    assert payload["uuid"] == job_id
    assert payload["envelope"] == {
        "helo": "client.example",
        "mail_from": "a@example.com",
        "allRecipients": ["b@example.com", "c@example.com"],
        "from": [],
        "to": [],
        "ccs": [],
        "replyTo": [],
    }
    assert await client.closed()


async def test_jobs_service_unreachable_gives_451(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))  # bound, never listening: refused
        port = unused.getsockname()[1]
        harness = await start(nursery, tmp_path, jobs_url=f"ws://127.0.0.1:{port}/rpc")
        client = await harness.connect()
        for line in ("EHLO x", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"):
            await client.command(line)
        assert await client.command("hello\r\n.") == "451 4.3.0 Temporary failure, try again later"
        # The session goes on: the client may retry at once.
        assert await client.command("NOOP") == "250 2.0.0 OK"


async def send_message(client: Client, body: str = "hello") -> None:
    """One transaction up to its final dot; the reply to the dot is left unread."""
    for line in ("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"):
        await client.command(line)
    await client.send(body.encode() + b"\r\n.\r\n")


# A linger no test waits out: a 250 within fail_after(10) was sent without it.
LONG_LINGER = JobsSettings(batch_linger=60, push_timeout=30)


async def test_a_lone_session_is_answered_without_the_batch_linger(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    harness = await start(nursery, tmp_path, jobs=LONG_LINGER)
    client = await harness.connect()
    await client.command("EHLO client.example")
    with trio.fail_after(10):
        for _ in range(3):  # each message of a kept connection, not only the first
            await send_message(client)
            assert (await client.reply()).startswith("250 2.0.0 OK: queued as ")
    assert len(harness.stored()) == 3


async def test_the_batch_waits_for_a_session_in_a_transaction_then_goes_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Whichever of the two messages comes second finds the other session
    # waiting for its ack: both jobs go in one batch, without the linger.
    metrics = Metrics()
    harness = await start(nursery, tmp_path, jobs=LONG_LINGER, metrics=metrics)
    first, second = await harness.connect(), await harness.connect()
    for client in (first, second):
        await client.command("EHLO client.example")
    with trio.fail_after(10):
        await send_message(first, "one")
        await send_message(second, "two")
        replies = [await first.reply(), await second.reply()]
    assert all(reply.startswith("250 2.0.0 OK: queued as ") for reply in replies)
    assert metrics.registry.get_sample_value("trismtp_push_batch_size_count") == 1
    assert metrics.registry.get_sample_value("trismtp_push_batch_size_sum") == 2


async def test_an_idle_session_keeps_the_batch_linger(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A connected session may send a message any moment: the batch lingers.
    linger = 0.3
    jobs = JobsSettings(batch_linger=linger, push_timeout=30)
    harness = await start(nursery, tmp_path, jobs=jobs)
    sender, idle = await harness.connect(), await harness.connect()
    await idle.command("EHLO idle.example")
    await sender.command("EHLO client.example")
    began = trio.current_time()  # before the job exists, so before its linger starts
    await send_message(sender)
    assert (await sender.reply()).startswith("250 2.0.0 OK: queued as ")
    assert trio.current_time() - began >= linger
    assert await idle.command("NOOP") == "250 2.0.0 OK"


async def test_max_connections(nursery: trio.Nursery, tmp_path: Path) -> None:
    harness = await start(nursery, tmp_path, max_connections=2)
    first, second = await harness.connect(), await harness.connect()
    stream = await trio.open_tcp_stream(harness.address.host, harness.address.port)
    third = Client(stream)
    assert (await third.reply()).startswith("421 4.7.0")
    assert await third.closed()
    await first.command("QUIT")
    assert await first.closed()
    # A slot is free again once a session ended.
    await trio.testing.wait_all_tasks_blocked()
    assert harness.smtp.connections == 1
    await harness.connect()
    del second


async def test_command_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    harness = await start(nursery, tmp_path, command_timeout=0.2)
    client = await harness.connect()
    assert (await client.reply()).startswith("421 4.4.2")
    assert await client.closed()


async def test_a_session_that_keeps_talking_outlives_command_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Every reply moves the deadline on; only a quiet client is closed, and
    # not before command_timeout after its last reply.
    timeout = 0.4
    harness = await start(nursery, tmp_path, command_timeout=timeout)
    client = await harness.connect()
    began = trio.current_time()
    while True:
        assert await client.command("NOOP") == "250 2.0.0 OK"
        quiet_since = trio.current_time()
        if quiet_since - began > 3 * timeout:
            break
        await trio.sleep(timeout / 4)
    assert (await client.reply()).startswith("421 4.4.2 Timeout waiting for command")
    assert trio.current_time() - quiet_since >= timeout
    assert await client.closed()


async def test_data_timeout_shorter_than_command_timeout_closes_a_stalled_upload(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The upload's deadline comes long before the command deadline it
    # replaced: the session is closed at the earlier one.
    harness = await start(nursery, tmp_path, command_timeout=60, data_timeout=0.3)
    client = await harness.connect()
    for line in ("EHLO x", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"):
        await client.command(line)
    await client.send(b"Subject: stalled\r\n\r\nhalf a body\r\n")
    with trio.fail_after(5):
        assert (await client.reply()).startswith("421 4.4.2 Timeout waiting for DATA")
    assert await client.closed()
    assert harness.stored() == []


async def test_a_session_behind_a_proxy_header_times_out(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # What followed the PROXY header is read from a wrapped stream, not the
    # socket: the read's deadline holds there too.
    harness = await start(
        nursery,
        tmp_path,
        command_timeout=0.3,
        proxy_protocol={"trusted_networks": ["127.0.0.1/32"]},
    )
    client = Client(await trio.open_tcp_stream(harness.address.host, harness.address.port))
    await client.send(b"PROXY TCP4 203.0.113.8 127.0.0.1 4242 25\r\nEHLO x\r\n")
    assert (await client.reply()).startswith("220 localhost")
    assert (await client.reply()).startswith("250 ")
    with trio.fail_after(5):
        assert (await client.reply()).startswith("421 4.4.2 Timeout waiting for command")
    assert await client.closed()


async def test_read_deadlines_of_ended_sessions_are_not_kept(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Each session notes when its read is due; a thousand that came and went
    # leave no more behind than the sessions still open would.
    harness = await start(nursery, tmp_path)
    kept = [await harness.connect() for _ in range(5)]
    for _ in range(1000):
        client = await harness.connect()
        assert (await client.command("QUIT")).startswith("221")
        await client.stream.aclose()
    assert len(harness.smtp._alarms) <= 2 * len(kept) + 64 + 1
    assert await kept[0].command("NOOP") == "250 2.0.0 OK"


async def test_shutdown_tells_idle_sessions_and_lets_a_transaction_finish(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    harness = await start(nursery, tmp_path)
    idle = await harness.connect()
    await idle.command("EHLO idle")
    busy = await harness.connect()
    for line in ("EHLO busy", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"):
        await busy.command(line)
    await busy.send(b"Subject: half\r\n\r\nfirst half\r\n")
    await trio.testing.wait_all_tasks_blocked()

    harness.smtp.shutdown(grace=10)

    assert (await idle.reply()).startswith("421 4.3.2")
    assert await idle.closed()
    # The session inside DATA finishes its message...
    assert (await busy.command("second half\r\n.")).startswith("250 2.0.0 OK: queued as")
    # ...and, now between transactions, is told 421 at once and closed.
    assert (await busy.reply()).startswith("421 4.3.2")
    assert await busy.closed()
    # New connections are refused.
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(harness.address.host, harness.address.port)
    [payload] = harness.stored()
    message = payload["message"]
    assert isinstance(message, dict)
    assert message["raw"] == "Subject: half\r\n\r\nfirst half\r\nsecond half\r\n"


async def test_a_large_message_is_stored_whole(harness: Harness) -> None:
    # Large enough to be parsed in a worker thread (PARSE_IN_THREAD).
    body = b"".join(b"line %06d ..dotted\r\n" % n for n in range(20_000))
    client = await harness.connect()
    for line in ("EHLO x", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"):
        await client.command(line)
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    await client.send(b"Subject: big\r\n\r\n" + stuffed + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 OK: queued as")
    [payload] = harness.stored()
    message = payload["message"]
    assert isinstance(message, dict)
    assert message["raw"] == "Subject: big\r\n\r\n" + body.decode()
    assert payload["size"] == len(b"Subject: big\r\n\r\n" + body)
