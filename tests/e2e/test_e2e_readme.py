"""The README's quick start, as a new user runs it (SPEC §2).

The daemon runs as ``make run`` starts it (``trismtp serve`` in a directory
holding the repository's settings.toml, so a fresh clone's settings), and
the commands of the README's "from another terminal" block run one by one,
as written, from that directory. Only the ports differ, through the
environment, so that the test can run beside anything else on 2525.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .trismtp_e2e import CLI_TIMEOUT, HOST, UUID4, Process, clean_env, free_port, trismtp_argv

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def second_terminal() -> list[str]:
    """The command lines of the README block that follows "from another terminal"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("from another terminal", 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert block is not None, "no ```sh block after 'from another terminal'"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A directory like a fresh clone after ``make run``: settings.toml and
    .venv/bin/trismtp, with the daemon running; and the environment to use."""
    shutil.copy(ROOT / "settings.toml", tmp_path / "settings.toml")
    script = trismtp_argv()
    if len(script) != 1:
        pytest.skip("needs the trismtp console script (make install)")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "trismtp").symlink_to(script[0])
    env = {
        "TRISMTP_SMTP__LISTEN": json.dumps([f"{HOST}:{free_port()}"]),
        "TRISMTP_JOBS_SERVICE__LISTEN": f"{HOST}:{free_port()}",
    }
    daemon = Process("make-run", tmp_path, ["serve"])
    daemon.ready_text = "SMTP listening on"
    daemon.env_extra = env
    try:
        daemon.start()
        yield tmp_path, env
    finally:
        daemon.stop()
        print(daemon.log_tail())


def test_readme_quick_start_works_without_swaks(fresh_clone: tuple[Path, dict[str, str]]) -> None:
    workdir, env = fresh_clone
    lines = second_terminal()
    assert not any("swaks" in line.split("#")[0] for line in lines), lines
    outputs: list[subprocess.CompletedProcess[str]] = []
    for line in lines:
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line}"],
            cwd=workdir,
            env={**clean_env(), **env, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"{line!r} exited {result.returncode}: {result.stderr}"
        outputs.append(result)
    send, stat, peek, consume = outputs
    job_id = re.search(rf"queued as ({UUID4})", send.stderr)
    assert job_id is not None, send.stderr
    assert re.search(r"^smtp\s+\S+\s+1\s", stat.stdout, re.MULTILINE), stat.stdout
    assert f"job {job_id.group(1)}" in peek.stdout, peek.stdout
    assert "subject   'hello'" in peek.stdout, peek.stdout
    assert f"job {job_id.group(1)}" in consume.stdout, consume.stdout
    assert "acked 1 job in pipeline 'smtp'" in consume.stdout, consume.stdout
    # As the README says: the queue is empty again.
    again = subprocess.run(
        [".venv/bin/trismtp", "jobs", "peek"],
        cwd=workdir,
        env={**clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    assert again.stdout.strip() == "no jobs in pipeline 'smtp'", again.stdout


def test_readme_command_table_lists_every_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    result = subprocess.run(
        [*trismtp_argv(), "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    listed = result.stdout.split("commands:", 1)[1]
    commands = re.findall(r"^    (\w+)\s", listed, re.MULTILINE)
    assert "top" in commands, commands
    for command in commands:
        assert f"| `trismtp {command}" in table, f"trismtp {command} is not in the README's table"
