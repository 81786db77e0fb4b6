"""The HAProxy PROXY protocol, v1 and v2, on the real server ([smtp.proxy_protocol]).

The daemon trusts 127.0.0.1 as a load balancer: connections from it must start
with a PROXY header, whose source becomes the client (the payload's
remote_addr and the key of the per-address limits). Connections from [::1]
are not trusted: plain SMTP.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .trismtp_e2e import (
    HOST,
    Daemon,
    Launcher,
    SmtpConn,
    SmtpConnTo,
    client_tls_context,
    free_port,
    ipv6_loopback,
    launcher,
    message,
    queued_id,
    wrap_tls,
    write_tls_files,
)

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 1.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL, V2_PROXY = 0x0, 0x1
V2_UNSPEC, V2_TCP4, V2_TCP6 = 0x00, 0x11, 0x21


def v1(source: str, sport: int, protocol: str = "TCP4") -> bytes:
    destination = "192.0.2.25" if protocol == "TCP4" else "2001:db8::25"
    return f"PROXY {protocol} {source} {destination} {sport} 25\r\n".encode()


def v2(command: int, family: int, block: bytes, version: int = 2) -> bytes:
    """A PROXY v2 header: signature, version/command, family/protocol, length, block."""
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, len(block)) + block


def v2_tcp4(source: str, sport: int, tlvs: bytes = b"") -> bytes:
    block = struct.pack(
        "!4s4sHH", socket.inet_aton(source), socket.inet_aton("192.0.2.25"), sport, 25
    )
    return v2(V2_PROXY, V2_TCP4, block + tlvs)


def v2_tcp6(source: str, sport: int, tlvs: bytes = b"") -> bytes:
    block = struct.pack(
        "!16s16sHH",
        socket.inet_pton(socket.AF_INET6, source),
        socket.inet_pton(socket.AF_INET6, "2001:db8::25"),
        sport,
        25,
    )
    return v2(V2_PROXY, V2_TCP6, block + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """PROXY from 127.0.0.1, one connection per client address at a time."""
    port = free_port()
    listen = [f"{HOST}:{port}"] + ([f"[::1]:{port}"] if ipv6_loopback() else [])
    settings = {
        "smtp": {
            "listen": listen,
            "proxy_protocol": {
                "trusted_networks": ["127.0.0.1/32"],
                "header_timeout": HEADER_TIMEOUT,
            },
            "limits": {"max_connections_per_address": 1, "exempt_networks": []},
        }
    }
    with launcher(tmp_path_factory.mktemp("proxy")) as launch:
        yield launch.daemon(settings, smtp_port=port)


def proxied(daemon: Daemon, header: bytes) -> SmtpConn:
    """A connection from 127.0.0.1 that starts with *header*."""
    conn = daemon.connect()
    conn.send(header)
    return conn


def deliver(conn: SmtpConn) -> str:
    conn.transaction()
    conn.send(message("proxied") + b".\r\n")
    return queued_id(conn.reply())


def payload_of(daemon: Daemon, job_id: str) -> dict[str, Any]:
    jobs = [job for job in daemon.jobs() if job.id == job_id]
    assert len(jobs) == 1
    return jobs[0].payload


@pytest.mark.parametrize(
    ("header", "remote_addr"),
    [
        (v1("203.0.113.7", 4242), "203.0.113.7:4242"),
        (v1("2001:db8::7", 4242, "TCP6"), "[2001:db8::7]:4242"),
        (v2_tcp4("203.0.113.8", 4243), "203.0.113.8:4243"),
        (v2_tcp6("2001:db8::1", 4242), "[2001:db8::1]:4242"),
        (
            v2_tcp6("2001:db8::2", 65535, tlv(0x02, b"mx.example.com") + tlv(0x05, b"id-1")),
            "[2001:db8::2]:65535",
        ),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6", "v2-tcp6-tlvs"],
)
def test_header_source_becomes_remote_addr(
    balanced: Daemon, header: bytes, remote_addr: str
) -> None:
    with proxied(balanced, header) as conn:
        conn.start()
        job_id = deliver(conn)
        conn.quit()
    assert payload_of(balanced, job_id)["remote_addr"] == remote_addr
    balanced.wait_for_log(f"from {remote_addr}: queued as {job_id}")


@pytest.mark.parametrize(
    "header",
    [v2(V2_LOCAL, V2_UNSPEC, b""), v1("ignored", 0, "UNKNOWN")],
    ids=["v2-local", "v1-unknown"],
)
def test_header_without_address_keeps_the_real_peer(balanced: Daemon, header: bytes) -> None:
    with proxied(balanced, header) as conn:
        local_port = conn.sock.getsockname()[1]
        conn.start()
        job_id = deliver(conn)
        conn.quit()
    assert payload_of(balanced, job_id)["remote_addr"] == f"127.0.0.1:{local_port}"


@pytest.mark.parametrize(
    "garbage",
    [
        b"EHLO client.e2e.test\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 203.0.113.999 192.0.2.25 4242 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 4242\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 4242 25\n",
        v2(V2_PROXY, V2_TCP4, b"\x00" * 12, version=1),
        v2(V2_PROXY, V2_TCP4, b"\x00" * 4),  # address block too short
        b"PROXY TCP4 203.0.113.7 192.0.2.25 4242 25" + b" " * 80,  # over 107 bytes, no CRLF
        v2(V2_PROXY, V2_TCP4, b"\x00" * 1025),  # over 1,024 bytes
    ],
    ids=[
        "smtp",
        "http",
        "v1-bad-ip",
        "v1-fields",
        "v1-bare-lf",
        "v2-version",
        "v2-short",
        "v1-too-long",
        "v2-too-long",
    ],
)
def test_bad_header_closes_without_greeting(balanced: Daemon, garbage: bytes) -> None:
    with proxied(balanced, garbage) as conn:
        assert conn.wait_closed() == b"", "no greeting, no reply: just the close"
    balanced.wait_for_log("bad PROXY protocol header")


@pytest.mark.parametrize(
    "partial", [b"", b"PROXY TCP4 ", V2_SIGNATURE], ids=["nothing", "v1", "v2"]
)
def test_no_header_in_time_closes_without_greeting(balanced: Daemon, partial: bytes) -> None:
    with proxied(balanced, partial) as conn:
        started = time.monotonic()
        assert conn.wait_closed() == b""
        waited = time.monotonic() - started
    assert waited >= HEADER_TIMEOUT - 0.1, f"closed after {waited:.2f} s"
    balanced.wait_for_log("no PROXY protocol header in time")


def test_per_address_limit_applies_to_the_proxied_address(balanced: Daemon) -> None:
    refusal = "421 4.7.0 Too many connections from your address, try again later"
    with (
        proxied(balanced, v1("198.51.100.1", 1001)) as first,
        proxied(balanced, v2_tcp4("198.51.100.2", 1002)) as second,
    ):
        # Two clients behind one balancer address: each has its own limit of 1.
        first.start()
        second.start()
        for header in (v2_tcp4("198.51.100.1", 1003), v1("198.51.100.2", 1004)):
            with proxied(balanced, header) as again:
                assert again.reply().last == refusal
                assert again.wait_closed() == b""
        first.quit()
        with proxied(balanced, v1("198.51.100.1", 1005)) as after:
            after.start()
            after.quit()
        second.expect("NOOP", "250")
        second.quit()


@pytest.mark.parametrize(
    "header",
    [v1("203.0.113.9", 2525), v2_tcp6("2001:db8::9", 2525)],
    ids=["v1", "v2"],
)
def test_header_and_first_commands_in_one_write(balanced: Daemon, header: bytes) -> None:
    with balanced.connect() as conn:
        conn.send(header + b"EHLO same.write.e2e.test\r\nMAIL FROM:<first@example.org>\r\n")
        conn.greeting()
        ehlo = conn.reply()
        assert ehlo.code == 250, ehlo
        assert ehlo.lines[0] == "localhost", ehlo
        assert conn.reply().last == "250 2.1.0 OK"
        conn.expect("RCPT TO:<rcpt@example.com>", "250")
        conn.expect("DATA", "354")
        conn.send(message("same write") + b".\r\n")
        job_id = queued_id(conn.reply())
        conn.quit()
    payload = payload_of(balanced, job_id)
    assert payload["envelope"]["helo"] == "same.write.e2e.test"
    assert payload["envelope"]["mail_from"] == "first@example.org"
    source = "203.0.113.9:2525" if header.startswith(b"PROXY") else "[2001:db8::9]:2525"
    assert payload["remote_addr"] == source


def test_untrusted_peer_speaks_plain_smtp(balanced: Daemon) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) to connect from an untrusted address")
    with SmtpConnTo("::1", balanced.smtp_port) as conn:
        conn.greeting()  # no header expected
        conn.expect(v1("203.0.113.7", 4242).decode().rstrip(), "500 5.5.2")
        conn.expect("EHLO untrusted.e2e.test", "250")
        job_id = deliver(conn)
        conn.quit()
    assert payload_of(balanced, job_id)["remote_addr"].startswith("[::1]:")


def test_header_before_implicit_tls(launch: Launcher, tmp_path: Path) -> None:
    """The balancer's header comes first, then the client's TLS handshake."""
    ca = trustme.CA()
    cert, key = write_tls_files(ca, tmp_path)
    implicit_port = free_port()
    settings = {
        "smtp": {
            "tls": {
                "certificate": str(cert),
                "key": str(key),
                "implicit_listen": [f"{HOST}:{implicit_port}"],
            },
            "proxy_protocol": {"trusted_networks": ["127.0.0.1/32"]},
        }
    }
    daemon = launch.daemon(settings)
    with SmtpConnTo(HOST, implicit_port) as conn:
        conn.send(v2_tcp4("203.0.113.44", 4465))
        wrap_tls(conn, client_tls_context(ca))
        conn.start()
        job_id = deliver(conn)
        conn.quit()
    payload = payload_of(daemon, job_id)
    assert payload["remote_addr"] == "203.0.113.44:4465"
    assert payload["tls"]["version"] == "TLSv1.3"
