"""The consumer library's examples, run as a user would run them, against `trismtp jobs serve`.

(examples/python_worker.py is run by tests/e2e/test_e2e_examples.py, beside
the PHP consumer.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from trismtp.consumer import RpcClient

from ..e2e.trismtp_e2e import CLI_TIMEOUT, HOST, Launcher, clean_env, free_port, wait_until
from .support import assert_empty, email_job, push_emails

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "consumer-examples-token-0123456789"


def test_the_cron_worker_handles_what_is_ready_and_exits(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})
    ids = anyio.run(push_with_token, service.url, 7)

    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "cron_worker.py"), "--url", service.url],
        env={**clean_env(), "TRISMTP_JOBS_TOKEN": TOKEN},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        encoding="utf-8",
        timeout=CLI_TIMEOUT,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    *job_lines, summary = result.stdout.splitlines()
    assert sorted(line.split()[0] for line in job_lines) == sorted(ids)
    assert summary == "done: 7 acked, 0 failed"
    entry = anyio.run(counts_with_token, service.url)
    assert (entry["active"], entry["reserved"]) == (0, 0), entry

    wrong = subprocess.run(
        [sys.executable, str(EXAMPLES / "cron_worker.py"), "--url", service.url],
        env=clean_env(),
        capture_output=True,
        encoding="utf-8",
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert wrong.returncode == 1
    assert "requires a token (HTTP 401)" in wrong.stderr, wrong.stderr


def test_the_asyncio_service_consumes_in_the_background_and_stops_on_sigterm(
    launch: Launcher, tmp_path: Path
) -> None:
    service = launch.jobs_service()
    port = free_port()
    log_path = tmp_path / "asyncio_service.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "asyncio_service.py"), "--url", service.url,
             "--port", str(port)],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    try:

        def log_text() -> str:
            return log_path.read_text(encoding="utf-8")

        wait_until(
            lambda: "serving /stats" in log_text(), CLI_TIMEOUT, "the service", detail=log_text
        )
        anyio.run(push_emails, service.url, 5)
        wait_until(lambda: stats(port)["acked"] == 5, CLI_TIMEOUT, "5 acks", detail=log_text)
        process.send_signal(signal.SIGTERM)
        assert process.wait(CLI_TIMEOUT) == 0, log_text()
        assert "stopped: {'acked': 5" in log_text(), log_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(CLI_TIMEOUT)
    anyio.run(assert_empty, service.url)


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/stats", timeout=CLI_TIMEOUT) as reply:
        answer: dict[str, Any] = json.load(reply)
    return answer


async def push_with_token(url: str, count: int) -> list[str]:
    jobs = [email_job(f"Cron {n}") for n in range(count)]
    async with RpcClient.connect(url, token=TOKEN) as client:
        await client.call("jobs.PushBatch", {"jobs": jobs})
    return [job["id"] for job in jobs]


async def counts_with_token(url: str) -> dict[str, Any]:
    async with RpcClient.connect(url, token=TOKEN) as client:
        result = await client.call("jobs.Stat", {})
    entry: dict[str, Any] = next(s for s in result["stats"] if s["pipeline"] == "smtp")
    return entry
