"""Password hashes, the users file and SASL decoding (trismtp.auth)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from trismtp import auth
from trismtp.auth import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    AuthFileError,
    Credentials,
    SaslCancelled,
    SaslError,
    UsersFile,
    decode_login_field,
    decode_plain,
    edit_users,
    hash_password,
    is_cancel,
    verify_password,
)

FAST = 4
"""ln for hashes made in tests: N=16 instead of 16384, so each takes microseconds."""


def fast_hash(password: str) -> str:
    return hash_password(password, ln=FAST)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scrypt_string(ln: int = FAST, r: int = 8, p: int = 1, salt: int = 16, key: int = 32) -> str:
    """A well-formed hash string with the given parameters (its key matches nothing)."""
    return (
        f"$scrypt$ln={ln},r={r},p={p}${b64(b's' * salt).rstrip('=')}${b64(b'k' * key).rstrip('=')}"
    )


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every hashlib.scrypt call made by the test."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., bytes] = hashlib.scrypt

    def spy(password: bytes, **kwargs: Any) -> bytes:
        calls.append(kwargs)
        return real(password, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    return calls


# -- hashing ------------------------------------------------------------------


def test_default_parameters_round_trip() -> None:
    encoded = hash_password("correct horse")
    assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
    _, scheme, params, salt, key = encoded.split("$")
    assert (scheme, params) == ("scrypt", "ln=14,r=8,p=1")
    assert "=" not in salt + key
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(key + "=")) == 32
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse ", encoded)


def test_round_trip_and_wrong_password() -> None:
    encoded = fast_hash("pässwörd ✓")
    assert encoded.startswith(f"$scrypt$ln={FAST},r=8,p=1$")
    assert verify_password("pässwörd ✓", encoded)
    assert not verify_password("passwörd ✓", encoded)
    assert not verify_password("pässwörd", encoded)


def test_hash_is_standard_scrypt() -> None:
    """The key is plain RFC 7914 scrypt of the UTF-8 password, so other tools can check it."""
    encoded = fast_hash("secret")
    _, _, _, salt, key = encoded.split("$")
    salt_bytes = base64.b64decode(salt + "=" * (-len(salt) % 4))
    expected = hashlib.scrypt(b"secret", salt=salt_bytes, n=2**FAST, r=8, p=1, dklen=32)
    assert base64.b64decode(key + "=" * (-len(key) % 4)) == expected


def test_salt_differs_between_hashes_of_the_same_password() -> None:
    first, second = fast_hash("same"), fast_hash("same")
    assert first != second
    assert first.split("$")[3] != second.split("$")[3]
    assert verify_password("same", first)
    assert verify_password("same", second)


def test_verification_reads_the_parameters_from_the_string(
    scrypt_calls: list[dict[str, Any]],
) -> None:
    encoded = hash_password("pw", ln=5, r=4, p=2)
    assert encoded.startswith("$scrypt$ln=5,r=4,p=2$")
    assert verify_password("pw", encoded)
    assert [(c["n"], c["r"], c["p"]) for c in scrypt_calls] == [(32, 4, 2)] * 2


@pytest.mark.parametrize(
    ("password", "reason"),
    [("", "empty"), ("a\0b", "NUL"), ("bad\udc80", "not valid Unicode")],
)
def test_hash_password_refuses(password: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        hash_password(password, ln=FAST)
    assert "bad" not in str(info.value)


@pytest.mark.parametrize(("ln", "r", "p"), [(0, 8, 1), (21, 8, 1), (4, 17, 1), (4, 8, 5)])
def test_hash_password_refuses_parameters_out_of_range(ln: int, r: int, p: int) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        hash_password("pw", ln=ln, r=r, p=p)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plaintext",
        "$2b$12$abcdefghijklmnopqrstuv",
        "$scrypt$ln=4,r=8$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",
        "$scrypt$ln=04,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",
        "$scrypt$r=8,ln=4,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5==",
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5$",
        "$scrypt$ln=4,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",  # short salt
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5",  # short key
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5b",  # bad length
        # not canonical: the unused low bits of the last character are set
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdB$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",
    ],
)
def test_malformed_hash_strings_are_refused(encoded: str) -> None:
    with pytest.raises(ValueError, match="scrypt") as info:
        verify_password("pw", encoded)
    assert "c2Fsd" not in str(info.value)
    assert "a2V5" not in str(info.value)


# -- the users file -----------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "users.passwd") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_users_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    alice, bob = fast_hash("alice-pw"), fast_hash("bob-pw")
    path = write(
        tmp_path,
        f"# trismtp users\n\n   # indented comment\nalice:{alice}\r\n  bob:{bob}  \n\n",
    )
    users = UsersFile.load(path)
    assert len(users) == 2
    assert users.usernames == {"alice", "bob"}
    assert "alice" in users
    assert "carol" not in users
    assert users.verify("alice", "alice-pw")
    assert users.verify("bob", "bob-pw")
    assert not users.verify("alice", "bob-pw")
    assert not users.verify("Alice", "alice-pw")  # usernames are exact
    assert alice not in repr(users)


def test_empty_users_file(tmp_path: Path) -> None:
    users = UsersFile.load(write(tmp_path, ""))
    assert len(users) == 0
    assert not users.verify("alice", "pw")


def test_unicode_username(tmp_path: Path) -> None:
    users = UsersFile.load(write(tmp_path, f"jürgen:{fast_hash('pw')}\n"))
    assert users.verify("jürgen", "pw")


def test_unknown_user_costs_a_scrypt_with_the_files_parameters(
    tmp_path: Path, scrypt_calls: list[dict[str, Any]]
) -> None:
    lines = [f"u{i}:{hash_password('pw', ln=5, r=2)}" for i in range(2)]
    lines.append(f"odd:{hash_password('pw', ln=4, r=8)}")
    users = UsersFile.load(write(tmp_path, "\n".join(lines)))
    scrypt_calls.clear()
    assert not users.verify("nobody", "pw")
    assert not users.verify("nobody", "")
    assert [(c["n"], c["r"], c["p"]) for c in scrypt_calls] == [(32, 2, 1)] * 2


def test_unknown_user_in_an_empty_file_costs_the_default_scrypt(
    tmp_path: Path, scrypt_calls: list[dict[str, Any]]
) -> None:
    users = UsersFile.load(write(tmp_path, "# nobody yet\n"))
    assert not users.verify("nobody", "pw")
    assert [(c["n"], c["r"], c["p"]) for c in scrypt_calls] == [(2**14, 8, 1)]


def test_verify_with_a_password_that_is_not_unicode(tmp_path: Path) -> None:
    users = UsersFile.load(write(tmp_path, f"alice:{fast_hash('pw')}\n"))
    assert not users.verify("alice", "pw\udc80")
    assert not users.verify("nobody", "pw\udc80")


def test_verify_from_several_threads(tmp_path: Path) -> None:
    passwords = {f"user{i}": f"pw{i}" for i in range(8)}
    text = "".join(f"{u}:{fast_hash(pw)}\n" for u, pw in passwords.items())
    users = UsersFile.load(write(tmp_path, text))
    attempts = [(u, pw, True) for u, pw in passwords.items()]
    attempts += [(u, pw + "x", False) for u, pw in passwords.items()]
    attempts += [("ghost", "pw0", False)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda a: users.verify(a[0], a[1]), attempts * 4))
    assert results == [expected for _, _, expected in attempts * 4]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("alice", "expected username:hash"),
        (":{hash}", "the username is empty"),
        ("al ice:{hash}", "whitespace"),
        ("al\tice:{hash}", "whitespace"),
        ("al\x7fice:{hash}", "control character"),
        ("\ufeffalice:{hash}", "control character"),
        ("alice:", "not an scrypt hash"),
        ("alice:hunter2", "not an scrypt hash"),
        ("alice: {hash}", "not an scrypt hash"),
        ("alice:{hash}:extra", "malformed scrypt hash"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    good = fast_hash("pw")
    text = f"# users\nbob:{good}\n{line.format(hash=good)}\ncarol:{good}\n"
    path = write(tmp_path, text)
    with pytest.raises(AuthFileError) as info:
        UsersFile.load(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 3: ")
    assert reason in message
    assert info.value.line == 3
    assert good not in message
    assert "hunter2" not in message
    assert good.split("$")[3] not in message


def test_duplicate_user(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{fast_hash('a')}\n# again:\nalice:{fast_hash('b')}\n")
    with pytest.raises(AuthFileError, match=r"line 3: user 'alice' already defined on line 1"):
        UsersFile.load(path)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"ln": 21}, "ln must be between 1 and 20"),
        ({"ln": 99}, "ln must be between 1 and 20"),
        ({"r": 17}, "r must be between 1 and 16"),
        ({"p": 5}, "p must be between 1 and 4"),
        ({"ln": 20, "r": 16}, "needs more than 1 GiB"),
    ],
)
def test_absurd_parameters_are_a_file_error(
    tmp_path: Path, scrypt_calls: list[dict[str, Any]], params: dict[str, int], reason: str
) -> None:
    path = write(tmp_path, f"# big\nalice:{scrypt_string(**params)}\n")
    with pytest.raises(AuthFileError, match=reason) as info:
        UsersFile.load(path)
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path} line 2: user 'alice': ")
    assert scrypt_calls == []  # refused at load, nothing computed


def test_largest_parameters_are_accepted_at_load(tmp_path: Path) -> None:
    text = f"a:{scrypt_string(ln=20, r=8, p=4)}\nb:{scrypt_string(ln=16, r=16, p=1)}\n"
    assert len(UsersFile.load(write(tmp_path, text))) == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match=r"missing\.passwd: file not found"):
        UsersFile.load(tmp_path / "missing.passwd")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match=r"cannot read") as info:
        UsersFile.load(tmp_path)  # a directory
    assert info.value.line is None


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users.passwd"
    path.write_bytes(b"# ok\nalice:x\nb\xe9b:y\n")
    with pytest.raises(AuthFileError, match=r"users\.passwd line 3: not valid UTF-8"):
        UsersFile.load(path)


# -- editing the file ---------------------------------------------------------


def test_edit_users_adds_replaces_and_removes() -> None:
    one, two = scrypt_string(salt=16), scrypt_string(salt=17)
    text = f"# header\nalice:{one}\r\n\n# bob below\nbob:{one}\n# footer"

    added, existed = edit_users(text, "carol", two)
    assert not existed
    assert added == f"{text}\ncarol:{two}\n"

    replaced, existed = edit_users(text, "alice", two)
    assert existed
    assert replaced == text.replace(f"alice:{one}", f"alice:{two}")

    removed, existed = edit_users(text, "bob", None)
    assert existed
    assert removed == f"# header\nalice:{one}\r\n\n# bob below\n# footer"

    unchanged, existed = edit_users(text, "carol", None)
    assert (unchanged, existed) == (text, False)

    assert edit_users("", "dave", two) == (f"dave:{two}\n", False)
    for result in (added, replaced, removed):
        UsersFile.parse(result)


def test_edit_users_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="':'"):
        edit_users("", "a:b", scrypt_string())
    with pytest.raises(ValueError, match="scrypt"):
        edit_users("", "alice", "hunter2")
    with pytest.raises(ValueError, match="expected username:hash"):
        edit_users("garbage\n", "alice", scrypt_string())


# -- SASL ---------------------------------------------------------------------


def plain(*parts: bytes) -> str:
    return b64(b"\0".join(parts))


def test_login_challenges() -> None:
    assert base64.b64decode(LOGIN_USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_CHALLENGE) == b"Password:"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (plain(b"", b"alice", b"secret"), Credentials("alice", "secret")),
        (plain(b"alice", b"alice", b"secret"), Credentials("alice", "secret")),
        (plain(b"", "jürgen".encode(), "pä ss".encode()), Credentials("jürgen", "pä ss")),
        (" " + plain(b"", b"alice", b"s") + "\t", Credentials("alice", "s")),
        ("AGFsaWNlAHNlY3JldA==", Credentials("alice", "secret")),  # RFC 4616 style sample
    ],
)
def test_decode_plain(response: str, expected: Credentials) -> None:
    assert decode_plain(response) == expected


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (plain(b"bob", b"alice", b"secret"), "proxy authorization is not supported"),
        (b64(b"alice\0secret"), "authzid NUL authcid NUL password"),
        (b64(b"alicesecret"), "authzid NUL authcid NUL password"),
        (plain(b"", b"alice", b"se", b"cret"), "authzid NUL authcid NUL password"),
        (plain(b"", b"", b"secret"), "empty username"),
        (plain(b"", b"alice", b""), "empty password"),
        (plain(b"", b"al\xffice", b"secret"), "not valid UTF-8"),
        (plain(b"", b"alice", b"s\xc3"), "not valid UTF-8"),
        ("AGFsaWNlAHNlY3JldA", "invalid base64"),  # padding missing
        ("AGFsaWNl*AHNlY3JldA==", "invalid base64"),
        ("AGFsaWNl AHNlY3JldA==", "invalid base64"),
        ("AGFsaWNlAHNlY3JldA==é", "invalid base64"),
        ("=", "authzid NUL authcid NUL password"),  # an empty response
        ("", "authzid NUL authcid NUL password"),
    ],
)
def test_decode_plain_refuses(response: str, reason: str) -> None:
    with pytest.raises(SaslError, match=reason) as info:
        decode_plain(response)
    assert not isinstance(info.value, SaslCancelled)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("response", "expected"),
    [(b64(b"alice"), "alice"), (b64("jürgen".encode()), "jürgen"), (b64(b"p w"), "p w")],
)
def test_decode_login_field(response: str, expected: str) -> None:
    assert decode_login_field(response) == expected


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("", "empty response"),
        ("=", "empty response"),
        ("YWxpY2U", "invalid base64"),
        ("YW!pY2U=", "invalid base64"),
        (b64(b"\xff\xfe"), "not valid UTF-8"),
    ],
)
def test_decode_login_field_refuses(response: str, reason: str) -> None:
    with pytest.raises(SaslError, match=reason):
        decode_login_field(response)


@pytest.mark.parametrize("decode", [decode_plain, decode_login_field])
def test_star_cancels(decode: Callable[[str], object]) -> None:
    assert is_cancel("*")
    assert is_cancel(" * ")
    assert not is_cancel(b64(b"*"))
    with pytest.raises(SaslCancelled, match="cancelled"):
        decode("*")


def test_credentials_repr_hides_the_password() -> None:
    credentials = Credentials("alice", "hunter2")
    assert credentials.password == "hunter2"
    for text in (repr(credentials), str(credentials), f"{credentials}", f"{[credentials]}"):
        assert "hunter2" not in text
        assert "alice" in text
    assert repr(credentials) == "Credentials(username='alice', password='***')"
    with pytest.raises(AttributeError):
        credentials.password = "other"  # type: ignore[misc]


def test_module_exports_exist() -> None:
    for name in auth.__all__:
        assert hasattr(auth, name), name
