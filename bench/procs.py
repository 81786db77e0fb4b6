"""Child processes of the benchmark: started with a raised fd limit, stopped by PID.

Every process the harness starts goes through :class:`Children`, whose
:meth:`Children.close` stops them all (SIGTERM, then SIGKILL) by their PID,
also when a run fails half-way. Nothing is ever stopped by name.

A server may start processes of its own (trismtp with ``smtp.workers`` > 1
starts its secondary workers as its children): :class:`ProcessTree` sums
CPU time and resident memory over a process and every descendant, found
afresh at each sample (a worker that dies is started again under a new
PID), and after the server stopped, stops by PID any descendant it left
behind.
"""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "HOST",
    "Child",
    "Children",
    "ProcessTree",
    "TreeSample",
    "clean_env",
    "descendants",
    "find_tool",
    "free_port",
    "proc_cpu_seconds",
    "proc_status_kib",
    "raise_nofile",
    "read_line",
    "wait_for_port",
    "wait_for_smtp",
    "wait_sampling",
]

HOST = "127.0.0.1"
NOFILE_TARGET = 65536
"""The RLIMIT_NOFILE the harness asks for, for itself and every child."""
STOP_TIMEOUT = 15.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""
POLL = 0.05
SAMPLE_INTERVAL = 0.2
"""Seconds between two samples of a server's process tree while the harness waits.

A sample scans /proc for the tree's processes (~2 ms of the harness's CPU
with ~100 processes on the machine): 1 % of a core at this rate.
"""


def raise_nofile(target: int = NOFILE_TARGET) -> int:
    """Raise this process's RLIMIT_NOFILE to *target* if it can; return the soft limit.

    Root may raise the hard limit too; anyone else gets at most the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= target:
        return soft
    capped = target if hard == unlimited else min(target, hard)
    higher_hard = hard if hard == unlimited else max(hard, target)
    for new in ((target, higher_hard), (capped, hard)):
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
    return soft


def _preexec_raise_nofile() -> None:
    """``preexec_fn`` of every child: the fd limit, set between fork and exec."""
    raise_nofile()


def find_tool(name: str) -> str | None:
    """The path of the program *name*, also looking in /usr/sbin and /sbin."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without ``TRISMTP_*`` settings, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRISMTP_")}
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status (``VmRSS``, ``VmHWM``), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of *pid* so far (/proc/PID/stat), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class _Stat:
    """What the tree accounting reads from one /proc/PID/stat."""

    ppid: int
    state: str
    start: int
    """Start time in clock ticks since boot: with the PID, names one process for good."""
    cpu_ticks: int
    """utime + stime of all its threads, plus cutime + cstime: the CPU time of
    the children it has waited for (a worker that exited and was reaped)."""


def _read_stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
    try:
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14))
        return _Stat(int(fields[1]), fields[0], int(fields[19]), cpu)
    except (IndexError, ValueError):
        return None


def _parents() -> dict[int, int]:
    """PID → parent PID of every process on the machine (a scan of /proc)."""
    # /proc/PID/task/*/children would be cheaper, but needs CONFIG_PROC_CHILDREN,
    # which not every kernel has (the reference machine's has not).
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                parents[int(entry)] = stat.ppid
    return parents


def descendants(root: int) -> list[int]:
    """The PIDs of every process below *root* (children, their children, …)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, ())
    return found


def _status_kib(pid: int) -> dict[str, int]:
    """The ``kB`` lines of /proc/PID/status that the accounting uses (none for a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


@dataclass(frozen=True, slots=True)
class TreeSample:
    """A process tree at one moment."""

    cpu_seconds: float
    """User + system CPU time of the root, of its live descendants, and of the
    descendants that exited and were waited for (cutime + cstime)."""
    rss_kib: int
    """Summed VmRSS (pages shared between the processes count once per process)."""
    processes: tuple[tuple[int, int], ...]
    """(PID, start time) of the root and each live descendant."""


@dataclass
class ProcessTree:
    """A server process and its descendants, summed (see the module docstring).

    CPU time: a descendant's is read from its own /proc/PID/stat while it
    runs and from its parent's cutime/cstime once the parent has waited for
    it, so a worker that exits during a run is still counted (the root is
    read before its descendants, so a worker reaped between the two reads is
    missed by that one sample rather than counted twice).

    Peak RSS: VmHWM when the tree was never more than one process (exact);
    otherwise the highest summed VmRSS over the samples (at least
    :data:`SAMPLE_INTERVAL` apart while the harness waits on a load, and once
    just before the stop), or a single process's VmHWM if that is higher.
    Both can only under-count (a peak between two samples is missed);
    :meth:`hwm_sum_kib`, the sum of every process's own VmHWM, can only
    over-count (the processes need not peak at the same moment).
    """

    root: int
    peak_sum_kib: int = 0
    """The highest summed VmRSS of a sample so far."""
    hwm_kib: dict[tuple[int, int], int] = field(default_factory=dict)
    """The last VmHWM read of each process ever seen, by (PID, start time)."""
    last: tuple[tuple[int, int], ...] = ()
    """The processes of the latest sample (root first)."""
    samples: int = 0
    _root_start: int | None = None
    _next_sample: float = 0.0

    def sample(self) -> TreeSample | None:
        """Read the tree now; None once the root is gone."""
        root = _read_stat(self.root)
        if root is None or root.state == "Z":
            return None
        if self._root_start is None:
            self._root_start = root.start
        elif root.start != self._root_start:
            return None  # the PID was reused: not our process any more
        ticks, rss = root.cpu_ticks, 0
        found = [(self.root, root.start)]
        for pid in descendants(self.root):
            stat = _read_stat(pid)
            if stat is None:
                continue
            ticks += stat.cpu_ticks
            found.append((pid, stat.start))
        for key in found:
            status = _status_kib(key[0])
            rss += status.get("VmRSS", 0)
            if "VmHWM" in status:
                self.hwm_kib[key] = status["VmHWM"]
        self.peak_sum_kib = max(self.peak_sum_kib, rss)
        self.last = tuple(found)
        self.samples += 1
        self._next_sample = time.monotonic() + SAMPLE_INTERVAL
        return TreeSample(ticks / os.sysconf("SC_CLK_TCK"), rss, self.last)

    def sample_due(self) -> None:
        """Sample if :data:`SAMPLE_INTERVAL` has passed since the last sample."""
        if time.monotonic() >= self._next_sample:
            self.sample()

    @property
    def processes_seen(self) -> int:
        """How many processes the tree has had, over every sample (a restart counts anew)."""
        return len(self.hwm_kib)

    def peak_rss_kib(self) -> int | None:
        """The tree's peak resident memory in KiB, sampling now (see the class docstring)."""
        if self.sample() is None:
            return None
        if self.processes_seen <= 1:
            return self.hwm_kib.get(self.last[0])
        return max(self.peak_sum_kib, *self.hwm_kib.values())

    def hwm_sum_kib(self) -> int | None:
        """The sum of every process's own peak (VmHWM): an upper bound of the tree's peak."""
        return sum(self.hwm_kib.values()) if self.hwm_kib else None

    def stop_leftovers(self, timeout: float = STOP_TIMEOUT) -> list[int]:
        """After the root exited: stop by PID each descendant of the last sample still running.

        A descendant gets *timeout* s to exit on its own (trismtp's workers
        stop when the primary's pipe closes), then SIGTERM, then SIGKILL.
        Returns the PIDs that had to be signalled.
        """
        alive = self._alive(self.last[1:], timeout)
        signalled = [pid for pid, _ in alive]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not alive:
                break
            for pid, _ in alive:
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            alive = self._alive(alive, STOP_TIMEOUT)
        return signalled

    @staticmethod
    def _alive(procs: Sequence[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
        """Those of *procs* (PID, start time) still running after up to *timeout* s."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for pid, start in procs:
                stat = _read_stat(pid)
                if stat is not None and stat.start == start and stat.state != "Z":
                    left.append((pid, start))
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(POLL)


def wait_sampling(
    popen: subprocess.Popen[bytes], timeout: float | None, tree: ProcessTree | None
) -> int:
    """``popen.wait(timeout)``, sampling *tree* meanwhile; raises ``TimeoutExpired`` like it."""
    if tree is None:
        return popen.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        tree.sample_due()
        step = SAMPLE_INTERVAL
        if deadline is not None:
            step = min(step, max(0.0, deadline - time.monotonic()))
        try:
            return popen.wait(step)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(popen.args, timeout or 0.0) from None


@dataclass
class Child:
    """One started process, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    tree: ProcessTree | None = None
    """Set for a server whose descendants are accounted with it and stopped after it."""
    leftovers: list[int] = field(default_factory=list)
    """Descendants that were still running after this process exited, and were signalled."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to *timeout* s, then SIGKILL; the exit status. Idempotent.

        With a :attr:`tree`, its processes are sampled first, and whichever of
        them outlive this one are stopped by PID afterwards (:attr:`leftovers`).
        """
        if self.popen.poll() is None:
            if self.tree is not None:
                self.tree.sample()  # the descendants to look for once it has exited
            with suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        if self.tree is not None:  # also when it had exited on its own
            self.leftovers += self.tree.stop_leftovers()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        return self.popen.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the process wrote to its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """Starts processes and, on :meth:`close` (or leaving ``with``), stops each by PID."""

    logdir: Path
    started: list[Child] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        pipe_stdio: bool = False,
    ) -> Child:
        """Start *argv*; stderr (and stdout unless *pipe_stdio*) go to a log file."""
        log_path = self.logdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else clean_env(),
                stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdio else log,
                stderr=log,
                preexec_fn=_preexec_raise_nofile,  # the harness starts no threads
            )
        child = Child(name, popen, log_path)
        self.started.append(child)
        return child

    def stop(self, child: Child) -> int | None:
        """Stop one child now; close() will not stop it again."""
        code = child.stop()
        if child in self.started:
            self.started.remove(child)
        return code

    def close(self) -> None:
        """Stop every child still running, newest first; each one is tried."""
        while self.started:
            child = self.started.pop()
            try:
                child.stop()
            except Exception:  # keep stopping the others
                with suppress(Exception):
                    child.popen.kill()

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_for_smtp(port: int, child: Child, timeout: float = 30.0) -> None:
    """Poll until the server on *port* greets with 220 (then QUIT); fail if it exits."""
    _wait_until_up(port, child, timeout, smtp=True)


def wait_for_port(port: int, child: Child, timeout: float) -> None:
    """Poll until *port* accepts a TCP connection; fail if *child* exits or time runs out."""
    _wait_until_up(port, child, timeout, smtp=False)


def _wait_until_up(port: int, child: Child, timeout: float, *, smtp: bool) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if not child.alive:
            raise RuntimeError(
                f"{child.name} exited ({child.popen.returncode}) before it listened:\n"
                f"{child.log_tail()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                if not smtp:
                    return
                greeting = sock.recv(1024)
                if greeting.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    with suppress(OSError):
                        sock.recv(1024)
                    return
                last_error = f"greeting {greeting[:60]!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(POLL)
    what = "greet" if smtp else "listen"
    raise RuntimeError(f"{child.name} did not {what} on port {port} in {timeout:g} s: {last_error}")


def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's stdout pipe, waiting at most *timeout* s (b"" on EOF/timeout)."""
    fd = stream.fileno()
    buffer = bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return b""
            chunk = os.read(fd, 1)  # byte by byte: nothing past the newline is consumed
            if not chunk:
                return bytes(buffer)
            buffer += chunk
    return bytes(buffer)
