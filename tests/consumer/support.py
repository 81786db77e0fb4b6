"""Helpers of the consumer tests: real email jobs, pushing them, the service's counts."""

from __future__ import annotations

import datetime
import json
import ssl
import uuid
from contextlib import suppress
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

from trismtp.consumer import RpcClient
from trismtp.jobs.model import Job, JobOptions
from trismtp.message import Envelope, build_payload

from ..e2e.trismtp_e2e import HOST


def raw_email(subject: str, *, attachment: bytes | None = None) -> bytes:
    """A MIME message as an SMTP client would send it."""
    message = EmailMessage()
    message["From"] = "Sender <sender@example.org>"
    message["To"] = "rcpt@example.com"
    message["Subject"] = subject
    message.set_content("Hello from the consumer tests.\n")
    if attachment is not None:
        message.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="blob.bin"
        )
    return message.as_bytes(policy=SMTP)


def email_job(subject: str, *, raw: bytes | None = None, pipeline: str = "smtp") -> dict[str, Any]:
    """An ``smtp.email`` job as trismtp's pusher makes it (SPEC §5)."""
    job_id = str(uuid.uuid4())
    payload = build_payload(
        raw if raw is not None else raw_email(subject),
        uuid=job_id,
        envelope=Envelope("client.test", "sender@example.org", ("rcpt@example.com",), "[::1]:1"),
        received_at=datetime.datetime.now(datetime.UTC),
        include_raw=True,
    )
    job = Job(
        job="smtp.email",
        id=job_id,
        payload=json.dumps(payload),
        headers={"uuid": [job_id]},
        options=JobOptions(pipeline=pipeline),
    )
    return job.to_dict()


async def push(url: str, jobs: list[dict[str, Any]]) -> list[str]:
    """Push *jobs* in one PushBatch; their ids."""
    async with RpcClient.connect(url) as client:
        await client.call("jobs.PushBatch", {"jobs": jobs})
    return [job["id"] for job in jobs]


async def push_emails(url: str, count: int) -> list[str]:
    """Push *count* email jobs; their ids."""
    return await push(url, [email_job(f"Message {n}") for n in range(count)])


async def counts(url: str, pipeline: str = "smtp") -> dict[str, Any]:
    """The pipeline's entry of ``jobs.Stat``."""
    async with RpcClient.connect(url) as client:
        result = await client.call("jobs.Stat", {})
    entry: dict[str, Any] = next(s for s in result["stats"] if s["pipeline"] == pipeline)
    return entry


async def assert_empty(url: str) -> None:
    """Every job was acked: nothing active, delayed or reserved."""
    entry = await counts(url)
    assert (entry["active"], entry["delayed"], entry["reserved"]) == (0, 0, 0), entry


async def tls_proxy(
    upstream_port: int,
    context: ssl.SSLContext,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A TLS-terminating proxy in front of the jobs service (which speaks plain
    ws://), as docs/rpc.md advises; started() with its port."""
    listener = TLSListener(
        await anyio.create_tcp_listener(local_host=HOST, local_port=0),
        context,
        standard_compatible=False,
    )
    port = listener.listener.extra(SocketAttribute.local_port)

    async def handle(client: anyio.abc.ByteStream) -> None:
        upstream = await anyio.connect_tcp(HOST, upstream_port)
        async with client, upstream, anyio.create_task_group() as pipes:

            async def pipe(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
                with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    async for chunk in source:
                        await sink.send(chunk)
                pipes.cancel_scope.cancel()

            pipes.start_soon(pipe, client, upstream)
            pipes.start_soon(pipe, upstream, client)

    task_status.started(port)
    await listener.serve(handle)
