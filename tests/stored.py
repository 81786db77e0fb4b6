"""A job's payload as the jobs database holds it, read the way an operator
would: with sqlite3, and from the file beside the database for a big one
(docs/operations.md, "Backups")."""

from __future__ import annotations

import json
from pathlib import Path


def payload_of(database: Path | str, payload: str, payload_file: str | None) -> str:
    """The payload of a ``jobs`` row from its ``payload`` and ``payload_file`` columns
    (a file holds the payload as a JSON string)."""
    if payload_file is None:
        return payload
    text: str = json.loads((Path(f"{database}-payloads") / payload_file).read_bytes())
    return text
