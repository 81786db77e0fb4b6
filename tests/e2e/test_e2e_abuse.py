"""Abuse on the real server: per-address limits, error counting, HTTP on the SMTP
port, recipient domains, slow clients ([smtp.limits], smtp.recipient_domains).

Per-address limits skip the exempt networks, which by default are the
loopback addresses these tests connect from: tests of those limits set
``exempt_networks = []``.
"""

from __future__ import annotations

import itertools
import resource
import select
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from .trismtp_e2e import (
    HOST,
    Daemon,
    Launcher,
    SmtpConn,
    free_port,
    ipv6_loopback,
    launcher,
    message,
    queued_id,
)

pytestmark = pytest.mark.e2e


def limits(**values: object) -> dict[str, dict[str, Any]]:
    return {"smtp": {"limits": values}}


def new_jobs(daemon: Daemon, before: set[str]) -> list[str]:
    return [job.id for job in daemon.jobs() if job.id not in before]


# -- per-address limits -------------------------------------------------------


def test_per_address_concurrency_limit(launch: Launcher) -> None:
    daemon = launch.daemon(limits(max_connections_per_address=3, exempt_networks=[]))
    with ExitStack() as stack:
        admitted = [stack.enter_context(daemon.connect()) for _ in range(3)]
        for conn in admitted:
            conn.start()
        with daemon.connect() as extra:
            reply = extra.reply()
            assert reply.last == (
                "421 4.7.0 Too many connections from your address, try again later"
            ), reply
            assert extra.wait_closed() == b""
        for conn in admitted:
            conn.expect("NOOP", "250")
        admitted[0].quit()
        # One slot is free again.
        with daemon.connect() as again:
            again.start()
            again.quit()
        for conn in admitted[1:]:
            conn.quit()


def test_exempt_networks_skip_the_per_address_limit(launch: Launcher) -> None:
    daemon = launch.daemon(limits(max_connections_per_address=1))  # 127.0.0.0/8 exempt
    with daemon.connect() as first, daemon.connect() as second:
        first.start()
        second.start()
        first.quit()
        second.quit()


def test_new_connections_per_minute_limit(launch: Launcher) -> None:
    daemon = launch.daemon(limits(max_new_connections_per_minute=5, exempt_networks=[]))
    for _ in range(5):
        with daemon.connect() as conn:
            conn.start()
            conn.quit()
    with daemon.connect() as conn:
        reply = conn.reply()
        assert reply.last.startswith("421 4.7.0 Too many new connections from your address"), reply
        assert conn.wait_closed() == b""
    daemon.wait_for_log("refusing 127.0.0.1:")


# -- errors, HTTP, recipient domains ------------------------------------------

MAX_ERRORS = 5
DOMAINS = ["example.com", ".example.net"]


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """max_errors = 5 and a recipient allow-list; every session ends closed."""
    settings = {
        "smtp": {
            "recipient_domains": DOMAINS,
            "limits": {"max_errors": MAX_ERRORS},
            "bare_newlines": "reject",  # refused messages count as errors
        }
    }
    with launcher(tmp_path_factory.mktemp("guard")) as launch:
        yield launch.daemon(settings)


def test_max_errors_closes_the_session_exactly_at_the_limit(guard: Daemon) -> None:
    with guard.connect() as conn:
        conn.start()
        # Every reply of 500 and above counts, whatever the command.
        conn.expect("XYZZY", "500 5.5.2")
        conn.expect("RCPT TO:<a@example.com>", "503")
        conn.expect("MAIL FROM:<unclosed@example.org", "501")
        conn.expect("EXPN staff", "502")
        conn.expect("NOOP", "250")  # still open after 4 errors
        conn.expect("XYZZY", "500 5.5.2")  # the 5th
        reply = conn.reply()
        assert reply.last == "421 4.7.0 Too many errors, closing connection", reply
        assert conn.wait_closed() == b""


def test_refused_messages_count_as_errors(guard: Daemon) -> None:
    # A message refused after its final dot (here: a bare LF) is an error too.
    with guard.connect() as conn:
        conn.start()
        for _ in range(MAX_ERRORS - 1):
            conn.transaction("a@example.org", ["b@example.com"])
            conn.send(b"Subject: x\n\nbare LF\r\n.\r\n")
            assert conn.reply().last.startswith("554 5.6.0")
        conn.expect("NOOP", "250")  # still open
        conn.transaction("a@example.org", ["b@example.com"])
        conn.send(b"bare\rCR\r\n.\r\n")
        assert conn.reply().last.startswith("554 5.6.0")
        assert conn.reply().last == "421 4.7.0 Too many errors, closing connection"
        assert conn.wait_closed() == b""


def test_max_errors_with_pipelined_garbage(guard: Daemon) -> None:
    with guard.connect() as conn:
        conn.start()
        conn.send(b"XYZZY\r\n" * 20)
        replies = [conn.reply() for _ in range(MAX_ERRORS + 1)]
        assert [r.code for r in replies] == [500] * MAX_ERRORS + [421], [str(r) for r in replies]
        assert replies[-1].last.startswith("421 4.7.0 Too many errors")
        assert conn.wait_closed() == b"", "nothing after the 421"


NOT_HTTP = "421 4.7.0 This is an SMTP server, not HTTP; closing connection"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: e2e\r\n\r\n",
        b"POST /wp-login.php HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=b",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"CONNECT mail.example.com:25 HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
        b"get /lowercase HTTP/1.1\r\n\r\n",
        b"Host: x\r\n",
        b"User-Agent: scanner/1.0\r\nAccept: */*\r\n\r\n",
    ],
    ids=["GET", "POST", "HEAD", "CONNECT", "OPTIONS", "get", "Host", "User-Agent"],
)
def test_http_on_the_smtp_port_gets_421_and_close(guard: Daemon, request_bytes: bytes) -> None:
    before = {job.id for job in guard.jobs()}
    with guard.connect() as conn:
        conn.greeting()
        conn.send(request_bytes)
        assert conn.reply().last == NOT_HTTP
        assert conn.wait_closed() == b"", "one reply, then the close"
    assert new_jobs(guard, before) == []


def test_http_request_in_the_middle_of_a_session(guard: Daemon) -> None:
    with guard.connect() as conn:
        conn.start()
        conn.expect("MAIL FROM:<a@example.org>", "250")
        conn.send(b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert conn.reply().last == NOT_HTTP
        assert conn.wait_closed() == b""


def test_recipient_domains_allow_list(guard: Daemon) -> None:
    before = {job.id for job in guard.jobs()}
    accepted = [
        "alice@example.com",
        "Bob@EXAMPLE.COM",
        "carol@example.net",  # ".example.net" takes example.net itself
        "dave@deep.sub.example.net",  # and its subdomains
        "postmaster",  # always (RFC 5321 §4.5.1)
        "Postmaster",
    ]
    refused = [
        "eve@sub.example.com",  # "example.com" is that domain only
        "mallory@example.org",
        "trudy@notexample.net",
        "postmaster@example.org",
    ]
    with guard.connect() as conn:
        conn.start()
        conn.expect("MAIL FROM:<sender@example.org>", "250")
        for address in accepted:
            conn.expect(f"RCPT TO:<{address}>", "250")
        for address in refused[: MAX_ERRORS - 1]:
            conn.expect(f"RCPT TO:<{address}>", "550 5.7.1")
        conn.expect("DATA", "354")
        conn.send(message("domains") + b".\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    jobs = [job for job in guard.jobs() if job.id not in before]
    assert [job.id for job in jobs] == [job_id]
    assert jobs[0].payload["envelope"]["allRecipients"] == accepted


# -- slow clients ---------------------------------------------------------------

COMMAND_TIMEOUT = 2.0
DATA_RATE_GRACE = 1.0


@pytest.fixture(scope="module")
def strict_timing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """command_timeout = 2 s; DATA at 1000 B/s at least after a 1 s grace."""
    settings = {
        "smtp": {
            "command_timeout": COMMAND_TIMEOUT,
            "limits": {"min_data_rate": 1000, "data_rate_grace": DATA_RATE_GRACE},
        }
    }
    with launcher(tmp_path_factory.mktemp("slow")) as launch:
        yield launch.daemon(settings)


def trickle_until_answered(
    conn: SmtpConn,
    data: bytes,
    interval: float,
    limit: float,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Send *data* one byte every *interval* s (cycling) until the server sends
    something or closes; fail after *limit* s. *meanwhile* runs once, after
    the first byte."""
    deadline = time.monotonic() + limit
    for count, byte in enumerate(itertools.cycle(data)):
        readable, _, _ = select.select([conn.sock], [], [], 0 if count == 0 else interval)
        if readable:
            return
        assert time.monotonic() < deadline, f"no answer after {limit:g} s of trickling"
        try:
            conn.send(bytes([byte]))
        except OSError:
            return  # closed: what it said is read next
        if count == 0 and meanwhile is not None:
            meanwhile()
    raise AssertionError("unreachable")


def deliver_with_smtplib(host: str, port: int, subject: str) -> str:
    with smtplib.SMTP(host, port, local_hostname="normal.e2e.test", timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("normal@example.org")[0] == 250
        assert smtp.rcpt("rcpt@example.com")[0] == 250
        code, text = smtp.data(message(subject))
    return queued_id(f"{code} {text.decode()}")


def test_slow_data_gets_421_too_slowly(strict_timing: Daemon) -> None:
    daemon = strict_timing
    before = {job.id for job in daemon.jobs()}
    normal: list[str] = []
    with daemon.connect() as slow:
        slow.start()
        slow.transaction()
        started = time.monotonic()
        trickle_until_answered(
            slow,
            b"Subject: slow\r\n\r\nslow body\r\n",
            interval=0.25,  # 4 bytes a second, far below 1000
            limit=15,
            meanwhile=lambda: normal.append(
                deliver_with_smtplib(HOST, daemon.smtp_port, "normal speed")
            ),
        )
        reply = slow.reply()
        waited = time.monotonic() - started
        assert reply.last == "421 4.4.2 Data arriving too slowly, closing connection", reply
        assert slow.wait_closed() == b""
    assert waited >= DATA_RATE_GRACE - 0.1, f"421 after {waited:.2f} s, grace is 1 s"
    assert new_jobs(daemon, before) == normal, "the normal message only"


def test_trickled_command_does_not_extend_command_timeout(strict_timing: Daemon) -> None:
    with strict_timing.connect() as conn:
        conn.start()
        started = time.monotonic()
        # A command line that never ends, one byte every 0.5 s.
        trickle_until_answered(conn, b"NOOP and then some more", interval=0.5, limit=15)
        reply = conn.reply()
        waited = time.monotonic() - started
        assert reply.last == "421 4.4.2 Timeout waiting for command, closing connection", reply
        assert conn.wait_closed() == b""
    assert COMMAND_TIMEOUT - 0.1 <= waited < COMMAND_TIMEOUT + 3, f"421 after {waited:.2f} s"


def test_fast_client_is_not_bothered_by_the_data_rate(strict_timing: Daemon) -> None:
    before = {job.id for job in strict_timing.jobs()}
    body = ("line of a longer message " * 3 + "\r\n").encode() * 2000  # ~150 KB
    with strict_timing.connect() as conn:
        conn.start()
        conn.transaction()
        conn.send(b"Subject: big\r\n\r\n" + body + b".\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    assert new_jobs(strict_timing, before) == [job_id]


# -- 1,000 slow connections ---------------------------------------------------

SLOW_CLIENTS = 1000
DRIBBLE_INTERVAL = 1.0
NORMAL_DELIVERY_BOUND = 10.0
SLOW_PIPELINE = (
    b"EHLO slow.e2e.test\r\n"
    b"MAIL FROM:<slow@example.org>\r\n"
    b"RCPT TO:<rcpt@example.com>\r\n"
    b"DATA\r\n"
)  # fmt: skip
SLOW_BODY = b"Subject: slowly\r\n\r\none byte at a time\r\n"


def ensure_open_files(needed: int) -> None:
    """Raise RLIMIT_NOFILE (inherited by the daemons started after) to *needed*."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass
class SlowClients:
    """What the slow clients saw."""

    in_data: int = 0
    refused: list[str] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dribbled: int = 0
    settled: int = 0
    all_settled: trio.Event = field(default_factory=trio.Event)
    dribble_target: int | None = None
    dribbled_enough: trio.Event = field(default_factory=trio.Event)

    def settle(self) -> None:
        self.settled += 1
        if self.settled == SLOW_CLIENTS:
            self.all_settled.set()

    def dribble(self) -> None:
        self.dribbled += 1
        self.wait_for_dribbling(self.dribble_target)

    def wait_for_dribbling(self, target: int | None) -> None:
        """Set :attr:`dribbled_enough` once *target* bytes were dribbled in all."""
        self.dribble_target = target
        if target is not None and self.dribbled >= target:
            self.dribbled_enough.set()


class TrioReplies:
    """Final reply lines read from a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def reply(self) -> str:
        while True:
            while b"\r\n" not in self.buffer:
                data = await self.stream.receive_some(4096)
                if not data:
                    raise EOFError(f"closed; got {self.buffer!r}")
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            line = raw.decode()
            if len(line) == 3 or line[3] == " ":
                return line


async def slow_client(port: int, results: SlowClients, setup: trio.CapacityLimiter) -> None:
    """Connect, start a message, then send its body one byte a second, forever.

    A refused connection records the refusal and the close. One that the
    server answers or closes while dribbling is recorded as dropped.
    """
    settled = False
    try:
        async with setup:
            stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            async with setup:
                replies = TrioReplies(stream)
                greeting = await replies.reply()
                if not greeting.startswith("220"):
                    rest = await stream.receive_some(4096)
                    results.refused.append(greeting if rest == b"" else f"{greeting} + {rest!r}")
                    return
                await stream.send_all(SLOW_PIPELINE)
                codes = [(await replies.reply())[:3] for _ in range(4)]
                if codes != ["250", "250", "250", "354"]:
                    results.errors.append(f"replies {codes}")
                    return
            results.in_data += 1
            results.settle()
            settled = True
            for byte in itertools.cycle(SLOW_BODY):
                await stream.send_all(bytes([byte]))
                results.dribble()
                with trio.move_on_after(DRIBBLE_INTERVAL):
                    results.dropped.append(await stream.receive_some(4096))
                    return
    except (OSError, trio.BrokenResourceError, EOFError) as exc:
        results.errors.append(repr(exc))
    finally:
        if not settled:
            results.settle()


async def with_slow_clients(port: int, results: SlowClients, then: Callable[[], Any]) -> Any:
    """Start the slow clients; once each was refused or has dribbled a few
    bytes, run *then* in a thread while they go on dribbling; return its result."""
    async with trio.open_nursery() as nursery:
        setup = trio.CapacityLimiter(100)
        for _ in range(SLOW_CLIENTS):
            nursery.start_soon(slow_client, port, results, setup)
        with trio.fail_after(90):
            await results.all_settled.wait()
            # The admitted ones have dribbled a few bytes each.
            results.wait_for_dribbling(3 * results.in_data)
            await results.dribbled_enough.wait()
        outcome = await trio.to_thread.run_sync(then)
        dropped = list(results.dropped)
        nursery.cancel_scope.cancel()
    # Every admitted slow client was still there after the normal one.
    assert dropped == [], dropped[:5]
    return outcome


def many_slow_daemon(launch: Launcher, **limit_values: object) -> Daemon:
    ensure_open_files(2 * SLOW_CLIENTS + 500)
    port = free_port()
    listen = [f"{HOST}:{port}"] + ([f"[::1]:{port}"] if ipv6_loopback() else [])
    settings = {
        "smtp": {
            "listen": listen,
            "max_connections": 1100,
            # Longer than the test: the slow clients are dropped by nothing but
            # what the test is about.
            "limits": {"data_rate_grace": 300, **limit_values},
        }
    }
    return launch.daemon(settings, smtp_port=port)


def timed_delivery(host: str, port: int) -> Callable[[], tuple[str, float]]:
    def deliver() -> tuple[str, float]:
        started = time.monotonic()
        job_id = deliver_with_smtplib(host, port, "among slow ones")
        return job_id, time.monotonic() - started

    return deliver


async def test_1000_slow_connections_do_not_stop_a_normal_client(launch: Launcher) -> None:
    daemon = many_slow_daemon(
        launch,
        exempt_networks=[],
        max_connections_per_address=0,
        max_new_connections_per_minute=0,
    )
    host = "::1" if ipv6_loopback() else HOST
    results = SlowClients()
    job_id, took = await with_slow_clients(
        daemon.smtp_port, results, timed_delivery(host, daemon.smtp_port)
    )
    assert results.errors == [], results.errors[:5]
    assert results.refused == [], results.refused[:5]
    assert results.in_data == SLOW_CLIENTS
    assert took < NORMAL_DELIVERY_BOUND, f"the normal client took {took:.1f} s"
    assert [job.id for job in daemon.jobs()] == [job_id]
    assert "Traceback" not in daemon.log_text()


async def test_1000_slow_connections_from_one_address_hit_its_limit(launch: Launcher) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1): the normal client needs another address")
    daemon = many_slow_daemon(launch, exempt_networks=[])  # 50 per address, the default
    results = SlowClients()
    job_id, took = await with_slow_clients(
        daemon.smtp_port, results, timed_delivery("::1", daemon.smtp_port)
    )
    assert results.errors == [], results.errors[:5]
    assert results.in_data == 50
    assert len(results.refused) == SLOW_CLIENTS - 50
    expected = "421 4.7.0 Too many connections from your address, try again later"
    assert set(results.refused) == {expected}
    assert took < NORMAL_DELIVERY_BOUND, f"the normal client took {took:.1f} s"
    assert [job.id for job in daemon.jobs()] == [job_id]
    assert daemon.jobs()[0].payload["remote_addr"].startswith("[::1]:")
    assert "Traceback" not in daemon.log_text()


def test_a_client_that_never_reads_its_replies_is_dropped(strict_timing: Daemon) -> None:
    # Pipelined commands whose replies the client never reads fill the
    # socket buffers; the server's write then waits, at most command_timeout.
    burst = b"NOOP\r\n" * 200_000  # 1.2 MB of commands, 2.6 MB of replies
    with socket.create_connection((HOST, strict_timing.smtp_port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 0
        sock.settimeout(0.5)
        started = time.monotonic()
        while sent < len(burst) and time.monotonic() - started < 30:
            try:
                sent += sock.send(burst[sent : sent + 65536])
            except TimeoutError:
                continue  # the server stopped reading: it is stuck writing to us
            except OSError:
                break  # it closed the connection
        strict_timing.wait_for_log("the client stopped reading its replies", timeout=15)
    assert time.monotonic() - started < 30
