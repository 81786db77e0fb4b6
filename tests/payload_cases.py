"""Messages that lost or garbled part of the payload (issues 11, 14), and what consumers must see.

Each case is the message bytes, as sent over SMTP (CRLF, lines within 998
octets, a final CRLF), and a check of the payload built from them. The same
cases run through the parser (tests/test_message.py) and through the real
daemon (tests/e2e/test_e2e_payload.py), so a change of MIME parser is held to
both. The messages are written here for the project; none is copied from a
public corpus.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CASES", "PNG", "Case", "content"]

# A 1x1 PNG: real image bytes, including bytes that are not UTF-8.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
NOTES = b"Line one of the notes.\nLine two, with bytes \x00\xff\xfe.\n" * 3


def content(attachment: dict[str, Any]) -> bytes:
    """An attachment's bytes, as a consumer decodes them."""
    return base64.b64decode(attachment["content"], validate=True)


def crlf(text: str) -> bytes:
    """A sample written with ``\\n`` as CRLF bytes (``surrogateescape`` keeps raw 8-bit bytes)."""
    return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def uuencode(name: str, data: bytes, mode: str = "644") -> str:
    """``data`` as a uuencoded block, as the uuencode tool writes it."""
    lines = [f"begin {mode} {name}"]
    for i in range(0, len(data), 45):
        lines.append(binascii.b2a_uu(data[i : i + 45], backtick=True).decode().rstrip("\n"))
    lines += ["`", "end"]
    return "\n".join(lines)


@dataclass(frozen=True)
class Case:
    """A message and the checks its payload must pass."""

    name: str
    raw: bytes
    check: Callable[[dict[str, Any]], None]


CASES: dict[str, Case] = {}


def case(name: str, raw: bytes) -> Callable[[Callable[[dict[str, Any]], None]], None]:
    """Register the decorated check for message ``raw`` as case ``name``."""

    def register(check: Callable[[dict[str, Any]], None]) -> None:
        CASES[name] = Case(name, raw, check)

    return register


# --- issue 11: what the seed's consumers read ---------------------------------------

INLINE_IMAGE = crlf(
    f"""From: Reports <reports@example.org>
To: ops@example.com
Subject: Daily chart
Message-ID: <chart-mail-1@example.org>
MIME-Version: 1.0
Content-Type: multipart/related; boundary="rel-1"

--rel-1
Content-Type: text/html; charset=utf-8

<p>Today:</p><img src="cid:chart-1@example.org">
--rel-1
Content-Type: image/png
Content-ID: <chart-1@example.org>
Content-Transfer-Encoding: base64

{base64.b64encode(PNG).decode()}
--rel-1--
"""
)


@case("inline-image-without-filename", INLINE_IMAGE)
def _(payload: dict[str, Any]) -> None:
    # An unnamed inline image gets a name from its Content-ID and type, so a
    # consumer that needs a string (Buggregator's Attachment) has one.
    assert payload["message"]["html_body"] == '<p>Today:</p><img src="cid:chart-1@example.org">'
    (image,) = payload["attachments"]
    assert image["filename"] == "chart-1.png"
    assert image["content_id"] == "chart-1@example.org"
    assert image["disposition"] == "inline"
    assert content(image) == PNG


LATIN1 = (
    b"From: =?ISO-8859-1?Q?Andr=E9?= <andre@example.fr>\r\n"
    b"To: equipe@example.fr\r\n"
    b"Subject: Caf\xe9 cr\xe8me\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Un caf\xe9 cr\xe8me, s'il vous pla\xeet.\r\n"
)


@case("latin1-8bit", LATIN1)
def _(payload: dict[str, Any]) -> None:
    message = payload["message"]
    # raw is a string as in the seed, invalid bytes as U+FFFD; the exact
    # bytes are in raw_base64.
    assert message["raw"] == LATIN1.decode("utf-8", "replace")
    assert "Caf\ufffd cr\ufffdme" in message["raw"]
    assert base64.b64decode(message["raw_base64"]) == LATIN1
    assert message["subject"] == "Café crème"
    assert message["headers"]["Subject"] == ["Café crème"]
    assert message["body"] == "Un café crème, s'il vous plaît.\r\n"
    assert payload["envelope"]["from"] == [{"email": "andre@example.fr", "name": "André"}]


UPPERCASE = crlf(
    """FROM: Loud Sender <loud@example.org>
TO: quiet@example.com
SUBJECT: ALL CAPS
MESSAGE-ID: <caps-1@example.org>
X-LOWER-case: mixed
x-lower-CASE: second
MIME-VERSION: 1.0
CONTENT-TYPE: TEXT/PLAIN; CHARSET=US-ASCII

SHOUTING BODY
"""
)


@case("all-uppercase-headers", UPPERCASE)
def _(payload: dict[str, Any]) -> None:
    message = payload["message"]
    # Keys as Go's textproto.CanonicalMIMEHeaderKey writes them, as the seed's.
    assert list(message["headers"]) == [
        "From",
        "To",
        "Subject",
        "Message-Id",
        "X-Lower-Case",
        "Mime-Version",
        "Content-Type",
    ]
    assert message["headers"]["Subject"] == ["ALL CAPS"]
    assert message["headers"]["X-Lower-Case"] == ["mixed", "second"]
    assert message["subject"] == "ALL CAPS"
    assert message["id"] == "<caps-1@example.org>"
    assert message["body"] == "SHOUTING BODY\r\n"
    assert payload["envelope"]["from"] == [{"email": "loud@example.org", "name": "Loud Sender"}]


# --- issue 14: fidelity ---------------------------------------------------------------

ADJACENT_WORDS = crlf(
    """From: =?ISO-8859-1?Q?Bj=F6rn?= =?ISO-8859-1?Q?_M=FCller?= <bjoern@example.de>
To: =?UTF-8?B?5L2Q6Jek?= =?UTF-8?B?6Iqx5a2Q?= <hanako@example.jp>,
 =?UTF-8?Q?Ren=C3=A9e?= Dupont <renee@example.fr>
Cc: =?UTF-8?Q?Ana?=
 =?UTF-8?Q?_Mar=C3=ADa?= <ana@example.es>
Subject: =?UTF-8?B?5L2Q6Jek?= =?UTF-8?B?6Iqx5a2Q?=

names
"""
)


@case("adjacent-encoded-words-in-names", ADJACENT_WORDS)
def _(payload: dict[str, Any]) -> None:
    # RFC 2047 §6.2: the white space between adjacent encoded words is not
    # text (CPython's address parser kept it, gh-128110); a plain word next to
    # an encoded one keeps its space.
    envelope = payload["envelope"]
    assert envelope["from"] == [{"email": "bjoern@example.de", "name": "Björn Müller"}]
    assert envelope["to"] == [
        {"email": "hanako@example.jp", "name": "佐藤花子"},
        {"email": "renee@example.fr", "name": "Renée Dupont"},
    ]
    assert envelope["ccs"] == [{"email": "ana@example.es", "name": "Ana María"}]
    assert payload["message"]["subject"] == "佐藤花子"
    assert payload["message"]["headers"]["From"] == ["Björn Müller <bjoern@example.de>"]


OBSOLETE_COLON = crlf(
    """Subject :Quarterly numbers
From : Finance <finance@example.org>
To: board@example.com
Message-ID : <q3@example.org>

The numbers are in.
"""
)


@case("white-space-before-colon", OBSOLETE_COLON)
def _(payload: dict[str, Any]) -> None:
    # RFC 5322 §4.5 obsolete syntax: "Name :value" is still a header.
    message = payload["message"]
    assert message["subject"] == "Quarterly numbers"
    assert list(message["headers"]) == ["Subject", "From", "To", "Message-Id"]
    assert message["id"] == "<q3@example.org>"
    assert message["body"] == "The numbers are in.\r\n"
    assert payload["envelope"]["from"] == [{"email": "finance@example.org", "name": "Finance"}]
    assert payload["envelope"]["to"] == [{"email": "board@example.com", "name": ""}]
    # The payload's raw is still the bytes as received.
    assert message["raw"].startswith("Subject :Quarterly numbers\r\n")


MISSING_SEMICOLON = crlf(
    f"""From: builder@example.org
Subject: build report
MIME-Version: 1.0
Content-Type: multipart/mixed boundary="outer-b"

--outer-b
Content-Type: multipart/alternative boundary=inner-b

--inner-b
Content-Type: text/plain charset=utf-8

Build passed ✓
--inner-b
Content-Type: text/html charset=utf-8

<p>Build passed ✓</p>
--inner-b--
--outer-b
Content-Type: image/png name="badge.png"
Content-Transfer-Encoding: base64

{base64.b64encode(PNG).decode()}
--outer-b--
"""
)


@case("content-type-without-semicolon", MISSING_SEMICOLON)
def _(payload: dict[str, Any]) -> None:
    # "multipart/mixed boundary=..." lacks the ";": the parts are read
    # anyway, at every level, and the parameters too.
    message = payload["message"]
    assert message["body"] == "Build passed ✓"
    assert message["html_body"] == "<p>Build passed ✓</p>"
    (badge,) = payload["attachments"]
    assert badge["filename"] == "badge.png"
    assert badge["content_type"] == "image/png"
    assert content(badge) == PNG
    assert message["headers"]["Content-Type"] == ['multipart/mixed boundary="outer-b"']


UUENCODED = crlf(
    f"""From: old-timer@example.org
Subject: two files

Here are the files.

{uuencode("notes.txt", NOTES)}

and a picture:
{uuencode("dot.png", PNG, "600")}
Bye.
"""
)


@case("uuencoded-files-in-plain-body", UUENCODED)
def _(payload: dict[str, Any]) -> None:
    # Files sent before MIME were uuencoded into the text: they become
    # attachments, and the text is what is left.
    assert payload["message"]["body"] == "Here are the files.\r\n\r\n\r\nand a picture:\r\nBye.\r\n"
    notes, dot = payload["attachments"]
    assert (notes["filename"], notes["content_type"]) == ("notes.txt", "text/plain")
    assert content(notes) == NOTES
    assert (dot["filename"], dot["content_type"]) == ("dot.png", "image/png")
    assert content(dot) == PNG
    assert notes["disposition"] == dot["disposition"] == "attachment"


FORWARD_FIRST = crlf(
    """From: Alice <alice@example.org>
To: bob@example.com
Subject: Fwd: the plan
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=fw

--fw
Content-Type: message/rfc822

From: Carol <carol@example.net>
Subject: the plan
Content-Type: multipart/alternative; boundary=orig

--orig
Content-Type: text/plain

forwarded words
--orig
Content-Type: text/html

<p>forwarded words</p>
--orig--
--fw
Content-Type: text/plain

my own words, above the forward in a reader
--fw--
"""
)


@case("forward-before-own-text", FORWARD_FIRST)
def _(payload: dict[str, Any]) -> None:
    # The sender's own text wins over the forwarded message's, though the
    # forward comes first; the forwarded text stays, as attachments.
    message = payload["message"]
    assert message["body"] == "my own words, above the forward in a reader"
    # The outer message has no HTML: html_body does not show the forward's.
    assert message["html_body"] == ""
    plain, html = payload["attachments"]
    assert (plain["filename"], content(plain)) == ("unnamed.txt", b"forwarded words")
    assert (html["filename"], content(html)) == ("unnamed.html", b"<p>forwarded words</p>")


HTML_FRAGMENTS = crlf(
    f"""From: Mac User <mac@example.org>
Subject: photo inside
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary=alt

--alt
Content-Type: text/plain; charset=utf-8

Before the photo.
After the photo.
--alt
Content-Type: multipart/mixed; boundary=mix

--mix
Content-Type: text/html; charset=utf-8

<html><body><p>Before the photo.</p>
--mix
Content-Type: image/png; name=photo.png
Content-Disposition: inline; filename=photo.png
Content-Transfer-Encoding: base64

{base64.b64encode(PNG).decode()}
--mix
Content-Type: text/html; charset=utf-8

<p>After the photo.</p></body></html>
--mix--
--alt--
"""
)


@case("html-in-fragments", HTML_FRAGMENTS)
def _(payload: dict[str, Any]) -> None:
    # Apple Mail splits the HTML around an inline image: html_body is the
    # fragments joined in order, not only the first.
    message = payload["message"]
    assert message["html_body"] == (
        "<html><body><p>Before the photo.</p><p>After the photo.</p></body></html>"
    )
    assert message["body"] == "Before the photo.\r\nAfter the photo."
    (photo,) = payload["attachments"]
    assert (photo["filename"], photo["disposition"]) == ("photo.png", "inline")
    assert content(photo) == PNG
