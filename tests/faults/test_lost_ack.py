"""The connection between pusher and service drops after a commit, before its ack.

The daemon reaches the jobs service through :class:`FaultProxy`. On command
the proxy lets a ``jobs.PushBatch`` through, swallows the service's success
reply, and closes both sides. The batch is committed; the pusher never heard
so. It must reconnect (backoff with jitter) and send the same ids again; the
service stores nothing new for them and says so with a success; the sessions
get their ``250`` within ``jobs.push_timeout``, and every acked id is stored
exactly once.
"""

from __future__ import annotations

import pytest
import trio

from ..e2e.trismtp_e2e import Launcher
from .harness import (
    assert_invariant,
    check_store,
    emit,
    more_acks,
    remote_daemon,
    start,
    start_load,
    stored_message_ids,
    summarize,
    until,
    wait_for_log,
)
from .load import LoadGenerator, Outcome
from .proxy import FaultProxy

pytestmark = pytest.mark.faults

PUSH_TIMEOUT = 2.0
CUTS = 5
HOLD = 0.3
"""Seconds the proxy keeps swallowing after the lost ack, before it cuts."""


async def test_lost_ack_is_resent_with_the_same_ids_and_stored_once(launch: Launcher) -> None:
    """Scenario 3: five commits whose ack is lost; resent, 250, stored once."""
    service = launch.jobs_service(start=False)
    await start(service)
    proxy = FaultProxy(service.port)
    lost_acks: list[int] = []
    async with trio.open_nursery() as outer:
        await outer.start(proxy.run)
        daemon = remote_daemon(launch, proxy.url, {"push_timeout": PUSH_TIMEOUT})
        await start(daemon)
        await wait_for_log(daemon, "connected to the jobs service")

        load = LoadGenerator(daemon.smtp_port, clients=8, tag="s3", reply_timeout=10)
        async with trio.open_nursery() as nursery:
            start_load(nursery, load)
            for cut in range(CUTS):
                await until(more_acks(load, 30), 20, f"cut {cut}: acks before")
                lost_acks.append(await proxy.lose_acks(HOLD))
            await until(more_acks(load, 30), 20, "acks after the last cut")
            load.stop()
        outer.cancel_scope.cancel()

    report = load.report()
    check = check_store(report, service.database)
    stored = stored_message_ids(service.database)
    lost_ids, resent = proxy.resent_after_lost_ack()
    acked = set(report.acked_job_ids)
    emit(
        summarize(
            "3 lost ack (proxy cut after commit)",
            report,
            check,
            cuts=CUTS,
            lost_acks=sum(lost_acks),
            ids_with_lost_ack=len(lost_ids),
            resent_already_stored=len(resent & stored.keys()),
            proxy_links=proxy.links_opened,
        )
    )
    assert_invariant(check, report)
    assert all(lost_acks), f"a cut lost no ack: {lost_acks}"
    # Every id whose ack was lost was committed, then sent again, then acked.
    assert lost_ids, "no PushBatch was committed and lost"
    assert lost_ids <= stored.keys(), "a committed batch is missing from the store"
    assert resent == lost_ids, f"not resent: {sorted(lost_ids - resent)[:5]}"
    assert lost_ids <= acked, f"resent but not acked: {sorted(lost_ids - acked)[:5]}"
    assert report.replies_451 == 0, "a lost ack must cost a resend, not a 451"
    latency = report.max_latency(Outcome.ACKED)
    assert latency is not None
    assert latency < PUSH_TIMEOUT, latency
    assert check.dup_messages == 0
    assert report.unanswered == 0
    assert proxy.links_opened >= CUTS + 1, "the pusher did not reconnect after each cut"
