"""Fixtures of the end-to-end suite.

The helpers (``Daemon``, ``JobsService``, ``require_tool``, the raw SMTP
client…) live in ``trismtp_e2e.py`` next to this file, so that test modules
can import them (``from .trismtp_e2e import …``); they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..nats.nats_server import NatsServers
from .trismtp_e2e import (
    Daemon,
    JobsService,
    Launcher,
    launcher,
    require_tool,
)

__all__ = ["Daemon", "JobsService", "Launcher", "require_tool"]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start daemons and jobs services; all are stopped (by PID) after the test."""
    with launcher(tmp_path) as launch:
        yield launch


@pytest.fixture
def daemon(launch: Launcher) -> Daemon:
    """A running daemon with default test settings (embedded jobs service)."""
    return launch.daemon()


@pytest.fixture
def nats_servers(tmp_path: Path) -> Iterator[NatsServers]:
    """Request it before ``launch``: the daemons are then stopped first."""
    servers = NatsServers(tmp_path)
    try:
        yield servers
    finally:
        servers.close()
