"""Fixtures of the fault suite: the e2e launcher, with stopped processes woken first.

Every process a scenario starts goes through the :class:`Launcher` of the e2e
suite, and is stopped by its PID when the test ends, pass or fail. A scenario
may leave a process SIGSTOPped; it gets SIGCONT before SIGTERM, so that it
can stop gracefully rather than wait for the SIGKILL.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from ..e2e.trismtp_e2e import Launcher, launcher


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault-injection scenario (kills, stalls, drops, full disk)"
    )
    config.addinivalue_line("markers", "slow: long benchmark-like test; run with TRISMTP_SLOW=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("TRISMTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set TRISMTP_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start daemons and jobs services; all are woken and stopped by PID afterwards."""
    with launcher(tmp_path) as launch:
        try:
            yield launch
        finally:
            for process in launch.group.processes:
                if process.running:
                    with suppress(ProcessLookupError):
                        process.signal(signal.SIGCONT)
