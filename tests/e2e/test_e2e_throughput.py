"""Throughput smoke with Postfix's smtp-source: every message becomes a job.

Not a timing test: it only checks that concurrent sessions under load each
get their job, exactly once.
"""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest

from .trismtp_e2e import Daemon, clean_env, require_tool

pytestmark = pytest.mark.e2e

MESSAGES = 200


def test_smtp_source_200_messages_make_200_jobs(daemon: Daemon) -> None:
    smtp_source = require_tool("smtp-source")
    result = subprocess.run(
        [
            smtp_source, "-c", "-d", "-s", "5", "-m", str(MESSAGES), "-l", "2048",
            "-f", "a@b.example", "-t", "c@d.example", f"127.0.0.1:{daemon.smtp_port}",
        ],
        cwd=daemon.workdir,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"smtp-source: {result.returncode}\n{result.stderr}"
    assert result.stderr.strip() == "", result.stderr

    jobs = daemon.jobs()
    assert len(jobs) == MESSAGES
    assert max(Counter(job.id for job in jobs).values()) == 1
    assert all(job.payload["envelope"]["allRecipients"] == ["c@d.example"] for job in jobs)
    assert all(job.payload["envelope"]["mail_from"] == "a@b.example" for job in jobs)
    assert daemon.log_text().count("queued as") == MESSAGES
