"""Helpers of the end-to-end suite: the real ``trismtp`` binary as subprocesses.

Test modules import this (``from .trismtp_e2e import …``: with
``--import-mode=importlib`` they cannot import conftest); conftest.py wraps
these helpers in fixtures.

Rules kept here, so that every test keeps them:

* every process is started by :class:`Process` and stopped by its PID
  (``Popen.terminate``, then ``Popen.kill``), in fixture teardown;
* servers bind 127.0.0.1 on ports found free by binding port 0;
* every wait polls a condition until a deadline, then fails with the log.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ..stored import payload_of

__all__ = [
    "CLI_TIMEOUT",
    "HOST",
    "QUEUED_RE",
    "UUID4_RE",
    "Daemon",
    "JobsService",
    "Launcher",
    "Process",
    "ProcessGroup",
    "Reply",
    "SmtpConn",
    "StoredJob",
    "b64decode",
    "clean_env",
    "connection_refused",
    "free_port",
    "launcher",
    "message",
    "queued_id",
    "require_tool",
    "run_cli",
    "stored_jobs",
    "trismtp_argv",
    "wait_until",
    "write_settings",
]

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
"""Seconds a process gets to log that it listens."""
STOP_TIMEOUT = 15.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""
CLI_TIMEOUT = 30.0
"""Seconds a one-shot command (``trismtp jobs stat``, swaks, …) may take."""
REPLY_TIMEOUT = 10.0
"""Seconds to wait for one SMTP reply."""
POLL_INTERVAL = 0.02

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
UUID4_RE = re.compile(rf"^{UUID4}$")
QUEUED_RE = re.compile(rf"250 2\.0\.0 OK: queued as ({UUID4})")

T = TypeVar("T")
P = TypeVar("P", bound="Process")


# -- environment --------------------------------------------------------------


def require_tool(name: str) -> str:
    """The path of the program *name*; skip the test without it (fail when CI=true)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    path = shutil.which(name, path=search)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} not installed (required when CI=true)")
        pytest.skip(f"{name} not installed")
    return path


def trismtp_argv() -> list[str]:
    """How to start the real binary: the venv's console script, else ``-m trismtp.cli``."""
    script = shutil.which("trismtp", path=os.path.dirname(sys.executable))
    if script is not None:
        return [script]
    return [sys.executable, "-m", "trismtp.cli"]


def clean_env() -> dict[str, str]:
    """The environment for a subprocess: ours without TRISMTP_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRISMTP_")}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll *condition* until it returns something truthy; fail after *timeout* s.

    *detail* is called on failure, for context (a process's log, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = f"timed out after {timeout:g} s waiting for {what}"
            raise AssertionError(f"{text}\n{detail()}" if detail else text)
        time.sleep(POLL_INTERVAL)


def run_cli(
    *args: str,
    cwd: Path,
    timeout: float = CLI_TIMEOUT,
    check: bool = False,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``trismtp ARGS`` to completion (killed after *timeout* s)."""
    result = subprocess.run(
        [*trismtp_argv(), *args],
        cwd=cwd,
        env={**clean_env(), **(env_extra or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"trismtp {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command's single stderr line; fails on a traceback or more lines."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("trismtp: "), lines[0]
    return lines[0]


def serve_with_smtp(workdir: Path, smtp: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run ``trismtp serve`` with these ``[smtp]`` settings (free ports), expecting it
    to stop by itself: for settings it must refuse at start."""
    config = write_settings(
        workdir / "settings.toml",
        {
            "smtp": {"listen": [f"{HOST}:{free_port()}"], **smtp},
            "jobs_service": {
                "listen": f"{HOST}:{free_port()}",
                "database": str(workdir / "jobs.sqlite3"),
            },
        },
    )
    return run_cli("serve", "--config", str(config), cwd=workdir, timeout=20)


# -- settings -----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_settings(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write *sections* (``{"smtp": {"listen": [...]}, ...}``) as a TOML file."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def merge(
    base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """*base* with the keys of *extra* set, section by section."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in (extra or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


# -- processes ----------------------------------------------------------------


class Process:
    """One ``trismtp`` server process (daemon or jobs service), started on demand.

    stdout and stderr (the log) go to files in the working directory, one pair
    per run, so a restarted process starts with a fresh log.
    """

    ready_text = ""
    """The log text that says the process accepts connections."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name = name
        self.workdir = workdir
        self.args = args
        self.popen: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = workdir / f"{name}.log"
        self.env_extra: dict[str, str] = {}
        """Environment variables added to :func:`clean_env` (``TRISMTP_…`` settings)."""

    # -- lifecycle ------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Start the process; with *wait*, return once it logged :attr:`ready_text`."""
        assert not self.running, f"{self.name} is already running"
        self.runs += 1
        self.log_path = self.workdir / f"{self.name}-{self.runs}.log"
        out_path = self.workdir / f"{self.name}-{self.runs}.out"
        with self.log_path.open("wb") as log, out_path.open("wb") as out:
            self.popen = subprocess.Popen(
                [*trismtp_argv(), *self.args],
                cwd=self.workdir,
                env={**clean_env(), **self.env_extra},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll the log until the process says it listens; fail if it exits first."""

        def ready() -> bool:
            if self.ready_text in self.log_text():
                return True
            if self.exit_code is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.exit_code} before it was ready\n"
                    f"{self.log_text()}"
                )
            return False

        wait_until(ready, timeout, f"{self.name} to log {self.ready_text!r}", detail=self.log_tail)

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def exit_code(self) -> int | None:
        """The exit status, or None while running."""
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        """Send *signum* to the process (by its PID)."""
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        """The exit status; fail if the process is still running after *timeout* s."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout:g} s\n{self.log_tail()}"
            ) from None

    def kill(self) -> int:
        """SIGKILL, and reap."""
        assert self.popen is not None
        self.popen.kill()
        return self.popen.wait(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to *timeout* s, then SIGKILL. Safe to call twice."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode

    # -- the log --------------------------------------------------------------

    def log_text(self) -> str:
        """What the current run logged so far (stderr)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = REPLY_TIMEOUT) -> None:
        """Poll the log until it contains *text*."""
        wait_until(
            lambda: text in self.log_text(),
            timeout,
            f"{self.name} to log {text!r}",
            detail=self.log_tail,
        )


class JobsService(Process):
    """``trismtp jobs serve --config FILE``: the jobs service alone."""

    ready_text = "jobs service listening on"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        database: Path | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        name: str = "jobs-service",
    ) -> None:
        self.port = port or free_port()
        self.database = database or workdir / "jobs.sqlite3"
        base = {
            "jobs_service": {"listen": f"{HOST}:{self.port}", "database": str(self.database)},
            "log": {"level": "debug"},
        }
        self.settings = merge(base, settings)
        self.config = write_settings(workdir / f"{name}.toml", self.settings)
        super().__init__(name, workdir, ["jobs", "serve", "--config", str(self.config)])

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/rpc"


class Daemon(Process):
    """``trismtp serve --config FILE`` with a temp settings file.

    By default the jobs service is embedded, on its own free port, with its
    database in *workdir*; *settings* override or add keys section by section.
    """

    ready_text = "SMTP listening on"

    def __init__(
        self,
        workdir: Path,
        *,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        smtp_port: int | None = None,
        jobs_port: int | None = None,
        database: Path | None = None,
        name: str = "daemon",
    ) -> None:
        self.smtp_port = smtp_port or free_port()
        self.jobs_port = jobs_port or free_port()
        self.database = database or workdir / "jobs.sqlite3"
        base: dict[str, dict[str, Any]] = {
            "smtp": {"listen": [f"{HOST}:{self.smtp_port}"]},
            "jobs": {"push_timeout": 3},
            "jobs_service": {
                "listen": f"{HOST}:{self.jobs_port}",
                "database": str(self.database),
            },
            "shutdown": {"grace": 5},
            "log": {"level": "debug"},
        }
        self.settings = merge(base, settings)
        self.config = write_settings(workdir / f"{name}.toml", self.settings)
        super().__init__(name, workdir, ["serve", "--config", str(self.config)])

    @property
    def url(self) -> str:
        """The RPC URL of the embedded jobs service."""
        return f"ws://{HOST}:{self.jobs_port}/rpc"

    @property
    def grace(self) -> float:
        return float(self.settings["shutdown"]["grace"])

    def connect(self, timeout: float = REPLY_TIMEOUT) -> SmtpConn:
        """A raw SMTP connection to the daemon (greeting not read yet)."""
        return SmtpConn(self.smtp_port, timeout=timeout)

    def jobs(self) -> list[StoredJob]:
        """The jobs in the daemon's database, read with sqlite3."""
        return stored_jobs(self.database)


class ProcessGroup:
    """Processes a fixture started; :meth:`close` stops them all, by PID."""

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def add(self, process: P) -> P:
        self.processes.append(process)
        return process

    def close(self) -> None:
        errors: list[BaseException] = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except BaseException as exc:  # still stop the others
                errors.append(exc)
                with suppress(Exception):
                    if process.popen is not None:
                        process.popen.kill()
        if errors:
            raise errors[0]

    def report(self) -> str:
        """Every process's log tail, for a failing test's output."""
        return "\n".join(
            f"----- {p.name} (pid {p.popen.pid if p.popen else '-'}, "
            f"exit {p.exit_code}) {p.log_path.name} -----\n{p.log_tail(60)}"
            for p in self.processes
        )


class Launcher:
    """Starts daemons and jobs services in *workdir*, each in a subdirectory of
    its own unless told to share one, and stops them all when closed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.group = ProcessGroup()
        self._count = 0

    def _dir(self, workdir: Path | None) -> Path:
        if workdir is not None:
            return workdir
        self._count += 1
        path = self.workdir / f"p{self._count}"
        path.mkdir()
        return path

    def daemon(
        self,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        start: bool = True,
        workdir: Path | None = None,
        **kwargs: Any,
    ) -> Daemon:
        """A :class:`Daemon` (started unless *start* is False)."""
        daemon = self.group.add(Daemon(self._dir(workdir), settings=settings, **kwargs))
        if start:
            daemon.start()
        return daemon

    def jobs_service(
        self,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        start: bool = True,
        workdir: Path | None = None,
        **kwargs: Any,
    ) -> JobsService:
        """A :class:`JobsService` (started unless *start* is False)."""
        service = self.group.add(JobsService(self._dir(workdir), settings=settings, **kwargs))
        if start:
            service.start()
        return service


@contextmanager
def launcher(workdir: Path) -> Iterator[Launcher]:
    """A :class:`Launcher` whose processes are stopped on exit, even on failure."""
    launch = Launcher(workdir)
    try:
        yield launch
    finally:
        try:
            launch.group.close()
        finally:
            # Captured output: pytest shows it only for a failing test.
            print(launch.group.report())


# -- the store ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A row of the ``jobs`` table (see src/trismtp/service/store.py)."""

    id: str
    pipeline: str
    name: str
    payload_text: str
    headers: dict[str, list[str]]
    priority: int
    delay: int
    auto_ack: bool

    @property
    def payload(self) -> dict[str, Any]:
        data = json.loads(self.payload_text)
        assert isinstance(data, dict)
        return data


def stored_jobs(database: Path) -> list[StoredJob]:
    """Every job in *database*, oldest first; [] when there is no database yet."""
    if not database.exists():
        return []
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT id, pipeline, name, payload, headers, priority, delay, auto_ack,"
            " payload_file FROM jobs ORDER BY rowid"
        ).fetchall()
    finally:
        db.close()
    return [
        StoredJob(
            id=row[0],
            pipeline=row[1],
            name=row[2],
            payload_text=payload_of(database, row[3], row[8]),
            headers=json.loads(row[4]),
            priority=row[5],
            delay=row[6],
            auto_ack=bool(row[7]),
        )
        for row in rows
    ]


def b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- SMTP over a raw socket ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: its code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def last(self) -> str:
        """The last line as sent: ``"250 2.0.0 OK: queued as …"``."""
        return f"{self.code} {self.lines[-1]}".rstrip()

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}".rstrip() for line in self.lines)


def queued_id(reply: str | Reply) -> str:
    """The job id of a ``250 2.0.0 OK: queued as <uuid4>`` reply; fail otherwise."""
    text = reply.last if isinstance(reply, Reply) else reply
    match = QUEUED_RE.fullmatch(text.strip())
    assert match, f"not '250 2.0.0 OK: queued as <uuid4>': {text!r}"
    return match.group(1)


class SmtpConn:
    """A blocking SMTP client on a raw socket, for what smtplib will not send.

    Every read has a deadline; a missing reply fails the test with what was
    received so far.
    """

    def __init__(self, port: int, *, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> SmtpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False on EOF. Fails at *deadline*."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete reply in time; received so far: {self.buffer!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"no complete reply in time; received so far: {self.buffer!r}"
            ) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The next reply; fails on timeout or when the server closes first."""
        deadline = time.monotonic() + timeout
        code: int | None = None
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                if not self._fill(deadline):
                    raise AssertionError(
                        f"connection closed before a complete reply; got {self.buffer!r}"
                    )
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            line = raw.decode("utf-8", errors="replace")
            assert re.fullmatch(r"[2-5]\d\d([ -].*)?", line), f"not a reply line: {line!r}"
            this = int(line[:3])
            assert code is None or code == this, f"reply code changed mid-reply: {line!r}"
            code = this
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, tuple(lines))

    def replies(self, count: int, timeout: float = REPLY_TIMEOUT) -> list[Reply]:
        return [self.reply(timeout) for _ in range(count)]

    def command(self, line: str, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send one command line, return its reply."""
        self.send(line + "\r\n")
        return self.reply(timeout)

    def expect(self, line: str, prefix: str, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send *line*; the reply's last line must start with *prefix*."""
        reply = self.command(line, timeout)
        assert reply.last.startswith(prefix), f"{line!r} got {reply}, expected {prefix!r}"
        return reply

    def greeting(self) -> Reply:
        reply = self.reply()
        assert reply.code == 220, f"greeting: {reply}"
        return reply

    def start(self, helo: str = "client.e2e.test") -> Reply:
        """Read the greeting and say EHLO; returns the EHLO reply."""
        self.greeting()
        return self.expect(f"EHLO {helo}", "250")

    def transaction(
        self, mail_from: str = "sender@example.org", rcpts: Iterable[str] = ("rcpt@example.com",)
    ) -> None:
        """MAIL, RCPT…, DATA up to the 354."""
        self.expect(f"MAIL FROM:<{mail_from}>", "250")
        for rcpt in rcpts:
            self.expect(f"RCPT TO:<{rcpt}>", "250")
        self.expect("DATA", "354")

    def wait_closed(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """Wait for the server to close; returns what it sent meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.eof and self._fill(deadline):
            pass
        rest, self.buffer = self.buffer, b""
        return rest

    def quit(self) -> None:
        """QUIT, 221, and the server's close (so its session has ended)."""
        self.expect("QUIT", "221")
        rest = self.wait_closed()
        assert rest == b"", f"data after 221: {rest!r}"


def connection_refused(port: int) -> bool:
    """True when a TCP connect to *port* is refused (nobody listens)."""
    try:
        with socket.create_connection((HOST, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def message(subject: str = "e2e", body: str = "Hello.\r\n", extra: str = "") -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    return (
        "From: Sender <sender@example.org>\r\n"
        "To: Rcpt <rcpt@example.com>\r\n"
        f"Subject: {subject}\r\n"
        f"{extra}"
        "\r\n"
        f"{body}"
    ).encode()


# -- TLS, AUTH and IPv6 (STARTTLS, implicit TLS, SMTP AUTH, PROXY) ------------


def write_tls_files(
    ca: Any, directory: Path, *, name: str = "server", common_name: str | None = None
) -> tuple[Path, Path]:
    """Issue a certificate from the ``trustme.CA`` *ca* for localhost, 127.0.0.1
    and ::1; write its chain and key as ``NAME.crt`` and ``NAME.key`` in
    *directory* (overwriting them); return both paths."""
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name=common_name)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


def client_tls_context(ca: Any, *, maximum_version: Any = None) -> Any:
    """An ``ssl.SSLContext`` for clients that trusts the ``trustme.CA`` *ca* only."""
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


def wrap_tls(conn: SmtpConn, context: Any, server_hostname: str = "localhost") -> None:
    """Do the client TLS handshake on *conn*, which must hold no unread reply."""
    assert conn.buffer == b"", f"unread bytes before the TLS handshake: {conn.buffer!r}"
    conn.sock = context.wrap_socket(conn.sock, server_hostname=server_hostname)


def starttls(conn: SmtpConn, context: Any, server_hostname: str = "localhost") -> None:
    """STARTTLS, its 220, then the handshake."""
    conn.expect("STARTTLS", "220 2.0.0")
    wrap_tls(conn, context, server_hostname)


def add_user(users_file: Path, username: str, password: str) -> None:
    """``trismtp passwd USERS_FILE USERNAME --password-stdin``: add or change a user."""
    result = subprocess.run(
        [*trismtp_argv(), "passwd", str(users_file), username, "--password-stdin"],
        cwd=users_file.parent,
        env=clean_env(),
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        start_new_session=True,
    )
    assert result.returncode == 0, f"trismtp passwd exited {result.returncode}: {result.stderr}"


def ipv6_loopback() -> bool:
    """Whether this machine can listen on and connect to [::1]."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class SmtpConnTo(SmtpConn):
    """:class:`SmtpConn` to any host, e.g. ``"::1"``."""

    def __init__(self, host: str, port: int, *, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.eof = False


def require_swaks_tls() -> str:
    """The path of swaks, which must be able to do TLS (Debian: libnet-ssleay-perl).

    Skips the test otherwise (fails when CI=true), like :func:`require_tool`.
    """
    swaks = require_tool("swaks")
    support = subprocess.run(
        [swaks, "--support"], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    if "=== TLS supported" not in support.stdout + support.stderr:
        reason = "swaks cannot do TLS: Net::SSLeay missing (apt-get install libnet-ssleay-perl)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required when CI=true)")
        pytest.skip(reason)
    return swaks
