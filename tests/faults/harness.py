"""What every fault scenario shares: async waits, processes, the store check, the summary.

The e2e helpers (``Process``, ``Daemon``, ``JobsService``, ``Launcher``…) are
synchronous; a fault test is a trio test because the load generator runs in
the test process. So every blocking step (starting a process and waiting for
its "listening" line, reaping it) runs in a worker thread, and every wait is
:func:`until`: poll a condition with ``trio.sleep`` until a deadline, then
fail with context. The only fixed sleeps in the suite are fault durations
("the service is stopped for 2.5 s"), and they are written as
:func:`fault_for` so that a reader can tell them apart.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import pytest
import trio

from ..e2e.trismtp_e2e import (
    Daemon,
    JobsService,
    Launcher,
    Process,
    clean_env,
    trismtp_argv,
)
from ..stored import payload_of
from .load import LoadGenerator, LoadReport, Outcome

__all__ = [
    "REPORT_ENV",
    "FaultSummary",
    "PipedLogJobsService",
    "RssSampler",
    "StoreCheck",
    "assert_invariant",
    "check_store",
    "emit",
    "fault_for",
    "integrity_check",
    "kill",
    "more_acks",
    "more_tempfails",
    "open_fds",
    "remote_daemon",
    "set_fsize_limit",
    "start",
    "start_load",
    "stored_message_ids",
    "summarize",
    "until",
    "vm_status_kib",
    "wait_exit",
    "wait_for_log",
]

T = TypeVar("T")

POLL: Final = 0.02
REPORT_ENV: Final = "TRISMTP_FAULT_REPORT"
"""When set, every scenario appends its summary (one JSON object a line) there."""


# -- waiting -----------------------------------------------------------------


async def until(
    condition: Callable[[], T | None],
    within: float,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
    interval: float = POLL,
) -> T:
    """Poll *condition* until it returns something truthy; fail after *within* s."""
    deadline = trio.current_time() + within
    while True:
        result = condition()
        if result:
            return result
        if trio.current_time() >= deadline:
            text = f"timed out after {within:g} s waiting for {what}"
            raise AssertionError(f"{text}\n{detail()}" if detail else text)
        await trio.sleep(interval)


async def fault_for(seconds: float) -> None:
    """Let a fault last *seconds* (≤ 0: no longer): the scenario, not a synchronisation."""
    await trio.sleep(max(0.0, seconds))


# -- processes ----------------------------------------------------------------


async def start(process: Process) -> None:
    """Start *process* and wait (in a thread) until it logged that it listens."""
    await trio.to_thread.run_sync(process.start)


async def wait_exit(process: Process, within: float) -> int:
    """The exit status; fails if *process* is still running after *within* s."""
    return await trio.to_thread.run_sync(process.wait_exit, within)


async def kill(process: Process) -> int:
    """SIGKILL *process* (by PID) at once, then reap it."""
    process.signal(signal.SIGKILL)
    return await wait_exit(process, 10.0)


async def wait_for_log(process: Process, text: str, within: float = 10.0) -> None:
    await until(
        lambda: text in process.log_text(),
        within,
        f"{process.name} to log {text!r}",
        detail=process.log_tail,
        interval=0.05,
    )


def remote_daemon(
    launch: Launcher, service_url: str, jobs: Mapping[str, Any], **sections: Mapping[str, Any]
) -> Daemon:
    """A daemon (not started) whose pusher talks to *service_url*."""
    settings: dict[str, Mapping[str, Any]] = {
        "jobs": {"url": service_url, **jobs},
        "log": {"level": "info"},
    }
    settings.update(sections)
    return launch.daemon(settings, start=False)


class PipedLogJobsService(JobsService):
    """A jobs service whose stderr goes through a pipe that the test copies to its log.

    For the file-size-limit scenario: RLIMIT_FSIZE applies to every regular
    file the process writes, its log too, but not to a pipe. The copy is done
    by a thread of the test process, which has no such limit.
    """

    def start(self, *, wait: bool = True) -> None:
        assert not self.running, f"{self.name} is already running"
        self.runs += 1
        self.log_path = self.workdir / f"{self.name}-{self.runs}.log"
        self.popen = subprocess.Popen(
            [*trismtp_argv(), *self.args],
            cwd=self.workdir,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.popen.stderr is not None
        copier = threading.Thread(
            target=_copy_pipe, args=(self.popen.stderr, self.log_path), daemon=True
        )
        copier.start()
        if wait:
            self.wait_ready()


def _copy_pipe(pipe: IO[bytes], path: Path) -> None:
    with pipe, path.open("wb") as out:
        while chunk := os.read(pipe.fileno(), 65536):
            out.write(chunk)
            out.flush()


def set_fsize_limit(pid: int, limit: int | None) -> None:
    """Set the soft RLIMIT_FSIZE of *pid* (None: unlimited, up to the hard limit).

    The hard limit is left alone, so that the soft one can be raised again
    without privileges. Skips the test when the kernel refuses (another
    user's process), unless CI=true.
    """
    try:
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))
    except PermissionError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot change RLIMIT_FSIZE of pid {pid}: {exc}")


# -- memory -------------------------------------------------------------------


def vm_status_kib(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/PID/status, in KiB ({} once the process is gone)."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


def open_fds(pid: int) -> int:
    """How many file descriptors *pid* has open (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


@dataclass
class RssSampler:
    """Samples a process's VmRSS every *interval* s; :meth:`run` until cancelled."""

    pid: int
    interval: float = 0.05
    samples: list[tuple[float, int]] = field(default_factory=list)

    def now_kib(self) -> int:
        return vm_status_kib(self.pid).get("VmRSS", 0)

    def peak_kib(self) -> int:
        """The highest of the samples and the kernel's own high-water mark."""
        hwm = vm_status_kib(self.pid).get("VmHWM", 0)
        return max([hwm, *(kib for _, kib in self.samples)])

    async def run(self) -> None:
        while True:
            kib = self.now_kib()
            if kib:
                self.samples.append((trio.current_time(), kib))
            await trio.sleep(self.interval)


# -- the store ------------------------------------------------------------------


def _connect_ro(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)


def integrity_check(database: Path) -> list[str]:
    """``PRAGMA integrity_check`` on a read-only connection: ``["ok"]`` when sound."""
    db = _connect_ro(database)
    try:
        return [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    finally:
        db.close()


def stored_rows(database: Path) -> list[tuple[str, str | None]]:
    """(job id, the Message-ID in its payload without <>) for every row of ``jobs``."""
    db = _connect_ro(database)
    try:
        rows = db.execute("SELECT id, payload, payload_file FROM jobs").fetchall()
    finally:
        db.close()
    out: list[tuple[str, str | None]] = []
    for job_id, payload, payload_file in rows:
        text = payload_of(database, payload, payload_file)
        message_id = json.loads(text).get("message", {}).get("id")
        clean = message_id.strip().strip("<>") if isinstance(message_id, str) else None
        out.append((str(job_id), clean))
    return out


def stored_message_ids(database: Path) -> dict[str, str | None]:
    """Job id → the Message-ID in its payload (without <>), for every stored job."""
    return dict(stored_rows(database))


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """The delivery invariant, checked against the SQLite file."""

    rows: int
    """Rows in the jobs table."""
    stored: int
    """Rows that belong to this run's messages."""
    lost: tuple[str, ...]
    """Acked job ids that are not in the store (must be empty)."""
    dup_acked: tuple[str, ...]
    """Acked job ids stored more than once, or named by more than one 250 (must be empty)."""
    mismatched: tuple[str, ...]
    """Acked job ids whose stored payload carries another Message-ID (must be empty)."""
    dup_messages: int
    """Message-IDs stored under more than one job id: a 451 whose job was stored anyway."""
    stored_unacked: int
    """Stored jobs that no 250 named (the 451 or unanswered attempts that were stored)."""
    foreign: int
    """Rows whose Message-ID is not one of this run's messages."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.dup_acked or self.mismatched)


def check_store(report: LoadReport, database: Path) -> StoreCheck:
    """Compare what the clients were told with what the store holds."""
    rows = stored_rows(database)
    row_counts = Counter(job_id for job_id, _ in rows)
    stored = dict(rows)
    ours = {m.message_id for m in report.messages}
    by_message: dict[str, set[str]] = defaultdict(set)
    foreign = 0
    for job_id, message_id in stored.items():
        if message_id in ours:
            by_message[message_id].add(job_id)
        else:
            foreign += 1
    acked_ids = report.acked_job_ids
    acked_counts = Counter(acked_ids)
    acked_set = set(acked_ids)
    lost = tuple(job for job in acked_set if job not in stored)
    dup_acked = tuple(job for job in acked_set if row_counts[job] > 1 or acked_counts[job] > 1)
    mismatched = tuple(
        job
        for message_id, job in report.acked.items()
        if job in stored and stored[job] != message_id
    )
    stored_ours = sum(len(jobs) for jobs in by_message.values())
    return StoreCheck(
        rows=len(rows),
        stored=stored_ours,
        lost=lost,
        dup_acked=dup_acked,
        mismatched=mismatched,
        dup_messages=sum(1 for jobs in by_message.values() if len(jobs) > 1),
        stored_unacked=sum(
            1 for jobs in by_message.values() for job in jobs if job not in acked_set
        ),
        foreign=foreign,
    )


# -- the summary --------------------------------------------------------------


@dataclass(frozen=True)
class FaultSummary:
    """One scenario's figures: printed, and appended to ``$TRISMTP_FAULT_REPORT``."""

    scenario: str
    clients: int
    messages: int
    acked: int
    stored: int
    lost: int
    dup_acked: int
    replies_451: int
    dup_messages: int
    stored_unacked: int
    unanswered: int
    max_latency_451: float | None
    max_latency_250: float | None
    duration: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("max_latency_451", "max_latency_250", "duration"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return json.dumps(data, sort_keys=False)


def summarize(scenario: str, report: LoadReport, check: StoreCheck, **extra: Any) -> FaultSummary:
    return FaultSummary(
        scenario=scenario,
        clients=report.clients,
        messages=len(report.messages),
        acked=len(report.acked),
        stored=check.stored,
        lost=len(check.lost),
        dup_acked=len(check.dup_acked),
        replies_451=report.replies_451,
        dup_messages=check.dup_messages,
        stored_unacked=check.stored_unacked,
        unanswered=report.unanswered,
        max_latency_451=report.max_latency(Outcome.TEMPFAIL),
        max_latency_250=report.max_latency(Outcome.ACKED),
        duration=report.duration,
        # 451s to RCPT or DATA while the daemon knew its store was down.
        extra={"deferred_before_upload": report.deferred_before_upload, **extra}
        if report.deferred_before_upload
        else extra,
    )


def emit(summary: FaultSummary) -> None:
    """Print the summary, and append it to ``$TRISMTP_FAULT_REPORT`` when set."""
    line = summary.to_json()
    print(f"FAULT SUMMARY {line}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def assert_invariant(check: StoreCheck, report: LoadReport) -> None:
    """Every 250 is stored exactly once, under its own message; no stray rows."""
    assert not check.lost, f"acked but not stored: {sorted(check.lost)[:10]}"
    assert not check.dup_acked, f"acked ids stored or acked twice: {sorted(check.dup_acked)[:10]}"
    assert not check.mismatched, f"acked ids holding another message: {check.mismatched[:10]}"
    assert check.foreign == 0, f"{check.foreign} stored jobs belong to no message of this run"
    assert not report.protocol_errors, f"unexpected replies: {report.protocol_errors[:10]}"


def more_acks(load: LoadGenerator, count: int) -> Callable[[], bool]:
    """A condition: *count* more ``250`` replies than *load* has now."""
    target = load.acks + count
    return lambda: load.acks >= target


def more_tempfails(load: LoadGenerator, count: int) -> Callable[[], bool]:
    """A condition: *count* more ``451`` replies than *load* has now."""
    target = load.tempfails + count
    return lambda: load.tempfails >= target


def start_load(nursery: trio.Nursery, load: LoadGenerator) -> None:
    """Run *load* in *nursery*; its report is ``load.report()`` once ``load.finished``."""

    async def run() -> None:
        await load.run()

    nursery.start_soon(run)
