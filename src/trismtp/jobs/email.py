"""EmailJob: one accepted message, and how it becomes a Job (SPEC §5)."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field

import orjson

from trismtp.jobs.model import PAYLOAD_CLASS, Job, JobOptions
from trismtp.message import Envelope, build_payload
from trismtp.settings import JobsSettings

__all__ = ["EmailJob", "new_job_id"]


def new_job_id() -> str:
    """A fresh job id: a uuid4, which is also what ``queued as`` shows."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class EmailJob:
    """A message the SMTP session received, with what it knew about it."""

    raw: bytes
    envelope: Envelope
    id: str = field(default_factory=new_job_id)
    received_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    authentication: dict[str, str] | None = None
    tls: dict[str, str] | None = None

    def payload(self, *, include_raw: bool) -> str:
        """The email payload as JSON text."""
        # No names for the intermediates: each is freed as soon as the next
        # exists (a big message's payload is megabytes at every step).
        return orjson.dumps(
            build_payload(
                self.raw,
                uuid=self.id,
                envelope=self.envelope,
                received_at=self.received_at,
                include_raw=include_raw,
                authentication=self.authentication,
                tls=self.tls,
            )
        ).decode()

    def to_job(self, settings: JobsSettings, *, include_raw: bool) -> Job:
        """The Job to push: name, id, headers and options from ``[jobs]``."""
        headers = {"uuid": [self.id], "payload_class": [PAYLOAD_CLASS]}
        headers.update(settings.headers)
        return Job(
            job=settings.job_name,
            id=self.id,
            payload=self.payload(include_raw=include_raw),
            headers=headers,
            options=JobOptions(
                priority=settings.priority,
                pipeline=settings.pipeline,
                delay=settings.delay,
                auto_ack=settings.auto_ack,
            ),
        )
