"""The jobs service stalls (SIGSTOP) under load: bounded waits, bounded memory.

A stopped process keeps its sockets: the kernel still completes TCP
handshakes and buffers bytes, nobody answers. That is the nastiest kind of
"down" for a client, since nothing fails, everything just waits. The daemon
must answer ``451`` once ``jobs.push_timeout`` has passed (not later), must
not hoard memory while it waits, and must deliver again once the service
runs again (SIGCONT).

Memory is read from /proc/PID/status: VmRSS sampled every 50 ms, and VmHWM,
the kernel's own high-water mark of the resident set since the start.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from ..e2e.trismtp_e2e import Launcher
from .harness import (
    RssSampler,
    StoreCheck,
    assert_invariant,
    check_store,
    emit,
    fault_for,
    more_acks,
    more_tempfails,
    open_fds,
    remote_daemon,
    start,
    start_load,
    summarize,
    until,
    wait_for_log,
)
from .load import LoadGenerator, LoadReport, Outcome

pytestmark = pytest.mark.faults

MIB = 1024
"""KiB in a MiB (/proc reports KiB)."""

# The bound for the daemon's resident set. Idle, the daemon is ~50 MiB
# (CPython, trio, pydantic). What it may add while the service stalls is
# bounded by design: each session holds one message and its job (a 1 MB
# message is ~1 MB raw + ~1 MB decoded body + its JSON, a few MB), the channel
# holds queue_size jobs and the pusher one batch (batch_max_bytes, 8 MB by
# default). For the scenarios here that is well under 100 MiB. 300 MiB allows
# for allocator slack and still catches a queue or buffer that grows with time
# or with the number of retries.
RSS_BOUND_MIB = 300
# A 451 is due push_timeout after the session handed its job over; on top of
# that come the parse of the message (a 1 MB one in a worker thread) and the
# scheduling of this 2-core machine, where the test process runs the clients.
LATENCY_MARGIN = 1.0


def _mib(kib: int) -> float:
    return round(kib / MIB, 1)


@dataclass(frozen=True)
class _Stall:
    """What a stall scenario measured."""

    report: LoadReport
    check: StoreCheck
    rss_before: int
    rss_peak: int
    rss_after: int
    fds_before: int
    fds_after: int
    log: str
    """The daemon's log."""


async def _stall_under_load(
    launch: Launcher,
    load_for: Callable[[int], LoadGenerator],
    *,
    jobs: dict[str, Any],
    stall: float,
    acks_around: int,
    tempfails_during: int,
) -> _Stall:
    """Load, SIGSTOP the service for *stall* s, SIGCONT, load again; measure."""
    push_timeout = float(jobs["push_timeout"])
    service = launch.jobs_service(start=False)
    await start(service)
    daemon = remote_daemon(launch, service.url, jobs)
    await start(daemon)
    await wait_for_log(daemon, "connected to the jobs service")

    load = load_for(daemon.smtp_port)
    sampler = RssSampler(daemon.pid)
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, acks_around), 30, f"{acks_around} acks before the stall")
        rss_before, fds_before = sampler.now_kib(), open_fds(daemon.pid)
        nursery.start_soon(sampler.run)
        stalled_at = trio.current_time()
        service.signal(signal.SIGSTOP)
        try:
            await until(
                more_tempfails(load, tempfails_during),
                push_timeout + 5,
                f"{tempfails_during} 451s during the stall",
            )
            await fault_for(stall - (trio.current_time() - stalled_at))
        finally:
            service.signal(signal.SIGCONT)
        await until(more_acks(load, acks_around), 30, "250s after SIGCONT")
        rss_after = sampler.now_kib()
        # Connections dropped during the stall may take CLOSE_TIMEOUT (2 s)
        # to go; then the daemon holds what it held before.
        fds_after = await until(
            lambda: (n := open_fds(daemon.pid)) <= fds_before + 2 and n,
            10,
            f"the daemon's file descriptors back to ~{fds_before}",
            detail=lambda: f"now {open_fds(daemon.pid)}",
        )
        peak = sampler.peak_kib()
        load.stop()
        await until(lambda: load.finished, 30, "the load to finish")
        nursery.cancel_scope.cancel()
    report = load.report()
    check = check_store(report, service.database)
    return _Stall(
        report, check, rss_before, peak, rss_after, fds_before, fds_after, daemon.log_text()
    )


def _emit(name: str, stall: _Stall, **extra: Any) -> None:
    emit(
        summarize(
            name,
            stall.report,
            stall.check,
            **extra,
            rss_before_mib=_mib(stall.rss_before),
            rss_peak_mib=_mib(stall.rss_peak),
            rss_after_mib=_mib(stall.rss_after),
            fds_before=stall.fds_before,
            fds_after=stall.fds_after,
        )
    )


def _assert_bounded(stall: _Stall, push_timeout: float) -> None:
    report = stall.report
    assert_invariant(stall.check, report)
    assert report.unanswered == 0
    # Sessions wait (the service is silent, nothing fails fast), for
    # push_timeout and not much longer.
    shortest = report.min_latency(Outcome.TEMPFAIL)
    longest = report.max_latency(Outcome.TEMPFAIL)
    assert shortest is not None
    assert longest is not None
    assert shortest >= push_timeout - 0.05, f"a 451 after {shortest:.3f} s only"
    assert longest <= push_timeout + LATENCY_MARGIN, f"a 451 after {longest:.3f} s"
    assert stall.rss_peak < RSS_BOUND_MIB * MIB, f"daemon peak RSS {_mib(stall.rss_peak)} MiB"


async def test_service_stall_gives_451_in_time_and_bounded_memory(launch: Launcher) -> None:
    """Scenario 2: SIGSTOP longer than push_timeout, then SIGCONT."""
    push_timeout = 1.0
    stall = 3.0
    # Two of the eight clients send 1 MB messages, the others 1-4 KB.
    result = await _stall_under_load(
        launch,
        lambda port: LoadGenerator(
            port, clients=8, big_clients=2, tag="s2", reply_timeout=push_timeout + 10
        ),
        jobs={"push_timeout": push_timeout},
        stall=stall,
        acks_around=40,
        tempfails_during=8,
    )
    _emit("2 service SIGSTOP > push_timeout", result, push_timeout=push_timeout, stall_s=stall)
    _assert_bounded(result, push_timeout)
    # The log gives the cause: a stall, not a refused or lost connection.
    assert "within jobs.push_timeout: no reply from the jobs service in time" in result.log
    assert "RCPT refused" not in result.log, "a stall is not a known outage"


async def test_full_channel_makes_sessions_wait_then_451(launch: Launcher) -> None:
    """Scenario 4: 120 sessions, jobs.queue_size 8, the service stalled.

    At most queue_size jobs wait in the channel and batch_max_jobs are in the
    pusher's batch; every other session waits for room in the channel. Far
    more 451s than those two hold, each after push_timeout, show that the
    wait for room is bounded by push_timeout too.
    """
    push_timeout = 1.5
    stall = 3.0
    queue_size, batch_max_jobs = 8, 4
    result = await _stall_under_load(
        launch,
        lambda port: LoadGenerator(port, clients=120, tag="s4", reply_timeout=push_timeout + 10),
        jobs={
            "push_timeout": push_timeout,
            "queue_size": queue_size,
            "batch_max_jobs": batch_max_jobs,
        },
        stall=stall,
        acks_around=200,
        tempfails_during=queue_size + batch_max_jobs + 50,
    )
    _emit(
        "4 channel full (queue_size 8, 120 sessions)",
        result,
        push_timeout=push_timeout,
        queue_size=queue_size,
        batch_max_jobs=batch_max_jobs,
    )
    _assert_bounded(result, push_timeout)
    # Sessions whose job waited for room or in the queue past push_timeout
    # say the cause: overload, not a lost connection.
    assert "overloaded, more mail than the jobs service takes" in result.log
    assert "RCPT refused" not in result.log, "a stall is not a known outage"


def _raise_nofile(target: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))


@pytest.mark.slow
async def test_peak_rss_of_1000_sessions_with_1mb_each(launch: Launcher) -> None:
    """The figure for the docs: 1,000 concurrent sessions, each sending 1 MB.

    Embedded jobs service, default batching; every session sends one message.
    Prints the daemon's peak RSS (VmHWM). Run with TRISMTP_SLOW=1.
    """
    sessions = 1000
    _raise_nofile(4 * sessions + 256)  # the daemon inherits it
    daemon = launch.daemon(
        {
            "smtp": {"max_connections": sessions + 100},
            "jobs": {"push_timeout": 120},
            "log": {"level": "info"},
        },
        start=False,
    )
    await start(daemon)
    load = LoadGenerator(
        daemon.smtp_port,
        clients=sessions,
        big_clients=sessions,
        messages_per_client=1,
        tag="rss",
        command_timeout=120,
        reply_timeout=180,
        max_duration=600,
    )
    sampler = RssSampler(daemon.pid, interval=0.1)
    idle = sampler.now_kib()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        report = await load.run()
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    peak = sampler.peak_kib()
    check = check_store(report, daemon.database)
    emit(
        summarize(
            "bench 1000 sessions x 1 MB",
            report,
            check,
            rss_idle_mib=_mib(idle),
            rss_peak_mib=_mib(peak),
            elapsed_s=round(elapsed, 1),
            cpu_count=os.cpu_count(),
        )
    )
    print(f"PEAK RSS: {_mib(peak)} MiB for {sessions} sessions x 1 MB (idle {_mib(idle)} MiB)")
    assert_invariant(check, report)
    assert len(report.acked) == sessions
