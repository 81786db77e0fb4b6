"""Jobs in RoadRunner's NATS format, and the ladder that fits them under max_payload.

The promise checked here is the one SMTP makes in EHLO: every message up to
:func:`accepted_message_size` (the SIZE advertised in NATS mode) becomes a
NATS message the server takes, whatever its content, and the raw message is
always in it whole.
"""

from __future__ import annotations

import base64
import datetime
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trismtp.jobs.email import EmailJob
from trismtp.message import Envelope
from trismtp.nats.protocol import encode_headers
from trismtp.nats.roadrunner import (
    JobTooLarge,
    accepted_message_size,
    fit_roadrunner_message,
    roadrunner_message,
)
from trismtp.settings import JobsSettings

MAX_PAYLOAD = 1024 * 1024  # nats-server's default
WHEN = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=datetime.UTC)


def job_json(raw: bytes, recipients: tuple[str, ...] = ("rcpt@example.com",)) -> str:
    envelope = Envelope("client.example", "sender@example.org", recipients, "127.0.0.1:4000")
    email = EmailJob(raw, envelope, received_at=WHEN)
    return email.to_job(JobsSettings(), include_raw=True).to_json()


def decoded(data: bytes) -> dict[str, Any]:
    body = json.loads(data)
    payload: dict[str, Any] = json.loads(base64.b64decode(body["payload"], validate=True))
    return payload


def raw_of(payload: dict[str, Any]) -> bytes:
    """The exact message bytes a consumer reads back from the payload."""
    message = payload["message"]
    if message.get("raw_base64"):
        return base64.b64decode(message["raw_base64"])
    raw: str = message["raw"]
    return raw.encode("utf-8")


def attachment_mail(size: int, rng: random.Random) -> bytes:
    """A text part and one base64 attachment, the whole ``size`` octets."""
    head = (
        b"From: Sender <sender@example.org>\r\nTo: rcpt@example.com\r\n"
        b"Subject: report\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="r.pdf"\r\n\r\n'
    )
    tail = b"\r\n--b1--\r\n"
    room = size - len(head) - len(tail)
    lines = []
    while room > 0:
        chunk = base64.b64encode(rng.randbytes(57))[: max(0, room - 2)]
        lines.append(chunk + b"\r\n")
        room -= len(chunk) + 2
    out = head + b"".join(lines) + tail
    return out[:size] if len(out) > size else out + b"x" * (size - len(out))


def filled(kind: str, size: int, rng: random.Random) -> bytes:
    """A message of exactly ``size`` octets of one hostile or typical kind."""
    head = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: s\r\n\r\n"
    room = size - len(head)
    if kind == "attachment":
        return attachment_mail(size, rng)
    if kind == "text":
        line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
        body = (line * (room // len(line) + 1))[:room]
    elif kind == "control":
        # Valid UTF-8 that JSON escapes to six octets each: the longest raw text.
        body = (b"\x01\x02\x1f" * (room // 3 + 1))[:room]
    elif kind == "invalid-utf8":
        body = (b"\xff\xfe\xe9" * (room // 3 + 1))[:room]
    elif kind == "quoted":
        body = (b'"\\' * (room // 2 + 1))[:room]
    else:
        body = rng.randbytes(room).replace(b"\r", b"").replace(b"\n", b"")
        body = body.ljust(room, b"x")
    return head + body


KINDS = ("attachment", "text", "control", "invalid-utf8", "quoted", "random")


def test_a_small_job_goes_whole() -> None:
    encoded = job_json(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    fitted = fit_roadrunner_message(encoded, MAX_PAYLOAD)
    assert fitted.omitted == ()
    assert (fitted.data, fitted.headers) == roadrunner_message(encoded)
    assert "omitted" not in decoded(fitted.data)


def test_the_advertised_size_with_nats_server_defaults() -> None:
    """The figure docs/scaling.md gives: what SIZE says for max_payload 1 MiB."""
    assert accepted_message_size(MAX_PAYLOAD) == 554_496
    assert accepted_message_size(8 * MAX_PAYLOAD) == 4_683_264
    # 64 MiB, nats-server's ceiling: more than smtp.max_message_size's default.
    assert accepted_message_size(64 * MAX_PAYLOAD) > 26_214_400


@pytest.mark.parametrize("kind", KINDS)
def test_every_message_up_to_the_advertised_size_fits(kind: str) -> None:
    """SIZE never promises what the NATS message cannot carry: the worst
    contents at exactly SIZE octets, with 100 recipients of 256 octets."""
    size = accepted_message_size(MAX_PAYLOAD)
    raw = filled(kind, size, random.Random(kind))
    assert len(raw) == size
    recipients = tuple(f"{i:03d}{'r' * 240}@example.com" for i in range(100))
    encoded = job_json(raw, recipients)
    fitted = fit_roadrunner_message(encoded, MAX_PAYLOAD)
    assert len(encode_headers(fitted.headers)) + len(fitted.data) <= MAX_PAYLOAD
    payload = decoded(fitted.data)
    assert raw_of(payload) == raw
    assert payload["envelope"]["allRecipients"] == list(recipients)
    if fitted.omitted:
        assert payload["omitted"] == list(fitted.omitted)


def test_the_ladder_drops_the_least_first() -> None:
    """A text mail a little too large loses its decoded body only (consumers
    such as Buggregator read the bodies from the raw message anyway); an
    attachment mail loses the attachment's content next, keeping its name and size."""
    text = filled("text", 400_000, random.Random(1))
    fitted = fit_roadrunner_message(job_json(text), MAX_PAYLOAD)
    assert fitted.omitted == ("message.body",)
    payload = decoded(fitted.data)
    assert payload["message"]["body"] == ""
    assert payload["message"]["subject"] == "s"
    assert raw_of(payload) == text

    mail = attachment_mail(400_000, random.Random(2))
    fitted = fit_roadrunner_message(job_json(mail), MAX_PAYLOAD)
    assert fitted.omitted == ("message.body", "attachments[].content")
    payload = decoded(fitted.data)
    (attachment,) = payload["attachments"]
    assert attachment["content"] is None
    assert attachment["filename"] == "r.pdf"
    assert attachment["size"] > 290_000
    assert payload["message"]["subject"] == "report"
    assert raw_of(payload) == mail


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), fraction=st.floats(0.05, 1.0), seed=st.integers(0, 2**32))
def test_any_size_up_to_the_bound_fits_and_keeps_the_raw_message(
    kind: str, fraction: float, seed: int
) -> None:
    size = max(200, int(accepted_message_size(MAX_PAYLOAD) * fraction))
    raw = filled(kind, size, random.Random(seed))
    fitted = fit_roadrunner_message(job_json(raw), MAX_PAYLOAD)
    assert len(encode_headers(fitted.headers)) + len(fitted.data) <= MAX_PAYLOAD
    assert raw_of(decoded(fitted.data)) == raw


def test_a_payload_that_is_no_email_is_never_cut() -> None:
    job = {
        "job": "other",
        "id": "j1",
        "payload": "x" * 2_000_000,
        "headers": {},
        "options": {"priority": 1, "pipeline": "p", "delay": 0, "auto_ack": False},
    }
    with pytest.raises(JobTooLarge):
        fit_roadrunner_message(json.dumps(job), MAX_PAYLOAD)
