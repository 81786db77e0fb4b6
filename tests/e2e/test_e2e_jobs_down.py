"""The jobs store goes away and comes back (SPEC §1, §4).

While the pusher knows it has no destination (its connection closed and it
cannot reconnect), a new recipient gets ``451 4.3.0`` at once, before any
upload, and so does DATA in a transaction begun before the outage; as soon
as the store is back, ``250`` again; every 250 is stored exactly once. Run
against a jobs service (``trismtp jobs serve``) and a NATS server.

``jobs.push_timeout`` is long here, so that a refusal that comes before it
cannot be the push_timeout path in disguise.
"""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..nats.nats_server import NatsServer
from .trismtp_e2e import (
    Daemon,
    Launcher,
    Reply,
    SmtpConn,
    message,
    queued_id,
    stored_jobs,
    wait_until,
)

pytestmark = pytest.mark.e2e

PUSH_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 20.0


def send_data(port: int, subject: str) -> tuple[int, str]:
    """Send one message with smtplib: (code, text) of the reply that decided it,
    the RCPT's when it was refused, else the final one."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.e2e.test", timeout=30) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("sender@example.org")
        assert code == 250, (code, text)
        code, text = smtp.rcpt("rcpt@example.com")
        if code != 250:
            return code, f"{code} {text.decode()}"
        code, text = smtp.data(message(subject))
        return code, f"{code} {text.decode()}"


def refused_recipient(daemon: Daemon) -> tuple[Reply, float]:
    """A new session's RCPT reply while the store is down, and how long it took."""
    with daemon.connect() as conn:
        conn.start()
        conn.expect("MAIL FROM:<sender@example.org>", "250")
        started = time.monotonic()
        reply = conn.command("RCPT TO:<rcpt@example.com>")
        elapsed = time.monotonic() - started
        # The client had nothing to upload: DATA has no recipient to go to.
        conn.expect("DATA", "503")
        conn.quit()
    return reply, elapsed


class Outage:
    """Sends through an outage and a recovery, counting what was accepted."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.accepted: list[str] = []
        self.refusals = 0

    def accept(self, subject: str) -> None:
        code, reply = send_data(self.daemon.smtp_port, subject)
        assert code == 250, reply
        self.accepted.append(queued_id(reply))

    def during(self, early: SmtpConn) -> None:
        """The store is known to be down: 451s at once, before any upload."""
        reply, elapsed = refused_recipient(self.daemon)
        assert reply.last.startswith("451 4.3.0 "), reply
        assert elapsed < PUSH_TIMEOUT / 2, f"RCPT answered after {elapsed:.1f} s"
        print(f"RCPT refused with 451 in {elapsed * 1000:.1f} ms (push_timeout {PUSH_TIMEOUT:g} s)")
        self.refusals += 1
        # A transaction whose recipient was accepted before the outage:
        # DATA is refused instead of 354, so the message is not uploaded.
        early.expect("DATA", "451 4.3.0 ")
        early.quit()
        assert self.daemon.running, "the daemon must survive its jobs store"

    def recovered(self) -> float:
        """Retry as an MTA would until 250; return how long it took."""
        started = time.monotonic()

        def delivered() -> str | None:
            code, reply = send_data(self.daemon.smtp_port, "after")
            assert code in (250, 451), reply
            if code == 451:
                self.refusals += 1
                return None
            return queued_id(reply)

        self.accepted.append(
            wait_until(
                delivered,
                RECOVERY_TIMEOUT,
                "a 250 after the store came back",
                detail=self.daemon.log_tail,
            )
        )
        took = time.monotonic() - started
        self.accept("after, steady")
        return took


def open_transaction(daemon: Daemon) -> SmtpConn:
    """A session with MAIL and RCPT accepted, DATA not sent yet."""
    conn = daemon.connect()
    conn.start()
    conn.expect("MAIL FROM:<sender@example.org>", "250")
    conn.expect("RCPT TO:<rcpt@example.com>", "250")
    return conn


def test_jobs_service_down_refuses_before_the_upload_and_recovers(launch: Launcher) -> None:
    service = launch.jobs_service()
    daemon = launch.daemon(
        {"jobs": {"url": service.url, "push_timeout": PUSH_TIMEOUT}},
        jobs_port=service.port,
        database=service.database,
        workdir=service.workdir,
    )
    daemon.wait_for_log("connected to the jobs service")
    outage = Outage(daemon)
    outage.accept("before")

    with open_transaction(daemon) as early:
        # SIGKILL: no goodbye, but the connection closes with the process.
        service.kill()
        daemon.wait_for_log("cannot connect to the jobs service")
        outage.during(early)
    log = daemon.log_text()
    assert "RCPT refused with 451: no connection to the jobs service" in log
    # The cause in words, the address once.
    assert f"cannot connect to ws://127.0.0.1:{service.port}/rpc: Connection refused\n" in log

    service.start()
    took = outage.recovered()
    print(f"first 250 {took:.2f} s after the jobs service listened again")

    accepted = outage.accepted
    assert len(set(accepted)) == len(accepted), accepted
    stored = Counter(job.id for job in stored_jobs(service.database))
    assert {job_id: stored[job_id] for job_id in accepted} == dict.fromkeys(accepted, 1)
    # A 451 may at worst leave one job behind (acked after the client gave up,
    # docs/architecture.md); nothing else may appear.
    assert len(stored) - len(accepted) <= outage.refusals, stored


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    workdir = tmp_path / "nats"
    workdir.mkdir()
    server = NatsServer(workdir)
    try:
        yield server.start()
    finally:
        server.stop()


def test_nats_down_refuses_before_the_upload_and_recovers(
    nats: NatsServer, launch: Launcher
) -> None:
    daemon = launch.daemon({"jobs": {"url": nats.url, "push_timeout": PUSH_TIMEOUT}})
    daemon.wait_for_log("connected to the NATS server")
    outage = Outage(daemon)
    outage.accept("before")

    with open_transaction(daemon) as early:
        nats.kill()
        daemon.wait_for_log("cannot connect to the NATS server")
        outage.during(early)

    nats.start()  # same ports, same JetStream store
    took = outage.recovered()
    print(f"first 250 {took:.2f} s after nats-server listened again")

    # The pusher's lines name NATS, not a jobs service it does not talk to.
    pusher_lines = [line for line in daemon.log_text().splitlines() if "trismtp.pusher" in line]
    assert pusher_lines
    assert not [line for line in pusher_lines if "jobs service" in line], pusher_lines
