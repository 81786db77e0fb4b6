"""A real MIME message sent with smtplib becomes exactly one job (SPEC §4, §5)."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from .trismtp_e2e import Daemon, b64decode, queued_id, run_cli

pytestmark = pytest.mark.e2e

SUBJECT = "Grüße aus Köln – 测试 ✓"
TEXT = "Hallo Welt!\n.this line starts with a dot\n..and this one with two\nEnde.\n"
HTML = "<html><body><p>Hallo <b>Welt</b> – ünïcödé ✓</p></body></html>\n"
ATTACHMENT = bytes(range(256)) * 8 + b"\r\n.\r\n"


def build_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Jörg Müller <joerg@example.org>"
    msg["To"] = "Alice <alice@example.com>, bob@example.net"
    msg["Subject"] = SUBJECT
    msg["Message-ID"] = "<e2e-payload@example.org>"
    msg["X-E2E"] = "one"
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    msg.add_attachment(
        ATTACHMENT, maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    raw = msg.as_bytes(policy=SMTP)
    # The test is only worth something if the wire form is what we think it is.
    assert b"Subject: =?utf-8?" in raw, "subject not RFC 2047-encoded"
    assert b"\r\n.this line starts with a dot\r\n" in raw, "no line for smtplib to dot-stuff"
    assert b"multipart/mixed" in raw
    assert b"multipart/alternative" in raw
    return raw


def test_smtplib_message_becomes_one_job_with_full_payload(daemon: Daemon) -> None:
    raw = build_message()
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, local_hostname="client.e2e.test") as smtp:
        smtp.ehlo()
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.net")[0] == 250
        code, text = smtp.data(raw)
    reply = f"{code} {text.decode()}"
    job_id = queued_id(reply)

    # smtplib dot-stuffs on the wire; the server must have unstuffed it, and a
    # message without a final CRLF gets one (it ends the last line).
    logical = raw if raw.endswith(b"\r\n") else raw + b"\r\n"

    jobs = daemon.jobs()
    assert [job.id for job in jobs] == [job_id], "exactly one job, with the id of the 250"
    job = jobs[0]
    assert job.pipeline == "smtp"
    assert job.name == "smtp.email"
    assert job.headers == {"uuid": [job_id], "payload_class": ["smtp:handler"]}
    assert (job.priority, job.delay, job.auto_ack) == (10, 0, False)

    payload = job.payload
    assert payload["event"] == "EMAIL_RECEIVED"
    assert payload["uuid"] == job_id
    assert payload["size"] == len(logical)
    assert payload["remote_addr"].startswith("127.0.0.1:")
    envelope = payload["envelope"]
    assert envelope["helo"] == "client.e2e.test"
    assert envelope["mail_from"] == "sender@example.org"
    assert envelope["allRecipients"] == ["alice@example.com", "bob@example.net"]
    assert envelope["from"] == [{"email": "joerg@example.org", "name": "Jörg Müller"}]
    assert [a["email"] for a in envelope["to"]] == ["alice@example.com", "bob@example.net"]
    assert payload["authentication"] is None

    message = payload["message"]
    assert message["subject"] == SUBJECT
    assert message["headers"]["X-E2E"] == ["one"]
    assert "e2e-payload@example.org" in message["id"]
    assert message["body"].replace("\r\n", "\n") == TEXT
    assert message["html_body"].replace("\r\n", "\n") == HTML
    assert message["raw"] == logical.decode("utf-8")
    assert "raw_base64" not in message

    attachments = payload["attachments"]
    assert len(attachments) == 1
    attachment = attachments[0]
    assert attachment["filename"] == "blob.bin"
    assert attachment["content_type"] == "application/octet-stream"
    assert attachment["disposition"] == "attachment"
    assert attachment["size"] == len(ATTACHMENT)
    assert b64decode(attachment["content"]) == ATTACHMENT

    # What a consumer gets: the same job through the product's own command.
    # --no-ack puts it back, so the store still holds it afterwards.
    consumed = run_cli(
        "jobs", "consume", "--pipeline", "smtp", "--no-ack", "--json",
        "--url", daemon.url, cwd=daemon.workdir, check=True,
    )  # fmt: skip
    lines = consumed.stdout.splitlines()
    assert len(lines) == 1, consumed.stdout
    seen = json.loads(lines[0])
    assert seen["id"] == job_id
    assert seen["job"] == "smtp.email"
    assert seen["headers"] == {"uuid": [job_id], "payload_class": ["smtp:handler"]}
    assert seen["options"] == {"priority": 10, "pipeline": "smtp", "delay": 0, "auto_ack": False}
    assert json.loads(seen["payload"]) == payload
    assert [j.id for j in daemon.jobs()] == [job_id]
