"""The SQLite store, on real files: durability, ordering, leases, failures."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from trismtp.jobs.model import Job, JobOptions
from trismtp.service import store as store_module
from trismtp.service.store import (
    BatchExpired,
    DatabaseCorrupt,
    JobStore,
    NoSuchPipeline,
    Policy,
    Reserved,
    Settled,
    StorageUnavailable,
)

from ..stored import payload_of


class FakeClock:
    """A clock the test moves by hand, so leases expire without sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_job(
    job_id: str,
    *,
    pipeline: str = "smtp",
    priority: int = 10,
    delay: int = 0,
    auto_ack: bool = False,
    payload: str = "{}",
) -> Job:
    return Job(
        job="smtp.email",
        id=job_id,
        payload=payload,
        headers={"uuid": [job_id]},
        options=JobOptions(priority=priority, pipeline=pipeline, delay=delay, auto_ack=auto_ack),
    )


def stored(path: Path) -> dict[str, str]:
    """Job id → payload, read through a connection of our own: what is on disk."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, payload, payload_file FROM jobs").fetchall()
    return {job_id: payload_of(path, *payload) for job_id, *payload in rows}


@contextlib.contextmanager
def another_writer(path: Path) -> Iterator[None]:
    """Another process holds the database's write lock while in the block."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def ids(jobs: Sequence[Job | Reserved]) -> list[str]:
    return [job.job.id if isinstance(job, Reserved) else job.id for job in jobs]


def refs(reserved: Sequence[Reserved], *wanted: str) -> list[tuple[str, str]]:
    """(id, token) of the reserved jobs *wanted* (all when none is named)."""
    return [(r.job.id, r.lease.token) for r in reserved if not wanted or r.job.id in wanted]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite3"  # the directory does not exist yet


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[JobStore]:
    async with JobStore.open(db_path, clock=clock) as store:
        await store.declare("smtp")
        yield store


async def test_push_batch_is_on_disk_when_it_returns(store: JobStore, db_path: Path) -> None:
    await store.push_batch([make_job("a", payload="1"), make_job("b", payload="2")])

    assert stored(db_path) == {"a": "1", "b": "2"}


async def test_push_is_idempotent_by_id(store: JobStore, db_path: Path) -> None:
    await store.push_batch([make_job("a", payload="first")])

    await store.push_batch([make_job("a", payload="second"), make_job("b")])
    await store.push_batch([make_job("a", payload="third")])

    assert stored(db_path) == {"a": "first", "b": "{}"}


async def test_unknown_pipeline_refuses_the_whole_batch(store: JobStore, db_path: Path) -> None:
    batch = [make_job("a"), make_job("b", pipeline="nope"), make_job("c", pipeline="other")]

    with pytest.raises(NoSuchPipeline) as caught:
        await store.push_batch(batch)

    assert caught.value.names == ["nope", "other"]
    assert stored(db_path) == {}


async def test_reserve_by_priority_then_age(store: JobStore, clock: FakeClock) -> None:
    for job_id, priority in [("old-10", 10), ("old-1", 1), ("new-10", 10), ("new-5", 5)]:
        await store.push_batch([make_job(job_id, priority=priority)])
        clock.advance(1)
    await store.push_batch(
        [make_job("same-time-x", priority=7), make_job("same-time-y", priority=7)]
    )

    assert ids(await store.reserve("smtp", 2, lease=60)) == ["old-1", "new-5"]
    assert ids(await store.reserve("smtp", 10, lease=60)) == [
        "same-time-x",
        "same-time-y",
        "old-10",
        "new-10",
    ]


async def test_reserve_returns_the_job_as_pushed(store: JobStore) -> None:
    job = make_job("a", priority=3, payload='{"event":"EMAIL_RECEIVED","ü":1}')
    await store.push_batch([job])

    [reserved] = await store.reserve("smtp", 1, lease=60)
    assert reserved.job == job
    assert reserved.lease.attempt == 1


async def test_lease_expiry_delivers_again(
    store: JobStore, clock: FakeClock, db_path: Path
) -> None:
    await store.push_batch([make_job("a")])

    assert ids(await store.reserve("smtp", 10, lease=30)) == ["a"]
    assert await store.reserve("smtp", 10, lease=30) == []
    clock.advance(29.9)
    assert await store.reserve("smtp", 10, lease=30) == []
    clock.advance(0.1)
    assert ids(await store.reserve("smtp", 10, lease=30)) == ["a"]

    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT attempts FROM queue").fetchall() == [(2,)]


async def test_ack_deletes(store: JobStore, clock: FakeClock, db_path: Path) -> None:
    await store.push_batch([make_job("a"), make_job("b")])
    reserved = await store.reserve("smtp", 10, lease=30)

    assert await store.ack(refs(reserved, "a")) == Settled(1)
    assert await store.ack([("unknown", "token")]) == Settled(0, ["unknown"])

    assert set(stored(db_path)) == {"b"}
    clock.advance(30)
    assert ids(await store.reserve("smtp", 10, lease=30)) == ["b"]


async def test_nack_requeues_after_its_delay(store: JobStore, clock: FakeClock) -> None:
    await store.push_batch([make_job("a")])
    reserved = await store.reserve("smtp", 10, lease=300)

    assert await store.nack(refs(reserved), requeue=True, delay=20) == Settled(1)

    assert await store.reserve("smtp", 10, lease=300) == []
    assert (await store.stat())[0].delayed == 1
    clock.advance(20)
    assert ids(await store.reserve("smtp", 10, lease=300)) == ["a"]


async def test_nack_requeue_without_delay_is_ready_at_once(store: JobStore) -> None:
    await store.push_batch([make_job("a")])
    reserved = await store.reserve("smtp", 10, lease=300)

    await store.nack(refs(reserved), requeue=True)

    assert ids(await store.reserve("smtp", 10, lease=300)) == ["a"]


async def test_nack_without_requeue_deletes(store: JobStore, db_path: Path) -> None:
    await store.push_batch([make_job("a"), make_job("b")])
    reserved = await store.reserve("smtp", 10, lease=30)

    await store.nack(refs(reserved, "a"), requeue=False)

    assert set(stored(db_path)) == {"b"}


async def test_job_delay_holds_it_back(store: JobStore, clock: FakeClock) -> None:
    await store.push_batch([make_job("later", delay=60), make_job("now")])

    assert ids(await store.reserve("smtp", 10, lease=300)) == ["now"]
    clock.advance(59)
    assert await store.reserve("smtp", 10, lease=300) == []
    clock.advance(1)
    assert ids(await store.reserve("smtp", 10, lease=300)) == ["later"]


async def test_auto_ack_jobs_are_handed_out_once(store: JobStore, clock: FakeClock) -> None:
    await store.push_batch([make_job("a", auto_ack=True)])

    assert ids(await store.reserve("smtp", 10, lease=30)) == ["a"]
    clock.advance(30)
    assert await store.reserve("smtp", 10, lease=30) == []


async def test_paused_pipeline_accepts_pushes_but_hands_out_nothing(store: JobStore) -> None:
    await store.pause(["smtp"])

    await store.push_batch([make_job("a")])

    assert await store.reserve("smtp", 10, lease=30) == []
    assert (await store.stat())[0].ready is False
    await store.resume(["smtp"])
    assert ids(await store.reserve("smtp", 10, lease=30)) == ["a"]


async def test_pause_of_an_unknown_pipeline_changes_nothing(store: JobStore) -> None:
    with pytest.raises(NoSuchPipeline):
        await store.pause(["smtp", "nope"])

    assert (await store.stat())[0].ready is True


async def test_destroy_drops_the_pipeline_and_its_jobs(store: JobStore, db_path: Path) -> None:
    await store.declare("other")
    await store.push_batch([make_job("a"), make_job("b", pipeline="other")])

    await store.destroy(["smtp"])

    assert await store.list_pipelines() == ["other"]
    assert set(stored(db_path)) == {"b"}
    with pytest.raises(NoSuchPipeline):
        await store.push_batch([make_job("c")])
    with pytest.raises(NoSuchPipeline):
        await store.reserve("smtp", 1, lease=30)


async def test_declare_again_keeps_jobs_and_state(store: JobStore) -> None:
    await store.push_batch([make_job("a")])
    await store.pause(["smtp"])

    await store.declare("smtp")
    await store.declare("smtp", priority=3, config={"driver": "memory"})

    [stat] = await store.stat()
    assert (stat.active, stat.ready, stat.priority) == (1, False, 3)


async def test_stat_counts(store: JobStore, clock: FakeClock) -> None:
    await store.declare("empty", priority=1)
    await store.push_batch([make_job(f"j{i}") for i in range(5)] + [make_job("d", delay=10)])
    await store.reserve("smtp", 2, lease=30)

    stats = [stat.to_dict() for stat in await store.stat()]

    assert stats == [
        {
            "pipeline": "empty",
            "driver": "sqlite",
            "queue": "empty",
            "active": 0,
            "delayed": 0,
            "reserved": 0,
            "ready": True,
            "priority": 1,
        },
        {
            "pipeline": "smtp",
            "driver": "sqlite",
            "queue": "smtp",
            "active": 3,
            "delayed": 1,
            "reserved": 2,
            "ready": True,
            "priority": 10,
        },
    ]
    clock.advance(30)  # leases expire, the delay passes
    [_, smtp] = await store.stat()
    assert (smtp.active, smtp.delayed, smtp.reserved) == (6, 0, 0)


async def test_concurrent_operations_each_get_their_own_outcome(
    store: JobStore, db_path: Path
) -> None:
    outcomes: dict[str, str] = {}

    async def push(job: Job) -> None:
        try:
            await store.push_batch([job])
        except NoSuchPipeline:
            outcomes[job.id] = "refused"
        else:
            outcomes[job.id] = "stored"

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(push, make_job(f"j{i}", pipeline="smtp" if i % 5 else "nope"))

    assert outcomes == {f"j{i}": "stored" if i % 5 else "refused" for i in range(50)}
    assert set(stored(db_path)) == {f"j{i}" for i in range(50) if i % 5}


async def test_jobs_survive_reopening(db_path: Path, clock: FakeClock) -> None:
    async with JobStore.open(db_path, clock=clock) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("a")])

    async with JobStore.open(db_path, clock=clock) as store:
        assert ids(await store.reserve("smtp", 10, lease=30)) == ["a"]


async def test_durability_pragmas_are_set(db_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def inspect(db: sqlite3.Connection) -> None:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        (synchronous,) = db.execute("PRAGMA synchronous").fetchone()
        seen.append((mode, synchronous))

    async with JobStore.open(db_path, on_connect=inspect):
        pass

    assert seen == [("wal", 2)]  # 2 is FULL
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # kept in the file
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


async def test_small_ops_queued_with_a_big_push_commit_before_it(db_path: Path) -> None:
    done: list[str] = []
    # A big payload stays in its row with secure_delete (else it is a file,
    # written before its push reaches the writer: test_payload_files.py).
    async with JobStore.open(db_path, policy=Policy(secure_delete=True)) as store:
        await store.declare("smtp")

        async def push(job_id: str, size: int) -> None:
            await store.push_batch([make_job(job_id, payload="x" * size)])
            done.append(job_id)

        # Another process holds the write lock: the writer waits in its
        # first transaction while the next two ops queue up behind it.
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push, "first", 10)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(push, "big", store_module.HEAVY_PUSH)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(push, "small", 10)
            await trio.testing.wait_all_tasks_blocked()
            other.execute("COMMIT")
            other.close()
        assert set(stored(db_path)) == {"first", "big", "small"}
    # Queued after the big one, committed before it.
    assert done == ["first", "small", "big"]


@pytest.mark.parametrize("secure_delete", [False, True])
async def test_an_acked_jobs_content_is_zeroed_only_with_secure_delete(
    db_path: Path, secure_delete: bool
) -> None:
    # A mail of ~100 KB: its payload fills overflow pages of its own.
    secret = "".join(f"secret-{i:06d} " for i in range(8000))
    async with JobStore.open(db_path, policy=Policy(secure_delete=secure_delete)) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("a", payload=secret)])
        (reserved,) = await store.reserve("smtp", 1, lease=30)
        assert await store.ack(refs([reserved])) == Settled(1)
    # Closed: the WAL is checkpointed into the file and removed.
    assert not await trio.Path(db_path.with_name(db_path.name + "-wal")).exists()
    left = (await trio.Path(db_path).read_bytes()).count(b"secret-")
    if secure_delete:
        assert left == 0
    else:
        # Freed as they are (SQLite's default where it is not built with
        # SECURE_DELETE): the next jobs overwrite them. Set either way, so
        # the result does not depend on how SQLite was built.
        assert left > 7000


class Disk:
    """Fills the "disk" under a running store by capping its database's size.

    ``PRAGMA max_page_count`` makes SQLite fail with SQLITE_FULL ("database or
    disk is full") exactly as a full file system does. The cap is per
    connection, so it is applied to the store's current connection and to every
    connection the store opens while the disk is full.
    """

    def __init__(self) -> None:
        self.full = False
        self.connections: list[sqlite3.Connection] = []

    def on_connect(self, db: sqlite3.Connection) -> None:
        self.connections.append(db)
        if self.full:
            self._cap(db)

    def fill(self) -> None:
        # The store is idle between the test's awaits, so touching its
        # connection from here does not race with the writer's thread.
        self.full = True
        self._cap(self.connections[-1])

    def free(self) -> None:
        self.full = False
        with contextlib.suppress(sqlite3.ProgrammingError):  # the store dropped it
            self.connections[-1].execute("PRAGMA max_page_count = 1073741823")

    @staticmethod
    def _cap(db: sqlite3.Connection) -> None:
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")


async def test_full_disk_is_storage_unavailable_then_recovers(
    db_path: Path, clock: FakeClock
) -> None:
    disk = Disk()
    big = [make_job(f"big{i}", payload="x" * 10_000) for i in range(20)]
    reserve_file = db_path.with_name(db_path.name + "-reserve")
    async with JobStore.open(db_path, clock=clock, on_connect=disk.on_connect) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("small"), make_job("other")])
        assert reserve_file.stat().st_size == 32 * 1024 * 1024
        assert store.unwritable is None
        disk.fill()

        with pytest.raises(StorageUnavailable, match="full"):
            await store.push_batch(big)
        assert set(stored(db_path)) == {"small", "other"}  # nothing of the batch
        assert not reserve_file.exists()  # released for the consumers
        assert store.unwritable is not None
        assert "full" in store.unwritable

        # Consumers can still drain: Reserve, Nack, Ack all write.
        reserved = await store.reserve("smtp", 10, lease=30)
        assert ids(reserved) == ["small", "other"]
        assert await store.nack(refs(reserved, "other"), requeue=True) == Settled(1)
        assert await store.ack(refs(reserved, "small")) == Settled(1)
        with pytest.raises(StorageUnavailable, match="full"):
            await store.push_batch(big)
        assert store.unwritable is not None  # an Ack is not "available again"

        disk.free()
        with trio.fail_after(10):
            while True:  # the store checks for room once a second
                try:
                    await store.push_batch(big)
                    break
                except StorageUnavailable:
                    await trio.sleep(0.05)
        assert store.unwritable is None
        assert reserve_file.stat().st_size == 32 * 1024 * 1024

    assert set(stored(db_path)) == {"other"} | {job.id for job in big}


async def test_full_disk_fails_only_the_op_that_needs_space(
    db_path: Path, clock: FakeClock
) -> None:
    disk = Disk()
    async with JobStore.open(db_path, clock=clock, on_connect=disk.on_connect) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("small")])
        reserved = await store.reserve("smtp", 1, lease=30)
        disk.fill()
        results: dict[str, str] = {}

        async def attempt(name: str, operation: object) -> None:
            try:
                await operation  # type: ignore[misc]
            except StorageUnavailable:
                results[name] = "unavailable"
            else:
                results[name] = "ok"

        # Whether or not the writer groups them into one transaction, the
        # push that needs space fails and the ack that frees some does not.
        big = [make_job(f"big{i}", payload="x" * 10_000) for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "push", store.push_batch(big))
            nursery.start_soon(attempt, "ack", store.ack(refs(reserved)))

    assert results == {"push": "unavailable", "ack": "ok"}
    assert stored(db_path) == {}


async def test_locked_database_is_storage_unavailable_then_recovers(
    db_path: Path, clock: FakeClock
) -> None:
    async with JobStore.open(db_path, clock=clock, busy_timeout=0.05) as store:
        await store.declare("smtp")
        for job_id in ("a", "b"):
            with another_writer(db_path), pytest.raises(StorageUnavailable, match="locked"):
                await store.push_batch([make_job(job_id)])
            assert store.unwritable is not None
            if job_id == "a":
                # Without a push to find out: /readyz reports the store, and a
                # balancer that sees "not ready" sends no mail. The store checks
                # once a second; nothing announces the change, so the test
                # looks (within a deadline) as /readyz would.
                with trio.fail_after(10):
                    while store.unwritable is not None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            # Or at the next operation.
            await store.push_batch([make_job(job_id)])
            assert store.unwritable is None

    assert set(stored(db_path)) == {"a", "b"}


async def test_a_path_that_cannot_be_a_database_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(StorageUnavailable, match="directory"):
        async with JobStore.open(tmp_path / "file" / "jobs.sqlite3"):
            pass

    with pytest.raises(StorageUnavailable, match="unable to open"):
        async with JobStore.open(tmp_path):  # a directory
            pass


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version = 99")

    with pytest.raises(StorageUnavailable, match="schema version 99"):
        async with JobStore.open(db_path):
            pass


async def test_peek_shows_jobs_in_reserve_order_without_leasing(
    store: JobStore, clock: FakeClock
) -> None:
    await store.push_batch([make_job("late", priority=20), make_job("first", priority=1)])
    clock.advance(1)
    await store.push_batch([make_job("delayed", delay=60)])

    assert ids(await store.peek("smtp", 10)) == ["first", "delayed", "late"]
    assert ids(await store.peek("smtp", 1)) == ["first"]
    # Nothing was leased: every ready job can still be reserved.
    assert ids(await store.reserve("smtp", 10, lease=30)) == ["first", "late"]
    # Reserved jobs are still in the store, so peek still shows them.
    assert len(await store.peek("smtp", 10)) == 3


async def test_peek_of_an_unknown_pipeline(store: JobStore) -> None:
    with pytest.raises(NoSuchPipeline):
        await store.peek("nope", 10)


async def test_a_big_batch_keeps_its_order_in_each_pipeline(store: JobStore, db_path: Path) -> None:
    # More jobs than one insert statement takes (store._PUSH_ROWS_MAX), for two
    # pipelines in turn, with an id already stored and one twice in the batch.
    await store.declare("other")
    await store.push_batch([make_job("j7", pipeline="other", payload="first")])
    batch = [make_job(f"j{i}", pipeline="smtp" if i % 2 else "other") for i in range(150)]
    batch.insert(40, make_job("j3", payload="again"))

    await store.push_batch(batch)

    on_disk = stored(db_path)
    assert len(on_disk) == 150
    assert on_disk["j7"] == "first"
    assert on_disk["j3"] == "{}"
    smtp = ids(await store.reserve("smtp", 200, lease=60))
    other = ids(await store.reserve("other", 200, lease=60))
    assert smtp == [f"j{i}" for i in range(1, 150, 2) if i != 7]  # j7 was in "other"
    assert other == ["j7", *(f"j{i}" for i in range(0, 150, 2))]


async def test_a_batch_is_split_to_fit_sqlites_parameter_limit(
    db_path: Path, clock: FakeClock
) -> None:
    def few_parameters(db: sqlite3.Connection) -> None:
        # Two rows of eleven values a statement, as an old SQLite built with
        # a small SQLITE_MAX_VARIABLE_NUMBER would allow.
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 23)

    async with JobStore.open(db_path, clock=clock, on_connect=few_parameters) as store:
        await store.declare("smtp")
        await store.push_batch([make_job(f"j{i}", payload=str(i)) for i in range(5)])
        with pytest.raises(NoSuchPipeline):
            await store.push_batch([make_job("k0"), make_job("k1"), make_job("k2", pipeline="x")])

        assert ids(await store.reserve("smtp", 10, lease=60)) == [f"j{i}" for i in range(5)]
    assert stored(db_path) == {f"j{i}": str(i) for i in range(5)}


async def test_a_refused_batch_alone_leaves_nothing_and_the_store_goes_on(
    store: JobStore, db_path: Path
) -> None:
    # Alone in its transaction, the batch is rolled back whole after its
    # first job was inserted, and the transaction does not linger.
    with pytest.raises(NoSuchPipeline):
        await store.push_batch([make_job("a"), make_job("b", pipeline="nope")])
    await store.push_batch([make_job("a", payload="later")])

    assert stored(db_path) == {"a": "later"}
    assert [s.active for s in await store.stat()] == [1]


async def test_a_lone_push_is_one_statement_that_commits(db_path: Path, clock: FakeClock) -> None:
    # The writer's thread hands the GIL over for each statement, and takes it
    # back only when the busy event loop lets it: a PushBatch alone is its
    # INSERT, committed by SQLite as it runs (docs/performance.md, "Eighth
    # stop"). A transaction left open would hold the jobs back from readers.
    statements: list[str] = []

    def traced(db: sqlite3.Connection) -> None:
        db.set_trace_callback(statements.append)

    async with JobStore.open(db_path, clock=clock, on_connect=traced) as store:
        await store.declare("smtp")
        statements.clear()
        await store.push_batch([make_job(f"j{i}") for i in range(10)])

        # One statement (sqlite3 reports it again for each trigger it runs).
        assert len(set(statements)) == 1
        assert statements[0].startswith("INSERT INTO jobs")
        assert set(stored(db_path)) == {f"j{i}" for i in range(10)}


async def test_the_store_refuses_an_sqlite_without_upsert(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.22.0")
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 22, 0))

    with pytest.raises(StorageUnavailable, match=r"SQLite .* is 3\.22\.0; .* needs 3\.24\.0"):
        async with JobStore.open(db_path):
            pass
    assert not await trio.Path(db_path).exists()


async def test_an_expired_batch_stores_nothing(
    store: JobStore, clock: FakeClock, db_path: Path
) -> None:
    with pytest.raises(BatchExpired, match="expired"):
        await store.push_batch([make_job("late")], expires_at=clock.now - 0.001)
    await store.push_batch([make_job("in-time")], expires_at=clock.now + 1)

    assert set(stored(db_path)) == {"in-time"}


_SCHEMA_V1 = """
CREATE TABLE pipelines (
    name TEXT PRIMARY KEY, driver TEXT NOT NULL DEFAULT 'sqlite',
    priority INTEGER NOT NULL DEFAULT 10, paused INTEGER NOT NULL DEFAULT 0,
    config TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, name TEXT NOT NULL, payload TEXT NOT NULL,
    headers TEXT NOT NULL, priority INTEGER NOT NULL, delay INTEGER NOT NULL,
    auto_ack INTEGER NOT NULL, available_at REAL NOT NULL, reserved_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
CREATE INDEX jobs_queue ON jobs (pipeline, priority, created_at);
PRAGMA user_version = 1;
"""


async def test_a_version_1_database_is_migrated_with_its_jobs_and_leases(
    db_path: Path, clock: FakeClock
) -> None:
    db_path.parent.mkdir()
    now = clock.now
    with sqlite3.connect(db_path) as db:
        db.executescript(_SCHEMA_V1)
        db.execute("INSERT INTO pipelines (name) VALUES ('smtp')")
        db.executemany(
            "INSERT INTO jobs VALUES (?, 'smtp', 'smtp.email', ?, '{\"uuid\":[\"x\"]}', 10, 0, 0,"
            " ?, ?, ?, ?)",
            [
                ("ready", "p1", now - 10, None, 0, now - 10),
                ("leased", "p2", now - 20, now + 30, 1, now - 20),
                ("later", "p3", now + 60, None, 0, now - 5),
            ],
        )

    async with JobStore.open(db_path, clock=clock) as store:
        [stat] = await store.stat()
        assert (stat.active, stat.reserved, stat.delayed) == (1, 1, 1)
        [ready] = await store.reserve("smtp", 10, lease=30)
        assert (ready.job.id, ready.job.payload, ready.job.headers) == (
            "ready",
            "p1",
            {"uuid": ["x"]},
        )
        assert await store.ack(refs([ready])) == Settled(1)
        clock.advance(60)  # the v1 lease and the delay have run out
        again = await store.reserve("smtp", 10, lease=30)
        assert [(r.job.id, r.lease.attempt) for r in again] == [("leased", 2), ("later", 1)]

    assert set(stored(db_path)) == {"leased", "later"}
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def fill_and_close(db_path: Path, count: int = 200) -> None:
    async with JobStore.open(db_path) as store:
        await store.declare("smtp")
        await store.push_batch([make_job(f"j{i}", payload="y" * 3000) for i in range(count)])


def damage(path: Path) -> None:
    """64 KiB of garbage over the middle of the file."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(bytes(range(256)) * 256)


async def test_a_damaged_database_is_refused_at_open_naming_the_file(db_path: Path) -> None:
    await fill_and_close(db_path)
    damage(db_path)

    with pytest.raises(DatabaseCorrupt) as caught:
        async with JobStore.open(db_path):
            pass

    message = str(caught.value)
    assert str(db_path) in message
    assert "damaged" in message
    assert "docs/operations.md" in message
    assert "\n" not in message


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    write_file(db_path, b"this is not SQLite" * 1000)

    with pytest.raises(DatabaseCorrupt, match="damaged"):
        async with JobStore.open(db_path):
            pass


@pytest.mark.parametrize("how", ["deleted", "truncated"])
async def test_a_database_that_vanished_is_not_taken_for_a_first_start(
    db_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    await fill_and_close(db_path)
    if how == "deleted":
        os.unlink(db_path)
    else:
        write_file(db_path, b"")
    caplog.set_level(logging.WARNING, logger="trismtp.service.store")

    async with JobStore.open(db_path) as store:
        await store.declare("smtp")
        assert await store.stat()  # it runs, on an empty database

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(db_path) in w and "restore" in w for w in warnings), warnings


async def test_a_first_start_says_nothing(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trismtp.service.store")

    async with JobStore.open(db_path):
        pass

    assert [r.getMessage() for r in caplog.records] == []


async def test_a_wal_left_without_its_database_is_moved_aside(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = db_path.with_name(db_path.name + "-wal")
    write_file(wal, b"\0" * 4096)
    caplog.set_level(logging.WARNING, logger="trismtp.service.store")

    async with JobStore.open(db_path):
        pass

    assert not wal.exists() or wal.read_bytes() != b"\0" * 4096
    assert list(db_path.parent.glob("jobs.sqlite3-wal.orphan-*"))
    assert any(str(db_path) in r.getMessage() for r in caplog.records)


async def test_a_read_over_its_inline_budget_runs_again_in_a_thread(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.push_batch([make_job(f"d{i}", delay=60) for i in range(5000)])
    monkeypatch.setattr(store_module, "INLINE_READ_BUDGET", 0.0)  # every inline read stops

    [stat] = await store.stat()

    assert (stat.active, stat.delayed, stat.reserved) == (0, 5000, 0)
    assert await store.list_pipelines() == ["smtp"]


async def test_acked_ids_are_remembered_for_the_window_then_forgotten(
    db_path: Path, clock: FakeClock
) -> None:
    async with JobStore.open(db_path, clock=clock, policy=Policy(dedupe_window=100)) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("a"), make_job("auto", auto_ack=True)])
        reserved = await store.reserve("smtp", 10, lease=30)
        assert await store.ack(refs(reserved, "a")) == Settled(1)

        clock.advance(99)
        await store.push_batch([make_job("a"), make_job("auto")])  # resends: done already
        assert stored(db_path) == {}

        clock.advance(2)  # past the window; the next deletion forgets the old ids
        await store.push_batch([make_job("b")])
        await store.ack(refs(await store.reserve("smtp", 1, lease=30)))
        await store.push_batch([make_job("a"), make_job("auto")])
        assert set(stored(db_path)) == {"a", "auto"}
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT id FROM acked").fetchall() == [("b",)]
