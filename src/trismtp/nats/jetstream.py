"""JetStream API helpers: create or check a stream, read messages back.

Each is one or a few requests on ``$JS.API.…`` through a
:class:`~trismtp.nats.client.NatsClient`; a refusal is a
:class:`~trismtp.nats.protocol.JetStreamError`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import orjson

from trismtp.nats.client import NatsClient
from trismtp.nats.protocol import (
    STATUS_NO_RESPONDERS,
    JetStreamError,
    check_subject,
    parse_headers,
)

logger = logging.getLogger(__name__)

DEFAULT_API_TIMEOUT: Final = 5.0
"""Seconds the JetStream helpers wait for each API reply."""
# JetStream API error codes (``err_code``), from nats-server's errors.json.
ERR_NO_MESSAGE: Final = 10037
ERR_STREAM_NAME_IN_USE: Final = 10058
ERR_STREAM_SUBJECT_OVERLAP: Final = 10065
ERR_STREAM_NOT_FOUND: Final = 10059
_STREAM_NAME_FORBIDDEN: Final = re.compile(r"[\s.*>/\\\x00]")

# -- JetStream helpers --------------------------------------------------------


class StoredMessage(NamedTuple):
    """A message read back from a stream."""

    seq: int
    headers: dict[str, list[str]]
    data: bytes


async def _api(
    client: NatsClient,
    api: str,
    payload: bytes,
    timeout: float,  # noqa: ASYNC109
) -> dict[str, Any]:
    subject = f"$JS.API.{api}"
    try:
        reply = await client.request(subject, payload, timeout)
    except JetStreamError as exc:
        if exc.code == STATUS_NO_RESPONDERS and exc.err_code == 0:
            raise JetStreamError(
                STATUS_NO_RESPONDERS, 0, f"JetStream is not enabled (no responders on {subject})"
            ) from None
        raise
    try:
        data = orjson.loads(reply)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise JetStreamError(0, 0, f"the reply to {subject} is not a JSON object")
    return data


def _check_stream_name(stream: str) -> None:
    if not stream or _STREAM_NAME_FORBIDDEN.search(stream):
        raise ValueError(f"invalid stream name {stream!r}")


async def stream_info(
    client: NatsClient,
    stream: str,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> dict[str, Any] | None:
    """The stream's info (``config``, ``state``…), or None if it does not exist."""
    _check_stream_name(stream)
    try:
        return await _api(client, f"STREAM.INFO.{stream}", b"", timeout)
    except JetStreamError as exc:
        if exc.err_code == ERR_STREAM_NOT_FOUND:
            return None
        raise


async def ensure_stream(
    client: NatsClient,
    stream: str,
    subjects: list[str],
    *,
    retention: str = "limits",
    duplicate_window: float = 120,
    storage: str = "file",
    replicas: int = 1,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> dict[str, Any]:
    """Create the stream if it is missing; return its info.

    A stream that exists is left as it is (its retention, limits and window
    are its owner's choice), but it must cover every subject in *subjects*,
    else JetStreamError (code 0) says which it lacks: messages published there
    would find no stream. *duplicate_window* is in seconds (the API counts
    nanoseconds); *retention* is ``workqueue``, ``limits`` or ``interest``,
    *storage* ``file`` or ``memory``; *replicas* matters in a cluster only.
    Other JetStream refusals (subjects that overlap another stream's…) are
    JetStreamError as the server words them.
    """
    _check_stream_name(stream)
    if not subjects:
        raise ValueError("a stream needs at least one subject")
    for subject in subjects:
        check_subject(subject, "stream subject", wildcards=True)
    if retention not in ("workqueue", "limits", "interest"):
        raise ValueError(f"retention must be workqueue, limits or interest, not {retention!r}")
    if storage not in ("file", "memory"):
        raise ValueError(f"storage must be file or memory, not {storage!r}")
    if not 1 <= replicas <= 5:
        raise ValueError("replicas must be 1 to 5")
    if not (duplicate_window > 0 and math.isfinite(duplicate_window)):
        raise ValueError("duplicate_window must be a positive number of seconds")
    info = await stream_info(client, stream, timeout=timeout)
    if info is None:
        config = {
            "name": stream,
            "subjects": list(subjects),
            "retention": retention,
            "storage": storage,
            "num_replicas": replicas,
            "duplicate_window": round(duplicate_window * 1_000_000_000),
            "discard": "old",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": -1,
            "max_age": 0,
            "max_msg_size": -1,
        }
        try:
            created = await _api(client, f"STREAM.CREATE.{stream}", orjson.dumps(config), timeout)
        except JetStreamError as exc:
            # Created by someone else since we looked (another connection of
            # this daemon: its lanes and workers all start at once). Racing
            # the creator, nats-server 2.9 answers "name in use" or, at times,
            # "subjects overlap" with that very stream: check theirs. A
            # different stream holding the subjects leaves ours missing.
            if exc.err_code not in (ERR_STREAM_NAME_IN_USE, ERR_STREAM_SUBJECT_OVERLAP):
                raise
            info = await stream_info(client, stream, timeout=timeout)
            if info is None:
                raise
        else:
            logger.info("created JetStream stream %s for %s", stream, ", ".join(subjects))
            return created
    _check_covers(stream, info, subjects)
    return info


def _check_covers(stream: str, info: Mapping[str, Any], subjects: Sequence[str]) -> None:
    config = info.get("config")
    have = config.get("subjects") if isinstance(config, dict) else None
    patterns = [p for p in have if isinstance(p, str)] if isinstance(have, list) else []
    missing = [s for s in subjects if not any(_covers(p, s) for p in patterns)]
    if missing:
        raise JetStreamError(
            0,
            0,
            f"stream {stream!r} exists with subjects {patterns}, which do not cover "
            f"{', '.join(repr(s) for s in missing)}: add them to the stream, "
            "or configure another stream or subject",
        )


def _covers(pattern: str, subject: str) -> bool:
    """Does the subject pattern *pattern* match everything *subject* matches?"""
    want = subject.split(".")
    for index, token in enumerate(pattern.split(".")):
        if token == ">":
            return len(want) > index
        if index >= len(want):
            return False
        if token == "*":
            if want[index] == ">":
                return False
        elif token != want[index]:
            return False
    return len(want) == len(pattern.split("."))


async def get_message(
    client: NatsClient,
    stream: str,
    seq: int,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> tuple[dict[str, list[str]], bytes] | None:
    """The headers and data of the message at *seq*, or None if there is none
    (never stored, deleted, or acknowledged from a work queue)."""
    _check_stream_name(stream)
    found = await _get(client, stream, {"seq": seq}, timeout)
    return None if found is None else (found.headers, found.data)


async def first_messages(
    client: NatsClient,
    stream: str,
    limit: int,
    *,
    timeout: float = DEFAULT_API_TIMEOUT,  # noqa: ASYNC109
) -> list[StoredMessage]:
    """Up to *limit* messages of the stream, oldest first, skipping deleted ones.

    One API request per message (``next_by_subj`` jumps over gaps);
    *timeout* bounds each request. Meant for inspection and tests, not for
    consuming: nothing is acknowledged or removed.
    """
    _check_stream_name(stream)
    found: list[StoredMessage] = []
    seq = 1
    while len(found) < limit:
        message = await _get(client, stream, {"seq": seq, "next_by_subj": ">"}, timeout)
        if message is None:
            break
        found.append(message)
        seq = message.seq + 1
    return found


async def _get(
    client: NatsClient,
    stream: str,
    query: Mapping[str, Any],
    timeout: float,  # noqa: ASYNC109
) -> StoredMessage | None:
    try:
        reply = await _api(client, f"STREAM.MSG.GET.{stream}", orjson.dumps(query), timeout)
    except JetStreamError as exc:
        if exc.err_code == ERR_NO_MESSAGE:
            return None
        raise
    message = reply.get("message")
    if not isinstance(message, dict) or type(message.get("seq")) is not int:
        raise JetStreamError(0, 0, "STREAM.MSG.GET replied without a message")
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
        header_block = base64.b64decode(message.get("hdrs") or "", validate=True)
    except (binascii.Error, TypeError):
        raise JetStreamError(0, 0, "STREAM.MSG.GET replied with invalid base64") from None
    headers = parse_headers(header_block)[2] if header_block else {}
    return StoredMessage(message["seq"], headers, data)
