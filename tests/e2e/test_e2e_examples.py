"""The example consumers (examples/python_worker.py, examples/php/consumer.php)
against a real daemon with its embedded jobs service and a token.

Each consumer runs as a subprocess, as a user would run it. The emails go in
with smtplib; the store is checked with ``trismtp jobs stat --json`` and by
reading the SQLite file. A fake WebSocket server checks what the real one never
sends the PHP client: fragmented messages, pings between fragments, a wrong
``Sec-WebSocket-Accept``.
"""

from __future__ import annotations

import base64
import email.policy
import hashlib
import json
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from .trismtp_e2e import (
    CLI_TIMEOUT,
    HOST,
    Daemon,
    Launcher,
    clean_env,
    free_port,
    queued_id,
    require_tool,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHON_WORKER = ROOT / "examples" / "python_worker.py"
PHP_CONSUMER = ROOT / "examples" / "php" / "consumer.php"
TOKEN = "e2e-examples-token-0123456789"
LINE_RE = re.compile(
    r'job=(\S+) from=("(?:[^"\\]|\\.)*") subject=("(?:[^"\\]|\\.)*") attachments=(\d+)'
)
EVIL_NAME = "../../evil.txt"


# -- the consumers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Consumer:
    """How to start one example consumer."""

    name: str
    argv: tuple[str, ...]

    def run(
        self,
        url: str,
        *args: str,
        cwd: Path,
        token: str | None = TOKEN,
        timeout: float = CLI_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run it to completion against *url*; *token* goes in $TRISMTP_JOBS_TOKEN."""
        argv = [*self.argv, "--url", url, *args]
        try:
            return subprocess.run(
                argv,
                cwd=cwd,
                env=self.env(token),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                encoding="utf-8",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # the child was killed
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s: {argv}\n"
                f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}"
            ) from None

    @staticmethod
    def env(token: str | None) -> dict[str, str]:
        env = {**clean_env(), "PYTHONUTF8": "1"}
        if token is not None:
            env["TRISMTP_JOBS_TOKEN"] = token
        return env


@pytest.fixture(params=["python", "php"])
def consumer(request: pytest.FixtureRequest) -> Consumer:
    if request.param == "php":
        return Consumer("php", (require_tool("php"), str(PHP_CONSUMER)))
    return Consumer("python", (sys.executable, str(PYTHON_WORKER)))


@pytest.fixture
def daemon(launch: Launcher) -> Daemon:
    """A daemon whose embedded jobs service wants a bearer token."""
    return launch.daemon({"jobs_service": {"token": TOKEN}})


@dataclass(frozen=True, slots=True)
class Line:
    """One line a consumer printed for a job."""

    job_id: str
    mail_from: str
    subject: str
    attachments: int


def job_lines(result: subprocess.CompletedProcess[str]) -> list[Line]:
    """Every stdout line, parsed; fails on a line that is not a job line."""
    lines = []
    for text in result.stdout.splitlines():
        match = LINE_RE.fullmatch(text)
        assert match, f"not a job line: {text!r}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        job_id, mail_from, subject, attachments = match.groups()
        lines.append(Line(job_id, json.loads(mail_from), json.loads(subject), int(attachments)))
    return lines


def assert_exit(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (
        f"exit status {result.returncode}, expected {code}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )


# -- the daemon -------------------------------------------------------------------------


def send(daemon: Daemon, subject: str, attachments: dict[str, bytes] | None = None) -> str:
    """Send one email with smtplib; return the job id of its 250."""
    message = EmailMessage()
    message["From"] = "Sender <sender@example.org>"
    message["To"] = "rcpt@example.com"
    message["Subject"] = subject
    message.set_content("Hello from the examples test.\n")
    for filename, content in (attachments or {}).items():
        message.add_attachment(
            content, maintype="application", subtype="octet-stream", filename=filename
        )
    with smtplib.SMTP(HOST, daemon.smtp_port, timeout=CLI_TIMEOUT) as smtp:
        smtp.ehlo("examples.e2e.test")
        smtp.mail("sender@example.org")
        smtp.rcpt("rcpt@example.com")
        code, text = smtp.data(message.as_bytes(policy=email.policy.SMTP))  # CRLF
    return queued_id(f"{code} {text.decode()}")


def stat(daemon: Daemon) -> dict[str, Any]:
    """The smtp pipeline's entry of ``trismtp jobs stat --json`` (with the token)."""
    result = run_cli(
        "jobs", "stat", "--json", "--config", str(daemon.config), "--url", daemon.url,
        cwd=daemon.workdir, check=True,
    )  # fmt: skip
    stats = {entry["pipeline"]: entry for entry in json.loads(result.stdout)}
    entry: dict[str, Any] = stats["smtp"]
    return entry


def assert_empty(daemon: Daemon) -> None:
    entry = stat(daemon)
    assert (entry["active"], entry["delayed"], entry["reserved"]) == (0, 0, 0), entry
    assert daemon.jobs() == []


# -- the tests --------------------------------------------------------------------------


def test_consumer_acks_every_job_once(consumer: Consumer, daemon: Daemon, tmp_path: Path) -> None:
    names = {EVIL_NAME: b"not so evil\n", "..\\..\\win.txt": b"windows\n", "..": b"dots\n"}
    sent = {
        send(daemon, "First, plain"): ("First, plain", 0),
        send(daemon, 'Café ✓ "quoted" / slash'): ('Café ✓ "quoted" / slash', 0),
        send(daemon, "With attachments", names): ("With attachments", 3),
    }
    with_files = next(i for i, (subject, _) in sent.items() if subject == "With attachments")
    stored = {job.id: job.payload for job in daemon.jobs()}
    # The daemon hands the sender's file names over as they are: the worker must clean them.
    assert [a["filename"] for a in stored[with_files]["attachments"]] == list(names)

    save_dir = tmp_path / "attachments"
    extra = ["--save-attachments", str(save_dir)] if consumer.name == "python" else []
    result = consumer.run(daemon.url, "--max", str(len(sent)), *extra, cwd=daemon.workdir)

    assert_exit(result, 0)
    lines = job_lines(result)
    # One line per job, each job once: nothing handed out twice.
    assert sorted(line.job_id for line in lines) == sorted(sent), result.stdout
    for line in lines:
        assert (line.subject, line.attachments) == sent[line.job_id]
        assert line.mail_from == "sender@example.org"
    # Every job acked: the pipeline is empty, nothing reserved, nothing delayed.
    assert_empty(daemon)

    if consumer.name == "python":
        # Each job's attachments in DIR/<job id>/, under their last path
        # component; ".." leaves nothing, so it gets a made-up name.
        job_dir = save_dir / with_files
        assert sorted(p.relative_to(save_dir) for p in save_dir.rglob("*")) == sorted(
            p.relative_to(save_dir) for p in [job_dir, *job_dir.iterdir()]
        )
        files = {p.name: p.read_bytes() for p in job_dir.iterdir()}
        made_up = [name for name in files if re.fullmatch(r"attachment-3(\.\w+)?", name)]
        assert len(made_up) == 1, files
        assert files == {
            "evil.txt": b"not so evil\n",
            "win.txt": b"windows\n",
            made_up[0]: b"dots\n",
        }
        # Nothing escaped, wherever "../../" would have led.
        for base in (job_dir, save_dir, daemon.workdir):
            assert not (base / EVIL_NAME).exists(), base / EVIL_NAME


def test_failing_job_is_given_back_and_comes_back(consumer: Consumer, daemon: Daemon) -> None:
    failing = send(daemon, "Fail me")
    others = {send(daemon, "Fine 1"), send(daemon, "Fine 2")}

    result = consumer.run(
        daemon.url, "--max", "3", "--fail-subject", "Fail me", "--retry-delay", "1",
        cwd=daemon.workdir,
    )  # fmt: skip

    assert_exit(result, 0)
    assert {line.job_id for line in job_lines(result)} == others
    assert f"job {failing} failed: giving it back" in result.stderr, result.stderr
    assert "--fail-subject" in result.stderr, result.stderr
    # Nacked with requeue: still stored, not leased, waiting for its retry (or ready).
    entry = stat(daemon)
    assert entry["reserved"] == 0, entry
    assert entry["active"] + entry["delayed"] == 1, entry
    assert [job.id for job in daemon.jobs()] == [failing]

    # It comes back: a consumer that does not fail it gets it (once its delay
    # has passed: the consumer polls until then) and acks it.
    again = consumer.run(daemon.url, "--max", "1", cwd=daemon.workdir)
    assert_exit(again, 0)
    assert [(line.job_id, line.subject) for line in job_lines(again)] == [(failing, "Fail me")]
    assert_empty(daemon)


def test_clear_errors(consumer: Consumer, daemon: Daemon) -> None:
    job_id = send(daemon, "Still here")
    cwd = daemon.workdir

    wrong = consumer.run(daemon.url, "--token", "wrong-token", cwd=cwd, token=None)
    assert_exit(wrong, 1)
    assert "refused the token (HTTP 401)" in wrong.stderr, wrong.stderr

    missing = consumer.run(daemon.url, cwd=cwd, token=None)
    assert_exit(missing, 1)
    assert "requires a token (HTTP 401)" in missing.stderr, missing.stderr

    nope = consumer.run(daemon.url, "--pipeline", "nope", cwd=cwd)
    assert_exit(nope, 1)
    assert "no such pipeline: nope (JSON-RPC error -32001)" in nope.stderr, nope.stderr

    refused = consumer.run(f"ws://{HOST}:{free_port()}/rpc", cwd=cwd)
    assert_exit(refused, 1)
    assert "connection refused" in refused.stderr.lower(), refused.stderr

    usage = consumer.run(daemon.url, "--max", "0", cwd=cwd)
    assert_exit(usage, 2)

    for result in (wrong, missing, nope, refused, usage):
        assert result.stdout == "", result.stdout  # no job lines; errors go to stderr
    # Nothing was taken: the job is still there, ready.
    entry = stat(daemon)
    assert (entry["active"], entry["reserved"]) == (1, 0), entry
    assert [job.id for job in daemon.jobs()] == [job_id]


def test_sigterm_stops_an_idle_consumer(consumer: Consumer, daemon: Daemon) -> None:
    stderr_path = daemon.workdir / f"{consumer.name}-consumer.err"
    with stderr_path.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [*consumer.argv, "--url", daemon.url, "--idle", "0.2"],
            cwd=daemon.workdir,
            env=Consumer.env(TOKEN),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:

        def log() -> str:
            return stderr_path.read_text(encoding="utf-8")

        # It says so once it is connected, with its signal handlers in place.
        wait_until(
            lambda: "connected to" in log(), CLI_TIMEOUT, "the consumer to connect", detail=log
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(CLI_TIMEOUT) == 0, log()
        assert "got SIGTERM: stopping" in log(), log()
        assert "done: 0 acked, 0 failed, 0 returned unstarted" in log(), log()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(CLI_TIMEOUT)


# -- the PHP WebSocket client against a fake server ------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        assert chunk, f"the client closed after {data!r}"
        data += chunk
    return data


def recv_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1)
        assert chunk, f"the client closed during the handshake: {data!r}"
        data += chunk
    return data


def read_client_frame(conn: socket.socket) -> tuple[bool, int, bytes]:
    """One frame from the client: FIN, opcode, unmasked payload. Clients must mask."""
    first, second = recv_exactly(conn, 2)
    assert second & 0x80, "a client frame is not masked"
    assert first & 0x70 == 0, "reserved bits set"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(conn, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(conn, 8))
    mask = recv_exactly(conn, 4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(recv_exactly(conn, length)))
    return bool(first & 0x80), first & 0x0F, payload


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked server frame, with the shortest length encoding."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([len(payload)])
    elif len(payload) < 65536:
        head += bytes([126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([127]) + struct.pack("!Q", len(payload))
    return head + payload


class FakeServer:
    """Accepts one connection on a thread and runs *script* on it; keeps its error."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(CLI_TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.script = script
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/rpc"

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(CLI_TIMEOUT)
                self.script(conn)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(CLI_TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive(), "the fake server is still running"
        if self.error is not None:
            raise self.error


@pytest.fixture
def fake_server() -> Iterator[Callable[[Callable[[socket.socket], None]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(script: Callable[[socket.socket], None]) -> FakeServer:
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.listener.close()


def accept_handshake(conn: socket.socket, *, accept: str | None = None) -> dict[str, str]:
    """Read the client's upgrade request, answer 101; return its headers."""
    request_line, *header_lines = recv_head(conn).decode().split("\r\n")
    assert request_line == "GET /rpc HTTP/1.1", request_line
    headers = {}
    for line in filter(None, header_lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    key = headers["sec-websocket-key"]
    assert len(base64.b64decode(key, validate=True)) == 16, key
    expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    conn.sendall(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept or expected}\r\n\r\n".encode()
    )
    return headers


def test_php_websocket_client_handles_fragments_and_pings(
    tmp_path: Path, fake_server: Callable[[Callable[[socket.socket], None]], FakeServer]
) -> None:
    php = Consumer("php", (require_tool("php"), str(PHP_CONSUMER)))
    job_id = "fragmented-job-1"
    email = {
        "uuid": job_id,
        "envelope": {"mail_from": "frag@example.org"},
        "message": {"subject": "Fragmented", "body": "x" * 70_000},
        "attachments": [],
    }
    job = {
        "job": "smtp.email",
        "id": job_id,
        "payload": json.dumps(email),
        "headers": {},
        "options": {"priority": 10, "pipeline": "smtp", "delay": 0, "auto_ack": False},
        "lease": {"token": "the-token", "attempt": 1, "expires_at": 1767225660.0},
    }
    seen: dict[str, Any] = {}

    def script(conn: socket.socket) -> None:
        headers = accept_handshake(conn)
        assert headers["upgrade"].lower() == "websocket"
        assert headers["sec-websocket-version"] == "13"
        assert headers["authorization"] == f"Bearer {TOKEN}"
        fin, opcode, payload = read_client_frame(conn)
        assert (fin, opcode) == (True, 0x1)
        request = json.loads(payload)
        seen["reserve"] = request
        reply = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {"jobs": [job]}})
        data = reply.encode()
        # Three fragments (7-, 16- and 64-bit lengths), a ping between them.
        conn.sendall(
            server_frame(0x9, b"before")
            + server_frame(0x1, data[:100], fin=False)
            + server_frame(0x9, b"between")
            + server_frame(0x0, data[100:1000], fin=False)
            + server_frame(0x0, data[1000:])
        )
        assert len(data[1000:]) > 65535
        assert read_client_frame(conn) == (True, 0xA, b"before")
        assert read_client_frame(conn) == (True, 0xA, b"between")
        fin, opcode, payload = read_client_frame(conn)
        assert (fin, opcode) == (True, 0x1)
        ack = json.loads(payload)
        seen["ack"] = ack
        conn.sendall(
            server_frame(
                0x1,
                json.dumps({"jsonrpc": "2.0", "id": ack["id"], "result": {"acked": 1}}).encode(),
            )
        )
        fin, opcode, payload = read_client_frame(conn)
        assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1000)), (opcode, payload)
        conn.sendall(server_frame(0x8, payload[:2]))

    server = fake_server(script)
    result = php.run(server.url, "--max", "1", cwd=tmp_path)
    server.join()

    assert_exit(result, 0)
    assert job_lines(result) == [Line(job_id, "frag@example.org", "Fragmented", 0)]
    assert seen["reserve"]["method"] == "jobs.Reserve"
    assert seen["reserve"]["params"] == {"pipeline": "smtp", "max": 1, "lease": 60.0}
    assert seen["ack"]["method"] == "jobs.Ack"
    assert seen["ack"]["params"] == {"jobs": [{"id": job_id, "token": "the-token"}]}
    assert seen["ack"]["id"] != seen["reserve"]["id"]


def test_php_websocket_client_checks_the_accept_header(
    tmp_path: Path, fake_server: Callable[[Callable[[socket.socket], None]], FakeServer]
) -> None:
    php = Consumer("php", (require_tool("php"), str(PHP_CONSUMER)))

    def script(conn: socket.socket) -> None:
        accept_handshake(conn, accept=base64.b64encode(b"x" * 20).decode())
        assert conn.recv(1) == b"", "the client should hang up"

    server = fake_server(script)
    result = php.run(server.url, cwd=tmp_path)
    server.join()

    assert_exit(result, 1)
    assert "wrong Sec-WebSocket-Accept" in result.stderr, result.stderr
