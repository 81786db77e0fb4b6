"""The jobs service's store: pipelines and their jobs in one SQLite file.

Theory of operation
-------------------
"Durable" (SPEC §6) means committed with WAL and ``synchronous=FULL``, so every
commit costs an fsync, and SQLite has one writer at a time anyway. The store
therefore funnels every operation through one **writer task**::

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
  still commit. A storage failure inside an op (disk full) may have rolled
  back the whole transaction (SQLite does that for SQLITE_FULL, IOERR, BUSY),
  so that op fails and the rest of the group is tried again without it.
* **Off the Trio thread.** SQLite blocks, so each group runs in a worker thread
  (``trio.to_thread.run_sync``). The one connection is used by one thread at a
  time because only the writer task uses it, one group at a time.
* **Cancellation.** Handing an op over is the only step a caller can be
  cancelled out of; nothing has happened then. Once the writer holds an op, it
  commits or rolls back and the caller is told which, even if the caller was
  cancelled meanwhile (a running thread cannot be stopped anyway, so the wait
  costs nothing extra). That lets the service answer every write it accepted,
  including during shutdown.
* **Reads** (List, Stat) take the same road: they are cheap, and one path keeps
  one connection and no locking of our own.
* **Storage failures** (disk full, read-only, locked, I/O errors, a damaged
  file) raise :class:`StorageUnavailable`. The connection is then dropped and
  the next operation opens a new one, so the store works again as soon as the
  disk does, without a restart.
* **Time** comes from ``clock`` (wall-clock seconds by default: timestamps are
  stored and must survive restarts). Tests pass their own to expire leases.

Schema (``PRAGMA user_version`` = 1; raise it with each migration)::

    pipelines(name TEXT PRIMARY KEY, driver TEXT = 'sqlite',
              priority INTEGER = 10,        -- reported by Stat
              paused INTEGER = 0,           -- 1: Reserve returns nothing
              config TEXT = '{}')           -- the other Declare fields, JSON
    jobs(id TEXT PRIMARY KEY,               -- the idempotency key
         pipeline TEXT, name TEXT, payload TEXT, headers TEXT (JSON),
         priority INTEGER, delay INTEGER, auto_ack INTEGER,   -- job options
         available_at REAL,                 -- not delivered before (created + delay,
                                            --   or nack time + delay)
         reserved_until REAL NULL,          -- leased until; NULL when not leased
         attempts INTEGER,                  -- times reserved
         created_at REAL)
    INDEX jobs_queue ON jobs(pipeline, priority, created_at)  -- Reserve's order

A job is *ready* when ``available_at <= now`` and it is not leased (or its
lease has expired); Reserve takes ready jobs by priority (lower first), then
age, then insertion order (rowid, which the index carries).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import outcome
import trio

from trismtp.jobs.model import Job, JobOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION: Final = 1
DEFAULT_PRIORITY: Final = 10
DRIVER: Final = "sqlite"
# Ops committed together at most; bounds one transaction's size and latency.
MAX_GROUP: Final = 128

# Primary SQLite result codes that mean "the file cannot be used right now",
# as opposed to a bug in our SQL: PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR,
# CORRUPT, FULL, CANTOPEN, PROTOCOL, NOLFS, NOTADB.
_STORAGE_ERROR_CODES: Final = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 22, 26})

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS pipelines (
    name     TEXT PRIMARY KEY,
    driver   TEXT NOT NULL DEFAULT 'sqlite',
    priority INTEGER NOT NULL DEFAULT 10,
    paused   INTEGER NOT NULL DEFAULT 0,
    config   TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    pipeline       TEXT NOT NULL,
    name           TEXT NOT NULL,
    payload        TEXT NOT NULL,
    headers        TEXT NOT NULL,
    priority       INTEGER NOT NULL,
    delay          INTEGER NOT NULL,
    auto_ack       INTEGER NOT NULL,
    available_at   REAL NOT NULL,
    reserved_until REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (pipeline, priority, created_at);
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


Clock = Callable[[], float]
Operation = Callable[[sqlite3.Connection, float], T]


class _Op(Generic[T]):
    """One operation on its way through the writer, and its outcome."""

    __slots__ = ("done", "fn", "outcome")

    def __init__(self, fn: Operation[T]) -> None:
        self.fn = fn
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
    ) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._on_connect = on_connect
        self._db: sqlite3.Connection | None = None  # only touched by the writer's threads
        self._healthy = True
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
    ) -> AsyncIterator[JobStore]:
        """Open (creating it and its directory if needed) the store at *path*.

        *busy_timeout* is how many seconds an operation waits for another
        process's lock on the file before :class:`StorageUnavailable`.
        *on_connect* is called with each new SQLite connection after the
        store's own pragmas, e.g. to tune the cache (tests use it to cap the
        file's size). Raises :class:`StorageUnavailable` if the file cannot be
        opened now: at start-up that is an error for the operator to fix.
        """
        store = cls(Path(path), clock=clock, busy_timeout=busy_timeout, on_connect=on_connect)
        await trio.to_thread.run_sync(store._open_now)
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

    # -- operations ---------------------------------------------------------

    async def push_batch(self, jobs: Sequence[Job], *, expires_at: float | None = None) -> None:
        """Store *jobs* atomically: all of them are durable, or none.

        A job whose id is already stored is skipped (the id is the idempotency
        key). Raises :class:`NoSuchPipeline` if any job names an undeclared
        pipeline. Paused pipelines accept jobs. With *expires_at* (the
        store's clock), a batch that reaches its transaction later than that
        stores nothing and raises :class:`BatchExpired`: its sender has given
        up on it, and storing it would only make the sender's retry a duplicate.
        """
        await self._run(partial(_push_batch, jobs=list(jobs), expires_at=expires_at))

    async def list_pipelines(self) -> list[str]:
        """The declared pipelines' names, sorted."""
        return await self._run(_list_pipelines)

    async def stat(self) -> list[PipelineStat]:
        """Counts for every declared pipeline, sorted by name."""
        return await self._run(_stat)

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

    async def reserve(self, pipeline: str, max_jobs: int, lease: float) -> list[Job]:
        """Lease up to *max_jobs* ready jobs of *pipeline* for *lease* seconds.

        Order: priority (lower first), then age. A leased job not acked within
        its lease is handed out again; each reservation counts an attempt.
        ``auto_ack`` jobs are deleted as they are handed out (at most once).
        A paused pipeline hands out nothing.
        """
        return await self._run(partial(_reserve, pipeline=pipeline, max_jobs=max_jobs, lease=lease))

    async def peek(self, pipeline: str, max_jobs: int) -> list[Job]:
        """Up to *max_jobs* jobs of *pipeline*, in reserve order, without leasing them.

        Every job still in the store is shown, delayed and reserved ones too.
        """
        return await self._run(partial(_peek, pipeline=pipeline, max_jobs=max_jobs))

    async def ack(self, ids: Sequence[str]) -> int:
        """Delete the jobs *ids* (done); unknown ids are ignored. Returns how many went."""
        return await self._run(partial(_delete, ids=list(ids)))

    async def nack(self, ids: Sequence[str], *, requeue: bool, delay: float = 0.0) -> int:
        """Give the jobs *ids* back: with *requeue*, deliverable again after
        *delay* seconds; without, deleted. Returns how many jobs it touched."""
        if requeue:
            return await self._run(partial(_requeue, ids=list(ids), delay=delay))
        return await self._run(partial(_delete, ids=list(ids)))

    # -- the writer ---------------------------------------------------------

    async def _run(self, fn: Operation[T]) -> T:
        op = _Op(fn)
        await self._submit.send(op)  # the only cancellable step: nothing done yet
        # The writer holds the op now and resolves it whatever happens; wait
        # for that even if cancelled, so the caller can report the outcome.
        with trio.CancelScope(shield=True):
            await op.done.wait()
        assert op.outcome is not None
        return op.outcome.unwrap()

    async def _write_loop(self) -> None:
        async with self._receive:
            async for first in self._receive:
                group: list[_Op[Any]] = [first]
                while len(group) < MAX_GROUP:
                    try:
                        group.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    with trio.CancelScope(shield=True):
                        results = await trio.to_thread.run_sync(self._run_group, group)
                except BaseException as exc:
                    # A bug in the bookkeeping below: tell the waiters (they
                    # are shielded and would wait forever), then crash loudly.
                    for op in group:
                        op.resolve(outcome.Error(exc))
                    raise
                for op, result in zip(group, results, strict=True):
                    op.resolve(result)

    def _run_group(self, group: Sequence[_Op[Any]]) -> list[outcome.Outcome[Any]]:
        """Run *group* in one transaction (in a worker thread); an outcome per op."""
        results: dict[int, outcome.Outcome[Any]] = {}
        todo = list(range(len(group)))
        while todo:
            now = self._clock()
            staged: dict[int, outcome.Outcome[Any]] = {}
            running: int | None = None
            try:
                db = self._connection()
                db.execute("BEGIN IMMEDIATE")
                for index in todo:
                    running = index
                    staged[index] = _run_in_savepoint(db, group[index].fn, now)
                running = None
                db.execute("COMMIT")
            except Exception as exc:
                failure = _storage_failure(exc)
                if failure is None:
                    raise
                self._drop_connection()
                self._report(failure)
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
                self._report(None)
                break
        return [results[index] for index in range(len(group))]

    def _report(self, failure: StorageUnavailable | None) -> None:
        # Log the change of state, not every failed operation: a full disk
        # under load would otherwise flood the log.
        if failure is not None and self._healthy:
            logger.error("storage unavailable (%s): %s", self._path, failure)
        elif failure is not None:
            logger.debug("storage still unavailable (%s): %s", self._path, failure)
        elif not self._healthy:
            logger.info("storage available again (%s)", self._path)
        self._healthy = failure is None

    # -- the connection (worker threads only) -------------------------------

    def _open_now(self) -> None:
        try:
            self._connection()
        except Exception as exc:
            failure = _storage_failure(exc)
            if failure is None:
                raise
            raise failure from exc

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
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StorageUnavailable(
                f"{self._path}: SQLite cannot use WAL journal mode there (it reports "
                f"{mode!r}); put the database on a local file system"
            )
        db.execute("PRAGMA synchronous = FULL")
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
        # Version 0: a new file. Later versions add their steps here.
        db.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    def _drop_connection(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            # close() discards an open transaction; a broken file may refuse even that.
            with contextlib.suppress(sqlite3.Error):
                db.close()


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


def _copy(failure: StorageUnavailable) -> StorageUnavailable:
    # One instance per waiter: concurrent raises of one object tangle its traceback.
    error = StorageUnavailable(*failure.args)
    error.__cause__ = failure.__cause__
    return error


# -- the operations, run inside the writer's transaction --------------------


def _require_pipelines(db: sqlite3.Connection, names: Iterable[str]) -> None:
    missing = [
        name
        for name in set(names)
        if db.execute("SELECT 1 FROM pipelines WHERE name = ?", (name,)).fetchone() is None
    ]
    if missing:
        raise NoSuchPipeline(missing)


def _push_batch(
    db: sqlite3.Connection, now: float, *, jobs: list[Job], expires_at: float | None
) -> None:
    if expires_at is not None and now > expires_at:
        raise BatchExpired(now - expires_at)
    _require_pipelines(db, {job.options.pipeline for job in jobs})
    db.executemany(
        "INSERT OR IGNORE INTO jobs (id, pipeline, name, payload, headers, priority, delay,"
        " auto_ack, available_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                job.id,
                job.options.pipeline,
                job.job,
                job.payload,
                json.dumps(job.headers, ensure_ascii=False, separators=(",", ":")),
                job.options.priority,
                job.options.delay,
                int(job.options.auto_ack),
                now + job.options.delay,
                now,
            )
            for job in jobs
        ],
    )


def _list_pipelines(db: sqlite3.Connection, now: float) -> list[str]:
    return [name for (name,) in db.execute("SELECT name FROM pipelines ORDER BY name")]


def _stat(db: sqlite3.Connection, now: float) -> list[PipelineStat]:
    rows = db.execute(
        """
        SELECT p.name, p.driver, p.priority, p.paused,
               COALESCE(SUM(j.available_at <= :now
                            AND (j.reserved_until IS NULL OR j.reserved_until <= :now)), 0),
               COALESCE(SUM(j.available_at > :now
                            AND (j.reserved_until IS NULL OR j.reserved_until <= :now)), 0),
               COALESCE(SUM(j.reserved_until > :now), 0)
        FROM pipelines AS p LEFT JOIN jobs AS j ON j.pipeline = p.name
        GROUP BY p.name ORDER BY p.name
        """,
        {"now": now},
    )
    return [
        PipelineStat(
            pipeline=name,
            driver=driver,
            queue=name,
            active=active,
            delayed=delayed,
            reserved=reserved,
            ready=not paused,
            priority=priority,
        )
        for name, driver, priority, paused, active, delayed, reserved in rows
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
    db.executemany("DELETE FROM jobs WHERE pipeline = ?", [(name,) for name in names])
    db.executemany("DELETE FROM pipelines WHERE name = ?", [(name,) for name in names])


def _reserve(
    db: sqlite3.Connection, now: float, *, pipeline: str, max_jobs: int, lease: float
) -> list[Job]:
    row = db.execute("SELECT paused FROM pipelines WHERE name = ?", (pipeline,)).fetchone()
    if row is None:
        raise NoSuchPipeline([pipeline])
    if row[0] or max_jobs <= 0:
        return []
    rows = db.execute(
        """
        SELECT rowid, id, name, payload, headers, priority, delay, auto_ack FROM jobs
        WHERE pipeline = :pipeline AND available_at <= :now
          AND (reserved_until IS NULL OR reserved_until <= :now)
        ORDER BY priority, created_at, rowid
        LIMIT :limit
        """,
        {"pipeline": pipeline, "now": now, "limit": max_jobs},
    ).fetchall()
    db.executemany(
        "UPDATE jobs SET reserved_until = ?, attempts = attempts + 1 WHERE rowid = ?",
        [(now + lease, row[0]) for row in rows if not row[7]],
    )
    db.executemany("DELETE FROM jobs WHERE rowid = ?", [(row[0],) for row in rows if row[7]])
    return [_job(pipeline, row[1:]) for row in rows]


def _peek(db: sqlite3.Connection, now: float, *, pipeline: str, max_jobs: int) -> list[Job]:
    _require_pipelines(db, [pipeline])
    rows = db.execute(
        """
        SELECT id, name, payload, headers, priority, delay, auto_ack FROM jobs
        WHERE pipeline = :pipeline
        ORDER BY priority, created_at, rowid
        LIMIT :limit
        """,
        {"pipeline": pipeline, "limit": max_jobs},
    ).fetchall()
    return [_job(pipeline, row) for row in rows]


def _job(pipeline: str, row: Sequence[Any]) -> Job:
    """A Job from ``id, name, payload, headers, priority, delay, auto_ack``."""
    job_id, name, payload, headers, priority, delay, auto_ack = row
    return Job(
        job=name,
        id=job_id,
        payload=payload,
        headers=json.loads(headers),
        options=JobOptions(
            priority=priority, pipeline=pipeline, delay=delay, auto_ack=bool(auto_ack)
        ),
    )


def _delete(db: sqlite3.Connection, now: float, *, ids: list[str]) -> int:
    return db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids]).rowcount


def _requeue(db: sqlite3.Connection, now: float, *, ids: list[str], delay: float) -> int:
    return db.executemany(
        "UPDATE jobs SET reserved_until = NULL, available_at = ? WHERE id = ?",
        [(now + delay, i) for i in ids],
    ).rowcount
