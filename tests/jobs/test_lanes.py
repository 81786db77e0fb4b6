"""Two lanes to the jobs service (trismtp/jobs/lanes.py): a big job does not hold up small ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trismtp.jobs.lanes import LARGE_JOB, Lanes
from trismtp.jobs.pusher import Pusher
from trismtp.metrics import Metrics
from trismtp.service.server import serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings, JobsSettings, embedded_url

from .test_pusher import make_job, stored_ids, until


@pytest.fixture
def service_settings(tmp_path: Path) -> JobsServiceSettings:
    return JobsServiceSettings(
        listen="127.0.0.1:0", database=tmp_path / "jobs.sqlite3", pipelines=["smtp"]
    )


async def acked_order(pusher: Lanes | Pusher, nursery: trio.Nursery) -> list[str]:
    """Push a 40 MB job, then at once a small one; the order their acks came in."""
    order: list[str] = []
    big, small = make_job(1, size=40_000_000), make_job(2)

    async def push(job_id: str, encoded: str) -> None:
        await pusher.push(job_id, encoded, "smtp")
        order.append(job_id)

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            clients.start_soon(push, big.id, big.to_json())
            # The big one is queued (and on its way) before the small one.
            await trio.testing.wait_all_tasks_blocked()
            clients.start_soon(push, small.id, small.to_json())
    return order


async def test_a_small_job_is_not_held_up_by_a_big_one_in_flight(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address = await nursery.start(serve_jobs, service_settings)
    lanes = Lanes(JobsSettings(push_timeout=30), embedded_url(address))
    await nursery.start(lanes.run)
    assert await acked_order(lanes, nursery) == ["job-2", "job-1"]
    assert stored_ids(service_settings.database) == ["job-1", "job-2"]
    lanes.close()


async def test_one_pusher_makes_the_small_job_wait_for_the_big_one(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    # What the lanes are for: on one connection the small job waits for the
    # big one's whole round trip.
    address: HostPort = await nursery.start(serve_jobs, service_settings)
    pusher = Pusher(JobsSettings(push_timeout=30), embedded_url(address))
    await nursery.start(pusher.run)
    assert await acked_order(pusher, nursery) == ["job-1", "job-2"]
    pusher.close()


async def test_lanes_report_as_one_pusher(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address = await nursery.start(serve_jobs, service_settings)
    metrics = Metrics()
    lanes = Lanes(JobsSettings(), embedded_url(address), metrics=metrics)
    assert lanes.outage is None  # not known to be down before the first connect
    await nursery.start(lanes.run)
    await until(lambda: lanes.connected, "both lanes to connect", 10)
    assert lanes.unavailable is None
    assert metrics.registry.get_sample_value("trismtp_pusher_connected") == 1
    job = make_job(3, size=LARGE_JOB)
    await lanes.push(job.id, job.to_json(), "smtp")
    assert lanes.queued == 0
    assert stored_ids(service_settings.database) == ["job-3"]
    lanes.close()
