"""Child processes of the benchmark: started with a raised fd limit, stopped by PID.

Every process the harness starts goes through :class:`Children`, whose
:meth:`Children.close` stops them all (SIGTERM, then SIGKILL) by their PID,
also when a run fails half-way. Nothing is ever stopped by name.
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
    "clean_env",
    "find_tool",
    "free_port",
    "proc_cpu_seconds",
    "proc_status_kib",
    "raise_nofile",
    "read_line",
    "wait_for_port",
    "wait_for_smtp",
]

HOST = "127.0.0.1"
NOFILE_TARGET = 65536
"""The RLIMIT_NOFILE the harness asks for, for itself and every child."""
STOP_TIMEOUT = 15.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""
POLL = 0.05


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


@dataclass
class Child:
    """One started process, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to *timeout* s, then SIGKILL; the exit status. Idempotent."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
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
