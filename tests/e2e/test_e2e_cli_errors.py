"""Command-line errors and --version through the real binary (SPEC §2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import trismtp

from .trismtp_e2e import (
    CLI_TIMEOUT,
    HOST,
    clean_env,
    free_port,
    one_line_error,
    run_cli,
    trismtp_argv,
    write_settings,
)

pytestmark = pytest.mark.e2e


def test_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"trismtp {trismtp.__version__}"
    assert trismtp.__version__[0].isdigit()


def test_missing_settings_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", "missing.toml", cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "missing.toml" in line
    assert "does not exist" in line


def test_empty_pipeline_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[jobs]\npipeline = ""\n', encoding="utf-8")
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "jobs.pipeline" in one_line_error(result)


def test_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[smtp]\nmax_conections = 5\n", encoding="utf-8")
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "max_conections" in one_line_error(result)


def test_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = write_settings(
        tmp_path / "settings.toml",
        {"jobs": {"token": "s3cret-token", "pipeline": "inbound"},
         "jobs_service": {"pipelines": ["inbound"], "token": "s3cret-token"}},
    )  # fmt: skip
    result = run_cli("config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'pipeline = "inbound"' in result.stdout
    assert "[smtp]" in result.stdout
    assert "s3cret-token" not in result.stdout
    assert result.stdout.count('token = "***"') == 2


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test process listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


def start_on_busy_port(tmp_path: Path, busy_port: int, which: str) -> tuple[int, str]:
    """Run the command with the SMTP or the jobs service port taken; (status, line)."""
    smtp_port = busy_port if which == "smtp" else free_port()
    jobs_port = busy_port if which != "smtp" else free_port()
    config = write_settings(
        tmp_path / "settings.toml",
        {
            "smtp": {"listen": [f"{HOST}:{smtp_port}"]},
            "jobs_service": {
                "listen": f"{HOST}:{jobs_port}",
                "database": str(tmp_path / "jobs.sqlite3"),
            },
            "log": {"level": "warning"},
        },
    )
    command = ["jobs", "serve"] if which == "jobs serve" else ["serve"]
    result = run_cli(*command, "--config", str(config), cwd=tmp_path)
    return result.returncode, one_line_error(result)


PORT_CASES = ["smtp", "embedded jobs service", "jobs serve"]


@pytest.mark.parametrize("which", PORT_CASES)
def test_port_in_use_exits_1_with_one_line(tmp_path: Path, busy_port: int, which: str) -> None:
    status, _ = start_on_busy_port(tmp_path, busy_port, which)
    assert status == 1


@pytest.mark.parametrize("which", PORT_CASES)
def test_port_in_use_message_names_the_address(tmp_path: Path, busy_port: int, which: str) -> None:
    _, line = start_on_busy_port(tmp_path, busy_port, which)
    assert "in use" in line.lower(), line
    assert str(busy_port) in line, line
    assert "Errno" not in line, line  # the reason in words, no errno in the middle


@pytest.mark.parametrize("command", [["serve"], ["jobs", "serve"]])
def test_database_that_cannot_be_opened_exits_1_with_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    config = tmp_path / "s.toml"
    config.write_text(
        f'[smtp]\nlisten = ["{HOST}:{free_port()}"]\n'
        f'[jobs_service]\nlisten = "{HOST}:{free_port()}"\ndatabase = "a-file/jobs.sqlite3"\n',
        encoding="utf-8",
    )
    result = run_cli(*command, "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot open the jobs database" in one_line_error(result)


def test_environment_list_that_is_not_json_exits_2(tmp_path: Path) -> None:
    result = run_cli("config", cwd=tmp_path, env_extra={"TRISMTP_SMTP__LISTEN": "127.0.0.1:25"})
    assert result.returncode == 2
    assert "TRISMTP_SMTP__LISTEN: not valid JSON" in one_line_error(result)


@pytest.mark.parametrize("with_file", [False, True], ids=["no file", "file sets it too"])
def test_bad_environment_value_names_the_variable_not_the_file(
    tmp_path: Path, with_file: bool
) -> None:
    # settings.toml in the working directory is read by default; the variable
    # wins over it, so the variable is what the user must fix.
    (tmp_path / "settings.toml").write_text(
        "[smtp]\nmax_message_size = 1000\n" if with_file else "[smtp]\n", encoding="utf-8"
    )
    result = run_cli("config", cwd=tmp_path, env_extra={"TRISMTP_SMTP__MAX_MESSAGE_SIZE": "abc"})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "smtp.max_message_size" in line, line
    assert "TRISMTP_SMTP__MAX_MESSAGE_SIZE" in line, line
    assert "settings.toml" not in line, line


def test_bad_file_value_still_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text("[smtp]\nmax_message_size = 'abc'\n")
    result = run_cli("config", cwd=tmp_path, env_extra={"TRISMTP_SMTP__HOSTNAME": "mx"})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "smtp.max_message_size" in line, line
    assert "settings.toml" in line, line
    assert "TRISMTP_" not in line, line


@pytest.mark.parametrize(
    ("args", "what"),
    [
        ([], "trismtp serve"),  # the defaults: the embedded jobs service
        (["--url", f"ws://{HOST}:{{port}}/rpc"], "--url"),
        (["--url", f"nats+ws://{HOST}:{{port}}"], "nats-server"),
    ],
    ids=["embedded", "jobs service url", "nats url"],
)
def test_jobs_stat_with_nothing_listening_says_what_to_do(
    tmp_path: Path, args: list[str], what: str
) -> None:
    port = free_port()
    write_settings(tmp_path / "settings.toml", {"jobs_service": {"listen": f"{HOST}:{port}"}})
    result = run_cli("jobs", "stat", *(a.format(port=port) for a in args), cwd=tmp_path)
    assert result.returncode == 1
    line = one_line_error(result)
    assert "connection refused" in line.lower(), line
    assert line.count(str(port)) == 1, f"the address once, not repeated: {line}"
    assert what in line, f"{what!r} is what to do: {line}"


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    # `trismtp config | head -1`, `trismtp jobs peek | head`: the reader has
    # gone before the command writes. It exits as if killed by SIGPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*trismtp_argv(), "config"],
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE
