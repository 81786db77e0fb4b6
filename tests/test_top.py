"""trismtp top: rates, quantiles and the screen, from two reads of /metrics."""

from __future__ import annotations

import io

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from trismtp.metrics import Metrics
from trismtp.top import Sample, View, parse, quantile, render, run


def sample(metrics: Metrics, at: float) -> Sample:
    return parse(generate_latest(metrics.registry).decode(), at)


def test_quantile_interpolates_within_the_bucket() -> None:
    buckets = [(0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.75, buckets) == pytest.approx(0.055)
    assert quantile(0.99, buckets) == pytest.approx(0.0982)
    assert quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_view_shows_what_changed_between_two_reads() -> None:
    metrics = Metrics()
    before = sample(metrics, at=10.0)
    for _ in range(30):
        metrics.message_answered(250)
    metrics.message_answered(451)
    metrics.message_answered(554)
    for latency in [0.004] * 29 + [0.2]:
        metrics.job_acked(latency)
    metrics.batch_acked(30)
    view = View.between(before, sample(metrics, at=12.0))
    assert view.messages_per_second == pytest.approx(16.0)
    assert view.by_code == {"250": 15.0, "451": 0.5, "554": 0.5}
    assert view.latency_average == pytest.approx((29 * 0.004 + 0.2) / 30)
    assert view.latency_p99 is not None
    assert 0.1 < view.latency_p99 <= 0.25
    assert view.batch_average == pytest.approx(30.0)
    assert view.problems == {"451 replies": 1.0}
    screen = io.StringIO()
    Console(file=screen, width=80).print(render(view, "http://x/metrics"))
    text = screen.getvalue()
    assert "messages/s" in text
    assert "16.0" in text
    assert "451 replies" in text


def test_run_once_reads_twice_and_prints_one_screen() -> None:
    metrics = Metrics()
    reads: list[str] = []

    def read(url: str) -> Sample:
        reads.append(url)
        if len(reads) == 2:
            metrics.message_answered(250)
        return sample(metrics, at=float(len(reads)))

    screen = io.StringIO()
    run("http://d/metrics", 0.01, once=True, console=Console(file=screen, width=80), read=read)
    assert reads == ["http://d/metrics", "http://d/metrics"]
    assert "250/s" in screen.getvalue()
    assert "errors" in screen.getvalue()
    assert "none" in screen.getvalue()
