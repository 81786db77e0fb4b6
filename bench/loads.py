"""The loads: Postfix's ``smtp-source`` runs, timed by wall clock.

smtp-source prints nothing by default and stops at the first reply that is
not the expected one, exiting non-zero; so a run is valid when it exits 0
and wrote nothing to stderr. Its rate is ``messages / wall-clock seconds``
measured around the whole process (start, connects, every transaction).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, Children, ProcessTree, wait_sampling

__all__ = ["Load", "SourceRun", "run_smtp_source", "standard_loads"]

MAIL_FROM = "bench@localhost"
RCPT = "sink@localhost"


@dataclass(frozen=True, slots=True)
class Load:
    """One smtp-source configuration."""

    key: str
    label: str
    sessions: int
    kept: bool
    """``-d``: keep the connection for the next message (else one connection each)."""
    size: int
    """``-l``: body bytes (headers come on top)."""
    messages: int | None = None
    """A fixed message count for this load (the 10 MB one); None: ``--messages``."""

    def argv(self, tool: str, port: int, messages: int) -> list[str]:
        """The smtp-source command line for *messages* messages to 127.0.0.1:*port*."""
        keep = ["-d"] if self.kept else []
        return [
            tool, "-s", str(self.sessions), "-m", str(messages), "-l", str(self.size),
            "-M", "localhost", "-f", MAIL_FROM, "-t", RCPT, *keep, f"{HOST}:{port}",
        ]  # fmt: skip


BIG_SIZE = 10 * 1024 * 1024
"""The body of the large-message load: 10 MiB."""
BIG_SESSIONS = 4


def standard_loads(
    sessions: int = 20, concurrent: int = 1000, big_messages: int = 40
) -> list[Load]:
    """The loads: kept/new connection × 2 KB/100 KB, many connections, and 10 MB messages."""
    return [
        Load("kept-2k", f"{sessions} sessions, kept conn., 2 KB", sessions, True, 2048),
        Load("new-2k", f"{sessions} sessions, new conn. each, 2 KB", sessions, False, 2048),
        Load("kept-100k", f"{sessions} sessions, kept conn., 100 KB", sessions, True, 102400),
        Load("new-100k", f"{sessions} sessions, new conn. each, 100 KB", sessions, False, 102400),
        Load("conc-2k", f"{concurrent} sessions, kept conn., 2 KB", concurrent, True, 2048),
        Load(
            "kept-10m",
            f"{BIG_SESSIONS} sessions, kept conn., 10 MiB × {big_messages}",
            sessions=BIG_SESSIONS,
            kept=True,
            size=BIG_SIZE,
            messages=big_messages,
        ),
    ]


@dataclass(frozen=True, slots=True)
class SourceRun:
    """What one smtp-source run did."""

    messages: int
    seconds: float
    exit_code: int | None
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.stderr.strip()

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def problem(self) -> str | None:
        """Why the run does not count, in a few words; None when it does."""
        if self.timed_out:
            return f"smtp-source timed out after {self.seconds:.0f} s"
        if self.exit_code != 0 or self.stderr.strip():
            first = self.stderr.strip().splitlines()[:1]
            return f"smtp-source exit {self.exit_code}: {first[0][:120] if first else ''}"
        return None


def run_smtp_source(
    children: Children,
    tool: str,
    load: Load,
    port: int,
    messages: int,
    *,
    workdir: Path,
    name: str,
    timeout: float,
    server: ProcessTree | None = None,
) -> SourceRun:
    """Run smtp-source to completion (stopped by PID after *timeout* s) and time it.

    Meanwhile the *server*'s process tree is sampled (its summed RSS peak).
    """
    started = time.perf_counter()
    child = children.spawn(name, load.argv(tool, port, messages), cwd=workdir)
    timed_out = False
    try:
        wait_sampling(child.popen, timeout, server)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        seconds = time.perf_counter() - started
        code = children.stop(child)
    return SourceRun(messages, seconds, code, child.log_tail(5), timed_out)
