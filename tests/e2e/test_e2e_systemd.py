"""Type=notify: the daemon tells systemd READY=1 once it listens, STOPPING=1 on SIGTERM.

A real AF_UNIX datagram socket stands in for systemd's notification socket,
as ``$NOTIFY_SOCKET`` names it; the daemon is the real binary.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from trismtp.systemd import notify

from .trismtp_e2e import HOST, launcher

pytestmark = pytest.mark.e2e


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound where $NOTIFY_SOCKET (inherited by the daemon) points."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def receive(sock: socket.socket) -> dict[str, str]:
    """One notification as its KEY=VALUE lines."""
    data = sock.recv(4096).decode()
    return dict(line.partition("=")[::2] for line in data.splitlines())


def test_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    with launcher(tmp_path) as launch:
        daemon = launch.daemon(start=False)
        daemon.start(wait=False)
        ready = receive(notify_socket)
        assert ready.get("READY") == "1", ready
        assert str(daemon.smtp_port) in ready.get("STATUS", ""), ready
        # READY=1 means it accepts mail now: the greeting is there at once.
        with socket.create_connection((HOST, daemon.smtp_port), timeout=5) as client:
            assert client.recv(100).startswith(b"220 ")
        daemon.signal(signal.SIGTERM)
        stopping = receive(notify_socket)
        assert stopping.get("STOPPING") == "1", stopping
        assert daemon.wait_exit(30) == 0


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trismtp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=ok")
        assert receive(sock) == {"READY": "1", "STATUS": "ok"}


def test_without_systemd_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")


def test_unreachable_socket_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify("READY=1")
