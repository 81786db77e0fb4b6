"""A minimal Trio SMTP client for the latency generator and the idle connections.

It only knows what the harness needs: read a (multi-line) reply, send bytes,
say EHLO, run one pipelined transaction. Every wait is under the caller's
cancel scope; nothing here loops without reading new bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

__all__ = ["SmtpError", "SmtpStream", "make_message", "open_smtp"]

READ_SIZE = 65536


class SmtpError(Exception):
    """The server answered something else than expected, or closed the connection."""

    def __init__(self, what: str, code: int | None) -> None:
        super().__init__(f"{what}: got {code if code is not None else 'connection closed'}")
        self.code = code


@dataclass(eq=False)
class SmtpStream:
    """One SMTP connection: a Trio stream and the bytes read but not yet parsed."""

    stream: trio.SocketStream
    buffer: bytearray = field(default_factory=bytearray)

    async def reply(self) -> int:
        """The code of the next complete reply; SmtpError on EOF."""
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    raise SmtpError("reading a reply", None)
                self.buffer += data
                end = self.buffer.find(b"\r\n")
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            if len(line) < 3 or not line[:3].isdigit():
                raise SmtpError(f"not a reply line {line[:40]!r}", None)
            if len(line) == 3 or line[3:4] == b" ":
                return int(line[:3])

    async def expect(self, code: int, what: str) -> None:
        """Read one reply; SmtpError unless it is *code*."""
        got = await self.reply()
        if got != code:
            raise SmtpError(what, got)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def start_transaction(self, mail_from: str, rcpt: str) -> None:
        """MAIL, RCPT and DATA in one write (PIPELINING), up to the 354."""
        await self.send(f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        await self.expect(250, "MAIL")
        await self.expect(250, "RCPT")
        await self.expect(354, "DATA")

    async def quit(self) -> None:
        """QUIT and its 221 (the caller bounds the wait)."""
        await self.send(b"QUIT\r\n")
        await self.expect(221, "QUIT")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_smtp(host: str, port: int, helo: str = "bench.localhost") -> SmtpStream:
    """Connect, read the 220 greeting, say EHLO and read its 250."""
    stream = await trio.open_tcp_stream(host, port)
    smtp = SmtpStream(stream)
    try:
        await smtp.expect(220, "greeting")
        await smtp.send(f"EHLO {helo}\r\n".encode())
        await smtp.expect(250, "EHLO")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return smtp


def make_message(index: int, body_size: int, mail_from: str, rcpt: str) -> bytes:
    """A message like smtp-source's: a few headers, then 78-character lines of X.

    It is returned dot-stuffed (no line starts with a dot) and ends with the
    final ``CRLF.CRLF``.
    """
    header = (
        f"From: <{mail_from}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: latency probe {index}\r\n"
        f"Message-ID: <bench.{index}@localhost>\r\n"
        "\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    lines, rest = divmod(body_size, len(line))
    body = line * lines + (b"Y" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    return header + body + b".\r\n"
