"""The daemon itself is stopped under load: SIGTERM (graceful) and SIGKILL.

Embedded jobs service. SIGTERM: every session that sent its final dot gets
its reply, the pusher is flushed, the process exits 0 within
``shutdown.grace``, and after a restart every acked id is in the store.
SIGKILL: the clients in flight get no reply (they would retry), and every
acked id is in the file the dead process left behind.
"""

from __future__ import annotations

import random
import signal

import pytest
import trio

from ..e2e.trismtp_e2e import Daemon, Launcher
from .harness import (
    assert_invariant,
    check_store,
    emit,
    fault_for,
    integrity_check,
    kill,
    more_acks,
    start,
    start_load,
    summarize,
    until,
    wait_exit,
)
from .load import LoadGenerator, LoadReport

pytestmark = pytest.mark.faults

PUSH_TIMEOUT = 2.0
GRACE = 5.0


def _daemon(launch: Launcher) -> Daemon:
    return launch.daemon(
        {
            "jobs": {"push_timeout": PUSH_TIMEOUT},
            "shutdown": {"grace": GRACE},
            "log": {"level": "info"},
        },
        start=False,
    )


def _across(report: LoadReport, at: float) -> int:
    """Attempts whose dot was sent before *at* and whose reply came after it."""
    return sum(
        1
        for attempt in report.attempts()
        if attempt.sent_at <= at
        and attempt.latency is not None
        and attempt.sent_at + attempt.latency >= at
    )


async def test_daemon_sigterm_answers_every_dot_and_exits_0(launch: Launcher) -> None:
    """Scenario 6: SIGTERM mid-load; replies to every dot; flush; exit 0 in grace."""
    daemon = _daemon(launch)
    await start(daemon)
    # One client sends 1 MB messages: the signal may well find it mid-upload.
    load = LoadGenerator(
        daemon.smtp_port, clients=8, big_clients=1, tag="s6", reply_timeout=GRACE + 5
    )
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 100), 20, "100 acks before the signal")
        await fault_for(random.uniform(0, 0.3))  # a random point of the load
        # The clients keep going through the shutdown: those inside a
        # transaction finish it, the others are told 421 and find the
        # listener closed.
        in_flight = load.in_flight
        signalled_at = trio.current_time()
        daemon.signal(signal.SIGTERM)
        status = await wait_exit(daemon, GRACE + 5)
        stop_time = trio.current_time() - signalled_at
        load.stop()
    report = load.report()
    log = daemon.log_text()
    # The file as the stopped daemon left it; then again after a restart.
    check_stopped = check_store(report, daemon.database)
    await start(daemon)
    check = check_store(report, daemon.database)
    emit(
        summarize(
            "6 daemon SIGTERM (embedded)",
            report,
            check,
            exit_status=status,
            stop_s=round(stop_time, 3),
            in_flight_at_signal=in_flight,
            answered_across_signal=_across(report, signalled_at),
        )
    )
    assert_invariant(check_stopped, report)
    assert_invariant(check, report)
    assert report.unanswered == 0, [a.reply for a in report.attempts() if a.latency is None][:5]
    assert status == 0, log[-3000:]
    assert stop_time <= GRACE + 1, f"stopped after {stop_time:.2f} s (grace {GRACE:g} s)"
    assert "pusher flushed" in log
    assert "Traceback" not in log


async def test_daemon_sigkill_keeps_every_acked_message(launch: Launcher) -> None:
    """Scenario 7: SIGKILL mid-load; in-flight clients get nothing; acked are stored."""
    daemon = _daemon(launch)
    await start(daemon)
    load = LoadGenerator(daemon.smtp_port, clients=8, tag="s7", reply_timeout=GRACE + 5)
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 100), 20, "100 acks before the kill")
        await fault_for(random.uniform(0, 0.3))  # a random point of the load
        in_flight = load.in_flight
        status = await kill(daemon)
        # Reconnects are refused from now on; the in-flight attempts see EOF.
        load.stop()
    report = load.report()
    integrity = integrity_check(daemon.database)
    check = check_store(report, daemon.database)
    emit(
        summarize(
            "7 daemon SIGKILL (embedded)",
            report,
            check,
            in_flight_at_kill=in_flight,
            integrity=integrity[0],
        )
    )
    assert status == -signal.SIGKILL
    assert_invariant(check, report)
    assert integrity == ["ok"], integrity[:5]
    # The killed process leaves a file the next one opens.
    await start(daemon)
    assert check_store(report, daemon.database).ok
