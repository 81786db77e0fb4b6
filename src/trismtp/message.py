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
import datetime
import email.policy
import email.utils
import io
import re
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import Message
from typing import Any

__all__ = ["Envelope", "build_payload"]

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

# policy.default's own registry (the standard header classes), shared: it
# holds no state once built.
_REGISTRY = HeaderRegistry()

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
    spelling: dict[str, str] = {}
    if parsed is not None:
        msg, whole = parsed
        headers, spelling = _headers(msg, factory, addresses)
        if whole:
            walk = _Walk()
            walk.run(msg)
            body = walk.body or ""
            html_body = walk.html_body or ""
            attachments = walk.attachments
        # The tree holds the message's text once more: gone before raw's copy.
        del msg
    del parsed

    subject = headers[spelling["subject"]][0] if "subject" in spelling else ""
    message_id = headers[spelling["message-id"]][0] if "message-id" in spelling else ""

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


def _headers(
    msg: Message,
    factory: _MemoHeaderFactory,
    addresses: dict[str, list[dict[str, str]]],
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every top-level header, decoded, and the key of each lowercased name.

    Fills ``addresses`` on the way.
    """
    headers: dict[str, list[str]] = {}
    # Header names are case-insensitive; the first spelling seen is the key.
    spelling: dict[str, str] = {}
    for name, value in msg.raw_items():
        lower = name.lower()
        key = spelling.get(lower)
        if key is None:
            key = spelling[lower] = _clean(name)
            headers[key] = []
        headers[key].append(_decode_header(value))
        field = _ADDRESS_FIELDS.get(lower)
        if field is not None:
            addresses[field].extend(_addresses(factory, name, value))
    return headers, spelling


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
    found: list[dict[str, str]] = []
    try:
        header = factory(name, text)
        for address in header.addresses:
            found.append({"email": _clean(address.addr_spec), "name": _clean(address.display_name)})
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


class _Walk:
    """Visits every part in document order and sorts leaves into body/html/attachments.

    Iterative (an explicit stack) so that depth costs no recursion. The
    first text/plain and text/html that are not attachments become the
    bodies; every other leaf that holds anything becomes an attachment (a
    second unnamed text part too, so no content is silently lost).
    """

    __slots__ = ("attachments", "body", "html_body")

    def __init__(self) -> None:
        self.body: str | None = None
        self.html_body: str | None = None
        self.attachments: list[dict[str, Any]] = []

    def run(self, root: Message) -> None:
        """Walk ``root`` and everything under it, to ``_MAX_DEPTH``."""
        # (part, depth, parent is multipart/related)
        stack: list[tuple[Message, int, bool]] = [(root, 0, False)]
        while stack:
            part, depth, in_related = stack.pop()
            try:
                self._visit(part, depth, in_related, stack)
            except Exception:  # a bad part loses only itself
                continue

    def _visit(
        self,
        part: Message,
        depth: int,
        in_related: bool,
        stack: list[tuple[Message, int, bool]],
    ) -> None:
        ctype = _content_type(part)
        if part.is_multipart() and not ctype.startswith("message/"):
            self._descend(part, ctype, depth, stack)
            return
        disposition = _disposition(part)
        filename = _filename(part)
        data: bytes | None = None
        if part.is_multipart():
            # An embedded message is read as part of this one unless it was
            # sent as a file; then it is one attachment, as a mail client
            # shows it.
            if ctype in _EMBEDDED_MESSAGES and filename is None and disposition != "attachment":
                self._descend(part, ctype, depth, stack)
                return
            try:
                data = _flatten_body(part)
            except Exception:
                # Regenerating failed; its parts are still worth having.
                self._descend(part, ctype, depth, stack)
                return

        # RFC 2183 §2.8: an unknown disposition is treated as "attachment".
        attached = disposition is not None and disposition != "inline"
        if filename is None and not attached:
            # A multipart whose boundary never showed up is a leaf holding the
            # whole body as text; a reader would want to see that text.
            as_text = "text/plain" if ctype.startswith("multipart/") else ctype
            if as_text == "text/plain" and self.body is None:
                self.body = _text(part, _leaf_bytes(part))
                return
            if as_text == "text/html" and self.html_body is None:
                self.html_body = _text(part, _leaf_bytes(part))
                return

        content_id = _content_id(part)
        if attached:
            shown: str | None = "attachment"
        elif disposition == "inline" or in_related or content_id is not None:
            shown = "inline"
        else:
            shown = None
        if data is None:
            data = _leaf_bytes(part)
        if not data and filename is None and content_id is None and not attached:
            # An empty unnamed part (common in generated multiparts) carries
            # nothing a consumer could use.
            return
        self.attachments.append(
            {
                "filename": filename,
                "content_type": ctype,
                "size": len(data),
                "content_id": content_id,
                "disposition": shown,
                "content": base64.b64encode(data).decode("ascii"),
            }
        )

    @staticmethod
    def _descend(
        part: Message,
        ctype: str,
        depth: int,
        stack: list[tuple[Message, int, bool]],
    ) -> None:
        if depth >= _MAX_DEPTH:
            return
        children = part.get_payload()
        if isinstance(children, list):
            related = ctype == "multipart/related"
            # Reversed, so that popping the stack visits parts in document order.
            stack.extend(
                (child, depth + 1, related)
                for child in reversed(children)
                if isinstance(child, Message)
            )


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
