"""What a consumer's handler is given: the reserved job, its lease, the email.

The email payload (SPEC §5, docs/payload.md) arrives as JSON *text* inside
the job; :meth:`ReservedJob.email` decodes it into typed, frozen pydantic
models. Attachments' ``content`` is base64 on the wire and ``bytes`` here;
the message as received is :attr:`Message.raw_bytes` whichever of ``raw`` and
``raw_base64`` the daemon sent. JSON names that are not Python names keep
their JSON spelling as an alias (``allRecipients`` → ``all_recipients``,
``from`` → ``from_``). Unknown members are ignored, so a newer daemon that
adds a field does not break an older consumer.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from trismtp.jobs.model import Job

__all__ = [
    "Address",
    "Attachment",
    "Authentication",
    "Email",
    "Envelope",
    "Lease",
    "Message",
    "PayloadError",
    "ReservedJob",
    "Tls",
]


class PayloadError(ValueError):
    """A job's payload is not the email payload (or not JSON at all)."""


def _base64(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not base64: {exc}") from None
    return value


Base64 = Annotated[bytes, BeforeValidator(_base64)]

_FROZEN = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Address(BaseModel):
    """A mailbox from a From/To/Cc/Reply-To header; ``name`` is ``""`` if none."""

    model_config = _FROZEN

    email: str
    name: str = ""


class Envelope(BaseModel):
    """What the SMTP client said (HELO, MAIL FROM, RCPT TO) and the address headers."""

    model_config = _FROZEN

    helo: str = ""
    mail_from: str = ""
    all_recipients: tuple[str, ...] = Field(default=(), alias="allRecipients")
    from_: tuple[Address, ...] = Field(default=(), alias="from")
    to: tuple[Address, ...] = ()
    ccs: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = Field(default=(), alias="replyTo")


class Authentication(BaseModel):
    """How the SMTP client authenticated (never a password)."""

    model_config = _FROZEN

    mechanism: str
    username: str


class Tls(BaseModel):
    """The TLS the message came over: OpenSSL's names."""

    model_config = _FROZEN

    version: str
    cipher: str


class Message(BaseModel):
    """The message: decoded headers, bodies and, with include_raw, the bytes."""

    model_config = _FROZEN

    id: str | None = None
    subject: str = ""
    headers: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    body: str = ""
    html_body: str = ""
    raw: str | None = None
    raw_base64: Base64 | None = None

    @property
    def raw_bytes(self) -> bytes | None:
        """The message exactly as received, or None without ``smtp.include_raw``."""
        if self.raw_base64 is not None:
            return self.raw_base64
        return None if self.raw is None else self.raw.encode("utf-8")


class Attachment(BaseModel):
    """One attached part; ``content`` is the decoded bytes."""

    model_config = _FROZEN

    filename: str = "unnamed"
    content_type: str = "application/octet-stream"
    size: int = 0
    content_id: str | None = None
    disposition: str = "attachment"
    content: Base64 = b""


class Email(BaseModel):
    """The email payload of an ``smtp.email`` job (SPEC §5)."""

    model_config = _FROZEN

    event: str = "EMAIL_RECEIVED"
    uuid: str
    remote_addr: str = ""
    received_at: str = ""
    size: int = 0
    envelope: Envelope = Field(default_factory=Envelope)
    authentication: Authentication | None = None
    tls: Tls | None = None
    message: Message = Field(default_factory=Message)
    attachments: tuple[Attachment, ...] = ()


class Lease(BaseModel):
    """The consumer's hold on a reserved job (docs/rpc.md, jobs.Reserve).

    ``token`` proves the hold in Ack, Nack and Extend; ``attempt`` is 1 on
    the first delivery and one more on each later one; ``expires_at`` is in
    wall-clock seconds since the epoch.
    """

    model_config = _FROZEN

    token: str
    attempt: int = 1
    expires_at: float = 0.0


class ReservedJob(Job):
    """A job as ``jobs.Reserve`` hands it out: the five RoadRunner members and its lease."""

    lease: Lease
    _email: Email | None = PrivateAttr(default=None)

    def email(self) -> Email:
        """The payload decoded as the email payload; raises :class:`PayloadError`.

        Decoded once, on the first call.
        """
        if self._email is None:
            try:
                self._email = Email.model_validate_json(self.payload)
            except ValidationError as exc:
                raise PayloadError(f"job {self.id}: not an email payload: {exc}") from None
        return self._email

    def ref(self) -> dict[str, str]:
        """``{"id", "token"}``: how Ack, Nack and Extend name this delivery."""
        return {"id": self.id, "token": self.lease.token}
