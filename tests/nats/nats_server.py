"""A real ``nats-server`` for the NATS tests, with JetStream and a WebSocket listener.

Test modules import this (``from .nats_server import …``). The rules of the
end-to-end suite hold here too: the server binds 127.0.0.1 on ports found free,
each wait polls a condition until a deadline, and the process is stopped by its
PID. Without nats-server the test is skipped, and fails when CI=true
(:func:`~tests.e2e.trismtp_e2e.require_tool`).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

from ..e2e.trismtp_e2e import HOST, free_port, require_tool, wait_until

START_TIMEOUT = 20.0
"""Seconds nats-server gets to accept WebSocket connections."""
STOP_TIMEOUT = 10.0


class NatsServer:
    """One nats-server process; its configuration, store and log live in *workdir*."""

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = "",
        password: str = "",
        ping_interval: str = "",
        ping_max: int = 2,
        max_payload: int = 0,
    ) -> None:
        self.binary = require_tool("nats-server")
        self.workdir = workdir
        self.user = user
        self.password = password
        self.ping_interval = ping_interval
        self.ping_max = ping_max
        self.max_payload = max_payload
        self.port = free_port()
        self.ws_port = free_port()
        self.log_path = workdir / "nats-server.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What :meth:`trismtp.nats.NatsClient.connect` takes."""
        return f"nats+ws://{HOST}:{self.ws_port}"

    @property
    def ws_url(self) -> str:
        """The same listener for a bare trio-websocket connection."""
        return f"ws://{HOST}:{self.ws_port}/"

    def config_text(self) -> str:
        store = self.workdir / "jetstream"
        lines = [
            f"listen: {HOST}:{self.port}",
            f"jetstream {{ store_dir: {str(store)!r}, max_memory_store: 64MB, "
            "max_file_store: 256MB }",
            f'websocket {{ listen: "{HOST}:{self.ws_port}", no_tls: true }}',
        ]
        if self.ping_interval:
            lines += [f'ping_interval: "{self.ping_interval}"', f"ping_max: {self.ping_max}"]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.user:
            lines.append(f'authorization {{ user: "{self.user}", password: "{self.password}" }}')
        return "\n".join(lines) + "\n"

    def start(self) -> NatsServer:
        """Start the server; return once its WebSocket port accepts connections."""
        config = self.workdir / "nats-server.conf"
        config.write_text(self.config_text(), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [self.binary, "-c", str(config)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, START_TIMEOUT, "nats-server to listen", detail=self.log_tail)
        return self

    def _ready(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(
                f"nats-server exited with {self.popen.returncode}\n{self.log_tail()}"
            )
        if "Server is ready" not in self.log_text():
            return False
        try:
            with socket.create_connection((HOST, self.ws_port), timeout=1.0):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.popen is not None, "nats-server was never started"
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL by PID, and reap: the server vanishes without a goodbye."""
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers. Safe to call twice."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class NatsServers:
    """nats-servers made for one test (not started), all stopped by PID afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[NatsServer] = []

    def new(self, **kwargs: Any) -> NatsServer:
        workdir = self.workdir / f"nats{len(self.servers) + 1}"
        workdir.mkdir()
        server = NatsServer(workdir, **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
            print(f"----- nats-server {server.workdir.name} -----\n{server.log_tail()}")
