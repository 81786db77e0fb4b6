"""Floods of the same warning through the real daemon: a few lines that count them all.

1,000 WebSocket handshakes with a wrong token, and 300 SMTP connections over
the per-address limit, each used to give one WARNING line. Now the first
line of a cause goes out at once, the rest are counted and summed up in one
line when the 10 s window ends.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from .trismtp_e2e import HOST, Daemon, launcher, wait_until

pytestmark = pytest.mark.e2e

HANDSHAKES = 1000
REFUSED = 300
WINDOW = 10.0
MORE_RE = re.compile(r"\(and (\d+) more like it in the last [\d.]+ s\)")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    settings: dict[str, dict[str, Any]] = {
        "jobs_service": {"token": "the-right-token"},
        # Loopback is exempt by default; here it is an ordinary client.
        "smtp": {"limits": {"exempt_networks": [], "max_connections_per_address": 1}},
        "log": {"level": "info"},
    }
    with launcher(tmp_path_factory.mktemp("repeats")) as launch:
        yield launch.daemon(settings)


def handshake_status(port: int, token: str) -> int:
    """The HTTP status of one WebSocket handshake with *token*, on a socket of its own."""
    request = (
        f"GET /rpc HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed without a status line: {head!r}"
            head += chunk
    return int(head.split(b" ", 2)[1])


def warnings_with(daemon: Daemon, text: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if " WARNING " in line and text in line]


def counted(lines: list[str]) -> int:
    """How many occurrences *lines* stand for: one each, plus each line's "N more"."""
    return sum(1 + sum(int(n) for n in MORE_RE.findall(line)) for line in lines)


def test_a_thousand_wrong_tokens_give_two_warning_lines(daemon: Daemon) -> None:
    for _ in range(HANDSHAKES):
        assert handshake_status(daemon.jobs_port, "wrong") == 401

    def lines() -> list[str]:
        return warnings_with(daemon, "missing or wrong token")

    wait_until(lambda: counted(lines()) >= HANDSHAKES, WINDOW + 10, "the count line")
    assert len(lines()) == 2, lines()
    assert counted(lines()) == HANDSHAKES, lines()
    assert "the-right-token" not in daemon.log_text()


def test_refused_smtp_connections_are_counted_not_each_logged(daemon: Daemon) -> None:
    with daemon.connect() as held:
        held.start()
        with ExitStack() as stack:
            for _ in range(REFUSED):
                conn = stack.enter_context(daemon.connect())
                assert conn.reply().last.startswith("421 4.7.0"), "over the per-address limit"
        held.quit()

    def refusals() -> list[str]:
        return warnings_with(daemon, "refusing 127.0.0.1:")

    wait_until(lambda: counted(refusals()) >= REFUSED, WINDOW + 10, "the count line")
    assert len(refusals()) == 2, refusals()
    assert counted(refusals()) == REFUSED, refusals()
