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
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import TextIO

from trismtp.settings import LogSettings

__all__ = [
    "ConsoleFormatter",
    "JsonFormatter",
    "SessionFilter",
    "current_session",
    "reset_session",
    "set_session",
    "setup_logging",
]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(session_tag)s%(message)s"

_session: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "trismtp_session", default=None
)


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
        record.session_tag = f"[s{session}] " if session is not None else ""
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
