"""``trismtp passwd`` through the real binary: the SMTP AUTH users file.

The commands run in a session of their own (``start_new_session``), so that
getpass can never reach the terminal pytest runs in: without ``/dev/tty`` it
falls back to stdin, which is a pipe here, or the pty that a test gives it.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest

from trismtp.auth import UsersFile

from .trismtp_e2e import CLI_TIMEOUT, clean_env, trismtp_argv

pytestmark = pytest.mark.e2e


def passwd(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``trismtp passwd ARGS`` with *stdin* as its input."""
    return subprocess.run(
        [*trismtp_argv(), "passwd", *args],
        cwd=cwd,
        env=clean_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        start_new_session=True,
    )


def succeeds(result: subprocess.CompletedProcess[str], *secrets: str) -> str:
    """The one line the command printed; fails unless it exited 0 quietly."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    for secret in secrets:
        assert secret not in result.stdout + result.stderr
    return lines[0]


def fails(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The command's one ``trismtp: …`` error line; fails on anything else."""
    assert result.returncode == status, f"exit {result.returncode}\n{result.stderr}"
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trismtp: "), lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hashes(path: Path) -> list[str]:
    return [line.split(":", 1)[1] for line in path.read_text().splitlines() if ":" in line]


def test_create_add_replace_delete(tmp_path: Path) -> None:
    users = tmp_path / "users.passwd"

    line = succeeds(passwd("users.passwd", "alice", "--password-stdin", cwd=tmp_path,
                           stdin="first secret\n"), "first secret")  # fmt: skip
    assert line == "added user 'alice' to users.passwd (new file)"
    assert mode(users) == 0o600
    assert users.read_text().startswith("alice:$scrypt$ln=14,r=8,p=1$")
    loaded = UsersFile.load(users)
    assert loaded.verify("alice", "first secret")
    assert not loaded.verify("alice", "first secret\n")

    with users.open("a") as file:
        file.write("\n# the ops team\n")
    line = succeeds(passwd(str(users), "bob", "--password-stdin", cwd=tmp_path,
                           stdin="  bob's pässword  \n"), "bob's")  # fmt: skip
    assert line == f"added user 'bob' to {users}"

    old = hashes(users)
    line = succeeds(passwd("users.passwd", "alice", "--password-stdin", cwd=tmp_path,
                           stdin="second secret"), "second secret")  # fmt: skip
    assert line == "changed the password of user 'alice' in users.passwd"
    lines = users.read_text().splitlines()
    assert [entry.split(":")[0] for entry in lines] == ["alice", "", "# the ops team", "bob"]
    assert hashes(users)[1] == old[1]  # bob's line untouched
    loaded = UsersFile.load(users)
    assert loaded.verify("alice", "second secret")
    assert not loaded.verify("alice", "first secret")
    assert loaded.verify("bob", "  bob's pässword  ")

    result = passwd("users.passwd", "bob", "--delete", cwd=tmp_path)
    for encoded in hashes(users):
        assert encoded not in result.stdout + result.stderr
    assert succeeds(result) == "deleted user 'bob' from users.passwd"
    assert users.read_text().splitlines()[1:] == ["", "# the ops team"]
    loaded = UsersFile.load(users)
    assert loaded.usernames == {"alice"}
    assert loaded.verify("alice", "second secret")
    assert mode(users) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.passwd"]  # no temp files


def test_rewritten_file_gets_mode_0600(tmp_path: Path) -> None:
    users = tmp_path / "users.passwd"
    users.write_text("# users\n")
    users.chmod(0o644)
    succeeds(passwd("users.passwd", "alice", "--password-stdin", cwd=tmp_path, stdin="pw\n"))
    assert mode(users) == 0o600
    assert users.read_text().startswith("# users\nalice:$scrypt$")


def test_deleting_a_missing_user_fails(tmp_path: Path) -> None:
    users = tmp_path / "users.passwd"
    users.write_text("# nobody\n")
    line = fails(passwd("users.passwd", "bob", "--delete", cwd=tmp_path), 1)
    assert line == "trismtp: users.passwd: no user 'bob'"
    assert users.read_text() == "# nobody\n"


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_empty_password_is_refused(tmp_path: Path, stdin: str) -> None:
    line = fails(passwd("users.passwd", "alice", "--password-stdin", cwd=tmp_path, stdin=stdin), 2)
    assert "empty password" in line
    assert not (tmp_path / "users.passwd").exists()


def test_malformed_file_is_refused_and_kept(tmp_path: Path) -> None:
    users = tmp_path / "users.passwd"
    users.write_text("# users\nalice:hunter2\n")
    line = fails(passwd("users.passwd", "bob", "--password-stdin", cwd=tmp_path, stdin="pw\n"), 2)
    assert line.startswith("trismtp: users.passwd line 2: ")
    assert "hunter2" not in line
    assert users.read_text() == "# users\nalice:hunter2\n"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = passwd("users.passwd", "a:b", "--password-stdin", cwd=tmp_path, stdin="pw\n")
    assert result.returncode == 2
    assert "the username contains ':'" in result.stderr
    result = passwd("users.passwd", "alice", "--delete", "--password-stdin", cwd=tmp_path)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
    assert not (tmp_path / "users.passwd").exists()


def test_without_a_terminal_it_asks_for_password_stdin(tmp_path: Path) -> None:
    line = fails(passwd("users.passwd", "alice", cwd=tmp_path, stdin="pw\npw\n"), 2)
    assert "--password-stdin" in line
    assert not (tmp_path / "users.passwd").exists()


# -- the prompt, on a pseudo-terminal ---------------------------------------


def answer_prompts(tmp_path: Path, *answers: str) -> tuple[int, str]:
    """Run ``trismtp passwd users.passwd alice`` on a pty, typing *answers* at
    its prompts; returns the exit status and everything the terminal showed."""
    try:
        master, slave = os.openpty()
    except OSError:
        pytest.skip("no pseudo-terminals here")
    try:
        process = subprocess.Popen(
            [*trismtp_argv(), "passwd", "users.passwd", "alice"],
            cwd=tmp_path,
            env=clean_env(),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    shown = b""
    pending = list(answers)
    deadline = time.monotonic() + CLI_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command exited and closed the pty
                    break
                if not chunk:
                    break
                shown += chunk
            # Type only once a prompt is shown: getpass turns echo off, then
            # flushes input that arrived earlier.
            prompts = shown.count(b"assword: ")
            if pending and prompts == len(answers) - len(pending) + 1:
                os.write(master, pending.pop(0).encode() + b"\n")
        status = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return status, shown.decode("utf-8", errors="replace")


def test_prompt_twice_on_a_terminal(tmp_path: Path) -> None:
    status, shown = answer_prompts(tmp_path, "typed secret", "typed secret")
    assert status == 0, shown
    assert "Password: " in shown
    assert "Retype password: " in shown
    assert "added user 'alice' to users.passwd (new file)" in shown
    assert "typed secret" not in shown  # not echoed
    users = tmp_path / "users.passwd"
    assert mode(users) == 0o600
    assert UsersFile.load(users).verify("alice", "typed secret")


def test_prompts_that_differ_exit_2(tmp_path: Path) -> None:
    status, shown = answer_prompts(tmp_path, "typed secret", "typo secret")
    assert status == 2, shown
    assert "trismtp: the passwords do not match" in shown
    assert "secret" not in shown
    assert not (tmp_path / "users.passwd").exists()
