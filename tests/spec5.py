"""The email payload contract of shared SPEC §5, as one check every payload test can run.

:func:`check_payload` asserts what a consumer written for the seed
(buggregator/smtp-server 2.0, read by Buggregator's ``EmailHandler``) relies
on, plus trismtp's own additions: every field present with its type, every
attachment ``filename`` a non-empty string, ``message.raw`` always a string
when raw is included (``raw_base64`` as well exactly when the bytes are not
UTF-8), header keys in Go's canonical form, ``subject`` equal to
``headers["Subject"][0]``, and attachment content that decodes to ``size``
bytes. The canonical-key rule is written out here on its own, from Go's
documentation, rather than imported from the code under test.
"""

from __future__ import annotations

import base64
import re
from typing import Any

__all__ = ["check_payload", "go_canonical_key", "raw_of"]

_PAYLOAD_KEYS = [
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
_ENVELOPE_KEYS = {"helo", "mail_from", "allRecipients", "from", "to", "ccs", "replyTo"}
_MESSAGE_KEYS = {"id", "subject", "headers", "body", "html_body"}
_ATTACHMENT_KEYS = {"filename", "content_type", "size", "content_id", "disposition", "content"}
_TOKEN_PUNCTUATION = set("!#$%&'*+-.^_`|~")


def go_canonical_key(name: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``, byte by byte as Go documents it."""
    valid = all((c.isascii() and c.isalnum()) or c in _TOKEN_PUNCTUATION for c in name)
    if not name or not valid:
        return name  # Go returns keys with a space or invalid byte unchanged
    out = []
    upper = True
    for c in name:
        out.append(c.upper() if upper else c.lower())
        upper = c == "-"
    return "".join(out)


def raw_of(message: dict[str, Any]) -> bytes:
    """The received bytes as a consumer gets them back from ``message``."""
    if "raw_base64" in message:
        return base64.b64decode(message["raw_base64"], validate=True)
    raw: bytes = message["raw"].encode("utf-8")
    return raw


def _addresses(value: Any, where: str) -> None:
    assert isinstance(value, list), where
    for item in value:
        assert isinstance(item, dict), (where, item)
        assert set(item) == {"email", "name"}, (where, item)
        assert isinstance(item["email"], str), (where, item)
        assert isinstance(item["name"], str), (where, item)


def check_payload(
    payload: dict[str, Any], raw: bytes | None = None, *, include_raw: bool = True
) -> None:
    """Assert that ``payload`` keeps SPEC §5; ``raw`` is the message as received."""
    assert list(payload) == _PAYLOAD_KEYS
    assert payload["event"] == "EMAIL_RECEIVED"
    for key in ("uuid", "remote_addr", "received_at"):
        assert isinstance(payload[key], str), key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", payload["received_at"])
    assert isinstance(payload["size"], int)
    assert payload["authentication"] is None or set(payload["authentication"]) == {
        "mechanism",
        "username",
    }
    assert payload["tls"] is None or isinstance(payload["tls"], dict)

    envelope = payload["envelope"]
    assert set(envelope) == _ENVELOPE_KEYS
    assert isinstance(envelope["helo"], str)
    assert isinstance(envelope["mail_from"], str)
    assert all(isinstance(r, str) for r in envelope["allRecipients"])
    for key in ("from", "to", "ccs", "replyTo"):
        _addresses(envelope[key], key)

    message = payload["message"]
    extra = {"raw", "raw_base64"} & set(message)
    assert set(message) - extra == _MESSAGE_KEYS
    assert message["id"] is None or (isinstance(message["id"], str) and message["id"])
    for key in ("subject", "body", "html_body"):
        assert isinstance(message[key], str), key
    headers = message["headers"]
    assert isinstance(headers, dict)
    for key, values in headers.items():
        assert key == go_canonical_key(key), f"header key {key!r} is not canonical"
        assert isinstance(values, list), key
        assert values, key
        assert all(isinstance(v, str) for v in values), key
    assert message["subject"] == (headers["Subject"][0] if "Subject" in headers else "")
    if include_raw:
        # The seed always sent raw as a string; consumers read it unconditionally.
        assert isinstance(message["raw"], str)
        if raw is not None:
            assert payload["size"] == len(raw)
            try:
                exact = raw.decode("utf-8")
            except UnicodeDecodeError:
                assert message["raw"] == raw.decode("utf-8", "replace")
                assert base64.b64decode(message["raw_base64"], validate=True) == raw
            else:
                assert message["raw"] == exact
                assert "raw_base64" not in message
    else:
        assert extra == set()

    attachments = payload["attachments"]
    assert isinstance(attachments, list)
    for attachment in attachments:
        assert set(attachment) == _ATTACHMENT_KEYS, attachment.keys()
        name = attachment["filename"]
        assert isinstance(name, str), f"filename {name!r}"
        assert name, "empty filename"
        assert isinstance(attachment["content_type"], str)
        assert attachment["content_type"]
        assert attachment["content_id"] is None or (
            isinstance(attachment["content_id"], str) and attachment["content_id"]
        )
        assert attachment["disposition"] in (None, "inline", "attachment")
        data = base64.b64decode(attachment["content"], validate=True)
        assert attachment["size"] == len(data)
