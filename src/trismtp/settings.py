"""Settings: one pydantic model per section, loaded from TOML and the environment.

Where a value comes from, in order of precedence (first wins):

1. environment variables ``TRISMTP_<SECTION>__<KEY>`` (values that are lists
   or tables are written as JSON, e.g. ``TRISMTP_SMTP__LISTEN='["[::1]:25"]'``);
2. the TOML file named by ``--config``, else ``$TRISMTP_CONFIG``, else
   ``./settings.toml`` when it exists;
3. the defaults below, which ``settings.toml`` at the repository root documents.

Unknown keys are errors wherever they come from: a misspelt key that is
silently ignored is a production incident waiting for its night. Every error
a user can cause is raised as :class:`ConfigError`, whose message names the
key, so the command line can print one line and exit 2.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from trismtp.jobs.model import MAX_DELAY, MAX_PRIORITY, MIN_PRIORITY, check_pipeline_name
from trismtp.smtp.budget import default_budget, minimum_budget

ENV_PREFIX = "TRISMTP_"
ENV_CONFIG = "TRISMTP_CONFIG"
DEFAULT_CONFIG = Path("settings.toml")

PositiveSeconds = Annotated[float, Field(gt=0)]
Mechanism = Literal["PLAIN", "LOGIN"]

# Mozilla's "intermediate" TLS 1.2 suites without DHE (Python loads no DH
# parameters): forward secret and AEAD only. The CBC suites OpenSSL adds by
# default (ECDHE-*-AES*-SHA256/384) are the ones testssl.sh flags for LUCKY13.
# TLS 1.3 suites are OpenSSL's, all AEAD; a cipher string cannot change them.
DEFAULT_TLS_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


class ConfigError(Exception):
    """A setting a user gave is wrong; ``str()`` is one line naming the key."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed listen address: ``host`` has no brackets, even for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: str) -> HostPort:
    """Parse ``host:port`` or ``[ipv6]:port``; raise ValueError on anything else."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{value!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{value!r} is not HOST:PORT (write IPv6 as [ADDR]:PORT)")
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} has no valid port (0-65535)")
    return HostPort(host, int(port_text))


def physical_memory() -> int | None:
    """The memory this process may use, in bytes, or None where Linux does not say.

    ``MemTotal`` of /proc/meminfo, or the cgroup v2 limit (``memory.max``)
    when that is lower: in a container, the machine's memory is not ours.
    """
    total: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
    except OSError:
        limit = "max"
    if limit.isdigit() and (total is None or int(limit) < total):
        total = int(limit)
    return total


def _check_addresses(values: list[str]) -> list[str]:
    for item in values:
        parse_host_port(item)
    return values


def embedded_url(address: HostPort) -> str:
    """The URL that reaches a jobs service listening on ``address`` from this host."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"ws://{HostPort(host, address.port)}/rpc"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    """``[smtp.tls]``: STARTTLS and implicit-TLS listeners."""

    certificate: str = ""
    key: str = ""
    implicit_listen: list[str] = Field(default_factory=list)
    starttls: bool = True
    required: bool = False
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    ciphers: str = DEFAULT_TLS_CIPHERS

    @field_validator("ciphers")
    @classmethod
    def _check_ciphers(cls, value: str) -> str:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise ValueError(
                f"{value!r} selects no TLS 1.2 cipher suite (an OpenSSL cipher string, "
                'e.g. "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305"; '
                "TLS 1.3 suites cannot be named here)"
            ) from None
        return value

    @field_validator("implicit_listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        return _check_addresses(value)

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if bool(self.certificate) != bool(self.key):
            raise ValueError("certificate and key are set together (PEM file paths)")
        if not self.certificate and (self.implicit_listen or self.required):
            raise ValueError("implicit_listen and required need a certificate and key")
        return self

    @property
    def enabled(self) -> bool:
        """A certificate is configured."""
        return bool(self.certificate)

    def addresses(self) -> list[HostPort]:
        """The implicit-TLS listen addresses, parsed."""
        return [parse_host_port(item) for item in self.implicit_listen]


def _all_mechanisms() -> list[Mechanism]:
    return ["PLAIN", "LOGIN"]


class AuthSettings(_Section):
    """``[smtp.auth]``: SMTP AUTH PLAIN and LOGIN against a users file."""

    users_file: str = ""
    required: bool = False
    mechanisms: list[Mechanism] = Field(default_factory=_all_mechanisms, min_length=1)
    allow_without_tls: bool = False
    failure_delay: float = Field(default=2.0, ge=0)
    max_failures: int = Field(default=3, gt=0)

    @field_validator("mechanisms", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v.upper() if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if self.required and not self.users_file:
            raise ValueError("required needs users_file")
        return self


class LimitsSettings(_Section):
    """``[smtp.limits]``: per-client limits against abuse."""

    max_connections_per_address: int = Field(default=50, ge=0)
    max_new_connections_per_minute: int = Field(default=600, ge=0)
    exempt_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_errors: int = Field(default=20, ge=0)
    min_data_rate: int = Field(default=1024, ge=0)
    data_rate_grace: float = Field(default=30.0, ge=0)

    @field_validator("exempt_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        _check_networks(value)
        return value


class ProxyProtocolSettings(_Section):
    """``[smtp.proxy_protocol]``: HAProxy PROXY v1/v2 from load balancers."""

    trusted_networks: list[str] = Field(default_factory=list)
    header_timeout: PositiveSeconds = 5.0

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        _check_networks(value)
        return value


def _check_networks(values: list[str]) -> None:
    for item in values:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)") from None


MAX_WORKERS = 256
"""The most SMTP worker processes ``smtp.workers`` may ask for."""


class SmtpSettings(_Section):
    """``[smtp]``: the SMTP listener."""

    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:2525"], min_length=1)
    hostname: str = Field(default="localhost", min_length=1)
    max_message_size: int = Field(default=26_214_400, gt=0)
    max_recipients: int = Field(default=100, gt=0)
    max_connections: int = Field(default=1000, gt=0)
    memory_budget: int = Field(default=0, ge=0)
    # Processes that take SMTP connections: 1, a number, or "auto" (one per
    # CPU this process may run on). See docs/performance.md "Workers".
    workers: int | Literal["auto"] = Field(default=1)
    command_timeout: PositiveSeconds = 300.0
    data_timeout: PositiveSeconds = 600.0
    include_raw: bool = True
    bare_newlines: Literal["reject", "normalize"] = "normalize"
    # RFC 5321's 1000 (CRLF included) is the floor: fewer would refuse
    # standard mail.
    max_line_length: int = Field(default=1000, ge=1000)
    recipient_domains: list[str] = Field(default_factory=list)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    proxy_protocol: ProxyProtocolSettings = Field(default_factory=ProxyProtocolSettings)

    @field_validator("recipient_domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or item.strip(".") == "" or any(c.isspace() or c == "@" for c in item):
                raise ValueError(f"{item!r} is not a domain (example.com or .example.com)")
        return [item.lower().rstrip(".") for item in value]

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        return _check_addresses(value)

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: int, info: ValidationInfo) -> int:
        max_size = info.data.get("max_message_size")
        if value and isinstance(max_size, int):
            least = minimum_budget(max_size)
            if value < least:
                raise ValueError(
                    f"must be 0 (derived from max_message_size) or at least {least} bytes "
                    f"to let one message of max_message_size ({max_size}) through"
                )
        return value

    def memory_budget_bytes(self) -> int:
        """The memory budget in bytes: ``memory_budget``, or derived when 0."""
        if self.memory_budget:
            return self.memory_budget
        return default_budget(self.max_message_size, physical_memory())

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_WORKERS:
            raise ValueError(f'must be "auto" or a whole number from 1 to {MAX_WORKERS}')
        return value

    @model_validator(mode="after")
    def _check_worker_budget(self) -> SmtpSettings:
        # Each worker gets an equal share of the memory budget; every share
        # must still let one message of max_message_size through.
        if isinstance(self.workers, int) and self.workers > 1:
            share = self.memory_budget_bytes() // self.workers
            least = minimum_budget(self.max_message_size)
            if share < least:
                raise ValueError(
                    f"workers = {self.workers} leaves each worker {share >> 20} MiB of the "
                    f"memory budget ({self.memory_budget_bytes() >> 20} MiB, smtp.memory_budget), "
                    f"less than one message of max_message_size needs ({least >> 20} MiB): "
                    "use fewer workers or a larger smtp.memory_budget"
                )
        return self

    def worker_count(self) -> int:
        """How many SMTP worker processes to run: ``workers``, with ``"auto"`` resolved.

        ``"auto"`` is one per CPU this process may run on, as many as the
        memory budget has room for (each worker gets an equal share).
        """
        if isinstance(self.workers, int):
            return self.workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        room = self.memory_budget_bytes() // minimum_budget(self.max_message_size)
        return max(1, min(cpus or 1, room, MAX_WORKERS))

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        if any(c.isspace() for c in value) or not value.isascii():
            raise ValueError("must be one ASCII word without spaces")
        return value

    def addresses(self) -> list[HostPort]:
        """The listen addresses, parsed."""
        return [parse_host_port(item) for item in self.listen]


class NatsSettings(_Section):
    """``[jobs.nats]``: the JetStream stream jobs go to when ``jobs.url`` is ``nats+ws://``."""

    stream: str = Field(default="trismtp", min_length=1)
    subject: str = Field(default="trismtp.jobs", min_length=1)
    create_stream: bool = True
    retention: Literal["workqueue", "limits", "interest"] = "limits"
    duplicate_window: PositiveSeconds = 120.0
    replicas: int = Field(default=1, ge=1, le=5)
    partitions: int = Field(default=1, ge=1, le=64)
    user: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    tls_ca: str = ""

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: str) -> str:
        if any(c in value for c in " .*>\t\r\n/\\"):
            raise ValueError("a stream name has no spaces, dots, wildcards or slashes")
        return value

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        tokens = value.split(".")
        if any(not t or any(c.isspace() for c in t) or t in ("*", ">") for t in tokens):
            raise ValueError("a subject is dot-separated tokens, without spaces or wildcards")
        return value

    def targets(self) -> list[tuple[str, str]]:
        """The (stream, subject) pairs jobs go to: ``stream``/``subject``, or with
        ``partitions`` N > 1, ``stream-K``/``subject.K`` for K in 0…N-1, one for
        each RoadRunner instance (docs/scaling.md)."""
        if self.partitions == 1:
            return [(self.stream, self.subject)]
        return [(f"{self.stream}-{k}", f"{self.subject}.{k}") for k in range(self.partitions)]

    @model_validator(mode="after")
    def _one_credential(self) -> NatsSettings:
        if self.token.get_secret_value() and (self.user or self.password.get_secret_value()):
            raise ValueError("give either token or user and password, not both")
        if bool(self.user) != bool(self.password.get_secret_value()):
            raise ValueError("user and password are set together")
        return self


class JobsSettings(_Section):
    """``[jobs]``: where and how each accepted message is pushed as a job."""

    url: str = "embedded"
    token: SecretStr = SecretStr("")
    pipeline: str = Field(default="smtp", min_length=1)
    job_name: str = Field(default="smtp.email", min_length=1)
    priority: int = Field(default=10, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    delay: int = Field(default=0, ge=0, le=MAX_DELAY)
    auto_ack: bool = False
    headers: dict[str, list[str]] = Field(default_factory=dict)
    batch_max_jobs: int = Field(default=256, gt=0)
    batch_max_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    batch_linger: float = Field(default=0.002, ge=0)
    push_timeout: PositiveSeconds = 15.0
    batch_expiry: bool = True
    queue_size: int = Field(default=1024, gt=0)
    nats: NatsSettings = Field(default_factory=NatsSettings)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value == "embedded":
            return value
        url = urlsplit(value)
        try:
            port_ok = url.port is None or url.port > 0
        except ValueError:
            port_ok = False
        if url.scheme in ("ws", "wss", "nats+ws", "nats+wss") and url.hostname and port_ok:
            return value
        raise ValueError(
            'must be "embedded", ws://HOST:PORT/PATH, wss://HOST:PORT/PATH (a jobs service) '
            "or nats+ws://HOST:PORT, nats+wss://HOST:PORT (NATS JetStream)"
        )

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, value: str) -> str:
        # The rule every job's options.pipeline is held to: a name that breaks
        # it would be refused with every message, so it is refused at start.
        return check_pipeline_name(value)

    @model_validator(mode="after")
    def _nats_options(self) -> JobsSettings:
        if self.url.startswith("nats+") and self.delay:
            raise ValueError(
                "delay must be 0 with a NATS url: RoadRunner's NATS driver has no delayed jobs"
            )
        return self

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        reserved = {"uuid", "payload_class"} & {name.lower() for name in value}
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by trismtp and cannot be overridden")
        return value


class JobsServiceSettings(_Section):
    """``[jobs_service]``: the jobs service (embedded or ``trismtp jobs serve``)."""

    listen: str = "127.0.0.1:6001"
    database: Path = Path("data/jobs.sqlite3")
    token: SecretStr = SecretStr("")
    pipelines: list[str] = Field(default_factory=lambda: ["smtp"])
    max_request_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_unsent_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    send_timeout: PositiveSeconds = 30.0
    max_attempts: int = Field(default=10, ge=0)
    dead_letter_pipeline: str = "dead-letter"
    dedupe_window: float = Field(default=86400.0, ge=0, allow_inf_nan=False)
    disk_reserve: int = Field(default=32 * 1024 * 1024, ge=0)
    secure_delete: bool = False

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("pipelines")
    @classmethod
    def _check_pipelines(cls, value: list[str]) -> list[str]:
        for name in value:
            check_pipeline_name(name)
        return value

    @field_validator("dead_letter_pipeline")
    @classmethod
    def _check_dead_letter(cls, value: str) -> str:
        return check_pipeline_name(value)

    def address(self) -> HostPort:
        """The listen address, parsed."""
        return parse_host_port(self.listen)


class ShutdownSettings(_Section):
    """``[shutdown]``."""

    grace: float = Field(default=30.0, ge=0)


class LogSettings(_Section):
    """``[log]``."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class MetricsSettings(_Section):
    """``[metrics]``: the Prometheus and health-check HTTP endpoint (see trismtp.health)."""

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value:
            parse_host_port(value)
        return value

    def address(self) -> HostPort | None:
        """The listen address, parsed; None when the endpoint is off."""
        return parse_host_port(self.listen) if self.listen else None


class Settings(BaseSettings):
    """All settings. Build it with :func:`load_settings`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    jobs_service: JobsServiceSettings = Field(default_factory=JobsServiceSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @model_validator(mode="after")
    def _embedded_service_fits(self) -> Settings:
        if self.jobs.url != "embedded":
            return self
        if self.jobs.pipeline not in self.jobs_service.pipelines:
            raise ValueError(
                f"jobs.pipeline {self.jobs.pipeline!r} is not one of jobs_service.pipelines "
                f"{self.jobs_service.pipelines} (required when jobs.url is embedded)"
            )
        token = self.jobs.token.get_secret_value()
        if token and token != self.jobs_service.token.get_secret_value():
            raise ValueError(
                "jobs.token differs from jobs_service.token: with jobs.url embedded, "
                "leave jobs.token empty (the service's own token is used)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments (see load_settings), so
        # the environment comes first and wins.
        return (env_settings, init_settings)

    def jobs_url(self) -> str:
        """The WebSocket URL the pusher connects to, resolving ``embedded``."""
        if self.jobs.url != "embedded":
            return self.jobs.url
        return embedded_url(self.jobs_service.address())

    def jobs_token(self) -> str:
        """The bearer token the pusher sends; embedded mode uses the service's own."""
        token = self.jobs.token.get_secret_value()
        if not token and self.jobs.url == "embedded":
            return self.jobs_service.token.get_secret_value()
        return token

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets replaced by ``"***"``."""
        data: dict[str, Any] = self.model_dump(mode="json")
        for section, key in (("jobs", "token"), ("jobs_service", "token")):
            if getattr(getattr(self, section), key).get_secret_value():
                data[section][key] = "***"
        for key in ("password", "token"):
            if getattr(self.jobs.nats, key).get_secret_value():
                data["jobs"]["nats"][key] = "***"
        return data


def section_names() -> frozenset[str]:
    """Every section and subsection as dotted names: ``smtp``, ``smtp.tls``, …"""
    names: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for key, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names.add(prefix + key)
                walk(annotation, f"{prefix}{key}.")

    walk(Settings, "")
    return frozenset(names)


def config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """Which settings file to read: the SPEC's order, or None for defaults only."""
    if explicit is not None:
        return Path(explicit)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, merge and validate the settings; raise :class:`ConfigError` if wrong."""
    file = config_path(path, os.environ)
    data: dict[str, Any] = {}
    if file is not None:
        try:
            with file.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"settings file {str(file)!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"settings file {str(file)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"settings file {str(file)!r} is not valid TOML: {exc}") from None
    _reject_unknown_environment(os.environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file, data, os.environ)) from None
    except SettingsError:
        # pydantic-settings could not decode a list or table variable.
        raise ConfigError(_undecodable_environment(os.environ)) from None


def _setting_variables(environ: Mapping[str, str]) -> Iterator[tuple[str, str, str, str | None]]:
    """``(variable, value, section, key)`` of every TRISMTP_ setting variable.

    ``key`` is None for a whole section (``TRISMTP_SMTP='{…}'``).
    """
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != ENV_CONFIG:
            section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
            yield name, value, section, key if sep else None


def _section_model(section: str) -> type[BaseModel] | None:
    field = Settings.model_fields.get(section)
    if field is None:
        return None
    model = field.annotation
    assert isinstance(model, type)
    assert issubclass(model, BaseModel)
    return model


def _reject_unknown_environment(environ: Mapping[str, str]) -> None:
    # pydantic-settings silently ignores TRISMTP_ variables that match no
    # field; a typo there must fail as loudly as one in the file.
    for name, _, section, key in _setting_variables(environ):
        model = _section_model(section)
        if model is None:
            raise ConfigError(f"{name}: unknown setting section {section!r}")
        if key is None:
            continue  # a whole section as JSON; validated like the file
        for part in key.split("__"):
            field = model.model_fields.get(part)
            if field is None:
                dotted = ".".join([section, *key.split("__")])
                raise ConfigError(f"{name}: unknown setting {dotted}")
            annotation = field.annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break  # a value; what follows "__" is pydantic-settings' business
            model = annotation


def _undecodable_environment(environ: Mapping[str, str]) -> str:
    for name, value, section, key in _setting_variables(environ):
        model = _section_model(section)
        if model is None:
            continue
        field = model.model_fields.get(key) if key else None
        annotation = field.annotation if field is not None else None
        if key is None or getattr(annotation, "__origin__", None) in (list, dict):
            try:
                json.loads(value)
            except ValueError:
                return (
                    f"{name}: not valid JSON (lists and tables are written as JSON, "
                    """e.g. '["a", "b"]' or '{"name": ["value"]}')"""
                )
    return "an environment variable TRISMTP_… could not be decoded"


def _describe(
    exc: ValidationError, file: Path | None, data: Mapping[str, Any], environ: Mapping[str, str]
) -> str:
    error = exc.errors()[0]
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    origins = _origins(loc, file, data, environ)
    where = f" ({origins})" if origins else ""
    if not key:
        return f"{message}{where}"
    return f"{key}: {message}{where}"


def _origins(
    loc: tuple[str, ...], file: Path | None, data: Mapping[str, Any], environ: Mapping[str, str]
) -> str:
    """Where the value at ``loc`` came from: ``from TRISMTP_…``, ``in FILE``, or both.

    A variable that sets the key (or a section holding it) wins over the
    file, so it alone is named; a table-level error (two keys that disagree)
    names every variable under the table, and the file when it has the table.
    """
    lowered = tuple(part.lower() for part in loc)
    setting: list[str] = []  # variables that set loc itself, or a table holding it
    inside: list[str] = []  # variables that set a key under loc
    for name, value, section, key in _setting_variables(environ):
        path = (section, *key.split("__")) if key is not None else (section,)
        if lowered[: len(path)] == path and (
            len(path) == len(lowered) or _json_has(value, lowered[len(path) :])
        ):
            setting.append(name)
        elif path[: len(lowered)] == lowered:
            inside.append(name)
    if setting:
        return "from " + ", ".join(sorted(setting))
    where = []
    if inside:
        where.append("from " + ", ".join(sorted(inside)))
    if file is not None and (not inside or (_has(data, loc) and bool(loc or data))):
        where.append(f"in {file}")
    return " and ".join(where)


def _has(data: Any, path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def _json_has(value: str, path: tuple[str, ...]) -> bool:
    """A JSON table variable (``TRISMTP_SMTP='{…}'``) sets the key at ``path``."""
    try:
        data = json.loads(value)
    except ValueError:
        return False
    lowered = {k.lower(): v for k, v in data.items()} if isinstance(data, dict) else data
    return _has(lowered, path[:1]) and (len(path) == 1 or _has(lowered[path[0]], path[1:]))
