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
    RepeatLimiter,
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


# -- repeated warnings ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(window: float = 10.0) -> tuple[RepeatLimiter, FakeClock, list[str]]:
    clock = FakeClock()
    logger = logging.getLogger(f"{LOGGER}.repeats")
    logger.propagate = False
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            assert record.levelno == logging.WARNING
            lines.append(record.getMessage())

    logger.handlers[:] = [Collect()]
    return RepeatLimiter(logger, window=window, clock=clock), clock, lines


def test_a_flood_of_one_cause_gives_two_lines_that_count_every_occurrence() -> None:
    limiter, clock, lines = limited()
    for n in range(1000):
        clock.now += 0.005
        limiter.warning("bad token", "refused %s: wrong token", f"peer{n}")
    limiter.flush()  # the window is not over yet: nothing
    assert lines == ["refused peer0: wrong token"]

    clock.now += 10
    limiter.flush()

    assert lines == [
        "refused peer0: wrong token",
        "refused peer999: wrong token (and 998 more like it in the last 15.0 s)",
    ]
    limiter.flush()  # said once
    assert len(lines) == 2


def test_causes_are_limited_separately_and_a_quiet_cause_logs_at_once_again() -> None:
    limiter, clock, lines = limited()
    limiter.warning("a", "a %d", 1)
    limiter.warning("b", "b %d", 1)
    limiter.warning("a", "a %d", 2)
    clock.now += 11
    limiter.flush()
    assert lines == ["a 1", "b 1", "a 2"]  # one held line stands for itself alone

    clock.now += 11
    limiter.flush()  # both quiet for a whole window: forgotten
    limiter.warning("b", "b %d", 2)
    assert lines[-1] == "b 2"


def test_the_next_line_after_the_window_carries_the_count() -> None:
    limiter, clock, lines = limited()
    for n in range(5):
        limiter.warning("x", "x %d", n)
    clock.now += 12
    limiter.warning("x", "x %d", 5)
    assert lines == ["x 0", "x 5 (and 4 more like it in the last 12.0 s)"]


def test_a_final_flush_reports_what_is_held_before_the_window_ends() -> None:
    limiter, clock, lines = limited()
    limiter.warning("x", "x %d", 0)
    limiter.warning("x", "x %d", 1)
    limiter.warning("x", "x %d", 2)
    clock.now += 1
    limiter.flush(final=True)
    assert lines == ["x 0", "x 2 (and 1 more like it in the last 1.0 s)"]
