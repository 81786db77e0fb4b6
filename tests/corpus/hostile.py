"""A corpus of hostile and broken messages, generated at test time.

Each entry is a name and a function that builds the message bytes, so the
corpus costs nothing at import and a large entry (10,000 header lines,
multiparts nested 2,000 deep) is built only by the test that uses it. The
messages are what the SMTP layer may hand to the parser after it has already
said 250: every one of them must still become exactly one payload.

Most entries are written with CRLF, as they arrive over SMTP; a few keep bare
LF or CR on purpose. :func:`for_smtp` gives the form the end-to-end test
sends: every line end made CRLF and a final CRLF added (SMTP carries lines,
and the server may be set to refuse bare CR/LF). Every entry keeps its lines
within :data:`MAX_SMTP_LINE` octets so that it can be sent at all.

To add an entry, write a function returning the bytes and decorate it with
``@hostile("a-name")``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

__all__ = ["MAX_SMTP_LINE", "build", "corpus", "for_smtp", "hostile", "names"]

MAX_SMTP_LINE = 998
"""Octets in a line before CRLF that RFC 5321 (and the server) allows."""

Builder = Callable[[], bytes]
_BUILDERS: dict[str, Builder] = {}


def hostile(name: str) -> Callable[[Builder], Builder]:
    """Register the decorated function as the builder of corpus entry ``name``."""

    def register(builder: Builder) -> Builder:
        assert name not in _BUILDERS, f"duplicate corpus entry {name!r}"
        _BUILDERS[name] = builder
        return builder

    return register


def names() -> list[str]:
    """Every entry's name, in definition order."""
    return list(_BUILDERS)


def build(name: str) -> bytes:
    """The bytes of entry ``name``."""
    return _BUILDERS[name]()


def corpus() -> dict[str, bytes]:
    """Every entry, built."""
    return {name: build(name) for name in _BUILDERS}


_NEWLINE = re.compile(rb"\r\n|\r|\n")


def for_smtp(raw: bytes) -> bytes:
    """``raw`` as sent over SMTP: CRLF line ends only, ending in CRLF unless empty."""
    data = _NEWLINE.sub(b"\r\n", raw)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def crlf(text: str, encoding: str = "utf-8") -> bytes:
    """``text`` written with ``\\n`` as CRLF bytes (``surrogateescape`` keeps raw bytes)."""
    return text.replace("\n", "\r\n").encode(encoding, "surrogateescape")


def _b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


HEAD = (
    "From: Sender <sender@example.org>\n"
    "To: Rcpt <rcpt@example.com>\n"
    "Date: Tue, 24 Nov 2026 10:00:00 +0000\n"
    "Message-ID: <hostile@example.org>\n"
    "MIME-Version: 1.0\n"
)


# -- MIME structure ---------------------------------------------------------------


@hostile("missing-closing-boundary")
def _missing_closing_boundary() -> bytes:
    return crlf(
        HEAD
        + "Subject: the closing boundary never comes\n"
        + 'Content-Type: multipart/mixed; boundary="b1"\n\n'
        + "--b1\nContent-Type: text/plain\n\nfirst part\n"
        + "--b1\nContent-Type: application/octet-stream\n"
        + "Content-Disposition: attachment; filename=cut.bin\n"
        + "Content-Transfer-Encoding: base64\n\nAAEC"
    )


@hostile("boundary-never-declared")
def _boundary_never_declared() -> bytes:
    return crlf(
        HEAD
        + "Subject: multipart without a boundary parameter\n"
        + "Content-Type: multipart/alternative\n\n"
        + "--frontier\nContent-Type: text/plain\n\nplain\n"
        + "--frontier\nContent-Type: text/html\n\n<p>html</p>\n--frontier--\n"
    )


@hostile("boundary-declared-but-different")
def _boundary_mismatch() -> bytes:
    return crlf(
        HEAD
        + "Subject: declared one boundary, used another\n"
        + 'Content-Type: multipart/mixed; boundary="declared"\n\n'
        + "--used\nContent-Type: text/plain\n\nwhich part am I in?\n--used--\n"
    )


@hostile("odd-boundaries")
def _odd_boundaries() -> bytes:
    # An empty boundary, one with regex and quoting characters, and one of
    # 900 octets (RFC 2046 allows 70).
    weird = "(.*)+?[^]\\\\ $ '\""
    long = "L" * 900
    return crlf(
        HEAD
        + "Subject: odd boundaries\n"
        + f'Content-Type: multipart/mixed;\n boundary="{long}"\n\n'
        + f'--{long}\nContent-Type: multipart/mixed; boundary=""\n\n'
        + "--\nContent-Type: text/plain\n\n"
        + "empty boundary part\n----\n"
        + f"--{long}\nContent-Type: multipart/alternative; boundary='{weird}'\n\n"
        + f"--{weird}\nContent-Type: text/plain\n\nregex part\n--{weird}--\n"
        + f"--{long}--\n"
    )


@hostile("thousand-mime-parts")
def _thousand_parts() -> bytes:
    parts = "".join(
        f'--p\nContent-Type: text/plain; name="p{i}.txt"\n'
        f'Content-Disposition: attachment; filename="p{i}.txt"\n\npart {i}\n'
        for i in range(1000)
    )
    return crlf(
        HEAD
        + "Subject: 1000 parts\nContent-Type: multipart/mixed; boundary=p\n\n"
        + parts
        + "--p--\n"
    )


def _nested(depth: int) -> bytes:
    opening = "".join(
        f"Content-Type: multipart/mixed; boundary=n{i}\n\n--n{i}\n" for i in range(depth)
    )
    closing = "".join(f"\n--n{i}--" for i in reversed(range(depth)))
    leaf = "Content-Type: text/plain\n\nthe innermost text"
    return crlf(HEAD + f"Subject: nested {depth} deep\n" + opening + leaf + closing + "\n")


@hostile("multipart-nested-200-deep")
def _nested_200() -> bytes:
    return _nested(200)


@hostile("multipart-nested-2000-deep")
def _nested_2000() -> bytes:
    return _nested(2000)


def _nested_rfc822(depth: int) -> bytes:
    # Every level a forwarded message holding the next one.
    opening = "".join(f"Subject: level {i}\nContent-Type: message/rfc822\n\n" for i in range(depth))
    return crlf(HEAD + opening + "Subject: the bottom\n\nthe innermost text\n")


@hostile("rfc822-nested-200-deep")
def _rfc822_200() -> bytes:
    return _nested_rfc822(200)


@hostile("rfc822-nested-2000-deep")
def _rfc822_2000() -> bytes:
    return _nested_rfc822(2000)


@hostile("rfc822-part-with-broken-message")
def _rfc822_broken() -> bytes:
    broken_inner = (
        "Subject: =?utf-8?B?broken\n"
        "From: <<<@@@>>>\n"
        'Content-Type: multipart/mixed; boundary="inner"\n'
        "Content-Transfer-Encoding: base64\n"
        "no colon on this header line\n"
        "\n"
        "--inner\n"
        "Content-Type: text/plain; charset=x-nothing\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        "=ZZ=\n=\n"
        "--inner\n"
        "Content-Type: message/rfc822\n\n"
    )
    return crlf(
        HEAD
        + "Subject: a forwarded message that is itself broken\n"
        + "Content-Type: multipart/mixed; boundary=outer\n\n"
        + "--outer\nContent-Type: text/plain\n\nsee below\n"
        + "--outer\nContent-Type: message/rfc822\n\n"
        + broken_inner
        + "--outer\nContent-Type: message/rfc822; name=fwd.eml\n"
        + "Content-Disposition: attachment; filename=fwd.eml\n\n"
        + broken_inner
        + "--outer\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        + "!!!not base64!!!\n"
        + "--outer--\n",
        "utf-8",
    )


@hostile("multipart-with-encoded-transfer-encoding")
def _multipart_cte() -> bytes:
    # RFC 2045 §6.4: a multipart must not be base64; some senders do it anyway.
    inner = _b64_lines(b"--x\r\nContent-Type: text/plain\r\n\r\nhidden\r\n--x--\r\n").decode()
    return crlf(
        HEAD
        + "Subject: base64 multipart\n"
        + "Content-Type: multipart/mixed; boundary=x\n"
        + "Content-Transfer-Encoding: base64\n\n"
        + inner
    )


# -- headers --------------------------------------------------------------------


@hostile("ten-thousand-header-lines")
def _ten_thousand_headers() -> bytes:
    lines = "".join(f"X-Spam-Header-{i % 97}: value number {i}\n" for i in range(10_000))
    return crlf(HEAD + "Subject: many headers\n" + lines + "\nbody\n")


@hostile("header-900-octets-folded-200-times")
def _header_folded_200() -> bytes:
    # One header of exactly 900 octets once unfolded, with 200 folds in it.
    name = "X-Folded: "
    words = [f"{i % 100:02d}" for i in range(201)]
    short = 900 - len(name) - len(" ".join(words))
    words[0] += "x" * short
    header = name + "\n ".join(words)
    assert len(header.replace("\n", "")) == 900
    assert header.count("\n ") == 200
    return crlf(HEAD + "Subject: folded\n" + header + "\n\nbody\n")


@hostile("header-folded-200-lines-of-900-octets")
def _header_200_long_lines() -> bytes:
    lines = "\n ".join("y" * 899 for _ in range(200))
    return crlf(HEAD + "Subject: one 180 KB header\nX-Huge: " + lines + "\n\nbody\n")


@hostile("nul-bytes-in-headers-and-body")
def _nul_bytes() -> bytes:
    return (
        b"From: nul\x00@example.org\r\n"
        b"To: <rcpt\x00@example.com>\r\n"
        b"Subject: before\x00after\r\n"
        b'Content-Type: text/plain; charset="utf-8\x00"; name="a\x00b.txt"\r\n'
        b'Content-Disposition: attachment; filename="a\x00.txt"\r\n'
        # A NUL in a header name ends the header block for the parser.
        b"X-Nul\x00Name: value\r\n"
        b"\r\n"
        b"\x00\x00\x00 body with NULs \x00\r\n\x00\r\n"
    )


@hostile("invalid-utf8-everywhere")
def _invalid_utf8() -> bytes:
    return (
        b"From: \xff\xfe <\xc3@example.org>\r\n"
        b"To: \xed\xa0\x80 <rcpt@\xe2\x82.example>\r\n"
        b"Subject: \xc0\xaf \xf8\x88\x80\x80\x80 \xc3\r\n"
        b'Content-Type: multipart/mixed; boundary="\xff\xfe"\r\n'
        b"X-\xff\xfeName: \x80\x81\x82\r\n"
        b"\r\n"
        b"--\xff\xfe\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"\xef\xbb\xbf\xc3\x28 \xa0\xa1 \xe2\x28\xa1 \xf0\x28\x8c\xbc\r\n"
        b"--\xff\xfe\r\n"
        b'Content-Type: text/html; charset="\xff"\r\n'
        b"\r\n"
        b"<p>\xfe\xff</p>\r\n"
        b"--\xff\xfe\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="\xe9t\xe9\xff.txt"\r\n'
        b"\r\n"
        b"\x80\x80\r\n"
        b"--\xff\xfe--\r\n"
    )


@hostile("eight-bit-headers")
def _eight_bit_headers() -> bytes:
    return (
        "From: Jörg Müller <jörg@bücher.example>\r\n"
        "To: 山田太郎 <taro@example.jp>\r\n"
        "Subject: Grüße – 测试 ✓\r\n"
    ).encode() + (
        "Cc: Fran\xe7ois <f@example.fr>\r\n"
        "X-Latin1: caf\xe9 cr\xe8me\r\n"
        'Content-Type: text/plain; charset=utf-8; name="r\xe9sum\xe9.txt"\r\n'
        "\r\n"
        "body\r\n"
    ).encode("latin-1")


@hostile("broken-encoded-words")
def _broken_encoded_words() -> bytes:
    return crlf(
        "From: =?utf-8?B?SsO2cmc=?= <a@example.org>, =?utf-8?Q?broken <b@example.org>\n"
        "To: =?x-unknown?B?AAAA?= <c@example.com>, =?utf-8?B?!!!?= <d@example.com>\n"
        "Cc: =?utf-8?q?=?= <e@example.com>, =?\x00?q?nul?= <f@example.com>\n"
        "Subject: =?utf-8?B?w6l0w6k?= =?utf-8?Q?=C3?= =?iso-8859-1?q?=E9t=E9 =?utf-8?Z?x?=\n"
        "  =?utf-7?B?K0FPa0Ez?= =?utf-8*fr?Q?caf=C3=A9?= =?=?=?=?= =??B??= =?utf-8?B?"
        + "A"
        * 500
        + "=?=\n"
        "X-Nested: =?utf-8?B?PT91dGYtOD9CP3c2bDB3Nms9Pz0=?=\n"
        "X-Half: =?utf-16?B?2D0=?= =?utf-8?B?7aCA?=\n"
        "\n"
        "body\n"
    )


@hostile("header-oddities")
def _header_oddities() -> bytes:
    # An mbox "From " line, a continuation before any header, a line without
    # a colon, an empty name, a space before the colon, and duplicated
    # singletons.
    return crlf(
        "From sender@example.org Tue Nov 24 10:00:00 2026\n"
        " continuation of nothing\n"
        "Subject: one\n"
        "Subject: two\n"
        "this line has no colon\n"
        ": empty name\n"
        "Content-Type : text/plain\n"
        "From: a@example.org\n"
        "From: b@example.org\n"
        "Message-ID: <1@x>\n"
        "Message-ID: <2@x>\n"
        "\n"
        "body\n"
    )


@hostile("huge-content-type-parameters")
def _huge_parameters() -> bytes:
    many = "".join(f';\n p{i}="{"v" * 40}"' for i in range(2000))
    # RFC 2231 continuations: a 120 KB file name in 2,000 pieces, some
    # percent-encoded, some not, one index missing.
    pieces = "".join(
        f";\n name*{i}*=%41%42{'c' * 50}" if i % 2 else f';\n name*{i}="{"d" * 50}"'
        for i in range(2000)
        if i != 1000
    )
    return crlf(
        HEAD
        + "Subject: enormous parameters\n"
        + "Content-Type: text/plain; charset=utf-8"
        + many
        + pieces
        + "\n"
        + "Content-Disposition: attachment; filename*=utf-8''"
        + "%E2%82%AC" * 100
        + "\n\nbody\n"
    )


@hostile("content-type-garbage")
def _content_type_garbage() -> bytes:
    return crlf(
        HEAD
        + "Subject: garbage content types\n"
        + "Content-Type: multipart/mixed; boundary=g\n\n"
        + '--g\nContent-Type: ;;;==="unterminated\n\nfirst\n'
        + "--g\nContent-Type: /\n\nsecond\n"
        + "--g\nContent-Type: text/\n\nthird\n"
        + "--g\nContent-Type: text/plain; charset*=''; charset*0=x\n\nfourth\n"
        + '--g\nContent-Type: text/html; charset="\n\n<p>fifth</p>\n'
        + '--g\nContent-Type: multipart/"\nContent-Disposition: ;filename==\n\nsixth\n'
        + "--g--\n"
    )


# -- charsets and transfer encodings ------------------------------------------------


@hostile("charset-x-unknown")
def _charset_unknown() -> bytes:
    return HEAD.replace("\n", "\r\n").encode() + (
        b"Subject: =?x-unknown?Q?caf=E9?=\r\n"
        b"Content-Type: text/plain; charset=x-unknown\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"caf\xe9 \xc3\xa9\r\n"
    )


@hostile("charset-utf-7")
def _charset_utf7() -> bytes:
    # "+2D0-" decodes to a lone high surrogate, "+AGE" is an unterminated shift.
    return crlf(
        HEAD
        + "Subject: =?utf-7?Q?+2D0-?= =?utf-7?B?K0FHRQ==?=\n"
        + "Content-Type: multipart/alternative; boundary=u\n\n"
        + "--u\nContent-Type: text/plain; charset=utf-7\n\nHi +2D0- Mom +AGE- +ZeVnLIqe-\n"
        + "--u\nContent-Type: text/html; charset=UTF-7\n\n+ADw-p+AD4-x+ADw-/p+AD4 +2D3cAA-\n"
        + "--u--\n"
    )


@hostile("charset-name-with-nul")
def _charset_nul() -> bytes:
    return HEAD.replace("\n", "\r\n").encode() + (
        b"Subject: =?utf-8\x00evil?B?w6k=?=\r\n"
        b'Content-Type: text/plain; charset="utf-8\x00latin-1"\r\n'
        b"\r\n"
        b"caf\xc3\xa9 \xe9\r\n"
    )


@hostile("charset-oddities")
def _charset_oddities() -> bytes:
    # A codec Python knows but that fails on these bytes, a non-text codec
    # name, and a charset that decodes everything to something surprising.
    parts = [
        ("utf-16", b"\xff\xfea\x00b"),
        ("hex", b"zz"),
        ("rot13", b"uryyb"),
        ("base64", b"!!!"),
        ("idna", b"xn--\xff"),
        ("utf-32", b"\x00\x00\x11\x00\xff"),
        ("cp1252", b"\x81\x8d\x8f\x90\x9d"),
        ("shift_jis", b"\x82\xa0\x82"),
        ("iso-2022-jp", b"\x1b$B\x24\x22\x1b(Bx\x1b$"),
        ("unicode-escape", b"\\N{NOPE} \\x"),
    ]
    body = b"".join(
        b"--c\r\nContent-Type: text/plain; charset=" + name.encode() + b"\r\n\r\n" + data + b"\r\n"
        for name, data in parts
    )
    return (
        HEAD.replace("\n", "\r\n").encode()
        + b"Subject: charsets\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n"
        + body
        + b"--c--\r\n"
    )


@hostile("bad-base64")
def _bad_base64() -> bytes:
    return crlf(
        HEAD
        + "Subject: broken base64\n"
        + "Content-Type: multipart/mixed; boundary=b\n\n"
        + "--b\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
        + "SGVsbG8gd29ybGQ\n!!!!\n=====\nQUJD=REVG\nA\n"
        + "--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n"
        + "Content-Disposition: attachment; filename=broken.pdf\n\n"
        + "JVBERi0xLjQK\u00e9\u00e9\n@@@@\nJVBERi0x\n"
        + "--b\nContent-Type: image/png\nContent-Transfer-Encoding: BASE64\n\n"
        + "iVBORw0KGgo=AAAA=\n"
        + "--b\nContent-Type: image/gif\nContent-Transfer-Encoding: base-64\n\nR0lGODlh\n"
        + "--b--\n"
    )


@hostile("bad-quoted-printable")
def _bad_quoted_printable() -> bytes:
    return crlf(
        HEAD
        + "Subject: broken quoted-printable\n"
        + "Content-Type: multipart/alternative; boundary=q\n\n"
        + "--q\nContent-Type: text/plain; charset=utf-8\n"
        + "Content-Transfer-Encoding: quoted-printable\n\n"
        + "=ZZ =C3 =C3=A =\n=\n=3D=3d=E9=\nsoft break at the end=\n"
        + "--q\nContent-Type: text/html; charset=iso-8859-1\n"
        + "Content-Transfer-Encoding: Quoted-Printable\n\n"
        + "<p>caf=E9 =\n=\n=X</p>=\n"
        + "--q--\n"
    )


@hostile("broken-uuencode")
def _broken_uuencode() -> bytes:
    return crlf(
        HEAD
        + "Subject: uuencode\n"
        + "Content-Type: multipart/mixed; boundary=u\n\n"
        + "--u\nContent-Type: application/octet-stream\n"
        + "Content-Transfer-Encoding: x-uuencode\n"
        + "Content-Disposition: attachment; filename=a.bin\n\n"
        + "begin 644 a.bin\nM86)C9&5F9VAI:FML;6YO<'%R<W1U=G=X>7I!0D-$149'2$E*2TQ-3D]045)3\n"
        + "!!!!\n"
        + "--u\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: uuencode\n\n"
        + "begin 644\n`\n"
        + "--u--\n"
    )


# -- message shape --------------------------------------------------------------


@hostile("empty")
def _empty() -> bytes:
    return b""


@hostile("only-headers")
def _only_headers() -> bytes:
    return crlf(HEAD + "Subject: nothing but headers\nContent-Type: text/plain\n")


@hostile("only-headers-without-final-newline")
def _only_headers_unterminated() -> bytes:
    return crlf(HEAD + "Subject: no line end at all").removesuffix(b"\r\n")


@hostile("no-header-body-separator")
def _no_separator() -> bytes:
    return crlf(
        HEAD
        + "Subject: where does the body start?\n"
        + "Content-Type: text/plain\n"
        + "This body line follows the headers with no empty line\n"
        + "and: this one looks like a header\n"
        + " and this one like a continuation\n"
    )


@hostile("body-only-garbage")
def _body_only_garbage() -> bytes:
    return bytes(range(256)) * 3 + b"\r\n"


@hostile("mixed-line-endings")
def _mixed_line_endings() -> bytes:
    return (
        b"Subject: bare CR\rFrom: a@example.org\nTo: b@example.com\r\n"
        b"Content-Type: multipart/mixed; boundary=m\n\r\n"
        b"--m\rContent-Type: text/plain\n\nlf part\r"
        b"--m\r\nContent-Type: text/plain\r\rcr part\n\r"
        b"--m--\n"
    )


# -- attachments ------------------------------------------------------------------


@hostile("attachment-filenames-path-traversal")
def _path_traversal() -> bytes:
    names = [
        'filename="../../etc/passwd"',
        'filename="..\\\\..\\\\Windows\\\\System32\\\\drivers\\\\etc\\\\hosts"',
        'filename="/etc/shadow"',
        "filename*=utf-8''..%2F..%2F..%2Froot%2F.ssh%2Fauthorized_keys",
        'filename="=?utf-8?B?Li4vLi4vZXRjL3Bhc3N3ZA==?="',
        'filename="C:\\\\autoexec.bat"',
        'filename="...."',
        'filename=""',
    ]
    parts = "".join(
        f"--t\nContent-Type: application/octet-stream\nContent-Disposition: attachment; {n}\n\n"
        f"payload {i}\n"
        for i, n in enumerate(names)
    )
    return crlf(
        HEAD
        + "Subject: path traversal\nContent-Type: multipart/mixed; boundary=t\n\n"
        + parts
        + "--t--\n"
    )


@hostile("attachment-filenames-control-characters")
def _control_filenames() -> bytes:
    names = [
        b'filename="evil\x1b[31mred\x1b[0m.txt"',
        b"filename*=utf-8''line%0D%0Abreak%00nul%07bell.txt",
        b'filename="tab\there\x7f\x08.txt"',
        b"filename*=utf-8''%E2%80%AEfdp.exe",  # right-to-left override
        b'filename="a\x00b.exe"',
        b"filename*=x-unknown''%FF%FE",
        b"filename*0*=utf-8''%C3; filename*2=tail; filename*1*=%A9",
    ]
    parts = b"".join(
        b"--t\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
        + n
        + b"\r\n\r\npayload\r\n"
        for n in names
    )
    return (
        HEAD.replace("\n", "\r\n").encode()
        + b"Subject: control characters\r\nContent-Type: multipart/mixed; boundary=t\r\n\r\n"
        + parts
        + b"--t--\r\n"
    )


# -- realistic broken samples (typed in for this corpus) ---------------------------------


@hostile("outlook-winmail-dat")
def _winmail_dat() -> bytes:
    # Outlook sending rich text as TNEF: the real content is in winmail.dat.
    # The TNEF stream here starts with the right signature and is cut short.
    tnef = base64.b64encode(b"\x78\x9f\x3e\x22\x01\x00\x01\x06\x90\x08\x00\x04\x00\x00").decode()
    return crlf(
        "Received: from EXCH01.corp.example.com (10.0.0.5) by EXCH02.corp.example.com\n"
        " (10.0.0.6) with Microsoft SMTP Server id 15.1.2507.6; Tue, 24 Nov 2026\n"
        " 10:00:00 +0100\n"
        'From: "Mustermann, Erika" <Erika.Mustermann@corp.example.com>\n'
        "To: \"'bob@example.net'\" <bob@example.net>\n"
        "Subject: AW: Angebot =?iso-8859-1?Q?f=FCr_Q4?=\n"
        "Thread-Topic: Angebot =?iso-8859-1?Q?f=FCr_Q4?=\n"
        "Thread-Index: AQHZx1Yl7kq3ZZZZZZZZZZZZZZZZZZ==\n"
        "Date: Tue, 24 Nov 2026 09:00:00 +0000\n"
        "Message-ID: <0123456789ABCDEF@EXCH01.corp.example.com>\n"
        "Accept-Language: de-DE, en-US\n"
        "Content-Language: de-DE\n"
        "X-MS-Has-Attach: yes\n"
        "X-MS-TNEF-Correlator: <0123456789ABCDEF@EXCH01.corp.example.com>\n"
        "Content-Type: multipart/mixed;\n"
        '\tboundary="_000_0123456789ABCDEFEXCH01corpexamplecom_"\n'
        "MIME-Version: 1.0\n"
        "\n"
        "--_000_0123456789ABCDEFEXCH01corpexamplecom_\n"
        'Content-Type: text/plain; charset="Windows-1252"\n'
        "Content-Transfer-Encoding: quoted-printable\n"
        "\n"
        "Hallo Bob,=0D=0Aanbei das =93Angebot=94 =96 siehe Anlage.=0D=0A=0D=0AGr=FC=DFe=\n"
        "\n"
        "--_000_0123456789ABCDEFEXCH01corpexamplecom_\n"
        'Content-Type: application/ms-tnef; name="winmail.dat"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="winmail.dat"\n'
        "\n"
        f"{tnef}AQ\n"
        "--_000_0123456789ABCDEFEXCH01corpexamplecom_--\n"
    )


@hostile("spam-mixed-encodings")
def _spam() -> bytes:
    html = (
        '<html><body><div style="display:none">ham ham ham</div>'
        '<a href="http://example.invalid/%75%6e%73%75%62">Cl&#105;ck h&#101;re</a>'
        '<img src="cid:logo"></body></html>'
    )
    html_b64 = base64.b64encode(html.encode("utf-8")).decode()
    return (
        "Return-Path: <>\r\n"
        'From: =?koi8-r?B?8NLJ18XU?= "WINNER!!!" <no-reply@example.invalid>\r\n'
        "Reply-To: <winner@example.invalid>,,, ,<\r\n"
        "To: undisclosed-recipients:;\r\n"
        "Subject: =?windows-1251?Q?=C2=FB_=E2=FB=E8=E3=F0=E0=EB=E8?= =?utf-8?B?8J+SsCDwn5Kw?="
        " FREE \xe2\x82\xac\xe2\x82\xac =?gb2312?B?1tDOxA==?=\r\n"
        "Date: Tue, 24 Nov 2026 25:61:61 +9999\r\n"
        "Message-ID: <@>\r\n"
        "MIME-Version: 1.0\r\n"
        "X-Mailer: The Bat! (v1.0) UNREG / CD5BF9353B3B7091\r\n"
        'Content-Type: multipart/related; boundary="----=_NextPart_000_0000_01D0";\r\n'
        "\ttype=text/html\r\n"
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        "\r\n"
        "------=_NextPart_000_0000_01D0\r\n"
        'Content-Type: multipart/alternative; boundary="alt"\r\n'
        "\r\n"
        "--alt\r\n"
        'Content-Type: text/plain; charset="iso-8859-1"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "You won \xe2\x82\xac1,000,000 \xa3\xa3\xa3\r\n"
        "--alt\r\n"
        'Content-Type: text/html; charset="gb2312"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        f"{html_b64}\r\n"
        "--alt--\r\n"
        "------=_NextPart_000_0000_01D0\r\n"
        'Content-Type: image/gif; name="logo.gif"\r\n'
        "Content-ID: <logo>\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==garbage!!\r\n"
        "------=_NextPart_000_0000_01D0\r\n"
        'Content-Type: application/x-msdownload; name="invoice.pdf.exe"\r\n'
        'Content-Disposition: inline; filename="invoice.pdf                    .exe"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "MZ\x90\x00\x03\r\n"
        "------=_NextPart_000_0000_01D0--\r\n"
    ).encode("latin-1")


# -- quadratic header parsing ---------------------------------------------------------
# These took the standard library's header parsers tens of seconds (time
# quadratic in a header's length) until message.py stopped handing them more
# than _MAX_PARSED_HEADER characters of a value.


@hostile("parameter-open-quote-and-semicolons")
def _open_quote_semicolons() -> bytes:
    # get_filename() re-counted the quotes from the start for every ";".
    semicolons = "\n ".join(";" * 900 for _ in range(200))
    return crlf(
        HEAD
        + "Subject: an open quote\n"
        + "Content-Type: text/plain\n"
        + f'Content-Disposition: attachment; filename="a\n {semicolons}\n\nbody\n'
    )


@hostile("subject-of-24000-encoded-words")
def _many_encoded_words() -> bytes:
    words = "\n ".join(
        "=?utf-8?B?" + base64.b64encode(f"mot {i} é".encode()).decode() + "?="
        for i in range(24_000)
    )
    return crlf(HEAD + "Subject: " + words + "\n\nbody\n")


@hostile("to-of-20000-non-ascii-names")
def _many_non_ascii_names() -> bytes:
    names = ",\n ".join(f'"Nämé {i}" <a{i}@example.org>' for i in range(20_000))
    return crlf("From: a@example.org\nTo: " + names + "\nSubject: many names\n\nbody\n")


# Uuencoded files in a plain body become attachments (message.py,
# _split_uuencoded). Pairing each "begin" with the next "end" by a lazy
# regex took time quadratic in the number of "begin" lines: 8,000 of them
# took 7 s before the pairing became one pass.


@hostile("uuencode-begin-lines-without-end")
def _uuencode_begins() -> bytes:
    return crlf(HEAD + "Subject: begin, begin, begin\n\n" + "begin 644 a\n" * 150_000)


@hostile("uuencode-block-of-begin-lines")
def _uuencode_nested_begins() -> bytes:
    lines = "begin 644 a\nM" + "!" * 60 + "\n"
    return crlf(HEAD + "Subject: one long block\n\n" + lines * 60_000 + "end\n")


@hostile("nested-multiparts-without-semicolons")
def _nested_missing_semicolons() -> bytes:
    # Every level lacks the ";" before its boundary, so each would be parsed
    # again with its whole content (message.py, _with_semicolon): 50 parses
    # of 3 MB. A budget of twice the message bounds that work.
    part = "Content-Type: text/plain\n\n" + ("x" * 76 + "\n") * 40_000
    for level in range(49, -1, -1):
        part = (
            f"Content-Type: multipart/mixed boundary=b{level}\n\n--b{level}\n{part}\n--b{level}--\n"
        )
    return crlf(HEAD + "Subject: deep\n" + part)
