"""The jobs service's store: pipelines and their jobs in one SQLite file.

Theory of operation
-------------------
"Durable" (SPEC §6) means committed with WAL and ``synchronous=FULL``, so every
commit costs an fsync, and SQLite has one writer at a time anyway. The store
therefore funnels every write through one **writer task**::

    callers ──unbuffered channel (the hand-over)──▶ writer task
                                                      │ takes every op waiting (≤ MAX_GROUP)
                                                      ▼
                                    worker thread:  BEGIN IMMEDIATE
                                                    SAVEPOINT op; …; RELEASE op   (each op)
                                                    COMMIT                        (one fsync)
                                                      │
                                                      ▼
                                    each caller woken with its own result or error

* **Group commit.** Under load many operations share one transaction and one
  fsync; when idle a group is a single operation and costs nothing extra.
* **One op, one savepoint.** An op that fails for its own reasons (an unknown
  pipeline, a bug) is rolled back to its savepoint; the others in its group
  still commit. An op alone in its group needs none: its transaction is
  rolled back instead. A storage failure inside an op (disk full) may have
  rolled back the whole transaction (SQLite does that for SQLITE_FULL, IOERR,
  BUSY), so that op fails and the rest of the group is tried again without it.
* **Off the Trio thread.** SQLite blocks, so each group runs in a worker thread
  (``trio.to_thread.run_sync``). The writer's connection is used by one thread
  at a time because only the writer task uses it, one group at a time.
* **Few statements a group.** The thread releases the GIL for each statement
  and must take it back from the event loop after it, which waits while the
  loop is busy with SMTP sessions. A push is therefore one INSERT for the
  whole batch (a job for a pipeline not declared aborts it), an op alone
  needs no savepoint, an op that is atomic by itself (a push) needs no
  BEGIN and COMMIT when alone, and only groups that may delete jobs look for
  payload files to remove: a lone PushBatch is its INSERT, which SQLite
  commits (and fsyncs) as it runs.
* **Cancellation.** Handing an op over is the only step a caller can be
  cancelled out of; nothing has happened then. Once the writer holds an op, it
  commits or rolls back and the caller is told which, even if the caller was
  cancelled meanwhile (a running thread cannot be stopped anyway, so the wait
  costs nothing extra). That lets the service answer every write it accepted,
  including during shutdown.
* **Reads never hold up writes.** List, Stat and Peek run on a connection of
  their own (WAL lets a reader see the last commit while the writer works),
  one read at a time, never inside the writer's transaction. Their cost is
  kept small by the schema below: a scan walks small index entries, never the
  payloads, and Stat counts only what is leased or delayed.
* **Storage failures** (disk full, read-only, locked, I/O errors, a damaged
  file) raise :class:`StorageUnavailable`. The connection is then dropped and
  the next operation opens a new one, so the store works again as soon as the
  disk does, without a restart. A full disk is drained rather than waited
  out: see :class:`_DiskReserve`.
* **Time** comes from ``clock`` (wall-clock seconds by default: timestamps are
  stored and must survive restarts). Tests pass their own to expire leases.

Big payloads
------------
A payload of :data:`FILE_PAYLOAD` characters or more is a file of its own in
``<database>-payloads/``, and its row holds ``""`` and the file's name. In the
database, a 13 MB job held the one writer for ~110 ms: its insert wrote it to
the WAL, fsynced it and then checkpointed it (copied again, fsynced again),
its Reserve read and JSON-sized it, its delete walked its overflow pages.
Every other operation waited meanwhile. As a file:

* **Push** writes and fsyncs each file, then fsyncs the directory, in the
  caller's own worker thread, before the operation reaches the writer: the
  row that names a file commits only once the file is durable. A push that
  fails, or whose job was a duplicate, removes its files.
* **Reserve** opens the files inside its transaction and reads them after the
  commit, in a worker thread: a Destroy, or an Ack by the next holder of an
  expired lease, that removes a file meanwhile does not take it from an open
  descriptor. ``payload_size`` (the payload's size as JSON) bounds the reply
  by ``max_bytes`` without reading the file. A row whose file is missing
  (deleted by hand, a backup restored without it) sends its job to the
  dead-letter pipeline with an empty payload and a ``payload_missing`` header.
* **Delete** (Ack, auto-ack, Destroy): a trigger records the file's name in
  ``freed_files`` in the same transaction; after the commit the writer removes
  the files and, in its next transaction, those rows. A crash in between
  leaves a file no job names.
* **Open** removes the files no job names, while holding an exclusive lock on
  the directory: a second process on the same database (which does not get
  the lock) may have files in flight, and leaves them alone.
* With ``secure_delete`` every payload stays in its row: unlinking a file
  does not zero its blocks.

Schema (``PRAGMA user_version`` = 3; raise it with each migration)::

    pipelines(name TEXT PRIMARY KEY, driver TEXT = 'sqlite',
              priority INTEGER = 10,        -- reported by Stat
              paused INTEGER = 0,           -- 1: Reserve returns nothing
              config TEXT = '{}',           -- the other Declare fields, JSON
              jobs INTEGER = 0)             -- rows in queue (kept by triggers)
    jobs(seq INTEGER PRIMARY KEY,           -- written once: what was pushed
         id TEXT UNIQUE,                    -- the idempotency key
         pipeline, name, priority, delay, auto_ack, created_at,
         payload_file TEXT NULL,            -- a big payload's file (payload is "")
         payload_size INTEGER NULL,         -- its size as JSON (bytes, quotes included)
         headers TEXT (JSON), payload TEXT) -- the big values last
    queue(seq INTEGER PRIMARY KEY,          -- = jobs.seq: the state, small rows
          pipeline TEXT, priority INTEGER,
          available_at REAL,                -- handed out when <= now: created + delay,
                                            --   nack time + delay, or lease expiry
          token TEXT NULL,                  -- the current lease's token
          attempts INTEGER)                 -- deliveries so far
    INDEX queue_ready   ON queue(pipeline, priority, available_at)   -- Reserve, Peek
    INDEX queue_leased  ON queue(pipeline, available_at) WHERE token IS NOT NULL -- Stat
    INDEX queue_waiting ON queue(pipeline, available_at) WHERE token IS NULL     -- Stat
    acked(id TEXT PRIMARY KEY, token TEXT, at REAL)   -- done ids, kept dedupe_window s
    meta(key TEXT PRIMARY KEY, value)                 -- 'probe': the last write probe
    freed_files(name TEXT)            -- files of deleted jobs, to remove after the commit
    INDEX jobs_payload_file ON jobs(payload_file) WHERE payload_file IS NOT NULL
    TRIGGER jobs_file_freed: a deleted job's payload_file goes into freed_files

Why two tables for a job: a lease, a Nack or an Extend rewrites the job's
state; SQLite rewrites a whole row to change one column, so with the payload
in that row a lease on a 1 MB job would write 1 MB. ``queue`` rows are a few
dozen bytes, and every scan (Reserve, Peek, Stat) walks ``queue``'s indexes
only; ``jobs`` is read for the jobs handed out, by primary key.

A job is *ready* when ``available_at <= now``. A lease sets ``available_at``
to the lease's expiry, so leased jobs sit at the end of their priority's range
of the index, not at its head: Reserve's scan for each priority starts at the
oldest ready job and never steps over leased ones (O(log n) per priority).
Order: priority (lower first), then the moment the job became ready, then
insertion order.

A lease is a token, new at each delivery. Ack, Nack and Extend act only when
the token they carry is the job's current one, so a consumer whose lease
expired and whose job went to someone else changes nothing. A token stays
current until the job is delivered again, so a slow consumer whose lease
expired can still ack as long as nobody else took the job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final, Generic, TypeVar

import orjson
import outcome
import trio

from trismtp.jobs.model import Job, JobOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION: Final = 3
# A push is an UPSERT (INSERT … ON CONFLICT (id) DO NOTHING): SQLite 3.24.
MIN_SQLITE: Final = (3, 24, 0)
DEFAULT_PRIORITY: Final = 10
DRIVER: Final = "sqlite"
# Ops committed together at most; bounds one transaction's size and latency.
MAX_GROUP: Final = 128
DEFAULT_MAX_ATTEMPTS: Final = 10
DEFAULT_DEAD_LETTER: Final = "dead-letter"
DEFAULT_DEDUPE_WINDOW: Final = 86400.0
# Expired remembered ids deleted per job deleted, at most: forgetting keeps
# pace with remembering, and no call pays for a backlog.
_PRUNE_BATCH: Final = 2
DEFAULT_DISK_RESERVE: Final = 32 * 1024 * 1024
# Seconds between checks, while the store cannot write, of whether it can again.
PROBE_INTERVAL: Final = 1.0
_SQLITE_FULL: Final = 13
_SQLITE_INTERRUPT: Final = 9
# Seconds a small read may take on the Trio thread before it moves to a worker.
INLINE_READ_BUDGET: Final = 0.002
# Pages given back to the file system per step when a full disk is drained.
_VACUUM_STEP: Final = 256
# KiB of the writer's page cache (SQLite's default: 2 MiB). A consumer
# reserves and acks a job soon after it was pushed; with 2 MiB the pages of
# a big job had been pushed out by then and were read back from the WAL,
# twice (Reserve reads the payload, the delete walks its overflow chain).
# The mix's store work alone (docs/performance.md, "The writer's page cache")
# cost 17.5-18.6 ms of CPU per MB of job with 2 MiB, 13.0-14.5 with 16-64 MiB.
WRITER_CACHE_KIB: Final = 32 * 1024
# Characters of payload from which a push commits after the other ops queued
# with it (see _write_loop).
HEAVY_PUSH: Final = 1024 * 1024
# Characters of payload from which a job's payload is a file of its own beside
# the database (see "Big payloads" above) instead of a value in its row.
FILE_PAYLOAD: Final = 256 * 1024

# Primary SQLite result codes that mean "the file cannot be used right now",
# as opposed to a bug in our SQL: PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR,
# CORRUPT, FULL, CANTOPEN, PROTOCOL, NOLFS, NOTADB.
_STORAGE_ERROR_CODES: Final = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 22, 26})
_CORRUPT_CODES: Final = frozenset({11, 26})  # CORRUPT, NOTADB

_TABLES: Final = """
CREATE TABLE IF NOT EXISTS pipelines (
    name     TEXT PRIMARY KEY,
    driver   TEXT NOT NULL DEFAULT 'sqlite',
    priority INTEGER NOT NULL DEFAULT 10,
    paused   INTEGER NOT NULL DEFAULT 0,
    config   TEXT NOT NULL DEFAULT '{}',
    jobs     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    pipeline   TEXT NOT NULL,
    name       TEXT NOT NULL,
    priority   INTEGER NOT NULL,
    delay      INTEGER NOT NULL,
    auto_ack   INTEGER NOT NULL,
    created_at REAL NOT NULL,
    payload_file TEXT,
    payload_size INTEGER,
    headers    TEXT NOT NULL,
    payload    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    seq          INTEGER PRIMARY KEY,
    pipeline     TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    available_at REAL NOT NULL,
    token        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS acked (
    id    TEXT PRIMARY KEY,
    token TEXT,
    at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
CREATE TABLE IF NOT EXISTS freed_files (
    name TEXT NOT NULL
);
"""

_INDEXES: Final = """
CREATE INDEX IF NOT EXISTS queue_ready ON queue (pipeline, priority, available_at);
CREATE INDEX IF NOT EXISTS queue_leased ON queue (pipeline, available_at)
    WHERE token IS NOT NULL;
CREATE INDEX IF NOT EXISTS queue_waiting ON queue (pipeline, available_at)
    WHERE token IS NULL;
CREATE INDEX IF NOT EXISTS acked_at ON acked (at);
CREATE INDEX IF NOT EXISTS jobs_payload_file ON jobs (payload_file)
    WHERE payload_file IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS jobs_file_freed AFTER DELETE ON jobs
    WHEN OLD.payload_file IS NOT NULL BEGIN
    INSERT INTO freed_files (name) VALUES (OLD.payload_file);
END;
CREATE TRIGGER IF NOT EXISTS jobs_queued AFTER INSERT ON jobs BEGIN
    INSERT INTO queue (seq, pipeline, priority, available_at)
        VALUES (NEW.seq, NEW.pipeline, NEW.priority, NEW.created_at + NEW.delay);
END;
CREATE TRIGGER IF NOT EXISTS queue_counted_in AFTER INSERT ON queue BEGIN
    UPDATE pipelines SET jobs = jobs + 1 WHERE name = NEW.pipeline;
END;
CREATE TRIGGER IF NOT EXISTS queue_counted_out AFTER DELETE ON queue BEGIN
    UPDATE pipelines SET jobs = jobs - 1 WHERE name = OLD.pipeline;
END;
CREATE TRIGGER IF NOT EXISTS queue_counted_moved AFTER UPDATE OF pipeline ON queue BEGIN
    UPDATE pipelines SET jobs = jobs - 1 WHERE name = OLD.pipeline;
    UPDATE pipelines SET jobs = jobs + 1 WHERE name = NEW.pipeline;
END;
"""

# Version 1 kept a job in one row, lease and all; move it into the two tables.
# A lease taken under version 1 had no token: it gets one nobody holds, so it
# runs out and the job is delivered again, as version 1 would have done.
_MIGRATE_1_TO_2: Final = """
ALTER TABLE jobs RENAME TO jobs_v1;
DROP INDEX IF EXISTS jobs_queue;
ALTER TABLE pipelines ADD COLUMN jobs INTEGER NOT NULL DEFAULT 0;
{tables}
INSERT INTO jobs (seq, id, pipeline, name, priority, delay, auto_ack, created_at, headers, payload)
    SELECT rowid, id, pipeline, name, priority, delay, auto_ack, created_at, headers, payload
    FROM jobs_v1;
INSERT INTO queue (seq, pipeline, priority, available_at, token, attempts)
    SELECT rowid, pipeline, priority,
           MAX(available_at, COALESCE(reserved_until, available_at)),
           CASE WHEN reserved_until IS NULL THEN NULL ELSE 'v1-' || hex(randomblob(16)) END,
           attempts
    FROM jobs_v1;
DROP TABLE jobs_v1;
"""

# Version 2 kept every payload in its row.
_MIGRATE_2_TO_3: Final = """
ALTER TABLE jobs ADD COLUMN payload_file TEXT;
ALTER TABLE jobs ADD COLUMN payload_size INTEGER;
{tables}
"""


class StoreError(Exception):
    """Base of the errors the store reports for an operation."""


class NoSuchPipeline(StoreError):
    """The operation names pipelines that are not declared; nothing was changed."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(set(names))
        super().__init__(f"no such pipeline: {', '.join(self.names)}")


class BatchExpired(StoreError):
    """A batch arrived after the ``expires_at`` its sender gave; nothing stored."""

    def __init__(self, late_by: float) -> None:
        super().__init__(f"the batch expired {late_by:.3f} s before it could be stored")
        self.late_by = late_by


class StorageUnavailable(StoreError):
    """The SQLite file cannot be used now (disk full, read-only, locked, I/O
    error); nothing was changed. Retrying later may succeed."""


class _OverBudget(Exception):
    """A read on the Trio thread took longer than its budget and was stopped."""


class DatabaseCorrupt(StoreError):
    """The database file failed its integrity check at start; it is not used."""


@dataclass(frozen=True, slots=True)
class PipelineStat:
    """One pipeline's counts, shaped like RoadRunner's ``jobs.v1.Stat``."""

    pipeline: str
    driver: str
    queue: str
    active: int  # ready to be reserved now
    delayed: int  # waiting for their delay (or a nack's delay) to pass
    reserved: int  # leased to a consumer, lease not yet expired
    ready: bool  # False when paused
    priority: int

    def to_dict(self) -> dict[str, Any]:
        """As plain JSON data."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Lease:
    """A delivery of a job: the consumer's proof for Ack, Nack and Extend."""

    token: str
    attempt: int  # 1 on the first delivery
    expires_at: float  # wall-clock seconds

    def to_dict(self) -> dict[str, Any]:
        """The ``lease`` member of a reserved job."""
        return {"token": self.token, "attempt": self.attempt, "expires_at": self.expires_at}


class StoredPayload:
    """A payload as its file holds it: the payload as a JSON string, UTF-8.

    :meth:`Reserved.to_dict` puts one where the payload goes, for the reply's
    encoder to copy in as it is (``orjson.Fragment``): an 8 MB payload read
    back as text and escaped again as a JSON string cost the service 9 to
    35 ms of CPU per Reserve (more for non-ASCII text); copying costs ~1 ms.
    Not a dataclass: orjson would encode one as an object.
    """

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json

    def text(self) -> str:
        """The payload itself."""
        text: str = orjson.loads(self.json)
        return text


class Reserved:
    """A job handed out by :meth:`JobStore.reserve`, with its lease.

    A payload read from its file stays as stored until :attr:`job` is asked
    for; :meth:`to_dict`, what the reply is made of, never reads it.
    """

    __slots__ = ("_job", "_stored", "lease")

    def __init__(self, job: Job, lease: Lease, stored: StoredPayload | None = None) -> None:
        self._job = job
        self._stored = stored  # job.payload is "" while this is set
        self.lease = lease

    @property
    def job(self) -> Job:
        """The job, its payload read from the stored JSON on first use."""
        if self._stored is not None:
            self._job = self._job.model_copy(update={"payload": self._stored.text()})
            self._stored = None
        return self._job

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON data, with its ``lease`` member; a payload from
        its file is a :class:`StoredPayload` there."""
        data = self._job.to_dict()
        if self._stored is not None:
            data["payload"] = self._stored
        data["lease"] = self.lease.to_dict()
        return data

    def __repr__(self) -> str:
        stored = "" if self._stored is None else f", stored={len(self._stored.json)} bytes"
        return f"Reserved(job={self._job!r}, lease={self.lease!r}{stored})"


@dataclass(frozen=True, slots=True)
class Settled:
    """What Ack, Nack or Extend did: how many jobs, and which tokens were stale."""

    done: int
    stale: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Policy:
    """What the store does with jobs that keep coming back, and with done ids."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # 0: unlimited
    dead_letter: str = DEFAULT_DEAD_LETTER
    dedupe_window: float = DEFAULT_DEDUPE_WINDOW  # seconds; 0: forget at once
    disk_reserve: int = DEFAULT_DISK_RESERVE  # bytes kept free for consumers; 0: none
    # Overwrite a deleted job's pages with zeros (SQLite's secure_delete).
    # Off: the pages go to the free list as they are and new jobs reuse them.
    secure_delete: bool = False


Clock = Callable[[], float]
Operation = Callable[[sqlite3.Connection, float], T]
LeaseRef = tuple[str, str]
"""(job id, lease token)."""


class _Op(Generic[T]):
    """One operation on its way through the writer, and its outcome."""

    __slots__ = ("atomic", "done", "fn", "frees", "grows", "heavy", "outcome")

    def __init__(
        self,
        fn: Operation[T],
        *,
        grows: bool = False,
        heavy: bool = False,
        frees: bool = True,
        atomic: bool = False,
    ) -> None:
        self.fn = fn
        self.grows = grows  # stores new data: refused while the disk is full
        self.heavy = heavy  # committed after the light ops queued with it
        self.frees = frees  # may delete jobs, and so free their payload files
        # All or nothing without a transaction around it: its one write is a
        # single statement (or it begins a transaction itself), and nothing it
        # does after that write can fail. Alone, it runs without BEGIN/COMMIT.
        self.atomic = atomic
        self.done = trio.Event()
        self.outcome: outcome.Outcome[T] | None = None

    def resolve(self, result: outcome.Outcome[T]) -> None:
        self.outcome = result
        self.done.set()


class JobStore:
    """Pipelines and jobs in a SQLite file; open it with :meth:`open`.

    Every method is safe to call from many tasks at once. Methods raise
    :class:`NoSuchPipeline` and :class:`StorageUnavailable` as documented, and
    change nothing when they raise.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        busy_timeout: float,
        on_connect: Callable[[sqlite3.Connection], object] | None,
        policy: Policy,
    ) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._on_connect = on_connect
        self._policy = policy
        self._db: sqlite3.Connection | None = None  # only touched by the writer's threads
        self._reader: sqlite3.Connection | None = None  # only under _read_limiter
        self._read_limiter = trio.CapacityLimiter(1)
        self._healthy = True
        self._failure = ""  # why the store cannot write, while it cannot
        self._reserve = _DiskReserve(path.with_name(path.name + "-reserve"), policy.disk_reserve)
        self._payloads = path.with_name(path.name + "-payloads")
        self._payloads_lock: int | None = None  # the directory, flocked while open
        self._freed_unlinked = False  # freed_files rows whose files are unlinked
        self._full = False  # the disk filled up: new jobs are refused, see _DiskReserve
        self._full_lock = threading.Lock()  # the writer and payload writes may both find it
        self._room_checked_at = -math.inf
        self._dead_letter_warned_at = -float("inf")
        self._dead_lettered_unlogged = 0
        self._submit, self._receive = trio.open_memory_channel[_Op[Any]](0)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | Path,
        *,
        clock: Clock = time.time,
        busy_timeout: float = 5.0,
        on_connect: Callable[[sqlite3.Connection], object] | None = None,
        policy: Policy | None = None,
    ) -> AsyncIterator[JobStore]:
        """Open (creating it and its directory if needed) the store at *path*.

        *busy_timeout* is how many seconds an operation waits for another
        process's lock on the file before :class:`StorageUnavailable`.
        *on_connect* is called with each new SQLite connection after the
        store's own pragmas, e.g. to tune the cache (tests use it to cap the
        file's size). Raises :class:`StorageUnavailable` if the file cannot be
        opened now: at start-up that is an error for the operator to fix.
        *policy* sets attempts, the dead-letter pipeline and the dedupe window.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StorageUnavailable(
                f"the SQLite library Python uses is {sqlite3.sqlite_version}; the jobs store"
                f" needs {'.'.join(map(str, MIN_SQLITE))} or later"
            )
        store = cls(
            Path(path),
            clock=clock,
            busy_timeout=busy_timeout,
            on_connect=on_connect,
            policy=policy or Policy(),
        )
        try:
            await trio.to_thread.run_sync(store._open_now)
        except BaseException:
            store._release_payloads()  # taken before a later step failed
            raise
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._write_loop)
                try:
                    yield store
                finally:
                    # The writer finishes any op it holds, then sees the end.
                    store._submit.close()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store._drop_connection)
                async with store._read_limiter:
                    await trio.to_thread.run_sync(store._drop_reader)
                store._release_payloads()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def payloads(self) -> Path:
        """The directory of the payloads kept as files (beside the database)."""
        return self._payloads

    @property
    def unwritable(self) -> str | None:
        """None while the store can write, else why not (for ``/readyz``).

        Set by a failed commit; cleared only by a write that succeeded, which
        the writer attempts every :data:`PROBE_INTERVAL` seconds meanwhile.
        """
        if self._full:
            return f"the disk holding {self._path} is full: new jobs are refused"
        if not self._healthy:
            return f"the jobs database {self._path} cannot be written: {self._failure}"
        return None

    def free_bytes(self) -> int | None:
        """Bytes free for the database on its file system (None if unknown)."""
        return _fs_free(self._path.parent)

    # -- operations ---------------------------------------------------------

    async def push_batch(self, jobs: Sequence[Job], *, expires_at: float | None = None) -> None:
        """Store *jobs* atomically: all of them are durable, or none.

        A job whose id is already stored, or was acked within the policy's
        dedupe window, is skipped (the id is the idempotency key). Raises
        :class:`NoSuchPipeline` if any job names an undeclared pipeline.
        Paused pipelines accept jobs. With *expires_at* (the store's clock), a
        batch that reaches its transaction later than that stores nothing and
        raises :class:`BatchExpired`: its sender has given up on it, and
        storing it would only make the sender's retry a duplicate.
        """
        window = self._policy.dedupe_window
        jobs = list(jobs)
        big = (
            []
            if self._policy.secure_delete
            else [index for index, job in enumerate(jobs) if len(job.payload) >= FILE_PAYLOAD]
        )
        files: dict[int, tuple[str, int]] = {}
        if big:
            if self._full:
                raise StorageUnavailable(self._full_reason())
            written = await trio.to_thread.run_sync(
                self._write_payloads, [jobs[index].payload for index in big]
            )
            files = dict(zip(big, written, strict=True))
        try:
            unused = await self._run(
                _Op(
                    partial(
                        _push_batch, jobs=jobs, files=files, expires_at=expires_at, window=window
                    ),
                    grows=True,
                    heavy=sum(len(job.payload) for i, job in enumerate(jobs) if i not in files)
                    >= HEAVY_PUSH,
                    frees=False,
                    # With files, it reads after its insert, and a failure there
                    # would have the caller remove files that committed rows name.
                    atomic=not files,
                )
            )
        except BaseException:
            self._remove_payloads([name for name, _ in files.values()])
            raise
        self._remove_payloads(unused)

    async def list_pipelines(self) -> list[str]:
        """The declared pipelines' names, sorted."""
        return await self._read(_list_pipelines, inline=True)

    async def stat(self) -> list[PipelineStat]:
        """Counts for every declared pipeline, sorted by name."""
        return await self._read(_stat, inline=True)

    async def declare(
        self, name: str, *, priority: int | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        """Declare pipeline *name*; declaring it again keeps its jobs and state.

        *priority* and *config* (the other Declare fields) are stored when
        given, else left as they are (new pipelines: priority 10, no config).
        """
        await self._run(partial(_declare, name=name, priority=priority, config=config))

    async def pause(self, names: Sequence[str]) -> None:
        """Stop handing out jobs of *names*; they still accept pushes."""
        await self._run(partial(_set_paused, names=list(names), paused=True))

    async def resume(self, names: Sequence[str]) -> None:
        """Hand out jobs of *names* again."""
        await self._run(partial(_set_paused, names=list(names), paused=False))

    async def destroy(self, names: Sequence[str]) -> None:
        """Drop the pipelines *names* and all their jobs."""
        await self._run(partial(_destroy, names=list(names)))

    async def reserve(
        self, pipeline: str, max_jobs: int, lease: float, *, max_bytes: int | None = None
    ) -> list[Reserved]:
        """Lease up to *max_jobs* ready jobs of *pipeline* for *lease* seconds.

        Order: priority (lower first), then the moment each became ready. Each
        delivery gets a new token and counts an attempt; a job not acked
        within its lease is handed out again. A job that comes back after the
        policy's ``max_attempts`` deliveries goes to the dead-letter pipeline
        instead. ``auto_ack`` jobs are deleted as they are handed out (at most
        once). A paused pipeline hands out nothing. With *max_bytes*, jobs
        stop before their JSON (with the lease) would pass that many bytes,
        but at least one job is handed out if any is ready.
        """
        reserved = await self._run(
            partial(
                _reserve,
                pipeline=pipeline,
                max_jobs=max_jobs,
                lease=lease,
                max_bytes=max_bytes,
                policy=self._policy,
                moved=self._dead_lettered,
                payloads=self._payloads,
            )
        )
        if not any(file is not None for _, file in reserved):
            return [job for job, _ in reserved]
        # The files were opened in the transaction: an Ack or a Destroy
        # committed since then cannot take them away from this read.
        return await trio.to_thread.run_sync(_read_payloads, reserved)

    async def peek(
        self, pipeline: str, max_jobs: int, *, max_bytes: int | None = None
    ) -> list[Job]:
        """Up to *max_jobs* jobs of *pipeline*, in reserve order, without leasing them.

        Every job still in the store is shown, delayed and reserved ones too.
        *max_bytes* bounds their JSON as for :meth:`reserve`.
        """
        return await self._read(
            partial(
                _peek,
                pipeline=pipeline,
                max_jobs=max_jobs,
                max_bytes=max_bytes,
                payloads=self._payloads,
            ),
            snapshot=True,
        )

    async def ack(self, leases: Sequence[LeaseRef]) -> Settled:
        """Delete the jobs whose (id, token) is current: they are done.

        Their ids are remembered for the dedupe window. A stale token changes
        nothing and is listed in the result; acking again with the token that
        acked a job counts as done (a retried Ack whose reply was lost).
        """
        return await self._run(
            partial(_ack, leases=list(leases), window=self._policy.dedupe_window)
        )

    async def nack(
        self, leases: Sequence[LeaseRef], *, requeue: bool, delay: float = 0.0
    ) -> Settled:
        """Give back the jobs whose (id, token) is current: with *requeue*,
        deliverable again after *delay* seconds (or dead-lettered, past the
        policy's attempts); without, deleted like an Ack. Stale tokens change
        nothing and are listed in the result."""
        if not requeue:
            window = self._policy.dedupe_window
            return await self._run(partial(_ack, leases=list(leases), window=window))
        return await self._run(
            partial(
                _requeue,
                leases=list(leases),
                delay=delay,
                policy=self._policy,
                moved=self._dead_lettered,
            )
        )

    async def extend(self, leases: Sequence[LeaseRef], lease: float) -> Settled:
        """Extend each current lease to now + *lease* seconds (same token)."""
        return await self._run(partial(_extend, leases=list(leases), lease=lease))

    # -- dead letters -------------------------------------------------------

    def _dead_lettered(self, job_id: str, pipeline: str, attempts: int) -> None:
        # Called in the writer's thread. One WARNING a minute at most: a
        # poisoned backlog would otherwise write a line per job.
        now = time.monotonic()
        if now - self._dead_letter_warned_at < 60.0:
            self._dead_lettered_unlogged += 1
            return
        more = self._dead_lettered_unlogged
        self._dead_letter_warned_at, self._dead_lettered_unlogged = now, 0
        logger.warning(
            "job %s of pipeline %r moved to %r after %d attempts%s",
            job_id,
            pipeline,
            self._policy.dead_letter,
            attempts,
            f" (and {more} more jobs since the last such line)" if more else "",
        )

    # -- payload files -------------------------------------------------------

    def _write_payloads(self, payloads: Sequence[str]) -> list[tuple[str, int]]:
        """Write each payload to a new file, durably (in a worker thread).

        Returns each file's name and the payload's size as JSON. Raises
        :class:`StorageUnavailable`, with no file left behind, if any write fails.
        """
        written: list[tuple[str, int]] = []
        try:
            self._payloads.mkdir(mode=0o700, exist_ok=True)
            for payload in payloads:
                # As a JSON string: its size is then the file's, and a Reserve
                # copies it into the reply as it is (StoredPayload).
                data = orjson.dumps(payload)
                name = secrets.token_hex(16)
                fd = os.open(
                    self._payloads / name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                )
                written.append((name, len(data)))
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_directory(self._payloads)  # the new names are durable too
        except OSError as exc:
            self._remove_payloads([name for name, _ in written])
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # As when SQLite finds the disk full: refuse new jobs (and
                # say so on /readyz) until consumers have made room.
                self._fill_up()
                raise StorageUnavailable(self._full_reason()) from exc
            raise StorageUnavailable(
                f"storing a job's payload in {self._payloads} failed: {exc.strerror}"
            ) from exc
        except BaseException:
            self._remove_payloads([name for name, _ in written])
            raise
        return written

    def _remove_payloads(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                (self._payloads / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # left for the sweep at the next start
                logger.warning("cannot remove the payload file %s: %s", self._payloads / name, exc)

    def _unlink_freed(self, db: sqlite3.Connection) -> None:
        """Remove the files of the jobs deleted by the last commit (writer's thread)."""
        names = [name for (name,) in db.execute("SELECT name FROM freed_files")]
        if names:
            self._remove_payloads(names)
            self._freed_unlinked = True  # their rows go in the next transaction

    def _sweep_payloads(self, db: sqlite3.Connection) -> None:
        """At open: remove payload files no job refers to (a crash can leave them).

        Only while this store holds the directory's lock: another process
        serving the same database may be writing a payload it has not committed.
        """
        self._payloads.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self._payloads, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            logger.warning(
                "another process holds %s: it serves %s too, so payload files left by a"
                " crash are not removed by this one",
                self._payloads,
                self._path,
            )
            return
        self._payloads_lock = fd
        db.execute("DELETE FROM freed_files")
        orphans = [
            entry.name
            for entry in os.scandir(self._payloads)
            if db.execute(
                "SELECT 1 FROM jobs INDEXED BY jobs_payload_file WHERE payload_file = ?",
                (entry.name,),
            ).fetchone()
            is None
        ]
        if orphans:
            self._remove_payloads(orphans)
            logger.info(
                "removed %d payload files from %s that no job refers to (a push that never"
                " committed, or an ack whose file was not removed yet)",
                len(orphans),
                self._payloads,
            )

    def _release_payloads(self) -> None:
        fd, self._payloads_lock = self._payloads_lock, None
        if fd is not None:
            os.close(fd)

    # -- reads --------------------------------------------------------------

    async def _read(self, fn: Operation[T], *, snapshot: bool = False, inline: bool = False) -> T:
        async with self._read_limiter:
            if inline:
                # Small reads (Stat, List) first try on the Trio thread, within a
                # budget: a worker thread would wait for the GIL two or three
                # times, up to 5 ms each while SMTP sessions keep the loop busy.
                # Past the budget SQLite stops the statement, and it runs again
                # in a worker thread.
                with contextlib.suppress(_OverBudget):
                    return self._run_read(fn, snapshot, INLINE_READ_BUDGET)
            return await trio.to_thread.run_sync(self._run_read, fn, snapshot, None)

    def _run_read(self, fn: Operation[T], snapshot: bool, budget: float | None) -> T:
        try:
            db = self._reader_connection()
            if budget is not None:
                deadline = time.perf_counter() + budget
                db.set_progress_handler(lambda: time.perf_counter() > deadline, 1000)
            try:
                if not snapshot:  # one statement is a snapshot of its own
                    return fn(db, self._clock())
                db.execute("BEGIN")  # one snapshot for the whole read
                try:
                    return fn(db, self._clock())
                finally:
                    db.execute("COMMIT")
            finally:
                if budget is not None:
                    db.set_progress_handler(None, 0)
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and _sqlite_code(exc) == _SQLITE_INTERRUPT:
                raise _OverBudget from exc
            failure = _storage_failure(exc)
            if failure is None:
                raise
            self._drop_reader()
            raise failure from exc

    def _reader_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            db = sqlite3.connect(
                f"file:{self._path}?mode=rw",
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # worker threads take turns under the limiter
            )
            try:
                db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                db.execute("PRAGMA query_only = 1")
            except BaseException:
                db.close()
                raise
            self._reader = db
        return self._reader

    def _drop_reader(self) -> None:
        db, self._reader = self._reader, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- the writer ---------------------------------------------------------

    async def _run(self, op: Operation[T] | _Op[T]) -> T:
        """Have the writer run *op* (an operation, or one with its flags set)."""
        if not isinstance(op, _Op):
            op = _Op(op)
        await self._submit.send(op)  # the only cancellable step: nothing done yet
        # The writer holds the op now and resolves it whatever happens; wait
        # for that even if cancelled, so the caller can report the outcome.
        with trio.CancelScope(shield=True):
            await op.done.wait()
        assert op.outcome is not None
        return op.outcome.unwrap()

    async def _write_loop(self) -> None:
        async with self._receive:
            while True:
                first: _Op[Any] | None = None
                try:
                    if self._healthy and not self._full:
                        first = await self._receive.receive()
                    else:
                        # Find out, without waiting for a caller, when it can
                        # write again: /readyz depends on it, and a balancer
                        # that sees "not ready" sends nothing to find out.
                        with trio.move_on_after(PROBE_INTERVAL):
                            first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                if first is None:
                    first = _Op(_probe)
                group: list[_Op[Any]] = [first]
                while len(group) < MAX_GROUP:
                    try:
                        group.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # A big push's insert takes tens of milliseconds (~4 ms a MB);
                # the small pushes, reserves and acks queued with it commit
                # first, in a transaction of their own, instead of waiting
                # for it.
                light = [op for op in group if not op.heavy]
                heavy = [op for op in group if op.heavy]
                try:
                    for part in (light, heavy) if light and heavy else (group,):
                        with trio.CancelScope(shield=True):
                            results = await trio.to_thread.run_sync(self._run_group, part)
                        for op, result in zip(part, results, strict=True):
                            op.resolve(result)
                except BaseException as exc:
                    # A bug in the bookkeeping below: tell the waiters (they
                    # are shielded and would wait forever), then crash loudly.
                    for op in group:
                        if not op.done.is_set():
                            op.resolve(outcome.Error(exc))
                    raise

    def _run_group(self, group: Sequence[_Op[Any]]) -> list[outcome.Outcome[Any]]:
        """Run *group* in one transaction (in a worker thread); an outcome per op."""
        results: dict[int, outcome.Outcome[Any]] = {}
        todo = list(range(len(group)))
        if self._full:
            self._check_room()

        def refuse_growth() -> None:
            for index in [i for i in todo if group[i].grows]:
                results[index] = outcome.Error(StorageUnavailable(self._full_reason()))
                todo.remove(index)

        if self._full:
            refuse_growth()
        while todo:
            now = self._clock()
            staged: dict[int, outcome.Outcome[Any]] = {}
            running: int | None = None
            try:
                db = self._connection()
                # Each statement hands the GIL over twice, and that waits for
                # the event loop when it is busy. Alone in its group, an op
                # needs no savepoint (its transaction is one), and an atomic
                # op (a push: one INSERT) needs no BEGIN and COMMIT either:
                # SQLite commits its statement, fsync included.
                bare = len(todo) == 1 and group[todo[0]].atomic and not self._freed_unlinked
                if not bare:
                    db.execute("BEGIN IMMEDIATE")
                    if self._freed_unlinked:
                        db.execute("DELETE FROM freed_files")
                run = _run_alone if len(todo) == 1 else _run_in_savepoint
                for index in todo:
                    running = index
                    staged[index] = run(db, group[index].fn, now)
                running = None
                committed = len(todo) > 1 or isinstance(staged[todo[0]], outcome.Value)
                if not bare or db.in_transaction:  # an atomic op may begin its own
                    db.execute("COMMIT" if committed else "ROLLBACK")
            except Exception as exc:
                failure = _storage_failure(exc)
                if failure is None:
                    raise
                self._drop_connection()
                self._report(failure)
                if _is_full(exc) and not self._full:
                    self._fill_up()
                    if running is not None and group[running].grows:
                        results[running] = outcome.Error(_copy(failure))
                        todo.remove(running)
                    refuse_growth()
                    continue  # the others can still go: they free space or need little
                if running is None:
                    # Opening, BEGIN or COMMIT failed: nothing of this attempt is stored.
                    for index in todo:
                        results[index] = outcome.Error(_copy(failure))
                    break
                # One op hit the storage error, and SQLite may have rolled the
                # whole transaction back: fail that op, try the others again.
                results[running] = outcome.Error(_copy(failure))
                todo.remove(running)
            else:
                results.update(staged)
                if not committed:
                    break  # the op failed on its own; nothing was written
                self._freed_unlinked = False
                self._report(None)
                if any(group[index].frees for index in todo):
                    try:
                        self._unlink_freed(db)
                    except sqlite3.Error as exc:  # the rows stay: the next commit tries again
                        logger.debug("cannot list the payload files to remove: %s", exc)
                break
        return [results[index] for index in range(len(group))]

    def _report(self, failure: StorageUnavailable | None) -> None:
        # Log the change of state, not every failed operation: a full disk
        # under load would otherwise flood the log.
        if failure is not None and self._healthy:
            logger.error("storage unavailable (%s): %s", self._path, failure)
        elif failure is not None:
            logger.debug("storage still unavailable (%s): %s", self._path, failure)
        elif self._full:
            return  # consumers' writes succeed on the reserve; new jobs still cannot
        elif not self._healthy:
            logger.info("storage available again (%s)", self._path)
        self._healthy = failure is None
        self._failure = "" if failure is None else str(failure)

    # -- a full disk (worker threads only) ----------------------------------

    def _fill_up(self) -> None:
        with self._full_lock:
            if self._full:
                return
            self._full = True
        released = self._reserve.release()
        logger.warning(
            "the disk holding %s is full: %s; new jobs are refused (-32003, so SMTP answers"
            " 451) while consumers drain the queue, until %d MiB are free again",
            self._path,
            f"released the {released // 2**20} MiB reserve ({self._reserve.path}) for them"
            if released
            else "no reserve to release (jobs_service.disk_reserve)",
            self._reserve.size // 2**20,
        )

    def _full_reason(self) -> str:
        return (
            f"the disk holding {self._path} is full: new jobs are refused until consumers "
            "have drained the queue or space is freed"
        )

    def _check_room(self) -> None:
        """Leave the full state when there is room for the reserve and for new jobs."""
        now = time.monotonic()
        if now - self._room_checked_at < PROBE_INTERVAL:
            return
        self._room_checked_at = now
        try:
            db = self._connection()
            freelist = _pragma_int(db, "freelist_count")
            page_size = _pragma_int(db, "page_size")
            if freelist and _pragma_int(db, "auto_vacuum") == 2:
                # Give the pages acked jobs left behind back to the file
                # system, a little at a time: each step goes through the WAL
                # (which needs room too) and its checkpoint then truncates the
                # file and the WAL. executescript steps the pragma to its end
                # (execute() would free a single page).
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                while freelist:
                    db.executescript(f"PRAGMA incremental_vacuum({_VACUUM_STEP});")
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    freelist = _pragma_int(db, "freelist_count")
        except Exception as exc:
            if _storage_failure(exc) is None:
                raise
            logger.debug("no room yet on the disk holding %s: %s", self._path, exc)
            self._drop_connection()
            return
        fs_free = _fs_free(self._path.parent) or 0
        need = max(self._reserve.size, 4 * 2**20)
        if not self._reserve.present and fs_free >= self._reserve.size + need:
            self._reserve.create()
            fs_free = _fs_free(self._path.parent) or 0
        inside = freelist * page_size  # room for new jobs inside the file
        logger.debug(
            "room on the disk holding %s: %d bytes free, %d inside the file, reserve %s",
            self._path,
            fs_free,
            inside,
            "set aside" if self._reserve.present else "missing",
        )
        if not self._reserve.present and inside < 2 * need:
            return
        if fs_free + inside < need:
            return
        self._full = False
        logger.warning(
            "the disk holding %s has room again (%d MiB free, %d MiB inside the database):"
            " accepting new jobs%s",
            self._path,
            fs_free // 2**20,
            inside // 2**20,
            "" if self._reserve.present else "; the reserve could not be restored yet",
        )

    # -- the connection (worker threads only) -------------------------------

    def _open_now(self) -> None:
        self._check_replaced()
        try:
            db = self._connection()
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and _sqlite_code(exc) in _CORRUPT_CODES:
                raise DatabaseCorrupt(_corrupt_message(self._path, str(exc))) from exc
            failure = _storage_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        if problems != ["ok"]:
            self._drop_connection()
            raise DatabaseCorrupt(_corrupt_message(self._path, problems[0]))
        try:
            self._sweep_payloads(db)
        except Exception as exc:
            self._drop_connection()
            failure = _storage_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        _marker(self._path).touch()
        if self._reserve.size and not self._reserve.present and not self._reserve.create():
            logger.warning(
                "cannot set aside the %d MiB disk reserve %s (no space?): a full disk will"
                " stop consumers too until space is freed",
                self._reserve.size // 2**20,
                self._reserve.path,
            )

    def _check_replaced(self) -> None:
        """Warn when the database is missing or empty where one has been before."""
        if not _empty_or_missing(self._path):
            return
        wal = self._path.with_name(self._path.name + "-wal")
        held = _marker(self._path).exists()
        orphans = [
            side for side in (wal, self._path.with_name(self._path.name + "-shm")) if side.exists()
        ]
        if self._payloads.is_dir() and any(self._payloads.iterdir()):
            # The payloads of the jobs that were lost with it: the sweep at
            # open would remove them all, and a restored database needs them.
            orphans.append(self._payloads)
        if not held and not orphans:
            return  # a first start
        logger.warning(
            "the jobs database %s is %s, but %s: it was deleted or truncated, and every job"
            " it held is gone from this store. If that was not meant, stop trismtp now and"
            " restore the file from a backup (docs/operations.md). Starting on an empty"
            " database.",
            self._path,
            "missing" if not self._path.exists() else "empty",
            f"{_marker(self._path).name} shows one was created here before"
            if held
            else f"{wal.name} was left beside it",
        )
        # SQLite would replay a WAL left from the old file into the new one.
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for side in orphans:
            aside = side.with_name(f"{side.name}.orphan-{stamp}")
            side.rename(aside)
            logger.warning("moved %s aside to %s", side, aside)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN and COMMIT ourselves
            check_same_thread=False,  # worker threads take turns; see the module doc
        )
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        # Only takes on a new file (before WAL and the first table): lets a
        # full disk get back the space of acked jobs (see _check_room).
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StorageUnavailable(
                f"{self._path}: SQLite cannot use WAL journal mode there (it reports "
                f"{mode!r}); put the database on a local file system"
            )
        db.execute("PRAGMA synchronous = FULL")
        db.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        # Set either way: SQLite's default depends on how it was built
        # (Debian's turns it on). On, every acked job is written a second
        # time, as zeros, through the WAL and the checkpoint: 13.3 -> 9.6 ms
        # of CPU per MB of job for the mix's store work (python -m bench.store).
        db.execute(f"PRAGMA secure_delete = {int(self._policy.secure_delete)}")
        if self._on_connect is not None:
            self._on_connect(db)
        self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"{self._path} has schema version {version}, newer than this trismtp "
                f"knows ({SCHEMA_VERSION}); run a newer trismtp"
            )
        if version == 0:
            steps = _TABLES
        else:
            logger.info("migrating %s to schema version %d", self._path, SCHEMA_VERSION)
            # Version 1's migration creates the tables as they are now.
            steps = (_MIGRATE_1_TO_2 if version == 1 else _MIGRATE_2_TO_3).format(tables=_TABLES)
        db.executescript(
            f"BEGIN IMMEDIATE; {steps} {_INDEXES}"
            " UPDATE pipelines SET jobs ="
            " (SELECT COUNT(*) FROM queue WHERE queue.pipeline = pipelines.name);"
            f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    def _drop_connection(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            # close() discards an open transaction; a broken file may refuse even that.
            with contextlib.suppress(sqlite3.Error):
                db.close()


def _run_alone(db: sqlite3.Connection, fn: Operation[Any], now: float) -> outcome.Outcome[Any]:
    """Run the only op of its group; the caller rolls back what it began if it failed."""
    try:
        return outcome.Value(fn(db, now))
    except Exception as exc:
        if _storage_failure(exc) is not None:
            raise  # as in _run_in_savepoint
        return outcome.Error(exc)


def _run_in_savepoint(
    db: sqlite3.Connection, fn: Operation[Any], now: float
) -> outcome.Outcome[Any]:
    db.execute("SAVEPOINT op")
    try:
        value = fn(db, now)
    except Exception as exc:
        if _storage_failure(exc) is not None:
            raise  # the caller retries the group without this op
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        return outcome.Error(exc)
    db.execute("RELEASE op")
    return outcome.Value(value)


def _storage_failure(exc: BaseException) -> StorageUnavailable | None:
    """The :class:`StorageUnavailable` that *exc* means, or None if it is a bug."""
    if isinstance(exc, StorageUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _STORAGE_ERROR_CODES:
            failure = StorageUnavailable(f"{exc} ({exc.sqlite_errorname})")
            failure.__cause__ = exc
            return failure
        return None
    if isinstance(exc, OSError):  # creating the directory
        failure = StorageUnavailable(f"cannot create the database's directory: {exc}")
        failure.__cause__ = exc
        return failure
    return None


def _sqlite_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _is_full(exc: BaseException) -> bool:
    """True when *exc* says the disk is full."""
    if isinstance(exc, sqlite3.Error):
        return _sqlite_code(exc) == _SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _pragma_int(db: sqlite3.Connection, name: str) -> int:
    (value,) = db.execute(f"PRAGMA {name}").fetchone()
    return int(value)


def _fs_free(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _marker(path: Path) -> Path:
    """The file that says a database was created at *path* before."""
    return path.with_name(path.name + "-created")


def _corrupt_message(path: Path, problem: str) -> str:
    return (
        f"the jobs database {path} is damaged ({problem}); it was not used. Restore it"
        " from a backup or recover what it holds: see docs/operations.md"
        " (A damaged database)"
    )


class _DiskReserve:
    """Disk space set aside so that consumers can drain a full disk.

    On a full disk every write fails, deletes included (SQLite writes them
    to the WAL first). So the store keeps a file of ``size`` bytes beside the
    database. When a commit fails because the disk is full, the file is
    deleted: Reserve, Ack and Nack then have room, while pushes are refused
    without being tried (they would only fill the room again). Acked jobs
    leave free pages in the database; the store gives them back to the file
    system (incremental vacuum) and, once there is room for the reserve and
    for new jobs, sets the reserve aside again and accepts pushes.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def present(self) -> bool:
        try:
            return os.stat(self.path).st_size >= self.size
        except OSError:
            return False

    def create(self) -> bool:
        """Set the space aside; False when there is not enough."""
        if self.size <= 0:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # No fallocate here: only written blocks are taken.
                    block = b"\0" * 2**20
                    for _ in range(-(-self.size // len(block))):
                        os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.debug("cannot create the disk reserve %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return False
        return True

    def release(self) -> int:
        """Delete the reserve; how many bytes that freed."""
        try:
            size = os.stat(self.path).st_size
            self.path.unlink()
        except OSError:
            return 0
        return size


def _copy(failure: StorageUnavailable) -> StorageUnavailable:
    # One instance per waiter: concurrent raises of one object tangle its traceback.
    error = StorageUnavailable(*failure.args)
    error.__cause__ = failure.__cause__
    return error


# -- the operations ---------------------------------------------------------
# Writes run inside the writer's transaction, reads inside the reader's.


def _require_pipelines(db: sqlite3.Connection, names: Iterable[str]) -> None:
    missing = [
        name
        for name in set(names)
        if db.execute("SELECT 1 FROM pipelines WHERE name = ?", (name,)).fetchone() is None
    ]
    if missing:
        raise NoSuchPipeline(missing)


def _push_batch(
    db: sqlite3.Connection,
    now: float,
    *,
    jobs: list[Job],
    files: Mapping[int, tuple[str, int]],
    expires_at: float | None,
    window: float,
) -> list[str]:
    """Insert *jobs*; *files* maps a job's index to its payload's file and JSON
    size. Returns the files no stored job refers to (their ids were stored or
    acked already): the caller removes them."""
    if expires_at is not None and now > expires_at:
        raise BatchExpired(now - expires_at)
    forget_before = now - window if window > 0 else math.inf
    rows = [
        (
            job.id,
            job.options.pipeline,
            job.job,
            job.options.priority,
            job.options.delay,
            int(job.options.auto_ack),
            now,
            *files.get(index, (None, None)),
            json.dumps(job.headers, ensure_ascii=False, separators=(",", ":")),
            "" if index in files else job.payload,
        )
        for index, job in enumerate(jobs)
    ]
    # One statement for the batch, not one per job: SQLite inserts every row
    # in one step, so the writer's thread hands the GIL over once, not once a
    # job (see _run_group), and alone in its group the statement is the
    # transaction. SQLite reads a VALUES list in order, so the rows keep the
    # batch's order (tested). An id still stored is skipped (ON CONFLICT),
    # an id acked within the window is left out (WHERE), and the trigger
    # jobs_queued gives each new job its queue row. A job for a pipeline not
    # declared gets a NULL pipeline: the NOT NULL constraint aborts the
    # statement, which stores none of the batch.
    per_statement = _rows_per_statement(db)
    if len(rows) > per_statement and not db.in_transaction:
        db.execute("BEGIN IMMEDIATE")  # all statements or none; the caller commits
    try:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            db.execute(
                "INSERT INTO jobs (id, pipeline, name, priority, delay, auto_ack,"
                " created_at, payload_file, payload_size, headers, payload)"
                " SELECT column1,"
                " CASE WHEN column2 IN (SELECT name FROM pipelines) THEN column2 END,"
                " column3, column4, column5, column6, column7, column8, column9, column10,"
                " column11"
                f" FROM (VALUES {','.join([_PUSH_ROW] * len(chunk))}) AS pushed"
                " WHERE NOT EXISTS (SELECT 1 FROM acked WHERE id = pushed.column1 AND at >= ?)"
                " ON CONFLICT (id) DO NOTHING",
                [*(value for row in chunk for value in row), forget_before],
            )
    except sqlite3.IntegrityError:
        # The batch fails whole (the caller rolls back what an earlier
        # statement inserted).
        _require_pipelines(db, {job.options.pipeline for job in jobs})
        raise  # not for want of a pipeline: a bug
    return [
        name
        for index, (name, _) in files.items()
        if db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND payload_file = ?", (jobs[index].id, name)
        ).fetchone()
        is None
    ]


_PUSH_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows of one push statement at most: bounds its text, and so the number of
# different statements in the connection's cache.
_PUSH_ROWS_MAX: Final = 64


def _rows_per_statement(db: sqlite3.Connection) -> int:
    """Rows of a push statement: at most _PUSH_ROWS_MAX, and within the number of
    parameters this SQLite takes (999 before 3.32, 32766 since)."""
    variables = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(_PUSH_ROWS_MAX, (variables - 1) // _PUSH_ROW.count("?")))


def _probe(db: sqlite3.Connection, now: float) -> None:
    """A small real write: proves the store can commit again."""
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (now,))


def _list_pipelines(db: sqlite3.Connection, now: float) -> list[str]:
    return [name for (name,) in db.execute("SELECT name FROM pipelines ORDER BY name")]


def _stat(db: sqlite3.Connection, now: float) -> list[PipelineStat]:
    # The total is a counter; only leased and delayed jobs are counted, each
    # through a partial index of its own: Stat costs what is in flight, not
    # what is stored. One statement, so the reader thread takes the GIL
    # twice, not twice per pipeline: under load each take can wait 5 ms.
    rows = db.execute(
        """
        SELECT p.name, p.driver, p.priority, p.paused, p.jobs,
               (SELECT COUNT(*) FROM queue INDEXED BY queue_leased
                WHERE pipeline = p.name AND token IS NOT NULL AND available_at > :now),
               (SELECT COUNT(*) FROM queue INDEXED BY queue_waiting
                WHERE pipeline = p.name AND token IS NULL AND available_at > :now)
        FROM pipelines AS p ORDER BY p.name
        """,
        {"now": now},
    ).fetchall()
    return [
        PipelineStat(
            pipeline=name,
            driver=driver,
            queue=name,
            active=max(total - reserved - delayed, 0),
            delayed=delayed,
            reserved=reserved,
            ready=not paused,
            priority=priority,
        )
        for name, driver, priority, paused, total, reserved, delayed in rows
    ]


def _declare(
    db: sqlite3.Connection,
    now: float,
    *,
    name: str,
    priority: int | None,
    config: Mapping[str, Any] | None,
) -> None:
    config_json = None if config is None else json.dumps(dict(config), ensure_ascii=False)
    db.execute(
        "INSERT OR IGNORE INTO pipelines (name, driver, priority, paused, config)"
        " VALUES (?, ?, ?, 0, ?)",
        (name, DRIVER, DEFAULT_PRIORITY if priority is None else priority, config_json or "{}"),
    )
    if priority is not None:
        db.execute("UPDATE pipelines SET priority = ? WHERE name = ?", (priority, name))
    if config_json is not None:
        db.execute("UPDATE pipelines SET config = ? WHERE name = ?", (config_json, name))


def _set_paused(db: sqlite3.Connection, now: float, *, names: list[str], paused: bool) -> None:
    _require_pipelines(db, names)
    db.executemany(
        "UPDATE pipelines SET paused = ? WHERE name = ?", [(int(paused), name) for name in names]
    )


def _destroy(db: sqlite3.Connection, now: float, *, names: list[str]) -> None:
    _require_pipelines(db, names)
    for name in names:
        db.execute(
            "DELETE FROM jobs WHERE seq IN (SELECT seq FROM queue WHERE pipeline = ?)", (name,)
        )
        db.execute("DELETE FROM queue WHERE pipeline = ?", (name,))
        db.execute("DELETE FROM pipelines WHERE name = ?", (name,))


def _priorities(db: sqlite3.Connection, pipeline: str) -> Iterable[int]:
    """The pipeline's distinct job priorities, lowest first: one index probe each."""
    (priority,) = db.execute(
        "SELECT MIN(priority) FROM queue WHERE pipeline = ?", (pipeline,)
    ).fetchone()
    while priority is not None:
        yield priority
        (priority,) = db.execute(
            "SELECT MIN(priority) FROM queue WHERE pipeline = ? AND priority > ?",
            (pipeline, priority),
        ).fetchone()


_JOB_COLUMNS: Final = (
    "id, name, payload, headers, priority, delay, auto_ack, pipeline, payload_file, payload_size"
)


def _load_job(db: sqlite3.Connection, seq: int) -> tuple[Job, str | None, int]:
    """Job *seq*, the name of its payload's file (its payload is then ""),
    and the payload's size as JSON."""
    row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE seq = ?", (seq,)).fetchone()
    job_id, name, payload, headers, priority, delay, auto_ack, pipeline, file, size = row
    job = Job(
        job=name,
        id=job_id,
        payload=payload,
        headers=json.loads(headers),
        options=JobOptions(
            priority=priority, pipeline=pipeline, delay=delay, auto_ack=bool(auto_ack)
        ),
    )
    return job, file, 2 if file is None else size


def _json_size(data: Mapping[str, Any], payload_size: int = 2) -> int:
    """The size of *data* as JSON, its payload counted as *payload_size* bytes
    (for a payload still in its file; 2: the payload is in *data*)."""
    return len(orjson.dumps(data)) + payload_size - 2


def _read_payload(file: BinaryIO) -> StoredPayload:
    with file:
        return StoredPayload(file.read())


def _read_payloads(reserved: list[tuple[Reserved, BinaryIO | None]]) -> list[Reserved]:
    """Reserved jobs with the payloads of their files read in (a worker thread)."""
    try:
        return [
            item if file is None else Reserved(item.job, item.lease, _read_payload(file))
            for item, file in reserved
        ]
    finally:
        _close_files(reserved)


def _close_files(reserved: list[tuple[Reserved, BinaryIO | None]]) -> None:
    for _, file in reserved:
        if file is not None:
            file.close()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(
    db: sqlite3.Connection,
    now: float,
    *,
    pipeline: str,
    max_jobs: int,
    lease: float,
    max_bytes: int | None,
    policy: Policy,
    moved: Callable[[str, str, int], None],
    payloads: Path,
) -> list[tuple[Reserved, BinaryIO | None]]:
    """The jobs leased, each with its payload's file, opened, if it has one."""
    row = db.execute("SELECT paused FROM pipelines WHERE name = ?", (pipeline,)).fetchone()
    if row is None:
        raise NoSuchPipeline([pipeline])
    out: list[tuple[Reserved, BinaryIO | None]] = []
    if row[0] or max_jobs <= 0:
        return out
    try:
        _lease(db, now, pipeline, max_jobs, lease, max_bytes, policy, moved, payloads, out)
    except BaseException:
        _close_files(out)
        raise
    return out


def _lease(
    db: sqlite3.Connection,
    now: float,
    pipeline: str,
    max_jobs: int,
    lease: float,
    max_bytes: int | None,
    policy: Policy,
    moved: Callable[[str, str, int], None],
    payloads: Path,
    out: list[tuple[Reserved, BinaryIO | None]],
) -> None:
    used = 0
    for priority in list(_priorities(db, pipeline)):
        while len(out) < max_jobs:
            candidates = db.execute(
                "SELECT seq, attempts FROM queue INDEXED BY queue_ready"
                " WHERE pipeline = ? AND priority = ? AND available_at <= ?"
                " ORDER BY available_at, seq LIMIT ?",
                (pipeline, priority, now, max_jobs - len(out)),
            ).fetchall()
            if not candidates:
                break
            for seq, attempts in candidates:
                job, file, payload_size = _load_job(db, seq)
                if _exhausted(policy, pipeline, attempts):
                    # It came back after its last allowed delivery.
                    _dead_letter(db, now, seq, job, attempts, policy.dead_letter)
                    moved(job.id, pipeline, attempts)
                    continue
                opened: BinaryIO | None = None
                if file is not None:
                    try:
                        opened = open(payloads / file, "rb", buffering=0)  # noqa: SIM115 (closed by the caller)
                    except FileNotFoundError:
                        _payload_lost(db, now, seq, job, attempts, policy, payloads / file, None)
                        continue
                    found = os.fstat(opened.fileno()).st_size
                    if found != payload_size:
                        # Cut short or overwritten: copied into the reply, it
                        # would make the whole reply unreadable.
                        opened.close()
                        lost = f"{found} bytes where {payload_size} were written"
                        _payload_lost(db, now, seq, job, attempts, policy, payloads / file, lost)
                        continue
                granted = Lease(
                    token=secrets.token_urlsafe(18),
                    attempt=attempts + 1,
                    expires_at=now + lease,
                )
                reserved = Reserved(job, granted)
                size = _json_size(reserved.to_dict(), payload_size) + 1
                if max_bytes is not None and out and used + size > max_bytes:
                    if opened is not None:
                        opened.close()
                    return
                used += size
                if job.options.auto_ack:
                    _delete(db, now, seq, job.id, granted.token, policy.dedupe_window)
                else:
                    db.execute(
                        "UPDATE queue SET token = ?, attempts = ?, available_at = ? WHERE seq = ?",
                        (granted.token, granted.attempt, granted.expires_at, seq),
                    )
                out.append((reserved, opened))
                if max_bytes is not None and used >= max_bytes:
                    return
        if len(out) >= max_jobs:
            break


def _payload_lost(
    db: sqlite3.Connection,
    now: float,
    seq: int,
    job: Job,
    attempts: int,
    policy: Policy,
    path: Path,
    damage: str | None,
) -> None:
    """Job *seq*'s payload file is gone (deleted by hand, or a backup restored
    without it) or, with *damage*, not the size it was written (a copy cut
    short): the job goes to the dead-letter pipeline, its payload empty and a
    ``payload_missing`` or ``payload_damaged`` header naming the file, rather
    than block its pipeline. A damaged file stays until the next start's
    sweep, for whoever wants to look at it."""
    header = "payload_missing" if damage is None else "payload_damaged"
    logger.error(
        "job %s of pipeline %r has lost its payload: %s is %s; the job goes to %r"
        " with an empty payload and the header %s",
        job.id,
        job.options.pipeline,
        path,
        "missing" if damage is None else f"damaged ({damage})",
        policy.dead_letter,
        header,
    )
    headers = {**job.headers, header: [str(path)]}
    job = job.model_copy(update={"headers": headers})
    _dead_letter(db, now, seq, job, attempts, policy.dead_letter)
    db.execute("UPDATE jobs SET payload_file = NULL, payload_size = NULL WHERE seq = ?", (seq,))


def _exhausted(policy: Policy, pipeline: str, attempts: int) -> bool:
    """True when a job that comes back after *attempts* deliveries is dead-lettered."""
    return 0 < policy.max_attempts <= attempts and pipeline != policy.dead_letter


def _dead_letter(
    db: sqlite3.Connection, now: float, seq: int, job: Job, attempts: int, dead_letter: str
) -> None:
    """Move job *seq* to the dead-letter pipeline, declared if need be."""
    _declare(db, now, name=dead_letter, priority=None, config=None)
    headers = dict(job.headers)
    headers["dead_letter_from"] = [job.options.pipeline]
    headers["attempts"] = [str(attempts)]
    db.execute(
        "UPDATE jobs SET pipeline = ?, headers = ? WHERE seq = ?",
        (dead_letter, json.dumps(headers, ensure_ascii=False, separators=(",", ":")), seq),
    )
    db.execute(
        "UPDATE queue SET pipeline = ?, token = NULL, attempts = 0, available_at = ? WHERE seq = ?",
        (dead_letter, now, seq),
    )


def _peek(
    db: sqlite3.Connection,
    now: float,
    *,
    pipeline: str,
    max_jobs: int,
    max_bytes: int | None,
    payloads: Path,
) -> list[Job]:
    _require_pipelines(db, [pipeline])
    out: list[Job] = []
    used = 0
    for priority in list(_priorities(db, pipeline)):
        for (seq,) in db.execute(
            "SELECT seq FROM queue INDEXED BY queue_ready WHERE pipeline = ? AND priority = ?"
            " ORDER BY available_at, seq LIMIT ?",
            (pipeline, priority, max_jobs - len(out)),
        ).fetchall():
            job, file, payload_size = _load_job(db, seq)
            size = _json_size(job.to_dict(), payload_size) + 1
            if max_bytes is not None and out and used + size > max_bytes:
                return out
            if file is not None:
                try:
                    stored = _read_payload(open(payloads / file, "rb", buffering=0))  # noqa: SIM115
                    payload = stored.text()
                except (FileNotFoundError, orjson.JSONDecodeError):
                    continue  # acked since this read's snapshot (or lost: Reserve says so)
                job = job.model_copy(update={"payload": payload})
            used += size
            out.append(job)
            if max_bytes is not None and used >= max_bytes:
                return out
        if len(out) >= max_jobs:
            break
    return out


def _delete(
    db: sqlite3.Connection, now: float, seq: int, job_id: str, token: str | None, window: float
) -> None:
    """Delete job *seq* for good and remember its id as done (for *window* s)."""
    db.execute("DELETE FROM queue WHERE seq = ?", (seq,))
    db.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
    db.execute(
        "INSERT OR REPLACE INTO acked (id, token, at) VALUES (?, ?, ?)", (job_id, token, now)
    )
    db.execute(
        "DELETE FROM acked WHERE rowid IN"
        " (SELECT rowid FROM acked WHERE at < ? ORDER BY at LIMIT ?)",
        (now - window, _PRUNE_BATCH),
    )


def _current(db: sqlite3.Connection, job_id: str, token: str) -> tuple[int, int, str] | None:
    """(seq, attempts, pipeline) of job *job_id* if *token* is its current lease."""
    row = db.execute(
        "SELECT q.seq, q.attempts, q.pipeline FROM jobs AS j JOIN queue AS q ON q.seq = j.seq"
        " WHERE j.id = ? AND q.token = ?",
        (job_id, token),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _ack(db: sqlite3.Connection, now: float, *, leases: list[LeaseRef], window: float) -> Settled:
    done = 0
    stale: list[str] = []
    for job_id, token in leases:
        current = _current(db, job_id, token)
        if current is not None:
            _delete(db, now, current[0], job_id, token, window)
            done += 1
        elif (
            db.execute("SELECT 1 FROM acked WHERE id = ? AND token = ?", (job_id, token)).fetchone()
            is not None
        ):
            done += 1  # acked already with this very token: a retried Ack
        else:
            stale.append(job_id)
    return Settled(done, stale)


def _requeue(
    db: sqlite3.Connection,
    now: float,
    *,
    leases: list[LeaseRef],
    delay: float,
    policy: Policy,
    moved: Callable[[str, str, int], None],
) -> Settled:
    done = 0
    stale: list[str] = []
    for job_id, token in leases:
        current = _current(db, job_id, token)
        if current is None:
            stale.append(job_id)
            continue
        seq, attempts, pipeline = current
        done += 1
        if _exhausted(policy, pipeline, attempts):
            _dead_letter(db, now, seq, _load_job(db, seq)[0], attempts, policy.dead_letter)
            moved(job_id, pipeline, attempts)
            continue
        db.execute(
            "UPDATE queue SET token = NULL, available_at = ? WHERE seq = ?", (now + delay, seq)
        )
    return Settled(done, stale)


def _extend(db: sqlite3.Connection, now: float, *, leases: list[LeaseRef], lease: float) -> Settled:
    done = 0
    stale: list[str] = []
    for job_id, token in leases:
        current = _current(db, job_id, token)
        if current is None:
            stale.append(job_id)
            continue
        db.execute("UPDATE queue SET available_at = ? WHERE seq = ?", (now + lease, current[0]))
        done += 1
    return Settled(done, stale)


def _empty_or_missing(path: Path) -> bool:
    """True when *path* does not exist or holds no bytes (False when unknown)."""
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False  # opening it will say what is wrong
