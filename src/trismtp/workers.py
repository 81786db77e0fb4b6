"""SMTP worker processes: ``smtp.workers`` > 1.

Theory of operation
===================

One Python process runs on one core: the GIL lets one thread at a time run
Python code, and an SMTP session, the message parser and the job's JSON are
all Python. With ``smtp.workers = N`` (or ``"auto"``, one per CPU) the daemon
runs N processes that take SMTP connections:

- The **primary** is the ``trismtp serve`` process. It binds the listeners,
  runs the metrics endpoint and, with ``jobs.url = "embedded"``, the jobs
  service; it is also worker 0 (an SMTP server and a pusher of its own).
- Each **secondary** (worker 1 … N-1) is ``python -m trismtp serve --worker K``
  started by the primary: it inherits the listening sockets, reads the same
  settings (the same ``--config`` file and environment) and runs an SMTP
  server and a pusher that connects to ``--jobs-url``, the embedded service's
  loopback WebSocket (or ``jobs.url`` itself). Nothing else.

All workers accept on the same sockets, so the kernel hands a new connection
to a process that is waiting in accept: a worker busy parsing a big message
takes fewer (port 0 also means one port for all). Each worker takes an equal
share of ``smtp.max_connections`` and of the memory budget. Each has its own
pusher, so each durable ack still comes from the jobs service before that
worker answers 250: the guarantees do not change.

The primary talks to a secondary over its stdin, one word a line:
``stop`` (graceful, what SIGTERM does), ``kill`` (at once) and ``reload``
(SIGHUP's work); end of file means the primary is gone, and the secondary
stops gracefully (its pusher can no longer deliver, so its clients get 451
and retry). A secondary writes ``ready`` on its stdout once it accepts. Its
log lines go to the primary's stderr, tagged ``[wK]``. The secondaries run
in a session of their own: a Ctrl-C in a terminal reaches the primary only,
which then stops them; a SIGTERM sent to a secondary directly (systemd's
default ``KillMode=control-group`` signals every process) stops it
gracefully, as the primary's ``stop`` does.

A secondary that exits while the daemon is not stopping is started again
(after 1 s, doubling to 30 s while it keeps failing within a minute);
mail it was receiving got no reply, so its clients retry. On stop the
primary tells every secondary to stop, waits for them (each flushes its
pusher to the jobs service, which the primary keeps running until the last
has exited), and only then stops the jobs service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

__all__ = ["WorkerOptions", "WorkerPool", "read_commands"]

log = logging.getLogger("trismtp.workers")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
# A worker that ran this long before it exited is restarted after FIRST_BACKOFF again.
STABLE_AFTER = 60.0
# How long a worker gets to say "ready" before it counts as failed to start.
START_TIMEOUT = 30.0
# After "kill", how long a worker gets before SIGKILL.
KILL_GRACE = 5.0
# How long /metrics waits for a worker's numbers.
METRICS_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What a secondary worker gets on its command line (``serve --worker K …``)."""

    index: int
    jobs_url: str
    plain_fds: list[int]
    implicit_fds: list[int]
    config: str | None = None

    def command(self) -> list[str]:
        """The secondary's command line."""
        command = [sys.executable, "-m", "trismtp", "serve"]
        if self.config is not None:
            command += ["--config", self.config]
        command += [
            "--worker",
            str(self.index),
            "--jobs-url",
            self.jobs_url,
            "--listen-fds",
            ",".join(map(str, self.plain_fds)),
            "--implicit-fds",
            ",".join(map(str, self.implicit_fds)),
        ]
        return command


@dataclass(slots=True)
class _Worker:
    options: WorkerOptions
    process: trio.Process | None = None
    ready: bool = False
    # One question at a time on the worker's stdin/stdout ("metrics").
    asking: trio.Lock = field(default_factory=trio.Lock)
    unread: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class WorkerPool:
    """The primary's secondaries: start, watch, restart, stop (see the module docstring)."""

    workers: list[_Worker] = field(default_factory=list)
    _stop_requested: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def of(cls, options: list[WorkerOptions]) -> WorkerPool:
        """A pool for these secondaries (not started yet)."""
        return cls([_Worker(option) for option in options])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every secondary, report once all are ready, keep them running until stopped.

        Returns when :meth:`stop` was called and every secondary has exited.
        Cancelled, it kills them (``kill``, then SIGKILL after a few seconds).
        """
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                await nursery.start(self._keep, worker)
            task_status.started()

    def stop(self) -> None:
        """Ask every secondary to stop gracefully; :meth:`run` returns when they have."""
        self._stop_requested.set()
        self._tell_all(b"stop\n")

    def kill(self) -> None:
        """Ask every secondary to stop at once."""
        self._stop_requested.set()
        self._tell_all(b"kill\n")

    def reload(self) -> None:
        """Pass SIGHUP's reload on to every secondary."""
        self._tell_all(b"reload\n")

    async def metrics(self) -> list[str]:
        """Every ready secondary's metrics exposition (the ones that answer in time)."""
        texts: list[str] = []

        async def ask(worker: _Worker) -> None:
            with trio.move_on_after(METRICS_TIMEOUT):
                text = await _ask_metrics(worker)
                if text is not None:
                    texts.append(text)

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                if worker.ready:
                    nursery.start_soon(ask, worker)
        return texts

    @property
    def _stopping(self) -> bool:
        return self._stop_requested.is_set()

    def _tell_all(self, line: bytes) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.stdin is not None and process.returncode is None:
                # A pipe write of a few bytes never blocks; a worker gone
                # meanwhile is noticed by its watcher.
                with contextlib.suppress(OSError):
                    _write_now(process, line)

    async def _keep(self, worker: _Worker, *, task_status: trio.TaskStatus[None]) -> None:
        backoff = FIRST_BACKOFF
        reported = False
        index = worker.options.index
        while True:
            started_at = trio.current_time()
            code = await self._run_once(worker, None if reported else task_status)
            reported = True
            if self._stopping:
                if code:
                    log.warning("worker %d exited with code %d while stopping", index, code)
                return
            lived = trio.current_time() - started_at
            if lived >= STABLE_AFTER:
                backoff = FIRST_BACKOFF
            log.error(
                "worker %d exited unexpectedly (code %s); starting it again in %g s",
                index,
                code,
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._stop_requested.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)
            if self._stopping:
                return

    async def _run_once(self, worker: _Worker, task_status: trio.TaskStatus[None] | None) -> int:
        options = worker.options
        process = await trio.lowlevel.open_process(
            options.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=options.plain_fds + options.implicit_fds,
            start_new_session=True,
        )
        worker.process = process
        try:
            if self._stopping:
                _write_now(process, b"stop\n")
            assert process.stdout is not None
            worker.unread.clear()
            with trio.move_on_after(START_TIMEOUT):
                line = await _read_line(process.stdout, worker.unread)
                if line == b"ready":
                    worker.ready = True
                    log.info("worker %d ready (pid %d)", options.index, process.pid)
            if not worker.ready and not self._stopping:
                if process.returncode is None:
                    log.error(
                        "worker %d did not start within %g s; stopping it",
                        options.index,
                        START_TIMEOUT,
                    )
                    process.kill()
                if task_status is not None:
                    # At start-up a worker that cannot start is a failure to
                    # start the daemon, not something to retry forever.
                    raise OSError(0, f"SMTP worker {options.index} did not start (see its log)")
            if task_status is not None:
                task_status.started()
            await process.wait()
            return process.returncode if process.returncode is not None else -1
        finally:
            worker.ready = False
            if process.returncode is None:
                # Cancelled (the daemon stops at once): say so, then make sure.
                with contextlib.suppress(OSError):
                    _write_now(process, b"kill\n")
                with trio.CancelScope(shield=True):
                    await _kill(process)
            worker.process = None


def _write_now(process: trio.Process, line: bytes) -> None:
    # Synchronous on purpose: stop() and kill() are called from signal
    # handling code that does not await. The pipe is empty or nearly so.
    stdin = process.stdin
    assert isinstance(stdin, trio.lowlevel.FdStream)
    os.write(stdin.fileno(), line)


async def _kill(process: trio.Process) -> None:
    with trio.move_on_after(KILL_GRACE):
        await process.wait()
        return
    process.kill()
    await process.wait()


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    """The next line from *stream* (buffered in *buffer*), stripped; None at its end."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.strip()


async def _read_exactly(stream: trio.abc.ReceiveStream, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


async def _ask_metrics(worker: _Worker) -> str | None:
    """Ask one secondary for its exposition: ``metrics`` → ``metrics LENGTH`` + the text."""
    async with worker.asking:
        process = worker.process
        if process is None or process.stdout is None or process.returncode is not None:
            return None
        try:
            _write_now(process, b"metrics\n")
            header = await _read_line(process.stdout, worker.unread)
            if header is None or not header.startswith(b"metrics "):
                return None
            size = int(header.split()[1])
            return (await _read_exactly(process.stdout, worker.unread, size)).decode()
        except (OSError, EOFError, ValueError, trio.BrokenResourceError):
            return None


async def read_commands(
    on_stop: Callable[[], None],
    on_kill: Callable[[], None],
    on_reload: Callable[[], None],
    metrics: Callable[[], bytes],
) -> None:
    """A secondary's side of the control pipe: its stdin, one command a line.

    ``metrics`` is answered on stdout (``metrics LENGTH`` and the
    exposition). End of file (the primary exited, or was killed) counts as
    ``stop``.
    """
    commands = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    answers = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    handlers = {b"stop": on_stop, b"kill": on_kill, b"reload": on_reload}
    buffer = bytearray()
    async with commands, answers:
        while (line := await _read_line(commands, buffer)) is not None:
            if line == b"metrics":
                page = metrics()
                await answers.send_all(b"metrics %d\n" % len(page) + page)
            elif (handler := handlers.get(line)) is not None:
                handler()
    log.warning("the primary process is gone; stopping")
    on_stop()
