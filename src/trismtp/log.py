"""Logging setup: human-readable console lines or one JSON object a line."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

from trismtp.settings import LogSettings

__all__ = ["setup_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Configure the root logger once, from ``[log]``; logs go to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[settings.level])
    # trio-websocket logs every frame at debug; that is noise for operators.
    logging.getLogger("trio-websocket").setLevel(max(logging.INFO, _LEVELS[settings.level]))
