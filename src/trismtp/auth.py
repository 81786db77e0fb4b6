"""SMTP AUTH credentials: password hashes, the users file, and SASL decoding.

Password hashes
---------------
Passwords are hashed with scrypt (RFC 7914) from :func:`hashlib.scrypt`. It is
memory-hard, so guessing a leaked hash on a GPU or an ASIC costs memory as well
as time, and it is in the standard library (since Python 3.6, with OpenSSL), so
it adds no dependency. argon2id would be the first choice but needs a C
extension; bcrypt needs one too, and silently ignores everything after the
72nd byte of a password.

A hash is stored as a PHC-like string that carries its own parameters::

    $scrypt$ln=14,r=8,p=1$<salt>$<key>

``ln`` is log2 of the CPU/memory cost N, ``r`` the block size and ``p`` the
parallelism; salt (16 random bytes) and key (32 bytes) are base64 without
padding. Verification reads the parameters from the string, so the defaults can
be raised later without invalidating existing hashes. Parameters beyond
:data:`MAX_LN`, :data:`MAX_R` or :data:`MAX_P` are refused when the file is
loaded, not when a client logs in: a typo must not turn every login into a
multi-gigabyte allocation.

The users file
--------------
UTF-8 text, one ``username:hash`` per line. Blank lines and lines whose first
non-blank character is ``#`` are ignored. A username is not empty and holds no
``:``, whitespace or control characters; it is compared exactly (case matters).
Each user appears once. ``trismtp passwd FILE USERNAME`` writes this file.

SASL
----
:func:`decode_plain` (RFC 4616) and :func:`decode_login_field` (the LOGIN
mechanism) turn a client's base64 response into text, raising
:class:`SaslError` with a message that is safe to send back to the client. A
response of ``*`` is the client cancelling the exchange (RFC 4954 §4): the
decoders raise :class:`SaslCancelled` for it, and :func:`is_cancel` lets a
caller check first.

Nothing here puts a password or a hash into an exception message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CANCEL",
    "DEFAULT_LN",
    "DEFAULT_P",
    "DEFAULT_R",
    "LOGIN_PASSWORD_CHALLENGE",
    "LOGIN_USERNAME_CHALLENGE",
    "MAX_LN",
    "MAX_P",
    "MAX_R",
    "AuthFileError",
    "Credentials",
    "SaslCancelled",
    "SaslError",
    "UsersFile",
    "check_username",
    "decode_login_field",
    "decode_plain",
    "edit_users",
    "hash_password",
    "is_cancel",
    "read_users_text",
    "verify_password",
]

DEFAULT_LN = 14
"""log2 of scrypt's N: 2**14 with r=8 takes 16 MiB and some tens of ms."""
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

MAX_LN = 20
MAX_R = 16
MAX_P = 4
MAX_MEMORY = 1 << 30
"""Bytes one verification may allocate (128·r·N); ln=20 with r=16 would need 2 GiB."""

LOGIN_USERNAME_CHALLENGE = "VXNlcm5hbWU6"
"""``base64("Username:")``, the LOGIN mechanism's first ``334`` challenge."""
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"
"""``base64("Password:")``, the LOGIN mechanism's second ``334`` challenge."""

CANCEL = "*"
"""The response with which a client cancels an AUTH exchange (RFC 4954 §4)."""


# -- hashing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class _Scrypt:
    """A parsed hash: the parameters, salt and key of one ``$scrypt$`` string."""

    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def derive(self, password: str) -> bytes:
        # "surrogatepass": a str that cannot be UTF-8 (lone surrogates) still
        # costs a full scrypt and then fails to match, instead of raising.
        secret = password.encode("utf-8", "surrogatepass")
        return _scrypt(secret, self.salt, self.ln, self.r, self.p, len(self.key))

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)

    def encode(self) -> str:
        return f"$scrypt$ln={self.ln},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def _scrypt(secret: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    # OpenSSL refuses to allocate more than maxmem (32 MiB by default); what it
    # needs is about 128·r·(N + p + 2) bytes, so allow that and a little more.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def _check_parameters(ln: int, r: int, p: int) -> None:
    """Raise ValueError for parameters this module refuses to compute."""
    if not 1 <= ln <= MAX_LN:
        raise ValueError(f"scrypt ln must be between 1 and {MAX_LN}, not {ln}")
    if not 1 <= r <= MAX_R:
        raise ValueError(f"scrypt r must be between 1 and {MAX_R}, not {r}")
    if not 1 <= p <= MAX_P:
        raise ValueError(f"scrypt p must be between 1 and {MAX_P}, not {p}")
    if 128 * r * (1 << ln) > MAX_MEMORY:
        raise ValueError(f"scrypt ln={ln} with r={r} needs more than {MAX_MEMORY >> 30} GiB")


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """The ``$scrypt$…`` string of *password* with a fresh random salt.

    Lower *ln* only in tests: the default is the cost a login pays. Raises
    ValueError for an empty password or one with a NUL character (neither could
    ever log in: SASL PLAIN forbids both), for one that is not valid Unicode,
    and for parameters out of range.
    """
    if not password:
        raise ValueError("the password is empty")
    if "\0" in password:
        raise ValueError("the password contains a NUL character")
    _check_parameters(ln, r, p)
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:  # its message would quote the password
        raise ValueError("the password is not valid Unicode") from None
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(secret, salt, ln, r, p, KEY_BYTES)
    return _Scrypt(ln, r, p, salt, key).encode()


def verify_password(password: str, encoded: str) -> bool:
    """Whether *password* matches the ``$scrypt$…`` string *encoded*.

    Raises ValueError if *encoded* is not a hash this module accepts; the
    message never contains the hash.
    """
    return _parse_hash(encoded).matches(password)


_HASH_RE = re.compile(
    r"\$scrypt\$ln=([1-9][0-9]?),r=([1-9][0-9]?),p=([1-9][0-9]?)"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def _parse_hash(encoded: str) -> _Scrypt:
    if not encoded.startswith("$scrypt$"):
        raise ValueError("not an scrypt hash (expected $scrypt$ln=…,r=…,p=…$salt$key)")
    match = _HASH_RE.fullmatch(encoded)
    if match is None:
        raise ValueError("malformed scrypt hash (expected $scrypt$ln=…,r=…,p=…$salt$key)")
    ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
    _check_parameters(ln, r, p)
    salt = _unb64(match.group(4), "salt")
    key = _unb64(match.group(5), "key")
    if len(salt) < 8:
        raise ValueError("scrypt salt is shorter than 8 bytes")
    if not 16 <= len(key) <= 64:
        raise ValueError("scrypt key must be 16 to 64 bytes")
    return _Scrypt(ln, r, p, salt, key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    """Unpadded base64, canonical only: ``_b64(result) == text``."""
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"scrypt {what} is not valid base64") from None
    if _b64(data) != text:
        raise ValueError(f"scrypt {what} is not canonical unpadded base64")
    return data


# -- the users file -----------------------------------------------------------


class AuthFileError(Exception):
    """A users file that cannot be read or is malformed.

    ``str()`` names the file and, for a bad line, the line number:
    ``users.passwd line 3: …``. It never contains a hash or a password.
    """

    def __init__(self, source: str, reason: str, line: int | None = None) -> None:
        super().__init__(source, reason, line)
        self.source = source
        self.reason = reason
        self.line = line

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source} line {self.line}"
        return f"{where}: {self.reason}"


def read_users_text(path: str | os.PathLike[str]) -> str:
    """The text of the users file at *path*; raise :class:`AuthFileError` if unreadable."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise AuthFileError(source, "file not found") from None
    except OSError as exc:
        raise AuthFileError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AuthFileError(source, "not valid UTF-8", line) from None


def _username_problem(username: str) -> str | None:
    """Why *username* cannot be in a users file, or None if it can."""
    if not username:
        return "the username is empty"
    for char in username:
        if char == ":":
            return "the username contains ':'"
        if char.isspace():
            return "the username contains whitespace"
        if unicodedata.category(char).startswith("C"):
            return "the username contains a control character"
    return None


def check_username(username: str) -> None:
    """Raise ValueError if *username* cannot be written to a users file."""
    problem = _username_problem(username)
    if problem is not None:
        raise ValueError(problem)


class _LineError(ValueError):
    def __init__(self, reason: str, line: int) -> None:
        super().__init__(f"line {line}: {reason}")
        self.reason = reason
        self.line = line


def _entries(text: str) -> Iterator[tuple[int, str, str]]:
    """``(line number, username, hash)`` of each entry line of a users file.

    Lines end at ``\\n`` only (with an optional ``\\r`` before it), unlike
    :meth:`str.splitlines`, so that what counts as a line is what an editor
    shows. Raises :class:`_LineError` on a line that is neither a comment,
    blank, nor ``username:hash``.
    """
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, colon, encoded = line.partition(":")
        if not colon:
            raise _LineError("expected username:hash", number)
        problem = _username_problem(username)
        if problem is not None:
            raise _LineError(problem, number)
        yield number, username, encoded


class UsersFile:
    """The users allowed to authenticate, with their parsed password hashes.

    Immutable once loaded, so :meth:`verify` may run in several threads at
    once (trio.to_thread): scrypt releases the GIL.
    """

    __slots__ = ("_dummy", "_users", "source")

    def __init__(self, users: dict[str, _Scrypt], source: str) -> None:
        self.source = source
        self._users = users
        self._dummy = _dummy_for(users.values())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UsersFile:
        """Read and check the users file at *path*; raise :class:`AuthFileError` if wrong."""
        return cls.parse(read_users_text(path), source=os.fspath(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "<users>") -> UsersFile:
        """The users of *text*, a users file's content; *source* names it in errors."""
        try:
            entries = list(_entries(text))
        except _LineError as exc:
            raise AuthFileError(source, exc.reason, exc.line) from None
        users: dict[str, _Scrypt] = {}
        lines: dict[str, int] = {}
        for number, username, encoded in entries:
            if username in users:
                reason = f"user {username!r} already defined on line {lines[username]}"
                raise AuthFileError(source, reason, number)
            try:
                users[username] = _parse_hash(encoded)
            except ValueError as exc:
                raise AuthFileError(source, f"user {username!r}: {exc}", number) from None
            lines[username] = number
        return cls(users, source)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def __repr__(self) -> str:
        return f"<UsersFile {self.source!r}: {len(self._users)} users>"

    @property
    def usernames(self) -> frozenset[str]:
        return frozenset(self._users)

    def verify(self, username: str, password: str) -> bool:
        """Whether *password* is *username*'s password.

        CPU-bound (a full scrypt, tens of ms at the default cost) and
        synchronous: run it in a worker thread. An unknown user costs the same
        scrypt, against a dummy hash with the file's usual parameters, so the
        time taken does not tell which users exist.
        """
        entry = self._users.get(username)
        if entry is None:
            self._dummy.matches(password)
            return False
        return entry.matches(password)


def _dummy_for(entries: Iterable[_Scrypt]) -> _Scrypt:
    """A hash no password matches, costing what most entries cost.

    Its key is random bytes, not the output of scrypt: finding a password that
    derives to it is as hard as inverting scrypt, and building it costs nothing.
    """
    counts = Counter((e.ln, e.r, e.p) for e in entries)
    ln, r, p = counts.most_common(1)[0][0] if counts else (DEFAULT_LN, DEFAULT_R, DEFAULT_P)
    return _Scrypt(ln, r, p, secrets.token_bytes(SALT_BYTES), secrets.token_bytes(KEY_BYTES))


def edit_users(text: str, username: str, encoded: str | None) -> tuple[str, bool]:
    """*text* (a valid users file) with *username*'s line set to *encoded*.

    With *encoded* None the user's line is removed. A replaced line keeps its
    place; a new user is appended. Every other line, comments included, is
    kept as it is. Returns the new text and whether the user was there before.
    Raises ValueError if *text* is not a valid users file line by line (call
    :meth:`UsersFile.parse` first for a message naming the file), or if
    *username* or *encoded* could not be written.
    """
    check_username(username)
    if encoded is not None:
        _parse_hash(encoded)
    lines = text.split("\n")
    index = {number - 1: name for number, name, _ in _entries(text)}
    found = next((i for i, name in index.items() if name == username), None)
    if found is not None:
        if encoded is None:
            del lines[found]
        else:
            ending = "\r" if lines[found].endswith("\r") else ""
            lines[found] = f"{username}:{encoded}{ending}"
        return "\n".join(lines), True
    if encoded is None:
        return text, False
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{username}:{encoded}\n", False


# -- SASL ---------------------------------------------------------------------


class SaslError(Exception):
    """A client's SASL response is unusable; ``str()`` is safe to send back to it."""


class SaslCancelled(SaslError):
    """The client answered ``*``: it cancels the AUTH exchange (RFC 4954 §4)."""

    def __init__(self) -> None:
        super().__init__("authentication cancelled")


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """A username and password from a client; the repr masks the password."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"

    __str__ = __repr__


def is_cancel(response: str) -> bool:
    """Whether *response* is ``*``, the client cancelling the exchange."""
    return response.strip() == CANCEL


def _decode_response(response: str) -> bytes:
    """The bytes of a base64 SASL response (``=`` is an empty one, RFC 4954 §4)."""
    response = response.strip()
    if response == CANCEL:
        raise SaslCancelled
    if response == "=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise SaslError("invalid base64 in the response") from None


def decode_plain(response: str) -> Credentials:
    """The credentials in a PLAIN response (RFC 4616): ``authzid NUL authcid NUL passwd``.

    An authorization identity is accepted only when empty or equal to the
    authentication identity: trismtp does not let one user act as another.
    """
    parts = _decode_response(response).split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SaslError("PLAIN response is not valid UTF-8") from None
    if not authcid:
        raise SaslError("empty username")
    if not password:
        raise SaslError("empty password")
    if authzid and authzid != authcid:
        raise SaslError("proxy authorization is not supported")
    return Credentials(authcid, password)


def decode_login_field(response: str) -> str:
    """The username or password in a LOGIN mechanism response (base64 UTF-8 text)."""
    data = _decode_response(response)
    if not data:
        raise SaslError("empty response")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("response is not valid UTF-8") from None
