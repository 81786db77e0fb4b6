"""Received message bytes -> the email payload of SPEC §5.

Theory of operation
-------------------

Whatever a client sends after DATA has already been accepted by the time it
reaches this module: the SMTP layer cannot take a 250 back. So parsing must
never fail. A message the parser cannot make sense of still becomes a
payload, with the raw bytes (``raw``/``raw_base64``) and whatever could be
read; one bad header or one bad part loses only itself. Every step that
touches client data sits in its own ``try``, and the parse itself falls back
from the modern policy to ``compat32`` (whose header access is plain string
slicing) to a headers-only parse before giving up on structure altogether.

The standard library's ``email`` package does the MIME work. Some of its
habits are expensive on the hot path, so we work around them rather than
replace it, each time building exactly what it would have built
(tests/test_payload_differential.py compares every payload with the parser
as it was before these shortcuts, byte for byte):

- ``policy.default`` builds a new header object, with a freshly created
  class, on *every* header access, and the parser itself reads a part's
  Content-Type several times. A memo in front of the header factory (per
  parse, and shared between messages for short values such as
  ``text/plain; charset=utf-8``) makes parsing a message of 1,000 parts
  about eight times faster.
- Most header values are plain ASCII with no encoded words; their decoded
  form is the unfolded source text, so we skip the header parser for them.
  Simple mailboxes (``<a@b>``, ``Name <a@b>``) are read without
  ``getaddresses``, and the mailboxes of a header value are remembered.
- The feed parser handles a message line by line, about a microsecond a
  line. A message with no MIME headers and a plain header block (most
  machine-sent mail) is read straight off its bytes; a single-part message
  or a multipart of plain parts (nested multiparts too, as mail clients
  send text + html + attachments) has its header blocks made into Messages
  directly and its bodies cut out of the bytes at the delimiters
  (``_parse_single_part``, ``_parse_flat_multipart``). Anything less plain
  goes through the whole parser.
- An attachment's ``content`` is base64 of its decoded octets, and most
  attachments arrive as just that, in lines of 76: where the text is
  canonical base64 once its line breaks are gone, it is the content as it
  is, without decoding and encoding megabytes again (``_base64_as_sent``).

Header values in ``message.headers`` are decoded as unstructured text (RFC
2047 encoded words decoded, folding and surrounding whitespace removed, raw
8-bit bytes read as UTF-8, or as Latin-1 where they are not UTF-8) and
otherwise kept as sent: a consumer looking at ``Date`` or ``From`` sees what
the sender wrote, not the library's re-rendering. Structured address data is
in ``envelope.from/to/ccs/replyTo``.

The parser reads bytes as ASCII with ``surrogateescape``, so any string that
came from the message may carry lone surrogates, which ``json.dumps`` would
pass through and a UTF-8 encoder would then reject. Every string that leaves
this module goes through :func:`_clean` (or comes from a decoder that cannot
produce surrogates).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import datetime
import email.errors
import email.feedparser
import email.policy
import email.utils
import functools
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import Message
from email.parser import BytesParser
from typing import Any, Final

__all__ = ["Envelope", "build_payload", "canonical_header_key"]

_EVENT = "EMAIL_RECEIVED"

# Multiparts nest this deep at most in any real mail; deeper parts are
# dropped (they are still in raw) so a hostile message cannot make the walk
# arbitrarily long. The parser itself recurses per level and hits Python's
# recursion limit somewhere past 500 levels: that case takes the fallbacks.
_MAX_DEPTH = 50

# The standard library's header parsers take time quadratic in a header's
# length: the modern one re-slices the rest of the value for every token, and
# the parameter splitter behind get_param/get_filename (both policies)
# re-counts quotes from the start for every ";". A 90 KB Content-Disposition
# of an open quote and semicolons took 4.6 s, and a header may be as long as
# the message. So no parser sees more than this many characters of a value:
# structured headers (Content-Type, …) are read from their first
# _MAX_PARSED_HEADER characters, longer address lists go to the linear legacy
# parser, and longer unstructured values are kept as received, undecoded.
# Real headers are far shorter; message.headers and raw keep every octet.
_MAX_PARSED_HEADER = 4096

# Headers whose values go to envelope.from/to/ccs/replyTo.
_ADDRESS_FIELDS = {"from": "from", "to": "to", "cc": "ccs", "reply-to": "replyTo"}

# message/* subtypes that hold one message a reader would see as part of this
# one (a forwarded message, a bounce's copy of the original): walked into
# unless sent as a file. Any other message/* (delivery-status, partial,
# external-body) is kept whole as an attachment.
_EMBEDDED_MESSAGES = frozenset({"message/rfc822", "message/global", "message/news"})

# Regenerates an embedded message's bytes as close to the source as the
# library allows: headers written as received, not refolded.
_FLATTEN_POLICY: email.policy.EmailPolicy[Any] = email.policy.default.clone(
    linesep="\r\n", refold_source="none"
)

_UTC = datetime.UTC

# File name extensions for the content types of unnamed parts, the preferred
# one first. A table of our own rather than the mimetypes module, whose
# answers change with the Python version and the host's /etc/mime.types.
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "application/gzip": (".gz",),
    "application/json": (".json",),
    "application/msword": (".doc",),
    "application/octet-stream": (".bin",),
    "application/pdf": (".pdf",),
    "application/pgp-signature": (".asc",),
    "application/pkcs7-signature": (".p7s",),
    "application/x-pkcs7-signature": (".p7s",),
    "application/vnd.ms-excel": (".xls",),
    "application/vnd.ms-powerpoint": (".ppt",),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": (".pptx",),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": (".xlsx",),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (".docx",),
    "application/xml": (".xml",),
    "application/zip": (".zip",),
    "audio/mpeg": (".mp3",),
    "image/bmp": (".bmp",),
    "image/gif": (".gif",),
    "image/heic": (".heic",),
    "image/jpeg": (".jpg", ".jpeg", ".jpe"),
    "image/png": (".png",),
    "image/svg+xml": (".svg",),
    "image/tiff": (".tif", ".tiff"),
    "image/webp": (".webp",),
    "image/x-icon": (".ico",),
    "message/global": (".eml",),
    "message/rfc822": (".eml",),
    "text/calendar": (".ics",),
    "text/css": (".css",),
    "text/csv": (".csv",),
    "text/html": (".html", ".htm"),
    "text/plain": (".txt",),
    "text/vcard": (".vcf",),
    "text/x-vcard": (".vcf",),
    "text/xml": (".xml",),
    "video/mp4": (".mp4",),
}

_TYPES_BY_EXTENSION = {ext: ctype for ctype, exts in _EXTENSIONS.items() for ext in exts} | {
    ".xml": "application/xml",
    ".eml": "message/rfc822",
    ".vcf": "text/vcard",
    ".p7s": "application/pkcs7-signature",
}

# Characters a derived file name keeps; anything else (a slash, a control
# character) becomes "_", so the name is safe to write as is.
_UNSAFE_NAME = re.compile(r"[^\w.+=-]+")
_MAX_DERIVED_NAME = 100

# policy.default's own registry (the standard header classes), shared: it
# holds no state once built.
_REGISTRY = HeaderRegistry()

# Linear white space between two RFC 2047 encoded words.
_ENCODED_WORD = r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?="
_BETWEEN_ENCODED_WORDS = re.compile(rf"({_ENCODED_WORD})[ \t\r\n]+(?={_ENCODED_WORD})")

# A Content-Type whose parameters follow the type without the ";".
_TYPE_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MISSING_SEMICOLON = re.compile(rf"({_TYPE_TOKEN}/{_TYPE_TOKEN})[ \t]+(?={_TYPE_TOKEN}\*?[ \t]*=)")

# A uuencoded file in a plain body: "begin <mode> <name>", lines, "end".
_UU_BEGIN = re.compile(r"^begin[ \t]+[0-7]{3,4}[ \t]+([^\r\n]+)\r?(?:\n|\Z)", re.MULTILINE)
_UU_END = re.compile(r"^end[ \t]*\r?(?:\n|\Z)", re.MULTILINE)

# A header line with white space before its colon (RFC 5322 §4.5 obsolete
# syntax, "Subject :hi"), which the standard library takes for the body.
_OBSOLETE_COLON = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)

# RFC 7230 token characters: what Go's CanonicalMIMEHeaderKey will rewrite.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# surrogateescape maps each undecodable byte 0x80-0xFF to U+DC80-U+DCFF.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# What base64 text may hold besides "=" (_base64_as_sent).
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session knew about the message."""

    helo: str
    mail_from: str  # "" for the null sender
    recipients: tuple[str, ...]
    remote_addr: str  # "203.0.113.5:53211" or "[::1]:53211"


def build_payload(
    raw: bytes,
    *,
    uuid: str,
    envelope: Envelope,
    received_at: datetime.datetime,
    include_raw: bool,
    authentication: dict[str, str] | None = None,
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The SPEC §5 payload as plain JSON-able data. Never raises on any input bytes.

    ``received_at`` should be aware; a naive value is taken as UTC.
    ``authentication`` keeps only ``mechanism`` and ``username``, so a
    password handed in by mistake never reaches a job.
    """
    factory = _MemoHeaderFactory()
    headers: dict[str, list[str]] = {}
    addresses: dict[str, list[dict[str, str]]] = {key: [] for key in _ADDRESS_FIELDS.values()}
    body = html_body = ""
    attachments: list[dict[str, Any]] = []
    simple = _simple_message(raw)
    parsed = None if simple is not None else _parse(raw, factory)
    if simple is not None:
        items, body = simple
        headers = _headers(items, factory, addresses)
        del items
    elif parsed is not None:
        msg, whole = parsed
        headers = _headers(msg.raw_items(), factory, addresses)
        if whole:
            walk = _Walk(reparse_budget=2 * len(raw))
            walk.run(msg)
            body = walk.body or ""
            html_body = walk.html_body or ""
            attachments = walk.attachments
        # The tree holds the message's text once more: gone before raw's copy.
        del msg
    del parsed

    subject = headers["Subject"][0] if "Subject" in headers else ""
    message_id = headers["Message-Id"][0] if "Message-Id" in headers else ""

    message: dict[str, Any] = {
        "id": message_id or None,
        "subject": subject,
        "headers": headers,
        "body": body,
        "html_body": html_body,
    }
    if include_raw:
        try:
            message["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            # The seed always sent raw as a string (Go's JSON encoder turns
            # invalid bytes into U+FFFD) and consumers read it unconditionally;
            # the exact bytes come along in raw_base64.
            message["raw"] = raw.decode("utf-8", "replace")
            message["raw_base64"] = base64.b64encode(raw).decode("ascii")

    return {
        "event": _EVENT,
        "uuid": uuid,
        "remote_addr": _clean(envelope.remote_addr),
        "received_at": _rfc3339(received_at),
        "size": len(raw),
        "envelope": {
            "helo": _clean(envelope.helo),
            "mail_from": _clean(envelope.mail_from),
            "allRecipients": [_clean(rcpt) for rcpt in envelope.recipients],
            **addresses,
        },
        "authentication": _authentication(authentication),
        "tls": dict(tls) if tls is not None else None,
        "message": message,
        "attachments": attachments,
    }


# --- parsing -----------------------------------------------------------------

# Most mail a service sends (a notification, a report, smtp-source's load) is
# a few header lines and one plain-text body, no MIME at all. For such a
# message the whole standard-library pipeline (feed parser, Message, walk)
# computes what can be read straight off the bytes: the header lines as the
# parser's header_source_parse cuts them, and the body as the bytes after the
# blank line, decoded as _text decodes an unlabelled body. The shortcut is
# taken only where the parser could not read the bytes any other way: every
# line of the block is "Name:value" (Name printable ASCII, no space) or a
# continuation, every line ends in CRLF, the block ends at the first CRLF
# CRLF, and no Content-* header (nor "begin ", a uuencoded file) asks for
# more. tests/test_payload_differential.py holds it to the full parse.
_SIMPLE_FIELD = r"[!-9;-~]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*"
_SIMPLE_BLOCK = re.compile(f"(?:{_SIMPLE_FIELD})+")
_FIELD = re.compile(r"([!-9;-~]+):([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")
_ANY_MIME_HEADER = re.compile(rb"(?i)content-")


def _simple_message(raw: bytes) -> tuple[list[tuple[str, str]], str] | None:
    """The raw header items and the body text of a simple message (see above), or None."""
    cut = raw.find(b"\r\n\r\n")
    if cut < 0 or _ANY_MIME_HEADER.search(raw, 0, cut) or raw.find(b"begin ", cut) >= 0:
        return None
    # Decoded as the feed parser decodes its input.
    block = raw[: cut + 2].decode("ascii", "surrogateescape")
    if _SIMPLE_BLOCK.fullmatch(block) is None:
        return None
    # header_source_parse: the name up to the colon; the value without the
    # blanks after the colon and without the final line break.
    items = [(match[1], match[2].lstrip(" \t").rstrip("\r\n")) for match in _FIELD.finditer(block)]
    return items, _unlabelled(raw[cut + 4 :])


class _MemoHeaderFactory:
    """``policy.default``'s header factory, remembering the header objects it made.

    Header objects are immutable, so handing out the same one for the same
    (name, value) is invisible to callers; it saves re-parsing a part's
    Content-Type each time the parser or the walk asks for it. Short values
    are remembered across messages too (``text/plain; charset=utf-8`` is in
    most mail), in a table shared by every parse and bounded in entries;
    longer ones only for one parse. The registry also builds a new class for
    every header it makes; one per header class is enough.
    """

    __slots__ = ("_headers",)

    def __init__(self) -> None:
        self._headers: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            return _REGISTRY(name, value)
        value = value[:_MAX_PARSED_HEADER]
        key = (name, value)
        memo = _SHARED_HEADERS if len(value) <= _MAX_SHARED_VALUE else self._headers
        header = memo.get(key)
        if header is None:
            base = _REGISTRY.registry.get(name.lower(), _REGISTRY.default_class)
            cls = _HEADER_CLASSES.get(base)
            if cls is None:
                cls = _HEADER_CLASSES[base] = _REGISTRY[name]
            header = cls(name, value)
            if memo is _SHARED_HEADERS and len(memo) >= _MAX_SHARED_HEADERS:
                # Dropping all at once keeps this a plain dict, whose single
                # operations are atomic for the parsing threads; the common
                # values are back after a few messages.
                memo.clear()
            memo[key] = header
        return header


# The header objects shared between parses: values up to _MAX_SHARED_VALUE
# characters, _MAX_SHARED_HEADERS of them. A parse tree is big: 8 KB for
# "text/plain; charset=utf-8", up to ~1 KB a character for a value made of
# parameters (";a=b;a=b…"), so a sender cycling through hostile values makes
# the table hold ~6 MB at most (measured); the few content types most mail
# uses stay in it.
_MAX_SHARED_VALUE = 100
_MAX_SHARED_HEADERS = 64
_SHARED_HEADERS: dict[tuple[str, str], BaseHeader] = {}
# The registry's class for each of its header classes (a handful).
_HEADER_CLASSES: dict[type[Any], type[BaseHeader]] = {}


class _BoundedCompat32(email.policy.Compat32):
    """``compat32`` whose header fetches see at most ``_MAX_PARSED_HEADER`` characters."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        return super().header_fetch_parse(name, value[:_MAX_PARSED_HEADER])


_COMPAT32 = _BoundedCompat32()


def _parse(raw: bytes, factory: _MemoHeaderFactory) -> tuple[Message, bool] | None:
    """The parsed message and whether its body was parsed too, or None.

    Tries the modern policy first, then ``compat32`` (robust where the modern
    header parser raises), then headers only (for nesting deep enough to
    exhaust the parser's recursion).
    """
    raw = _repair_header_block(raw)
    modern = email.policy.default.clone(header_factory=factory)
    attempts: tuple[tuple[email.policy.Policy[Any], bool], ...] = (
        (modern, False),
        (_COMPAT32, False),
        (_COMPAT32, True),
    )
    for policy, headersonly in attempts:
        try:
            single = _parse_quickly(raw, policy) if policy is modern else None
            # (A Message with no headers is falsy: no "or" here.)
            msg = _parse_bytes(raw, policy, headersonly=headersonly) if single is None else single
        except Exception:  # any failure means: try the next, more lenient way
            continue
        return msg, not headersonly
    return None


class _LineEndAtEnd:
    """``email.feedparser.NLCRE_eol`` that looks at the last two characters only.

    The feed parser strips the line break before a boundary from each part
    by searching the whole part for a CRLF, CR or LF at its very end, and
    ``re`` tries that at every position: for a 2.5 MB base64 attachment,
    more time than all the rest of its parse. A match can only start in the
    last two characters, and the parser only reads ``group(0)``, so
    searching those gives the same answer.
    """

    __slots__ = ("pattern",)

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern

    def search(self, text: str) -> re.Match[str] | None:
        """The line break that ends ``text``, as ``pattern.search(text)`` finds it."""
        return self.pattern.search(text[-2:])


# Installed for the whole process, and only over the exact pattern it stands
# for: another Python's parser keeps whatever it has.
_NLCRE_EOL = getattr(email.feedparser, "NLCRE_eol", None)
if isinstance(_NLCRE_EOL, re.Pattern) and _NLCRE_EOL.pattern == r"(\r\n|\r|\n)\Z":
    email.feedparser.NLCRE_eol = _LineEndAtEnd(_NLCRE_EOL)  # type: ignore[attr-defined]


# What BytesParser hands the feed parser at a time.
_FEED_CHUNK = 8192


def _parse_bytes(raw: bytes, policy: email.policy.Policy[Any], *, headersonly: bool) -> Message:
    """``BytesParser(policy).parsebytes(raw, headersonly)``, without two copies of ``raw``.

    The library decodes the whole message to one str and wraps it in a
    StringIO (four bytes a character), only to read it back 8 KiB at a time
    into its feed parser: six times the message's size at once. Feeding the
    parser the same 8 KiB pieces straight from the bytes builds the same tree.
    """
    parser: BytesFeedParser[Message] = BytesFeedParser(policy=policy)
    if headersonly:
        parser._set_headersonly()  # type: ignore[attr-defined]  # as BytesParser does
    for start in range(0, len(raw), _FEED_CHUNK):
        parser.feed(raw[start : start + _FEED_CHUNK])
    return parser.close()


# A header block that may declare a multipart or message/* body: those go
# through the whole parser. Case-insensitive, and anywhere in the block, so
# that it errs towards the full parse.
_MAY_NEST = re.compile(rb"(?i)multipart|message/")
# A part's header block that may declare a message/* body (never read quickly).
_MAY_EMBED = re.compile(rb"(?i)message/")


def _parse_quickly(raw: bytes, policy: email.policy.Policy[Any]) -> Message | None:
    """The parser's tree for a single-part or a plain multipart message, or None (parse it all)."""
    single = _parse_single_part(raw, policy)
    if single is not None:
        return single
    try:
        return _parse_flat_multipart(raw, policy)
    except Exception:  # let the whole parse decide what fails
        return None


# RFC 2046 §5.1.1 boundary characters, without the space: a boundary that
# needs no unquoting or decoding to compare with a line's bytes.
_PLAIN_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=?-]{1,70}")


def _parse_flat_multipart(raw: bytes, policy: email.policy.Policy[Any]) -> Message | None:
    """The parser's tree for a multipart of single parts and such multiparts, or None.

    The same saving as :func:`_parse_single_part` for the most common MIME
    shapes (text + html, text + attachments, and those nested: a mail
    client's ``mixed`` holding an ``alternative`` and a PDF): the feed
    parser reads every line of every part to find the boundaries; here the
    boundary lines are found with one search over the bytes, each part's
    header block is parsed alone and its body set as the parser would set
    it. Only where the parser could not read the bytes any other way: the
    message's and each part's header block is plain (see
    :func:`_simple_message`) and ends at its first CRLF CRLF; each boundary
    is plain; every line that starts with it is exactly a delimiter ("--b")
    or the close delimiter ("--b--") between CRLFs, and none follows a bare
    CR (the parser breaks lines there too); each multipart has a first
    delimiter, a close delimiter, and no two delimiters follow each other;
    no part is message/*, no multipart is multipart/digest (whose parts
    default to message/rfc822), and they nest at most
    :data:`_QUICK_NESTING` deep. Anything else: None.
    """
    cut = raw.find(b"\r\n\r\n")
    if cut < 0:
        return None
    if _SIMPLE_BLOCK.fullmatch(raw[: cut + 2].decode("ascii", "surrogateescape")) is None:
        return None
    root = _plain_message(raw[: cut + 2].decode("ascii", "surrogateescape"), policy)
    if not _fill_multipart(root, raw, cut + 4, len(raw), policy, 0):
        return None
    return root


_QUICK_NESTING: Final = 8
"""Multiparts nested deeper than this go through the whole parser."""


def _fill_multipart(
    msg: Message, raw: bytes, start: int, end: int, policy: email.policy.Policy[Any], depth: int
) -> bool:
    """Give multipart ``msg``, whose body is ``raw[start:end]``, the parts,
    preamble and epilogue the parser gives it; False where that is not sure.

    At ``depth`` 0 ``msg`` is the message; deeper, it is a part, and
    ``end`` is where the line break before its parent's next delimiter
    starts (that line break belongs to the delimiter, RFC 2046 §5.1.1).
    """
    if msg.get_content_maintype() != "multipart" or msg.get_content_type() == "multipart/digest":
        return False
    boundary = msg.get_boundary()
    if not isinstance(boundary, str) or _PLAIN_BOUNDARY.fullmatch(boundary) is None:
        return False
    # The parser reads this header here too (and notes a defect), so a value
    # the header parser chokes on fails here as it fails there.
    if str(msg.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
        msg.defects.append(email.errors.InvalidMultipartContentTransferEncodingDefect())
    dash_boundary = b"--" + boundary.encode("ascii")
    if raw.find(b"\r" + dash_boundary, start, end) >= 0:
        return False  # a line after a bare CR that may be a delimiter
    parts: list[Message | str] = []
    preamble_end = -1
    part_start = -1  # where the part after the last delimiter starts
    close = -1  # where the close delimiter line ends
    for line_start, line_end in _lines_starting_with(raw, start, end, dash_boundary):
        rest = raw[line_start + len(dash_boundary) : line_end]
        if rest not in (b"", b"--"):
            return False  # a line the parser may or may not take for a delimiter
        if line_start > start and raw[line_start - 2 : line_start] != b"\r\n":
            return False  # the line break before it is bare
        if line_end < end and raw[line_end : line_end + 2] != b"\r\n":
            return False  # so is the one after it
        if part_start >= 0:
            part = _parse_part(raw, part_start, line_start, policy, depth)
            if part is None:
                return False
            parts.append(part)
        elif rest:
            return False  # closed before it opened
        else:
            preamble_end = line_start
        if rest:
            close = line_end
            break
        part_start = line_end + 2
    if close < 0 or not parts:
        return False
    # What the parser leaves on the multipart besides its parts; nothing in
    # the payload reads these, they are kept true for the tree's sake.
    msg.set_payload(parts)  # what attaching them one by one makes
    if preamble_end > start:
        msg.preamble = raw[start : preamble_end - 2].decode("ascii", "surrogateescape")
    epilogue = raw[close + 2 : end].decode("ascii", "surrogateescape") if close < end else ""
    if depth == 0:
        msg.epilogue = epilogue
    else:
        # A part's epilogue loses the line break before the parent's
        # delimiter, as its last part's body does; with no line after its
        # close delimiter at all, the parser leaves it None.
        msg.epilogue = None if close == end else epilogue
    return True


def _lines_starting_with(
    raw: bytes, start: int, end: int, prefix: bytes
) -> Iterator[tuple[int, int]]:
    """(start, end before CR) of each line of ``raw[start:end]`` that starts with ``prefix``."""
    if raw.startswith(prefix, start, end):
        found = start
    else:
        found = raw.find(b"\n" + prefix, start, end) + 1
    while found > 0:
        line_end = raw.find(b"\r", found + len(prefix), end)
        line_end = end if line_end < 0 else line_end
        yield found, line_end
        found = raw.find(b"\n" + prefix, line_end, end) + 1


def _parse_part(
    raw: bytes, start: int, end: int, policy: email.policy.Policy[Any], depth: int
) -> Message | None:
    """The part ``raw[start:end]`` (last line break included) as the parser reads it, or None."""
    cut = raw.find(b"\r\n\r\n", start, end)
    if cut < 0:
        return None  # headers up to the delimiter (none at all fails below)
    if _MAY_EMBED.search(raw, start, cut):
        return None
    block = raw[start : cut + 2].decode("ascii", "surrogateescape")
    if _SIMPLE_BLOCK.fullmatch(block) is None:
        return None
    part = _plain_message(block, policy)
    body = cut + 4
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        if depth + 1 >= _QUICK_NESTING or not _fill_multipart(
            part, raw, body, end - 2, policy, depth + 1
        ):
            return None
        return part
    if maintype == "message":
        return None
    # The parser's payload: the lines up to the delimiter, without the line
    # break before it, which belongs to the delimiter (RFC 2046 §5.1.1).
    part.set_payload(raw[body : end - 2].decode("ascii", "surrogateescape") if end > body else "")
    return part


def _plain_message(block: str, policy: email.policy.Policy[Any]) -> Message:
    """The message the feed parser starts for a header block ``_SIMPLE_BLOCK`` matches.

    What its ``_new_message`` and ``_parse_headers`` do for such a block: a
    new message of the policy's class, and each field set raw, cut as
    ``header_source_parse`` cuts it. Its body is for the caller to set.
    """
    factory = policy.message_factory or Message
    msg: Message = factory(policy=policy)
    for field in _FIELD.finditer(block):
        msg.set_raw(field[1], field[2].lstrip(" \t").rstrip("\r\n"))
    return msg


def _parse_single_part(raw: bytes, policy: email.policy.Policy[Any]) -> Message | None:
    """The tree the parser builds for a message that is not multipart or message/*, or None.

    The feed parser splits the body of such a message into lines only to
    join them again into its payload, and that line loop was most of the
    CPU of parsing a big one (10 MB: ~60 ms, a microsecond a line). When the
    header block ends at the first CRLF CRLF, only that block is parsed and
    the rest is the payload, as the parser itself would have made it. If
    the parser does not read the block that way (a line that is no header,
    a "From " line pushed back, any nesting), None: parse it all.
    """
    cut = raw.find(b"\r\n\r\n")
    if cut < 0 or _MAY_NEST.search(raw, 0, cut):
        return None
    end = cut + 4
    block = raw[: cut + 2].decode("ascii", "surrogateescape")
    try:
        if _SIMPLE_BLOCK.fullmatch(block) is not None:
            msg = _plain_message(block, policy)
        else:
            msg = _parse_bytes(raw[:end], policy, headersonly=False)
            if msg.is_multipart() or msg._payload != "":  # type: ignore[attr-defined]
                return None  # the parser did not read it as headers and a blank line
        if msg.get_content_maintype() in ("multipart", "message"):
            return None
    except Exception:  # let the whole parse decide what fails
        return None
    # What the parser's single-part branch stores: the rest of its input, as
    # it decoded it (ASCII with surrogateescape), line ends untouched.
    msg.set_payload(raw[end:].decode("ascii", "surrogateescape"))
    return msg


def _repair_header_block(raw: bytes) -> bytes:
    """``raw`` with "Name :value" header lines written "Name:value" for the parser.

    Only the top-level header block is touched, and only the bytes the
    parser sees: ``raw``/``size`` in the payload are the bytes received.
    """
    if raw.startswith((b"\r\n", b"\n")):
        return raw  # no header block at all
    # The block ends at the first empty line, CRLF or bare LF; searched
    # only as far as needed, since a message may be 25 MB of CRLF lines.
    end = raw.find(b"\n\r\n")
    end = len(raw) if end < 0 else end + 1
    bare = raw.find(b"\n\n", 0, end)
    if bare >= 0:
        end = bare + 1
    if not _OBSOLETE_COLON.search(raw, 0, end):
        return raw
    return _OBSOLETE_COLON.sub(rb"\1:", raw[:end]) + raw[end:]


def _headers(
    items: Iterable[tuple[str, Any]],
    factory: _MemoHeaderFactory,
    addresses: dict[str, list[dict[str, str]]],
) -> dict[str, list[str]]:
    """Every top-level header (``raw_items()`` of the message), decoded, under its canonical name.

    Fills ``addresses`` on the way.
    """
    headers: dict[str, list[str]] = {}
    # Header names are case-insensitive; every spelling of a name goes under
    # its canonical key, as in the seed (Go's net/textproto).
    keys: dict[str, str] = {}
    for name, value in items:
        key = keys.get(name)
        if key is None:
            key = keys[name] = canonical_header_key(_clean(name))
        values = headers.get(key)
        if values is None:
            values = headers[key] = []
        values.append(_decode_header(value))
        field = _ADDRESS_FIELDS.get(name.lower())
        if field is not None:
            addresses[field].extend(_addresses(factory, name, value))
    return headers


# Mail uses a few dozen header names; remembering them makes the key a
# dictionary lookup. Bounded, so a message of 10,000 made-up names costs
# only their own computation.
@functools.lru_cache(maxsize=1024)
def canonical_header_key(name: str) -> str:
    """``name`` as Go's ``textproto.CanonicalMIMEHeaderKey`` writes it.

    The first letter and every letter after a hyphen upper-case, the other
    letters lower-case (``MESSAGE-ID`` -> ``Message-Id``). A name that is not
    an RFC 7230 token (a space, a non-ASCII or other invalid character) or is
    empty comes back unchanged, as Go returns it.
    """
    if not _TOKEN.fullmatch(name):
        return name
    # str.capitalize on an ASCII token is exactly Go's rule for one word.
    return "-".join(word.capitalize() for word in name.split("-"))


def _unfold(value: str) -> str:
    # The parser keeps a folded header's line breaks in the value; unfolding
    # (RFC 5322 §2.2.3) removes them and keeps the whitespace that follows.
    if "\r" in value or "\n" in value:
        return value.replace("\r", "").replace("\n", "")
    return value


def _decode_header(value: Any) -> str:
    """A raw header value as text: unfolded, encoded words decoded."""
    # compat32 holds Header objects only for messages built in code, never
    # for parsed ones; str() keeps this total anyway.
    # Whitespace around a value is syntax, not content; a header folded
    # right after its colon would otherwise start with a space.
    source = _unfold(value if isinstance(value, str) else str(value)).strip(" \t")
    if source.isascii() and "=?" not in source:
        # Nothing to decode: the header parser would return the same text.
        return source
    if len(source) > _MAX_PARSED_HEADER:
        return _clean(source)  # too long to parse, see _MAX_PARSED_HEADER
    try:
        text = str(UnstructuredHeader.value_parser(source)).strip(" \t")
    except Exception:
        text = source
    return _clean(text)


def _addresses(factory: _MemoHeaderFactory, name: str, value: Any) -> list[dict[str, str]]:
    """The mailboxes of one address header as ``{"email", "name"}``."""
    text = _unfold(value if isinstance(value, str) else str(value))
    if len(text) > _MAX_PARSED_HEADER or (text.isascii() and "=?" not in text and "(" not in text):
        # Nothing to decode and no comments (which the legacy parser takes
        # for names): it gives the same mailboxes as the modern parser at a
        # fraction of the cost (a fifth of all CPU for small mail, profiled).
        # Too long for the modern parser: the legacy one is linear.
        return _legacy_addresses(text)
    if "=?" in text:
        # RFC 2047 §6.2: white space between adjacent encoded words is not
        # text. CPython's address parser keeps it (gh-128110, "Jürgen
        # Schmürgen" with two spaces) up to 3.13 at least, so it gets the
        # words already joined, which every version decodes right.
        text = _BETWEEN_ENCODED_WORDS.sub(r"\1", text)
    found: list[dict[str, str]] = []
    try:
        header = factory(name, text)
        for address in header.addresses:
            found.append(
                {
                    "email": _clean(address.addr_spec),
                    "name": _clean(address.display_name).strip(" \t"),
                }
            )
    except Exception:
        # The modern address parser gave up (or a mailbox failed validation):
        # the legacy one is cruder but does not raise.
        return _legacy_addresses(text)
    return [item for item in found if item["email"] or item["name"]]


def _legacy_addresses(text: str) -> list[dict[str, str]]:
    """Mailboxes by ``email.utils.getaddresses``: never raises."""
    pairs = _legacy_pairs(text) if len(text) <= _MAX_CACHED_ADDRESSES else _read_pairs(text)
    return [{"email": addr, "name": name} for addr, name in pairs]


# Most mail comes from and goes to a few addresses over and over (every
# message of a newsletter, every alert of a monitoring system): the mailboxes
# of a header value are remembered, bounded in number and in length. Pairs,
# not dicts, so that no payload shares a mutable object with another.
_MAX_CACHED_ADDRESSES = 512


@functools.lru_cache(maxsize=1024)
def _legacy_pairs(text: str) -> tuple[tuple[str, str], ...]:
    return _read_pairs(text)


# A mailbox simple enough that email.utils.getaddresses reads it as the
# regular expression does: "<a@b.c>", "a@b.c" or "Words <a@b.c>", with
# nothing to unquote, decode or drop. Profiled, getaddresses was a quarter of
# the CPU of a small message; tests/test_payload_differential.py holds this
# to the library's answers.
_ATOM = r"[A-Za-z0-9_+\-]+"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*(?:(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*)[ \t]*)?<(?P<angle>{_ADDR_SPEC})>"
    rf"|(?P<bare>{_ADDR_SPEC}))[ \t]*"
)


def _read_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """(email, name) of each mailbox of an address header value; never raises."""
    simple: list[tuple[str, str]] = []
    for piece in text.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(piece)
        if match is None:
            break
        bare = match["bare"]
        simple.append((bare, "") if bare is not None else (match["angle"], match["name"] or ""))
    else:
        return tuple(simple)
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:
        return ()
    return tuple(
        (_clean(addr), _decode_header(display_name))
        for display_name, addr in pairs
        if display_name or addr
    )


# --- the MIME walk -------------------------------------------------------------


class _Fragment:
    """A text part that may become (part of) ``body`` or ``html_body``."""

    __slots__ = ("ctype", "kind", "level", "part", "shown", "text")

    def __init__(
        self,
        kind: str,
        level: int,
        text: str,
        part: Message | None,
        ctype: str,
        shown: str | None,
    ) -> None:
        self.kind = kind  # "text/plain" or "text/html"
        self.level = level  # embedded messages walked into to reach it
        self.text = text
        # Where its bytes are (None: they are the text), and what else an
        # attachment needs. The attachment is built only if it is one: most
        # fragments are bodies, and a body's bytes need no base64 copy.
        self.part = part
        self.ctype = ctype
        self.shown = shown

    def attachment(self) -> dict[str, Any]:
        """The fragment as an entry of ``attachments``."""
        content = (
            _base64(self.text.encode("utf-8")) if self.part is None else _leaf_base64(self.part)
        )
        return _attachment(content, self.ctype, None, None, self.shown)


# One entry of the walk's stack: (part, depth, parent is multipart/related,
# level = embedded messages walked into).
_Item = tuple[Message, int, bool, int]


class _Walk:
    """Visits every part in document order and sorts leaves into body/html/attachments.

    Iterative (an explicit stack) so that depth costs no recursion. Text
    parts that have no file name and are not attachments are fragments of
    the bodies; which of them win is decided at the end (see
    :meth:`_finish` and docs/payload.md). Every other leaf that holds
    anything becomes an attachment, in document order.
    """

    __slots__ = ("_items", "_reparse_budget", "attachments", "body", "html_body")

    def __init__(self, *, reparse_budget: int) -> None:
        self.body: str | None = None
        self.html_body: str | None = None
        self.attachments: list[dict[str, Any]] = []
        # Characters that parts with a missing ";" may still have parsed
        # again. Each level of nested broken parts would parse its whole
        # content once more: 50 levels of a 25 MB message, 50 parses.
        # Twice the message covers a broken top level and one broken part
        # as large as the rest.
        self._reparse_budget = reparse_budget
        self._items: list[dict[str, Any] | _Fragment] = []

    def run(self, root: Message) -> None:
        """Walk ``root`` and everything under it, to ``_MAX_DEPTH``."""
        stack: list[_Item] = [(root, 0, False, 0)]
        while stack:
            part, depth, in_related, level = stack.pop()
            try:
                self._visit(part, depth, in_related, level, stack)
            except Exception:  # a bad part loses only itself
                continue
        self._finish()

    def _finish(self) -> None:
        # The bodies come from the least deeply embedded message that has any
        # text: the sender's own words win over a forwarded message's, even
        # when the forward comes first. There, every fragment counts, in
        # order: Apple Mail splits its HTML around inline images, and list
        # managers append a text/plain footer part. Fragments of other levels
        # stay what a reader can still open: attachments.
        fragments = [item for item in self._items if isinstance(item, _Fragment)]
        level = min((fragment.level for fragment in fragments), default=0)
        plain: list[str] = []
        html: list[str] = []
        for item in self._items:
            if not isinstance(item, _Fragment):
                self.attachments.append(item)
            elif item.level != level:
                try:
                    self.attachments.append(item.attachment())
                except Exception:  # a bad part loses only itself
                    continue
            else:
                (plain if item.kind == "text/plain" else html).append(item.text)
        self._items = []
        # A blank line between text fragments, as the seed joined them; HTML
        # fragments are parts of one document.
        self.body = "\r\n\r\n".join(plain)
        self.html_body = "".join(html)

    def _visit(
        self,
        part: Message,
        depth: int,
        in_related: bool,
        level: int,
        stack: list[_Item],
    ) -> None:
        ctype = _content_type(part)
        if " " in ctype or "\t" in ctype:
            # The subtype swallowed the parameters: a ";" is missing
            # ("multipart/mixed boundary=b"). Read the part again with it.
            repaired = _with_semicolon(part, self._reparse_budget)
            if repaired is not None:
                part, cost = repaired
                ctype = _content_type(part)
                self._reparse_budget -= cost
        if part.is_multipart() and not ctype.startswith("message/"):
            self._descend(part, ctype, depth, level, stack)
            return
        disposition = _disposition(part)
        filename = _filename(part)
        data: bytes | None = None
        if part.is_multipart():
            # An embedded message is read as part of this one unless it was
            # sent as a file; then it is one attachment, as a mail client
            # shows it.
            if ctype in _EMBEDDED_MESSAGES and filename is None and disposition != "attachment":
                self._descend(part, ctype, depth, level + 1, stack)
                return
            try:
                data = _flatten_body(part)
            except Exception:
                # Regenerating failed; its parts are still worth having.
                self._descend(part, ctype, depth, level + 1, stack)
                return

        # RFC 2183 §2.8: an unknown disposition is treated as "attachment".
        attached = disposition is not None and disposition != "inline"
        content_id = _content_id(part)
        if attached:
            shown: str | None = "attachment"
        elif disposition == "inline" or in_related or content_id is not None:
            shown = "inline"
        else:
            shown = None
        # A multipart whose boundary never showed up is a leaf holding the
        # whole body as text; a reader would want to see that text.
        as_text = "text/plain" if ctype.startswith("multipart/") else ctype
        if filename is None and not attached and as_text in ("text/plain", "text/html"):
            if data is None:
                data = _leaf_bytes(part)
            text = _text(part, data)
            found: list[tuple[str, bytes]] = []
            source: Message | None = part
            if depth == 0 and as_text == "text/plain" and "begin " in text:
                text, found = _split_uuencoded(text)
                if found:
                    source = None  # its bytes are now the text that is left
            if text:
                self._items.append(_Fragment(as_text, level, text, source, ctype, shown))
            for name, file in found:
                self._items.append(
                    _attachment(_base64(file), _type_of(name), name, None, "attachment")
                )
            # An empty unnamed text part carries nothing a consumer could use.
            return
        content = _leaf_base64(part) if data is None else _base64(data)
        if not content[1] and filename is None and content_id is None and not attached:
            return  # likewise for any other empty unnamed part
        self._items.append(_attachment(content, ctype, filename, content_id, shown))

    @staticmethod
    def _descend(
        part: Message,
        ctype: str,
        depth: int,
        level: int,
        stack: list[_Item],
    ) -> None:
        if depth >= _MAX_DEPTH:
            return
        children = part.get_payload()
        if isinstance(children, list):
            related = ctype == "multipart/related"
            # Reversed, so that popping the stack visits parts in document order.
            stack.extend(
                (child, depth + 1, related, level)
                for child in reversed(children)
                if isinstance(child, Message)
            )


def _attachment(
    content: tuple[str, int],
    ctype: str,
    filename: str | None,
    content_id: str | None,
    shown: str | None,
) -> dict[str, Any]:
    """One entry of ``attachments``; *content* is the file in base64, and its size."""
    return {
        "filename": filename or _fallback_filename(ctype, content_id),
        "content_type": ctype,
        "size": content[1],
        "content_id": content_id,
        "disposition": shown,
        "content": content[0],
    }


def _base64(data: bytes) -> tuple[str, int]:
    """``data`` as an attachment's content: base64, and its size."""
    return base64.b64encode(data).decode("ascii"), len(data)


def _with_semicolon(part: Message, budget: int) -> tuple[Message, int] | None:
    """``part`` read again with the ``;`` its Content-Type lacks, and its size; or None.

    ``multipart/mixed boundary="b"`` is read by the standard library as the
    subtype ``mixed boundary="b"`` with no boundary, so the parts are lost;
    Stalwart and zbateson read the parameter. Only the part's own bytes are
    parsed again, only for such a header, and only while the payload fits
    ``budget`` characters.
    """
    try:
        value = next((v for n, v in part.raw_items() if n.lower() == "content-type"), None)
        if not isinstance(value, str):
            return None
        value = _unfold(value).strip()
        match = _MISSING_SEMICOLON.match(value)
        # The payload as parsed: get_payload() would decode 8-bit bytes
        # with "replace" in the charset it cannot read either.
        payload = getattr(part, "_payload", None)
        if match is None or not isinstance(payload, str) or len(payload) > budget:
            return None
        fixed = f"{match.group(1)};{value[match.end(1) :]}"
        head = "".join(
            f"{name}: {fixed if name.lower() == 'content-type' else text}\r\n"
            for name, text in part.raw_items()
        )
        source = (head + "\r\n" + payload).encode("utf-8", "surrogateescape")
        reparsed: Message = BytesParser(policy=part.policy).parsebytes(source)
    except Exception:  # the original reading stands
        return None
    return reparsed, len(payload)


def _split_uuencoded(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """``text`` without its uuencoded files, and the files as (name, bytes).

    Mail from before MIME (and some tools still) carries files as
    ``begin 644 name`` … ``end`` blocks in a plain body. A block whose lines
    do not decode is left in the text.
    """
    files: list[tuple[str, bytes]] = []
    kept: list[str] = []
    # Each "begin" pairs with the first "end" after it, found by bisection,
    # and no "begin" inside a block is tried again, decoded or not: every
    # line is looked at once, however many "begin" lines a hostile body has.
    ends = [end for end in _UU_END.finditer(text)]
    starts = [end.start() for end in ends]
    pos = done = 0
    for begin in _UU_BEGIN.finditer(text):
        if begin.start() < done:
            continue
        index = bisect.bisect_left(starts, begin.end())
        if index == len(ends):
            break
        end = ends[index]
        done = end.end()
        data = _uudecode(text[begin.end() : end.start()])
        name = _clean(begin.group(1).strip())
        if data is None or not name:
            continue  # not uuencode after all: the block stays text
        kept.append(text[pos : begin.start()])
        pos = end.end()
        files.append((name, data))
    if not files:
        return text, []
    kept.append(text[pos:])
    return "".join(kept), files


def _uudecode(lines: str) -> bytes | None:
    """The bytes of uuencoded ``lines``, or None if they are not uuencode."""
    out: list[bytes] = []
    for line in lines.splitlines():
        if not line.strip(" `"):
            break  # the zero-length line that ends the data
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Encoders pad the last line differently; cut to its length byte.
            try:
                size = (((ord(line[0]) - 32) & 63) * 4 + 5) // 3
                out.append(binascii.a2b_uu(line[:size]))
            except (binascii.Error, ValueError):
                return None
    return b"".join(out)


def _type_of(filename: str) -> str:
    """The content type a file name's extension stands for, by ``_EXTENSIONS``."""
    suffix = filename.rpartition(".")[2].lower()
    return _TYPES_BY_EXTENSION.get("." + suffix, "application/octet-stream")


def _content_type(part: Message) -> str:
    try:
        return _clean(part.get_content_type())
    except Exception:
        # RFC 2045 §5.2: an unreadable Content-Type means text/plain.
        return "text/plain"


def _disposition(part: Message) -> str | None:
    try:
        value = part.get_content_disposition()
    except Exception:
        return None
    return _clean(value) if value else None


def _filename(part: Message) -> str | None:
    """The part's file name: RFC 2231 and RFC 2047 decoded, or None."""
    try:
        name = part.get_filename()
    except Exception:
        return None
    if not isinstance(name, str):
        return None
    # policy.default decodes encoded words inside quoted parameters already;
    # compat32 (the fallback) does not.
    name = _decode_header(name) if "=?" in name else _clean(name)
    return name or None


def _fallback_filename(ctype: str, content_id: str | None) -> str:
    """A file name for a part that has none: from its Content-ID, else "unnamed".

    Consumers written for the seed need a string (it sent ``"unnamed"``),
    and one that a person can open: the local part of the Content-ID (where
    Outlook keeps the original name, ``image001.png@01DA…``) made safe for a
    file system, plus the extension of the content type unless it has one.
    """
    stem = ""
    if content_id:
        stem = _UNSAFE_NAME.sub("_", content_id.split("@", 1)[0]).strip("._")
        stem = stem[:_MAX_DERIVED_NAME]
    stem = stem or "unnamed"
    extensions = _EXTENSIONS.get(ctype, ())
    if extensions and not stem.lower().endswith(extensions):
        stem += extensions[0]
    return stem


def _content_id(part: Message) -> str | None:
    """The Content-ID without its angle brackets, or None."""
    try:
        value = next((v for n, v in part.raw_items() if n.lower() == "content-id"), None)
    except Exception:
        return None
    if value is None:
        return None
    text = _decode_header(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text or None


def _leaf_base64(part: Message) -> tuple[str, int]:
    """A leaf's decoded content as an attachment's base64, and its size.

    Most attachments come in base64 already, wrapped in lines of 76: where
    encoding what they decode to would give their text back without the
    line breaks, that text is the content, and decoding and encoding again
    (two passes over megabytes, most of what a big message costs here) is
    not needed. tests/test_payload_differential.py holds both to the same job.
    """
    return _base64_as_sent(part) or _base64(_leaf_bytes(part))


def _base64_as_sent(part: Message) -> tuple[str, int] | None:
    """The content and size of a base64 leaf whose text is canonical base64
    once its line breaks are gone; else None.

    Canonical: only the alphabet, a length a multiple of four, at most two
    ``=`` and only at the end, and no bits set after the last octet. For
    such text ``a2b_base64`` (which skips line breaks wherever they are)
    and ``b64encode`` give the text back; any other (a space, a stray
    ``=``, missing padding) goes the way of :func:`_leaf_bytes`.
    """
    payload = _base64_text(part)
    if payload is None:
        return None
    text = payload.encode("ascii").translate(None, b"\r\n")
    pads = text.translate(None, _BASE64_ALPHABET)
    if len(text) % 4 or pads not in (b"", b"=", b"==") or not text.endswith(pads):
        return None
    if pads:
        last = text[-4:]
        if binascii.b2a_base64(binascii.a2b_base64(last), newline=False) != last:
            return None  # bits set after the last octet: not what b64encode gives
    return text.decode("ascii"), len(text) // 4 * 3 - len(pads)


def _leaf_bytes(part: Message) -> bytes:
    """The decoded content of a leaf part."""
    fast = _base64_in_one_pass(part)
    if fast is not None:
        return fast
    try:
        data = part.get_payload(decode=True)
    except Exception:
        # The transfer encoding could not be undone: the encoded text is
        # still better than nothing.
        payload = part.get_payload()
        data = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""
    return data if isinstance(data, bytes) else b""


def _base64_in_one_pass(part: Message) -> bytes | None:
    """``part.get_payload(decode=True)`` for a base64 leaf of ASCII text, or
    None to take that path.

    The standard library joins the lines (a copy), checks the alphabet with
    a regular expression and decodes (~28 ms for a 5 MB attachment); binascii
    skips the line breaks itself (~15 ms). Where it succeeds its result is the
    standard library's: both decode with ``a2b_base64``, which skips every
    character outside the alphabet wherever it is, and what it refuses
    (missing padding, say) goes the standard library's way, which mends it.
    tests/test_payload_differential.py holds both paths to the same job.
    """
    payload = _base64_text(part)
    if payload is None:
        return None
    try:
        return binascii.a2b_base64(payload.encode("ascii"))
    except binascii.Error:
        return None


def _base64_text(part: Message) -> str | None:
    """The text of a base64 leaf if it is all ASCII, else None (the standard
    library's way)."""
    # What get_payload() reads: a str for a parsed leaf, a list for a multipart.
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str) or not payload.isascii():
        return None  # 8-bit bytes: get_payload() has its own rules for them
    if str(part.get("content-transfer-encoding", "")).lower() != "base64":
        return None
    return payload


def _flatten_body(part: Message) -> bytes:
    """The body of a message/* part, regenerated from its parsed form."""
    buffer = io.BytesIO()
    BytesGenerator(buffer, mangle_from_=False, policy=_FLATTEN_POLICY).flatten(part)
    data = buffer.getvalue()
    if data.startswith(b"\r\n"):  # the part had no headers of its own
        return data[2:]
    end = data.find(b"\r\n\r\n")
    return data[end + 4 :] if end >= 0 else b""


# Codecs of Python's own that are not character sets: no mail client labels
# text with them, and a sender who does so is up to no good. Python's
# punycode decoder takes time quadratic in its input (256 KB: 8 s of CPU,
# 1 MB: 30 s, 2 MB: 2 minutes), and unicode_escape and raw_unicode_escape read
# backslashes as escapes. A part labelled with one is read as one whose
# charset Python does not know. (Codecs from bytes to bytes, such as base64
# or zlib, are no text encodings: decode() refuses them already.)
_NOT_CHARSETS: Final = frozenset(
    {"punycode", "idna", "undefined", "unicode-escape", "raw-unicode-escape"}
)


def _text(part: Message, data: bytes) -> str:
    """A text part's bytes as str, in its declared charset where that works."""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    if charset and charset not in ("us-ascii", "ascii"):
        try:
            if codecs.lookup(charset).name not in _NOT_CHARSETS:
                # The declared charset is authority enough to replace bad
                # bytes rather than guess another one.
                return _clean(data.decode(charset, "replace"))
        except Exception:  # unknown or unusable charset: guess below
            pass
    # No charset, plain ASCII (often a lie: 8-bit mail without a label is
    # mostly UTF-8) or one Python does not know as a character set.
    return _unlabelled(data)


# --- small helpers ---------------------------------------------------------------


def _unlabelled(data: bytes) -> str:
    """Bytes of no known charset as text: UTF-8 when they are UTF-8, else
    Latin-1, which maps every byte and loses nothing."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean(text: str) -> str:
    """``text`` with lone surrogates made into real characters or U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text
    text = _ESCAPED_BYTES.sub(_unescape, text)
    # Whatever is left did not come from the wire (a UTF-7 decode, say).
    return _SURROGATE.sub("\ufffd", text)


def _unescape(run: re.Match[str]) -> str:
    # A run of raw 8-bit bytes in a header or parameter: read it the way
    # _text reads an unlabelled body.
    return _unlabelled(run.group().encode("utf-8", "surrogateescape"))


def _rfc3339(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.astimezone(_UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _authentication(auth: dict[str, str] | None) -> dict[str, str] | None:
    if auth is None:
        return None
    return {key: _clean(str(auth.get(key, ""))) for key in ("mechanism", "username")}
