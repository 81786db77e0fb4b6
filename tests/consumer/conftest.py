"""The consumer library's tests run under both anyio backends, beside pytest-trio.

The project runs pytest-trio in trio mode, which marks every async test as a
trio test. These tests are marked ``anyio`` instead (``pytestmark`` in each
module), and the hook below takes the ``trio`` mark off them again, so that
anyio's plugin runs each one twice, under asyncio and under trio (the
``anyio_backend`` fixture). They use no async fixtures: pytest-trio would
claim those too; their fixtures are synchronous (real processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.trismtp_e2e import Launcher, launcher


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Each anyio test runs on asyncio and on trio."""
    backend: str = request.param
    return backend


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Undo pytest-trio's trio mode for the anyio tests (it ran before us)."""
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers[:] = [mark for mark in item.own_markers if mark.name != "trio"]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start jobs services (`trismtp jobs serve`); all are stopped by PID after the test."""
    with launcher(tmp_path) as launch:
        yield launch
