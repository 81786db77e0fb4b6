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

import orjson
from pydantic import ValidationError

from trismtp.jobs.model import Job

logger = logging.getLogger(__name__)

# -- RoadRunner's format ------------------------------------------------------


def roadrunner_message(job_json: str) -> tuple[bytes, dict[str, list[str]]]:
    """The body and NATS headers RoadRunner's NATS jobs driver reads for a job.

    *job_json* is a :class:`~trismtp.jobs.model.Job` as JSON
    (:meth:`~trismtp.jobs.model.Job.to_json`). The body is the job without
    its headers and with ``payload`` as standard base64 of the payload's UTF-8
    bytes (RoadRunner's ``Payload []byte``); the headers are the job's, to be
    sent as the message's NATS headers (see the module docstring). Raises
    ValueError if *job_json* is not a job.
    """
    try:
        job = Job.model_validate_json(job_json)
    except ValidationError as exc:
        raise ValueError(f"not a job: {exc}") from None
    options = job.options
    body = {
        "job": job.job,
        "id": job.id,
        "payload": base64.b64encode(job.payload.encode("utf-8")).decode("ascii"),
        "options": {
            "priority": options.priority,
            "pipeline": options.pipeline,
            "delay": options.delay,
            "auto_ack": options.auto_ack,
        },
    }
    return orjson.dumps(body), {name: list(values) for name, values in job.headers.items()}
