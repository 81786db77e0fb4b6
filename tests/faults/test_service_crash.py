"""The jobs service dies under load: SIGKILL once, SIGTERM, and SIGKILL over and over.

A separate ``trismtp jobs serve``; the daemon's pusher reaches it over
``ws://``. Every scenario runs ≥ 8 SMTP clients sending without pause and
checks the delivery invariant against the SQLite file afterwards: every
``250 … queued as <id>`` is stored exactly once (docs/architecture.md,
"Delivery guarantee").
"""

from __future__ import annotations

import random
import signal

import pytest
import trio

from ..e2e.trismtp_e2e import Launcher
from .harness import (
    assert_invariant,
    check_store,
    emit,
    fault_for,
    integrity_check,
    kill,
    more_acks,
    more_tempfails,
    open_fds,
    remote_daemon,
    start,
    start_load,
    stored_message_ids,
    summarize,
    until,
    wait_exit,
    wait_for_log,
)
from .load import LoadGenerator

pytestmark = pytest.mark.faults

PUSH_TIMEOUT = 1.5
CLIENTS = 8


async def test_service_sigkill_then_restart_loses_no_acked_message(launch: Launcher) -> None:
    """Scenario 1: SIGKILL mid-load; 451 while it is gone; 250 again once restarted."""
    down_for = 1.5
    service = launch.jobs_service(start=False)
    await start(service)
    daemon = remote_daemon(launch, service.url, {"push_timeout": PUSH_TIMEOUT})
    await start(daemon)
    await wait_for_log(daemon, "connected to the jobs service")

    load = LoadGenerator(daemon.smtp_port, clients=CLIENTS, tag="s1", reply_timeout=10)
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 40), 20, "40 acks before the fault")
        killed_at = trio.current_time()
        await kill(service)
        await until(more_tempfails(load, 1), PUSH_TIMEOUT + 5, "a 451 while it is gone")
        await fault_for(down_for - (trio.current_time() - killed_at))
        await start(service)
        await until(more_acks(load, 40), 20, "250s after the restart")
        load.stop()
    report = load.report()
    check = check_store(report, service.database)
    emit(summarize("1 service SIGKILL + restart", report, check))
    assert_invariant(check, report)
    assert report.deferred > 0, "451s (at the dot or before the upload) while it was down"
    assert report.unanswered == 0, "the daemon answers every dot, service or not"
    assert daemon.running


async def test_service_sigterm_answers_committed_batches_then_exits_0(launch: Launcher) -> None:
    """Scenario 8: SIGTERM mid-load; batches it holds are committed and answered."""
    service = launch.jobs_service(start=False)
    await start(service)
    daemon = remote_daemon(launch, service.url, {"push_timeout": PUSH_TIMEOUT})
    await start(daemon)
    await wait_for_log(daemon, "connected to the jobs service")

    load = LoadGenerator(daemon.smtp_port, clients=CLIENTS, tag="s8", reply_timeout=10)
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 60), 20, "60 acks before the fault")
        stopped_at = trio.current_time()
        service.signal(signal.SIGTERM)
        status = await wait_exit(service, 10)
        stop_time = trio.current_time() - stopped_at
        # Once it is gone, sessions get 451: the daemon keeps answering.
        await until(more_tempfails(load, 1), PUSH_TIMEOUT + 5, "a 451 after the stop")
        load.stop()
    report = load.report()
    check = check_store(report, service.database)
    emit(summarize("8 service SIGTERM", report, check, exit_status=status, stop_s=stop_time))
    assert_invariant(check, report)
    assert status == 0, service.log_tail()
    assert stop_time < 5 + 2, f"the service took {stop_time:.1f} s to stop"
    assert report.unanswered == 0
    assert "Traceback" not in service.log_text()


async def test_service_killed_during_write_bursts_keeps_a_sound_file(launch: Launcher) -> None:
    """Scenario 9: 16 SIGKILL/restart cycles at random points of the write load.

    The file as the crash left it, and again after the restart (once the
    service has recovered the WAL), passes ``PRAGMA integrity_check``; after
    the restart it holds every id acked so far.
    """
    cycles = 16
    rng = random.Random()
    service = launch.jobs_service(start=False)
    await start(service)
    daemon = remote_daemon(launch, service.url, {"push_timeout": PUSH_TIMEOUT})
    await start(daemon)
    await wait_for_log(daemon, "connected to the jobs service")

    load = LoadGenerator(
        daemon.smtp_port, clients=CLIENTS, tag="s9", reply_timeout=10, max_duration=150
    )
    checks: list[tuple[int, int, str]] = []
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 20), 20, "acks before the first kill")
        fds_before = open_fds(daemon.pid)
        for cycle in range(cycles):
            # Writes flow through this incarnation of the service...
            await until(more_acks(load, 1), 20, f"cycle {cycle}: acks from the service")
            # ...and it dies at a random point of the burst.
            await fault_for(rng.uniform(0.05, 0.4))
            await kill(service)
            crashed = await trio.to_thread.run_sync(integrity_check, service.database)
            assert crashed == ["ok"], f"cycle {cycle}: the crashed file says {crashed[:5]}"
            await start(service)
            acked = load.acked_now()
            integrity = await trio.to_thread.run_sync(integrity_check, service.database)
            stored = await trio.to_thread.run_sync(stored_message_ids, service.database)
            missing = [job for job in acked.values() if job not in stored]
            assert integrity == ["ok"], f"cycle {cycle}: integrity_check says {integrity[:5]}"
            assert not missing, f"cycle {cycle}: acked but gone after the crash: {missing[:5]}"
            checks.append((cycle, len(acked), integrity[0]))
        await until(more_acks(load, 20), 20, "acks after the last restart")
        # Sixteen reconnects leave no connection behind.
        fds_after = await until(
            lambda: (n := open_fds(daemon.pid)) <= fds_before + 2 and n,
            10,
            f"the daemon's file descriptors back to ~{fds_before}",
            detail=lambda: f"now {open_fds(daemon.pid)}",
        )
        load.stop()
    report = load.report()
    check = check_store(report, service.database)
    emit(
        summarize(
            "9 service SIGKILL x16 (crash consistency)",
            report,
            check,
            cycles=cycles,
            integrity_checks_ok=len(checks),
            fds_before=fds_before,
            fds_after=fds_after,
        )
    )
    assert_invariant(check, report)
    assert len(checks) == cycles
    assert report.unanswered == 0
