"""The Job: RoadRunner's ``jobs.v1.Job`` as JSON (SPEC §5).

Both sides of the RPC use this model: the pusher builds jobs from received
email, the jobs service validates what it is sent. The id is the idempotency
key everywhere: the same id pushed twice is one job.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

PAYLOAD_CLASS = "smtp:handler"
# A priority is stored as a SQLite integer (64-bit signed).
MIN_PRIORITY = -(2**63)
MAX_PRIORITY = 2**63 - 1
MAX_DELAY = 365 * 86400
"""Seconds: the longest job delay accepted (a year); more is a mistake, not a plan."""


class JobOptions(BaseModel):
    """``options`` of a job: where it goes and how it is consumed."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    priority: int = Field(default=10, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    pipeline: str = Field(min_length=1)
    delay: int = Field(default=0, ge=0, le=MAX_DELAY)
    auto_ack: bool = False


class Job(BaseModel):
    """One job, as pushed to and reserved from the jobs service."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job: str = Field(min_length=1)
    id: str = Field(min_length=1, max_length=256)
    payload: str
    headers: dict[str, list[str]] = Field(default_factory=dict)
    options: JobOptions

    def to_json(self) -> str:
        """The job as compact JSON text, as it travels on the wire."""
        # orjson: the hot path encodes every message's job (and its payload)
        # once, and the stdlib encoder was a visible share of the CPU.
        return orjson.dumps(self.to_dict()).decode()

    def to_dict(self) -> dict[str, Any]:
        """The job as plain JSON data."""
        return {
            "job": self.job,
            "id": self.id,
            "payload": self.payload,
            "headers": self.headers,
            "options": {
                "priority": self.options.priority,
                "pipeline": self.options.pipeline,
                "delay": self.options.delay,
                "auto_ack": self.options.auto_ack,
            },
        }
