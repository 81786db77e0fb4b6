"""The store under heavy and hostile load, on the real daemon (issue 12, parts 3-5).

* Reads never hold up writes: 300 ``jobs.Stat`` sent at once with
  200 × 1 MB jobs stored, and ``jobs.Stat`` polled every second at 200k stored
  jobs, while SMTP clients send mail.
* Reserve stays cheap with 20k leased jobs at the head of the queue.
* A database on a small tmpfs filled by mail: consumers drain every acked
  job, and mail is accepted again without a restart; ``/readyz`` says why
  it is not ready meanwhile.
* A damaged database: the start is refused with one line naming the file.

The stores are built in the test's setup through the store's own API in big
batches (far faster than SMTP), then the real binaries are started on them.
Every figure asserted here is also emitted (``FAULT SUMMARY``) for
docs/guarantees.md.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trismtp.jobs.model import Job, JobOptions
from trismtp.jobs.rpc import JobsClient
from trismtp.service.store import JobStore

from ..e2e.trismtp_e2e import HOST, Launcher, free_port, one_line_error, run_cli
from .harness import FaultSummary, emit, start, until, wait_for_log
from .load import LoadGenerator, Outcome

pytestmark = pytest.mark.faults

MiB = 1024 * 1024


async def build_store(
    database: Path, count: int, payload_size: int, batch: int = 5000, pipeline: str = "smtp"
) -> None:
    """*count* jobs of *payload_size* bytes in *pipeline*, pushed in big batches."""
    payload = json.dumps({"event": "EMAIL_RECEIVED", "filler": "x" * payload_size})
    async with JobStore.open(database) as store:
        await store.declare(pipeline)
        for first in range(0, count, batch):
            jobs = [
                Job(
                    job="smtp.email",
                    id=f"setup-{pipeline}-{i}",
                    payload=payload,
                    headers={"uuid": [f"setup-{i}"]},
                    options=JobOptions(pipeline=pipeline),
                )
                for i in range(first, min(count, first + batch))
            ]
            await store.push_batch(jobs)


def summary(scenario: str, **extra: Any) -> FaultSummary:
    """A summary line for a scenario that is about figures, not the load's invariant."""
    return FaultSummary(
        scenario=scenario,
        clients=0,
        messages=0,
        acked=0,
        stored=0,
        lost=0,
        dup_acked=0,
        replies_451=0,
        dup_messages=0,
        stored_unacked=0,
        unanswered=0,
        max_latency_451=None,
        max_latency_250=None,
        duration=0.0,
        extra=extra,
    )


# -- reads never hold up writes -------------------------------------------------


async def test_300_stats_at_once_do_not_hold_up_mail(launch: Launcher) -> None:
    """300 × jobs.Stat sent at once, 200 × 1 MB stored → mail still gets 250 within 5 s.

    The issue sent them in one message; a batch is now at most 100 calls
    (``MAX_BATCH``, -32600 past it), so they go as three batches of 100,
    back to back on one connection."""
    daemon = launch.daemon(start=False)
    await build_store(daemon.database, 200, MiB, batch=20)
    await start(daemon)
    batches = [
        [{"jsonrpc": "2.0", "id": b * 100 + i, "method": "jobs.Stat"} for i in range(100)]
        for b in range(3)
    ]
    load = LoadGenerator(daemon.smtp_port, clients=4, messages_per_client=5, tag="stat300")

    ws: WebSocketConnection
    async with open_websocket_url(daemon.url, max_message_size=64 * MiB) as ws:
        sent_at = trio.current_time()
        for batch in batches:
            await ws.send_message(json.dumps(batch))
        report = await load.run()
        replies = [json.loads(await ws.get_message()) for _ in batches]
        stats_took = trio.current_time() - sent_at

    slowest = report.max_latency(Outcome.ACKED)
    emit(
        summary(
            "300 Stat at once, 200 x 1 MB stored",
            slowest_250=slowest,
            stats_took=round(stats_took, 3),
        )
    )
    assert len(report.acked) == 20, report
    assert report.replies_451 == 0
    assert slowest is not None
    assert slowest < 5.0
    answers = [r for reply in replies for r in reply]
    assert len(answers) == 300
    assert all(a["result"]["stats"][-1]["active"] >= 200 for a in answers)


async def test_stat_every_second_at_200k_jobs_costs_mail_little(launch: Launcher) -> None:
    """jobs.Stat polled every second at 200k stored jobs: SMTP intake drops < 10 %,
    and Stat answers in < 50 ms (median), within 10 ms of a call that does not
    touch the store at all (the machine's floor under this load)."""
    daemon = launch.daemon(start=False)
    await build_store(daemon.database, 200_000, 2048, batch=20_000)
    await start(daemon)
    load = LoadGenerator(daemon.smtp_port, clients=8, tag="stat200k", max_duration=120)
    phase, cycles = 2.0, 12
    rates: dict[bool, list[float]] = {False: [], True: []}
    latencies: list[float] = []
    floor: list[float] = []
    poller = subprocess.Popen(  # noqa: ASYNC220 (started once, before the measurement)
        [sys.executable, str(Path(__file__).with_name("stat_poller.py")), daemon.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdin is not None
    assert poller.stdout is not None
    try:
        assert await trio.to_thread.run_sync(poller.stdout.readline) == "ready\n"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await until(lambda: load.acks >= 200, 30, "mail flowing")
            # Interleaved phases, so that the machine's other load hits both alike;
            # a plain phase on either side of each polled one (see `cost` below).
            for polled in (False, True) * cycles + (False,):
                begin, acks = trio.current_time(), load.acks
                if polled:
                    poller.stdin.write(f"{phase}\n")
                    poller.stdin.flush()
                    line = await trio.to_thread.run_sync(poller.stdout.readline)
                    measured = json.loads(line)
                    latencies.extend(measured["stat"])
                    floor.extend(measured["floor"])
                else:
                    await trio.sleep(phase)
                rates[polled].append((load.acks - acks) / (trio.current_time() - begin))
            load.stop()
    finally:
        poller.stdin.close()
        await trio.to_thread.run_sync(poller.wait, 10)

    plain, with_stat = statistics.mean(rates[False]), statistics.mean(rates[True])
    # Each polled phase against the mean of the plain phases just before and
    # just after it, so that intake drifting over the run (the machine's other
    # load, the store growing: CI saw 727 -> 338 msg/s across six plain phases)
    # weighs on neither side; the median of those shrugs off a burst.
    cost = statistics.median(
        1 - polled / statistics.mean(rates[False][i : i + 2])
        for i, polled in enumerate(rates[True])
    )
    emit(
        summary(
            "Stat every second at 200k jobs",
            msgs_per_s_plain=round(plain, 1),
            msgs_per_s_polled=round(with_stat, 1),
            intake_cost=round(cost, 3),
            stats=len(latencies),
            stat_ms_max=round(max(latencies) * 1000, 1),
            stat_ms_median=round(statistics.median(latencies) * 1000, 1),
            floor_ms_median=round(statistics.median(floor) * 1000, 1),
            floor_ms_max=round(max(floor) * 1000, 1),
            plain=[round(r) for r in rates[False]],
            polled=[round(r) for r in rates[True]],
        )
    )
    assert cost < 0.10, rates
    assert statistics.median(latencies) < 0.050, latencies
    assert statistics.median(latencies) - statistics.median(floor) < 0.010, (latencies, floor)


async def test_reserve_stays_fast_with_20k_leased_jobs_at_the_head(launch: Launcher) -> None:
    """Reserve on a pipeline with 20k leased (unacked) jobs ahead of the ready ones
    costs what the same Reserve costs on a pipeline with none leased: each call
    alternates between the two, so the disk's fsync and the machine's load
    (which set the floor of any commit) weigh on both alike."""
    service = launch.jobs_service(start=False)
    await build_store(service.database, 40_000, 200, batch=20_000)
    await build_store(service.database, 1000, 200, pipeline="fresh")
    await start(service)

    async def reserve_one(client: JobsClient, pipeline: str) -> float:
        started = trio.current_time()
        result = await client.call("jobs.Reserve", {"pipeline": pipeline, "max": 1, "lease": 3600})
        assert len(result["jobs"]) == 1
        return trio.current_time() - started

    async with JobsClient.connect(service.url) as client:
        for _ in range(20):  # the oldest 20k jobs of smtp leased and never acked
            result = await client.call(
                "jobs.Reserve", {"pipeline": "smtp", "max": 1000, "lease": 3600}
            )
            assert len(result["jobs"]) == 1000
        leased: list[float] = []
        none_leased: list[float] = []
        for _ in range(200):
            leased.append(await reserve_one(client, "smtp"))
            none_leased.append(await reserve_one(client, "fresh"))
        stats = (await client.call("jobs.Stat", {}))["stats"]

    [smtp] = [s for s in stats if s["pipeline"] == "smtp"]
    assert smtp["reserved"] == 20_200
    median, base = statistics.median(leased), statistics.median(none_leased)
    emit(
        summary(
            "Reserve with 20k leased at the head",
            reserve_ms_median=round(median * 1000, 2),
            reserve_ms_p95=round(sorted(leased)[189] * 1000, 2),
            reserve_ms_median_none_leased=round(base * 1000, 2),
        )
    )
    # Before leased jobs sat at the end of the index, skipping 20k took ~33 ms.
    assert median < 0.005 or median - base < 0.002, (median, base)


# -- a full disk is drained ------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def mount_tmpfs(directory: Path, size: str) -> None:
    """A tmpfs of *size* at *directory*; skip (fail under CI=true) if that is not allowed."""
    directory.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.parametrize(
    "body_size",
    [48_000, 200_000],
    # A job of 256 KiB or more keeps its payload in a file beside the database.
    ids=["jobs in the database", "payload files"],
)
async def test_a_full_disk_is_drained_and_mail_comes_back_without_a_restart(
    launch: Launcher, tmp_path: Path, body_size: int
) -> None:
    disk = tmp_path / "small-disk"
    mount_tmpfs(disk, "64m")
    metrics_port = free_port()
    daemon = launch.daemon(
        {
            "jobs_service": {"database": str(disk / "jobs.sqlite3"), "disk_reserve": 8 * MiB},
            "metrics": {"listen": f"{HOST}:{metrics_port}"},
            "log": {"level": "info"},
        },
        start=False,
        database=disk / "jobs.sqlite3",
    )
    try:
        await start(daemon)
        assert (disk / "jobs.sqlite3-reserve").stat().st_size == 8 * MiB
        load = LoadGenerator(
            daemon.smtp_port, clients=6, body_sizes=(body_size,), tag="fulldisk", max_duration=120
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await until(lambda: load.tempfails >= 20, 90, "451s once the disk is full")
            load.stop()
        filled = load.report()
        await wait_for_log(daemon, "released the 8 MiB reserve")
        status, body = await trio.to_thread.run_sync(http_get, metrics_port, "/readyz")
        assert status == 503, body
        assert "full" in body

        # The consumer drains the queue on the full disk.
        drained: set[str] = set()
        async with JobsClient.connect(daemon.url) as client:
            while True:
                jobs = (
                    await client.call("jobs.Reserve", {"pipeline": "smtp", "max": 50, "lease": 60})
                )["jobs"]
                if not jobs:
                    break
                leases = [{"id": j["id"], "token": j["lease"]["token"]} for j in jobs]
                assert await client.call("jobs.Ack", {"jobs": leases}) == {"acked": len(jobs)}
                drained.update(j["id"] for j in jobs)
        acked = set(filled.acked.values())
        assert acked, "no mail was accepted before the disk filled"
        assert acked <= drained, f"acked jobs the consumer never got: {sorted(acked - drained)[:5]}"

        # No restart: the daemon finds the room and takes mail again.
        await until(lambda: http_get(metrics_port, "/readyz")[0] == 200, 30, "ready again")
        again = LoadGenerator(daemon.smtp_port, clients=2, messages_per_client=5, tag="after")
        after = await again.run()
        assert len(after.acked) == 10, after
        assert after.replies_451 == 0
        _, metrics = await trio.to_thread.run_sync(http_get, metrics_port, "/metrics")
        free = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("trismtp_jobs_store_free_bytes ")
        ]
        assert free, metrics
        sizes = {p.name: p.stat().st_size for p in disk.iterdir()}
        assert free[0] > 8 * MiB, sizes
        log = daemon.log_text()
        assert "has room again" in log
        if body_size == 48_000:  # SQLite itself found the disk full, and said so
            assert "storage available again" in log
        assert "Traceback" not in log
        assert (disk / "jobs.sqlite3-reserve").stat().st_size == 8 * MiB
        emit(
            summary(
                f"database on a 64 MiB tmpfs filled by mail of {body_size} bytes",
                acked_before_full=len(acked),
                replies_451=filled.replies_451,
                drained=len(drained),
                acked_after=len(after.acked),
            )
        )
    finally:
        await trio.to_thread.run_sync(daemon.stop)
        await trio.to_thread.run_sync(
            partial(subprocess.run, ["umount", "-l", str(disk)], check=False)
        )


# -- a damaged database is refused ---------------------------------------------


def damage(path: Path) -> None:
    """64 KiB of garbage over the middle of the file."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(bytes(range(256)) * 256)


@pytest.mark.parametrize("command", ["serve", "jobs serve"])
async def test_a_damaged_database_refuses_the_start_with_one_line(
    launch: Launcher, command: str
) -> None:
    daemon = launch.daemon(start=False)
    await build_store(daemon.database, 400, 3000)
    damage(daemon.database)

    result = await trio.to_thread.run_sync(
        lambda: run_cli(*command.split(), "--config", str(daemon.config), cwd=daemon.workdir)
    )

    assert result.returncode == 2, result
    line = one_line_error(result)
    assert str(daemon.database) in line
    assert "damaged" in line
    assert "docs/operations.md" in line
