"""Real messages sent to the real daemon become jobs that keep the payload contract (SPEC §4, §5).

Besides a full MIME message sent with smtplib: every case of
tests/payload_cases.py (the messages of issues 11 and 14), the
``smtp.max_line_length`` setting, and a PHP consumer written like
Buggregator's job handler (tests/e2e/php/consumer.php, run with php-cli)
reading the jobs the daemon stored.
"""

from __future__ import annotations

import base64
import json
import smtplib
import subprocess
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from ..payload_cases import CASES, PNG
from ..spec5 import check_payload
from .trismtp_e2e import (
    CLI_TIMEOUT,
    REPLY_TIMEOUT,
    Daemon,
    Launcher,
    StoredJob,
    b64decode,
    queued_id,
    require_tool,
    run_cli,
)

pytestmark = pytest.mark.e2e

SUBJECT = "Grüße aus Köln – 测试 ✓"
TEXT = "Hallo Welt!\n.this line starts with a dot\n..and this one with two\nEnde.\n"
HTML = "<html><body><p>Hallo <b>Welt</b> – ünïcödé ✓</p></body></html>\n"
ATTACHMENT = bytes(range(256)) * 8 + b"\r\n.\r\n"


def build_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Jörg Müller <joerg@example.org>"
    msg["To"] = "Alice <alice@example.com>, bob@example.net"
    msg["Subject"] = SUBJECT
    msg["Message-ID"] = "<e2e-payload@example.org>"
    msg["X-E2E"] = "one"
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    msg.add_attachment(
        ATTACHMENT, maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    raw = msg.as_bytes(policy=SMTP)
    # The test is only worth something if the wire form is what we think it is.
    assert b"Subject: =?utf-8?" in raw, "subject not RFC 2047-encoded"
    assert b"\r\n.this line starts with a dot\r\n" in raw, "no line for smtplib to dot-stuff"
    assert b"multipart/mixed" in raw
    assert b"multipart/alternative" in raw
    return raw


def test_smtplib_message_becomes_one_job_with_full_payload(daemon: Daemon) -> None:
    raw = build_message()
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, local_hostname="client.e2e.test") as smtp:
        smtp.ehlo()
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.net")[0] == 250
        code, text = smtp.data(raw)
    reply = f"{code} {text.decode()}"
    job_id = queued_id(reply)

    # smtplib dot-stuffs on the wire; the server must have unstuffed it, and a
    # message without a final CRLF gets one (it ends the last line).
    logical = raw if raw.endswith(b"\r\n") else raw + b"\r\n"

    jobs = daemon.jobs()
    assert [job.id for job in jobs] == [job_id], "exactly one job, with the id of the 250"
    job = jobs[0]
    assert job.pipeline == "smtp"
    assert job.name == "smtp.email"
    assert job.headers == {"uuid": [job_id], "payload_class": ["smtp:handler"]}
    assert (job.priority, job.delay, job.auto_ack) == (10, 0, False)

    payload = job.payload
    assert payload["event"] == "EMAIL_RECEIVED"
    assert payload["uuid"] == job_id
    assert payload["size"] == len(logical)
    assert payload["remote_addr"].startswith("127.0.0.1:")
    envelope = payload["envelope"]
    assert envelope["helo"] == "client.e2e.test"
    assert envelope["mail_from"] == "sender@example.org"
    assert envelope["allRecipients"] == ["alice@example.com", "bob@example.net"]
    assert envelope["from"] == [{"email": "joerg@example.org", "name": "Jörg Müller"}]
    assert [a["email"] for a in envelope["to"]] == ["alice@example.com", "bob@example.net"]
    assert payload["authentication"] is None

    message = payload["message"]
    assert message["subject"] == SUBJECT
    # Header keys in Go's canonical form, as the seed sent them.
    assert message["headers"]["X-E2e"] == ["one"]
    assert "e2e-payload@example.org" in message["id"]
    assert message["body"].replace("\r\n", "\n") == TEXT
    assert message["html_body"].replace("\r\n", "\n") == HTML
    assert message["raw"] == logical.decode("utf-8")
    assert "raw_base64" not in message

    attachments = payload["attachments"]
    assert len(attachments) == 1
    attachment = attachments[0]
    assert attachment["filename"] == "blob.bin"
    assert attachment["content_type"] == "application/octet-stream"
    assert attachment["disposition"] == "attachment"
    assert attachment["size"] == len(ATTACHMENT)
    assert b64decode(attachment["content"]) == ATTACHMENT

    # What a consumer gets: the same job through the product's own command.
    # --no-ack puts it back, so the store still holds it afterwards.
    consumed = run_cli(
        "jobs", "consume", "--pipeline", "smtp", "--no-ack", "--json",
        "--url", daemon.url, cwd=daemon.workdir, check=True,
    )  # fmt: skip
    lines = consumed.stdout.splitlines()
    assert len(lines) == 1, consumed.stdout
    seen = json.loads(lines[0])
    assert seen["id"] == job_id
    assert seen["job"] == "smtp.email"
    assert seen["headers"] == {"uuid": [job_id], "payload_class": ["smtp:handler"]}
    assert seen["options"] == {"priority": 10, "pipeline": "smtp", "delay": 0, "auto_ack": False}
    assert json.loads(seen["payload"]) == payload
    assert [j.id for j in daemon.jobs()] == [job_id]
    check_payload(payload, logical)


def send_all(daemon: Daemon, messages: dict[str, bytes]) -> dict[str, StoredJob]:
    """Send each message in one SMTP session; each must get 250. Each one's job, by name."""
    ids: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, local_hostname="client.e2e.test") as smtp:
        smtp.ehlo()
        for name, raw in messages.items():
            assert smtp.mail("sender@example.org")[0] == 250
            assert smtp.rcpt("rcpt@example.com")[0] == 250
            code, text = smtp.data(raw)
            ids[name] = queued_id(f"{code} {text.decode()}")
    jobs = {job.id: job for job in daemon.jobs()}
    assert sorted(jobs) == sorted(ids.values()), "not exactly one job per message"
    return {name: jobs[job_id] for name, job_id in ids.items()}


def test_every_payload_case_through_the_daemon(daemon: Daemon) -> None:
    # The messages of issues 11 and 14 (tests/payload_cases.py), with the
    # same checks as through the parser alone, on what the daemon stored.
    jobs = send_all(daemon, {name: case.raw for name, case in CASES.items()})
    for name, job in jobs.items():
        payload = job.payload
        check_payload(payload, CASES[name].raw)
        CASES[name].check(payload)


LONG_HEADER = (
    b"From: app@example.org\r\n"
    b"Subject: long trace\r\n"
    b"X-Trace: " + b"t" * (4097 - len(b"X-Trace: ")) + b"\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_a_4097_character_header_line_needs_max_line_length(launch: Launcher) -> None:
    strict = launch.daemon()
    with smtplib.SMTP("127.0.0.1", strict.smtp_port) as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        smtp.rcpt("rcpt@example.com")
        code, text = smtp.data(LONG_HEADER)
    # RFC 5321's limit by default, and the refusal names the setting.
    assert (code, text.decode()) == (
        500,
        "5.5.2 Line too long (over 1000 octets, the server's smtp.max_line_length)",
    )
    assert strict.jobs() == []

    roomy = launch.daemon({"smtp": {"max_line_length": 8192}})
    (job,) = send_all(roomy, {"long": LONG_HEADER}).values()
    check_payload(job.payload, LONG_HEADER)
    assert job.payload["message"]["headers"]["X-Trace"] == ["t" * 4088]


def test_a_part_labelled_with_a_python_codec_is_taken_at_once(daemon: Daemon) -> None:
    # charset=punycode names a Python codec, not a character set, and
    # Python's punycode decoder is quadratic: this 2 MB part would have
    # held a worker thread for minutes while the client waited. The text
    # is read as with any charset nobody knows.
    text = "a" * 1_000_000 + "-" + "99" * 500_000
    raw = (
        b"From: app@example.org\r\nSubject: punycode\r\n"
        b"Content-Type: text/plain; charset=punycode\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(text.encode("ascii")).replace(b"\n", b"\r\n")
    )
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=REPLY_TIMEOUT) as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        smtp.rcpt("rcpt@example.com")
        code, reply = smtp.data(raw)
    job_id = queued_id(f"{code} {reply.decode()}")
    (job,) = daemon.jobs()
    assert job.id == job_id
    assert job.payload["message"]["body"] == text


# --- a PHP consumer -------------------------------------------------------------

PHP_CONSUMER = Path(__file__).parent / "php" / "consumer.php"


def run_php_consumer(jobs: list[dict[str, Any]], out: Path) -> subprocess.CompletedProcess[str]:
    """Feed ``jobs`` (RoadRunner Job objects) to consumer.php as JSON lines."""
    php = require_tool("php")
    return subprocess.run(
        [php, str(PHP_CONSUMER), str(out)],
        input="".join(json.dumps(job) + "\n" for job in jobs),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def as_job(stored: StoredJob) -> dict[str, Any]:
    """A stored job as the RoadRunner Job JSON a consumer reserves (docs/payload.md)."""
    return {
        "job": stored.name,
        "id": stored.id,
        "payload": stored.payload_text,
        "headers": stored.headers,
        "options": {
            "priority": stored.priority,
            "pipeline": stored.pipeline,
            "delay": stored.delay,
            "auto_ack": stored.auto_ack,
        },
    }


def test_php_consumer_written_like_buggregator_handles_every_job(
    daemon: Daemon, tmp_path: Path
) -> None:
    # The jobs are read from the daemon's store, not reserved over the RPC:
    # the payload text is the same, and this test is about the payload.
    names = ["inline-image-without-filename", "latin1-8bit", "all-uppercase-headers"]
    jobs = send_all(daemon, {name: CASES[name].raw for name in names})
    out = tmp_path / "attachments"

    result = run_php_consumer([as_job(jobs[name]) for name in names], out)

    assert result.returncode == 0, result.stderr
    seen = {line["id"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert sorted(seen) == sorted(job.id for job in jobs.values())

    image = seen[jobs["inline-image-without-filename"].id]
    assert image["subject"] == "Daily chart"
    assert image["attachments"] == [
        {
            "filename": "chart-1.png",
            "type": "image/png",
            "content_id": "chart-1@example.org",
            "size": len(PNG),
        }
    ]
    # Buggregator stores attachments as <event>/<filename>: the bytes are the image.
    stored = out / jobs["inline-image-without-filename"].id / "chart-1.png"
    assert stored.read_bytes() == PNG

    latin1 = seen[jobs["latin1-8bit"].id]
    assert latin1["subject"] == "Café crème"
    assert latin1["text"] == "Un café crème, s'il vous plaît.\r\n"
    # raw reached PHP as a string (U+FFFD for the Latin-1 bytes, as the seed).
    raw = CASES["latin1-8bit"].raw
    assert latin1["raw_is_utf8"] is True
    assert latin1["raw_length"] == len(raw.decode("utf-8", "replace").encode("utf-8"))

    loud = seen[jobs["all-uppercase-headers"].id]
    assert loud["subject"] == "ALL CAPS"
    assert loud["message_id"] == "<caps-1@example.org>"
    assert loud["from"] == [{"email": "loud@example.org", "name": "Loud Sender"}]


def test_php_consumer_fails_on_the_old_payload(daemon: Daemon, tmp_path: Path) -> None:
    # The control: the same consumer on a payload as trismtp sent it before
    # (a null filename, no raw for 8-bit mail) fails the way Buggregator did,
    # so the test above can tell.
    jobs = send_all(daemon, {"image": CASES["inline-image-without-filename"].raw})
    job = as_job(next(iter(jobs.values())))
    old = json.loads(job["payload"])
    old["attachments"][0]["filename"] = None
    job["payload"] = json.dumps(old)
    eight_bit = dict(job, id="old-8bit")
    old_8bit = json.loads(job["payload"])
    old_8bit["attachments"] = []
    del old_8bit["message"]["raw"]
    old_8bit["message"]["raw_base64"] = base64.b64encode(CASES["latin1-8bit"].raw).decode()
    eight_bit["payload"] = json.dumps(old_8bit)

    result = run_php_consumer([job, eight_bit], tmp_path / "out")

    assert result.returncode == 1
    assert "TypeError" in result.stderr
    assert "getFilename()" in result.stderr
    assert 'job old-8bit: ErrorException: Undefined array key "raw"' in result.stderr
