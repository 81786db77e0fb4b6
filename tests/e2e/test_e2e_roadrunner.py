"""RoadRunner's NATS jobs pipeline on trismtp's stream, replayed call by call.

RoadRunner's NATS driver (github.com/roadrunner-server/nats, ``natsjobs/``,
v5 and v6 up to commit a9a1775) is Go, so these tests replay the JetStream
API calls it makes, with trismtp's own NATS client, against a real
nats-server and a real ``trismtp serve``:

* declaring a pipeline (``driver.go``, ``FromConfig``/``FromPipeline``):
  nats.go's ``CreateOrUpdateStream(StreamConfig{Name, Subjects})``, which
  sends ``STREAM.UPDATE`` with that zero-valued config first and
  ``STREAM.CREATE`` only when the stream does not exist;
* running it (``listener.go``, ``listenerInit``): one consumer per RoadRunner
  instance, named with a random uuid, ``AckExplicit``, ``MaxAckPending`` =
  prefetch, ``AckWait`` (30 s by default), no filter subject, no MaxDeliver;
* a job done (``item.go``, ``Ack``): ``+ACK``, then with ``delete_after_ack``
  ``STREAM.MSG.DELETE`` of its sequence;
* a requeue in v6 (``driver.go``, ``requeue``; ``item.go``, ``Requeue``): the
  item marshalled again, published with the headers it was consumed with
  (plus ``x-nats-subject``), the original deleted, then acked.

What a migrating user needs from these: the pipeline declares itself on the
stream trismtp creates with its defaults, one instance consumes every job
exactly once, a requeued job is still there afterwards, and several
instances behave as docs/scaling.md says.
"""

from __future__ import annotations

import base64
import json
import smtplib
import uuid
from collections import Counter
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import pytest
import trio

from trismtp.nats import JetStreamError, Msg, NatsClient, NatsMessage
from trismtp.nats.jetstream import ERR_NO_MESSAGE

from ..nats.nats_server import NatsServer, NatsServers
from .test_e2e_nats import STREAM, SUBJECT, nats_daemon, send, stream_messages
from .trismtp_e2e import Launcher, queued_id, run_cli

pytestmark = pytest.mark.e2e

NANOSECONDS = 1_000_000_000
API_TIMEOUT = 5.0
ERR_STREAM_NOT_FOUND = 10059
ERR_RETENTION_UPDATE = 10052  # "stream configuration update can not change retention"
ERR_WORKQUEUE_OVERLAP = 10099  # "multiple non-filtered consumers not allowed on workqueue"


class RoadRunnerPipeline:
    """One RoadRunner instance's NATS pipeline: the driver's JetStream calls."""

    def __init__(
        self,
        client: NatsClient,
        *,
        stream: str = STREAM,
        subject: str = SUBJECT,
        prefetch: int = 100,
        ack_wait: float = 30.0,
        delete_after_ack: bool = True,
    ) -> None:
        self.client = client
        self.stream = stream
        self.subject = subject
        self.prefetch = prefetch
        self.ack_wait = ack_wait
        self.delete_after_ack = delete_after_ack
        self.consumer = str(uuid.uuid4())

    async def api(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.client.request(
            f"$JS.API.{name}", json.dumps(request).encode(), API_TIMEOUT
        )
        data: dict[str, Any] = json.loads(reply)
        return data

    async def declare(self) -> dict[str, Any]:
        """nats.go ``CreateOrUpdateStream(StreamConfig{Name, Subjects})``."""
        # The zero values nats.go's StreamConfig marshals (omitempty fields left out).
        config = {
            "name": self.stream,
            "subjects": [self.subject],
            "retention": "limits",
            "max_consumers": 0,
            "max_msgs": 0,
            "max_bytes": 0,
            "discard": "old",
            "max_age": 0,
            "max_msgs_per_subject": 0,
            "storage": "file",
            "num_replicas": 0,
            "allow_direct": False,
            "mirror_direct": False,
        }
        try:
            return await self.api(f"STREAM.UPDATE.{self.stream}", config)
        except JetStreamError as exc:
            if exc.err_code != ERR_STREAM_NOT_FOUND:
                raise
        return await self.api(f"STREAM.CREATE.{self.stream}", config)

    async def run(self) -> None:
        """``listenerInit``: this instance's own consumer."""
        await self.api(
            f"CONSUMER.CREATE.{self.stream}.{self.consumer}",
            {
                "stream_name": self.stream,
                "config": {
                    "name": self.consumer,
                    "deliver_policy": "all",
                    "ack_policy": "explicit",
                    "ack_wait": round(self.ack_wait * NANOSECONDS),
                    "replay_policy": "instant",
                    "max_ack_pending": self.prefetch,
                },
            },
        )

    async def fetch(self, batch: int, wait: float = 1.0) -> list[Msg]:
        """Up to *batch* deliveries, waiting *wait* seconds at most for them."""
        request = json.dumps({"batch": batch, "expires": round(wait * NANOSECONDS)}).encode()
        messages = await self.client.request_many(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
            request,
            max_messages=batch,
            timeout=wait + API_TIMEOUT,
        )
        return [m for m in messages if m.status is None]

    async def consume(self, wait: float = 1.0, *, ack: bool = True) -> list[Msg]:
        """Fetch, and ack each delivery as it comes (as the driver does), until a
        fetch of *wait* seconds brings nothing; return the deliveries."""
        found: list[Msg] = []
        while batch := await self.fetch(self.prefetch, wait):
            for message in batch:
                if ack:
                    await self.ack(message)
            found.extend(batch)
        return found

    async def ack(self, message: Msg) -> None:
        assert message.reply is not None
        await self.client.request(message.reply, b"+ACK", API_TIMEOUT)
        if self.delete_after_ack:
            await self.delete(message)

    async def delete(self, message: Msg) -> None:
        try:
            await self.api(
                f"STREAM.MSG.DELETE.{self.stream}", {"seq": sequence(message), "no_erase": True}
            )
        except JetStreamError as exc:
            if exc.err_code != ERR_NO_MESSAGE:
                raise

    async def requeue_v6(self, message: Msg) -> None:
        """v6 ``requeue``: publish again with the consumed headers, delete, ack."""
        item = roadrunner_item(message)
        body = {
            "job": item["job"],
            "id": item["id"],
            "payload": item["payload"],
            # Go's json.Marshal of Options: Queue has no tag, so it is "Queue".
            "options": {
                "priority": item["options"]["priority"],
                "pipeline": item["options"]["pipeline"],
                "auto_ack": item["options"]["auto_ack"],
                "Queue": self.stream,
            },
        }
        headers = {name: list(values) for name, values in (message.headers or {}).items()}
        headers["x-nats-subject"] = [message.subject]
        # nats.go sends every header it consumed, Nats-Msg-Id too if there is one.
        msg_id = headers.pop("Nats-Msg-Id", [""])[0]
        await self.client.publish_batch(
            self.subject,
            [NatsMessage(msg_id, json.dumps(body).encode(), headers)],
            API_TIMEOUT,
        )
        await self.delete(message)
        assert message.reply is not None
        await self.client.request(message.reply, b"+ACK", API_TIMEOUT)


def sequence(message: Msg) -> int:
    """The stream sequence in a JetStream ack subject."""
    assert message.reply is not None
    tokens = message.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def roadrunner_item(message: Msg) -> dict[str, Any]:
    """The body as RoadRunner's ``unpack`` reads it: an Item, payload base64."""
    item: dict[str, Any] = json.loads(message.payload)
    assert set(item) == {"job", "id", "payload", "options"}, item
    return item


def job_id(message: Msg) -> str:
    value: str = roadrunner_item(message)["id"]
    return value


def email_payload(message: Msg) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(base64.b64decode(roadrunner_item(message)["payload"]))
    return payload


async def with_client(nats: NatsServer, work: Any) -> Any:
    async with NatsClient.connect(nats.url) as client:
        return await work(client)


def run(nats: NatsServer, work: Any) -> Any:
    return trio.run(with_client, nats, work)


def send_many(port: int, count: int, tag: str) -> list[str]:
    ids = []
    for n in range(count):
        code, reply = send(port, f"{tag} {n}")
        assert code == 250, reply
        ids.append(queued_id(reply))
    return ids


# -- the tests ------------------------------------------------------------------


def test_roadrunner_declares_its_pipeline_and_consumes_every_job_once(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)  # trismtp's defaults create the stream
    before = send_many(daemon.smtp_port, 10, "before RoadRunner")

    async def roadrunner(client: NatsClient) -> tuple[dict[str, Any], list[str]]:
        pipeline = RoadRunnerPipeline(client, ack_wait=1.0)
        declared = await pipeline.declare()
        # Mail keeps flowing after RoadRunner's update rewrote the config.
        after = await trio.to_thread.run_sync(send_many, daemon.smtp_port, 10, "after")
        # (The driver's consumer is ephemeral: the server drops it after 5 s
        # without a pull request, which RoadRunner keeps open at all times.)
        await pipeline.run()
        consumed = []
        for message in await pipeline.consume():
            payload = email_payload(message)
            assert payload["uuid"] == job_id(message)
            assert (message.headers or {})["uuid"] == [job_id(message)]
            consumed.append(job_id(message))
        # A fetch that waits twice AckWait: an unacked job would come again.
        assert await pipeline.fetch(10, wait=2.0) == []
        assert sorted(consumed) == sorted(before + after)
        return declared, consumed

    declared, consumed = run(nats, roadrunner)
    assert declared["config"]["retention"] == "limits"
    assert declared["config"]["subjects"] == [SUBJECT]
    assert len(consumed) == len(set(consumed)) == 20
    assert stream_messages(nats) == []  # delete_after_ack emptied it


def test_a_workqueue_stream_refuses_roadrunners_declaration(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """Why the default retention is limits: the update RoadRunner sends first
    cannot turn a work queue into a limits stream, so the pipeline never starts."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats, {"retention": "workqueue"})
    send_many(daemon.smtp_port, 1, "wq")

    async def roadrunner(client: NatsClient) -> None:
        await RoadRunnerPipeline(client).declare()

    with pytest.raises(JetStreamError) as caught:
        run(nats, roadrunner)
    assert caught.value.err_code == ERR_RETENTION_UPDATE, caught.value


def test_a_requeued_job_is_still_there(nats_servers: NatsServers, launch: Launcher) -> None:
    """v6 requeue publishes the job again with the headers it consumed: with a
    Nats-Msg-Id among them, JetStream would drop the copy and the job be lost."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    (sent,) = send_many(daemon.smtp_port, 1, "requeue me")

    async def roadrunner(client: NatsClient) -> list[str]:
        pipeline = RoadRunnerPipeline(client)
        await pipeline.declare()
        await pipeline.run()
        (first,) = await pipeline.fetch(10)
        assert "Nats-Msg-Id" not in (first.headers or {}), first.headers
        await pipeline.requeue_v6(first)
        again = await pipeline.consume()
        return [job_id(m) for m in again]

    assert run(nats, roadrunner) == [sent]
    assert stream_messages(nats) == []


def test_several_roadrunner_instances_on_one_stream_each_get_every_job(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """Each instance makes its own consumer: on trismtp's limits stream both get
    every job (docs/scaling.md: give each instance its own stream instead)."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    sent = send_many(daemon.smtp_port, 6, "fan-out")

    async def two_instances(client: NatsClient) -> list[list[str]]:
        first = RoadRunnerPipeline(client, delete_after_ack=False)
        second = RoadRunnerPipeline(client, delete_after_ack=False)
        seen = []
        for pipeline in (first, second):
            await pipeline.declare()
            await pipeline.run()
        for pipeline in (first, second):
            seen.append([job_id(m) for m in await pipeline.consume()])
        return seen

    first, second = run(nats, two_instances)
    assert sorted(first) == sorted(second) == sorted(sent)


def test_a_workqueue_stream_takes_one_roadrunner_instance_only(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats, {"retention": "workqueue"})
    # The pusher creates the stream once it has connected, which may be after
    # SMTP listens: a 250 means the stream is there.
    send_many(daemon.smtp_port, 1, "wq")

    async def two_instances(client: NatsClient) -> None:
        await RoadRunnerPipeline(client).run()
        await RoadRunnerPipeline(client).run()

    with pytest.raises(JetStreamError) as caught:
        run(nats, two_instances)
    assert caught.value.err_code == ERR_WORKQUEUE_OVERLAP, caught.value


def big_mail(size: int) -> bytes:
    """An email with one base64 attachment, ``size`` octets in all."""
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = "rcpt@example.com"
    msg["Subject"] = "big"
    msg.set_content("See the attachment.\n")
    msg.add_attachment(b"", maintype="application", subtype="pdf", filename="r.pdf")
    empty = len(msg.as_bytes(policy=SMTP))
    # Base64 lines of 76 + CRLF carry 57 octets each.
    room = size - empty
    content = bytes(range(256)) * (room * 57 // 78 // 256 + 1)
    for cut in range(room * 57 // 78, 0, -1):
        msg = EmailMessage()
        msg["From"] = "Sender <sender@example.org>"
        msg["To"] = "rcpt@example.com"
        msg["Subject"] = "big"
        msg.set_content("See the attachment.\n")
        msg.add_attachment(content[:cut], maintype="application", subtype="pdf", filename="r.pdf")
        data = msg.as_bytes(policy=SMTP)
        if len(data) <= size:
            return data
    raise AssertionError("unreachable")


def test_mail_just_under_the_advertised_size_is_accepted_by_default_nats(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """nats-server's default max_payload (1 MiB): EHLO advertises what a job can
    carry, a message just under it gets 250 and arrives with its raw bytes, and
    one declared over it is refused before its upload."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
        code, _ = smtp.ehlo("client.e2e.test")
        assert code == 250
        size = int(smtp.esmtp_features["size"])
        assert size == 554_496
        data = big_mail(size - 100)
        assert size - 2_000 < len(data) <= size
        smtp.mail("sender@example.org", [f"SIZE={len(data)}"])
        smtp.rcpt("rcpt@example.com")
        code, text = smtp.data(data)
        assert code == 250, text
        accepted = queued_id(f"{code} {text.decode()}")
        code, text = smtp.mail("sender@example.org", [f"SIZE={size + 1}"])
        assert code == 552, text

    (stored,) = stream_messages(nats)
    body = json.loads(stored.data)
    assert body["id"] == accepted
    payload = json.loads(base64.b64decode(body["payload"]))
    message = payload["message"]
    exact = message.get("raw_base64")
    raw = base64.b64decode(exact) if exact else message["raw"].encode("utf-8")
    assert raw == data
    assert "attachments[].content" in payload["omitted"]
    (attachment,) = payload["attachments"]
    assert attachment["filename"] == "r.pdf"
    assert Counter(m.headers["uuid"][0] for m in [stored]) == {accepted: 1}


def test_partitions_spread_jobs_over_roadrunner_instances_each_once(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """The way trismtp offers to share work between RoadRunner instances: with
    ``partitions = 2`` each job goes to one of two streams, and each instance
    declares and consumes its own (stream ``trismtp-K``, subject ``trismtp.jobs.K``)."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats, {"partitions": 2})
    sent = send_many(daemon.smtp_port, 24, "partitioned")

    async def two_instances(client: NatsClient) -> list[list[str]]:
        instances = [
            RoadRunnerPipeline(client, stream=f"{STREAM}-{k}", subject=f"{SUBJECT}.{k}")
            for k in range(2)
        ]
        for pipeline in instances:
            declared = await pipeline.declare()
            assert declared["config"]["subjects"] == [pipeline.subject]
            await pipeline.run()
        return [[job_id(m) for m in await pipeline.consume()] for pipeline in instances]

    first, second = run(nats, two_instances)
    assert first, "the first instance got work"
    assert second, "the second instance got work"
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(sent)

    # Mail still flows after both instances rewrote their streams' config,
    # and `trismtp jobs stat` shows a row per partition.
    (late,) = send_many(daemon.smtp_port, 1, "late")
    result = run_cli("jobs", "stat", "--config", str(daemon.config), cwd=daemon.workdir)
    assert result.returncode == 0, result.stderr
    assert f"{STREAM}-0" in result.stdout
    assert f"{STREAM}-1" in result.stdout
    assert late


def test_a_stream_roadrunner_declared_with_fewer_replicas_is_reported(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """RoadRunner declares with num_replicas 0 (read as 1): a daemon that asks
    for R3 says so in its log, and mail still flows."""
    nats = nats_servers.new().start()

    async def declare(client: NatsClient) -> None:
        await RoadRunnerPipeline(client).declare()

    run(nats, declare)
    daemon = nats_daemon(launch, nats, {"replicas": 3})
    send_many(daemon.smtp_port, 1, "after RoadRunner declared")
    warnings = [
        line
        for line in daemon.log_text().splitlines()
        if "WARNING" in line and "has 1 replica(s)" in line
    ]
    assert warnings, daemon.log_tail()
    assert f"nats stream edit {STREAM} --replicas 3" in warnings[0]
