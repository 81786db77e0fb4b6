"""The servers under test, each started fresh on its own 127.0.0.1 port.

* ``trismtp``: ``trismtp serve``, the full path (embedded jobs service, a
  fresh SQLite database in the run's own directory, ``log.level = "warning"``).
* ``trismtp-nats`` (optional): ``trismtp serve`` with ``jobs.url =
  "nats+ws://…"``, publishing to a ``nats-server`` (JetStream, a fresh
  ``store_dir``) that is started beside it as another child process.
* ``aiosmtpd``: :mod:`bench.aiosmtpd_null`, answers 250 and stores nothing.
* ``aiosmtpd-sqlite``: :mod:`bench.aiosmtpd_sqlite`, the by-hand peer of
  issue 16: parses with ``email``, JSON payload, SQLite WAL
  ``synchronous=FULL`` commit per message, then 250.
* ``smtp-sink``: Postfix's C test server, stores nothing. It is started as a
  plain child process, never the system's Postfix daemon.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    HOST,
    Child,
    Children,
    clean_env,
    free_port,
    proc_cpu_seconds,
    proc_status_kib,
    wait_for_port,
    wait_for_smtp,
)

__all__ = [
    "REPO",
    "SERVERS",
    "STORING_SERVERS",
    "RunningServer",
    "count_jobs",
    "count_stream",
    "start_server",
    "trismtp_binary",
]

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("trismtp", "trismtp-nats", "aiosmtpd", "aiosmtpd-sqlite", "smtp-sink")
STORING_SERVERS = ("trismtp", "trismtp-nats", "aiosmtpd-sqlite")
"""The servers that store every message, whose stored count must equal the messages sent."""
NATS_START_TIMEOUT = 30.0
"""Seconds nats-server gets to accept connections on its WebSocket port."""
STAT_TIMEOUT = 60.0
"""Seconds ``trismtp jobs stat`` gets to report the stream's message count."""
BACKLOG = 4096
DEFAULT_MAX_CONNECTIONS = 1000
"""trismtp's ``smtp.max_connections`` default, kept unless a run needs more."""


@dataclass
class RunningServer:
    """A started server: its name, port, process, and where it stores (trismtp)."""

    name: str
    port: int
    child: Child
    database: Path | None = None
    """trismtp: the run's SQLite database."""
    cpu_at_ready: float = 0.0
    """CPU time the process had used by the time it first greeted (start-up)."""
    config: Path | None = None
    """trismtp: the run's settings file."""
    nats_url: str | None = None
    """trismtp-nats: the ``nats+ws://`` URL of its nats-server."""
    rpc_url: str | None = None
    """trismtp: the ``ws://…/rpc`` URL of its embedded jobs service (for a consumer)."""
    helpers: list[Child] = field(default_factory=list)
    """Processes the server needs (nats-server), to stop after it, by PID."""
    helper_cpu_at_ready: float = 0.0
    """CPU time the helpers had used by the time the server first greeted."""

    def helpers_cpu_seconds(self) -> float | None:
        """CPU time of the helpers since the server first greeted; None without helpers."""
        totals = [proc_cpu_seconds(h.pid) for h in self.helpers]
        if not totals or any(t is None for t in totals):
            return None
        return sum(t for t in totals if t is not None) - self.helper_cpu_at_ready

    def helpers_peak_rss_kib(self) -> int | None:
        """Summed peak resident memory (VmHWM) of the helpers, in KiB; None without helpers."""
        peaks = [proc_status_kib(h.pid, "VmHWM") for h in self.helpers]
        if not peaks or any(p is None for p in peaks):
            return None
        return sum(p for p in peaks if p is not None)

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


def _write_trismtp_config(
    workdir: Path, port: int, service_port: int, nats_url: str | None = None
) -> tuple[Path, Path]:
    """A settings file for one run; returns (config path, database path).

    With *nats_url*, jobs go to that NATS server's JetStream (``retention =
    "limits"``, so the messages stay in the stream to be counted) instead of
    the embedded jobs service, and the database is never created.
    """
    database = workdir / "jobs.sqlite3"
    config = workdir / "trismtp.toml"
    jobs = (
        ["[jobs]", f"url = {_toml_str(nats_url)}", "[jobs.nats]", 'retention = "limits"']
        if nats_url
        else [
            "[jobs_service]",
            f"listen = {_toml_str(f'{HOST}:{service_port}')}",
            f"database = {_toml_str(database)}",
        ]
    )
    config.write_text(
        "\n".join(
            [
                "[smtp]",
                f"listen = [{_toml_str(f'{HOST}:{port}')}]",
                *jobs,
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


def _start_trismtp(
    children: Children, workdir: Path, max_connections: int, nats_url: str | None = None
) -> RunningServer:
    port, service_port = free_port(), free_port()
    config, database = _write_trismtp_config(workdir, port, service_port, nats_url)
    env: dict[str, str] = {}
    if max_connections != DEFAULT_MAX_CONNECTIONS:
        env["TRISMTP_SMTP__MAX_CONNECTIONS"] = str(max_connections)
    name = "trismtp-nats" if nats_url else "trismtp"
    child = children.spawn(
        f"trismtp-{workdir.name}",
        [*trismtp_binary(), "serve", "--config", str(config)],
        cwd=workdir,
        env=clean_env(env),
    )
    if nats_url:
        return RunningServer(name, port, child, config=config, nats_url=nats_url)
    rpc_url = f"ws://{HOST}:{service_port}/rpc"
    return RunningServer(name, port, child, database, config=config, rpc_url=rpc_url)


def _nats_config(workdir: Path, port: int, ws_port: int) -> Path:
    """nats-server's configuration for one run: JetStream in *workdir*, a WebSocket listener."""
    config = workdir / "nats-server.conf"
    store = workdir / "jetstream"
    config.write_text(
        "\n".join(
            [
                f"listen: {HOST}:{port}",
                f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
                f'websocket {{ listen: "{HOST}:{ws_port}", no_tls: true }}',
                "max_payload: 8MB",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def _start_trismtp_nats(
    children: Children, workdir: Path, nats_server: str | None, max_connections: int
) -> RunningServer:
    """nats-server (JetStream, WebSocket), then ``trismtp serve`` publishing to it."""
    if nats_server is None:
        raise RuntimeError("nats-server not found (PATH, /usr/sbin): cannot run trismtp-nats")
    port, ws_port = free_port(), free_port()
    config = _nats_config(workdir, port, ws_port)
    nats = children.spawn(
        f"nats-server-{workdir.name}", [nats_server, "-c", str(config)], cwd=workdir
    )
    try:
        wait_for_port(ws_port, nats, NATS_START_TIMEOUT)
        server = _start_trismtp(children, workdir, max_connections, f"nats+ws://{HOST}:{ws_port}")
    except BaseException:
        children.stop(nats)
        raise
    server.helpers.append(nats)
    return server


def _start_aiosmtpd(children: Children, workdir: Path) -> RunningServer:
    port = free_port()
    child = children.spawn(
        f"aiosmtpd-{workdir.name}",
        [sys.executable, "-m", "bench.aiosmtpd_null", "--port", str(port), "--backlog", "4096"],
        cwd=REPO,
    )
    return RunningServer("aiosmtpd", port, child)


def _start_aiosmtpd_sqlite(children: Children, workdir: Path) -> RunningServer:
    port = free_port()
    database = workdir / "jobs.sqlite3"
    child = children.spawn(
        f"aiosmtpd-sqlite-{workdir.name}",
        [sys.executable, "-m", "bench.aiosmtpd_sqlite", "--port", str(port),
         "--backlog", "4096", "--database", str(database)],
        cwd=REPO,
    )  # fmt: skip
    return RunningServer("aiosmtpd-sqlite", port, child, database)


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
    nats_server: str | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> RunningServer:
    """Start server *name* in *workdir* and wait until it greets on its port.

    On failure (RuntimeError) every process started for it has been stopped.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "trismtp":
        server = _start_trismtp(children, workdir, max_connections)
    elif name == "trismtp-nats":
        server = _start_trismtp_nats(children, workdir, nats_server, max_connections)
    elif name == "aiosmtpd":
        server = _start_aiosmtpd(children, workdir)
    elif name == "aiosmtpd-sqlite":
        server = _start_aiosmtpd_sqlite(children, workdir)
    elif name == "smtp-sink":
        server = _start_smtp_sink(children, workdir, smtp_sink, max_connections)
    else:
        raise ValueError(f"unknown server {name!r}")
    try:
        wait_for_smtp(server.port, server.child)
    except BaseException:
        for child in (server.child, *server.helpers):
            children.stop(child)
        raise
    server.cpu_at_ready = proc_cpu_seconds(server.child.pid) or 0.0
    server.helper_cpu_at_ready = server.helpers_cpu_seconds() or 0.0
    return server


def count_jobs(database: Path) -> int | None:
    """``SELECT COUNT(*) FROM jobs`` on a trismtp or aiosmtpd-sqlite database; None: unreadable."""
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


def count_stream(config: Path, nats_url: str) -> int | None:
    """The JetStream stream's message count, from ``trismtp jobs stat --json``; None on failure.

    *config* is the run's settings file (its ``[jobs.nats]`` names the stream).
    """
    argv = [*trismtp_binary(), "jobs", "stat", "--json", "--config", str(config), "--url", nats_url]
    try:
        done = subprocess.run(
            argv,
            cwd=config.parent,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STAT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        stats = json.loads(done.stdout)
        active = stats[0]["active"]
    except (ValueError, LookupError, TypeError):
        return None
    return active if type(active) is int else None
