"""``smtp.workers``: several SMTP processes behind one daemon (trismtp/workers.py).

What a user of ``workers = 2`` notices: mail is accepted by both processes
and every 250 is a stored job; ``/metrics`` counts the whole daemon; SIGTERM
lets an upload on a secondary worker finish and stops every process; a
worker that dies is started again; killing the primary takes the secondaries
with it; a count the memory budget cannot feed is refused at start.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from .trismtp_e2e import (
    HOST,
    Daemon,
    Launcher,
    SmtpConn,
    free_port,
    message,
    one_line_error,
    queued_id,
    run_cli,
    serve_with_smtp,
    wait_until,
)

pytestmark = pytest.mark.e2e

# With SO_REUSEPORT the kernel spreads connections over the two workers by a
# hash of the client's port: all 24 on one worker has odds of 2 in 2**24.
CONNECTIONS = 24
READY_RE = re.compile(r"worker 1 ready \(pid (\d+)\)")


def start_workers(launch: Launcher, *, flag: bool = False) -> tuple[Daemon, int]:
    """A daemon with 2 workers (``smtp.workers``, or ``--workers`` with *flag*) once
    both accept; and the secondary's PID."""
    daemon = launch.daemon(
        {
            "smtp": {} if flag else {"workers": 2},
            "metrics": {"listen": f"{HOST}:{free_port()}"},
        },
        start=False,
    )
    if flag:
        daemon.args += ["--workers", "2"]
    daemon.start()
    match = wait_until(
        lambda: READY_RE.search(daemon.log_text()), 20, "worker 1 to start", detail=daemon.log_tail
    )
    return daemon, int(match.group(1))


def serving_pid(conn: SmtpConn, server_port: int, pids: list[int]) -> int | None:
    """Which of *pids* holds the server side of *conn* (from /proc/net/tcp and /proc/PID/fd)."""
    client_port = conn.sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
                client_port
            ):
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def metric(daemon: Daemon, name: str) -> float:
    """One sample of the daemon's ``/metrics`` page."""
    url = f"http://{daemon.settings['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics:\n{page}")


def send_one(conn: SmtpConn, subject: str) -> str:
    """One message on an open, greeted session; returns its queued id."""
    conn.transaction()
    conn.send(message(subject) + b".\r\n")
    return queued_id(conn.reply())


def mail_through_both(daemon: Daemon, secondary: int, subject: str) -> set[str]:
    """CONNECTIONS sessions at once, which both workers serve; one message on each."""
    with ExitStack() as stack:
        conns = [stack.enter_context(daemon.connect()) for _ in range(CONNECTIONS)]
        for conn in conns:
            conn.start()
        pids = [daemon.pid, secondary]
        served = {serving_pid(conn, daemon.smtp_port, pids) for conn in conns}
        assert served == set(pids), f"sessions served by {served}, workers {pids}"
        ids = {send_one(conn, f"{subject}{i}") for i, conn in enumerate(conns)}
        for conn in conns:
            conn.quit()
    return ids


def test_both_workers_take_mail_and_every_250_is_stored(launch: Launcher) -> None:
    daemon, secondary = start_workers(launch)
    ids = mail_through_both(daemon, secondary, "n")
    assert len(ids) == CONNECTIONS
    assert {job.id for job in daemon.jobs()} == ids
    # /metrics adds the secondary's numbers to the primary's.
    assert metric(daemon, 'trismtp_messages_total{code="250"}') == CONNECTIONS
    assert metric(daemon, "trismtp_pusher_connected") == 2
    assert "[w1 s" in daemon.log_text(), "the secondary's session lines are tagged [w1 sN]"


def test_sigterm_lets_an_upload_on_a_secondary_finish(launch: Launcher) -> None:
    daemon, secondary = start_workers(launch)
    body = message("in flight", "0123456789" * 9 + "\r\n") * 200
    with ExitStack() as stack:
        conns = [stack.enter_context(daemon.connect()) for _ in range(CONNECTIONS)]
        for conn in conns:
            conn.start()
        conn = next(
            c
            for c in conns
            if serving_pid(c, daemon.smtp_port, [daemon.pid, secondary]) == secondary
        )
        conn.transaction()
        conn.send(body[:1000])
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("[w1] SMTP stopped accepting")
        assert not gone(secondary), "the secondary quit while an upload was in progress"
        conn.send(body[1000:] + b".\r\n")
        job_id = queued_id(conn.reply())
    assert daemon.wait_exit(daemon.grace + 10) == 0
    wait_until(lambda: gone(secondary), 10, "the secondary to exit")
    assert job_id in {job.id for job in daemon.jobs()}


def test_a_worker_that_dies_is_started_again(launch: Launcher) -> None:
    daemon, secondary = start_workers(launch)
    os.kill(secondary, signal.SIGKILL)
    daemon.wait_for_log("worker 1 exited unexpectedly")
    match = wait_until(
        lambda: [m for m in READY_RE.finditer(daemon.log_text()) if int(m.group(1)) != secondary],
        20,
        "worker 1 to start again",
        detail=daemon.log_tail,
    )
    again = int(match[0].group(1))
    ids = mail_through_both(daemon, again, "again")
    assert ids <= {job.id for job in daemon.jobs()}


def test_killing_the_primary_stops_the_secondaries(launch: Launcher) -> None:
    daemon, secondary = start_workers(launch, flag=True)
    daemon.kill()
    # Its stdin (the primary's pipe) ends: it stops as on SIGTERM.
    wait_until(lambda: gone(secondary), 15, "the secondary to exit after the primary died")


def test_workers_must_be_a_count_or_auto(tmp_path: Path) -> None:
    result = run_cli("config", cwd=tmp_path, env_extra={"TRISMTP_SMTP__WORKERS": "0"})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "TRISMTP_SMTP__WORKERS" in line, line
    assert '"auto"' in line, line
    flag = run_cli("serve", "--workers", "many", cwd=tmp_path)
    assert flag.returncode == 2
    assert 'argument --workers: must be "auto" or a whole number' in flag.stderr


def test_more_workers_than_the_memory_budget_feeds_is_refused(tmp_path: Path) -> None:
    # The default budget (600 MiB) over 3 workers leaves 200 MiB each, less
    # than one 25 MiB message needs.
    result = serve_with_smtp(tmp_path, {"workers": 3})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "workers = 3" in line, line
    assert "smtp.memory_budget" in line, line
    # A budget that feeds them is fine: `config` shows the effective count.
    ok = run_cli(
        "config",
        cwd=tmp_path,
        env_extra={"TRISMTP_SMTP__WORKERS": "3", "TRISMTP_SMTP__MEMORY_BUDGET": str(3 << 30)},
    )
    assert ok.returncode == 0, ok.stderr
