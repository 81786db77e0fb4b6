"""Turn the fault suite's JSON-lines report into a markdown table.

    TRISMTP_FAULT_REPORT=faults.jsonl .venv/bin/pytest tests/faults
    python -m tests.faults.report faults.jsonl

Each line of the file is one scenario's summary (see ``harness.FaultSummary``);
a scenario run several times appears once per run, in file order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "main", "markdown"]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("scenario", "scenario"),
    ("clients", "clients"),
    ("messages", "messages"),
    ("acked", "acked (250)"),
    ("stored", "stored"),
    ("lost", "lost acked"),
    ("dup_acked", "dup. acked"),
    ("replies_451", "451s"),
    ("dup_messages", "dup. messages (451, stored)"),
    ("stored_unacked", "stored w/o 250"),
    ("unanswered", "unanswered"),
    ("max_latency_451", "max 451 latency (s)"),
    ("max_latency_250", "max 250 latency (s)"),
    ("duration", "load (s)"),
    ("extra", "notes"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "extra":
        return ", ".join(f"{k}={_cell('', v)}" for k, v in value.items()) or ""
    if isinstance(value, float):
        return f"{round(value, 3):g}"
    return str(value).replace("|", "\\|")


def markdown(summaries: Iterable[dict[str, Any]]) -> str:
    """The table: one row per summary, the columns of :data:`COLUMNS`."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|"
        + "|".join("---" if key in ("scenario", "extra") else "--:" for key, _ in COLUMNS)
        + "|",
    ]
    for summary in summaries:
        cells = (_cell(key, summary.get(key)) for key, _ in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read(path: Path) -> list[dict[str, Any]]:
    """The summaries in *path*, one JSON object a line (blank lines skipped)."""
    out: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError(f"{path}:{number}: not a JSON object")
        out.append(data)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m tests.faults.report FILE.jsonl", file=sys.stderr)
        return 2
    try:
        summaries = read(Path(args[0]))
    except (OSError, ValueError, TypeError) as exc:
        print(f"tests.faults.report: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
