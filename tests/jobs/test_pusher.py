"""The batching pusher against the real jobs service, in process, on 127.0.0.1."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from pydantic import SecretStr
from trio_websocket import WebSocketRequest, serve_websocket

from trismtp.jobs.model import Job, JobOptions
from trismtp.jobs.pusher import Pusher, PushFailed
from trismtp.metrics import Metrics
from trismtp.service.server import serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings, JobsSettings, embedded_url


async def until(condition: Callable[[], object], what: str, within: float) -> None:
    """Poll *condition* until it holds; fail after *within* seconds."""
    deadline = trio.current_time() + within
    while not condition():
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await trio.sleep(0.01)


def make_job(n: int, pipeline: str = "smtp", size: int = 10) -> Job:
    return Job(
        job="smtp.email",
        id=f"job-{n}",
        payload="x" * size,
        headers={"uuid": [f"job-{n}"]},
        options=JobOptions(pipeline=pipeline),
    )


async def push_and_note(pusher: Pusher, n: int, acked: list[str], *, last: bool = False) -> None:
    """Push job *n*; note its id in *acked* once the service has it durably."""
    job = make_job(n)
    await pusher.push(job.id, job.to_json(), "smtp", last=last)
    acked.append(job.id)


def stored_ids(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return sorted(row[0] for row in db.execute("SELECT id FROM jobs"))


@pytest.fixture
def service_settings(tmp_path: Path) -> JobsServiceSettings:
    return JobsServiceSettings(
        listen="127.0.0.1:0", database=tmp_path / "jobs.sqlite3", pipelines=["smtp"]
    )


async def start_service(
    nursery: trio.Nursery, settings: JobsServiceSettings
) -> tuple[HostPort, trio.CancelScope]:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[HostPort]) -> None:
        with scope:
            await serve_jobs(settings, task_status=task_status)

    address: HostPort = await nursery.start(run)
    return address, scope


async def test_concurrent_pushes_are_batched_and_each_stored_once(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, _ = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(batch_max_jobs=7, batch_linger=0.01), embedded_url(address))
    nursery.start_soon(pusher.run)
    acked: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for n in range(50):
                clients.start_soon(push_and_note, pusher, n, acked)
    assert len(acked) == 50
    # Acked means committed: a separate connection sees every job, once.
    assert stored_ids(service_settings.database) == sorted(f"job-{n}" for n in range(50))
    pusher.close()


async def test_a_job_marked_last_ends_the_linger_of_the_batch_it_joins(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, _ = await start_service(nursery, service_settings)
    metrics = Metrics()
    # No test waits out this linger: the batch below goes because of `last`.
    pusher = Pusher(
        JobsSettings(batch_linger=60, push_timeout=30), embedded_url(address), metrics=metrics
    )
    await nursery.start(pusher.run)
    acked: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            for n in range(3):
                clients.start_soon(push_and_note, pusher, n, acked)
            # All three in the lingering batch, which would wait 60 s for more.
            await trio.testing.wait_all_tasks_blocked()
            assert acked == []
            clients.start_soon(partial(push_and_note, pusher, 3, acked, last=True))
    assert sorted(acked) == [f"job-{n}" for n in range(4)]
    assert stored_ids(service_settings.database) == sorted(acked)
    assert metrics.registry.get_sample_value("trismtp_push_batch_size_count") == 1


async def test_close_delivers_everything_queued_then_run_returns(
    service_settings: JobsServiceSettings,
) -> None:
    results: list[str] = []
    async with trio.open_nursery() as nursery:
        address, service = await start_service(nursery, service_settings)
        pusher = Pusher(JobsSettings(batch_max_jobs=4), embedded_url(address))
        with trio.fail_after(20):
            async with trio.open_nursery() as sessions:
                for n in range(20):
                    sessions.start_soon(push_and_note, pusher, n, results)
                # The jobs are queued before the pusher task even starts.
                await trio.testing.wait_all_tasks_blocked()
                assert pusher.queued == 20
                pusher.close()
                await pusher.run()
        service.cancel()
    assert len(results) == 20
    assert len(stored_ids(service_settings.database)) == 20


async def test_service_down_gives_push_failed_within_push_timeout(tmp_path: Path) -> None:
    # Nothing listens on this port: bind one and keep it closed to connections.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pusher = Pusher(JobsSettings(push_timeout=0.5), f"ws://127.0.0.1:{port}/rpc")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher.run)
            start = trio.current_time()
            with trio.fail_after(5), pytest.raises(PushFailed, match=r"push_timeout|unavailable"):
                await pusher.push("job-1", make_job(1).to_json(), "smtp")
            assert trio.current_time() - start >= 0.5
            pusher.close()


async def test_pusher_reconnects_when_the_service_comes_back(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, service = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(push_timeout=10), embedded_url(address))
    nursery.start_soon(pusher.run)
    await pusher.push("job-0", make_job(0).to_json(), "smtp")

    service.cancel()  # the service goes away...
    fixed = JobsServiceSettings(
        listen=str(address), database=service_settings.database, pipelines=["smtp"]
    )
    done = trio.Event()

    async def push_while_down() -> None:
        job = make_job(1)
        await pusher.push(job.id, job.to_json(), "smtp")
        done.set()

    nursery.start_soon(push_while_down)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    await start_service(nursery, fixed)  # ...and comes back on the same port
    with trio.fail_after(10):
        await done.wait()
    assert stored_ids(service_settings.database) == ["job-0", "job-1"]
    pusher.close()


async def test_service_error_fails_the_batch_at_once(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, _ = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(push_timeout=30), embedded_url(address))
    nursery.start_soon(pusher.run)
    job = make_job(1, pipeline="undeclared")
    with trio.fail_after(5), pytest.raises(PushFailed, match="-32001"):
        await pusher.push(job.id, job.to_json(), "undeclared")
    assert stored_ids(service_settings.database) == []
    pusher.close()


async def test_wrong_token_is_reported_and_nothing_is_acked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    settings = JobsServiceSettings(
        listen="127.0.0.1:0", database=tmp_path / "j.sqlite3", token=SecretStr("right")
    )
    address, _ = await start_service(nursery, settings)
    pusher = Pusher(JobsSettings(push_timeout=0.5), embedded_url(address), token="wrong")
    nursery.start_soon(pusher.run)
    with trio.fail_after(5), pytest.raises(PushFailed):
        await pusher.push("job-1", make_job(1).to_json(), "smtp")
    assert stored_ids(settings.database) == []
    pusher.close()


async def test_a_job_larger_than_batch_max_bytes_goes_alone(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, _ = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(batch_max_bytes=1000, batch_linger=0.05), embedded_url(address))
    nursery.start_soon(pusher.run)
    async with trio.open_nursery() as sessions:
        for n, size in enumerate([10, 5000, 10, 900, 900]):
            job = make_job(n, size=size)
            sessions.start_soon(pusher.push, job.id, job.to_json(), "smtp")
    assert len(stored_ids(service_settings.database)) == 5
    pusher.close()


async def test_batches_that_reach_the_store_too_late_store_nothing(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    # The service's clock is ahead of ours by more than push_timeout: to it,
    # every batch arrives after its sessions gave up. That is what a stalled
    # service sees when it wakes up.
    ahead = 60.0
    address: HostPort = await nursery.start(
        partial(serve_jobs, service_settings, clock=lambda: time.time() + ahead)
    )
    late = Pusher(JobsSettings(push_timeout=0.5), embedded_url(address), expire_batches=True)
    nursery.start_soon(late.run)
    with trio.fail_after(5), pytest.raises(PushFailed):
        await late.push("job-1", make_job(1).to_json(), "smtp")
    assert stored_ids(service_settings.database) == []

    # Without expiry the same service stores the batch.
    plain = Pusher(JobsSettings(push_timeout=5), embedded_url(address), expire_batches=False)
    nursery.start_soon(plain.run)
    await plain.push("job-2", make_job(2).to_json(), "smtp")
    assert stored_ids(service_settings.database) == ["job-2"]
    late.close()
    plain.close()


async def test_expiring_batches_are_stored_when_in_time(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    address, _ = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(batch_max_jobs=5), embedded_url(address), expire_batches=True)
    nursery.start_soon(pusher.run)
    async with trio.open_nursery() as sessions:
        for n in range(20):
            job = make_job(n)
            sessions.start_soon(pusher.push, job.id, job.to_json(), "smtp")
    assert len(stored_ids(service_settings.database)) == 20
    pusher.close()


async def test_a_full_queue_is_reported_as_overload() -> None:
    # A destination that takes TCP connections and never answers the
    # WebSocket handshake: while run() waits to reconnect to it (up to the
    # client's connect timeout, far past push_timeout), nothing drains the
    # queue, and its one place stays taken.
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    reconnecting = trio.Event()

    async def accept() -> None:
        while True:
            accepted.append(await listener.accept())
            if len(accepted) == 2:  # the connect at start gave up; this is _next_job's
                reconnecting.set()

    async def first() -> None:
        with pytest.raises(PushFailed, match="no ack"):  # it got in, and waited for an ack
            await pusher.push("job-1", make_job(1).to_json(), "smtp")

    pusher = Pusher(JobsSettings(push_timeout=0.3, queue_size=1), f"ws://127.0.0.1:{port}/rpc")
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        nursery.start_soon(pusher.run)
        await reconnecting.wait()
        async with trio.open_nursery() as sessions:
            sessions.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            assert pusher.queued == 1
            with trio.fail_after(5), pytest.raises(PushFailed, match=r"stayed full .* overloaded"):
                await pusher.push("job-2", make_job(2).to_json(), "smtp")
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()


async def test_each_push_times_out_at_its_own_deadline(nursery: trio.Nursery) -> None:
    # A jobs service that takes the connection and the batches and never
    # answers (stalled): every push ends at push_timeout after its own start.
    async def stalled(request: WebSocketRequest) -> None:
        await request.accept()
        await trio.sleep_forever()

    server = await nursery.start(serve_websocket, stalled, "127.0.0.1", 0, None)
    timeout = 0.5
    pusher = Pusher(JobsSettings(push_timeout=timeout), f"ws://127.0.0.1:{server.port}/rpc")
    nursery.start_soon(pusher.run)
    ended: dict[str, float] = {}

    async def push(n: int) -> None:
        began = trio.current_time()
        with pytest.raises(PushFailed, match=r"no ack .* within jobs\.push_timeout \(0\.5 s\)"):
            await pusher.push(f"job-{n}", make_job(n).to_json(), "smtp")
        ended[f"job-{n}"] = trio.current_time() - began

    with trio.fail_after(10):
        async with trio.open_nursery() as sessions:
            sessions.start_soon(push, 1)
            await trio.sleep(timeout / 2)
            sessions.start_soon(push, 2)
            sessions.start_soon(push, 3)
    # Not before its own deadline, and not held until a later one's.
    assert all(timeout <= waited < 2 * timeout for waited in ended.values()), ended
    pusher.close()


async def test_a_stall_is_named_to_every_session_and_logged_once_per_batch(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # Two jobs pushed 0.2 s apart go in one batch (the linger holds the
    # first), which the service never answers: the first job's deadline
    # comes while the batch still waits for the second's. Each session is
    # told why at its own deadline, and the log has one line for the batch.
    async def stalled(request: WebSocketRequest) -> None:
        await request.accept()
        await trio.sleep_forever()

    server = await nursery.start(serve_websocket, stalled, "127.0.0.1", 0, None)
    settings = JobsSettings(push_timeout=1.0, batch_linger=0.4)
    pusher = Pusher(settings, f"ws://127.0.0.1:{server.port}/rpc")
    nursery.start_soon(pusher.run)
    errors: dict[str, str] = {}

    async def push(n: int) -> None:
        with pytest.raises(PushFailed) as failed:
            await pusher.push(f"job-{n}", make_job(n).to_json(), "smtp")
        errors[f"job-{n}"] = str(failed.value)

    with trio.fail_after(10):
        await until(lambda: pusher.connected, "the connection", within=5)
        async with trio.open_nursery() as sessions:
            sessions.start_soon(push, 1)
            await trio.sleep(0.2)
            sessions.start_soon(push, 2)
    stall = (
        "no ack from the jobs service within jobs.push_timeout (1 s): "
        "no reply from the jobs service in time (stalled or overloaded)"
    )
    assert errors == {"job-1": stall, "job-2": stall}
    failures = [r.getMessage() for r in caplog.records if "could not push" in r.getMessage()]
    assert failures == [
        "could not push 2 jobs (job-1, job-2) within jobs.push_timeout: "
        "no reply from the jobs service in time (stalled or overloaded)"
    ]
    pusher.close()


async def test_answered_pushes_are_not_kept(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    # The pusher notes every push until it is answered, to time it out;
    # thousands answered leave no trace behind them.
    address, _ = await start_service(nursery, service_settings)
    pusher = Pusher(JobsSettings(), embedded_url(address))
    nursery.start_soon(pusher.run)
    for wave in range(20):
        async with trio.open_nursery() as sessions:
            for n in range(50):
                job = make_job(wave * 50 + n)
                sessions.start_soon(pusher.push, job.id, job.to_json(), "smtp")
    assert len(stored_ids(service_settings.database)) == 1000
    assert len(pusher._unanswered) <= 50
    pusher.close()


async def test_outage_is_known_while_nothing_listens_and_ends_on_reconnect(
    nursery: trio.Nursery, service_settings: JobsServiceSettings
) -> None:
    with trio.socket.socket() as sock:  # the port, held but not listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pusher = Pusher(JobsSettings(push_timeout=10), f"ws://127.0.0.1:{port}/rpc")
        assert pusher.outage is None, "not known before the first connect"
        nursery.start_soon(pusher.run)
        await until(lambda: pusher.outage is not None, "the pusher to know", 5)
    assert pusher.outage is not None
    assert pusher.outage.startswith("no connection to the jobs service: "), pusher.outage
    assert "Connection refused" in pusher.outage

    # The service comes up on that port: the idle pusher reconnects by itself.
    await start_service(
        nursery, service_settings.model_copy(update={"listen": f"127.0.0.1:{port}"})
    )
    await until(lambda: pusher.outage is None, "the outage to end", 10)
    assert pusher.connected
    await pusher.push("job-1", make_job(1).to_json(), "smtp")
    pusher.close()
