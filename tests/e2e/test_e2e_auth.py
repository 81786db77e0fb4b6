"""SMTP AUTH (PLAIN, LOGIN) on the real server against a users file ([smtp.auth]).

The users files are written by ``trismtp passwd``. Every test that sends a
password also checks that it is nowhere in the daemon's files: not in the
job's JSON, not in the database, not in the debug log.
"""

from __future__ import annotations

import base64
import signal
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from .trismtp_e2e import (
    CLI_TIMEOUT,
    Daemon,
    Launcher,
    SmtpConn,
    add_user,
    client_tls_context,
    free_port,
    launcher,
    message,
    one_line_error,
    queued_id,
    require_swaks_tls,
    serve_with_smtp,
    starttls,
    write_tls_files,
)

pytestmark = pytest.mark.e2e

PASSWORD = "Zebra-Lantern-7391-e2e"
BOB_PASSWORD = "Bob-Quartz-0462-e2e"
FAILURE_DELAY = 0.2


def plain(username: str, password: str) -> str:
    """A SASL PLAIN response: base64 of ``NUL username NUL password``."""
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_forms(password: str) -> list[bytes]:
    """The password as it could leak: plain, and base64 alone or in a PLAIN response."""
    forms = [password, b64(password), plain("alice", password), plain("bob", password)]
    return [form.encode() for form in forms]


def assert_secret_nowhere(daemon: Daemon, password: str) -> None:
    """No file the daemon wrote (log, stdout, database, WAL) holds *password*."""
    files = [path for path in daemon.workdir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".log" for path in files)
    for job in daemon.jobs():
        for form in secret_forms(password):
            assert form.decode() not in job.payload_text, f"password in job {job.id}"
    for path in files:
        data = path.read_bytes()
        for form in secret_forms(password):
            assert form not in data, f"password ({form!r}) in {path}"


@dataclass
class AuthDaemon:
    daemon: Daemon
    users: Path
    context: ssl.SSLContext
    ca_file: Path
    implicit_port: int


def auth_settings(users: Path, **auth: object) -> dict[str, object]:
    return {
        "users_file": str(users),
        "failure_delay": FAILURE_DELAY,
        "max_failures": 3,
        **auth,
    }


def users_file(directory: Path) -> Path:
    users = directory / "users.passwd"
    add_user(users, "alice", PASSWORD)
    return users


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthDaemon]:
    """STARTTLS, AUTH required, not offered without TLS (the defaults)."""
    workdir = tmp_path_factory.mktemp("auth-tls")
    ca = trustme.CA()
    cert, key = write_tls_files(ca, workdir)
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    users = users_file(workdir)
    implicit_port = free_port()
    settings = {
        "smtp": {
            "tls": {
                "certificate": str(cert),
                "key": str(key),
                "implicit_listen": [f"127.0.0.1:{implicit_port}"],
            },
            "auth": auth_settings(users, required=True),
        }
    }
    with launcher(workdir) as launch:
        daemon = launch.daemon(settings)
        yield AuthDaemon(daemon, users, client_tls_context(ca), ca_file, implicit_port)


@pytest.fixture(scope="module")
def cleartext(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """No TLS, allow_without_tls = true: the SASL exchanges on raw sockets."""
    workdir = tmp_path_factory.mktemp("auth-plain")
    users = users_file(workdir)
    settings = {"smtp": {"auth": auth_settings(users, allow_without_tls=True)}}
    with launcher(workdir) as launch:
        yield launch.daemon(settings)


def new_job(daemon: Daemon, job_id: str, before: set[str]) -> dict[str, Any]:
    new = [job for job in daemon.jobs() if job.id not in before]
    assert [job.id for job in new] == [job_id], "exactly one new job, the one of the 250"
    return new[0].payload


def deliver(conn: SmtpConn) -> str:
    """MAIL, RCPT, DATA and a small message; the job id of the 250."""
    conn.transaction()
    conn.send(message("auth") + b".\r\n")
    return queued_id(conn.reply())


def keywords(ehlo: Any) -> list[str]:
    return [line.upper() for line in ehlo.lines[1:]]


def test_auth_is_offered_only_after_starttls(secured: AuthDaemon) -> None:
    with secured.daemon.connect() as conn:
        ehlo = conn.start()
        assert "STARTTLS" in keywords(ehlo), ehlo
        assert not [k for k in keywords(ehlo) if k.startswith("AUTH")], ehlo
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "538 5.7.11")
        conn.expect("AUTH LOGIN", "538 5.7.11")
        conn.expect("MAIL FROM:<a@example.org>", "530 5.7.0")
        starttls(conn, secured.context)
        ehlo = conn.expect("EHLO client.e2e.test", "250")
        assert "AUTH PLAIN LOGIN" in keywords(ehlo), ehlo
        # auth.required: no mail before AUTH, even inside TLS.
        conn.expect("MAIL FROM:<a@example.org>", "530 5.7.0")
        conn.quit()
    assert_secret_nowhere(secured.daemon, PASSWORD)


def test_smtplib_plain_login_after_starttls_delivers(secured: AuthDaemon) -> None:
    daemon = secured.daemon
    before = {job.id for job in daemon.jobs()}
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=secured.context)
        smtp.ehlo("client.e2e.test")
        smtp.user, smtp.password = "alice", PASSWORD
        code, text = smtp.auth("PLAIN", smtp.auth_plain)
        assert (code, text.decode()) == (235, "2.7.0 Authentication successful")
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("rcpt@example.com")[0] == 250
        code, text = smtp.data(message("smtplib auth"))
    payload = new_job(daemon, queued_id(f"{code} {text.decode()}"), before)
    assert payload["authentication"] == {"mechanism": "PLAIN", "username": "alice"}
    assert payload["tls"]["version"] == "TLSv1.3"
    daemon.wait_for_log("authenticated as 'alice'")
    assert_secret_nowhere(daemon, PASSWORD)


def test_smtplib_login_picks_a_mechanism_and_delivers(secured: AuthDaemon) -> None:
    daemon = secured.daemon
    before = {job.id for job in daemon.jobs()}
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=secured.context)
        code, _ = smtp.login("alice", PASSWORD)
        assert code == 235
        refused = smtp.sendmail("sender@example.org", ["rcpt@example.com"], message("login()"))
        assert refused == {}
    new = [job for job in daemon.jobs() if job.id not in before]
    assert len(new) == 1
    assert new[0].payload["authentication"] == {"mechanism": "PLAIN", "username": "alice"}
    assert_secret_nowhere(daemon, PASSWORD)


def test_auth_over_implicit_tls(secured: AuthDaemon) -> None:
    daemon = secured.daemon
    before = {job.id for job in daemon.jobs()}
    with smtplib.SMTP_SSL(
        "127.0.0.1", secured.implicit_port, context=secured.context, timeout=10
    ) as smtp:
        smtp.ehlo("client.e2e.test")
        assert smtp.has_extn("auth")
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        smtp.user, smtp.password = "alice", PASSWORD
        code, _ = smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
        assert code == 235
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("rcpt@example.com")[0] == 250
        code, text = smtp.data(message("implicit auth"))
    payload = new_job(daemon, queued_id(f"{code} {text.decode()}"), before)
    assert payload["authentication"] == {"mechanism": "LOGIN", "username": "alice"}
    assert payload["tls"]["version"] == "TLSv1.3"
    assert_secret_nowhere(daemon, PASSWORD)


def test_swaks_auth_login_over_starttls_delivers(secured: AuthDaemon) -> None:
    swaks = require_swaks_tls()
    daemon = secured.daemon
    before = {job.id for job in daemon.jobs()}
    result = subprocess.run(
        [
            swaks, "--server", "127.0.0.1", "--port", str(daemon.smtp_port),
            "--from", "sender@example.org", "--to", "rcpt@example.com",
            "--tls", "--tls-verify", "--tls-ca-path", str(secured.ca_file),
            "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
            "--timeout", "20",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    queued = [line for line in result.stdout.splitlines() if "queued as" in line]
    assert len(queued) == 1, result.stdout
    payload = new_job(daemon, queued_id(queued[0].split("<~", 1)[-1].strip()), before)
    assert payload["authentication"] == {"mechanism": "LOGIN", "username": "alice"}
    assert_secret_nowhere(daemon, PASSWORD)


def test_plain_with_and_without_initial_response(cleartext: Daemon) -> None:
    before = {job.id for job in cleartext.jobs()}
    with cleartext.connect() as conn:
        ehlo = conn.start()
        assert "AUTH PLAIN LOGIN" in keywords(ehlo), ehlo
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "503")  # already authenticated
        first = deliver(conn)
        conn.quit()
    with cleartext.connect() as conn:
        conn.start()
        conn.send("AUTH PLAIN\r\n")
        challenge = conn.reply()
        assert (challenge.code, challenge.lines) == (334, ("",)), challenge
        conn.expect(plain("alice", PASSWORD), "235 2.7.0")
        second = deliver(conn)
        conn.quit()
    new = [job for job in cleartext.jobs() if job.id not in before]
    assert [job.id for job in new] == [first, second]
    for job in new:
        assert job.payload["authentication"] == {"mechanism": "PLAIN", "username": "alice"}
        assert job.payload["tls"] is None
    assert_secret_nowhere(cleartext, PASSWORD)


def test_login_exchange_delivers(cleartext: Daemon) -> None:
    before = {job.id for job in cleartext.jobs()}
    with cleartext.connect() as conn:
        conn.start()
        conn.expect("AUTH LOGIN", "334 VXNlcm5hbWU6")  # "Username:"
        conn.expect(b64("alice"), "334 UGFzc3dvcmQ6")  # "Password:"
        conn.expect(b64(PASSWORD), "235 2.7.0")
        first = deliver(conn)
        conn.quit()
    with cleartext.connect() as conn:
        conn.start()
        # With the username as initial response, only the password is asked.
        conn.expect(f"AUTH LOGIN {b64('alice')}", "334 UGFzc3dvcmQ6")
        conn.expect(b64(PASSWORD), "235 2.7.0")
        second = deliver(conn)
        conn.quit()
    new = [job for job in cleartext.jobs() if job.id not in before]
    assert [job.id for job in new] == [first, second]
    for job in new:
        assert job.payload["authentication"] == {"mechanism": "LOGIN", "username": "alice"}
    assert_secret_nowhere(cleartext, PASSWORD)


def test_cancel_and_bad_base64_get_501(cleartext: Daemon) -> None:
    with cleartext.connect() as conn:
        conn.start()
        conn.expect("AUTH PLAIN", "334")
        conn.expect("*", "501")
        conn.expect("AUTH LOGIN", "334 VXNlcm5hbWU6")
        conn.expect(b64("alice"), "334 UGFzc3dvcmQ6")
        conn.expect("*", "501")
        conn.expect("AUTH PLAIN !!not*base64!!", "501")
        conn.expect("AUTH PLAIN", "334")
        conn.expect("%%%%", "501")
        conn.expect("AUTH LOGIN", "334")
        conn.expect("not base64 at all", "501")
        # None of these was a failed login: the exchange still works.
        conn.expect("NOOP", "250")
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        conn.quit()


def test_wrong_password_gets_535_after_the_failure_delay(cleartext: Daemon) -> None:
    before = {job.id for job in cleartext.jobs()}
    wrong = "Wrong-Guess-5512-e2e"
    with cleartext.connect() as conn:
        conn.start()
        for response in (plain("alice", wrong), plain("nobody", wrong)):
            started = time.monotonic()
            reply = conn.command(f"AUTH PLAIN {response}")
            waited = time.monotonic() - started
            assert reply.last == "535 5.7.8 Authentication credentials invalid", reply
            assert waited >= FAILURE_DELAY, f"535 after {waited:.3f} s"
        # Two failures are below max_failures = 3: the right password still works.
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        job_id = deliver(conn)
        conn.quit()
    assert new_job(cleartext, job_id, before)["authentication"]["username"] == "alice"
    cleartext.wait_for_log("AUTH PLAIN failed for 'nobody'")
    assert_secret_nowhere(cleartext, wrong)
    assert_secret_nowhere(cleartext, PASSWORD)


def test_three_failures_get_421_and_close(cleartext: Daemon) -> None:
    with cleartext.connect() as conn:
        conn.start()
        conn.expect(f"AUTH PLAIN {plain('alice', 'wrong-1')}", "535 5.7.8")
        conn.expect("AUTH LOGIN", "334")
        conn.expect(b64("alice"), "334")
        conn.expect(b64("wrong-2"), "535 5.7.8")
        conn.expect(f"AUTH PLAIN {plain('alice', 'wrong-3')}", "421 4.7.0")
        assert conn.wait_closed() == b""
    # Counted per connection: a new one starts afresh.
    with cleartext.connect() as conn:
        conn.start()
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        conn.quit()


def test_unauthenticated_mail_has_null_authentication(cleartext: Daemon) -> None:
    before = {job.id for job in cleartext.jobs()}
    with cleartext.connect() as conn:
        conn.start()
        job_id = deliver(conn)
        conn.quit()
    assert new_job(cleartext, job_id, before)["authentication"] is None


def test_tls_required_refuses_auth_before_starttls_with_530(
    launch: Launcher, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = write_tls_files(ca, tmp_path)
    settings = {
        "smtp": {
            "tls": {"certificate": str(cert), "key": str(key), "required": True},
            "auth": auth_settings(users_file(tmp_path), mechanisms=["PLAIN"]),
        }
    }
    daemon = launch.daemon(settings)
    with daemon.connect() as conn:
        ehlo = conn.start()
        assert not [k for k in keywords(ehlo) if k.startswith("AUTH")], ehlo
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "530 5.7.0")
        starttls(conn, client_tls_context(ca))
        ehlo = conn.expect("EHLO client.e2e.test", "250")
        assert [k for k in keywords(ehlo) if k.startswith("AUTH")] == ["AUTH PLAIN"], ehlo
        conn.expect("AUTH LOGIN", "504")  # not in auth.mechanisms
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        conn.quit()
    assert_secret_nowhere(daemon, PASSWORD)


def test_sighup_reloads_the_users_file(launch: Launcher, tmp_path: Path) -> None:
    users = users_file(tmp_path)
    daemon = launch.daemon({"smtp": {"auth": auth_settings(users, allow_without_tls=True)}})

    def login(username: str, password: str, expected: str) -> None:
        with daemon.connect() as conn:
            conn.start()
            conn.expect(f"AUTH PLAIN {plain(username, password)}", expected)
            conn.quit()

    login("bob", BOB_PASSWORD, "535 5.7.8")
    add_user(users, "bob", BOB_PASSWORD)
    login("bob", BOB_PASSWORD, "535 5.7.8")  # not before the reload
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("users file reloaded")
    login("bob", BOB_PASSWORD, "235 2.7.0")
    login("alice", PASSWORD, "235 2.7.0")

    # A broken file on reload is logged; the users loaded before stay.
    users.write_text("bob:not-a-hash\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("users file reload failed")
    login("bob", BOB_PASSWORD, "235 2.7.0")
    assert_secret_nowhere(daemon, BOB_PASSWORD)
    assert_secret_nowhere(daemon, PASSWORD)


def test_command_timeout_starts_at_the_535_not_at_the_auth_command(
    launch: Launcher, tmp_path: Path
) -> None:
    """The failure delay is the server's time, not the client's: after the 535 a
    client has a whole command_timeout for its next command."""
    users = users_file(tmp_path)
    settings = {
        "smtp": {
            "command_timeout": 1,
            "auth": auth_settings(users, allow_without_tls=True, failure_delay=1.5),
        }
    }
    daemon = launch.daemon(settings)
    with daemon.connect() as conn:
        conn.start()
        conn.expect(f"AUTH PLAIN {plain('alice', 'wrong')}", "535 5.7.8")
        # At once, well within command_timeout of the 535.
        conn.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", "235 2.7.0")
        conn.quit()


def test_missing_users_file_at_start_exits_2_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-users.passwd"
    result = serve_with_smtp(
        tmp_path, {"auth": {"users_file": str(missing), "allow_without_tls": True}}
    )
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "smtp.auth.users_file" in line, line
    assert str(missing) in line, line
