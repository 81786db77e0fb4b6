"""The HAProxy PROXY protocol, versions 1 and 2, server side, sans-io.

Theory of operation
===================

A TCP load balancer in front of the daemon (HAProxy, AWS NLB, nginx
``stream``) ends the client's TCP connection and opens its own, so the peer
address the daemon sees is the balancer's. The PROXY protocol fixes that: the
balancer sends one header *before* the SMTP stream that says who the real
client is. Version 1 is a line of text (``PROXY TCP4 <src> <dst> <sport>
<dport>\\r\\n``); version 2 is binary (a 12-byte signature, a 4-byte fixed
part, then an address block and optional TLVs). :func:`parse_proxy_header`
reads either, as bytes arrive, and says how many bytes the header took; the
bytes after it are the client's SMTP stream.

Only trusted networks may send the header. The header is just bytes the peer
chose to send, so any client allowed to send it could claim any source
address it liked and walk past every per-address limit, block list and log
line the daemon keys on the client's address. The server therefore expects a
header only from peers inside the configured networks (:func:`is_trusted`,
:func:`parse_networks`) and treats everyone else's bytes as plain SMTP.

Nothing here buffers without bound. A version 1 line is at most 107 bytes by
specification; a version 2 header declares its own length (up to 64 KiB), so
we refuse a declared length over :data:`V2_MAX_LENGTH` before waiting for it.
Otherwise a peer could make every connection hold tens of kilobytes before
it has said anything at all. TLVs (TLS details, unique ids, ...) are skipped,
not parsed: we only need the addresses.

The parser decides as early as the bytes allow: a prefix that can start
neither version is an error at once, and the fixed fields of version 2 are
checked as soon as they arrive. A prefix of a valid header is never an
error, so any way of splitting a header into reads gives ``None`` until the
header is complete and then the same result.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "Network",
    "ProxyError",
    "ProxyHeader",
    "is_trusted",
    "parse_networks",
    "parse_proxy_header",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The longest version 1 header, CRLF included (from the specification).
V1_MAX_LENGTH = 107

#: The largest version 2 length field we accept: the address block plus TLVs.
#: The biggest address block (AF_UNIX) is 216 bytes, which leaves room for
#: the usual TLVs; a header longer than this is refused rather than buffered.
V2_MAX_LENGTH = 1024

_V1_PREFIX = b"PROXY "
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct("!12sBBH")  # signature, version/command, family/protocol, length

_LOCAL = 0x0
_PROXY = 0x1

# Family/protocol byte: high nibble address family, low nibble transport.
# The specification lists exactly these; every other value must be rejected.
_UNSPEC = 0x00
_TCP4, _UDP4 = 0x11, 0x12
_TCP6, _UDP6 = 0x21, 0x22
_UNIX_STREAM, _UNIX_DGRAM = 0x31, 0x32
_V2_FAMILIES = {_UNSPEC, _TCP4, _UDP4, _TCP6, _UDP6, _UNIX_STREAM, _UNIX_DGRAM}
_IPV4_BLOCK = struct.Struct("!4s4sHH")
_IPV6_BLOCK = struct.Struct("!16s16sHH")
_UNIX_BLOCK_SIZE = 216  # two 108-byte socket paths

# Decimal 0-65535 with no sign and no leading zero; the range is checked apart.
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyError(ValueError):
    """The peer sent something that is not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    ``source`` and ``destination`` are ``(ip, port)`` with the IP in its usual
    text form, or ``None`` when the header carries no usable address
    (version 1 ``UNKNOWN``; version 2 ``LOCAL``, ``AF_UNSPEC`` or
    ``AF_UNIX``); the caller then uses the real peer address, as the
    specification asks. ``data[consumed:]`` is the start of the SMTP stream.
    """

    consumed: int
    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """Parse a PROXY header (either version) at the start of ``data``.

    Returns ``None`` when ``data`` is a valid but incomplete start of a
    header: read more and call again with everything received so far.
    Raises :class:`ProxyError` as soon as ``data`` cannot be the start of a
    valid header.
    """
    if not data:
        return None
    if data[0] == _V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == _V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyError("not a PROXY protocol header")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    head = bytes(data[:V1_MAX_LENGTH])
    if not head.startswith(_V1_PREFIX[: len(head)]):
        raise ProxyError("not a PROXY protocol header")
    end = head.find(b"\n")
    if end < 0:
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyError("PROXY v1 header too long")
        return None
    if head[end - 1 : end] != b"\r":
        raise ProxyError("PROXY v1 header does not end with CRLF")
    try:
        line = head[: end - 1].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 header is not ASCII") from None
    fields = line.split(" ")
    consumed = end + 1
    if fields[1:2] == ["UNKNOWN"]:
        # The specification says to ignore whatever follows UNKNOWN.
        return ProxyHeader(consumed, 1, None, None)
    if len(fields) != 6:
        raise ProxyError("PROXY v1 header needs 6 space-separated fields")
    _, protocol, src, dst, sport, dport = fields
    if protocol == "TCP4":
        version = 4
    elif protocol == "TCP6":
        version = 6
    else:
        raise ProxyError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(consumed, 1, source, destination)


def _v1_address(text: str, version: int) -> str:
    # A scope id ("fe80::1%eth0") means nothing on another host.
    if "%" not in text:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            if address.version == version:
                return str(address)
    raise ProxyError(f"PROXY v1 header has an invalid IPv{version} address")


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyError("PROXY v1 header has an invalid port")
    return int(text)


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    head = bytes(data[: _V2_FIXED.size])
    signature = head[: len(_V2_SIGNATURE)]
    if signature != _V2_SIGNATURE[: len(signature)]:
        raise ProxyError("not a PROXY protocol header")
    # Check each fixed field as soon as it has arrived.
    if len(head) > 12 and head[12] >> 4 != 2:
        raise ProxyError("PROXY v2 header has an unsupported version")
    if len(head) > 12 and head[12] & 0x0F not in (_LOCAL, _PROXY):
        raise ProxyError("PROXY v2 header has an unknown command")
    # For LOCAL the specification says the family is to be ignored.
    if len(head) > 13 and head[12] & 0x0F == _PROXY and head[13] not in _V2_FAMILIES:
        raise ProxyError("PROXY v2 header has an unknown address family")
    if len(head) < _V2_FIXED.size:
        return None
    _, version_command, family, length = _V2_FIXED.unpack(head)
    command = version_command & 0x0F
    if length > V2_MAX_LENGTH:
        raise ProxyError("PROXY v2 header too long")
    consumed = _V2_FIXED.size + length
    if len(data) < consumed:
        return None
    if command == _LOCAL:
        return ProxyHeader(consumed, 2, None, None)
    block = bytes(data[_V2_FIXED.size : consumed])  # addresses, then TLVs we skip
    if family in (_TCP4, _UDP4):
        src4, dst4, sport, dport = _unpack_block(_IPV4_BLOCK, block)
        source = (str(ipaddress.IPv4Address(src4)), sport)
        destination = (str(ipaddress.IPv4Address(dst4)), dport)
        return ProxyHeader(consumed, 2, source, destination)
    if family in (_TCP6, _UDP6):
        src6, dst6, sport, dport = _unpack_block(_IPV6_BLOCK, block)
        source = (str(ipaddress.IPv6Address(src6)), sport)
        destination = (str(ipaddress.IPv6Address(dst6)), dport)
        return ProxyHeader(consumed, 2, source, destination)
    if family in (_UNIX_STREAM, _UNIX_DGRAM) and length < _UNIX_BLOCK_SIZE:
        raise ProxyError("PROXY v2 address block too short")
    # AF_UNSPEC, or AF_UNIX whose paths are no use to us as a client address.
    return ProxyHeader(consumed, 2, None, None)


def _unpack_block(layout: struct.Struct, block: bytes) -> tuple[bytes, bytes, int, int]:
    if len(block) < layout.size:
        raise ProxyError("PROXY v2 address block too short")
    src, dst, sport, dport = layout.unpack_from(block)
    return src, dst, sport, dport


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """Parse networks such as ``"10.0.0.0/8"``, ``"127.0.0.1"`` or ``"::1/128"``.

    A bare address is a single-host network, and host bits are allowed
    (``"10.1.2.3/8"`` means ``10.0.0.0/8``), as people write them in
    configuration. Raises :class:`ValueError` naming the first bad entry.
    """
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as error:
            raise ValueError(f"invalid network {value!r}: {error}") from None
    return tuple(networks)


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    """Whether the peer ``address`` (a plain IP, no port) is inside ``networks``.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, as a dual-stack socket
    reports IPv4 peers) is also matched against the IPv4 networks. Anything
    that is not an IP address (a Unix socket peer, say) is not trusted.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks)
