"""EmailJob: one accepted message, and how it becomes a Job (SPEC §5)."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from trismtp.jobs.model import PAYLOAD_CLASS, Job, JobOptions
from trismtp.message import Envelope, build_payload
from trismtp.settings import JobsSettings

__all__ = ["EmailJob", "new_job_id"]

# The last settings to_job_json saw and the job "options" they give, checked
# by the Job model once: (settings, options). Settings are made at start-up
# and not changed, and the model's checks cost more than parsing a small
# message.
_checked: tuple[JobsSettings, dict[str, Any]] | None = None


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
        return self._job(settings, self.payload(include_raw=include_raw))

    def _headers(self, settings: JobsSettings) -> dict[str, list[str]]:
        headers = {"uuid": [self.id], "payload_class": [PAYLOAD_CLASS]}
        headers.update(settings.headers)
        return headers

    def _job(self, settings: JobsSettings, payload: str) -> Job:
        return Job(
            job=settings.job_name,
            id=self.id,
            payload=payload,
            headers=self._headers(settings),
            options=JobOptions(
                priority=settings.priority,
                pipeline=settings.pipeline,
                delay=settings.delay,
                auto_ack=settings.auto_ack,
            ),
        )

    def to_job_json(self, settings: JobsSettings, *, include_raw: bool) -> str:
        """``to_job(settings, include_raw=...).to_json()``, without building the model per message.

        The same text: the same keys in the same order. What the model
        checks of the settings is checked once per settings object (the
        first message raises what ``to_job`` would), and the id each time.
        """
        global _checked
        checked = _checked
        if checked is None or checked[0] is not settings or not 0 < len(self.id) <= 256:
            # The model checks all but the payload (any text): built without
            # it, the first message of a big size is not copied into a model.
            options = self._job(settings, "").to_dict()["options"]
            checked = _checked = (settings, options)
        return _encode(
            {
                "job": settings.job_name,
                "id": self.id,
                "payload": self.payload(include_raw=include_raw),
                "headers": self._headers(settings),
                "options": checked[1],
            }
        )


def _encode(job: dict[str, Any]) -> str:
    # The dict holds the payload text: it goes before the JSON text is made,
    # so a big message's payload is not held three times at once.
    encoded = orjson.dumps(job)
    job.clear()
    return encoded.decode()
