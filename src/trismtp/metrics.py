"""Prometheus metrics: what the daemon counts, in a registry of its own.

Theory of operation
===================

One :class:`Metrics` object holds every collector, registered in a
:class:`~prometheus_client.CollectorRegistry` of its own rather than the
process-wide default one: a test can run several daemons in one process, and
nothing a library registers globally ends up on our endpoint. The daemon
makes one and hands it to the parts that count (:class:`SmtpServer`,
:class:`Pusher`) as a constructor argument; without one, each part makes a
private object that nobody scrapes, so counting costs the same and needs no
``if metrics is not None`` on the hot path.

The hot path is a session answering a message (about 1,700 a second on a
small machine). What it does there is one or two increments of children
looked up once, never a ``labels(...)`` call with fresh strings: the helper
methods below keep the children of labelled metrics in dicts, keyed by what
the caller already has (an ``int`` reply code, a ``bool``). Values that are
already kept elsewhere (sessions open, jobs queued) are not counted twice:
their gauges read them at scrape time through ``set_function``.

:func:`serve_metrics` in :mod:`trismtp.health` serves :attr:`Metrics.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["ABUSE_REASONS", "REFUSAL_REASONS", "Metrics", "merge_expositions"]

REFUSAL_REASONS = ("max_connections", "per_address", "rate", "proxy_header")
"""Why a connection was closed before its session began (``reason`` label)."""

ABUSE_REASONS = ("errors", "slow_data", "timeout", "http", "auth_failures")
"""Why a session was closed by the server (``reason`` label)."""

# Reply codes whose series exist from the start, at 0, so that rate() and
# alerts work before the first message of that kind.
_KNOWN_CODES = (250, 451, 552, 554)

# Jobs per batch: powers of two up to well past jobs.batch_max_jobs' default.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Seconds from push to durable ack: from a lone job's round trip (~1 ms) up to
# jobs.push_timeout's default (15 s), after which a session has given up.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    30.0,
)


class Metrics:
    """Every trismtp metric, registered in :attr:`registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # -- SMTP connections ---------------------------------------------
        self.connections_open = Gauge(
            "trismtp_connections_open",
            "SMTP sessions open now (admitted connections; refused ones are not counted).",
            registry=r,
        )
        self.connections = Counter(
            "trismtp_connections",
            "SMTP connections accepted, including those then refused.",
            ["listener"],
            registry=r,
        )
        self.connections_refused = Counter(
            "trismtp_connections_refused",
            "SMTP connections closed before their session began, by reason.",
            ["reason"],
            registry=r,
        )
        self.sessions_closed_for_abuse = Counter(
            "trismtp_sessions_closed_for_abuse",
            "SMTP sessions the server closed with 421 because of the client, by reason.",
            ["reason"],
            registry=r,
        )
        self.tls_handshakes = Counter(
            "trismtp_tls_handshakes",
            "TLS handshakes (STARTTLS and implicit TLS), by outcome and protocol version.",
            ["outcome", "version"],
            registry=r,
        )
        self.auth_attempts = Counter(
            "trismtp_auth_attempts",
            "SMTP AUTH credentials checked against the users file, by mechanism and outcome.",
            ["mechanism", "outcome"],
            registry=r,
        )

        # -- messages --------------------------------------------------------
        self.messages = Counter(
            "trismtp_messages",
            "Messages received (DATA completed), by the reply code they were answered with.",
            ["code"],
            registry=r,
        )
        self.accepted_bytes = Counter(
            "trismtp_accepted_message_bytes",
            "Bytes of the messages answered 250, as received.",
            registry=r,
        )

        # -- the memory budget (smtp.memory_budget) ---------------------------
        self.memory_budget = Gauge(
            "trismtp_memory_budget_bytes",
            "The memory budget for messages in flight (smtp.memory_budget).",
            registry=r,
        )
        self.memory_claimed = Gauge(
            "trismtp_memory_claimed_bytes",
            "Bytes of the memory budget that messages in flight hold now.",
            registry=r,
        )
        self.memory_waiting = Gauge(
            "trismtp_memory_waiting_sessions",
            "Sessions that stopped reading DATA until the memory budget has room.",
            registry=r,
        )
        self.memory_refusals = Counter(
            "trismtp_memory_refusals",
            "MAIL (with SIZE=) or DATA answered 452 4.3.1, or an upload closed with 421 4.3.1,"
            " because the memory budget was full.",
            registry=r,
        )

        # -- the pusher ------------------------------------------------------
        self.jobs_pushed = Counter(
            "trismtp_jobs_pushed",
            "Jobs the destination acknowledged as durable.",
            registry=r,
        )
        self.batch_size = Histogram(
            "trismtp_push_batch_size",
            "Jobs per acknowledged batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.push_latency = Histogram(
            "trismtp_push_latency_seconds",
            "Seconds from a job entering the pusher to its durable ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "trismtp_pusher_queue_depth",
            "Jobs waiting in the pusher's channel for a batch.",
            registry=r,
        )
        self.pusher_connected = Gauge(
            "trismtp_pusher_connected",
            "Pushers connected to their destination (jobs service or NATS): 1 or 0, "
            "with smtp.workers > 1 one per worker.",
            registry=r,
        )
        # -- the embedded jobs store --------------------------------------
        self.store_free_bytes = Gauge(
            "trismtp_jobs_store_free_bytes",
            "Bytes free on the file system that holds the embedded jobs database.",
            registry=r,
        )
        self.store_writable = Gauge(
            "trismtp_jobs_store_writable",
            "1 while the embedded jobs store can write new jobs, else 0 (disk full, I/O error).",
            registry=r,
        )
        self.reconnects = Counter(
            "trismtp_pusher_reconnects",
            "Connections the pusher opened to its destination after its first one.",
            registry=r,
        )

        # Children of labelled metrics, looked up once (see the module docstring).
        self._listener = {
            False: self.connections.labels("plain"),
            True: self.connections.labels("implicit_tls"),
        }
        self._refused = {
            reason: self.connections_refused.labels(reason) for reason in REFUSAL_REASONS
        }
        self._abuse = {
            reason: self.sessions_closed_for_abuse.labels(reason) for reason in ABUSE_REASONS
        }
        self._codes = {code: self.messages.labels(str(code)) for code in _KNOWN_CODES}
        self._tls: dict[tuple[bool, str], Counter] = {}
        self._auth: dict[tuple[str, bool], Counter] = {}

    # -- what the SMTP server reports -----------------------------------------

    def watch_connections(self, count: Callable[[], float]) -> None:
        """Read the sessions open from ``count()`` at each scrape."""
        self.connections_open.set_function(count)

    def connection_accepted(self, implicit_tls: bool) -> None:
        self._listener[implicit_tls].inc()

    def connection_refused(self, reason: str) -> None:
        """``reason`` is one of :data:`REFUSAL_REASONS`."""
        self._refused[reason].inc()

    def session_closed_for_abuse(self, reason: str) -> None:
        """``reason`` is one of :data:`ABUSE_REASONS`."""
        self._abuse[reason].inc()

    def tls_handshake(self, ok: bool, version: str = "unknown") -> None:
        """A finished (``ok``) or failed handshake; a failed one has no version."""
        key = (ok, version)
        child = self._tls.get(key)
        if child is None:
            child = self._tls[key] = self.tls_handshakes.labels("ok" if ok else "failed", version)
        child.inc()

    def auth_attempt(self, mechanism: str, ok: bool) -> None:
        """``mechanism`` is one the server offers, so the label values stay few."""
        key = (mechanism, ok)
        child = self._auth.get(key)
        if child is None:
            outcome = "success" if ok else "failure"
            child = self._auth[key] = self.auth_attempts.labels(mechanism, outcome)
        child.inc()

    def message_answered(self, code: int) -> None:
        """A message (end of DATA) answered with ``code``: a code the server sends."""
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.messages.labels(str(code))
        child.inc()

    def message_accepted(self, size: int) -> None:
        self.accepted_bytes.inc(size)

    def watch_memory_budget(
        self, total: int, claimed: Callable[[], float], waiting: Callable[[], float]
    ) -> None:
        """The budget's size, and read what is claimed and who waits at each scrape."""
        self.memory_budget.set(total)
        self.memory_claimed.set_function(claimed)
        self.memory_waiting.set_function(waiting)

    def memory_refusal(self) -> None:
        """``452 4.3.1`` to MAIL or DATA, or ``421 4.3.1`` mid-upload: no room in the budget."""
        self.memory_refusals.inc()

    # -- what the pusher reports -------------------------------------------------

    def watch_pusher(self, queued: Callable[[], float], connected: Callable[[], float]) -> None:
        """Read the jobs queued and the connection state at each scrape."""
        self.queue_depth.set_function(queued)
        self.pusher_connected.set_function(connected)

    def watch_store(
        self, free_bytes: Callable[[], int | None], writable: Callable[[], bool]
    ) -> None:
        """Read the store's free disk space and whether it can write at each scrape."""
        self.store_free_bytes.set_function(lambda: float(free_bytes() or 0))
        self.store_writable.set_function(lambda: float(writable()))

    def batch_acked(self, jobs: int) -> None:
        self.jobs_pushed.inc(jobs)
        self.batch_size.observe(jobs)

    def job_acked(self, seconds: float) -> None:
        self.push_latency.observe(seconds)

    def reconnected(self) -> None:
        self.reconnects.inc()


def merge_expositions(registry: CollectorRegistry, others: Sequence[str]) -> bytes:
    """The text exposition of *registry* with the samples of *others* added in.

    With ``smtp.workers`` > 1 the primary's ``/metrics`` shows the whole
    daemon: each secondary worker's exposition (*others*) is parsed and its
    samples added to the primary's, name and labels alike: counters,
    histograms and gauges are sums over the workers (connections open,
    memory claimed, pushers connected …), and ``*_created`` the earliest.
    A family only one worker has (the jobs store's gauges) passes unchanged.
    """
    if not others:
        return generate_latest(registry)
    families: dict[str, Metric] = {}
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}

    def add(family: Metric) -> None:
        if family.name not in families:
            families[family.name] = Metric(family.name, family.documentation, family.type)
            order[family.name] = []
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in values:
                values[key] = sample.value
                order[family.name].append(key)
            elif sample.name.endswith("_created"):
                values[key] = min(values[key], sample.value)
            else:
                values[key] += sample.value

    for family in registry.collect():
        add(family)
    for text in others:
        for family in text_string_to_metric_families(text):
            add(family)
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Fixed(families, values, order))
    return generate_latest(merged)


class _Fixed(Collector):
    """Families built by :func:`merge_expositions`, for ``generate_latest``."""

    def __init__(
        self,
        families: dict[str, Metric],
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float],
        order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]],
    ) -> None:
        self._families = families
        self._values = values
        self._order = order

    def collect(self) -> Iterator[Metric]:
        for name, family in self._families.items():
            family.samples = []
            for sample_name, labels in self._order[name]:
                family.add_sample(sample_name, dict(labels), self._values[(sample_name, labels)])
            yield family
