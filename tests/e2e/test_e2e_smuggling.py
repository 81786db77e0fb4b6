"""SMTP smuggling: only <CRLF>.<CRLF> ends DATA (SPEC §4).

Each sequence below ends DATA in some lenient server; here each must stay
inside the message, so the "smuggled" second transaction is just text of the
first. With ``smtp.bare_newlines = "reject"`` the message with the bare CR
or LF is refused with 554 (naming the setting) and no job exists; with
"normalize" (the default) it is one 250, one job, and the smuggled lines are
text in its raw. Either way
the smuggled MAIL/RCPT/DATA never run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from .trismtp_e2e import Daemon, launcher, queued_id

pytestmark = pytest.mark.e2e

ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]
SMUGGLED = (
    b"MAIL FROM:<evil@x>\r\n"
    b"RCPT TO:<victim@y>\r\n"
    b"DATA\r\n"
    b"smuggled\r\n"
)  # fmt: skip


@pytest.fixture(scope="module", params=["reject", "normalize", "default"])
def smuggling_daemon(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Daemon]:
    """One daemon per bare_newlines mode for every sequence: these tests only add jobs.

    "default" leaves the setting out: it must behave as "normalize".
    """
    smtp = {} if request.param == "default" else {"bare_newlines": request.param}
    with launcher(tmp_path_factory.mktemp("smuggling")) as launch:
        yield launch.daemon({"smtp": smtp})


@pytest.mark.parametrize(
    "ending", ENDINGS, ids=[e.decode().encode("unicode_escape").decode() for e in ENDINGS]
)
def test_bare_cr_or_lf_dot_does_not_end_data(smuggling_daemon: Daemon, ending: bytes) -> None:
    daemon = smuggling_daemon
    before = {job.id for job in daemon.jobs()}
    body = (
        b"From: <sender@example.org>\r\n"
        b"To: <rcpt@example.com>\r\n"
        b"Subject: smuggling\r\n"
        b"\r\n"
        b"innocent text" + ending + SMUGGLED
    )
    with daemon.connect() as conn:
        conn.start()
        conn.transaction("sender@example.org", ["rcpt@example.com"])
        conn.send(body + b"\r\n.\r\nQUIT\r\n")
        replies = [conn.reply()]
        while replies[-1].code != 221:
            replies.append(conn.reply())
        conn.wait_closed()

    codes = [reply.code for reply in replies]
    if daemon.settings["smtp"].get("bare_newlines") == "reject":
        assert codes == [554, 221], f"replies after the DATA: {[str(r) for r in replies]}"
        assert replies[0].lines[0].startswith("5.6.0")
        assert "smtp.bare_newlines" in replies[0].lines[0], replies[0]
        assert [job for job in daemon.jobs() if job.id not in before] == []
        return
    assert codes == [250, 221], f"replies after the DATA: {[str(r) for r in replies]}"
    job_id = queued_id(replies[0])

    new = [job for job in daemon.jobs() if job.id not in before]
    assert [job.id for job in new] == [job_id], "exactly one new job, the one of the 250"
    payload = new[0].payload
    assert payload["envelope"]["mail_from"] == "sender@example.org"
    assert payload["envelope"]["allRecipients"] == ["rcpt@example.com"]
    raw = payload["message"]["raw"]
    assert "MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n" in raw
    # Not unstuffed, and every bare CR and LF made CRLF.
    normalized = re.sub("\r\n|\r|\n", "\r\n", ending.decode())
    assert "innocent text" + normalized + "MAIL FROM:<evil@x>" in raw


def test_lf_only_file_is_accepted_by_default(smuggling_daemon: Daemon) -> None:
    # What `curl --upload-file msg.eml` sends for a hand-written file: every
    # line ends in LF alone, then the CRLF.CRLF curl adds.
    daemon = smuggling_daemon
    body = b"From: <sender@example.org>\nTo: <rcpt@example.com>\nSubject: LF only\n\nhello\n"
    with daemon.connect() as conn:
        conn.start()
        conn.transaction("sender@example.org", ["rcpt@example.com"])
        conn.send(body + b"\r\n.\r\n")
        reply = conn.reply()
        conn.quit()
    if daemon.settings["smtp"].get("bare_newlines") == "reject":
        assert reply.last.startswith("554 5.6.0"), reply
        assert "smtp.bare_newlines" in reply.last, "the refusal names the setting"
        return
    job_id = queued_id(reply)
    [job] = [job for job in daemon.jobs() if job.id == job_id]
    assert job.payload["message"]["subject"] == "LF only"
    assert job.payload["message"]["raw"].startswith("From: <sender@example.org>\r\nTo: ")
