"""Limits and pipelining on the real server (SPEC §3, §4)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .trismtp_e2e import Daemon, Launcher, launcher, queued_id

pytestmark = pytest.mark.e2e

MAX_SIZE = 1000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """max_connections = 2, max_message_size = 1000, max_recipients = 3.

    Every test here ends its sessions with QUIT and waits for the server's
    close, so the next test starts with no session open.
    """
    settings = {"smtp": {"max_connections": 2, "max_message_size": MAX_SIZE, "max_recipients": 3}}
    with launcher(tmp_path_factory.mktemp("limits")) as launch:
        yield launch.daemon(settings)


def test_third_concurrent_connection_gets_421_4_7_0(limited: Daemon) -> None:
    with limited.connect() as first, limited.connect() as second:
        first.start()
        second.start()
        with limited.connect() as third:
            reply = third.reply()
            assert reply.last.startswith("421 4.7.0"), f"third connection got {reply}"
            assert third.wait_closed() == b""
        # The two admitted sessions are unaffected.
        first.expect("NOOP", "250")
        second.expect("NOOP", "250")
        first.quit()
        # One slot is free again.
        with limited.connect() as again:
            again.start()
            again.quit()
        second.quit()


def test_ehlo_advertises_size_and_declared_size_over_limit_gets_552(limited: Daemon) -> None:
    with limited.connect() as conn:
        ehlo = conn.start()
        keywords = [line.upper() for line in ehlo.lines[1:]]
        assert f"SIZE {MAX_SIZE}" in keywords, ehlo
        for keyword in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
            assert keyword in keywords, ehlo
        conn.expect(f"MAIL FROM:<a@b.example> SIZE={MAX_SIZE * 5}", "552 5.3.4")
        # Within the limit is fine.
        conn.expect(f"MAIL FROM:<a@b.example> SIZE={MAX_SIZE}", "250")
        conn.quit()


def test_body_over_limit_gets_552_after_the_dot_and_no_job(limited: Daemon) -> None:
    before = len(limited.jobs())
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: too big\r\n\r\n" + line * 64  # ~5 KB, in legal 80-octet lines
    with limited.connect() as conn:
        conn.start()
        conn.transaction()
        conn.send(body + b".\r\n")
        reply = conn.reply()
        assert reply.last.startswith("552 5.3.4"), reply
        # The session goes on: a message within the limit is accepted.
        conn.transaction()
        conn.send(b"Subject: small\r\n\r\nsmall\r\n.\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    assert [job.id for job in limited.jobs()[before:]] == [job_id]


def test_recipients_over_limit_get_452(limited: Daemon) -> None:
    with limited.connect() as conn:
        conn.start()
        conn.expect("MAIL FROM:<a@b.example>", "250")
        for n in range(3):
            conn.expect(f"RCPT TO:<r{n}@example.com>", "250")
        conn.expect("RCPT TO:<r3@example.com>", "452 4.5.3")
        conn.quit()


def test_pipelined_commands_are_answered_in_order(limited: Daemon) -> None:
    before = len(limited.jobs())
    with limited.connect() as conn:
        conn.greeting()
        conn.send(
            b"EHLO pipe.e2e.test\r\n"
            b"MAIL FROM:<a@b.example>\r\n"
            b"RCPT TO:<ok@example.com>\r\n"
            b"RCPT TO:<unclosed@example.com\r\n"
            b"RCPT TO:<ok2@example.com>\r\n"
            b"DATA\r\n"
        )
        replies = conn.replies(6)
        assert [r.code for r in replies] == [250, 250, 250, 501, 250, 354], [
            str(r) for r in replies
        ]
        assert replies[0].lines[0].startswith("localhost"), replies[0]
        assert replies[3].last.startswith("501 5.5.4"), replies[3]
        conn.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        job_id = queued_id(conn.reply())
        assert conn.reply().code == 250  # NOOP
        assert conn.reply().code == 221  # QUIT
        assert conn.wait_closed() == b""
    new = limited.jobs()[before:]
    assert [job.id for job in new] == [job_id]
    assert new[0].payload["envelope"]["allRecipients"] == ["ok@example.com", "ok2@example.com"]
    assert new[0].payload["envelope"]["helo"] == "pipe.e2e.test"


def test_idle_connection_gets_421_4_4_2_after_command_timeout(launch: Launcher) -> None:
    daemon = launch.daemon({"smtp": {"command_timeout": 1}})
    with daemon.connect() as conn:
        conn.start()
        started = time.monotonic()
        # Say nothing: within a bounded wait the server gives up on us.
        reply = conn.reply(timeout=10)
        waited = time.monotonic() - started
        assert reply.last.startswith("421 4.4.2"), reply
        assert waited >= 0.9, f"timed out after {waited:.2f} s, command_timeout is 1 s"
        assert conn.wait_closed() == b""
