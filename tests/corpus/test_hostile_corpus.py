"""Every message of the hostile corpus becomes exactly one payload (tests/corpus/hostile.py).

For each entry, ``build_payload(..., include_raw=True)`` returns one payload,
without raising, within :data:`TIME_BOUND` seconds; orjson (what the job
carries) serialises it; it keeps the SPEC §5 contract (tests/spec5.py); and
its ``raw``/``raw_base64`` gives back exactly the input bytes.

The time bound is a safety net against hangs and runaway complexity, not a
speed test. Measured on the 2-core development machine, the slowest entry
(multiparts nested 2,000 deep, which exhausts the parser's recursion and
takes the fallbacks) needs about 0.9 s, a 750 KB To of 20,000 non-ASCII names
0.5 s, everything else under 0.2 s. Before message.py capped the header
length given to the standard library's (quadratic) header parsers, the three
``parameter-open-quote-...``, ``subject-of-...`` and ``to-of-...`` entries took
19 to 22 s each.
"""

from __future__ import annotations

import base64
import datetime
import json
import time

import orjson
import pytest

from trismtp.message import _MAX_PARSED_HEADER, Envelope, build_payload

from ..fuzz.support import watchdog
from ..spec5 import check_payload, raw_of
from . import hostile

TIME_BOUND = 10.0
"""Seconds one corpus message may take; ten times the slowest measured."""

ENVELOPE = Envelope(
    helo="client.example",
    mail_from="sender@example.org",
    recipients=("rcpt@example.com",),
    remote_addr="203.0.113.5:53211",
)
RECEIVED_AT = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize("name", hostile.names())
def test_hostile_message_becomes_one_payload(name: str) -> None:
    raw = hostile.build(name)

    start = time.perf_counter()
    with watchdog(f"build_payload({name})", seconds=TIME_BOUND + 5):
        result = build_payload(
            raw, uuid="u", envelope=ENVELOPE, received_at=RECEIVED_AT, include_raw=True
        )
    elapsed = time.perf_counter() - start

    assert elapsed < TIME_BOUND, f"{name}: {elapsed:.1f} s"
    assert isinstance(result, dict)
    payload = json.loads(orjson.dumps(result))
    # SPEC §5 (shared/SPEC.md) holds for every one of them, as for good mail.
    check_payload(payload, raw)
    assert raw_of(payload["message"]) == raw


def test_the_corpus_can_be_sent_over_smtp() -> None:
    # test_hostile_e2e.py sends every entry, so every line must fit SMTP's
    # limit once the line ends are CRLF; for_smtp must leave CRLF data alone.
    for name, raw in hostile.corpus().items():
        data = hostile.for_smtp(raw)
        assert hostile.for_smtp(data) == data, name
        assert data == b"" or data.endswith(b"\r\n"), name
        longest = max(len(line) for line in data.split(b"\r\n"))
        assert longest <= hostile.MAX_SMTP_LINE, (name, longest)


def test_path_traversal_filenames_are_reported_as_sent() -> None:
    # The payload reports names; making them safe to write is the consumer's
    # job (docs/payload.md). They must arrive intact, one attachment each.
    result = build_payload(
        hostile.build("attachment-filenames-path-traversal"),
        uuid="u",
        envelope=ENVELOPE,
        received_at=RECEIVED_AT,
        include_raw=False,
    )
    names = [attachment["filename"] for attachment in result["attachments"]]
    assert len(names) == 8
    assert "../../etc/passwd" in names
    assert "/etc/shadow" in names


def test_control_characters_in_filenames_stay_strings() -> None:
    result = build_payload(
        hostile.build("attachment-filenames-control-characters"),
        uuid="u",
        envelope=ENVELOPE,
        received_at=RECEIVED_AT,
        include_raw=False,
    )
    assert len(result["attachments"]) == 7
    for attachment in result["attachments"]:
        assert isinstance(attachment["filename"], str)
        assert attachment["filename"]
        assert base64.b64decode(attachment["content"]) == b"payload"


@pytest.mark.parametrize(
    "name",
    [
        "parameter-open-quote-and-semicolons",
        "subject-of-24000-encoded-words",
        "to-of-20000-non-ascii-names",
    ],
)
def test_headers_too_long_to_parse_are_kept_whole(name: str) -> None:
    # message.py gives the header parsers at most _MAX_PARSED_HEADER
    # characters; the payload still holds every header as received.
    raw = hostile.build(name)
    result = build_payload(
        raw, uuid="u", envelope=ENVELOPE, received_at=RECEIVED_AT, include_raw=False
    )
    headers = result["message"]["headers"]
    longest = max(len(value) for values in headers.values() for value in values)
    assert longest > 100_000
    if name.startswith("to-"):
        # The linear legacy address parser still reads every mailbox.
        to = result["envelope"]["to"]
        assert len(to) == 20_000
        assert to[7] == {"email": "a7@example.org", "name": "Nämé 7"}


def test_the_header_cap_keeps_long_real_headers_decoded() -> None:
    # Just under the cap a header is decoded as before; just over it is kept
    # as received, where the parser would have been quadratic.
    word = "=?utf-8?B?w6k=?="  # "é"
    under = " ".join([word] * (_MAX_PARSED_HEADER // (len(word) + 1)))
    over = " ".join([word] * (_MAX_PARSED_HEADER // (len(word) + 1) + 2))
    assert len(under) <= _MAX_PARSED_HEADER < len(over)
    raw = f"Subject: {under}\r\nX-Long: {over}\r\n\r\nbody\r\n".encode()

    result = build_payload(
        raw, uuid="u", envelope=ENVELOPE, received_at=RECEIVED_AT, include_raw=False
    )

    assert result["message"]["subject"] == "é" * under.count(word)
    assert result["message"]["headers"]["X-Long"] == [over]
