"""Log setup: the session filter, the console and JSON formats, and the context in trio."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import trio

from trismtp.log import (
    ConsoleFormatter,
    JsonFormatter,
    SessionFilter,
    current_session,
    reset_session,
    set_session,
    setup_logging,
)
from trismtp.settings import LogSettings

LOGGER = "trismtp.test_log"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (setup_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    """A logger of its own writing through a SessionFilter and *formatter* to a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(SessionFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"{LOGGER}.{id(buffer)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, buffer


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    lines = buffer.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def session_fields(record: logging.LogRecord) -> tuple[object, object]:
    """What the filter set on *record* ("unset" for nothing)."""
    return vars(record).get("session", "unset"), vars(record).get("remote", "unset")


def test_the_filter_adds_session_and_remote_or_none() -> None:
    record = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, "hello", None, None)
    assert SessionFilter().filter(record)
    assert session_fields(record) == (None, None)
    token = set_session(12, "192.0.2.7:4000")
    try:
        assert current_session() == (12, "192.0.2.7:4000")
        assert SessionFilter().filter(record)
        assert session_fields(record) == (12, "192.0.2.7:4000")
    finally:
        reset_session(token)
    assert current_session() is None


def test_console_lines_show_the_session_tag_only_in_a_session() -> None:
    logger, buffer = capture(ConsoleFormatter())
    logger.info("outside")
    token = set_session(7, "192.0.2.7:4000")
    try:
        logger.info("inside %s", "a session")
    finally:
        reset_session(token)
    outside, inside = buffer.getvalue().splitlines()
    assert outside.endswith(f"INFO    {logger.name}: outside")
    assert "[s" not in outside
    assert inside.endswith(f"INFO    {logger.name}: [s7] inside a session")


def test_json_lines_have_session_fields_only_in_a_session() -> None:
    logger, buffer = capture(JsonFormatter())
    logger.warning("outside")
    token = set_session(7, "[2001:db8::1]:4000")
    try:
        logger.info("inside\nwith a newline")
    finally:
        reset_session(token)
    assert len(buffer.getvalue().splitlines()) == 2  # one object a line
    outside, inside = json_lines(buffer)
    assert list(outside) == ["time", "level", "logger", "message"]
    assert outside["level"] == "warning"
    assert outside["message"] == "outside"
    assert list(inside) == ["time", "level", "logger", "session", "remote", "message"]
    assert inside["session"] == 7
    assert inside["remote"] == "[2001:db8::1]:4000"
    assert inside["message"] == "inside\nwith a newline"


def fail() -> None:
    raise ValueError("broken")


def test_json_lines_carry_the_exception() -> None:
    logger, buffer = capture(JsonFormatter())
    try:
        fail()
    except ValueError:
        logger.exception("it failed")
    [entry] = json_lines(buffer)
    assert entry["message"] == "it failed"
    exception = entry["exception"]
    assert isinstance(exception, str)
    assert "ValueError: broken" in exception


async def test_each_trio_task_logs_its_own_session() -> None:
    """trio copies the context into each task: a session set in one task is
    seen by what it logs and by the threads it starts, and not by its siblings
    or its parent."""
    logger, buffer = capture(JsonFormatter())

    async def session(session_id: int, started: trio.Event, go: trio.Event) -> None:
        set_session(session_id, f"192.0.2.{session_id}:25")
        started.set()
        await go.wait()  # both sessions are set before either logs
        logger.info("task %d", session_id)
        await trio.to_thread.run_sync(logger.info, f"thread {session_id}")

    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for session_id in (1, 2):
            started = trio.Event()
            nursery.start_soon(session, session_id, started, go)
            await started.wait()
        logger.info("parent")
        go.set()
    entries = json_lines(buffer)
    by_message = {entry["message"]: entry for entry in entries}
    assert "session" not in by_message["parent"]
    for session_id in (1, 2):
        for message in (f"task {session_id}", f"thread {session_id}"):
            assert by_message[message]["session"] == session_id
            assert by_message[message]["remote"] == f"192.0.2.{session_id}:25"
    assert current_session() is None


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_setup_logging_installs_the_filter(root_logger: logging.Logger, fmt: str) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings.model_validate({"level": "debug", "format": fmt}), stream)
    token = set_session(3, "192.0.2.3:25")
    try:
        logging.getLogger(LOGGER).debug("hello")
    finally:
        reset_session(token)
    line = stream.getvalue().strip()
    if fmt == "json":
        entry = json.loads(line)
        assert (entry["session"], entry["remote"], entry["message"]) == (3, "192.0.2.3:25", "hello")
    else:
        assert line.endswith(f"DEBUG   {LOGGER}: [s3] hello")


def test_setup_logging_level(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="warning"), stream)
    logging.getLogger(LOGGER).info("not shown")
    logging.getLogger(LOGGER).warning("shown")
    assert stream.getvalue().count("\n") == 1
    assert "shown" in stream.getvalue()
