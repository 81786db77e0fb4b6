"""Settings: TOML + environment, validation, and what `trismtp config` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trismtp.settings import ConfigError, Settings, load_settings, parse_host_port
from trismtp.smtp.budget import minimum_budget

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("TRISMTP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./settings.toml unless a test writes one


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.smtp.listen == ["127.0.0.1:2525"]
    assert settings.jobs.url == "embedded"
    assert settings.jobs.pipeline == "smtp"
    assert settings.jobs_service.pipelines == ["smtp"]
    assert settings.jobs_url() == "ws://127.0.0.1:6001/rpc"


def test_annotated_settings_toml_states_the_defaults() -> None:
    assert load_settings(REPO / "settings.toml") == Settings()


def test_file_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "s.toml",
        '[jobs]\npipeline = "inbound"\n[jobs_service]\npipelines = ["inbound", "other"]\n',
    )
    assert load_settings(config).jobs.pipeline == "inbound"
    monkeypatch.setenv("TRISMTP_JOBS__PIPELINE", "other")
    monkeypatch.setenv("TRISMTP_SMTP__LISTEN", '["127.0.0.1:25", "[::1]:25"]')
    settings = load_settings(config)
    assert settings.jobs.pipeline == "other"
    assert [str(a) for a in settings.smtp.addresses()] == ["127.0.0.1:25", "[::1]:25"]


def test_settings_file_from_environment_and_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", '[smtp]\nhostname = "cwd.example"\n')
    assert load_settings().smtp.hostname == "cwd.example"
    other = write(tmp_path / "other.toml", '[smtp]\nhostname = "env.example"\n')
    monkeypatch.setenv("TRISMTP_CONFIG", str(other))
    assert load_settings().smtp.hostname == "env.example"


@pytest.mark.parametrize(
    ("toml", "environment", "expected"),
    [
        ('[smtp]\nlisten = ["localhost"]\n', {}, "smtp.listen"),
        ("[smtp]\nmax_recipients = 0\n", {}, "smtp.max_recipients"),
        ('[smtp]\nhostnme = "x"\n', {}, "smtp.hostnme: unknown setting"),
        ('[smtpd]\nhostname = "x"\n', {}, "smtpd: unknown setting"),
        ('[jobs]\npipeline = ""\n', {}, "jobs.pipeline"),
        ('[jobs]\npipeline = "nope"\n', {}, "jobs.pipeline 'nope' is not one of"),
        ('[jobs]\nurl = "http://x"\n', {}, "jobs.url"),
        ('[jobs]\nurl = "ws://"\n', {}, "jobs.url"),
        ('[jobs]\nurl = "ws://h:99999/rpc"\n', {}, "jobs.url"),
        ('[jobs]\nheaders = {uuid = ["x"]}\n', {}, "jobs.headers"),
        ('[jobs]\nheaders = {Payload_Class = ["x"]}\n', {}, "jobs.headers"),
        ('[jobs]\ntoken = "a"\n[jobs_service]\ntoken = "b"\n', {}, "jobs.token differs"),
        ("", {"TRISMTP_SMTP__LISTEN": "127.0.0.1:25"}, "TRISMTP_SMTP__LISTEN: not valid JSON"),
        ('[log]\nlevel = "loud"\n', {}, "log.level"),
        (
            "",
            {"TRISMTP_SMTP__MAX_MESSAGE_SIZE": "big"},
            "smtp.max_message_size: .* \\(from TRISMTP_SMTP__MAX_MESSAGE_SIZE\\)$",
        ),
        (
            "[smtp]\nmax_message_size = 5\n",
            {"TRISMTP_SMTP__MAX_MESSAGE_SIZE": "big"},
            "smtp.max_message_size: .* \\(from TRISMTP_SMTP__MAX_MESSAGE_SIZE\\)$",
        ),
        (
            "",
            {"TRISMTP_SMTP": '{"max_message_size": "big"}'},
            "smtp.max_message_size: .* \\(from TRISMTP_SMTP\\)$",
        ),
        (
            "[smtp]\nmax_message_size = 'big'\n",
            {"TRISMTP_SMTP__HOSTNAME": "mx"},
            "smtp.max_message_size: .* \\(in .*s.toml\\)$",
        ),
        (
            "[smtp.tls]\nrequired = true\n",
            {"TRISMTP_SMTP__TLS__CERTIFICATE": "c.pem"},
            "smtp.tls: .* \\(from TRISMTP_SMTP__TLS__CERTIFICATE and in .*s.toml\\)$",
        ),
        ("", {"TRISMTP_SMTP__LISTN": "x"}, "TRISMTP_SMTP__LISTN: unknown setting smtp.listn"),
        ("", {"TRISMTP_SMPT__LISTEN": "x"}, "TRISMTP_SMPT__LISTEN: unknown setting section"),
        ("not toml [", {}, "not valid TOML"),
        ('[smtp.tls]\ncertificate = "c.pem"\n', {}, "smtp.tls: certificate and key"),
        ("[smtp.tls]\nrequired = true\n", {}, "smtp.tls: implicit_listen and required"),
        ('[smtp.tls]\nmin_version = "TLSv1.0"\n', {}, "smtp.tls.min_version"),
        ('[smtp.tls]\nimplicit_listen = ["465"]\n', {}, "smtp.tls.implicit_listen"),
        ('[smtp.tls]\ncertfile = "x"\n', {}, "smtp.tls.certfile: unknown setting"),
        ("[smtp.auth]\nrequired = true\n", {}, "smtp.auth: required needs users_file"),
        ('[smtp.auth]\nmechanisms = ["CRAM-MD5"]\n', {}, "smtp.auth.mechanisms"),
        ('[smtp.limits]\nexempt_networks = ["10.0.0.0/33"]\n', {}, "smtp.limits.exempt"),
        ("[smtp.limits]\nmin_data_rate = -1\n", {}, "smtp.limits.min_data_rate"),
        ('[smtp.proxy_protocol]\ntrusted_networks = ["lb"]\n', {}, "smtp.proxy_protocol"),
        ('[smtp]\nbare_newlines = "keep"\n', {}, "smtp.bare_newlines"),
        ('[smtp]\nrecipient_domains = ["a@b"]\n', {}, "smtp.recipient_domains"),
        (
            "",
            {"TRISMTP_SMTP__TLS__CERTFILE": "x"},
            "TRISMTP_SMTP__TLS__CERTFILE: unknown setting smtp.tls.certfile",
        ),
        ("", {"TRISMTP_SMTP__TLS__REQUIRED": "maybe"}, "smtp.tls.required"),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    environment: dict[str, str],
    expected: str,
) -> None:
    config = write(tmp_path / "s.toml", toml)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_settings(config)


def test_pipeline_need_not_be_declared_for_a_remote_service(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", '[jobs]\nurl = "ws://127.0.0.1:1/rpc"\npipeline = "x"\n')
    assert load_settings(config).jobs.pipeline == "x"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("in\\u0001bound", "control characters"),
        (" smtp", "surrounding spaces"),
        ("x" * 257, "at most 256 characters"),
    ],
)
def test_a_pipeline_no_job_could_name_is_refused_at_start_for_any_url(
    tmp_path: Path, name: str, why: str
) -> None:
    # Not only for the embedded service: every message's job would be refused.
    for url in ("ws://127.0.0.1:1/rpc", "nats+ws://127.0.0.1:1"):
        config = write(tmp_path / "s.toml", f'[jobs]\nurl = "{url}"\npipeline = "{name}"\n')
        with pytest.raises(ConfigError, match=f"jobs.pipeline: .*{why}"):
            load_settings(config)


def test_missing_named_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("[::1]:2525", "::1", 2525),
        ("localhost:0", "localhost", 0),
    ],
)
def test_listen_addresses(text: str, host: str, port: int) -> None:
    address = parse_host_port(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text


@pytest.mark.parametrize("text", ["::1:25", "127.0.0.1", "[::1]", ":25", "host:99999", "h:x"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError, match=r"PORT|port|host"):
        parse_host_port(text)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trismtp.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    config = write(
        tmp_path / "s.toml",
        '[jobs]\nurl = "ws://127.0.0.1:1/rpc"\ntoken = "hunter2"\n'
        '[jobs_service]\ntoken = "s3cret"\n',
    )
    result = run_cli("config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "s3cret" not in result.stdout
    assert 'token = "***"' in result.stdout
    assert 'pipeline = "smtp"' in result.stdout


def test_config_command_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", "[smtp]\nmax_connections = -1\n")
    result = run_cli("config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "smtp.max_connections" in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nested_sections_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "s.toml",
        '[smtp.auth]\nusers_file = "users"\nmechanisms = ["plain"]\n'
        '[smtp]\nrecipient_domains = ["Example.COM."]\n',
    )
    monkeypatch.setenv("TRISMTP_SMTP__LIMITS__MAX_ERRORS", "5")
    monkeypatch.setenv("TRISMTP_SMTP__TLS__IMPLICIT_LISTEN", '["127.0.0.1:4650"]')
    monkeypatch.setenv("TRISMTP_SMTP__TLS__CERTIFICATE", "c.pem")
    monkeypatch.setenv("TRISMTP_SMTP__TLS__KEY", "k.pem")
    settings = load_settings(config)
    assert settings.smtp.auth.users_file == "users"
    assert settings.smtp.auth.mechanisms == ["PLAIN"]
    assert settings.smtp.recipient_domains == ["example.com"]
    assert settings.smtp.limits.max_errors == 5
    assert settings.smtp.tls.addresses() == [parse_host_port("127.0.0.1:4650")]
    # The file's other smtp keys survive the environment's nested ones.
    assert settings.smtp.limits.min_data_rate == 1024


def test_workers_auto_is_one_per_cpu_the_memory_budget_feeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().smtp.worker_count() == 1
    monkeypatch.setenv("TRISMTP_SMTP__WORKERS", "2")
    assert load_settings().smtp.worker_count() == 2
    monkeypatch.delenv("TRISMTP_SMTP__WORKERS")
    # A machine with 8 CPUs for this process.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    big = write(tmp_path / "big.toml", '[smtp]\nworkers = "auto"\nmemory_budget = 8589934592\n')
    assert load_settings(big).smtp.worker_count() == 8
    # A budget for three messages of max_message_size: three workers, not eight.
    three = minimum_budget(26_214_400) * 3
    tight = write(tmp_path / "tight.toml", f'[smtp]\nworkers = "auto"\nmemory_budget = {three}\n')
    assert load_settings(tight).smtp.worker_count() == 3


def test_workers_that_the_budget_cannot_feed_name_both_keys(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", "[smtp]\nworkers = 4\nmemory_budget = 268435456\n")
    with pytest.raises(ConfigError) as failure:
        load_settings(config)
    assert "workers = 4" in str(failure.value)
    assert "smtp.memory_budget" in str(failure.value)
