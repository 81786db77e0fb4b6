"""Metrics, health checks and structured logs of the real daemon ([metrics], [log]).

The daemon serves ``/metrics``, ``/healthz`` and ``/readyz`` on
``metrics.listen``; these tests read them as Prometheus and a load balancer
would, and read the JSON log as a log shipper would.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import signal
import smtplib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from .trismtp_e2e import (
    HOST,
    Daemon,
    Launcher,
    add_user,
    client_tls_context,
    connection_refused,
    free_port,
    message,
    queued_id,
    run_cli,
    wait_until,
    write_tls_files,
)

pytestmark = pytest.mark.e2e

PASSWORD = "Heron-Turnip-5820-obs"
WRONG_PASSWORD = "Wrong-Marble-1147-obs"
WAIT = 20.0


# -- HTTP and Prometheus --------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET *path* from the metrics endpoint: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.getheader("Connection") == "close"
        return response.status, response.read().decode()
    finally:
        conn.close()


class Scrape:
    """One scrape of ``/metrics``, parsed as Prometheus parses it."""

    def __init__(self, port: int) -> None:
        status, text = http_get(port, "/metrics")
        assert status == 200, text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.help: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.help[family.name] = family.documentation
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels}"
        return self.samples[key]


def ready(port: int) -> tuple[int, str]:
    return http_get(port, "/readyz")


def metrics_daemon(
    launch: Launcher, settings: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any
) -> tuple[Daemon, int]:
    """A started daemon with ``metrics.listen`` on a free port; (daemon, that port)."""
    port = free_port()
    merged = {**(settings or {}), "metrics": {"listen": f"{HOST}:{port}"}}
    daemon = launch.daemon(merged, **kwargs)
    return daemon, port


def send(port: int, subject: str) -> bytes:
    """One message through smtplib, on a connection of its own; returns it."""
    body = message(subject)
    with smtplib.SMTP(HOST, port, local_hostname="client.e2e.test", timeout=15) as smtp:
        assert smtp.sendmail("sender@example.org", ["rcpt@example.com"], body) == {}
    return body


# -- metrics and health ---------------------------------------------------------


def test_health_readiness_and_message_counters(launch: Launcher) -> None:
    # bare_newlines = reject: a refused message to count.
    daemon, port = metrics_daemon(launch, {"smtp": {"bare_newlines": "reject"}})
    assert http_get(port, "/healthz") == (200, "ok\n")
    wait_until(lambda: ready(port) == (200, "ready\n"), WAIT, "/readyz 200", detail=daemon.log_tail)
    assert http_get(port, "/nope")[0] == 404

    sent = [send(daemon.smtp_port, f"counted {n}") for n in range(3)]
    with daemon.connect() as conn:
        conn.start()
        conn.transaction()
        conn.send(b"Subject: bare\r\n\r\nbare\nLF\r\n.\r\n")
        reply = conn.reply()
        assert reply.code == 554, reply
        conn.quit()

    wait_until(lambda: Scrape(port)("trismtp_connections_open") == 0, WAIT, "the sessions to end")
    scrape = Scrape(port)
    assert scrape("trismtp_messages_total", code="250") == 3
    assert scrape("trismtp_messages_total", code="554") == 1
    assert scrape("trismtp_messages_total", code="451") == 0
    assert scrape("trismtp_connections_total", listener="plain") == 4
    assert scrape("trismtp_connections_total", listener="implicit_tls") == 0
    assert scrape("trismtp_accepted_message_bytes_total") == sum(len(body) for body in sent)
    assert scrape("trismtp_jobs_pushed_total") == 3
    assert scrape("trismtp_push_batch_size_sum") == 3
    assert scrape("trismtp_push_latency_seconds_count") == 3
    assert scrape("trismtp_pusher_queue_depth") == 0
    assert scrape("trismtp_pusher_connected") == 1
    assert scrape("trismtp_pusher_reconnects_total") == 0
    for reason in ("max_connections", "per_address", "rate", "proxy_header"):
        assert scrape("trismtp_connections_refused_total", reason=reason) == 0
    for reason in ("errors", "slow_data", "timeout", "http", "auth_failures"):
        assert scrape("trismtp_sessions_closed_for_abuse_total", reason=reason) == 0
    assert all(name.startswith("trismtp_") for name, _ in scrape.samples)
    assert all(scrape.help.values()), "every metric has a help text"
    assert len(daemon.jobs()) == 3


def test_readyz_follows_the_jobs_service(launch: Launcher) -> None:
    """Killed jobs service: 503 naming the jobs connection; back: 200, without
    any mail having to arrive first."""
    service = launch.jobs_service()
    daemon, port = metrics_daemon(
        launch,
        {"jobs": {"url": service.url}},
        jobs_port=service.port,
        database=service.database,
        workdir=service.workdir,
    )
    wait_until(lambda: ready(port)[0] == 200, WAIT, "/readyz 200", detail=daemon.log_tail)

    service.kill()

    def not_ready() -> str | None:
        status, body = ready(port)
        return body if status == 503 else None

    body = wait_until(not_ready, WAIT, "/readyz 503", detail=daemon.log_tail)
    assert body.startswith("not ready: no connection to the jobs service"), body
    assert body.index("\n") == len(body) - 1, f"one line: {body!r}"
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert Scrape(port)("trismtp_pusher_connected") == 0

    service.start()
    wait_until(lambda: ready(port) == (200, "ready\n"), WAIT, "/readyz 200 again")
    scrape = Scrape(port)
    assert scrape("trismtp_pusher_connected") == 1
    assert scrape("trismtp_pusher_reconnects_total") >= 1
    send(daemon.smtp_port, "after the restart")
    assert Scrape(port)("trismtp_messages_total", code="250") == 1


def test_readyz_is_503_while_draining_and_the_endpoint_stops_last(launch: Launcher) -> None:
    daemon, port = metrics_daemon(launch)
    wait_until(lambda: ready(port)[0] == 200, WAIT, "/readyz 200", detail=daemon.log_tail)
    with daemon.connect() as conn:
        conn.start()
        conn.transaction()
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("SMTP stopped accepting")
        # Draining: not ready for new mail, alive, still counting.
        assert ready(port) == (503, "not ready: shutting down\n")
        assert http_get(port, "/healthz") == (200, "ok\n")
        assert Scrape(port)("trismtp_connections_open") == 1
        conn.send(message("while draining") + b".\r\n")
        queued_id(conn.reply())
        assert conn.reply().code == 421
    assert daemon.wait_exit(daemon.grace + 10) == 0
    assert connection_refused(port)
    log = daemon.log_text()
    assert log.index("pusher flushed") < log.rindex("trismtp.daemon: stopped")


# -- logs -------------------------------------------------------------------------


def secret_forms(password: str) -> list[str]:
    """The password as it could leak: plain, base64, and in a SASL PLAIN response."""
    b64 = base64.b64encode(password.encode()).decode()
    plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    return [password, b64, plain]


def test_json_logs_tag_each_session_and_hold_no_secret(launch: Launcher, tmp_path: Path) -> None:
    """Debug logging, STARTTLS and AUTH (a wrong password, then the right one):
    every log line is one JSON object, every line of the session has its id
    and address, and neither password is anywhere in the output."""
    ca = trustme.CA()
    cert, key = write_tls_files(ca, tmp_path)
    users = tmp_path / "users.passwd"
    add_user(users, "alice", PASSWORD)
    settings: dict[str, dict[str, Any]] = {
        "smtp": {
            "tls": {"certificate": str(cert), "key": str(key)},
            "auth": {"users_file": str(users), "failure_delay": 0.1},
        },
        "log": {"level": "debug", "format": "json"},
    }
    daemon, port = metrics_daemon(launch, settings)
    with smtplib.SMTP(HOST, daemon.smtp_port, local_hostname="client.e2e.test", timeout=15) as smtp:
        smtp.starttls(context=client_tls_context(ca))
        smtp.ehlo("client.e2e.test")
        smtp.user, smtp.password = "alice", WRONG_PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)
        smtp.user, smtp.password = "alice", PASSWORD
        assert smtp.auth("LOGIN", smtp.auth_login)[0] == 235
        assert smtp.sock is not None
        remote = "{}:{}".format(*smtp.sock.getsockname()[:2])
        assert smtp.sendmail("sender@example.org", ["rcpt@example.com"], message("json")) == {}
    daemon.wait_for_log("authenticated as 'alice'")
    scrape = Scrape(port)
    assert scrape("trismtp_tls_handshakes_total", outcome="ok", version="TLSv1.3") == 1
    assert scrape("trismtp_auth_attempts_total", mechanism="PLAIN", outcome="failure") == 1
    assert scrape("trismtp_auth_attempts_total", mechanism="LOGIN", outcome="success") == 1
    daemon.stop()

    text = daemon.log_text()
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries), "one JSON object a line"
    outputs = [text, *(p.read_text(errors="replace") for p in daemon.workdir.glob("*.out"))]
    for output in outputs:
        for secret in (*secret_forms(PASSWORD), *secret_forms(WRONG_PASSWORD)):
            assert secret not in output

    ours = [entry for entry in entries if entry.get("remote") == remote]
    messages = [entry["message"] for entry in ours]
    assert len({entry["session"] for entry in ours}) == 1, ours
    [session_id] = {entry["session"] for entry in ours}
    assert isinstance(session_id, int)
    # The whole session: connect, TLS, the failed and the good AUTH, the message.
    for words in ("connected", "TLS TLSv1.3", "AUTH PLAIN failed", "authenticated", "queued as"):
        assert any(words in text for text in messages), (words, messages)
    assert all(e["remote"] == remote for e in entries if e.get("session") == session_id)
    # Lines outside a session carry neither field.
    outside = [e for e in entries if "session" not in e]
    assert any("SMTP listening on" in e["message"] for e in outside)
    assert all("remote" not in e for e in outside)


# -- trismtp top ------------------------------------------------------------------


def test_top_shows_the_live_rate(launch: Launcher) -> None:
    daemon, _ = metrics_daemon(launch)
    stop = threading.Event()
    sent: list[int] = []

    def keep_sending() -> None:
        while not stop.is_set():
            send(daemon.smtp_port, f"top {len(sent)}")
            sent.append(1)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        # The sender runs before top's first read and after its last one.
        wait_until(lambda: len(sent) >= 2 or None, WAIT, "the first messages")
        result = run_cli(
            "top", "--config", str(daemon.config), "--once", "--interval", "1.5",
            cwd=daemon.workdir,
        )  # fmt: skip
    finally:
        stop.set()
        sender.join(30)
    assert result.returncode == 0, result.stderr
    screen = result.stdout
    assert "pusher" in screen
    assert "connected" in screen
    rate = re.search(r"250/s\s+([\d.,]+)", screen)
    assert rate is not None, screen
    assert float(rate.group(1).replace(",", "")) > 0
    assert re.search(r"errors\s+none", screen), screen


def test_top_without_metrics_says_what_to_set(launch: Launcher) -> None:
    daemon = launch.daemon()
    result = run_cli("top", "--config", str(daemon.config), "--once", cwd=daemon.workdir)
    assert result.returncode == 2
    assert "[metrics] listen" in result.stderr
