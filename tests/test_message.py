"""What a job consumer sees in the email payload built from received bytes (SPEC §5)."""

from __future__ import annotations

import base64
import datetime
import email.policy
import json
import time
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trismtp.message import Envelope, build_payload

from . import spec5
from .payload_cases import CASES
from .spec5 import check_payload

ENVELOPE = Envelope(
    helo="client.example.org",
    mail_from="sender@example.org",
    recipients=("alice@example.com", "bob@example.com"),
    remote_addr="203.0.113.5:53211",
)
RECEIVED_AT = datetime.datetime(2026, 11, 24, 10, 0, 0, 654321, tzinfo=datetime.UTC)
UUID = "8d0f6a56-7a0e-4a41-9d8c-2f2c4f6b1e01"

# A 1x1 PNG: real image bytes, including non-UTF-8 ones.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def payload(raw: bytes, *, include_raw: bool = True, **extra: Any) -> dict[str, Any]:
    """build_payload with fixed session data; checks the result can be sent as JSON."""
    result = build_payload(
        raw,
        uuid=UUID,
        envelope=ENVELOPE,
        received_at=RECEIVED_AT,
        include_raw=include_raw,
        **extra,
    )
    # What the pusher does with it: JSON text, then UTF-8 on the wire.
    json.dumps(result, ensure_ascii=False).encode("utf-8")
    check_payload(result, raw, include_raw=include_raw)
    return result


def crlf(text: str) -> bytes:
    """A literal sample written with \\n, as it arrives over SMTP."""
    return text.replace("\n", "\r\n").encode("utf-8")


def raw_of(result: dict[str, Any]) -> bytes:
    """The received bytes as a consumer gets them back from the payload."""
    return spec5.raw_of(result["message"])


def content(attachment: dict[str, Any]) -> bytes:
    """An attachment's bytes, as a consumer decodes them."""
    return base64.b64decode(attachment["content"], validate=True)


# --- a simple message, end to end ------------------------------------------------

PLAIN = crlf(
    """Received: from client.example.org (203.0.113.5) by mx.example.com
Message-ID: <20261124.1@example.org>
Date: Tue, 24 Nov 2026 11:00:00 +0100
From: Alice Example <alice@example.org>
To: bob@example.com
Subject: Lunch?
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Noon at the usual place?
"""
)


def test_plain_message_payload() -> None:
    result = payload(PLAIN)

    assert result["event"] == "EMAIL_RECEIVED"
    assert result["uuid"] == UUID
    assert result["remote_addr"] == "203.0.113.5:53211"
    assert result["received_at"] == "2026-11-24T10:00:00Z"
    assert result["size"] == len(PLAIN)
    assert result["envelope"] == {
        "helo": "client.example.org",
        "mail_from": "sender@example.org",
        "allRecipients": ["alice@example.com", "bob@example.com"],
        "from": [{"email": "alice@example.org", "name": "Alice Example"}],
        "to": [{"email": "bob@example.com", "name": ""}],
        "ccs": [],
        "replyTo": [],
    }
    assert result["authentication"] is None
    assert result["tls"] is None
    message = result["message"]
    assert message["id"] == "<20261124.1@example.org>"
    assert message["subject"] == "Lunch?"
    assert message["body"] == "Noon at the usual place?\r\n"
    assert message["html_body"] == ""
    assert message["raw"] == PLAIN.decode("utf-8")
    assert "raw_base64" not in message
    assert message["headers"]["Date"] == ["Tue, 24 Nov 2026 11:00:00 +0100"]
    assert list(message["headers"]) == [
        "Received",
        "Message-Id",
        "Date",
        "From",
        "To",
        "Subject",
        "Mime-Version",
        "Content-Type",
    ]
    assert result["attachments"] == []


def test_payload_keys_are_exactly_the_spec_ones() -> None:
    result = payload(PLAIN)

    assert list(result) == [
        "event",
        "uuid",
        "remote_addr",
        "received_at",
        "size",
        "envelope",
        "authentication",
        "tls",
        "message",
        "attachments",
    ]
    assert list(result["message"]) == ["id", "subject", "headers", "body", "html_body", "raw"]


def test_without_include_raw_there_is_no_raw_at_all() -> None:
    for raw in (PLAIN, b"Subject: x\r\n\r\n\xff\xfe"):
        message = payload(raw, include_raw=False)["message"]
        assert "raw" not in message
        assert "raw_base64" not in message


def test_received_at_is_utc_with_z_and_whole_seconds() -> None:
    paris = datetime.timezone(datetime.timedelta(hours=1))
    moment = datetime.datetime(2026, 11, 24, 11, 0, 5, 999999, tzinfo=paris)

    result = build_payload(
        PLAIN, uuid=UUID, envelope=ENVELOPE, received_at=moment, include_raw=False
    )

    assert result["received_at"] == "2026-11-24T10:00:05Z"


def test_authentication_never_carries_a_password_and_tls_passes_through() -> None:
    result = payload(
        PLAIN,
        authentication={"mechanism": "PLAIN", "username": "alice", "password": "hunter2"},
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"},
    )

    assert result["authentication"] == {"mechanism": "PLAIN", "username": "alice"}
    assert "hunter2" not in json.dumps(result)
    assert result["tls"] == {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"}


def test_null_sender_and_ipv6_peer() -> None:
    envelope = Envelope(
        helo="[::1]", mail_from="", recipients=("x@example.com",), remote_addr="[::1]:2525"
    )

    result = build_payload(
        PLAIN, uuid=UUID, envelope=envelope, received_at=RECEIVED_AT, include_raw=True
    )

    assert result["envelope"]["mail_from"] == ""
    assert result["envelope"]["helo"] == "[::1]"
    assert result["remote_addr"] == "[::1]:2525"


def test_undecodable_envelope_strings_still_make_json() -> None:
    # An SMTP layer that reads 8-bit commands with surrogateescape hands these in.
    envelope = Envelope(
        helo="h\udcc3\udca9lo",
        mail_from="caf\udce9@example.com",
        recipients=("r\udcff@example.com",),
        remote_addr="203.0.113.5:1",
    )

    result = build_payload(
        PLAIN, uuid=UUID, envelope=envelope, received_at=RECEIVED_AT, include_raw=False
    )

    json.dumps(result, ensure_ascii=False).encode("utf-8")
    assert result["envelope"]["helo"] == "hélo"
    assert result["envelope"]["mail_from"] == "café@example.com"
    assert result["envelope"]["allRecipients"] == ["rÿ@example.com"]


# --- MIME structure ----------------------------------------------------------------


def test_multipart_alternative_gives_body_and_html_body() -> None:
    msg = EmailMessage()
    msg["Subject"] = "Newsletter"
    msg.set_content("Plain version\n")
    msg.add_alternative("<p>HTML version</p>\n", subtype="html")

    result = payload(msg.as_bytes())

    assert result["message"]["body"] == "Plain version\n"
    assert result["message"]["html_body"] == "<p>HTML version</p>\n"
    assert result["attachments"] == []


def test_nested_mixed_alternative_related_with_inline_image_and_attachment() -> None:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["Subject"] = "Your order"
    msg.set_content("Thanks for your order.\n")
    msg.add_alternative('<p>Thanks!<img src="cid:logo@example.com"></p>\n', subtype="html")
    html = msg.get_payload(1)
    assert isinstance(html, EmailMessage)
    html.add_related(PNG, "image", "png", cid="<logo@example.com>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    raw = msg.as_bytes()
    assert b"multipart/related" in raw

    result = payload(raw)

    assert result["message"]["body"] == "Thanks for your order.\n"
    assert result["message"]["html_body"] == '<p>Thanks!<img src="cid:logo@example.com"></p>\n'
    image, pdf = result["attachments"]
    assert image["content_type"] == "image/png"
    assert image["content_id"] == "logo@example.com"
    assert image["disposition"] == "inline"
    # No file name: one is made from the Content-ID and the type.
    assert image["filename"] == "logo.png"
    assert content(image) == PNG
    assert image["size"] == len(PNG)
    assert pdf == {
        "filename": "invoice.pdf",
        "content_type": "application/pdf",
        "size": len(PDF),
        "content_id": None,
        "disposition": "attachment",
        "content": base64.b64encode(PDF).decode("ascii"),
    }


def test_related_image_without_disposition_header_is_inline() -> None:
    raw = crlf(
        """Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: text/html; charset=utf-8

<img src="cid:pic">
--rel
Content-Type: image/gif
Content-ID:  <pic>
Content-Transfer-Encoding: base64

R0lGODlhAQABAAAAACw=
--rel--
"""
    )

    result = payload(raw)

    assert result["message"]["html_body"] == '<img src="cid:pic">'
    (image,) = result["attachments"]
    assert image["disposition"] == "inline"
    assert image["content_id"] == "pic"
    assert content(image) == base64.b64decode("R0lGODlhAQABAAAAACw=")


def test_attachment_with_non_ascii_filename_built_by_python() -> None:
    msg = EmailMessage()
    msg.set_content("CV attached.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="résumé.pdf")
    raw = msg.as_bytes()
    assert b"filename*=" in raw

    (attachment,) = payload(raw)["attachments"]

    assert attachment["filename"] == "résumé.pdf"
    assert content(attachment) == PDF


def test_filename_encodings_in_the_wild() -> None:
    def one_attachment(disposition: str, content_type: str = "application/pdf") -> Any:
        raw = crlf(
            f"""Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

see attached
--b
Content-Type: {content_type}
Content-Disposition: {disposition}
Content-Transfer-Encoding: base64

{base64.b64encode(PDF).decode()}
--b--
"""
        )
        (attachment,) = payload(raw)["attachments"]
        assert content(attachment) == PDF
        return attachment["filename"]

    assert one_attachment("attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf") == "résumé.pdf"
    assert (
        one_attachment("attachment;\n filename*0*=utf-8''r%C3%A9;\n filename*1*=sum%C3%A9.pdf")
        == "résumé.pdf"
    )
    assert one_attachment('attachment; filename="=?UTF-8?B?csOpc3Vtw6kucGRm?="') == "résumé.pdf"
    assert (
        one_attachment("attachment", 'application/pdf; name="=?ISO-8859-1?Q?r=E9sum=E9.pdf?="')
        == "résumé.pdf"
    )
    assert one_attachment('attachment; filename="r\u00e9sum\u00e9.pdf"') == "résumé.pdf"
    # No name at all: "unnamed" (as the seed says) with the type's extension.
    assert one_attachment("attachment") == "unnamed.pdf"
    assert one_attachment("attachment", "application/x-unheard-of") == "unnamed"


def test_encoded_words_in_subject_and_names() -> None:
    raw = crlf(
        """From: =?UTF-8?B?Sm9zw6kgR2FyY8OtYQ==?= <jose@example.es>
To: =?ISO-8859-1?Q?Fran=E7ois_L=E9ger?= <francois@example.fr>, plain@example.com
Cc: "Doe, Jane" <jane@example.com>
Reply-To: =?utf-8?q?=E6=97=A5=E6=9C=AC?= <nihon@example.jp>
Subject: =?UTF-8?B?8J+TpiBQYWtldA==?= =?ISO-8859-1?Q?_f=FCr_Sie?=

hi
"""
    )

    result = payload(raw)

    assert result["message"]["subject"] == "📦 Paket für Sie"
    assert result["message"]["headers"]["Subject"] == ["📦 Paket für Sie"]
    envelope = result["envelope"]
    assert envelope["from"] == [{"email": "jose@example.es", "name": "José García"}]
    assert envelope["to"] == [
        {"email": "francois@example.fr", "name": "François Léger"},
        {"email": "plain@example.com", "name": ""},
    ]
    assert envelope["ccs"] == [{"email": "jane@example.com", "name": "Doe, Jane"}]
    assert envelope["replyTo"] == [{"email": "nihon@example.jp", "name": "日本"}]


def test_address_groups_and_repeated_address_headers() -> None:
    raw = crlf(
        """From: a@example.com
To: undisclosed-recipients:;
To: team: x@example.com, Y <y@example.com>;
Cc: c1@example.com
CC: c2@example.com

hi
"""
    )

    envelope = payload(raw)["envelope"]

    assert envelope["to"] == [
        {"email": "x@example.com", "name": ""},
        {"email": "y@example.com", "name": "Y"},
    ]
    assert [c["email"] for c in envelope["ccs"]] == ["c1@example.com", "c2@example.com"]


def test_address_header_the_modern_parser_chokes_on() -> None:
    # "<" alone makes the standard library's address parser raise IndexError.
    raw = crlf(
        """From: Alice <alice@example.com>
To: <
Cc: Bob <bob@example.com>, <
Subject: still here

body
"""
    )

    result = payload(raw)

    assert result["message"]["headers"]["To"] == ["<"]
    assert result["message"]["subject"] == "still here"
    assert result["envelope"]["from"] == [{"email": "alice@example.com", "name": "Alice"}]
    assert {"email": "bob@example.com", "name": "Bob"} in result["envelope"]["ccs"]
    assert result["message"]["body"] == "body\r\n"


def test_8bit_utf8_body_and_header_without_transfer_encoding() -> None:
    raw = crlf(
        """From: Zoë <zoe@example.com>
Subject: Grüße aus Köln
Content-Type: text/plain

Schöne Grüße — 日本語 ✓
"""
    )

    result = payload(raw)

    assert result["message"]["body"] == "Schöne Grüße — 日本語 ✓\r\n"
    assert result["message"]["subject"] == "Grüße aus Köln"
    assert result["envelope"]["from"] == [{"email": "zoe@example.com", "name": "Zoë"}]
    assert result["message"]["raw"] == raw.decode("utf-8")


def test_invalid_utf8_message_has_raw_with_u_fffd_and_exact_raw_base64() -> None:
    raw = (
        b"Subject: Caf\xe9\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Un caf\xe9 cr\xe8me, s'il vous pla\xeet.\r\n"
    )

    result = payload(raw)

    # raw is always a string, as the seed sent it (Buggregator reads it);
    # the exact bytes are in raw_base64.
    assert result["message"]["raw"] == (
        "Subject: Caf\ufffd\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Un caf\ufffd cr\ufffdme, s'il vous pla\ufffdt.\r\n"
    )
    assert base64.b64decode(result["message"]["raw_base64"]) == raw
    assert result["message"]["body"] == "Un café crème, s'il vous plaît.\r\n"
    # Unlabelled 8-bit header bytes that are not UTF-8 are read as Latin-1.
    assert result["message"]["subject"] == "Café"


def test_repeated_headers_keep_their_order_under_the_canonical_key() -> None:
    raw = crlf(
        """Received: from c by b; Tue, 24 Nov 2026 10:00:02 +0000
X-Tag: one
Received: from b by a; Tue, 24 Nov 2026 10:00:01 +0000
x-tag: two
RECEIVED: from a by origin; Tue, 24 Nov 2026 10:00:00 +0000
Subject: s

body
"""
    )

    headers = payload(raw)["message"]["headers"]

    assert headers["Received"] == [
        "from c by b; Tue, 24 Nov 2026 10:00:02 +0000",
        "from b by a; Tue, 24 Nov 2026 10:00:01 +0000",
        "from a by origin; Tue, 24 Nov 2026 10:00:00 +0000",
    ]
    assert headers["X-Tag"] == ["one", "two"]
    assert "RECEIVED" not in headers
    assert "x-tag" not in headers


def test_folded_headers_are_unfolded() -> None:
    raw = crlf(
        """Subject: a subject
 folded over
\tthree lines
X-Long:
 starts on the next line
DKIM-Signature: v=1; a=rsa-sha256;
\tb=abc

body
"""
    )

    headers = payload(raw)["message"]["headers"]

    assert headers["Subject"] == ["a subject folded over\tthree lines"]
    assert headers["X-Long"] == ["starts on the next line"]
    assert headers["Dkim-Signature"] == ["v=1; a=rsa-sha256;\tb=abc"]


def test_quoted_printable_and_base64_text_parts() -> None:
    raw = crlf(
        """Content-Type: multipart/alternative; boundary=alt

--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 =E2=98=95 with a soft=
 break
--alt
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

PHA+Q2Fmw6k8L3A+
--alt--
"""
    )

    message = payload(raw)["message"]

    assert message["body"] == "Café ☕ with a soft break"
    assert message["html_body"] == "<p>Café</p>"


def test_unnamed_text_parts_of_one_message_are_joined_and_empty_ones_vanish() -> None:
    # A list manager's footer part, an empty part, and a calendar: the two
    # text parts are what a reader sees, one after the other.
    raw = crlf(
        """Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

first
--b
Content-Type: text/plain; charset=iso-8859-2


--b
Content-Type: text/plain

second
--b
Content-Type: text/calendar; method=REQUEST

BEGIN:VCALENDAR
--b--
"""
    )

    result = payload(raw)

    assert result["message"]["body"] == "first\r\n\r\nsecond"
    (calendar,) = result["attachments"]
    assert (calendar["content_type"], content(calendar)) == ("text/calendar", b"BEGIN:VCALENDAR")
    assert calendar["filename"] == "unnamed.ics"
    assert calendar["disposition"] is None


# --- broken and hostile input ----------------------------------------------------------


def test_boundary_declared_but_never_used() -> None:
    raw = crlf(
        """Subject: broken
Content-Type: multipart/mixed; boundary="nowhere"

Just some text, no parts at all.
"""
    )

    result = payload(raw)

    assert result["message"]["subject"] == "broken"
    assert "Just some text, no parts at all." in result["message"]["body"]
    assert raw_of(result) == raw


def test_missing_closing_boundary_keeps_the_parts() -> None:
    raw = crlf(
        """Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

first part
--b
Content-Type: application/octet-stream
Content-Disposition: attachment; filename=data.bin

payload bytes
"""
    )

    result = payload(raw)

    assert result["message"]["body"] == "first part"
    (attachment,) = result["attachments"]
    assert attachment["filename"] == "data.bin"
    assert content(attachment).startswith(b"payload bytes")


def test_multipart_without_boundary_parameter() -> None:
    raw = crlf(
        """Content-Type: multipart/mixed

visible text
"""
    )

    assert "visible text" in payload(raw)["message"]["body"]


def test_unknown_charset_falls_back_to_utf8_then_latin1() -> None:
    utf8 = "Subject: x\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\nnaïve ✓\r\n"
    latin1 = b"Subject: x\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\nna\xefve\r\n"
    bytes_codec = b"Content-Type: text/plain; charset=base64\r\n\r\naGk=\r\n"

    assert payload(utf8.encode("utf-8"))["message"]["body"] == "naïve ✓\r\n"
    assert payload(latin1)["message"]["body"] == "naïve\r\n"
    assert payload(bytes_codec)["message"]["body"] == "aGk=\r\n"


@pytest.mark.parametrize(
    "charset", ["punycode", "idna", "undefined", "unicode_escape", "Raw-Unicode-Escape"]
)
def test_python_codecs_that_are_no_charsets_count_as_unknown(charset: str) -> None:
    # Python would decode these (backslashes read as escapes, punycode's
    # digits after the last "-" as code points); a mail client never labels
    # text with them, so the text is read as with a charset nobody knows.
    text = "\u2713 caf\\xe9 na\\u00efve -abc9"
    raw = f"Subject: x\r\nContent-Type: text/plain; charset={charset}\r\n\r\n{text}\r\n"

    assert payload(raw.encode("utf-8"))["message"]["body"] == text + "\r\n"


def test_a_big_part_labelled_punycode_is_read_as_sent() -> None:
    # Python's punycode decoder is quadratic: this 1 MB part would take it
    # half a minute (256 KB: 8 s). In base64, so no line limit bounds it.
    text = "a" * 500_000 + "-" + "99" * 250_000
    raw = (
        b"Subject: x\r\nContent-Type: text/plain; charset=punycode\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(text.encode("ascii")).replace(b"\n", b"\r\n")
    )

    assert payload(raw, include_raw=False)["message"]["body"] == text


def test_declared_charset_with_bad_bytes_replaces_them() -> None:
    raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\nok \xff\xfe ok\r\n"

    body = payload(raw)["message"]["body"]

    assert body.startswith("ok ")
    assert body.endswith(" ok\r\n")
    assert "\ufffd" in body


def test_utf7_body_cannot_smuggle_surrogates() -> None:
    # "+2AA-" is a lone high surrogate in UTF-7.
    raw = b"Subject: =?utf-7?q?+2AA-?=\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+2AA-\r\n"

    result = payload(raw)

    assert "\ud800" not in result["message"]["body"]
    assert "\ud800" not in result["message"]["subject"]


def test_nul_bytes_in_headers_and_body() -> None:
    raw = b"Subject: a\x00b\r\nX-Null: \x00\r\n\r\nbefore\x00after\r\n"

    result = payload(raw)

    assert result["message"]["subject"] == "a\x00b"
    assert result["message"]["body"] == "before\x00after\r\n"
    assert raw_of(result) == raw


def test_header_line_without_colon() -> None:
    raw = crlf(
        """Subject: first
this line has no colon
X-After: ignored as a header

body
"""
    )

    result = payload(raw)

    assert result["message"]["subject"] == "first"
    assert "this line has no colon" in result["message"]["body"]


def test_broken_base64_and_quoted_printable() -> None:
    raw = crlf(
        """Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

bad =ZZ escape and =C3
--b
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename=x.bin

QUJD*** not base64 at all !!!=
--b--
"""
    )

    result = payload(raw)

    assert result["message"]["body"].startswith("bad =ZZ escape")
    (attachment,) = result["attachments"]
    assert attachment["filename"] == "x.bin"
    assert attachment["size"] == len(content(attachment))


def test_content_type_the_modern_parser_chokes_on() -> None:
    # "Content-Type: ;.*" makes policy.default's parser raise IndexError.
    raw = crlf(
        """Subject: odd content type
From: Alice <alice@example.com>
Content-Type: ;.*

still readable
"""
    )

    result = payload(raw)

    assert result["message"]["subject"] == "odd content type"
    assert result["message"]["body"] == "still readable\r\n"
    assert result["envelope"]["from"] == [{"email": "alice@example.com", "name": "Alice"}]


def test_ten_thousand_headers() -> None:
    raw = (
        b"".join(b"X-Header-%d: value %d\r\n" % (i, i) for i in range(10_000))
        + b"Received: one\r\nReceived: two\r\n\r\nbody\r\n"
    )

    result = payload(raw)

    headers = result["message"]["headers"]
    assert len(headers) == 10_001
    assert headers["X-Header-9999"] == ["value 9999"]
    assert headers["Received"] == ["one", "two"]
    assert result["message"]["body"] == "body\r\n"


def test_thousand_parts() -> None:
    parts = "".join(
        f"--b\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Disposition: attachment; filename=f{i}.bin\r\n\r\npart {i}\r\n"
        for i in range(1000)
    )
    raw = f"Content-Type: multipart/mixed; boundary=b\r\n\r\n{parts}--b--\r\n".encode()

    attachments = payload(raw)["attachments"]

    assert len(attachments) == 1000
    assert attachments[0]["filename"] == "f0.bin"
    assert content(attachments[999]) == b"part 999"


def nested(depth: int, leaf: str = "Content-Type: text/plain\r\n\r\ndeep text") -> bytes:
    """A message with ``depth`` multiparts inside each other and one text leaf."""
    opening = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth)
    )
    closing = "".join(f"\r\n--b{i}--" for i in reversed(range(depth)))
    return ("Subject: nested\r\n" + opening + leaf + closing + "\r\n").encode()


def test_nesting_within_reason_is_walked() -> None:
    result = payload(nested(30))

    assert result["message"]["body"] == "deep text"


def test_two_hundred_deep_nesting_stops_descending_but_keeps_raw() -> None:
    raw = nested(200)

    result = payload(raw)

    assert result["message"]["subject"] == "nested"
    assert result["message"]["body"] == ""
    assert raw_of(result) == raw


def test_nesting_deeper_than_the_parser_can_recurse() -> None:
    raw = nested(3000)

    result = payload(raw)

    assert result["message"]["subject"] == "nested"
    assert result["size"] == len(raw)
    assert raw_of(result) == raw


def test_empty_message() -> None:
    result = payload(b"")

    assert result["size"] == 0
    assert result["message"] == {
        "id": None,
        "subject": "",
        "headers": {},
        "body": "",
        "html_body": "",
        "raw": "",
    }
    assert result["attachments"] == []
    assert result["envelope"]["from"] == []


def test_garbage_bytes() -> None:
    raw = bytes(range(256)) * 8 + b"\r\n\r\n--\r\n\xff:\x00\r\n"

    result = payload(raw)

    assert raw_of(result) == raw
    assert result["size"] == len(raw)


# --- embedded messages -------------------------------------------------------------------


FORWARDED = """From: Original <orig@example.com>
Subject: the original
Content-Type: multipart/mixed; boundary=inner

--inner
Content-Type: text/plain

original text
--inner
Content-Type: application/pdf
Content-Disposition: attachment; filename=inner.pdf

PDFDATA
--inner--
"""


def test_attached_email_is_one_attachment() -> None:
    raw = crlf(
        f"""Subject: Fwd: the original
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: text/plain

see the attached mail
--outer
Content-Type: message/rfc822; name="original.eml"
Content-Disposition: attachment; filename="original.eml"

{FORWARDED}
--outer--
"""
    )

    result = payload(raw)

    assert result["message"]["body"] == "see the attached mail"
    (eml,) = result["attachments"]
    assert eml["filename"] == "original.eml"
    assert eml["content_type"] == "message/rfc822"
    inner = content(eml)
    assert b"Subject: the original" in inner
    assert b"original text" in inner
    assert b"PDFDATA" in inner


def test_inline_forwarded_email_is_walked() -> None:
    raw = crlf(
        f"""Subject: Fwd: the original
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: text/plain

forwarding this
--outer
Content-Type: message/rfc822

{FORWARDED}
--outer--
"""
    )

    result = payload(raw)

    assert result["message"]["subject"] == "Fwd: the original"
    assert result["message"]["body"] == "forwarding this"
    filenames = [a["filename"] for a in result["attachments"]]
    assert "inner.pdf" in filenames
    text = next(a for a in result["attachments"] if a["content_type"] == "text/plain")
    assert content(text) == b"original text"


def test_delivery_status_report() -> None:
    raw = crlf(
        """Subject: Undelivered Mail Returned to Sender
Content-Type: multipart/report; report-type=delivery-status; boundary=r

--r
Content-Type: text/plain

Your message could not be delivered.
--r
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com

Final-Recipient: rfc822; nobody@example.com
Action: failed
Status: 5.1.1
--r--
"""
    )

    result = payload(raw)

    assert result["message"]["body"] == "Your message could not be delivered."
    (report,) = result["attachments"]
    assert report["content_type"] == "message/delivery-status"
    assert b"Status: 5.1.1" in content(report)


# --- performance -----------------------------------------------------------------------------


def test_a_100kb_message_takes_milliseconds() -> None:
    msg = EmailMessage()
    msg["From"] = "Jöhn <john@example.com>"
    msg["To"] = "a@example.com"
    msg["Subject"] = "Report"
    msg.set_content("line of text\n" * 1500)
    msg.add_alternative("<p>line of text</p>\n" * 1500, subtype="html")
    msg.add_attachment(bytes(range(256)) * 200, maintype="application", subtype="pdf")
    raw = msg.as_bytes()
    assert 90_000 < len(raw) < 120_000
    payload(raw)  # warm-up

    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        payload(raw)
    per_message = (time.perf_counter() - start) / runs

    # Measured ~4 ms; the bound only catches an accidental quadratic path.
    assert per_message < 0.05


# --- properties ------------------------------------------------------------------------------


PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(st.binary(max_size=5000))
def test_any_bytes_make_a_payload(raw: bytes) -> None:
    result = payload(raw)

    assert result["size"] == len(raw)
    assert raw_of(result) == raw


header_names = st.sampled_from(
    [
        "Subject",
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Message-ID",
        "Content-Type",
        "Content-Disposition",
        "Content-Transfer-Encoding",
        "Content-ID",
        "X-Custom",
    ]
) | st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
header_values = st.text(max_size=80) | st.sampled_from(
    [
        "multipart/mixed; boundary=b",
        "multipart/alternative; boundary=b",
        "text/html; charset=utf-8",
        "text/plain; charset=x-unknown",
        "message/rfc822",
        "base64",
        "quoted-printable",
        "attachment; filename*=utf-8''%C3%A9t%C3%A9.txt",
        "=?UTF-8?B?w6l0w6k=?= <x@example.com>",
        "=?iso-8859-1?q?=E9t=E9?=",
        "<",
        ";.*",
    ]
)
bodies = st.lists(
    st.text(max_size=200)
    | st.sampled_from(["--b", "--b--", "\n", "Content-Type: text/html\n\n", "=C3=A9", "QUJD"]),
    max_size=12,
).map("\n".join)


@PROPERTY_SETTINGS
@given(
    st.lists(st.tuples(header_names, header_values), max_size=15),
    bodies,
    st.sampled_from(["utf-8", "latin-1", "utf-16"]),
    st.sampled_from(["\r\n", "\n"]),
)
def test_messages_from_random_headers_and_bodies(
    headers: list[tuple[str, str]], body: str, encoding: str, newline: str
) -> None:
    text = "".join(f"{name}: {value}\n" for name, value in headers) + "\n" + body
    raw = text.replace("\n", newline).encode(encoding, "replace")

    result = payload(raw)

    assert result["size"] == len(raw)
    assert raw_of(result) == raw
    assert isinstance(result["message"]["subject"], str)


def encoded_words(text: str, cut: int, q: bool) -> str:
    """``text`` as RFC 2047 encoded words of ``cut`` characters, folded between words."""
    words = []
    for i in range(0, len(text), cut):
        data = text[i : i + cut].encode("utf-8")
        if q:
            encoded = "".join(
                chr(b) if chr(b).isalnum() and b < 128 else "_" if b == 32 else f"={b:02X}"
                for b in data
            )
            words.append(f"=?UTF-8?Q?{encoded}?=")
        else:
            words.append(f"=?utf-8?b?{base64.b64encode(data).decode()}?=")
    return "\r\n ".join(words)


@PROPERTY_SETTINGS
@given(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80),
    st.integers(min_value=1, max_value=20),
    st.booleans(),
)
def test_encoded_word_subjects_and_names_come_back(text: str, cut: int, q: bool) -> None:
    words = encoded_words(text, cut, q)
    raw = f"Subject: {words}\r\nFrom: {words} <who@example.com>\r\n\r\nbody\r\n".encode()

    result = payload(raw)

    # Surrounding whitespace is not part of a header value.
    assert result["message"]["subject"] == text.strip(" \t")
    assert result["envelope"]["from"][0]["email"] == "who@example.com"
    # Adjacent encoded words join with no space between (RFC 2047 §6.2),
    # whatever CPython's address parser does with them (gh-128110). A
    # display name's own runs of white space may be normalised.
    name = result["envelope"]["from"][0]["name"]
    assert name.split() == text.split()


@PROPERTY_SETTINGS
@given(
    st.binary(max_size=2000),
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=300),
)
def test_attachments_python_sends_come_back(attachment: bytes, body: str) -> None:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.com>"
    msg.set_content(body)
    msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="f.bin")

    result = payload(msg.as_bytes())

    (sent,) = result["attachments"]
    assert content(sent) == attachment
    assert sent["size"] == len(attachment)
    assert sent["filename"] == "f.bin"


@pytest.mark.parametrize(
    "value",
    [
        '"Doe, John" <j@x.example>, b@y.example',
        "Ann <ann@example.com>",
        "undisclosed-recipients:;",
        "a@b.example (a comment)",
        "Team: a@b.example, c@d.example;",
        "<a@b.example>",
        "a@b.example, ,c@d.example",
        "John Q. Public <jqp@example.com>",
    ],
)
def test_plain_address_headers_read_the_same_as_with_the_modern_parser(value: str) -> None:
    # Plain ASCII address headers take a faster parser; what consumers see
    # must not depend on which one ran.
    modern = email.policy.default.header_factory("To", value)
    expected = [{"email": a.addr_spec, "name": a.display_name} for a in modern.addresses]
    result = payload(b"To: " + value.encode() + b"\r\nSubject: x\r\n\r\nbody\r\n")
    assert result["envelope"]["to"] == expected


# --- cases of issues 11 and 14 (also sent through the daemon, tests/e2e) ---------------------


@pytest.mark.parametrize("name", list(CASES))
def test_payload_case(name: str) -> None:
    case = CASES[name]
    case.check(payload(case.raw))
