"""The servers under test, each started fresh on its own 127.0.0.1 port.

* ``trismtp``: ``trismtp serve``, the full path (embedded jobs service, a
  fresh SQLite database in the run's own directory, ``log.level = "warning"``,
  ``smtp.workers`` as the harness was asked: the primary then starts the other
  workers as its children, and every figure of the server sums the tree).
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
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.procs import (
    HOST,
    POLL,
    Child,
    Children,
    ProcessTree,
    clean_env,
    descendants,
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
    "Workers",
    "count_jobs",
    "count_stream",
    "expected_workers",
    "parse_workers",
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
WORKERS_START_TIMEOUT = 60.0
"""Seconds trismtp's secondary workers get to greet, after the primary greeted."""
PROBES_PER_WORKER = 8
"""Connections per worker that must all be greeted before a run starts (see
:func:`_wait_for_workers`): a worker gets none of them with odds of about e^-8."""
PROBE_TIMEOUT = 1.0
START_ATTEMPTS = 3
"""Starts of a server whose port was taken before it could listen (see :func:`start_server`)."""

Workers = int | Literal["auto"]
"""``smtp.workers`` as the harness passes it to trismtp: a number, or ``"auto"``."""


def parse_workers(text: str) -> Workers:
    """``"auto"`` or a whole number ≥ 1, as ``smtp.workers`` takes it; ValueError otherwise."""
    text = text.strip()
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f'{text!r}: must be "auto" or a whole number ≥ 1')
    return int(text)


def expected_workers(workers: Workers) -> int:
    """How many SMTP processes trismtp will run for *workers*, by trismtp's own rule.

    ``"auto"`` resolves as the daemon resolves it (one per CPU the harness,
    and so its children, may run on; as many as the default memory budget
    feeds). A count trismtp would refuse raises ValueError with its reason.
    """
    from pydantic import ValidationError

    from trismtp.settings import SmtpSettings

    try:
        return SmtpSettings(workers=workers).worker_count()
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"smtp.workers = {workers!r}: {reasons}") from None


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
    workers: int | None = None
    """trismtp: its SMTP processes (the primary and its secondaries) once all greeted."""

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

    @property
    def tree(self) -> ProcessTree:
        """The server's process and its descendants (trismtp's secondary workers)."""
        if self.child.tree is None:
            self.child.tree = ProcessTree(self.child.pid)
        return self.child.tree

    def processes(self) -> tuple[tuple[int, int], ...] | None:
        """(PID, start time) of each process of the tree now; None once it is gone."""
        sample = self.tree.sample()
        return None if sample is None else sample.processes

    def rss_kib(self) -> int | None:
        """Resident memory now (VmRSS), in KiB, summed over the process tree."""
        sample = self.tree.sample()
        return None if sample is None else sample.rss_kib

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads, the whole tree) used since it was ready."""
        sample = self.tree.sample()
        return None if sample is None else sample.cpu_seconds - self.cpu_at_ready

    def peak_rss_kib(self) -> int | None:
        """Peak resident memory so far, in KiB, of the tree (:meth:`ProcessTree.peak_rss_kib`)."""
        return self.tree.peak_rss_kib()


def trismtp_binary() -> list[str]:
    """The venv's ``trismtp`` console script, else ``python -m trismtp.cli``."""
    script = Path(sys.executable).parent / "trismtp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trismtp.cli"]


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


def _write_trismtp_config(
    workdir: Path, port: int, service_port: int, workers: Workers, nats_url: str | None = None
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
                f"workers = {_toml_str(workers) if workers == 'auto' else workers}",
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
    children: Children,
    workdir: Path,
    max_connections: int,
    workers: Workers,
    nats_url: str | None = None,
) -> RunningServer:
    port, service_port = free_port(), free_port()
    config, database = _write_trismtp_config(workdir, port, service_port, workers, nats_url)
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
    children: Children,
    workdir: Path,
    nats_server: str | None,
    max_connections: int,
    workers: Workers,
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
        nats_url = f"nats+ws://{HOST}:{ws_port}"
        server = _start_trismtp(children, workdir, max_connections, workers, nats_url)
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
    trismtp_workers: Workers = "auto",
) -> RunningServer:
    """Start server *name* in *workdir* and wait until it greets on its port.

    trismtp runs with ``smtp.workers = trismtp_workers``, and counts as
    started once every worker greets; its CPU time is counted from then on
    (the workers' start-up is not part of a run).
    On failure (RuntimeError) every process started for it has been stopped.

    A port from :func:`free_port` can be taken before the server binds it
    (the kernel hands the same range out as the local ports of outgoing
    connections): a server that cannot listen for that reason is started
    again on other ports, up to :data:`START_ATTEMPTS` times.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_server(
                name,
                children,
                workdir,
                smtp_sink=smtp_sink,
                nats_server=nats_server,
                max_connections=max_connections,
                trismtp_workers=trismtp_workers,
            )
        except RuntimeError as exc:
            if attempt == START_ATTEMPTS or "address already in use" not in str(exc).lower():
                raise
            print(
                f"  note: {name}: a port was taken before it could listen; starting it again",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


def _start_server(
    name: str,
    children: Children,
    workdir: Path,
    *,
    smtp_sink: str,
    nats_server: str | None,
    max_connections: int,
    trismtp_workers: Workers,
) -> RunningServer:
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "trismtp":
        server = _start_trismtp(children, workdir, max_connections, trismtp_workers)
    elif name == "trismtp-nats":
        server = _start_trismtp_nats(
            children, workdir, nats_server, max_connections, trismtp_workers
        )
    elif name == "aiosmtpd":
        server = _start_aiosmtpd(children, workdir)
    elif name == "aiosmtpd-sqlite":
        server = _start_aiosmtpd_sqlite(children, workdir)
    elif name == "smtp-sink":
        server = _start_smtp_sink(children, workdir, smtp_sink, max_connections)
    else:
        raise ValueError(f"unknown server {name!r}")
    server.child.tree = ProcessTree(server.child.pid)
    try:
        wait_for_smtp(server.port, server.child)
        if name in ("trismtp", "trismtp-nats"):
            expected = expected_workers(trismtp_workers)
            server.workers = _wait_for_workers(server, expected, WORKERS_START_TIMEOUT)
    except BaseException:
        for child in (server.child, *server.helpers):
            children.stop(child)
        raise
    server.cpu_at_ready = server.cpu_seconds() or 0.0
    server.helper_cpu_at_ready = server.helpers_cpu_seconds() or 0.0
    return server


def _secondaries(pid: int) -> list[int]:
    """The PIDs of trismtp's secondary workers below *pid* (``serve --worker K``)."""
    found = []
    for child in descendants(pid):
        with suppress(OSError):
            if b"--worker" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                found.append(child)
    return found


def _wait_for_workers(server: RunningServer, expected: int, timeout: float) -> int:
    """Wait until trismtp runs *expected* SMTP processes that all greet; return how many run.

    The primary greets before its secondaries have started (they take about
    a second to import and connect their pushers), and the kernel hands each
    new connection to one worker's copy of the socket by a hash of the
    client's port: a run started at once would queue some of its connections
    on a worker still starting. So: the secondaries must exist, and
    ``PROBES_PER_WORKER`` connections per worker must all be greeted.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not server.child.alive:
            raise RuntimeError(
                f"{server.name} exited ({server.child.popen.returncode}) while its workers "
                f"started:\n{server.child.log_tail()}"
            )
        running = 1 + len(_secondaries(server.child.pid))
        if running >= expected and (
            expected == 1 or _all_greet(server.port, PROBES_PER_WORKER * expected)
        ):
            return running
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{server.name}: {running} of {expected} SMTP workers running, not all "
                f"greeting, {timeout:g} s after it first greeted:\n{server.child.log_tail()}"
            )
        time.sleep(POLL)


def _all_greet(port: int, connections: int) -> bool:
    """Open *connections* at once; True if each is greeted with 220 within PROBE_TIMEOUT."""
    with ExitStack() as stack:
        socks = []
        try:
            for _ in range(connections):
                sock = stack.enter_context(socket.create_connection((HOST, port), PROBE_TIMEOUT))
                socks.append(sock)
        except OSError:
            return False
        deadline = time.monotonic() + PROBE_TIMEOUT
        for sock in socks:
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not sock.recv(1024).startswith(b"220"):
                    return False
            except OSError:
                return False
        for sock in socks:
            with suppress(OSError):
                sock.sendall(b"QUIT\r\n")
        return True


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
