"""The by-hand peer: aiosmtpd 1.4.6, parse with ``email``, JSON payload, SQLite FULL commit, 250.

Usage: ``python -m bench.aiosmtpd_sqlite --port 2526 --database jobs.sqlite3``;
stops on SIGTERM or SIGINT. It binds 127.0.0.1 only.

What a Python team writes when it turns mail into rows by hand, written the
plain way on purpose (it is the peer of issue 16, not something to tune):
the handler parses the message with ``email.message_from_bytes(…,
policy=policy.default)``, builds a JSON payload (subject, from, to, the text
body, the attachments in base64), and INSERTs and COMMITs it in SQLite (WAL,
``synchronous=FULL``) in a worker thread (``asyncio.to_thread``) before it
answers 250. One connection, shared under a lock, one transaction per message.
The table is called ``jobs`` so that the harness counts its rows the same way
as trismtp's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sqlite3
import sys
import threading
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from bench import aiosmtpd_null

__all__ = ["SqliteHandler", "build_payload", "main", "serve"]


def build_payload(raw: bytes, envelope: Envelope) -> dict[str, Any]:
    """The JSON payload of one message: envelope, subject, from, to, text body, attachments."""
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    body = msg.get_body(preferencelist=("plain", "html"))
    attachments = []
    for part in msg.iter_attachments():
        content = part.get_payload(decode=True) or b""
        assert isinstance(content, bytes)
        attachments.append(
            {
                "filename": part.get_filename() or "unnamed",
                "content_type": part.get_content_type(),
                "size": len(content),
                "content": base64.b64encode(content).decode("ascii"),
            }
        )
    return {
        "mail_from": envelope.mail_from,
        "rcpt_tos": envelope.rcpt_tos,
        "message_id": msg.get("Message-ID"),
        "subject": msg.get("Subject", ""),
        "from": msg.get("From", ""),
        "to": msg.get("To", ""),
        "text": body.get_content() if body is not None else "",
        "attachments": attachments,
    }


class SqliteHandler:
    """Parses, encodes and commits each message before its 250."""

    def __init__(self, database: Path) -> None:
        self.db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
        )
        self.lock = threading.Lock()

    def store(self, payload: str) -> None:
        """INSERT and COMMIT one row (runs in a worker thread)."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO jobs (payload) VALUES (?)", (payload,))
            self.db.execute("COMMIT")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        payload = json.dumps(build_payload(raw, envelope))
        await asyncio.to_thread(self.store, payload)
        return "250 2.0.0 OK"


async def serve(port: int, backlog: int, database: Path) -> None:
    """Listen on 127.0.0.1:*port* until SIGTERM or SIGINT, as the null peer does."""
    handler = SqliteHandler(database)
    try:
        await aiosmtpd_null.serve(port, backlog, handler)
    finally:
        handler.db.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--database", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.backlog, args.database))
    return 0


if __name__ == "__main__":
    sys.exit(main())
