"""``trismtp top``: a live view of a running daemon, from its ``/metrics``.

The daemon already counts everything an operator looks at (see
:mod:`trismtp.metrics`); this reads its Prometheus endpoint every
``interval`` seconds and shows what changed since the last read: messages a
second by reply code, connections, the pusher's queue and push latency, and
the errors worth a look. Rates need two reads, so the first screen comes
after one interval. Nothing here talks to the daemon any other way, so it
works on any trismtp with ``[metrics] listen`` set, local or not.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Sample", "View", "fetch", "quantile", "render", "run"]

FETCH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Sample:
    """One read of ``/metrics``: every series by name and labels, and when."""

    at: float
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        """The value of one series (0 when absent)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **where: str) -> float:
        """The sum of every series of ``name`` whose labels include ``where``."""
        wanted = set(where.items())
        return sum(v for (n, labels), v in self.values.items() if n == name and wanted <= labels)

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        """Every series of ``name`` with its labels."""
        for (n, labels), value in self.values.items():
            if n == name:
                yield dict(labels), value


def parse(text: str, at: float) -> Sample:
    """A :class:`Sample` from the Prometheus text format."""
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return Sample(at, values)


def fetch(url: str) -> Sample:
    """Read ``url`` (a daemon's ``/metrics``)."""
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:
        text = response.read().decode("utf-8")
    return parse(text, time.monotonic())


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count).

    Linear within the bucket, as Prometheus' ``histogram_quantile`` does;
    None without observations.
    """
    points = sorted(buckets)
    if not points or points[-1][1] <= 0:
        return None
    rank = q * points[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in points:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class View:
    """What changed between two samples, as the screen shows it."""

    seconds: float
    messages_per_second: float
    by_code: dict[str, float]
    connections_open: float
    connections_per_second: float
    queue_depth: float
    connected: bool
    latency_average: float | None
    latency_p99: float | None
    batch_average: float | None
    problems: dict[str, float]

    @classmethod
    def between(cls, before: Sample, after: Sample) -> View:
        seconds = max(after.at - before.at, 1e-9)

        def delta(name: str, **where: str) -> float:
            return max(0.0, after.total(name, **where) - before.total(name, **where))

        by_code: dict[str, float] = {}
        for labels, value in after.series("trismtp_messages_total"):
            code = labels.get("code", "?")
            by_code[code] = max(0.0, value - before.get("trismtp_messages_total", code=code))
        pushed = delta("trismtp_push_latency_seconds_count")
        latency_sum = delta("trismtp_push_latency_seconds_sum")
        bucket = "trismtp_push_latency_seconds_bucket"
        buckets = [
            (float(labels["le"]), value - before.get(bucket, **labels))
            for labels, value in after.series(bucket)
        ]
        batches = delta("trismtp_push_batch_size_count")
        problems = {
            "451 replies": by_code.get("451", 0.0),
            "pusher reconnects": delta("trismtp_pusher_reconnects_total"),
            "refused connections": delta("trismtp_connections_refused_total"),
            "sessions closed for abuse": delta("trismtp_sessions_closed_for_abuse_total"),
            "failed AUTH": delta("trismtp_auth_attempts_total", outcome="failure"),
            "failed TLS handshakes": delta("trismtp_tls_handshakes_total", outcome="failed"),
        }
        return cls(
            seconds=seconds,
            messages_per_second=sum(by_code.values()) / seconds,
            by_code={code: n / seconds for code, n in sorted(by_code.items()) if n},
            connections_open=after.get("trismtp_connections_open"),
            connections_per_second=delta("trismtp_connections_total") / seconds,
            queue_depth=after.get("trismtp_pusher_queue_depth"),
            connected=after.get("trismtp_pusher_connected") >= 1,
            latency_average=latency_sum / pushed if pushed else None,
            latency_p99=quantile(0.99, buckets) if pushed else None,
            batch_average=pushed / batches if batches else None,
            problems={name: n for name, n in problems.items() if n},
        )


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def render(view: View, url: str) -> Group:
    """The screen for one view."""
    title = Text(f"trismtp top — {url} — every {view.seconds:.1f} s", style="bold")
    traffic = Table(box=None, show_header=False, pad_edge=False)
    traffic.add_column(style="dim")
    traffic.add_column(justify="right")
    traffic.add_row("messages/s", f"{view.messages_per_second:,.1f}")
    for code, rate in view.by_code.items():
        traffic.add_row(f"  {code}/s", f"{rate:,.1f}")
    traffic.add_row("connections open", f"{view.connections_open:,.0f}")
    traffic.add_row("new connections/s", f"{view.connections_per_second:,.1f}")
    traffic.add_row("pusher", "connected" if view.connected else "NOT CONNECTED")
    traffic.add_row("queue depth", f"{view.queue_depth:,.0f}")
    traffic.add_row("push latency avg", _ms(view.latency_average))
    traffic.add_row("push latency p99", _ms(view.latency_p99))
    batch = "—" if view.batch_average is None else f"{view.batch_average:,.1f} jobs"
    traffic.add_row("batch size avg", batch)
    problems = Table(box=None, show_header=False, pad_edge=False)
    problems.add_column(style="dim")
    problems.add_column(justify="right", style="red")
    for name, count in view.problems.items():
        problems.add_row(name, f"{count:,.0f}")
    if not view.problems:
        problems.add_row("errors", Text("none", style="green"))
    return Group(title, traffic, Text(""), problems)


def run(
    url: str,
    interval: float,
    *,
    once: bool = False,
    console: Console | None = None,
    read: Callable[[str], Sample] = fetch,
) -> None:
    """Show the view every ``interval`` s until Ctrl-C; ``once``: one screen, printed."""
    console = console or Console()
    before = read(url)
    if once:
        time.sleep(interval)
        console.print(render(View.between(before, read(url)), url))
        return
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            time.sleep(interval)
            after = read(url)
            live.update(render(View.between(before, after), url), refresh=True)
            before = after
