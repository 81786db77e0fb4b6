"""The typed email payload: what trismtp's own builder produces, decoded back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trismtp.consumer import Attachment, Email, PayloadError, ReservedJob

from .support import email_job, raw_email

BLOB = bytes(range(256)) * 4


def reserved(job: dict[str, Any], attempt: int = 1) -> ReservedJob:
    lease = {"token": "t-1", "attempt": attempt, "expires_at": 1e9}
    return ReservedJob.model_validate({**job, "lease": lease})


def test_the_email_payload_decodes_into_typed_objects() -> None:
    raw = raw_email("Grüße ✓", attachment=BLOB)
    job = reserved(email_job("unused", raw=raw))
    email = job.email()

    assert isinstance(email, Email)
    assert email.uuid == job.id
    assert email.size == len(raw)
    assert email.envelope.mail_from == "sender@example.org"
    assert email.envelope.all_recipients == ("rcpt@example.com",)
    assert [(a.name, a.email) for a in email.envelope.from_] == [("Sender", "sender@example.org")]
    assert email.message.subject == "Grüße ✓"
    assert email.message.headers["Subject"] == ("Grüße ✓",)
    assert email.message.body == "Hello from the consumer tests.\r\n"
    assert email.message.raw_bytes == raw
    (attachment,) = email.attachments
    assert isinstance(attachment, Attachment)
    assert (attachment.filename, attachment.content) == ("blob.bin", BLOB)
    assert attachment.size == len(BLOB)
    assert email.authentication is None
    assert email.tls is None
    assert job.email() is email  # decoded once
    assert job.ref() == {"id": job.id, "token": "t-1"}


def test_bytes_that_are_not_utf8_come_back_exactly() -> None:
    raw = b"Subject: caf\xe9\r\n\r\nLatin-1 \xe9t\xe9\r\n"
    email = reserved(email_job("unused", raw=raw)).email()
    assert email.message.raw_bytes == raw


@pytest.mark.parametrize("payload", ["not json", "[]", json.dumps({"event": "x"})])
def test_a_payload_that_is_no_email_says_so(payload: str) -> None:
    job = reserved({**email_job("x"), "payload": payload})
    with pytest.raises(PayloadError, match=f"job {job.id}: not an email payload"):
        job.email()
