"""swaks delivers; the `trismtp jobs` commands show and consume the job (SPEC §2)."""

from __future__ import annotations

import json
import subprocess

import pytest

from .trismtp_e2e import CLI_TIMEOUT, QUEUED_RE, Daemon, clean_env, require_tool, run_cli

pytestmark = pytest.mark.e2e


def swaks(daemon: Daemon, *extra: str) -> str:
    """Send swaks's test message to the daemon; returns the job id of its 250."""
    result = subprocess.run(
        [
            require_tool("swaks"),
            "--to", "test@localhost",
            "--from", "sender@example.org",
            "--helo", "swaks.e2e.test",
            "--server", f"127.0.0.1:{daemon.smtp_port}",
            "--timeout", "10",
            *extra,
        ],
        cwd=daemon.workdir,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"swaks exited {result.returncode}\n{output}"
    assert "250 2.0.0 OK: queued as" in output, output
    ids = QUEUED_RE.findall(output)
    assert len(ids) == 1, output
    job_id: str = ids[0]
    return job_id


def stat_table(daemon: Daemon) -> dict[str, dict[str, str]]:
    """`trismtp jobs stat` (the text table) as {pipeline: {COLUMN: value}}."""
    result = run_cli("jobs", "stat", "--url", daemon.url, cwd=daemon.workdir, check=True)
    header, *rows = result.stdout.splitlines()
    columns = header.split()
    assert columns[0] == "PIPELINE", result.stdout
    assert "ACTIVE" in columns, result.stdout
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        cells = dict(zip(columns, row.split(), strict=True))
        table[cells["PIPELINE"]] = cells
    return table


def test_swaks_then_stat_then_consume_empties_the_store(daemon: Daemon) -> None:
    job_id = swaks(daemon)

    stats = stat_table(daemon)
    assert "smtp" in stats, stats
    assert stats["smtp"]["ACTIVE"] == "1", stats
    assert [job.id for job in daemon.jobs()] == [job_id]

    result = run_cli(
        "jobs", "consume", "--pipeline", "smtp", "--json", "--url", daemon.url,
        cwd=daemon.workdir, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    job = json.loads(lines[0])
    assert job["id"] == job_id
    assert job["options"]["pipeline"] == "smtp"
    payload = json.loads(job["payload"])
    assert payload["uuid"] == job_id
    assert payload["envelope"]["allRecipients"] == ["test@localhost"]
    assert payload["envelope"]["mail_from"] == "sender@example.org"
    assert payload["envelope"]["helo"] == "swaks.e2e.test"
    assert "This is a test mailing" in payload["message"]["body"]

    # Consumed and acked: gone from the store, and stat says so.
    assert daemon.jobs() == []
    assert stat_table(daemon)["smtp"]["ACTIVE"] == "0"
    again = run_cli(
        "jobs", "consume", "--pipeline", "smtp", "--json", "--url", daemon.url,
        cwd=daemon.workdir, check=True,
    )  # fmt: skip
    assert again.stdout == ""


def test_peek_shows_the_job_without_consuming_it(daemon: Daemon) -> None:
    job_id = swaks(daemon)

    result = run_cli("jobs", "peek", "--json", "--url", daemon.url, cwd=daemon.workdir)
    assert result.returncode == 0, f"trismtp jobs peek failed: {result.stderr}"
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    job = json.loads(lines[0])
    assert job["id"] == job_id
    assert json.loads(job["payload"])["envelope"]["allRecipients"] == ["test@localhost"]

    # Peeking twice shows it twice: nothing was reserved or removed.
    again = run_cli("jobs", "peek", "--json", "--url", daemon.url, cwd=daemon.workdir)
    assert [json.loads(line)["id"] for line in again.stdout.splitlines()] == [job_id]
    assert [job.id for job in daemon.jobs()] == [job_id]
