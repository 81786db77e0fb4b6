# A verbatim copy of src/trismtp/message.py at commit 54c2b1c (before issue 16):
# the reference that tests/test_payload_differential.py holds the optimised
# parser to, byte for byte. Do not edit; do not import from src.
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

The standard library's ``email`` package does the MIME work. Two of its
habits are expensive on the hot path, so we work around them rather than
replace it:

- ``policy.default`` builds a new header object, with a freshly created
  class, on *every* header access, and the parser itself reads a part's
  Content-Type several times. A per-parse memo in front of the header factory
  makes parsing a message of 1,000 parts about eight times faster.
- Most header values are plain ASCII with no encoded words; their decoded
  form is the unfolded source text, so we skip the header parser for them.

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
import datetime
import email.policy
import email.utils
import functools
import io
import re
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import Message
from email.parser import BytesParser
from typing import Any

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
    factory = _MemoHeaderFactory(_REGISTRY)
    parsed = _parse(raw, factory)
    headers: dict[str, list[str]] = {}
    addresses: dict[str, list[dict[str, str]]] = {key: [] for key in _ADDRESS_FIELDS.values()}
    body = html_body = ""
    attachments: list[dict[str, Any]] = []
    if parsed is not None:
        msg, whole = parsed
        headers = _headers(msg, factory, addresses)
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


class _MemoHeaderFactory:
    """``policy.default``'s header factory, remembering results for one parse.

    Header objects are immutable, so handing out the same one for the same
    (name, value) is invisible to callers; it saves re-parsing a part's
    Content-Type each time the parser or the walk asks for it. The registry
    also builds a new class for every header it makes; one per header name
    is enough.
    """

    __slots__ = ("_classes", "_headers", "_registry")

    def __init__(self, registry: HeaderRegistry) -> None:
        self._registry = registry
        self._classes: dict[str, type[BaseHeader]] = {}
        self._headers: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            return self._registry(name, value)
        value = value[:_MAX_PARSED_HEADER]
        key = (name, value)
        header = self._headers.get(key)
        if header is None:
            lower = name.lower()
            cls = self._classes.get(lower)
            if cls is None:
                cls = self._classes[lower] = self._registry[name]
            header = self._headers[key] = cls(name, value)
        return header


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
            msg = _parse_bytes(raw, policy, headersonly=headersonly)
        except Exception:  # any failure means: try the next, more lenient way
            continue
        return msg, not headersonly
    return None


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
    msg: Message,
    factory: _MemoHeaderFactory,
    addresses: dict[str, list[dict[str, str]]],
) -> dict[str, list[str]]:
    """Every top-level header, decoded, under its canonical name.

    Fills ``addresses`` on the way.
    """
    headers: dict[str, list[str]] = {}
    # Header names are case-insensitive; every spelling of a name goes under
    # its canonical key, as in the seed (Go's net/textproto).
    keys: dict[str, str] = {}
    for name, value in msg.raw_items():
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
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:
        return []
    return [
        {"email": _clean(addr), "name": _decode_header(display_name)}
        for display_name, addr in pairs
        if display_name or addr
    ]


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
        data = self.text.encode("utf-8") if self.part is None else _leaf_bytes(self.part)
        return _attachment(data, self.ctype, None, None, self.shown)


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
        if data is None:
            data = _leaf_bytes(part)
        # A multipart whose boundary never showed up is a leaf holding the
        # whole body as text; a reader would want to see that text.
        as_text = "text/plain" if ctype.startswith("multipart/") else ctype
        if filename is None and not attached and as_text in ("text/plain", "text/html"):
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
                self._items.append(_attachment(file, _type_of(name), name, None, "attachment"))
            # An empty unnamed text part carries nothing a consumer could use.
            return
        if not data and filename is None and content_id is None and not attached:
            return  # likewise for any other empty unnamed part
        self._items.append(_attachment(data, ctype, filename, content_id, shown))

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
    data: bytes, ctype: str, filename: str | None, content_id: str | None, shown: str | None
) -> dict[str, Any]:
    """One entry of ``attachments``."""
    return {
        "filename": filename or _fallback_filename(ctype, content_id),
        "content_type": ctype,
        "size": len(data),
        "content_id": content_id,
        "disposition": shown,
        "content": base64.b64encode(data).decode("ascii"),
    }


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


def _leaf_bytes(part: Message) -> bytes:
    """The decoded content of a leaf part."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        # The transfer encoding could not be undone: the encoded text is
        # still better than nothing.
        payload = part.get_payload()
        data = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""
    return data if isinstance(data, bytes) else b""


def _flatten_body(part: Message) -> bytes:
    """The body of a message/* part, regenerated from its parsed form."""
    buffer = io.BytesIO()
    BytesGenerator(buffer, mangle_from_=False, policy=_FLATTEN_POLICY).flatten(part)
    data = buffer.getvalue()
    if data.startswith(b"\r\n"):  # the part had no headers of its own
        return data[2:]
    end = data.find(b"\r\n\r\n")
    return data[end + 4 :] if end >= 0 else b""


def _text(part: Message, data: bytes) -> str:
    """A text part's bytes as str, in its declared charset where that works."""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    if charset and charset not in ("us-ascii", "ascii"):
        try:
            # The declared charset is authority enough to replace bad bytes
            # rather than guess another one.
            return _clean(data.decode(charset, "replace"))
        except Exception:  # unknown or unusable charset: guess below
            pass
    # No charset, plain ASCII (often a lie: 8-bit mail without a label is
    # mostly UTF-8) or one Python does not know: UTF-8 when the bytes are
    # UTF-8, else Latin-1, which maps every byte and loses nothing.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --- small helpers ---------------------------------------------------------------


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
    data = run.group().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _rfc3339(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.astimezone(_UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _authentication(auth: dict[str, str] | None) -> dict[str, str] | None:
    if auth is None:
        return None
    return {key: _clean(str(auth.get(key, ""))) for key in ("mechanism", "username")}
