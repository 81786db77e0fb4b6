"""The hostile corpus through the real daemon: every message is one job with its exact bytes.

Each corpus entry is sent with smtplib in one session (MAIL, RCPT, DATA per
message) to a real ``trismtp serve`` with its embedded jobs service. SMTP
carries lines, so the SMTP leg sends :func:`~tests.corpus.hostile.for_smtp` of
each entry: every line end made CRLF (the corpus keeps some bare LF and CR on
purpose, which the server refuses by default) and a final CRLF added, which
smtplib would add anyway. smtplib dot-stuffs; the server unstuffs. The empty
message is sent as DATA and the final dot alone (``smtplib.SMTP.data`` would
add a CRLF). Every message must get 250, and the store must then hold exactly
one job per message whose raw bytes are the bytes sent, and whose payload
keeps the SPEC §5 contract (tests/spec5.py).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from ..e2e.trismtp_e2e import HOST, launcher, queued_id
from ..spec5 import check_payload, raw_of
from . import hostile

pytestmark = pytest.mark.e2e

SMTP_TIMEOUT = 60.0
"""Seconds smtplib waits for a reply; the slowest message parses in about a second."""


def send(smtp: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    """One transaction; the reply to the final dot."""
    code, text = smtp.mail("sender@example.org")
    assert code == 250, text
    code, text = smtp.rcpt("rcpt@example.com")
    assert code == 250, text
    if data:
        return smtp.data(data)
    smtp.putcmd("data")
    code, text = smtp.getreply()
    assert code == 354, text
    smtp.send(b".\r\n")
    return smtp.getreply()


def test_every_hostile_message_becomes_exactly_one_job(tmp_path: Path) -> None:
    messages = {name: hostile.for_smtp(raw) for name, raw in hostile.corpus().items()}
    sent: dict[str, tuple[str, bytes]] = {}  # job id -> (entry, bytes sent)
    refused: list[str] = []
    with launcher(tmp_path) as launch:
        daemon = launch.daemon()
        with smtplib.SMTP(
            HOST, daemon.smtp_port, local_hostname="client.e2e.test", timeout=SMTP_TIMEOUT
        ) as smtp:
            smtp.ehlo()
            for name, data in messages.items():
                code, text = send(smtp, data)
                if code != 250:
                    refused.append(f"{name}: {code} {text!r}")
                    smtp.rset()
                    continue
                sent[queued_id(f"{code} {text.decode()}")] = (name, data)
            smtp.quit()
        jobs = daemon.jobs()

    assert refused == [], "messages not accepted"
    assert len(sent) == len(messages), "a job id was given twice"
    assert sorted(job.id for job in jobs) == sorted(sent), "not exactly one job per message"
    for job in jobs:
        name, data = sent[job.id]
        payload = job.payload
        assert raw_of(payload["message"]) == data, f"{name}: raw differs from what was sent"
        assert payload["size"] == len(data), name
        check_payload(payload, data)
