"""The store cannot write: the jobs service's files may not grow (RLIMIT_FSIZE).

``resource.prlimit`` lowers the soft file-size limit of the running service to
one byte: every write past the first byte of any file fails with EFBIG (CPython
ignores SIGXFSZ), so SQLite's next commit fails like on a full disk. The
service must answer ``-32003`` (storage unavailable) and stay up, sessions get
``451``; once the limit is raised again the same process stores again and
sessions get ``250``. The service's log goes through a pipe (a pipe has no
size limit), so it survives the fault.
"""

from __future__ import annotations

import pytest
import trio

from ..e2e.trismtp_e2e import Launcher
from .harness import (
    PipedLogJobsService,
    assert_invariant,
    check_store,
    emit,
    fault_for,
    integrity_check,
    more_acks,
    more_tempfails,
    remote_daemon,
    set_fsize_limit,
    start,
    start_load,
    summarize,
    until,
    wait_for_log,
)
from .load import LoadGenerator, Outcome

pytestmark = pytest.mark.faults

PUSH_TIMEOUT = 1.5
FULL_FOR = 2.0


async def test_store_that_cannot_grow_gives_451_then_recovers(launch: Launcher) -> None:
    """Scenario 5: EFBIG under load → -32003 → 451; limit raised → 250."""
    workdir = launch.workdir / "service"
    workdir.mkdir()
    service = launch.group.add(PipedLogJobsService(workdir))
    await start(service)
    daemon = remote_daemon(launch, service.url, {"push_timeout": PUSH_TIMEOUT})
    await start(daemon)
    await wait_for_log(daemon, "connected to the jobs service")

    load = LoadGenerator(daemon.smtp_port, clients=8, tag="s5", reply_timeout=10)
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 40), 20, "40 acks before the fault")
        set_fsize_limit(service.pid, 1)
        try:
            await until(more_tempfails(load, 8), 10, "451s while it cannot write")
            await fault_for(FULL_FOR)
            assert service.running, "the jobs service died of a full disk"
        finally:
            set_fsize_limit(service.pid, None)
        await until(more_acks(load, 40), 20, "250s once it can write again")
        load.stop()
    report = load.report()
    check = check_store(report, service.database)
    integrity = integrity_check(service.database)
    daemon_log = daemon.log_text()
    refused = daemon_log.count("error -32003")
    emit(
        summarize(
            "5 store cannot grow (RLIMIT_FSIZE)",
            report,
            check,
            batches_refused_32003=refused,
            integrity=integrity[0],
        )
    )
    assert_invariant(check, report)
    assert service.running
    assert refused > 0, "the daemon never saw -32003"
    assert report.replies_451 > 0
    assert integrity == ["ok"], integrity[:5]
    service_log = service.log_text()
    assert "storage unavailable" in service_log
    assert "storage available again" in service_log
    assert "Traceback" not in service_log
    # -32003 is an answer, not a timeout: the 451 comes at once.
    latency = report.max_latency(Outcome.TEMPFAIL)
    assert latency is not None
    assert latency < PUSH_TIMEOUT, latency
    assert report.unanswered == 0
