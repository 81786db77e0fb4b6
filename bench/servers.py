"""The three servers under test, each started fresh on its own 127.0.0.1 port.

* ``trismtp``: ``trismtp serve``, the full path (embedded jobs service, a
  fresh SQLite database in the run's own directory, ``log.level = "warning"``).
* ``aiosmtpd``: :mod:`bench.aiosmtpd_null`, answers 250 and stores nothing.
* ``smtp-sink``: Postfix's C test server, stores nothing. It is started as a
  plain child process, never the system's Postfix daemon.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    HOST,
    Child,
    Children,
    clean_env,
    free_port,
    proc_cpu_seconds,
    proc_status_kib,
    wait_for_smtp,
)

__all__ = ["REPO", "SERVERS", "RunningServer", "count_jobs", "start_server", "trismtp_binary"]

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("trismtp", "aiosmtpd", "smtp-sink")
BACKLOG = 4096
DEFAULT_MAX_CONNECTIONS = 1000
"""trismtp's ``smtp.max_connections`` default, kept unless a run needs more."""


@dataclass
class RunningServer:
    """A started server: its name, port, process, and (trismtp) database."""

    name: str
    port: int
    child: Child
    database: Path | None = None
    cpu_at_ready: float = 0.0
    """CPU time the process had used by the time it first greeted (start-up)."""

    def rss_kib(self) -> int | None:
        """Resident memory now (VmRSS), in KiB."""
        return proc_status_kib(self.child.pid, "VmRSS")

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads) used since it first greeted."""
        total = proc_cpu_seconds(self.child.pid)
        return None if total is None else total - self.cpu_at_ready

    def peak_rss_kib(self) -> int | None:
        """Peak resident memory so far (VmHWM), in KiB."""
        return proc_status_kib(self.child.pid, "VmHWM")


def trismtp_binary() -> list[str]:
    """The venv's ``trismtp`` console script, else ``python -m trismtp.cli``."""
    script = Path(sys.executable).parent / "trismtp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trismtp.cli"]


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


def _write_trismtp_config(workdir: Path, port: int, service_port: int) -> tuple[Path, Path]:
    """A settings file for one run; returns (config path, database path)."""
    database = workdir / "jobs.sqlite3"
    config = workdir / "trismtp.toml"
    config.write_text(
        "\n".join(
            [
                "[smtp]",
                f"listen = [{_toml_str(f'{HOST}:{port}')}]",
                "[jobs_service]",
                f"listen = {_toml_str(f'{HOST}:{service_port}')}",
                f"database = {_toml_str(database)}",
                "[shutdown]",
                "grace = 5",
                "[log]",
                'level = "warning"',
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config, database


def _start_trismtp(children: Children, workdir: Path, max_connections: int) -> RunningServer:
    port, service_port = free_port(), free_port()
    config, database = _write_trismtp_config(workdir, port, service_port)
    env: dict[str, str] = {}
    if max_connections != DEFAULT_MAX_CONNECTIONS:
        env["TRISMTP_SMTP__MAX_CONNECTIONS"] = str(max_connections)
    child = children.spawn(
        f"trismtp-{workdir.name}",
        [*trismtp_binary(), "serve", "--config", str(config)],
        cwd=workdir,
        env=clean_env(env),
    )
    return RunningServer("trismtp", port, child, database)


def _start_aiosmtpd(children: Children, workdir: Path) -> RunningServer:
    port = free_port()
    child = children.spawn(
        f"aiosmtpd-{workdir.name}",
        [sys.executable, "-m", "bench.aiosmtpd_null", "--port", str(port), "--backlog", "4096"],
        cwd=REPO,
    )
    return RunningServer("aiosmtpd", port, child)


def _start_smtp_sink(
    children: Children, workdir: Path, smtp_sink: str, max_connections: int
) -> RunningServer:
    port = free_port()
    # As root, smtp-sink insists on dropping privileges (-u).
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    child = children.spawn(
        f"smtp-sink-{workdir.name}",
        [smtp_sink, *user, "-m", str(max_connections), f"{HOST}:{port}", str(BACKLOG)],
        cwd=workdir,
    )
    return RunningServer("smtp-sink", port, child)


def start_server(
    name: str,
    children: Children,
    workdir: Path,
    *,
    smtp_sink: str,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> RunningServer:
    """Start server *name* in *workdir* and wait until it greets on its port."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "trismtp":
        server = _start_trismtp(children, workdir, max_connections)
    elif name == "aiosmtpd":
        server = _start_aiosmtpd(children, workdir)
    elif name == "smtp-sink":
        server = _start_smtp_sink(children, workdir, smtp_sink, max_connections)
    else:
        raise ValueError(f"unknown server {name!r}")
    wait_for_smtp(server.port, server.child)
    server.cpu_at_ready = proc_cpu_seconds(server.child.pid) or 0.0
    return server


def count_jobs(database: Path) -> int | None:
    """``SELECT COUNT(*) FROM jobs`` on a trismtp database; None if unreadable."""
    if not database.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return int(count)
