"""Tests for the PROXY protocol parser (``trismtp.smtp.proxy``).

Version 2 headers are built here with :mod:`struct`, independently of the
parser, by :func:`v2` and its helpers. The hypothesis properties can be run
harder with ``TRISMTP_HYPOTHESIS_SCALE`` (a multiplier of every
``max_examples``).
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trismtp.smtp.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    ProxyError,
    ProxyHeader,
    is_trusted,
    parse_networks,
    parse_proxy_header,
)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x0, 0x1
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31
SMTP = b"EHLO client.example\r\n"


def scale(n: int) -> int:
    return n * int(os.environ.get("TRISMTP_HYPOTHESIS_SCALE", "1"))


def v2(
    command: int = PROXY,
    family: int = TCP4,
    block: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A version 2 header: signature, fixed part and ``block`` (addresses + TLVs)."""
    size = len(block) if length is None else length
    return SIGNATURE + struct.pack("!BBH", version << 4 | command, family, size) + block


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = (ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return struct.pack("!4s4sHH", *packed, sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = (ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return struct.pack("!16s16sHH", *packed, sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# -- version 1 -------------------------------------------------------------------


def test_v1_tcp4() -> None:
    header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    assert parse_proxy_header(header) == ProxyHeader(
        consumed=len(header),
        version=1,
        source=("192.0.2.1", 56324),
        destination=("198.51.100.2", 25),
    )


def test_v1_tcp6_addresses_come_back_normalised() -> None:
    header = b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::0002 0 65535\r\n"
    assert parse_proxy_header(header) == ProxyHeader(
        len(header), 1, ("2001:db8::1", 0), ("2001:db8::2", 65535)
    )


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 56324 25\r\n",
        # The specification says to ignore anything after UNKNOWN.
        b"PROXY UNKNOWN whatever the proxy says\r\n",
    ],
)
def test_v1_unknown_has_no_addresses(header: bytes) -> None:
    assert parse_proxy_header(header) == ProxyHeader(len(header), 1, None, None)


def test_v1_longest_headers_fit() -> None:
    # The 107 bytes of the specification are this worst case, UNKNOWN and all.
    address = "ffff:" * 7 + "ffff"
    header = f"PROXY UNKNOWN {address} {address} 65535 65535\r\n".encode()
    assert len(header) == V1_MAX_LENGTH
    assert parse_proxy_header(header + SMTP) == ProxyHeader(V1_MAX_LENGTH, 1, None, None)
    header = f"PROXY TCP6 {address} {address} 65535 65535\r\n".encode()
    assert parse_proxy_header(header + SMTP) == ProxyHeader(
        len(header), 1, (address, 65535), (address, 65535)
    )


def test_v1_data_after_header_is_left_for_the_caller() -> None:
    header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    data = bytearray(header + SMTP)
    result = parse_proxy_header(data)
    assert result is not None
    assert data[result.consumed :] == SMTP


def test_v1_incomplete_is_none() -> None:
    header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None


# -- version 2 -------------------------------------------------------------------


def test_v2_proxy_ipv4() -> None:
    header = v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 56324, 25))
    assert parse_proxy_header(header) == ProxyHeader(
        consumed=28, version=2, source=("192.0.2.1", 56324), destination=("198.51.100.2", 25)
    )


def test_v2_proxy_ipv6() -> None:
    header = v2(PROXY, TCP6, inet6("2001:db8::1", "2001:db8:0:1::2", 65535, 587))
    assert parse_proxy_header(header) == ProxyHeader(
        consumed=52, version=2, source=("2001:db8::1", 65535), destination=("2001:db8:0:1::2", 587)
    )


def test_v2_udp_is_accepted_too() -> None:
    header = v2(PROXY, UDP4, inet4("192.0.2.1", "198.51.100.2", 1, 2))
    assert parse_proxy_header(header) == ProxyHeader(28, 2, ("192.0.2.1", 1), ("198.51.100.2", 2))
    header = v2(PROXY, UDP6, inet6("::1", "::2", 1, 2))
    assert parse_proxy_header(header) == ProxyHeader(52, 2, ("::1", 1), ("::2", 2))


@pytest.mark.parametrize(
    "header",
    [
        v2(LOCAL, UNSPEC),
        # LOCAL (a health check by the proxy itself) may carry a block, and
        # the specification says to ignore its family.
        v2(LOCAL, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
        v2(LOCAL, 0xFF, b"\x00" * 7),
        v2(PROXY, UNSPEC),
        v2(PROXY, UNSPEC, b"ignored"),
        v2(PROXY, UNIX_STREAM, b"/run/client".ljust(108, b"\0") + b"/run/server".ljust(108, b"\0")),
    ],
)
def test_v2_without_a_usable_address(header: bytes) -> None:
    assert parse_proxy_header(header) == ProxyHeader(len(header), 2, None, None)


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x04, b"") + tlv(0x05, b"unique-id") + tlv(0x20, b"\x07" + bytes(200))
    block = inet4("192.0.2.1", "198.51.100.2", 56324, 25) + tlvs
    header = v2(PROXY, TCP4, block)
    assert parse_proxy_header(header + SMTP) == ProxyHeader(
        len(header), 2, ("192.0.2.1", 56324), ("198.51.100.2", 25)
    )


def test_v2_tlvs_are_not_parsed() -> None:
    # Skipped means skipped: even a TLV whose length overruns the block is ignored.
    block = inet6("::1", "::2", 3, 4) + b"\x01\xff\xff"
    header = v2(PROXY, TCP6, block)
    assert parse_proxy_header(header) == ProxyHeader(len(header), 2, ("::1", 3), ("::2", 4))


def test_v2_data_after_header_is_left_for_the_caller() -> None:
    header = v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 56324, 25) + tlv(0x04, b"x"))
    data = bytearray(header + SMTP)
    result = parse_proxy_header(data)
    assert result is not None
    assert result.consumed == len(header)
    assert data[result.consumed :] == SMTP


def test_v2_largest_accepted_header() -> None:
    block = inet4("192.0.2.1", "198.51.100.2", 1, 2)
    block += tlv(0x04, bytes(V2_MAX_LENGTH - len(block) - 3))
    header = v2(PROXY, TCP4, block)
    assert len(block) == V2_MAX_LENGTH
    result = parse_proxy_header(header)
    assert result is not None
    assert result.consumed == 16 + V2_MAX_LENGTH


def test_v2_incomplete_is_none() -> None:
    header = v2(PROXY, TCP6, inet6("2001:db8::1", "2001:db8::2", 1, 2) + tlv(0x04, b"xyz"))
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None


# -- malformed headers -----------------------------------------------------------

MALFORMED = {
    "not a header": b"EHLO client.example\r\n",
    "lower case": b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "bad v2 signature": b"\r\n\r\n\x00\r\nQUIX\n" + bytes(16),
    "v1 no space": b"PROXYTCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "v1 bad protocol": b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
    "v1 UDP4": b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "v1 missing port": b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
    "v1 extra field": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
    "v1 double space": b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
    "v1 tab": b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n",
    "v1 bare LF": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
    "v1 no CRLF within 107": b"PROXY UNKNOWN " + b"x" * 100,
    "v1 over-long": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2" + b" " * 80 + b"\r\n",
    "v1 not ASCII": "PROXY TCP4 192.0.2.1 198.51.100.2 1 ２\r\n".encode(),
    "v1 bad IPv4": b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
    "v1 IPv4 leading zero": b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
    "v1 hostname": b"PROXY TCP4 localhost 198.51.100.2 1 2\r\n",
    "v1 TCP4 with IPv6": b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
    "v1 TCP6 with IPv4": b"PROXY TCP6 2001:db8::1 198.51.100.2 1 2\r\n",
    "v1 IPv6 scope": b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    "v1 port too big": b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
    "v1 port leading zero": b"PROXY TCP4 192.0.2.1 198.51.100.2 025 2\r\n",
    "v1 port sign": b"PROXY TCP4 192.0.2.1 198.51.100.2 +25 2\r\n",
    "v1 port negative": b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    "v1 port hex": b"PROXY TCP4 192.0.2.1 198.51.100.2 0x19 2\r\n",
    "v1 port empty": b"PROXY TCP4 192.0.2.1 198.51.100.2  2\r\n",
    "v2 version 1": v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2), version=1),
    "v2 version 3": v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2), version=3),
    "v2 bad command": v2(0x2, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2 bad family": v2(PROXY, 0x41, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2 bad transport": v2(PROXY, 0x13, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2 short IPv4 block": v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)[:11]),
    "v2 IPv6 with IPv4 block": v2(PROXY, TCP6, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2 short unix block": v2(PROXY, UNIX_STREAM, bytes(215)),
    "v2 too long": v2(PROXY, TCP4, bytes(V2_MAX_LENGTH + 1)),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_proxy_header(data)
    with pytest.raises(ProxyError):
        parse_proxy_header(data + SMTP)


@pytest.mark.parametrize(
    "data",
    [
        b"E",
        b"PROXX",
        b"\n",
        b"\r\r",
        b"\r\n\r\n\x00\r\nQ\x00",
        SIGNATURE + b"\x11",  # version 1
        SIGNATURE + b"\x2f",  # command 15
        v2(PROXY, 0x99)[:14],
        v2(PROXY, TCP4, length=V2_MAX_LENGTH + 1),  # only the 16 fixed bytes
        v2(PROXY, TCP4, length=0xFFFF),
        b"PROXY TCP4 192.0.2.1\n",
        b"PROXY " + b"x" * (V1_MAX_LENGTH - 6),
    ],
)
def test_errors_do_not_wait_for_more_data(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_proxy_header(data)


def test_empty_is_incomplete() -> None:
    assert parse_proxy_header(b"") is None
    assert parse_proxy_header(bytearray()) is None


# -- properties ------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid header of either version and the result it must parse to."""
    six = draw(st.booleans())
    addresses = ipv6 if six else ipv4
    src, dst = draw(addresses), draw(addresses)
    sport, dport = draw(ports), draw(ports)
    expected_source = (str(src), sport)
    expected_destination = (str(dst), dport)
    kind = draw(st.sampled_from(["v1", "v1 unknown", "v2", "v2 local"]))
    if kind == "v1":
        text = f"PROXY TCP{6 if six else 4} {src} {dst} {sport} {dport}\r\n"
        header = text.encode()
        return header, ProxyHeader(len(header), 1, expected_source, expected_destination)
    if kind == "v1 unknown":
        header = b"PROXY UNKNOWN\r\n"
        return header, ProxyHeader(len(header), 1, None, None)
    block = (inet6 if six else inet4)(str(src), str(dst), sport, dport)
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
    block += b"".join(tlv(t, value) for t, value in tlvs)
    if kind == "v2 local":
        header = v2(LOCAL, TCP6 if six else TCP4, block)
        return header, ProxyHeader(len(header), 2, None, None)
    header = v2(PROXY, TCP6 if six else TCP4, block)
    return header, ProxyHeader(len(header), 2, expected_source, expected_destination)


@settings(max_examples=scale(500), deadline=None)
@given(
    case=valid_headers(),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    rest=st.binary(max_size=20),
)
def test_any_split_gives_none_until_complete(
    case: tuple[bytes, ProxyHeader], cuts: list[int], rest: bytes
) -> None:
    header, expected = case
    stream = header + rest
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {len(stream)})
    received = bytearray()
    start = 0
    for point in points:
        received += stream[start:point]
        start = point
        result = parse_proxy_header(received)
        if len(received) < len(header):
            assert result is None
        else:
            assert result == expected


@settings(max_examples=scale(500), deadline=None)
@given(case=valid_headers())
def test_every_prefix_of_a_valid_header_is_incomplete(case: tuple[bytes, ProxyHeader]) -> None:
    header, expected = case
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None
    assert parse_proxy_header(header) == expected


def corrupt(case: tuple[bytes, ProxyHeader], index: int, byte: int, tail: bytes) -> bytes:
    """A valid header with one byte replaced, then ``tail``."""
    header = bytearray(case[0])
    header[index % len(header)] = byte
    return bytes(header) + tail


# Arbitrary bytes, bytes that start like a header, and valid headers with one
# byte wrong, so that hypothesis gets past the signature to the fields.
v1_tokens = st.sampled_from(
    [b"PROXY ", b"TCP4", b"TCP6", b"UNKNOWN", b" ", b"\r\n", b"\n", b"1.2.3.4", b"::1", b"25", b"0"]
)
arbitrary = (
    st.binary(max_size=300)
    | st.binary(max_size=300).map(lambda tail: SIGNATURE + tail)
    | st.builds(
        lambda command, family, size, tail: (
            SIGNATURE + struct.pack("!BBH", command, family, size) + tail
        ),
        st.sampled_from([0x20, 0x21]) | st.integers(0, 255),
        st.sampled_from([UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM]) | st.integers(0, 255),
        st.integers(0, 300),
        st.binary(max_size=300),
    )
    | st.lists(v1_tokens | st.binary(max_size=8), max_size=20).map(b"".join)
    | st.builds(corrupt, valid_headers(), st.integers(0, 500), st.integers(0, 255), st.binary())
)


def outcome(data: bytes) -> ProxyHeader | str | None:
    """The parse result, with any ProxyError as the string "error"."""
    try:
        return parse_proxy_header(data)
    except ProxyError:
        return "error"


@settings(max_examples=scale(1000), deadline=None)
@given(data=arbitrary)
def test_arbitrary_bytes_only_raise_proxy_error(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert result.version in (1, 2)
        assert 0 < result.consumed <= len(data)
        for address in (result.source, result.destination):
            if address is not None:
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 0xFFFF


@settings(max_examples=scale(300), deadline=None)
@given(data=arbitrary)
def test_more_data_never_changes_a_decision(data: bytes) -> None:
    # Once a prefix is decided (a header or an error), every longer prefix
    # gives the same answer: what the server did with a short read it would
    # have done with a long one.
    decided: ProxyHeader | str | None = None
    for end in range(len(data) + 1):
        result = outcome(data[:end])
        if decided is None:
            decided = result
        else:
            assert result == decided


# -- trusted networks ------------------------------------------------------------


def test_parse_networks() -> None:
    assert parse_networks(["10.0.0.0/8", "127.0.0.1", " ::1/128 ", "192.0.2.7/24"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv4Network("192.0.2.0/24"),
    )
    assert parse_networks([]) == ()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "", "10.0.0.0/8,"])
def test_parse_networks_names_the_bad_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_networks(["127.0.0.1", bad])
    assert repr(bad) in str(info.value)


def test_is_trusted() -> None:
    networks = parse_networks(["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"])
    assert is_trusted("10.1.2.3", networks)
    assert is_trusted("127.0.0.1", networks)
    assert is_trusted("2001:db8:1::5", networks)
    assert not is_trusted("127.0.0.2", networks)
    assert not is_trusted("11.0.0.1", networks)
    assert not is_trusted("2001:db9::1", networks)
    assert not is_trusted("10.1.2.3", ())


def test_is_trusted_matches_ipv4_mapped_addresses() -> None:
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    assert is_trusted("::ffff:10.1.2.3", parse_networks(["10.0.0.0/8"]))
    assert not is_trusted("::ffff:11.1.2.3", parse_networks(["10.0.0.0/8"]))


@pytest.mark.parametrize("address", ["", "not an address", "/run/trismtp.sock", "10.0.0.1:25"])
def test_is_trusted_rejects_non_addresses(address: str) -> None:
    assert not is_trusted(address, parse_networks(["0.0.0.0/0", "::/0"]))
