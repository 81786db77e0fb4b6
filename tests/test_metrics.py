"""Metrics and the observability HTTP endpoint, in process, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trismtp.health import NotReady, serve_metrics
from trismtp.jobs.pusher import Pusher
from trismtp.metrics import ABUSE_REASONS, REFUSAL_REASONS, Metrics, merge_expositions
from trismtp.service.server import serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings, JobsSettings, SmtpSettings, embedded_url
from trismtp.smtp.server import SmtpServer

# -- helpers ------------------------------------------------------------------


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; fails if the series does not exist."""
    sample = registry.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels}"
    return sample


async def until(condition: Callable[[], object], what: str, within: float = 10) -> None:
    """Poll *condition* until it holds; fail after *within* seconds."""
    deadline = trio.current_time() + within
    while True:
        if condition():
            return
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await trio.sleep(0.01)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(raw: bytes, *, head_request: bool = False) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {raw!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, text = line.partition(":")
        headers[name.strip().lower()] = text.strip()
    # A response to HEAD has the Content-Length of the GET, and no body.
    assert int(headers["content-length"]) == len(body) or (head_request and not body), raw
    return Response(int(status), headers, body)


async def exchange(address: HostPort, data: bytes) -> Response:
    """Send *data*, read until the server closes, parse the response."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return parse_response(bytes(received), head_request=data.startswith(b"HEAD "))


async def get(address: HostPort, path: str) -> Response:
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: test\r\n\r\n"
    return await exchange(address, request.encode())


async def start_endpoint(
    nursery: trio.Nursery,
    registry: CollectorRegistry | None = None,
    not_ready: NotReady = lambda: None,
    *,
    read_timeout: float = 10.0,
    max_request_bytes: int = 8192,
) -> HostPort:
    serve = partial(
        serve_metrics,
        HostPort("127.0.0.1", 0),
        registry if registry is not None else Metrics().registry,
        not_ready,
        read_timeout=read_timeout,
        max_request_bytes=max_request_bytes,
    )
    address: HostPort = await nursery.start(serve)
    return address


# -- Metrics --------------------------------------------------------------------


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" if shared
    first.message_answered(250)
    assert value(first.registry, "trismtp_messages_total", code="250") == 1
    assert value(second.registry, "trismtp_messages_total", code="250") == 0


def test_labelled_series_exist_from_the_start() -> None:
    registry = Metrics().registry
    for reason in REFUSAL_REASONS:
        assert value(registry, "trismtp_connections_refused_total", reason=reason) == 0
    for reason in ABUSE_REASONS:
        assert value(registry, "trismtp_sessions_closed_for_abuse_total", reason=reason) == 0
    for code in ("250", "451", "552", "554"):
        assert value(registry, "trismtp_messages_total", code=code) == 0
    for listener in ("plain", "implicit_tls"):
        assert value(registry, "trismtp_connections_total", listener=listener) == 0


def test_helpers_count_into_their_series() -> None:
    metrics = Metrics()
    r = metrics.registry
    metrics.connection_accepted(False)
    metrics.connection_accepted(True)
    metrics.connection_accepted(True)
    metrics.connection_refused("rate")
    metrics.session_closed_for_abuse("http")
    metrics.tls_handshake(True, "TLSv1.3")
    metrics.tls_handshake(False)
    metrics.auth_attempt("PLAIN", True)
    metrics.auth_attempt("LOGIN", False)
    metrics.message_answered(250)
    metrics.message_answered(250)
    metrics.message_answered(550)  # a code not known in advance gets its series
    metrics.message_accepted(1000)
    metrics.batch_acked(3)
    for seconds in (0.001, 0.002, 0.5):
        metrics.job_acked(seconds)
    metrics.reconnected()
    depth = [7]
    metrics.watch_pusher(lambda: depth[0], lambda: True)
    metrics.watch_connections(lambda: 4)

    assert value(r, "trismtp_connections_total", listener="plain") == 1
    assert value(r, "trismtp_connections_total", listener="implicit_tls") == 2
    assert value(r, "trismtp_connections_refused_total", reason="rate") == 1
    assert value(r, "trismtp_sessions_closed_for_abuse_total", reason="http") == 1
    assert value(r, "trismtp_tls_handshakes_total", outcome="ok", version="TLSv1.3") == 1
    assert value(r, "trismtp_tls_handshakes_total", outcome="failed", version="unknown") == 1
    assert value(r, "trismtp_auth_attempts_total", mechanism="PLAIN", outcome="success") == 1
    assert value(r, "trismtp_auth_attempts_total", mechanism="LOGIN", outcome="failure") == 1
    assert value(r, "trismtp_messages_total", code="250") == 2
    assert value(r, "trismtp_messages_total", code="550") == 1
    assert value(r, "trismtp_accepted_message_bytes_total") == 1000
    assert value(r, "trismtp_jobs_pushed_total") == 3
    assert value(r, "trismtp_push_batch_size_count") == 1
    assert value(r, "trismtp_push_batch_size_sum") == 3
    assert value(r, "trismtp_push_latency_seconds_count") == 3
    assert value(r, "trismtp_push_latency_seconds_bucket", le="0.0025") == 2
    assert value(r, "trismtp_pusher_reconnects_total") == 1
    assert value(r, "trismtp_pusher_queue_depth") == 7
    depth[0] = 2  # read at scrape time
    assert value(r, "trismtp_pusher_queue_depth") == 2
    assert value(r, "trismtp_pusher_connected") == 1
    assert value(r, "trismtp_connections_open") == 4


# -- the HTTP endpoint ------------------------------------------------------------


async def test_metrics_page_is_the_registry_in_text_format(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    metrics.message_answered(250)
    address = await start_endpoint(nursery, metrics.registry)
    response = await get(address, "/metrics?name[]=ignored")
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert response.headers["connection"] == "close"
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    [sample] = [s for s in families["trismtp_messages"].samples if s.labels == {"code": "250"}]
    assert sample.value == 1
    assert families["trismtp_messages"].documentation


async def test_healthz_and_readyz(nursery: trio.Nursery) -> None:
    reason: list[str | None] = [None]
    address = await start_endpoint(nursery, not_ready=lambda: reason[0])
    health = await get(address, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    ready = await get(address, "/readyz")
    assert (ready.status, ready.body) == (200, b"ready\n")
    reason[0] = "no connection to the jobs service:\nconnection refused"
    ready = await get(address, "/readyz")
    assert ready.status == 503
    # One line, whatever the reason held.
    assert ready.body == b"not ready: no connection to the jobs service: connection refused\n"
    health = await get(address, "/healthz")
    assert health.status == 200  # alive, if not ready


@pytest.mark.parametrize("path", ["/", "/metric", "/healthz/", "/../metrics", "*"])
async def test_other_paths_are_404(nursery: trio.Nursery, path: str) -> None:
    address = await start_endpoint(nursery)
    response = await get(address, path)
    assert response.status == 404
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405(nursery: trio.Nursery, method: str) -> None:
    address = await start_endpoint(nursery)
    request = f"{method} /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
    response = await exchange(address, request.encode())
    assert response.status == 405
    assert response.headers["allow"] == "GET"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HELO smtp.example\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET\x00 / HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
async def test_malformed_requests_are_400(nursery: trio.Nursery, request_bytes: bytes) -> None:
    address = await start_endpoint(nursery)
    response = await exchange(address, request_bytes)
    assert response.status == 400
    assert response.headers["connection"] == "close"


async def test_a_request_larger_than_the_bound_is_431(nursery: trio.Nursery) -> None:
    address = await start_endpoint(nursery, max_request_bytes=1024)
    request = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Padding: " + b"a" * 100_000 + b"\r\n\r\n"
    response = await exchange(address, request)
    assert response.status == 431


async def test_a_request_at_the_bound_is_answered(nursery: trio.Nursery) -> None:
    address = await start_endpoint(nursery, max_request_bytes=1024)
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: "
    request = head + b"a" * (1000 - len(head)) + b"\r\n\r\n"
    assert (await exchange(address, request)).status == 200


async def test_a_request_that_does_not_arrive_in_time_is_408(nursery: trio.Nursery) -> None:
    address = await start_endpoint(nursery, read_timeout=0.2)
    # Half a request, then nothing: the server gives up and says so.
    response = await exchange(address, b"GET /metrics HTTP/1.1\r\nHo")
    assert response.status == 408


async def test_a_client_that_closes_without_a_request_gets_nothing(
    nursery: trio.Nursery,
) -> None:
    address = await start_endpoint(nursery)
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_eof()
        with trio.fail_after(10):
            assert await stream.receive_some(1) == b""


async def test_the_endpoint_keeps_serving_after_bad_clients(nursery: trio.Nursery) -> None:
    address = await start_endpoint(nursery, read_timeout=0.2)
    await exchange(address, b"\x16\x03\x01garbage\r\n\r\n")
    await exchange(address, b"GET /metrics HTTP/1.1\r\n")
    assert (await get(address, "/healthz")).status == 200


async def test_listen_error_names_the_endpoint(nursery: trio.Nursery) -> None:
    address = await start_endpoint(nursery)
    with pytest.raises(OSError, match=f"metrics cannot listen on {address}"):
        await serve_metrics(address, Metrics().registry, lambda: None)


# -- the SMTP server and the pusher count ---------------------------------------


@dataclass
class Instrumented:
    metrics: Metrics
    smtp: SmtpServer
    pusher: Pusher
    address: HostPort

    def value(self, name: str, **labels: str) -> float:
        return value(self.metrics.registry, name, **labels)

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.address.host, self.address.port)


async def talk(stream: trio.SocketStream, data: bytes, replies: int) -> list[str]:
    """Send *data*; the last line of each of the next *replies* replies."""
    await stream.send_all(data)
    buffer = bytearray()
    lines: list[str] = []
    with trio.fail_after(10):
        while len(lines) < replies:
            end = buffer.find(b"\r\n")
            if end < 0:
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed after {lines}; unread {bytes(buffer)!r}"
                buffer += chunk
                continue
            line = bytes(buffer[:end]).decode()
            del buffer[: end + 2]
            if line[3:4] != "-":
                lines.append(line)
    return lines


async def start_instrumented(nursery: trio.Nursery, tmp_path: Path, **smtp: object) -> Instrumented:
    metrics = Metrics()
    service = JobsServiceSettings(listen="127.0.0.1:0", database=tmp_path / "jobs.sqlite3")
    url = embedded_url(await nursery.start(serve_jobs, service))
    jobs = JobsSettings(push_timeout=5)
    pusher = Pusher(jobs, url, metrics=metrics)
    await nursery.start(pusher.run)
    settings = SmtpSettings.model_validate({"listen": ["127.0.0.1:0"], **smtp})
    server = SmtpServer(settings, jobs, pusher.push, metrics=metrics)
    [address] = await nursery.start(server.serve)
    return Instrumented(metrics, server, pusher, address)


MESSAGE = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


async def test_messages_and_pushes_are_counted(nursery: trio.Nursery, tmp_path: Path) -> None:
    it = await start_instrumented(nursery, tmp_path, bare_newlines="reject")
    assert it.smtp.listening
    await until(lambda: it.pusher.connected, "the pusher to connect")
    assert it.pusher.unavailable is None
    stream = await it.connect()
    body = b"Subject: counted\r\n\r\nhello\r\n"
    await talk(stream, b"EHLO client.example\r\n", 2)  # greeting, EHLO
    assert it.value("trismtp_connections_open") == 1
    for _ in range(3):
        replies = await talk(stream, MESSAGE + body + b".\r\n", 4)
        assert replies[-1].startswith("250 2.0.0 OK: queued as"), replies
    replies = await talk(stream, MESSAGE + b"Subject: bare\r\n\r\nbare\nLF\r\n.\r\n", 4)
    assert replies[-1].startswith("554 5.6.0"), replies
    await talk(stream, b"QUIT\r\n", 1)
    await stream.aclose()
    await until(lambda: it.smtp.connections == 0, "the session to end")

    assert it.value("trismtp_connections_total", listener="plain") == 1
    assert it.value("trismtp_connections_open") == 0
    assert it.value("trismtp_messages_total", code="250") == 3
    assert it.value("trismtp_messages_total", code="554") == 1
    assert it.value("trismtp_accepted_message_bytes_total") == 3 * len(body)
    assert it.value("trismtp_jobs_pushed_total") == 3
    assert it.value("trismtp_push_batch_size_sum") == 3
    assert it.value("trismtp_push_latency_seconds_count") == 3
    assert 0 < it.value("trismtp_push_latency_seconds_sum") < 3 * 5
    assert it.value("trismtp_pusher_queue_depth") == 0
    assert it.value("trismtp_pusher_connected") == 1
    assert it.value("trismtp_pusher_reconnects_total") == 0


async def test_refusals_and_abuse_are_counted(nursery: trio.Nursery, tmp_path: Path) -> None:
    it = await start_instrumented(
        nursery, tmp_path, max_connections=1, limits={"max_errors": 2}, command_timeout=0.3
    )
    # An HTTP request on the SMTP port.
    http = await it.connect()
    replies = await talk(http, b"GET / HTTP/1.1\r\n", 2)
    assert replies[-1].startswith("421 4.7.0"), replies
    await http.aclose()
    await until(lambda: it.smtp.connections == 0, "the HTTP session to end")
    # Too many errors.
    errors = await it.connect()
    replies = await talk(errors, b"BOGUS\r\nBOGUS\r\n", 4)
    assert replies[-1].startswith("421 4.7.0 Too many errors"), replies
    await errors.aclose()
    await until(lambda: it.smtp.connections == 0, "the erring session to end")
    # A second connection while one is open: refused.
    idle = await it.connect()
    await talk(idle, b"", 1)
    refused = await it.connect()
    replies = await talk(refused, b"", 1)
    assert replies[-1].startswith("421 4.7.0 Too many connections"), replies
    await refused.aclose()
    # The idle one times out.
    replies = await talk(idle, b"", 1)
    assert replies[-1].startswith("421 4.4.2"), replies
    await idle.aclose()

    assert it.value("trismtp_connections_total", listener="plain") == 4
    assert it.value("trismtp_connections_refused_total", reason="max_connections") == 1
    assert it.value("trismtp_sessions_closed_for_abuse_total", reason="http") == 1
    assert it.value("trismtp_sessions_closed_for_abuse_total", reason="errors") == 1
    assert it.value("trismtp_sessions_closed_for_abuse_total", reason="timeout") == 1
    assert it.value("trismtp_sessions_closed_for_abuse_total", reason="slow_data") == 0


async def test_shutdown_makes_the_server_not_listening(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    it = await start_instrumented(nursery, tmp_path)
    assert it.smtp.listening
    it.smtp.shutdown(grace=1)
    assert not it.smtp.listening


async def test_the_pusher_reconnects_while_idle(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Without any job to push, a lost connection is opened again, so
    ``connected`` (and /readyz) recovers with the service, not with traffic."""
    metrics = Metrics()
    database = tmp_path / "jobs.sqlite3"
    scope = trio.CancelScope()

    async def service(listen: str, *, task_status: trio.TaskStatus[HostPort]) -> None:
        with scope:
            settings = JobsServiceSettings(listen=listen, database=database)
            await serve_jobs(settings, task_status=task_status)

    address = await nursery.start(service, "127.0.0.1:0")
    pusher = Pusher(JobsSettings(push_timeout=5), embedded_url(address), metrics=metrics)
    await nursery.start(pusher.run)
    await until(lambda: pusher.connected, "the pusher to connect")

    scope.cancel()
    await until(lambda: not pusher.connected, "the pusher to see the connection go")
    assert pusher.unavailable is not None
    assert pusher.unavailable.startswith("no connection to the jobs service: ")
    assert value(metrics.registry, "trismtp_pusher_connected") == 0

    scope = trio.CancelScope()
    await nursery.start(service, str(address))
    await until(lambda: pusher.connected, "the pusher to reconnect")
    assert pusher.unavailable is None
    assert value(metrics.registry, "trismtp_pusher_reconnects_total") == 1
    assert value(metrics.registry, "trismtp_pusher_connected") == 1


def test_merged_exposition_adds_the_workers_samples() -> None:
    primary, secondary = Metrics(), Metrics()
    primary.message_answered(250)
    secondary.message_answered(250)
    secondary.message_answered(250)
    secondary.message_answered(451)
    primary.batch_acked(3)
    secondary.batch_acked(5)
    page = merge_expositions(primary.registry, [generate_latest(secondary.registry).decode()])
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page.decode())
        for sample in family.samples
    }
    assert samples[("trismtp_messages_total", (("code", "250"),))] == 3
    assert samples[("trismtp_messages_total", (("code", "451"),))] == 1
    assert samples[("trismtp_push_batch_size_count", ())] == 2
    assert samples[("trismtp_push_batch_size_sum", ())] == 8
    # A counter's creation time is the earliest, not a sum of timestamps.
    created = samples[("trismtp_messages_created", (("code", "250"),))]
    assert created < 2 * 10**10
    # Without other workers the page is the registry's own.
    assert merge_expositions(primary.registry, []) == generate_latest(primary.registry)
