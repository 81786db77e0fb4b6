"""STARTTLS and implicit TLS on the real server, with real clients ([smtp.tls]).

Certificates are made at run time with trustme; every client trusts only the
test CA, so a handshake that succeeds has also verified the certificate.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
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
    client_tls_context,
    free_port,
    launcher,
    message,
    one_line_error,
    queued_id,
    require_swaks_tls,
    require_tool,
    serve_with_smtp,
    starttls,
    wrap_tls,
    write_tls_files,
)

pytestmark = pytest.mark.e2e

COMMON_NAME = "trismtp-e2e-server"


@dataclass
class TlsDaemon:
    daemon: Daemon
    implicit_port: int
    ca: trustme.CA
    ca_file: Path

    def context(self, **kwargs: object) -> ssl.SSLContext:
        context: ssl.SSLContext = client_tls_context(self.ca, **kwargs)
        return context


def tls_settings(cert: Path, key: Path, **extra: object) -> dict[str, dict[str, object]]:
    return {"smtp": {"tls": {"certificate": str(cert), "key": str(key), **extra}}}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    """STARTTLS on smtp.listen and implicit TLS on a second port; tests only add jobs."""
    workdir = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert, key = write_tls_files(ca, workdir, common_name=COMMON_NAME)
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    implicit_port = free_port()
    settings = tls_settings(cert, key, implicit_listen=[f"127.0.0.1:{implicit_port}"])
    with launcher(workdir) as launch:
        daemon = launch.daemon(settings)
        daemon.wait_for_log("SMTP with implicit TLS listening on")
        yield TlsDaemon(daemon, implicit_port, ca, ca_file)


def only_new_job(daemon: Daemon, job_id: str, before: set[str]) -> dict[str, Any]:
    new = [job for job in daemon.jobs() if job.id not in before]
    assert [job.id for job in new] == [job_id], "exactly one new job, the one of the 250"
    return new[0].payload


def expected_tls(sock: socket.socket | None) -> dict[str, str]:
    """The payload's ``tls`` as the client saw the session."""
    assert isinstance(sock, ssl.SSLSocket)
    cipher = sock.cipher()
    assert cipher is not None
    return {"version": str(sock.version()), "cipher": cipher[0]}


def smtplib_send(smtp: smtplib.SMTP) -> str:
    smtp.ehlo_or_helo_if_needed()
    assert smtp.mail("sender@example.org")[0] == 250
    assert smtp.rcpt("rcpt@example.com")[0] == 250
    code, text = smtp.data(message("tls"))
    return queued_id(f"{code} {text.decode()}")


def test_starttls_with_smtplib_delivers_and_payload_has_tls(tls: TlsDaemon) -> None:
    before = {job.id for job in tls.daemon.jobs()}
    with smtplib.SMTP("127.0.0.1", tls.daemon.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.e2e.test")
        assert smtp.has_extn("starttls")
        code, text = smtp.starttls(context=tls.context())
        assert (code, text.decode()) == (220, "2.0.0 Ready to start TLS")
        smtp.ehlo("client.e2e.test")
        assert not smtp.has_extn("starttls"), "STARTTLS offered again inside TLS"
        seen = expected_tls(smtp.sock)
        job_id = smtplib_send(smtp)
    payload = only_new_job(tls.daemon, job_id, before)
    assert seen["version"] == "TLSv1.3"
    assert payload["tls"] == seen
    assert payload["remote_addr"].startswith("127.0.0.1:")


def test_starttls_with_a_tls_1_2_client_shows_tls_1_2(tls: TlsDaemon) -> None:
    before = {job.id for job in tls.daemon.jobs()}
    context = tls.context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with smtplib.SMTP("127.0.0.1", tls.daemon.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=context)
        seen = expected_tls(smtp.sock)
        job_id = smtplib_send(smtp)
    assert seen["version"] == "TLSv1.2"
    assert only_new_job(tls.daemon, job_id, before)["tls"] == seen


def test_implicit_tls_with_smtplib_delivers_and_payload_has_tls(tls: TlsDaemon) -> None:
    before = {job.id for job in tls.daemon.jobs()}
    with smtplib.SMTP_SSL(
        "127.0.0.1", tls.implicit_port, context=tls.context(), timeout=10
    ) as smtp:
        code, _ = smtp.ehlo("client.e2e.test")
        assert code == 250
        assert not smtp.has_extn("starttls"), "STARTTLS offered on an implicit-TLS port"
        seen = expected_tls(smtp.sock)
        job_id = smtplib_send(smtp)
    payload = only_new_job(tls.daemon, job_id, before)
    assert seen["version"] == "TLSv1.3"
    assert payload["tls"] == seen


def test_plain_session_has_null_tls(tls: TlsDaemon) -> None:
    before = {job.id for job in tls.daemon.jobs()}
    with smtplib.SMTP("127.0.0.1", tls.daemon.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.e2e.test")
        job_id = smtplib_send(smtp)
    assert only_new_job(tls.daemon, job_id, before)["tls"] is None


def test_swaks_starttls_delivers(tls: TlsDaemon) -> None:
    swaks = require_swaks_tls()
    before = {job.id for job in tls.daemon.jobs()}
    result = subprocess.run(
        [
            swaks, "--server", "127.0.0.1", "--port", str(tls.daemon.smtp_port),
            "--from", "sender@example.org", "--to", "rcpt@example.com",
            "--helo", "swaks.e2e.test", "--tls", "--tls-verify",
            "--tls-ca-path", str(tls.ca_file), "--timeout", "20",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "220 2.0.0 Ready to start TLS" in result.stdout
    queued = [line for line in result.stdout.splitlines() if "queued as" in line]
    assert len(queued) == 1, result.stdout
    job_id = queued_id(queued[0].split("<~", 1)[-1].strip())
    payload = only_new_job(tls.daemon, job_id, before)
    assert payload["tls"]["version"] == "TLSv1.3"
    assert payload["envelope"]["helo"] == "swaks.e2e.test"


@pytest.mark.parametrize("injected", [b"NOOP\r\n", b"MAIL FROM:<evil@x>\r\n"], ids=["noop", "mail"])
def test_commands_pipelined_after_starttls_are_discarded(tls: TlsDaemon, injected: bytes) -> None:
    """RFC 3207 §4.2, CVE-2011-0411: what came with STARTTLS never runs inside TLS."""
    before = {job.id for job in tls.daemon.jobs()}
    with tls.daemon.connect() as conn:
        conn.start()
        conn.send(b"STARTTLS\r\n" + injected)
        assert conn.reply().last == "220 2.0.0 Ready to start TLS"
        wrap_tls(conn, tls.context())
        # The first reply inside TLS answers what we send inside TLS.
        ehlo = conn.command("EHLO inside.e2e.test")
        assert ehlo.code == 250, f"first reply inside TLS: {ehlo}"
        assert ehlo.lines[0] == "localhost", f"not the EHLO reply: {ehlo}"
        assert "STARTTLS" not in [line.upper() for line in ehlo.lines[1:]], ehlo
        # No injected MAIL is pending: a MAIL now is not "nested".
        conn.expect("MAIL FROM:<good@example.org>", "250")
        conn.expect("RCPT TO:<rcpt@example.com>", "250")
        conn.expect("DATA", "354")
        conn.send(message("inside") + b".\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    payload = only_new_job(tls.daemon, job_id, before)
    assert payload["envelope"]["mail_from"] == "good@example.org"
    assert payload["envelope"]["helo"] == "inside.e2e.test"


def test_after_starttls_ehlo_is_required_again_and_starttls_refused(tls: TlsDaemon) -> None:
    with tls.daemon.connect() as conn:
        conn.start()
        starttls(conn, tls.context())
        conn.expect("MAIL FROM:<a@example.org>", "503")
        conn.expect("EHLO again.e2e.test", "250")
        conn.expect("STARTTLS", "503")
        conn.expect("MAIL FROM:<a@example.org>", "250")
        conn.quit()


def test_openssl_s_client_starttls_shows_the_certificate(tls: TlsDaemon) -> None:
    openssl = require_tool("openssl")
    result = subprocess.run(
        [
            openssl, "s_client", "-starttls", "smtp",
            "-connect", f"127.0.0.1:{tls.daemon.smtp_port}",
            "-CAfile", str(tls.ca_file), "-verify_return_error",
        ],
        input="QUIT\r\n", capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    subjects = [line for line in output.splitlines() if line.startswith("subject=")]
    assert subjects, output
    assert f"CN = {COMMON_NAME}" in subjects[0], subjects
    assert "Verify return code: 0 (ok)" in output
    assert "TLSv1.3" in output


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    """tls.required = true and min_version = TLSv1.3."""
    workdir = tmp_path_factory.mktemp("tls-strict")
    ca = trustme.CA()
    cert, key = write_tls_files(ca, workdir)
    settings = tls_settings(cert, key, required=True, min_version="TLSv1.3")
    with launcher(workdir) as launch:
        yield TlsDaemon(launch.daemon(settings), 0, ca, workdir / "unused")


def test_tls_required_refuses_mail_before_starttls(strict: TlsDaemon) -> None:
    before = {job.id for job in strict.daemon.jobs()}
    with strict.daemon.connect() as conn:
        ehlo = conn.start()
        assert "STARTTLS" in [line.upper() for line in ehlo.lines[1:]], ehlo
        conn.expect("MAIL FROM:<a@example.org>", "530 5.7.0")
        starttls(conn, strict.context())
        conn.expect("EHLO client.e2e.test", "250")
        conn.transaction("a@example.org")
        conn.send(message("required") + b".\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    assert only_new_job(strict.daemon, job_id, before)["tls"]["version"] == "TLSv1.3"


def test_min_version_tls_1_3_refuses_a_tls_1_2_client(strict: TlsDaemon) -> None:
    context = strict.context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with strict.daemon.connect() as conn:
        conn.start()
        conn.expect("STARTTLS", "220 2.0.0")
        with pytest.raises(ssl.SSLError):
            wrap_tls(conn, context)
    strict.daemon.wait_for_log("TLS handshake failed")
    # The server goes on serving TLS 1.3 clients.
    with strict.daemon.connect() as conn:
        conn.start()
        starttls(conn, strict.context())
        conn.expect("EHLO client.e2e.test", "250")
        conn.quit()


def verifies(port: int, context: ssl.SSLContext) -> bool:
    """Whether a STARTTLS handshake with *context* verifies the server's certificate."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.e2e.test")
        try:
            smtp.starttls(context=context)
        except ssl.SSLCertVerificationError:
            smtp.close()
            return False
        assert smtp.noop()[0] == 250
    return True


def test_sighup_reloads_the_certificate(launch: Launcher, tmp_path: Path) -> None:
    ca1, ca2 = trustme.CA(), trustme.CA()
    cert, key = write_tls_files(ca1, tmp_path)
    daemon = launch.daemon(tls_settings(cert, key))
    port = daemon.smtp_port
    old_ca, new_ca = client_tls_context(ca1), client_tls_context(ca2)
    assert verifies(port, old_ca)
    assert not verifies(port, new_ca)

    # A session encrypted before the reload keeps going.
    with daemon.connect() as kept:
        kept.start()
        starttls(kept, old_ca)
        kept.expect("EHLO kept.e2e.test", "250")

        write_tls_files(ca2, tmp_path)  # same paths: renewed in place
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("TLS certificate reloaded")
        assert verifies(port, new_ca), "new handshakes must get the new certificate"
        assert not verifies(port, old_ca)
        kept.expect("NOOP", "250")
        kept.quit()

    # A broken key on reload: logged, and the previous certificate kept.
    key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("TLS reload failed")
    assert daemon.running
    assert verifies(port, new_ca)


@pytest.mark.parametrize("missing", ["certificate", "key"])
def test_missing_tls_file_at_start_exits_2_naming_the_key(tmp_path: Path, missing: str) -> None:
    ca = trustme.CA()
    cert, key = write_tls_files(ca, tmp_path)
    paths = {"certificate": cert, "key": key}
    paths[missing] = tmp_path / f"missing-{missing}.pem"
    result = serve_with_smtp(tmp_path, {"tls": {name: str(p) for name, p in paths.items()}})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert f"smtp.tls.{missing}" in line, line
    assert str(paths[missing]) in line, line


def test_starttls_false_offers_implicit_tls_only(launch: Launcher, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_tls_files(ca, tmp_path)
    implicit_port = free_port()
    daemon = launch.daemon(
        tls_settings(cert, key, starttls=False, implicit_listen=[f"127.0.0.1:{implicit_port}"])
    )
    with daemon.connect() as conn:
        ehlo = conn.start()
        assert "STARTTLS" not in [line.upper() for line in ehlo.lines[1:]], ehlo
        conn.expect("STARTTLS", "502")
        conn.quit()
    with smtplib.SMTP_SSL(
        "127.0.0.1", implicit_port, context=client_tls_context(ca), timeout=10
    ) as smtp:
        job_id = smtplib_send(smtp)
    assert [job.id for job in daemon.jobs()] == [job_id]
    assert daemon.jobs()[0].payload["tls"]["version"] == "TLSv1.3"


# -- cipher suites (Mozilla "intermediate") ------------------------------------------


@pytest.fixture(scope="module")
def rsa_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    """Both listeners with an RSA certificate, so ECDHE-RSA suites can be negotiated."""
    workdir = tmp_path_factory.mktemp("tls-rsa")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    issued = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert, key = workdir / "rsa.crt", workdir / "rsa.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    implicit_port = free_port()
    settings = tls_settings(cert, key, implicit_listen=[f"127.0.0.1:{implicit_port}"])
    with launcher(workdir) as launch:
        daemon = launch.daemon(settings)
        daemon.wait_for_log("SMTP with implicit TLS listening on")
        yield TlsDaemon(daemon, implicit_port, ca, ca_file)


def s_client_tls12(port: int, cipher: str, *, starttls: bool) -> tuple[bool, str]:
    """Whether ``openssl s_client`` offering TLS 1.2 with only *cipher* got a session."""
    openssl = require_tool("openssl")
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-cipher", cipher]
    if starttls:
        argv[2:2] = ["-starttls", "smtp"]
    result = subprocess.run(
        argv, input="QUIT\r\n", capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    output = result.stdout + result.stderr
    return result.returncode == 0 and f"Cipher is {cipher}" in output, output


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_cbc_suites_are_refused_and_aead_accepted_on_both_listeners(
    rsa_tls: TlsDaemon, listener: str
) -> None:
    starttls = listener == "starttls"
    port = rsa_tls.daemon.smtp_port if starttls else rsa_tls.implicit_port

    # OpenSSL's default list offers these two CBC suites; Mozilla's intermediate does not.
    for cbc in ("ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384"):
        accepted, output = s_client_tls12(port, cbc, starttls=starttls)
        assert not accepted, output
    for aead in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"):
        accepted, output = s_client_tls12(port, aead, starttls=starttls)
        assert accepted, output
    assert rsa_tls.daemon.running


def test_ciphers_setting_chooses_the_tls_1_2_suites(launch: Launcher, tmp_path: Path) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    issued = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert, key = tmp_path / "rsa.crt", tmp_path / "rsa.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    daemon = launch.daemon(tls_settings(cert, key, ciphers="ECDHE-RSA-AES256-GCM-SHA384"))

    assert s_client_tls12(daemon.smtp_port, "ECDHE-RSA-AES256-GCM-SHA384", starttls=True)[0]
    accepted, output = s_client_tls12(
        daemon.smtp_port, "ECDHE-RSA-AES128-GCM-SHA256", starttls=True
    )
    assert not accepted, output


@pytest.mark.parametrize("ciphers", ["nonsense", "", "TLS_AES_128_GCM_SHA256"])
def test_invalid_ciphers_exit_2_naming_the_key(tmp_path: Path, ciphers: str) -> None:
    cert, key = write_tls_files(trustme.CA(), tmp_path)
    tls = {"certificate": str(cert), "key": str(key), "ciphers": ciphers}
    result = serve_with_smtp(tmp_path, {"tls": tls})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "smtp.tls.ciphers: " in line, line
    assert "selects no TLS 1.2 cipher suite" in line, line
