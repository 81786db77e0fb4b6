"""``trismtp sendmail`` against the real daemon (SPEC §2): PHP's mail() through
``sendmail_path``, cron's and mailx's command lines, and the sysexits statuses
a caller decides on.

Every message is checked where a consumer would see it: the job in the
daemon's store.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .trismtp_e2e import (
    CLI_TIMEOUT,
    HOST,
    Daemon,
    StoredJob,
    clean_env,
    free_port,
    launcher,
    require_tool,
    trismtp_argv,
    wait_until,
)

pytestmark = pytest.mark.e2e

HOSTNAME = socket.gethostname()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module: these tests only add jobs, each checks its own."""
    with launcher(tmp_path_factory.mktemp("sendmail")) as launch:
        yield launch.daemon(
            {"smtp": {"recipient_domains": ["example.com", HOSTNAME], "max_message_size": 4096}}
        )


def sendmail(
    daemon: Daemon, *args: str, stdin: bytes, config: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``trismtp sendmail --config <the daemon's settings> ARGS`` with *stdin*."""
    return subprocess.run(
        [*trismtp_argv(), "sendmail", "--config", str(config or daemon.config), *args],
        cwd=daemon.workdir,
        env=clean_env(),
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def new_job(daemon: Daemon, before: set[str]) -> StoredJob:
    """The one job stored since *before* was taken."""
    jobs = [job for job in daemon.jobs() if job.id not in before]
    assert len(jobs) == 1, [job.payload["message"]["subject"] for job in jobs]
    return jobs[0]


def job_ids(daemon: Daemon) -> set[str]:
    return {job.id for job in daemon.jobs()}


def header(payload: dict[str, Any], name: str) -> list[str]:
    """The values of header *name* in the payload, whatever its key's case."""
    headers = payload["message"]["headers"]
    return next((v for k, v in headers.items() if k.lower() == name.lower()), [])


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("trismtp sendmail: "), lines[0]
    return lines[0]


# -- PHP mail() -------------------------------------------------------------------


def php_mail(daemon: Daemon, code: str, sendmail_args: str = "-t -i") -> tuple[str, str]:
    """Run PHP *code* with sendmail_path set to this daemon's ``trismtp sendmail``:
    its stdout and its stderr (where the sendmail command's own errors go)."""
    php = require_tool("php")
    command = " ".join([*trismtp_argv(), "sendmail", "--config", str(daemon.config)])
    result = subprocess.run(
        [php, "-n", "-d", f"sendmail_path={command} {sendmail_args}", "-r", code],
        cwd=daemon.workdir,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"php exited {result.returncode}: {result.stderr}"
    return result.stdout, result.stderr


def test_php_mail_through_sendmail_path(daemon: Daemon) -> None:
    before = job_ids(daemon)
    output, errors = php_mail(
        daemon,
        'var_export(mail("to@example.com", "Hello from PHP", "line one\\n.\\nline three\\n",'
        ' "From: App <app@example.com>\\r\\nCc: cc@example.com\\r\\nBcc: hidden@example.com"));',
    )
    assert (output, errors) == ("true", "")  # mail() saw exit status 0
    job = new_job(daemon, before)
    payload = job.payload
    assert payload["envelope"]["allRecipients"] == [
        "to@example.com",
        "cc@example.com",
        "hidden@example.com",
    ]
    assert payload["message"]["subject"] == "Hello from PHP"
    assert payload["envelope"]["from"] == [{"email": "app@example.com", "name": "App"}]
    raw = payload["message"]["raw"]
    # -i: the lone dot is text; PHP's LF line ends arrive as CRLF; Bcc is gone.
    assert "\r\n\r\nline one\r\n.\r\nline three\r\n" in raw, raw
    assert "hidden@example.com" not in raw
    assert "Bcc" not in payload["message"]["headers"]
    assert f"queued as {job.id} (" in daemon.log_text()
    assert re.search(rf"queued as {job.id} \(\d+ bytes, 3 recipients\)", daemon.log_text())
    assert header(payload, "Message-ID"), "added when missing"


def test_php_mail_with_an_envelope_sender(daemon: Daemon) -> None:
    # mail()'s fifth argument is appended to sendmail_path's command.
    before = job_ids(daemon)
    output, errors = php_mail(
        daemon,
        'var_export(mail("to@example.com", "bounce", "x", "", "-fbounces@example.com"));',
    )
    assert (output, errors) == ("true", "")
    assert new_job(daemon, before).payload["envelope"]["mail_from"] == "bounces@example.com"


def test_php_mail_returns_false_when_refused(daemon: Daemon) -> None:
    before = job_ids(daemon)
    output, errors = php_mail(daemon, 'var_export(mail("someone@elsewhere.test", "no", "x"));')
    assert output == "false", (output, errors)
    assert "550 5.7.1" in errors, errors
    assert job_ids(daemon) == before


# -- cron and mailx -----------------------------------------------------------------


def test_cron_style_local_recipient(daemon: Daemon) -> None:
    # Debian cron runs: sendmail -FCronDaemon -i -B8BITMIME -oem <MAILTO>
    before = job_ids(daemon)
    report = (
        "From: root (Cron Daemon)\n"
        "To: root\n"
        "Subject: Cron <root@box> backup.sh\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "\n"
        "backup done: 3 files, 0 errors — ok\n"
    ).encode()
    result = sendmail(daemon, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=report)
    assert result.returncode == 0, result.stderr
    payload = new_job(daemon, before).payload
    # A local name is qualified with this host's name, as sendmail does.
    assert payload["envelope"]["allRecipients"] == [f"root@{HOSTNAME}"]
    assert payload["message"]["subject"] == "Cron <root@box> backup.sh"
    assert payload["message"]["body"] == "backup done: 3 files, 0 errors — ok\r\n"


def test_mailx_style_recipients_and_a_message_without_headers(daemon: Daemon) -> None:
    before = job_ids(daemon)
    result = sendmail(
        daemon, "-oi", "-f", "script@example.com", "--", "a@example.com, b@example.com",
        stdin=b"just a line\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = new_job(daemon, before).payload
    assert payload["envelope"]["mail_from"] == "script@example.com"
    assert payload["envelope"]["allRecipients"] == ["a@example.com", "b@example.com"]
    # From, Date and Message-ID added; the line stays the body.
    assert header(payload, "From") == ["script@example.com"]
    assert header(payload, "Date")
    assert header(payload, "Message-ID")
    assert payload["message"]["body"] == "just a line\r\n"


def test_a_lone_dot_ends_the_message_without_i(daemon: Daemon) -> None:
    before = job_ids(daemon)
    stdin = b"Subject: dot\n\nkept\n.\nnot sent\n"
    result = sendmail(daemon, "x@example.com", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert new_job(daemon, before).payload["message"]["body"] == "kept\r\n"


def test_v_prints_the_job_id(daemon: Daemon) -> None:
    before = job_ids(daemon)
    result = sendmail(daemon, "-v", "x@example.com", stdin=b"Subject: v\n\nhi\n")
    assert result.returncode == 0, result.stderr
    job = new_job(daemon, before)
    assert one_line(result) == f"trismtp sendmail: 250 2.0.0 OK: queued as {job.id}"
    assert re.search(rf"queued as {job.id} \(\d+ bytes, 1 recipient\)", daemon.log_text())


# -- exit statuses ------------------------------------------------------------------


def test_refused_recipient_is_ex_nouser_and_sends_to_nobody(daemon: Daemon) -> None:
    before = job_ids(daemon)
    result = sendmail(
        daemon, "ok@example.com", "no@elsewhere.test", stdin=b"Subject: refused\n\nx\n"
    )
    assert result.returncode == 67, result.stderr  # EX_NOUSER
    line = one_line(result)
    assert "<no@elsewhere.test>" in line, line
    assert "550 5.7.1" in line, line
    assert job_ids(daemon) == before, "all or nothing: ok@example.com got nothing either"


def test_message_too_large_is_ex_dataerr(daemon: Daemon) -> None:
    result = sendmail(daemon, "-i", "x@example.com", stdin=b"Subject: big\n\n" + b"x" * 70 * 100)
    assert result.returncode == 65, result.stderr  # EX_DATAERR
    assert "552 5.3.4" in one_line(result)


def test_no_recipients_is_ex_usage(daemon: Daemon) -> None:
    result = sendmail(daemon, "-t", stdin=b"Subject: nobody\n\nx\n")
    assert result.returncode == 64, result.stderr  # EX_USAGE
    assert "no recipients" in one_line(result)


def test_unsupported_mode_is_ex_usage(daemon: Daemon) -> None:
    result = sendmail(daemon, "-bs", stdin=b"")
    assert result.returncode == 64
    assert "-bs" in one_line(result)


def test_bad_settings_are_ex_config(daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_message_size = 'big'\n")
    result = sendmail(daemon, "x@example.com", stdin=b"x\n", config=bad)
    assert result.returncode == 78, result.stderr  # EX_CONFIG
    assert "smtp.max_message_size" in one_line(result)


def test_daemon_not_running_is_ex_tempfail(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "s.toml"
    config.write_text(f'[smtp]\nlisten = ["{HOST}:{port}"]\n')
    result = subprocess.run(
        [*trismtp_argv(), "sendmail", "--config", str(config), "x@example.com"],
        cwd=tmp_path,
        env=clean_env(),
        input=b"Subject: nobody home\n\nx\n",
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 75, result.stderr  # EX_TEMPFAIL: cron, PHP, scripts retry
    line = one_line(result)
    assert f"{HOST}:{port}" in line, line
    assert "trismtp serve" in line, line


def test_temporary_refusal_is_ex_tempfail(tmp_path: Path) -> None:
    # A daemon whose jobs service is not there: the daemon answers 4xx.
    with launcher(tmp_path) as launch:
        daemon = launch.daemon(
            {"jobs": {"url": f"ws://{HOST}:{free_port()}/rpc", "push_timeout": 1}}
        )
        wait_until(
            lambda: "cannot connect to the jobs service" in daemon.log_text(),
            10,
            "the pusher to fail to connect",
        )
        result = sendmail(daemon, "x@example.com", stdin=b"Subject: later\n\nx\n")
    assert result.returncode == 75, result.stderr
    assert "451 4.3.0" in one_line(result)


@pytest.mark.parametrize("null", ["<>", ""])
def test_f_null_sender(daemon: Daemon, null: str) -> None:
    before = job_ids(daemon)
    result = sendmail(daemon, "-f", null, "-i", "x@example.com", stdin=b"Subject: bounce\n\nx\n")
    assert result.returncode == 0, result.stderr
    assert new_job(daemon, before).payload["envelope"]["mail_from"] == ""


def test_linked_as_sendmail_it_is_trismtp_sendmail(daemon: Daemon, tmp_path: Path) -> None:
    # cron and mailx run "sendmail" from PATH: a link named so is enough.
    script = trismtp_argv()
    if len(script) != 1:
        pytest.skip("needs the trismtp console script (make install)")
    link = tmp_path / "sendmail"
    link.symlink_to(script[0])
    before = job_ids(daemon)
    result = subprocess.run(
        [str(link), "--config", str(daemon.config), "-t", "-oi"],
        cwd=daemon.workdir,
        env=clean_env(),
        input=b"To: linked@example.com\nSubject: via link\n\nx\n",
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert new_job(daemon, before).payload["envelope"]["allRecipients"] == ["linked@example.com"]
