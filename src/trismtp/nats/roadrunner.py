"""Jobs in the format RoadRunner's NATS jobs driver reads.

:func:`roadrunner_message` writes a job the way RoadRunner's NATS jobs driver
writes and reads it: the JetStream-based driver in
github.com/roadrunner-server/nats, directory ``natsjobs/`` (module
``github.com/roadrunner-server/nats/v5`` and later). The files read:

* ``natsjobs/item.go`` at commit 046e36f9: ``type Item struct { Job string
  `json:"job"`; Ident string `json:"id"`; Payload []byte `json:"payload"`;
  headers map[string][]string; Options *Options `json:"options,omitempty"` }``
  and ``Options { Priority int64 `json:"priority"`; Pipeline string
  `json:"pipeline,omitempty"`; Delay int64 `json:"delay,omitempty"`; AutoAck
  bool `json:"auto_ack"`; Queue string }``. ``Payload`` is ``[]byte``, which
  Go's encoding/json writes and reads as standard base64 (with padding);
  ``headers`` is unexported, so it is not part of the JSON at all.
* ``natsjobs/driver.go`` at commit 006bc002, ``Push``: the body is
  ``json.Marshal(item)``, and the job's headers go out as the NATS message's
  headers (``msg.Header = j.headers``), published with JetStream
  (``PublishMsg``).
* ``natsjobs/unpack.go`` and ``natsjobs/listener.go`` (their newest versions,
  which call ``c.unpack(m.Data(), m.Headers(), item)``; ``item_test.go`` at
  commit ecc96b34 tests it): the consumer unmarshals the body into an Item
  and takes the job's headers from the NATS headers. It replaces
  ``options.pipeline`` with its own pipeline's name, uses the pipeline's
  priority when ``priority`` is 0, and adds ``x-nats-subject``. A body that
  does not unmarshal (a payload that is not base64, say) is not rejected: it
  becomes a job named ``deduced_by_rr`` with the raw bytes as its payload, so
  the format must be exact.

An older version (``item.go`` at commit 403fb47a: ``Payload string``,
``Headers `json:"headers"```) is not compatible with this one; we write the
newer one.

So a job whose JSON is::

    {"job":"smtp.email","id":"6f1c…","payload":"{\\"from\\":\\"a@example.org\\"}",
     "headers":{"uuid":["6f1c…"],"payload_class":["smtp:handler"]},
     "options":{"priority":10,"pipeline":"smtp","delay":0,"auto_ack":false}}

is published with the body::

    {"job":"smtp.email","id":"6f1c…","payload":"eyJmcm9tIjoiYUBleGFtcGxlLm9yZyJ9",
     "options":{"priority":10,"pipeline":"smtp","delay":0,"auto_ack":false}}

and the header block (``Nats-Msg-Id`` added by :meth:`NatsClient.publish_batch`)::

    NATS/1.0\\r\\nNats-Msg-Id: 6f1c…\\r\\nuuid: 6f1c…\\r\\npayload_class: smtp:handler\\r\\n\\r\\n

RoadRunner's own Push refuses jobs with a delay ("nats doesn't support delayed
messages"), and its consumer ignores ``delay``: a delayed job runs at once.

Credentials (user and password, or token) go into CONNECT only. They are
never logged nor put into an exception's text.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import ValidationError

from trismtp.jobs.model import Job
from trismtp.nats.protocol import encode_headers

logger = logging.getLogger(__name__)

# What a job's NATS message holds besides its payload, at most: the body's
# JSON around the payload (job name, id, options) and the header block (the
# job's headers: uuid, payload_class and jobs.headers). Jobs whose headers are
# larger still fit by the ladder below or are refused, never cut.
ENVELOPE_RESERVE: Final = 8 * 1024
# What the smallest form of an email payload holds besides its raw bytes, at
# most: event, ids, the SMTP envelope (up to 100 recipients of 256 octets and
# HELO), TLS and AUTH, the omitted list and the JSON around them.
MINIMAL_PAYLOAD_RESERVE: Final = 40 * 1024

_CONTENTS: Final = ("attachments[].content",)


class JobTooLarge(ValueError):
    """Even the smallest form of the job is larger than the destination takes."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, more than the {limit} the NATS server takes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class RoadRunnerMessage:
    """A job as RoadRunner's NATS driver reads it: body, NATS headers, and what
    was left out of the payload to fit (empty for the whole payload)."""

    data: bytes
    headers: dict[str, list[str]]
    omitted: tuple[str, ...] = ()


def accepted_message_size(max_payload: int) -> int:
    """The largest email whose job always fits a NATS message of *max_payload* bytes.

    The bound is the smallest form of the payload (see :func:`fit_roadrunner_message`):
    the raw message as base64 (4/3) inside the payload, which the RoadRunner
    body carries as base64 again (4/3), plus the reserves above. Typical mail
    fits whole up to about ``max_payload / 2.7``; between that and this bound
    the payload sheds the copies the raw message already holds.
    """
    payload = (max_payload - ENVELOPE_RESERVE) * 3 // 4
    return max(0, (payload - MINIMAL_PAYLOAD_RESERVE) * 3 // 4)


def roadrunner_message(job_json: str) -> tuple[bytes, dict[str, list[str]]]:
    """The body and NATS headers RoadRunner's NATS jobs driver reads for a job.

    *job_json* is a :class:`~trismtp.jobs.model.Job` as JSON
    (:meth:`~trismtp.jobs.model.Job.to_json`). The body is the job without
    its headers and with ``payload`` as standard base64 of the payload's UTF-8
    bytes (RoadRunner's ``Payload []byte``); the headers are the job's, to be
    sent as the message's NATS headers (see the module docstring). Raises
    ValueError if *job_json* is not a job.
    """
    job = _job(job_json)
    return _body(job, job.payload.encode("utf-8")), _headers(job)


def fit_roadrunner_message(job_json: str, max_size: int) -> RoadRunnerMessage:
    """:func:`roadrunner_message`, with the payload cut down until the whole
    message (headers and body) is at most *max_size* bytes.

    An email payload (SPEC §5) is cut in steps, each only when the step before
    is still too large, and each step's fields are listed in the payload's
    ``omitted`` member:

    1. the decoded bodies (``message.body``, ``message.html_body`` become ``""``);
    2. the attachments' contents (``content`` becomes null);
    3. everything the raw message holds but the raw message itself: headers,
       subject, addresses and the attachment list; ``message.raw`` becomes
       ``""`` where ``message.raw_base64`` (the exact bytes) is there, or where
       the raw text as JSON is longer than base64 would be (it then moves to
       ``raw_base64``).

    ``raw``/``raw_base64`` always stay: a consumer can rebuild every dropped
    field from them. A payload that is not an email payload is never cut.
    Raises :class:`JobTooLarge` if even the last form does not fit, ValueError
    if *job_json* is not a job.
    """
    job = _job(job_json)
    headers = _headers(job)
    limit = max_size - len(encode_headers(headers))
    payload = job.payload.encode("utf-8")
    body = _body(job, payload)
    if len(body) <= limit:
        return RoadRunnerMessage(body, headers)
    try:
        email = orjson.loads(payload)
    except orjson.JSONDecodeError:
        email = None
    if not isinstance(email, dict) or not isinstance(email.get("message"), dict):
        raise JobTooLarge(len(body), limit)
    omitted: list[str] = []
    for step in (_drop_bodies, _drop_contents, _keep_raw_only):
        omitted.extend(step(email))
        email["omitted"] = omitted
        body = _body(job, orjson.dumps(email))
        if len(body) <= limit:
            return RoadRunnerMessage(body, headers, tuple(omitted))
    raise JobTooLarge(len(body), limit)


def _job(job_json: str) -> Job:
    try:
        return Job.model_validate_json(job_json)
    except ValidationError as exc:
        raise ValueError(f"not a job: {exc}") from None


def _headers(job: Job) -> dict[str, list[str]]:
    return {name: list(values) for name, values in job.headers.items()}


def _body(job: Job, payload: bytes) -> bytes:
    options = job.options
    return orjson.dumps(
        {
            "job": job.job,
            "id": job.id,
            "payload": base64.b64encode(payload).decode("ascii"),
            "options": {
                "priority": options.priority,
                "pipeline": options.pipeline,
                "delay": options.delay,
                "auto_ack": options.auto_ack,
            },
        }
    )


def _drop_bodies(email: dict[str, Any]) -> list[str]:
    message = email["message"]
    dropped = [f"message.{key}" for key in ("body", "html_body") if message.get(key)]
    for path in dropped:
        message[path.removeprefix("message.")] = ""
    return dropped


def _drop_contents(email: dict[str, Any]) -> list[str]:
    attachments = email.get("attachments")
    if not isinstance(attachments, list):
        return []
    dropped = False
    for attachment in attachments:
        if isinstance(attachment, dict) and attachment.get("content") is not None:
            attachment["content"] = None
            dropped = True
    return list(_CONTENTS) if dropped else []


def _keep_raw_only(email: dict[str, Any]) -> list[str]:
    message = email["message"]
    dropped: list[str] = []
    for key, empty in (("headers", {}), ("subject", "")):
        if message.get(key):
            message[key] = empty
            dropped.append(f"message.{key}")
    envelope = email.get("envelope")
    if isinstance(envelope, dict):
        for key in ("from", "to", "ccs", "replyTo"):
            if envelope.get(key):
                envelope[key] = []
                dropped.append(f"envelope.{key}")
    if email.get("attachments"):
        email["attachments"] = []
        dropped.append("attachments")
    raw = message.get("raw")
    if isinstance(raw, str) and raw:
        exact = message.get("raw_base64")
        if not isinstance(exact, str):
            encoded = raw.encode("utf-8")
            # JSON escapes (a control character is six octets) can make the
            # text longer than its base64; the bytes are the same.
            if len(orjson.dumps(raw)) > (len(encoded) + 2) // 3 * 4:
                exact = base64.b64encode(encoded).decode("ascii")
                message["raw_base64"] = exact
        if isinstance(exact, str):
            message["raw"] = ""
            dropped.append("message.raw")
    return dropped
