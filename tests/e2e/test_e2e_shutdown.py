"""Graceful shutdown on SIGTERM (SPEC §1, §4; daemon.py, smtp/server.py)."""

from __future__ import annotations

import signal
import time

import pytest

from .trismtp_e2e import (
    Launcher,
    SmtpConn,
    connection_refused,
    queued_id,
    run_cli,
    stored_jobs,
    wait_until,
)

pytestmark = pytest.mark.e2e

LINE = b"0123456789" * 9 + b"\r\n"  # 92 octets, well under the 1000 limit


def expect_shutdown_421(conn: SmtpConn) -> None:
    """The session ends with 421 4.3.2: unsolicited, or as the reply to NOOP."""
    try:
        reply = conn.reply(timeout=2)
    except AssertionError:
        # Nothing unsolicited came (yet): a new command must get the 421.
        reply = conn.command("NOOP")
    assert reply.last.startswith("421 4.3.2"), f"expected 421 4.3.2, got {reply}"
    rest = conn.wait_closed(timeout=10)
    assert rest == b"", f"data after the 421: {rest!r}"


def test_upload_in_progress_finishes_after_sigterm_and_survives_restart(
    launch: Launcher,
) -> None:
    daemon = launch.daemon()
    body = b"Subject: in flight\r\n\r\n" + LINE * 4000  # ~370 KB
    half = len(body) // 2

    with daemon.connect() as conn:
        conn.start()
        conn.transaction()
        conn.send(body[:half])

        daemon.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        daemon.wait_for_log("SMTP stopped accepting")
        # The listener is closed: new connections are refused.
        wait_until(lambda: connection_refused(daemon.smtp_port), 5, "new connections to be refused")
        assert daemon.running, "the daemon quit while an upload was in progress"

        conn.send(body[half:] + b".\r\n")
        reply = conn.reply()
        job_id = queued_id(reply)
        expect_shutdown_421(conn)

    assert daemon.wait_exit(daemon.grace + 1) == 0
    assert time.monotonic() - stopped_at < daemon.grace + 1
    log = daemon.log_text()
    assert f"queued as {job_id}" in log
    assert "Traceback" not in log

    # Restart on the same database: the job is there.
    daemon.start()
    assert [job.id for job in daemon.jobs()] == [job_id]
    job = daemon.jobs()[0]
    assert job.payload["size"] == len(body)
    assert job.payload["message"]["raw"] == body.decode()
    peek = run_cli("jobs", "peek", "--json", "--url", daemon.url, cwd=daemon.workdir, check=True)
    assert job_id in peek.stdout


def test_sigterm_closes_idle_sessions_with_421_and_refuses_new_ones(launch: Launcher) -> None:
    daemon = launch.daemon()
    with daemon.connect() as idle, daemon.connect() as uploading:
        idle.start()
        uploading.start()
        uploading.transaction()
        uploading.send(b"Subject: abandoned\r\n\r\nnot finished\r\n")

        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("SMTP stopped accepting")
        expect_shutdown_421(idle)
        wait_until(lambda: connection_refused(daemon.smtp_port), 5, "new connections to be refused")
        # The session inside DATA is not cut off; once its message is
        # answered it is told 421 4.3.2 too.
        assert not uploading.eof
        uploading.send(b".\r\n")
        queued_id(uploading.reply())
        expect_shutdown_421(uploading)

    assert daemon.wait_exit(daemon.grace + 1) == 0
    assert len(stored_jobs(daemon.database)) == 1


def test_sessions_still_open_after_grace_are_cut_off(launch: Launcher) -> None:
    daemon = launch.daemon({"shutdown": {"grace": 1}})
    with daemon.connect() as slow:
        slow.start()
        slow.transaction()
        slow.send(b"Subject: too slow\r\n\r\nnever finished\r\n")
        daemon.signal(signal.SIGTERM)
        started = time.monotonic()
        # No dot ever comes: the grace period ends the session and the daemon.
        assert daemon.wait_exit(10) == 0
        assert time.monotonic() - started < 1 + 3
        slow.wait_closed(timeout=5)
    assert stored_jobs(daemon.database) == []


def test_idle_daemon_stops_promptly_on_sigterm(launch: Launcher) -> None:
    daemon = launch.daemon()
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(daemon.grace + 1) == 0
    elapsed = time.monotonic() - started
    # Nothing to wait for: well under the 5 s grace (a 2 s stall here was a bug
    # in closing the pusher's WebSocket).
    assert elapsed < 1.5, f"an idle daemon took {elapsed:.2f} s to stop"
    assert daemon.log_text().rstrip().endswith("trismtp.daemon: stopped")


def test_second_signal_stops_at_once_with_status_1(launch: Launcher) -> None:
    daemon = launch.daemon({"shutdown": {"grace": 30}})
    with daemon.connect() as conn:
        conn.start()
        conn.transaction()
        conn.send(b"Subject: pending\r\n\r\nstill uploading\r\n")
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("SMTP stopped accepting")
        assert daemon.running
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(5) == 1
    assert "stopping at once" in daemon.log_text()
