"""EmailJob → Job: what a consumer of the jobs service receives."""

from __future__ import annotations

import datetime
import json
import uuid

import pytest
from pydantic import ValidationError

from trismtp.jobs.email import EmailJob
from trismtp.jobs.model import Job
from trismtp.message import Envelope
from trismtp.settings import JobsSettings

RAW = b"From: Ann <ann@example.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nHello\r\n"
ENVELOPE = Envelope(
    helo="mx.example.com",
    mail_from="bounce@example.com",
    recipients=("rcpt@example.net",),
    remote_addr="127.0.0.1:40000",
)


def test_job_carries_settings_id_and_headers() -> None:
    settings = JobsSettings(
        pipeline="inbound",
        job_name="mail.in",
        priority=3,
        delay=7,
        auto_ack=True,
        headers={"tenant": ["acme"], "trace": ["a", "b"]},
    )
    email = EmailJob(raw=RAW, envelope=ENVELOPE)
    job = email.to_job(settings, include_raw=True)

    assert uuid.UUID(job.id).version == 4
    assert job.job == "mail.in"
    assert job.headers == {
        "uuid": [job.id],
        "payload_class": ["smtp:handler"],
        "tenant": ["acme"],
        "trace": ["a", "b"],
    }
    assert job.options.model_dump() == {
        "priority": 3,
        "pipeline": "inbound",
        "delay": 7,
        "auto_ack": True,
    }


def test_payload_is_json_text_with_the_same_id() -> None:
    received = datetime.datetime(2026, 11, 24, 10, 0, 0, tzinfo=datetime.UTC)
    email = EmailJob(raw=RAW, envelope=ENVELOPE, received_at=received)
    job = email.to_job(JobsSettings(), include_raw=True)

    payload = json.loads(job.payload)
    assert payload["event"] == "EMAIL_RECEIVED"
    assert payload["uuid"] == job.id
    assert payload["received_at"] == "2026-11-24T10:00:00Z"
    assert payload["remote_addr"] == "127.0.0.1:40000"
    assert payload["size"] == len(RAW)
    assert payload["envelope"]["mail_from"] == "bounce@example.com"
    assert payload["envelope"]["helo"] == "mx.example.com"
    assert payload["envelope"]["from"] == [{"email": "ann@example.com", "name": "Ann"}]
    assert payload["message"]["subject"] == "Grüße"
    assert payload["message"]["raw"] == RAW.decode()


def test_include_raw_false_leaves_raw_out() -> None:
    job = EmailJob(raw=RAW, envelope=ENVELOPE).to_job(JobsSettings(), include_raw=False)
    message = json.loads(job.payload)["message"]
    assert "raw" not in message
    assert "raw_base64" not in message


def test_wire_form_round_trips_through_the_model() -> None:
    job = EmailJob(raw=RAW, envelope=ENVELOPE).to_job(JobsSettings(), include_raw=True)
    wire = json.loads(job.to_json())
    assert set(wire) == {"job", "id", "payload", "headers", "options"}
    assert Job.model_validate(wire) == job


def test_every_message_gets_its_own_id() -> None:
    ids = {EmailJob(raw=RAW, envelope=ENVELOPE).id for _ in range(100)}
    assert len(ids) == 100


def test_job_json_is_the_model_s_json_for_any_settings() -> None:
    email = EmailJob(raw=RAW, envelope=ENVELOPE)
    for settings in (
        JobsSettings(),
        JobsSettings(pipeline="inbound", job_name="mail.in", priority=-3, delay=7, auto_ack=True),
        JobsSettings(headers={"tenant": ["acme"], "trace": ["a", "b"]}),
    ):
        for include_raw in (True, False):
            expected = email.to_job(settings, include_raw=include_raw).to_json()
            # Twice: the settings are checked by the model the first time only.
            assert email.to_job_json(settings, include_raw=include_raw) == expected
            assert email.to_job_json(settings, include_raw=include_raw) == expected


def test_job_json_refuses_what_the_model_refuses() -> None:
    # A pipeline name the Job model rejects (a control character). Loaded
    # settings refuse it too (tests/test_settings.py); built without their
    # checks, the job is still refused, every time.
    with pytest.raises(ValidationError, match="control characters"):
        JobsSettings(pipeline="in\x01bound")
    settings = JobsSettings.model_construct(pipeline="in\x01bound")
    email = EmailJob(raw=RAW, envelope=ENVELOPE)
    for _ in range(2):
        with pytest.raises(ValidationError):
            email.to_job_json(settings, include_raw=True)
    good = JobsSettings()
    email.to_job_json(good, include_raw=True)
    with pytest.raises(ValidationError):
        EmailJob(raw=RAW, envelope=ENVELOPE, id="x" * 257).to_job_json(good, include_raw=True)
