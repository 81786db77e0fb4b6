"""Logging setup: human-readable console lines or one JSON object a line.

Every line an SMTP session logs carries the session's id and the client's
address, without each call saying so. The SMTP server calls
:func:`set_session` at the start of a connection's task; the value lives in
a :class:`~contextvars.ContextVar`, and trio gives every task a copy of its
parent's context, so it is seen by everything that task logs (and by tasks
and worker threads it starts) and by nothing else. :class:`SessionFilter`,
on the handler, copies it into each record as ``session`` and ``remote``;
lines logged outside a session (startup, the pusher) get ``None`` and show
neither. The console shows ``[s12]`` before the message; JSON lines get
``"session": 12, "remote": "203.0.113.5:53211"`` fields.

Repeated warnings. A flood (1,000 handshakes with a wrong token, a client
that reconnects in a loop) must not turn into 1,000 WARNING lines that bury
everything else. Where a warning can repeat, the code logs it through a
:class:`RepeatLimiter` with a *cause*: the first line for a cause goes out at
once, later ones within ``window`` seconds are counted instead, and when the
window ends one line stands for them: the last of them, with
``(and 998 more like it in the last 10 s)``. So a flood costs two lines per
cause per window, and no occurrence goes uncounted.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import trio

from trismtp.settings import LogSettings

__all__ = [
    "ConsoleFormatter",
    "JsonFormatter",
    "RepeatLimiter",
    "SessionFilter",
    "current_session",
    "reset_session",
    "set_session",
    "set_worker",
    "setup_logging",
]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(session_tag)s%(message)s"

_session: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "trismtp_session", default=None
)


_worker: int | None = None


def set_worker(index: int) -> None:
    """Tag every line this process logs with its worker number (``smtp.workers`` > 1).

    The primary process is worker 0 and stays untagged, so that a daemon
    with one worker logs exactly as before.
    """
    global _worker
    _worker = index or None


def set_session(session_id: int, remote: str) -> contextvars.Token[tuple[int, str] | None]:
    """Tag what the current task logs from now on with a session id and client address.

    Returns the token for :func:`reset_session`.
    """
    return _session.set((session_id, remote))


def reset_session(token: contextvars.Token[tuple[int, str] | None]) -> None:
    """Undo :func:`set_session`."""
    _session.reset(token)


def current_session() -> tuple[int, str] | None:
    """``(session id, remote)`` of the session the current task serves, if any."""
    return _session.get()


class SessionFilter(logging.Filter):
    """Adds ``session`` (int or None) and ``remote`` (str or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _session.get()
        if current is None:
            record.session = record.remote = None
        else:
            record.session, record.remote = current
        return True


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: [s12] message``; the tag only on a session's lines."""

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session", None)
        tag = f"s{session}" if session is not None else ""
        if _worker is not None:
            tag = f"w{_worker} {tag}" if tag else f"w{_worker}"
        record.session_tag = f"[{tag}] " if tag else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, session and remote
    (on a session's lines), message, and exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if _worker is not None:
            entry["worker"] = _worker
        session = getattr(record, "session", None)
        if session is not None:
            entry["session"] = session
            entry["remote"] = getattr(record, "remote", None)
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # A message with a newline stays on one line: json.dumps escapes it.
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Configure the root logger once, from ``[log]``; logs go to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SessionFilter())
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[settings.level])
    # trio-websocket logs every frame at debug; that is noise for operators.
    logging.getLogger("trio-websocket").setLevel(max(logging.INFO, _LEVELS[settings.level]))


@dataclass(slots=True)
class _Cause:
    since: float  # when the last line for this cause was logged
    held: int = 0  # lines counted since then, not logged
    last: tuple[str, tuple[Any, ...]] | None = None  # the last of them


class RepeatLimiter:
    """At most one WARNING line per cause every *window* seconds, and a count of the rest.

    ``limiter.warning("bad token", "refused %s: wrong token", peer)`` logs at
    once the first time; within the next *window* seconds further calls with
    the same cause are only counted. The count comes out with the next line
    for that cause after the window, or from :meth:`flush` (which :meth:`run`
    calls every second) when the flood has stopped. A cause is a
    short fixed string, never a client's address: the set of causes stays
    small.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._window = window
        self._clock = clock
        self._causes: dict[str, _Cause] = {}

    def warning(self, cause: str, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at WARNING unless *cause* was logged less than a window ago."""
        now = self._clock()
        state = self._causes.get(cause)
        if state is None:
            self._causes[cause] = _Cause(since=now)
            self._logger.warning(msg, *args)
            return
        if now - state.since < self._window:
            state.held += 1
            state.last = (msg, args)
            return
        self._emit(msg, args, state.held, now - state.since)
        state.since, state.held, state.last = now, 0, None

    def flush(self, *, final: bool = False) -> None:
        """Log the count of every cause whose window is over; forget the quiet ones.

        *final* (the owner is stopping): log every count now, window over or not.
        """
        now = self._clock()
        for cause, state in list(self._causes.items()):
            if now - state.since < self._window and not (final and state.last):
                continue
            if state.last is None:
                del self._causes[cause]  # quiet for a whole window
                continue
            msg, args = state.last
            # The last held line stands for itself and the others.
            self._emit(msg, args, state.held - 1, now - state.since)
            state.since, state.held, state.last = now, 0, None

    async def run(self) -> NoReturn:
        """Flush for ever (a task of the component that owns the limiter).

        Every second, so that a count comes out within a second of its window's
        end; a flush with nothing due costs a look at a handful of causes.
        """
        while True:
            await trio.sleep(min(1.0, self._window))
            self.flush()

    def _emit(self, msg: str, args: tuple[Any, ...], more: int, elapsed: float) -> None:
        if more > 0:
            msg = f"{msg} (and %d more like it in the last %.1f s)"
            args = (*args, more, elapsed)
        self._logger.warning(msg, *args)
