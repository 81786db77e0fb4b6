"""Big payloads as files beside the database: what is on disk at each step.

A payload of ``FILE_PAYLOAD`` characters or more is written to a file of its
own (fsynced, with its directory) before the row that names it commits, and
removed after the commit that deletes the job. These tests look at the real
files and rows, as an operator would.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import trio

from trismtp.jobs.model import Job
from trismtp.service import store as store_module
from trismtp.service.store import (
    JobStore,
    Lease,
    NoSuchPipeline,
    Policy,
    Reserved,
    Settled,
    StorageUnavailable,
)

from .test_store import FakeClock, make_job, refs, stored

BIG = store_module.FILE_PAYLOAD


def big_payload(tag: str, size: int = BIG) -> str:
    """A payload of *size* characters with what JSON must escape, and non-ASCII."""
    head = f'{{"tag":"{tag}","text":"line \\"one\\"\\r\\n\u00e9\U0001f600\t\\\\"}}'
    return head + " " * (size - len(head))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite3"


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[JobStore]:
    async with JobStore.open(db_path, clock=clock) as store:
        await store.declare("smtp")
        yield store


def files(db_path: Path) -> list[str]:
    directory = db_path.with_name(db_path.name + "-payloads")
    return sorted(os.listdir(directory)) if directory.exists() else []


def rows(db_path: Path) -> dict[str, tuple[str, str | None]]:
    """Job id -> (payload column, payload_file column)."""
    with sqlite3.connect(db_path) as db:
        found = db.execute("SELECT id, payload, payload_file FROM jobs").fetchall()
    return {job_id: (payload, file) for job_id, payload, file in found}


async def test_a_big_payload_is_a_private_file_until_its_job_is_acked(
    store: JobStore, db_path: Path
) -> None:
    payload = big_payload("a")
    await store.push_batch([make_job("a", payload=payload), make_job("small", payload="{}")])

    [name] = files(db_path)
    assert rows(db_path) == {"a": ("", name), "small": ("{}", None)}
    path = store.payloads / name
    # As a JSON string, as a Reserve's reply carries it (copied in as it is).
    assert path.read_bytes() == orjson.dumps(payload)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.payloads.stat().st_mode) == 0o700
    assert stored(db_path)["a"] == payload

    [peeked, _] = await store.peek("smtp", 10)
    assert peeked.payload == payload
    reserved = await store.reserve("smtp", 10, lease=30)
    assert [r.job.payload for r in reserved] == [payload, "{}"]
    assert files(db_path) == [name]  # a lease changes nothing on disk

    assert await store.ack(refs(reserved, "a")) == Settled(1)
    assert files(db_path) == []
    assert rows(db_path) == {"small": ("{}", None)}


async def test_a_job_pushed_again_or_refused_leaves_no_file(store: JobStore, db_path: Path) -> None:
    first = big_payload("first")
    await store.push_batch([make_job("a", payload=first)])
    await store.push_batch([make_job("a", payload=big_payload("resent"))])
    with pytest.raises(NoSuchPipeline):
        await store.push_batch([make_job("b", payload=big_payload("b"), pipeline="nope")])

    assert len(files(db_path)) == 1
    assert stored(db_path) == {"a": first}


async def test_max_bytes_counts_a_file_payload_as_its_json(
    store: JobStore, clock: FakeClock
) -> None:
    jobs = [make_job(tag, payload=big_payload(tag, BIG + i)) for i, tag in enumerate("abc")]
    await store.push_batch(jobs)

    def size(job: Job) -> int:
        # As the reply carries it: with its lease (a token of 24 characters).
        lease = Lease(token="t" * 24, attempt=1, expires_at=clock.now + 30)
        return len(orjson.dumps(Reserved(job, lease).to_dict())) + 1

    a, b, c = (size(job) for job in jobs)
    one = await store.reserve("smtp", 3, lease=30, max_bytes=a + b - 1)
    assert [r.job.id for r in one] == ["a"]
    two = await store.reserve("smtp", 3, lease=30, max_bytes=b + c)
    assert [r.job.id for r in two] == ["b", "c"]
    assert [r.job for r in one + two] == jobs


async def test_destroy_and_auto_ack_remove_the_files(store: JobStore, db_path: Path) -> None:
    await store.declare("other")
    await store.push_batch(
        [
            make_job("kept", payload=big_payload("kept")),
            make_job("auto", payload=big_payload("auto"), auto_ack=True, pipeline="other"),
            make_job("gone", payload=big_payload("gone"), pipeline="other"),
        ]
    )
    assert len(files(db_path)) == 3

    [auto] = await store.reserve("other", 1, lease=30)
    assert auto.job.payload == big_payload("auto")  # read before its file went
    await store.destroy(["other"])

    assert [file for _, file in rows(db_path).values()] == files(db_path)
    assert set(stored(db_path)) == {"kept"}


async def push_one_big_job_and_close(db_path: Path) -> str:
    """A store with job "a" of a big payload, closed: the payload's file name."""
    async with JobStore.open(db_path) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("a", payload=big_payload("a"))])
        [name] = files(db_path)
    return name


async def test_files_no_job_refers_to_are_removed_at_open(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = await push_one_big_job_and_close(db_path)
    # A crash between a payload's fsync and its row's commit, and one
    # between an ack's commit and the removal of its file:
    directory = db_path.with_name(db_path.name + "-payloads")
    (directory / "0123456789abcdef0123456789abcdef").write_bytes(b'"never committed"')
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO freed_files (name) VALUES ('feedfacefeedfacefeedfacefeedface')")
    (directory / "feedfacefeedfacefeedfacefeedface").touch()

    with caplog.at_level(logging.INFO, logger="trismtp.service.store"):
        async with JobStore.open(db_path) as store:
            assert files(db_path) == [kept]
            assert [r.job.payload for r in await store.reserve("smtp", 1, 30)] == [big_payload("a")]
    assert any("removed 2 payload files" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM freed_files").fetchone() == (0,)


async def test_the_files_of_a_database_that_vanished_are_kept_aside(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Deleted by mistake: the sweep must not take the payloads a restored
    # backup of the database will need.
    name = await push_one_big_job_and_close(db_path)
    os.unlink(db_path)

    with caplog.at_level(logging.WARNING, logger="trismtp.service.store"):
        async with JobStore.open(db_path):
            assert files(db_path) == []
    [aside] = db_path.parent.glob("jobs.sqlite3-payloads.orphan-*")
    assert json.loads((aside / name).read_bytes()) == big_payload("a")
    assert any(str(aside) in r.getMessage() for r in caplog.records)


async def test_a_second_store_on_the_database_leaves_files_alone(
    store: JobStore, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Another process serving the same file may have written a payload it
    # has not committed yet: only the store holding the directory sweeps it.
    pending = store.payloads / "0123456789abcdef0123456789abcdef"
    pending.write_bytes(b'"in flight"')
    with caplog.at_level(logging.WARNING, logger="trismtp.service.store"):
        async with JobStore.open(db_path):
            pass
    assert pending.exists()
    assert any("another process holds" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("header", ["payload_missing", "payload_damaged"])
async def test_a_lost_payload_file_sends_its_job_to_dead_letter_saying_so(
    store: JobStore, db_path: Path, caplog: pytest.LogCaptureFixture, header: str
) -> None:
    await store.push_batch(
        [make_job("lost", payload=big_payload("lost")), make_job("next", payload="{}")]
    )
    [name] = files(db_path)
    path = store.payloads / name
    if header == "payload_missing":
        path.unlink()  # by hand, or a backup restored without it
    else:
        os.truncate(path, path.stat().st_size // 2)  # a copy cut short
    assert [job.id for job in await store.peek("smtp", 10)] == ["next"]

    with caplog.at_level(logging.ERROR, logger="trismtp.service.store"):
        reserved = await store.reserve("smtp", 10, lease=30)

    assert [r.job.id for r in reserved] == ["next"]  # the pipeline is not blocked
    assert any(
        "lost" in r.getMessage() and str(store.payloads / name) in r.getMessage()
        for r in caplog.records
    )
    [dead] = await store.reserve("dead-letter", 1, lease=30)
    assert dead.job.id == "lost"
    assert dead.job.payload == ""
    assert dead.job.headers[header] == [str(store.payloads / name)]
    assert dead.job.headers["dead_letter_from"] == ["smtp"]
    assert await store.ack(refs([dead])) == Settled(1)


async def test_a_payload_that_cannot_be_written_stores_nothing(
    store: JobStore, db_path: Path
) -> None:
    # The file-size limit makes the write fail as a full disk would, after
    # some bytes went out (Python ignores SIGXFSZ, so write() says EFBIG).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (BIG // 2, hard))
    try:
        with pytest.raises(StorageUnavailable, match=r"payload.*File too large"):
            await store.push_batch([make_job("a", payload=big_payload("a", BIG * 2))])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    assert files(db_path) == []
    assert stored(db_path) == {}
    await store.push_batch([make_job("a", payload=big_payload("a"))])  # it works again
    assert set(stored(db_path)) == {"a"}


async def test_with_secure_delete_every_payload_stays_in_the_database(db_path: Path) -> None:
    # Unlinking a file does not zero its blocks; SQLite's secure_delete does.
    async with JobStore.open(db_path, policy=Policy(secure_delete=True)) as store:
        await store.declare("smtp")
        await store.push_batch([make_job("a", payload=big_payload("a"))])
        assert files(db_path) == []
        assert rows(db_path)["a"] == (big_payload("a"), None)


_SCHEMA_V2 = """
CREATE TABLE pipelines (name TEXT PRIMARY KEY, driver TEXT NOT NULL DEFAULT 'sqlite',
    priority INTEGER NOT NULL DEFAULT 10, paused INTEGER NOT NULL DEFAULT 0,
    config TEXT NOT NULL DEFAULT '{}', jobs INTEGER NOT NULL DEFAULT 0);
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, pipeline TEXT NOT NULL,
    name TEXT NOT NULL, priority INTEGER NOT NULL, delay INTEGER NOT NULL,
    auto_ack INTEGER NOT NULL, created_at REAL NOT NULL, headers TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE TABLE queue (seq INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, priority INTEGER NOT NULL,
    available_at REAL NOT NULL, token TEXT, attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE acked (id TEXT PRIMARY KEY, token TEXT, at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE INDEX queue_ready ON queue (pipeline, priority, available_at);
CREATE INDEX queue_leased ON queue (pipeline, available_at) WHERE token IS NOT NULL;
CREATE INDEX queue_waiting ON queue (pipeline, available_at) WHERE token IS NULL;
CREATE INDEX acked_at ON acked (at);
INSERT INTO pipelines (name, jobs) VALUES ('smtp', 1);
INSERT INTO jobs VALUES (1, 'old', 'smtp', 'smtp.email', 10, 0, 0, 0, '{}', '{"big":"inline"}');
INSERT INTO queue (seq, pipeline, priority, available_at) VALUES (1, 'smtp', 10, 0);
PRAGMA user_version = 2;
"""


async def test_a_version_2_database_keeps_its_jobs_and_takes_file_payloads(
    db_path: Path,
) -> None:
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as db:
        db.executescript(_SCHEMA_V2)

    async with JobStore.open(db_path) as store:
        await store.push_batch([make_job("new", payload=big_payload("new"))])
        reserved = await store.reserve("smtp", 10, lease=30)
        assert [(r.job.id, r.job.payload) for r in reserved] == [
            ("old", '{"big":"inline"}'),
            ("new", big_payload("new")),
        ]
        assert await store.ack(refs(reserved)) == Settled(2)
        assert files(db_path) == []

    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_a_reserve_reads_its_payload_even_if_the_job_is_destroyed_meanwhile(
    store: JobStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is opened inside the lease's transaction; a Destroy that
    # commits before the payload is read removes the file, not the read.
    await store.push_batch([make_job("a", payload=big_payload("a"))])
    read = store_module._read_payloads
    destroyed = trio.Event()

    def destroy_then_read(reserved: list[tuple[Reserved, object]]) -> list[Reserved]:
        trio.from_thread.run(store.destroy, ["smtp"])
        destroyed.set()
        return read(reserved)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_read_payloads", destroy_then_read)
    [reserved] = await store.reserve("smtp", 1, lease=30)
    assert destroyed.is_set()
    assert files(db_path) == []
    assert reserved.job.payload == big_payload("a")
