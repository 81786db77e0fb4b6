"""The consumer against the real jobs service (`trismtp jobs serve`), on asyncio and trio.

What a user of the library would notice: every job handled once, failures
coming back, slow handlers keeping their jobs, dead consumers' jobs coming
back, a stopped consumer leaving nothing leased, a restarted service.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import trustme

from trismtp.consumer import (
    Consumer,
    HandshakeRejected,
    JobsUnavailable,
    ReservedJob,
    RpcClient,
    RpcError,
)
from trismtp.jsonrpc import NO_SUCH_PIPELINE

from ..e2e.trismtp_e2e import CLI_TIMEOUT, Launcher, clean_env, wait_until
from .support import assert_empty, counts, email_job, push_emails, tls_proxy

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).with_name("worker_process.py")
TOKEN = "consumer-worker-token-0123456789"
WAIT = 60.0
"""Seconds any one thing the tests wait for may take before they fail."""


async def test_every_job_is_handled_once_by_three_consumers(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})
    ids = await push_emails_with_token(service.url, 150)
    handled: list[tuple[int, str, str]] = []

    def handler(number: int) -> Consumer:
        async def handle(job: ReservedJob) -> None:
            handled.append((number, job.id, job.email().message.subject))
            await anyio.sleep(0.002 * (job.lease.attempt + number))

        return Consumer(
            service.url, handle, token=TOKEN, concurrency=4, lease=30, stop_when_idle=True
        )

    consumers = [handler(number) for number in range(3)]
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            for consumer in consumers:
                tasks.start_soon(consumer.run)

    assert sorted(job_id for _, job_id, _ in handled) == sorted(ids)  # each once
    assert all(subject.startswith("Message ") for _, _, subject in handled)
    assert sum(c.stats.acked for c in consumers) == 150
    assert sum(c.stats.lease_lost + c.stats.failed for c in consumers) == 0
    await assert_empty_with_token(service.url)


async def test_it_takes_no_more_jobs_than_it_has_handlers(launch: Launcher) -> None:
    service = launch.jobs_service()
    await push_emails(service.url, 10)
    started: list[str] = []
    all_busy, release = anyio.Event(), anyio.Event()

    async def handle(job: ReservedJob) -> None:
        started.append(job.id)
        if len(started) == 3:
            all_busy.set()
        await release.wait()

    consumer = Consumer(service.url, handle, concurrency=3, idle_max=0.1, stop_when_idle=True)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consumer.run)
            await all_busy.wait()
            # Three handlers busy: three jobs leased, the other seven left for
            # other consumers, however long the handlers take.
            for _ in range(5):
                entry = await counts(service.url)
                assert (entry["reserved"], entry["active"]) == (3, 7), entry
                assert len(started) == 3
                await anyio.sleep(0.05)
            release.set()

    assert len(started) == consumer.stats.acked == 10
    await assert_empty(service.url)


async def test_a_handler_that_raises_gets_the_job_again(launch: Launcher) -> None:
    service = launch.jobs_service()
    (job_id,) = await push_emails(service.url, 1)
    attempts: list[tuple[str, int]] = []

    async def handle(job: ReservedJob) -> None:
        attempts.append((job.id, job.lease.attempt))
        if job.lease.attempt == 1:
            raise RuntimeError("the first attempt fails")

    consumer = Consumer(service.url, handle, retry_delay=0, stop_when_idle=True)
    with anyio.fail_after(WAIT):
        stats = await consumer.run()

    assert attempts == [(job_id, 1), (job_id, 2)]
    assert (stats.failed, stats.acked) == (1, 1)
    await assert_empty(service.url)


async def test_a_handler_slower_than_the_lease_keeps_its_job(launch: Launcher) -> None:
    service = launch.jobs_service()
    (job_id,) = await push_emails(service.url, 1)
    lease = 1.5  # extended every 0.5 s: a second of slack on a loaded machine
    stolen: list[object] = []
    probes = 0

    async def handle(job: ReservedJob) -> None:
        nonlocal probes
        # Meanwhile another consumer keeps asking for jobs, until well past
        # the end of the first lease: it must get nothing.
        async with RpcClient.connect(service.url) as other:
            while time.time() < job.lease.expires_at + 2 * lease:
                result = await other.call(
                    "jobs.Reserve", {"pipeline": "smtp", "max": 1, "lease": 60}
                )
                stolen.extend(result["jobs"])
                probes += 1
                await anyio.sleep(0.1)

    consumer = Consumer(service.url, handle, lease=lease, stop_when_idle=True)
    with anyio.fail_after(WAIT):
        stats = await consumer.run()

    assert stolen == []
    assert probes > 10
    assert (stats.acked, stats.lease_lost) == (1, 0), job_id
    await assert_empty(service.url)


async def test_a_killed_consumers_job_comes_back_after_its_lease(
    launch: Launcher, tmp_path: Path, anyio_backend: str
) -> None:
    service = launch.jobs_service()
    (job_id,) = await push_emails(service.url, 1)
    log = tmp_path / "worker.log"
    worker = start_worker(service.url, log, anyio_backend, "--lease", "3", "--hold", "inf")
    try:
        await anyio.to_thread.run_sync(wait_for_lines, log, "started", 1, worker)
        worker.kill()
        worker.wait(CLI_TIMEOUT)
    finally:
        stop(worker)
    # Still leased to the dead consumer: nobody gets it before the lease ends.
    assert (await counts(service.url))["reserved"] == 1

    got: list[tuple[str, int]] = []
    taken = anyio.Event()

    async def handle(job: ReservedJob) -> None:
        got.append((job.id, job.lease.attempt))
        taken.set()

    consumer = Consumer(service.url, handle, idle_max=0.2)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consumer.run)
            await taken.wait()
            consumer.stop()

    assert got == [(job_id, 2)]
    assert consumer.stats.acked == 1
    await assert_empty(service.url)


async def sigterm_after(
    url: str, log: Path, backend: str, started: int, *args: str
) -> tuple[subprocess.Popen[str], str]:
    """Start a worker process, SIGTERM it once *started* jobs have started, and
    return it (ended) with what it printed."""
    worker = start_worker(url, log, backend, *args)
    try:
        await anyio.to_thread.run_sync(wait_for_lines, log, "started", started, worker)
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=CLI_TIMEOUT)
    finally:
        stop(worker)
    return worker, out


async def test_sigterm_lets_the_jobs_in_hand_finish(
    launch: Launcher, tmp_path: Path, anyio_backend: str
) -> None:
    service = launch.jobs_service()
    ids = await push_emails(service.url, 6)
    log = tmp_path / "worker.log"
    worker, out = await sigterm_after(
        service.url, log, anyio_backend, 1, "--concurrency", "3", "--hold", "0.5", "--grace", "30"
    )
    assert worker.returncode == 0
    started = lines(log, "started")
    finished = lines(log, "finished")
    # Every job it started was finished and acked; nothing is left leased.
    assert sorted(started) == sorted(finished)
    assert json.loads(out)["acked"] == len(finished) >= 1
    entry = await counts(service.url)
    assert entry["reserved"] == 0, entry
    assert entry["active"] == len(ids) - len(finished), entry


async def test_sigterm_gives_back_what_cannot_finish_in_the_grace(
    launch: Launcher, tmp_path: Path, anyio_backend: str
) -> None:
    service = launch.jobs_service()
    ids = await push_emails(service.url, 6)
    log = tmp_path / "worker.log"
    worker, out = await sigterm_after(
        service.url, log, anyio_backend, 3, "--concurrency", "3", "--hold", "inf", "--grace", "0.2"
    )
    assert worker.returncode == 0
    assert json.loads(out) == {"acked": 0, "returned": 3}
    # Given back at once (the lease was 60 s): all six are ready again.
    entry = await counts(service.url)
    assert (entry["active"], entry["reserved"], entry["delayed"]) == (len(ids), 0, 0), entry


async def test_cancelling_run_is_a_graceful_stop(launch: Launcher) -> None:
    service = launch.jobs_service()
    await push_emails(service.url, 2)
    started = anyio.Event()
    finished: list[str] = []

    async def handle(job: ReservedJob) -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(job.id)

    consumer = Consumer(service.url, handle, concurrency=2, grace=30)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consumer.run)
            await started.wait()
            tasks.cancel_scope.cancel()  # what a FastAPI lifespan's end does

    assert len(finished) == consumer.stats.acked == 2
    await assert_empty(service.url)


async def test_it_reconnects_when_the_service_restarts(launch: Launcher) -> None:
    service = launch.jobs_service()
    handled: list[str] = []
    enough = anyio.Event()
    wanted = 5

    async def handle(job: ReservedJob) -> None:
        handled.append(job.id)
        if len(handled) >= wanted:
            enough.set()

    consumer = Consumer(service.url, handle, idle_max=0.2, reconnect_max=0.5)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consumer.run)
            first = await push_emails(service.url, 5)
            await enough.wait()
            # Killed and started again, same port, same database.
            await anyio.to_thread.run_sync(service.kill)
            await anyio.to_thread.run_sync(service.start)
            enough, wanted = anyio.Event(), 10
            second = await push_emails(service.url, 5)
            await enough.wait()
            consumer.stop()

    assert sorted(handled) == sorted(first + second)
    assert consumer.stats.connections >= 2
    assert consumer.stats.acked == 10
    await assert_empty(service.url)


async def test_clear_errors_for_a_wrong_token_or_pipeline(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})

    async def handle(job: ReservedJob) -> None:
        raise AssertionError("no job expected")

    refused = Consumer(service.url, handle, token="wrong")
    with pytest.raises(HandshakeRejected, match=r"refused the token \(HTTP 401\)"):
        await refused.run()
    with pytest.raises(RuntimeError, match="runs once"):
        await refused.run()
    with pytest.raises(RpcError) as info:
        await Consumer(service.url, handle, token=TOKEN, pipeline="nope").run()
    assert info.value.code == NO_SUCH_PIPELINE


# -- helpers -------------------------------------------------------------------------


async def push_emails_with_token(url: str, count: int) -> list[str]:
    jobs = [email_job(f"Message {n}") for n in range(count)]
    async with RpcClient.connect(url, token=TOKEN) as client:
        await client.call("jobs.PushBatch", {"jobs": jobs})
    return [job["id"] for job in jobs]


async def assert_empty_with_token(url: str) -> None:
    async with RpcClient.connect(url, token=TOKEN) as client:
        result = await client.call("jobs.Stat", {})
    (entry,) = [entry for entry in result["stats"] if entry["pipeline"] == "smtp"]
    assert (entry["active"], entry["delayed"], entry["reserved"]) == (0, 0, 0), entry


def start_worker(url: str, log: Path, backend: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--url", url, "--log", str(log), "--backend", backend, *args],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        encoding="utf-8",
    )


def lines(log: Path, kind: str) -> list[str]:
    if not log.exists():
        return []
    text = log.read_text(encoding="utf-8")
    return [line.split()[1] for line in text.splitlines() if line.startswith(kind + " ")]


def wait_for_lines(log: Path, kind: str, count: int, worker: subprocess.Popen[str]) -> None:
    def enough() -> bool:
        assert worker.poll() is None, f"the worker exited with {worker.returncode}"
        return len(lines(log, kind)) >= count

    wait_until(enough, WAIT, f"{count} {kind!r} lines in {log}")


def stop(worker: subprocess.Popen[str]) -> None:
    """Leave nothing running, by PID."""
    if worker.poll() is None:
        worker.kill()
        worker.wait(CLI_TIMEOUT)


async def test_consumes_over_wss_with_a_token(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})
    ids = await push_emails_with_token(service.url, 3)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    handled: list[str] = []

    async def handle(job: ReservedJob) -> None:
        handled.append(job.id)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            port = await tasks.start(tls_proxy, service.port, server_context)
            url = f"wss://127.0.0.1:{port}/rpc"
            stranger = ssl.create_default_context()  # trusts the system CAs, not ours
            with pytest.raises(JobsUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await Consumer(url, handle, token=TOKEN, ssl_context=stranger).run()
            consumer = Consumer(
                url, handle, token=TOKEN, ssl_context=client_context, stop_when_idle=True
            )
            stats = await consumer.run()
            tasks.cancel_scope.cancel()

    assert sorted(handled) == sorted(ids)
    assert stats.acked == 3
    await assert_empty_with_token(service.url)
