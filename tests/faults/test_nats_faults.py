"""nats-server dies under load: SIGKILL and restart on the same store, again and again.

The daemon's pusher publishes to JetStream (``jobs.url = "nats+ws://…"``)
and answers ``250`` only after the PubAck. nats-server 2.9 acknowledges a
message once it is written to its file store, in the OS page cache (not
fsynced): a SIGKILL, unlike a power cut, must therefore lose nothing. A
batch whose PubAcks were lost with the connection is never published again
(trismtp sends no ``Nats-Msg-Id``, see :mod:`trismtp.jobs.sinks`): the jobs
acknowledged before the kill get 250, the others 451.

The invariant is the fault suite's, checked against the stream instead of
the SQLite file: every ``250 … queued as <id>`` is in the stream exactly
once (job ids counted over all its messages), holding its own email,
and every message in the stream is one a client sent. 451s are allowed (and
counted); a client sends the same email again after one, under a new job
id, which may then be in the stream twice (``dup_messages``).
"""

from __future__ import annotations

import base64
import json
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trismtp.nats import MSG_ID_HEADER, NatsClient, StoredMessage, first_messages

from ..e2e.trismtp_e2e import Launcher
from ..nats.nats_server import NatsServer
from .harness import (
    assert_invariant,
    check_store,
    emit,
    fault_for,
    more_acks,
    more_tempfails,
    remote_daemon,
    start,
    start_load,
    summarize,
    until,
    wait_for_log,
)
from .load import LoadGenerator

pytestmark = pytest.mark.faults

PUSH_TIMEOUT = 1.5
CLIENTS = 8
STREAM = "trismtp"  # the default of jobs.nats.stream


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server (not started yet), stopped by PID after the test.

    Request it before ``launch``: the daemon is then stopped first.
    """
    workdir = tmp_path / "nats"
    workdir.mkdir()
    server = NatsServer(workdir)
    try:
        yield server
    finally:
        server.stop()
        print(f"----- nats-server (last run) -----\n{server.log_tail()}")


async def read_stream(nats: NatsServer) -> list[StoredMessage]:
    """Every message of the stream, oldest first (read, not consumed)."""
    async with NatsClient.connect(nats.url) as client:
        return await first_messages(client, STREAM, 1_000_000)


def stream_as_store(messages: list[StoredMessage], database: Path) -> Path:
    """The stream's messages as the store's ``jobs`` table (id, payload, no file), so that
    the suite's :func:`~.harness.check_store` reads them unchanged.

    One row per stream message, its id the job's (``uuid`` header), its payload
    the email payload JSON out of the RoadRunner body. The table has no key:
    an id stored twice is two rows, which check_store reports.
    """
    rows = []
    for message in messages:
        assert MSG_ID_HEADER not in message.headers, message
        msg_ids = message.headers.get("uuid", [])
        assert len(msg_ids) == 1, f"message {message.seq}: uuid {msg_ids}"
        body = json.loads(message.data)
        # One id everywhere: the job's id, its uuid header.
        assert body["id"] == msg_ids[0], message
        payload = base64.b64decode(body["payload"], validate=True).decode("utf-8")
        rows.append((msg_ids[0], payload))
    db = sqlite3.connect(database)
    try:
        db.execute("CREATE TABLE jobs (id TEXT NOT NULL, payload TEXT NOT NULL, payload_file TEXT)")
        db.executemany("INSERT INTO jobs (id, payload) VALUES (?, ?)", rows)
        db.commit()
    finally:
        db.close()
    return database


async def test_nats_sigkill_and_restart_loses_no_acked_message(
    nats: NatsServer, launch: Launcher, tmp_path: Path
) -> None:
    """SIGKILL nats-server mid-load 3 times; restart it on the same store.

    The first time it stays down until sessions get 451; then for a fraction
    of push_timeout only, so that sessions still waiting are delivered to
    the restarted server.
    """
    cycles = 3
    rng = random.Random()
    await trio.to_thread.run_sync(nats.start)
    daemon = remote_daemon(launch, nats.url, {"push_timeout": PUSH_TIMEOUT})
    await start(daemon)
    await wait_for_log(daemon, "connected to the NATS server")

    load = LoadGenerator(daemon.smtp_port, clients=CLIENTS, tag="n1", reply_timeout=10)
    downtimes: list[float] = []
    async with trio.open_nursery() as nursery:
        start_load(nursery, load)
        await until(more_acks(load, 40), 20, "40 acks before the first kill")
        for cycle in range(cycles):
            # Die at a random point of the publishing.
            await fault_for(rng.uniform(0.05, 0.3))
            killed_at = trio.current_time()
            await trio.to_thread.run_sync(nats.kill)
            if cycle == 0:
                await until(more_tempfails(load, 1), PUSH_TIMEOUT + 5, "a 451 while it is gone")
            else:
                await fault_for(rng.uniform(0.1, PUSH_TIMEOUT / 2))
            await trio.to_thread.run_sync(nats.start)
            downtimes.append(trio.current_time() - killed_at)
            await until(
                more_acks(load, 30),
                20,
                f"cycle {cycle}: 250s after the restart",
                detail=daemon.log_tail,
            )
        load.stop()
    report = load.report()

    messages = await read_stream(nats)
    msg_id_counts = Counter(m.headers.get("uuid", [""])[0] for m in messages)
    check = check_store(report, stream_as_store(messages, tmp_path / "stream.sqlite3"))
    emit(
        summarize(
            "N1 nats-server SIGKILL x3 + restart (JetStream)",
            report,
            check,
            cycles=cycles,
            max_down_s=round(max(downtimes), 2),
            stream_messages=len(messages),
            # Publishes cut by a kill: their unacknowledged jobs got 451.
            publishes_cut=daemon.log_text().count("jobs in flight"),
        )
    )
    assert_invariant(check, report)
    twice = [msg_id for msg_id, n in msg_id_counts.items() if n > 1]
    assert not twice, f"job ids in the stream more than once: {twice[:10]}"
    assert report.deferred > 0, "451s (at the dot or before the upload) while it was down"
    assert report.unanswered == 0, "the daemon answers every dot, NATS or not"
    assert daemon.running
    assert "Traceback" not in daemon.log_text()
