"""The markdown table of ``python -m tests.faults.report``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import FaultSummary
from .report import COLUMNS, markdown

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]


def _summary(scenario: str, **extra: object) -> FaultSummary:
    return FaultSummary(
        scenario=scenario,
        clients=8,
        messages=120,
        acked=113,
        stored=115,
        lost=0,
        dup_acked=0,
        replies_451=9,
        dup_messages=2,
        stored_unacked=2,
        unanswered=0,
        max_latency_451=1.0456,
        max_latency_250=None,
        duration=4.2,
        extra=dict(extra),
    )


def test_markdown_has_a_row_per_summary_and_every_column() -> None:
    rows = [
        json.loads(_summary("a | b", rss_peak_mib=96.1).to_json()),
        json.loads(_summary("c").to_json()),
    ]
    table = markdown(rows).splitlines()
    assert len(table) == 2 + 2
    assert table[0].count("|") == len(COLUMNS) + 1
    assert "a \\| b" in table[2]
    assert "| 1.046 |" in table[2]  # rounded to ms
    assert "| – |" in table[2]  # None
    assert "rss_peak_mib=96.1" in table[2]


def test_runs_as_a_module(tmp_path: Path) -> None:
    report = tmp_path / "faults.jsonl"
    report.write_text(_summary("1 something").to_json() + "\n\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "tests.faults.report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| scenario |")
    assert "| 1 something | 8 | 120 | 113 |" in result.stdout
