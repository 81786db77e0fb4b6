"""``trismtp sendmail``: submit one message to the daemon the way sendmail is called.

Theory of operation
===================

PHP's ``mail()`` (``sendmail_path``), cron, mailx and countless scripts do not
speak SMTP: they run ``/usr/sbin/sendmail``, write one message to its stdin
and look at its exit status. This command is that program for trismtp. It
reads the message, works out the envelope the way sendmail does, and submits
it over SMTP to the daemon's first ``smtp.listen`` address, so the message
becomes a job exactly like one from any other client: the exit status is 0
only after the daemon answered ``250``, which it does only once the job is
durable.

The command line is sendmail's (see :func:`parse_args`): recipients as
arguments and/or ``-t`` (the To, Cc and Bcc headers), ``-f`` for the envelope
sender, ``-i``/``-oi`` so that a line holding a single dot does not end the
message. Flags that mean something only to a real MTA (``-odi``, ``-oem``,
``-bm``, ``-F name``, ``-B 8BITMIME``, …) are accepted and ignored, because
callers pass them out of habit; a mode this command cannot do (``-bs``,
``-bp``, ``-q``) is a usage error rather than a silent success.

The message is read as lines: LF or CRLF line ends both become CRLF, and
smtplib dot-stuffs it on the wire. Like sendmail, the command adds a From,
Date or Message-ID header when the message lacks one, and removes Bcc headers
so that the stored message does not show the blind copies.

Submission is all or nothing: if the daemon refuses any recipient, the
message is not sent to the others (RSET), so a caller that retries on a
non-zero exit status never makes a duplicate.

Exit status follows ``sysexits.h``: a 4xx reply, a refused connection or a
timeout is ``EX_TEMPFAIL`` (75), which cron and PHP treat as "try later";
5xx replies map to ``EX_NOUSER`` (67, a recipient), ``EX_DATAERR`` (65, the
message or the sender address) or ``EX_UNAVAILABLE`` (69, anything else).
Every failure is one line on stderr.
"""

from __future__ import annotations

import getpass
import re
import smtplib
import socket
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from typing import BinaryIO, NoReturn

from trismtp.settings import ConfigError, HostPort, load_settings, parse_host_port

__all__ = ["Options", "SendmailError", "main", "parse_args", "prepare", "read_message"]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_CONFIG = 78

# Seconds to wait for a reply beyond jobs.push_timeout: the 250 after the
# final dot comes only once the job is durable.
REPLY_SLACK = 30.0
CONNECT_TIMEOUT = 10.0

# sendmail flags that take a value, attached (-fADDR) or as the next argument.
_WITH_VALUE = frozenset("fFrABCLhNORVXpo")
# Flags without a value that only an MTA acts on; accepted and ignored.
_IGNORED = frozenset("mnvUG")
# A header field's first line: a name of printable characters but ":", then ":".
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")

USAGE = """\
usage: trismtp sendmail [-t] [-i] [-f ADDR] [-F NAME] [-v] [--config FILE]
                        [--server HOST:PORT] [--] [RCPT ...]

Read one message on stdin and submit it to the trismtp daemon over SMTP, as
sendmail does (PHP mail() via sendmail_path, cron, mailx).

  RCPT               recipients (also "a@x, b@y")
  -t                 also take recipients from the To, Cc and Bcc headers
  -i, -oi            a line holding a single "." does not end the message
  -f ADDR, -r ADDR   envelope sender (default: USER@HOSTNAME; -f "" for <>)
  -F NAME            the sender's name, used when the message has no From
  -v                 print the daemon's final reply ("queued as …") on stderr
  --config FILE      settings file (default: $TRISMTP_CONFIG, else ./settings.toml)
  --server HOST:PORT the daemon's SMTP address (default: the first smtp.listen)

Other sendmail flags (-odi, -oem, -bm, -B 8BITMIME, -N, -R, …) are ignored.
Exit status (sysexits): 0 queued, 64 usage, 65 bad message or sender,
67 recipient refused, 69 refused otherwise, 75 temporary failure (retry),
78 settings error.
"""


class SendmailError(Exception):
    """The message was not submitted; ``status`` is the sysexits code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asked for."""

    recipients: tuple[str, ...] = ()
    from_headers: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    config: str | None = None
    server: str | None = None
    ignored: tuple[str, ...] = field(default=())
    help: bool = False


def parse_args(argv: Sequence[str]) -> Options:
    """Parse sendmail's command line; raise SendmailError(EX_USAGE) if unusable.

    Options end at ``--`` or at the first argument that is not one, as with
    sendmail's getopt; the rest are recipients.
    """
    values: dict[str, str] = {}
    flags: set[str] = set()
    ignored: list[str] = []
    config = server = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg == "--help":
            return Options(help=True)
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in ("--config", "--server"):
                raise SendmailError(f"unknown option {name}", EX_USAGE)
            if not eq:
                if i >= len(args):
                    raise SendmailError(f"{name} needs a value", EX_USAGE)
                value = args[i]
                i += 1
            if name == "--config":
                config = value
            else:
                server = value
            continue
        if not arg.startswith("-") or arg == "-":
            i -= 1
            break
        letter, rest = arg[1], arg[2:]
        if letter in _WITH_VALUE:
            if not rest:
                if i >= len(args):
                    raise SendmailError(f"-{letter} needs a value", EX_USAGE)
                rest = args[i]
                i += 1
            if letter == "o":
                if rest == "i":
                    flags.add("i")
                else:
                    ignored.append(f"-o{rest}")
            elif letter in "fr":
                values["f"] = rest
            elif letter == "F":
                values["F"] = rest
            else:
                ignored.append(f"-{letter}{rest}")
            continue
        if letter == "b":
            if rest != "m":
                raise SendmailError(
                    f"-b{rest} is not supported: trismtp sendmail only submits a message (-bm)",
                    EX_USAGE,
                )
            continue
        # Clustered flags without values: -ti, -it, -tv.
        for char in arg[1:]:
            if char in "tiv":
                flags.add(char)
            elif char in _IGNORED:
                ignored.append(f"-{char}")
            else:
                raise SendmailError(
                    f"unsupported option -{char} (see trismtp sendmail --help)", EX_USAGE
                )
    recipients: list[str] = []
    for arg in args[i:]:
        recipients += [address for _, address in getaddresses([arg]) if address]
    return Options(
        recipients=tuple(recipients),
        from_headers="t" in flags,
        ignore_dots="i" in flags,
        sender=values.get("f"),
        full_name=values.get("F"),
        verbose="v" in flags,
        config=config,
        server=server,
        ignored=tuple(ignored),
    )


def read_message(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """The message from ``stream`` with CRLF line ends.

    Without ``ignore_dots`` a line holding only ``.`` ends it, as in sendmail.
    """
    lines: list[bytes] = []
    for line in stream:
        text = line.removesuffix(b"\n").removesuffix(b"\r")
        if not ignore_dots and text == b".":
            break
        lines.append(text)
    return b"".join(line + b"\r\n" for line in lines)


def prepare(
    message: bytes, options: Options, sender: str, hostname: str
) -> tuple[bytes, list[str]]:
    """The message to send and its recipients.

    Adds ``-t``'s header recipients to the arguments' (as Postfix does),
    removes Bcc, adds From, Date and Message-ID when missing.
    """
    header_lines, body = _split_header(message)
    fields = _fields(header_lines)
    recipients = [qualify(r, hostname) for r in options.recipients]
    if options.from_headers:
        for name in ("to", "cc", "bcc"):
            values = [_unfold(f) for f in fields if _field_name(f) == name]
            recipients += [qualify(a, hostname) for _, a in getaddresses(values) if a]
    kept = [f for f in fields if _field_name(f) != "bcc"]
    names = {_field_name(f) for f in kept}
    added: list[bytes] = []
    if "from" not in names and sender:  # the null sender has no address to show
        added.append(b"From: " + formataddr((options.full_name or "", sender)).encode() + b"\r\n")
    if "date" not in names:
        added.append(f"Date: {formatdate(localtime=True)}\r\n".encode())
    if "message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}\r\n".encode())
    unique = list(dict.fromkeys(recipients))
    return b"".join([*added, *kept]) + b"\r\n" + body, unique


def qualify(address: str, hostname: str) -> str:
    """``user`` becomes ``user@hostname``, as sendmail qualifies local names."""
    if not address or "@" in address:
        return address
    return f"{address}@{hostname}"


def _split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """The header lines (each with its CRLF) and the body.

    The header ends at the first empty line, or at the first line that is
    neither a field nor a continuation (a message typed without headers).
    """
    lines = message.splitlines(keepends=True)
    header: list[bytes] = []
    for index, line in enumerate(lines):
        if line == b"\r\n":
            return header, b"".join(lines[index + 1 :])
        if _HEADER_FIELD.match(line) or (header and line[:1] in (b" ", b"\t")):
            header.append(line)
            continue
        return header, b"".join(lines[index:])
    return header, b""


def _fields(lines: list[bytes]) -> list[bytes]:
    """Header lines grouped into fields (a line and its continuations)."""
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> str:
    return field.partition(b":")[0].strip().decode("ascii", "replace").lower()


def _unfold(field: bytes) -> str:
    value = field.partition(b":")[2].decode("utf-8", "replace")
    return re.sub(r"\r\n([ \t])", r"\1", value).strip()


def _server(options: Options) -> tuple[HostPort, float]:
    """Where the daemon listens, and how long to wait for a reply."""
    try:
        settings = load_settings(options.config)
    except ConfigError as exc:
        raise SendmailError(f"invalid settings: {exc}", EX_CONFIG) from None
    timeout = settings.jobs.push_timeout + REPLY_SLACK
    if options.server is not None:
        try:
            return parse_host_port(options.server), timeout
        except ValueError as exc:
            raise SendmailError(f"--server: {exc}", EX_USAGE) from None
    address = settings.smtp.addresses()[0]
    # A wildcard listener is reached over loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    return HostPort(host, address.port), timeout


def submit(
    server: HostPort,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    helo: str,
    timeout: float,
) -> str:
    """Send the message over SMTP; the final reply's text, or SendmailError."""
    where = f"the trismtp daemon at {server}"
    try:
        smtp = smtplib.SMTP(timeout=CONNECT_TIMEOUT, local_hostname=helo)
        code, text = smtp.connect(server.host, server.port)
        if code != 220:
            smtp.close()
            reply = _reply_text(code, text)
            raise SendmailError(f"{where} refused the connection: {reply}", _status(code))
        if smtp.sock is not None:
            smtp.sock.settimeout(timeout)
        try:
            return _transaction(smtp, sender, recipients, message)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()
    except ConnectionRefusedError:
        raise SendmailError(
            f"cannot connect to {where}: connection refused "
            "(is `trismtp serve` running? check smtp.listen or --server)",
            EX_TEMPFAIL,
        ) from None
    except TimeoutError:
        raise SendmailError(f"{where} did not answer in time", EX_TEMPFAIL) from None
    except smtplib.SMTPServerDisconnected:
        raise SendmailError(f"{where} closed the connection", EX_TEMPFAIL) from None
    except OSError as exc:
        raise SendmailError(f"cannot talk to {where}: {exc.strerror or exc}", EX_TEMPFAIL) from None
    except smtplib.SMTPException as exc:
        raise SendmailError(f"{where} answered what SMTP does not: {exc}", EX_PROTOCOL) from None


def _transaction(smtp: smtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes) -> str:
    code, text = smtp.ehlo()
    if code != 250:
        code, text = smtp.helo()
        if code != 250:
            raise _refused("HELO", code, text, EX_UNAVAILABLE)
    options: list[str] = []
    if smtp.has_extn("size"):
        options.append(f"SIZE={len(message)}")
    if not message.isascii() and smtp.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if not (sender + "".join(recipients)).isascii() and smtp.has_extn("smtputf8"):
        options.append("SMTPUTF8")
    code, text = smtp.mail(sender, options)
    if code == 552:  # the SIZE= it was told is over the limit
        raise _refused("the message", code, text, EX_DATAERR)
    if code != 250:
        # 501/553/555: the sender address itself is what is wrong.
        raise _refused(f"sender <{sender}>", code, text, EX_DATAERR, (501, 553, 555))
    for recipient in recipients:
        code, text = smtp.rcpt(recipient)
        if code not in (250, 251):
            # All or nothing: no recipient gets it (module docstring).
            with suppress(smtplib.SMTPException, OSError):
                smtp.rset()
            raise _refused(f"recipient <{recipient}>", code, text, EX_NOUSER)
    final: bytes | str
    try:
        # smtplib raises for a refused DATA command but returns the reply
        # after the final dot, whatever it is.
        code, final = smtp.data(message)
    except smtplib.SMTPDataError as exc:
        code, final = exc.smtp_code, exc.smtp_error
    if code != 250:
        # A 5xx about the upload is about the message: too large, bare CR/LF.
        raise _refused("the message", code, final, EX_DATAERR)
    return _reply_text(code, final)


def _refused(
    what: str,
    code: int,
    text: bytes | str,
    permanent: int,
    only: tuple[int, ...] | None = None,
) -> SendmailError:
    status = _status(code)
    if status == EX_UNAVAILABLE and (only is None or code in only):
        status = permanent
    verb = "deferred" if status == EX_TEMPFAIL else "refused"
    return SendmailError(f"{what} {verb}: {_reply_text(code, text)}", status)


def _status(code: int) -> int:
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if 500 <= code < 600:
        return EX_UNAVAILABLE
    return EX_PROTOCOL


def _reply_text(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"


def run(argv: Sequence[str], stdin: BinaryIO) -> int:
    """The command: returns the exit status, raises SendmailError on failure."""
    options = parse_args(argv)
    if options.help:
        print(USAGE, end="")
        return EX_OK
    if not options.recipients and not options.from_headers:
        raise SendmailError(
            "no recipients: give them as arguments, or -t to read To, Cc and Bcc", EX_USAGE
        )
    server, timeout = _server(options)
    hostname = socket.gethostname() or "localhost"
    sender = options.sender
    if sender is None:
        sender = getpass.getuser()
    elif "<" in sender:
        sender = parseaddr(sender)[1]  # -f "<>" is the null sender, as -f ""
    sender = qualify(sender.strip(), hostname)
    try:
        raw = read_message(stdin, ignore_dots=options.ignore_dots)
    except OSError as exc:
        raise SendmailError(f"cannot read the message: {exc.strerror or exc}", EX_IOERR) from None
    message, recipients = prepare(raw, options, sender, hostname)
    if not recipients:
        raise SendmailError("no recipients in the To, Cc or Bcc headers (-t)", EX_USAGE)
    reply = submit(server, sender, recipients, message, helo=hostname, timeout=timeout)
    if options.verbose:
        print(f"trismtp sendmail: {reply}", file=sys.stderr)
    return EX_OK


def main(argv: Sequence[str]) -> NoReturn:
    """``trismtp sendmail ARGS``: exit with a sysexits status, one line on failure."""
    try:
        status = run(argv, sys.stdin.buffer)
    except SendmailError as exc:
        print(f"trismtp sendmail: {exc}", file=sys.stderr)
        status = exc.status
    except KeyboardInterrupt:
        status = EX_TEMPFAIL
    sys.exit(status)
