"""The command line (SPEC §2).

Exit status: 0 on success and after a graceful stop; 1 when the work could
not be done (a port in use, a database that cannot be opened, a jobs command
that cannot reach the jobs service, a users file that cannot be written) or the
daemon was stopped at once by a second signal; 2 for a usage or settings error
(a malformed users file included). Errors a user can cause are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import errno
import getpass
import json
import logging
import os
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio

from trismtp import __version__
from trismtp.auth import (
    AuthFileError,
    UsersFile,
    check_username,
    edit_users,
    hash_password,
    read_users_text,
)
from trismtp.jobs.rpc import JobsClient, JobsUnavailable, RpcError
from trismtp.jobs.sinks import connect_nats, is_nats_url
from trismtp.log import setup_logging
from trismtp.nats import JetStreamError, NatsClient, first_messages, stream_info
from trismtp.settings import (
    MAX_WORKERS,
    ConfigError,
    HostPort,
    Settings,
    load_settings,
    section_names,
)

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("trismtp")


class CommandError(Exception):
    """The command could not do its work; the message says why."""


class UsageError(Exception):
    """The command was asked for something it refuses (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``trismtp`` console script."""
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "sendmail":  # installed as a sendmail link
            argv = ["sendmail", *argv]
    if argv[:1] == ["sendmail"]:
        # sendmail's own command line (-t, -oi, -fADDR, -F NAME…) is not
        # argparse's, and its exit statuses are sysexits: see trismtp.sendmail.
        from trismtp import sendmail

        sendmail.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        sys.exit(EXIT_USAGE)
    if getattr(args, "workers", None) is not None:
        # The same as the setting from the environment, which the secondary
        # workers inherit: every process sees one value.
        os.environ["TRISMTP_SMTP__WORKERS"] = args.workers
    try:
        if args.needs_settings:
            status = args.run(args, load_settings(args.config))
        else:
            status = args.run(args)
    except ConfigError as exc:
        _fail(f"invalid settings: {exc}", EXIT_USAGE)
    except (UsageError, AuthFileError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except CommandError as exc:
        _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `trismtp jobs peek | head`: the reader went away. Say nothing and
        # exit as a program killed by SIGPIPE would; the output still
        # buffered must not be flushed into the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(status)


def _fail(message: str, status: int) -> NoReturn:
    print(f"trismtp: {message}", file=sys.stderr)
    sys.exit(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trismtp",
        description="Receive email over SMTP and turn every message into a durable job.",
    )
    parser.add_argument("--version", action="version", version=f"trismtp {__version__}")
    parser.set_defaults(needs_settings=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (default: $TRISMTP_CONFIG, else ./settings.toml if present)",
    )
    url_option = argparse.ArgumentParser(add_help=False)
    url_option.add_argument("--url", help="jobs service URL (default: from the settings, jobs.url)")

    serve = commands.add_parser(
        "serve", parents=[config_option], help="run the daemon (SMTP server and pusher)"
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help='SMTP worker processes, a number or "auto" (default: smtp.workers, 1)',
    )
    # A secondary SMTP worker (smtp.workers > 1), started by the primary
    # `trismtp serve` with these; not for people (trismtp.workers).
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--jobs-url", help=argparse.SUPPRESS)
    serve.add_argument("--listen-fds", type=_fds, default=[], help=argparse.SUPPRESS)
    serve.add_argument("--implicit-fds", type=_fds, default=[], help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    config = commands.add_parser(
        "config", parents=[config_option], help="validate and print the effective settings"
    )
    config.set_defaults(run=_config)

    top = commands.add_parser(
        "top",
        parents=[config_option],
        help="a live view of a running daemon (from its [metrics] endpoint)",
        description="Show messages per second, connections, queue depth, push latency "
        "and errors of a running daemon, refreshed in the terminal, read from its "
        "/metrics endpoint ([metrics] listen). Ctrl-C to quit.",
    )
    top.add_argument(
        "--metrics-url",
        help="the daemon's metrics URL (default: http://<metrics.listen>/metrics)",
    )
    top.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    top.add_argument(
        "--once", action="store_true", help="print one screen after one interval, then exit"
    )
    top.set_defaults(run=_top)

    jobs = commands.add_parser("jobs", help="the jobs service and its queues")
    jobs_commands = jobs.add_subparsers(title="jobs commands", metavar="COMMAND")

    jobs_serve = jobs_commands.add_parser(
        "serve", parents=[config_option], help="run the jobs service alone"
    )
    jobs_serve.set_defaults(run=_jobs_serve)

    stat = jobs_commands.add_parser(
        "stat", parents=[config_option, url_option], help="pipelines with their counts"
    )
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.set_defaults(run=_jobs_stat)

    peek = jobs_commands.add_parser(
        "peek", parents=[config_option, url_option], help="show queued jobs without consuming"
    )
    peek.add_argument("--pipeline", help="pipeline (default: jobs.pipeline)")
    peek.add_argument("-n", type=_positive, default=10, help="at most N jobs (default 10)")
    peek.add_argument("--json", action="store_true", help="print each job as a JSON line")
    peek.set_defaults(run=_jobs_peek)

    consume = jobs_commands.add_parser(
        "consume", parents=[config_option, url_option], help="reserve jobs, print, ack them"
    )
    consume.add_argument("--pipeline", help="pipeline to consume from (default: jobs.pipeline)")
    consume.add_argument("-n", type=_positive, default=1, help="at most N jobs (default 1)")
    consume.add_argument(
        "--no-ack", action="store_true", help="print the jobs and put them back in the queue"
    )
    consume.add_argument("--json", action="store_true", help="print each job as a JSON line")
    consume.set_defaults(run=_jobs_consume)

    passwd = commands.add_parser(
        "passwd",
        help="add, change or delete a user of an SMTP AUTH users file",
        description="Set USERNAME's password in the users file FILE (created if missing), "
        "or delete the user. Other lines and comments are kept; the file is replaced "
        "atomically with mode 0600.",
    )
    passwd.add_argument("file", metavar="FILE", help="the users file")
    passwd.add_argument("username", metavar="USERNAME", type=_username, help="the user")
    how = passwd.add_mutually_exclusive_group()
    how.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of stdin instead of prompting twice",
    )
    how.add_argument("--delete", action="store_true", help="remove the user from the file")
    passwd.set_defaults(run=_passwd, needs_settings=False)

    # Listed for --help only: main() hands "sendmail" to trismtp.sendmail.
    commands.add_parser(
        "sendmail",
        add_help=False,
        help="submit one message from stdin to the daemon, as sendmail does "
        "(PHP mail(), cron, mailx); see trismtp sendmail --help",
    )
    return parser


def _workers(text: str) -> str:
    if text == "auto" or (text.isdigit() and 1 <= int(text) <= MAX_WORKERS):
        return text
    raise argparse.ArgumentTypeError(f'must be "auto" or a whole number from 1 to {MAX_WORKERS}')


def _fds(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _username(text: str) -> str:
    try:
        check_username(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- commands -----------------------------------------------------------------


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from trismtp.daemon import Daemon
    from trismtp.workers import WorkerOptions

    setup_logging(settings.log)
    worker = None
    if args.worker is not None:
        worker = WorkerOptions(
            args.worker, args.jobs_url, args.listen_fds, args.implicit_fds, args.config
        )
    config = str(Path(args.config).absolute()) if args.config else None
    daemon = Daemon(settings, worker=worker, config=config)
    _run_server(daemon.run)
    return EXIT_FAILURE if daemon.killed else EXIT_OK


def _jobs_serve(args: argparse.Namespace, settings: Settings) -> int:
    from trismtp.service.server import serve_jobs

    setup_logging(settings.log)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_jobs, settings.jobs_service)
            with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
                async for signum in signals:
                    log.info("received signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    break

    _run_server(run)
    return EXIT_OK


def _config(args: argparse.Namespace, settings: Settings) -> int:
    print(_toml(settings.masked()), end="")
    return EXIT_OK


def _top(args: argparse.Namespace, settings: Settings) -> int:
    from trismtp.top import run

    url = args.metrics_url
    if not url:
        address = settings.metrics.address()
        if address is None:
            raise UsageError(
                "trismtp top reads the daemon's metrics: set [metrics] listen "
                "(TRISMTP_METRICS__LISTEN) or give --metrics-url"
            )
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
        url = f"http://{HostPort(host, address.port)}/metrics"
    if not args.interval > 0:
        raise UsageError("--interval must be > 0")
    try:
        run(url, args.interval, once=args.once)
    except OSError as exc:
        raise CommandError(f"cannot read {url}: {exc}") from None
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _jobs_stat(args: argparse.Namespace, settings: Settings) -> int:
    if is_nats_url(_jobs_url(args, settings)):
        stats = _nats(args, settings, partial(_nats_stat, settings))
    else:
        stats = _rpc(args, settings, "jobs.Stat", {}).get("stats", [])
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    columns: tuple[str, ...] = ("pipeline", "driver", "active", "delayed", "reserved", "ready")
    if any(stat.get("queue", stat.get("pipeline")) != stat.get("pipeline") for stat in stats):
        # A NATS stream (one per partition) is not the pipeline's name: show it.
        columns = ("pipeline", "queue", *columns[1:])
    columns += ("priority",)
    rows = [[_cell(stat.get(c)) for c in columns] for stat in stats]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _jobs_peek(args: argparse.Namespace, settings: Settings) -> int:
    pipeline = args.pipeline or settings.jobs.pipeline
    if is_nats_url(_jobs_url(args, settings)):
        streams = [stream for stream, _ in settings.jobs.nats.targets()]
        jobs = _nats(args, settings, partial(_nats_peek, streams, args.n))
        label = ", ".join(streams) + (" (NATS stream)" if len(streams) == 1 else " (NATS streams)")
        _print_jobs(jobs, as_json=args.json, pipeline=label)
        return EXIT_OK
    result = _rpc(args, settings, "jobs.Peek", {"pipeline": pipeline, "max": args.n})
    _print_jobs(result.get("jobs", []), as_json=args.json, pipeline=pipeline)
    return EXIT_OK


def _jobs_consume(args: argparse.Namespace, settings: Settings) -> int:
    pipeline = args.pipeline or settings.jobs.pipeline

    async def consume(client: JobsClient) -> list[dict[str, Any]]:
        result = await client.call(
            "jobs.Reserve", {"pipeline": pipeline, "max": args.n, "lease": 60}
        )
        jobs: list[dict[str, Any]] = result.get("jobs", [])
        # Each job's lease token is its proof for the Ack or Nack.
        leases = [{"id": job["id"], "token": job["lease"]["token"]} for job in jobs]
        if leases and args.no_ack:
            await client.call("jobs.Nack", {"jobs": leases, "requeue": True, "delay": 0})
        elif leases:
            await client.call("jobs.Ack", {"jobs": leases})
        return jobs

    jobs = _with_client(args, settings, consume)
    _print_jobs(jobs, as_json=args.json, pipeline=pipeline)
    if jobs:
        # Say what happened to them: acked jobs are gone for good. With
        # --json, stdout holds only the jobs.
        done = "put back" if args.no_ack else "acked"
        count = f"{len(jobs)} job" + ("s" if len(jobs) != 1 else "")
        print(f"{done} {count} in pipeline {pipeline!r}", file=sys.stderr if args.json else None)
    return EXIT_OK


def _passwd(args: argparse.Namespace) -> int:
    path = Path(args.file)
    existed = path.exists()
    text = read_users_text(path) if existed else ""
    UsersFile.parse(text, source=str(path))  # refuse to rewrite a malformed file
    if args.delete:
        new_text, found = edit_users(text, args.username, None)
        if not found:
            raise CommandError(f"{path}: no user {args.username!r}")
        _write_users(path, new_text)
        print(f"deleted user {args.username!r} from {path}")
        return EXIT_OK
    password = _read_password_stdin() if args.password_stdin else _prompt_password()
    if not password:
        raise UsageError("refusing an empty password")
    try:
        encoded = hash_password(password)
    except ValueError as exc:  # a NUL character, a lone surrogate: never the password
        raise UsageError(f"refusing the password: {exc}") from None
    new_text, found = edit_users(text, args.username, encoded)
    _write_users(path, new_text)
    if found:
        print(f"changed the password of user {args.username!r} in {path}")
    else:
        print(f"added user {args.username!r} to {path}" + ("" if existed else " (new file)"))
    return EXIT_OK


def _write_users(path: Path, text: str) -> None:
    """Replace *path* by a file holding *text*, mode 0600, atomically.

    The new content goes to a temporary file in the same directory (so that
    os.replace is a rename within one filesystem), is flushed to disk, then
    renamed over *path*: a reader sees the old file or the new one, never half
    of one. A symlink is followed, so the file it points to is replaced.
    """
    target = Path(os.path.realpath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _read_password_stdin() -> str:
    """One line of stdin, without its line end."""
    line = sys.stdin.buffer.readline()
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the password on stdin is not valid UTF-8") from None
    return text.removesuffix("\n").removesuffix("\r")


def _prompt_password() -> str:
    """The password typed twice on the terminal, not echoed."""
    try:
        with warnings.catch_warnings():
            # Without a terminal getpass would read stdin and echo the password.
            warnings.simplefilter("error", getpass.GetPassWarning)
            first = getpass.getpass("Password: ")
            second = getpass.getpass("Retype password: ")
    except getpass.GetPassWarning:
        raise UsageError("no terminal to ask for the password on; use --password-stdin") from None
    except EOFError:
        raise UsageError("no password given") from None
    if first != second:
        raise UsageError("the passwords do not match")
    return first


# -- helpers ------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# How long a thread running Python code (a big message's parse) may hold the
# GIL before the event loop gets it back. The default, 5 ms, is paid at every
# system call the loop makes while such a thread runs: an echo over a socket
# pair took p99 77-87 ms (270 round trips in 4 s) with 5 ms and 5-9 ms (730-860)
# with 1 ms, next to a thread parsing a 4 MB attachment (python -m bench.gil).
SWITCH_INTERVAL = 0.001
_T = TypeVar("_T")


def _run_server(run: Callable[[], Awaitable[None]]) -> None:
    from trismtp.service.store import DatabaseCorrupt, StorageUnavailable

    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        trio.run(run)
    except* OSError as group:
        # Our listeners raise OSError(errno, "X cannot listen on ADDR: reason"):
        # the text alone, without "[Errno 98]".
        exc = _first(group)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CommandError(f"cannot start: {reason}") from None
    except* DatabaseCorrupt as group:
        # Exit 2, like a setting the operator must fix: restarting will not help.
        raise UsageError(f"cannot start: {_first(group)}") from None
    except* StorageUnavailable as group:
        raise CommandError(f"cannot open the jobs database: {_first(group)}") from None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):  # nurseries nest their groups
        exc = exc.exceptions[0]
    return exc


def _rpc(args: argparse.Namespace, settings: Settings, method: str, params: dict[str, Any]) -> Any:
    async def call(client: JobsClient) -> Any:
        return await client.call(method, params)

    return _with_client(args, settings, call)


def _jobs_url(args: argparse.Namespace, settings: Settings) -> str:
    url: str = args.url or settings.jobs_url()
    return settings.jobs_url() if url.startswith("embedded") else url


def _nats(
    args: argparse.Namespace, settings: Settings, work: Callable[[NatsClient], Awaitable[_T]]
) -> _T:
    """Run ``work`` with a connection to the NATS server of ``--url``/``jobs.url``."""
    url = _jobs_url(args, settings)

    async def run() -> _T:
        async with connect_nats(url, settings.jobs.nats) as client:
            return await work(client)

    try:
        return trio.run(run)
    except JobsUnavailable as exc:
        server = "start nats-server (JetStream and a websocket listener)"
        hint = f"check --url, or {server}" if args.url else f"{server}, or check jobs.url"
        raise CommandError(_unreachable("the NATS server", url, exc, hint)) from None
    except JetStreamError as exc:
        raise CommandError(f"JetStream: {exc}") from None


async def _nats_stat(settings: Settings, client: NatsClient) -> list[dict[str, Any]]:
    """Each stream (one per partition) as a row of ``jobs stat``: its messages
    are the queued jobs."""
    nats = settings.jobs.nats
    rows = []
    for stream, _ in nats.targets():
        info = await stream_info(client, stream)
        if info is None:
            raise CommandError(f"no JetStream stream {stream!r} (jobs.nats.stream)")
        state = info.get("state", {})
        rows.append(
            {
                "pipeline": settings.jobs.pipeline,
                "driver": "nats",
                "queue": stream,
                "active": state.get("messages", 0),
                "delayed": 0,
                "reserved": None,
                "ready": True,
                "priority": settings.jobs.priority,
                "bytes": state.get("bytes", 0),
                "consumers": state.get("consumer_count", 0),
                "subjects": info.get("config", {}).get("subjects", []),
            }
        )
    return rows


async def _nats_peek(streams: list[str], limit: int, client: NatsClient) -> list[dict[str, Any]]:
    """The first jobs of each stream, without consuming them, as jobs-service jobs."""
    jobs = []
    for stream in streams:
        jobs.extend(await _nats_peek_stream(stream, limit, client))
    return jobs


async def _nats_peek_stream(stream: str, limit: int, client: NatsClient) -> list[dict[str, Any]]:
    if await stream_info(client, stream) is None:
        raise CommandError(f"no JetStream stream {stream!r} (jobs.nats.stream)")
    jobs = []
    for message in await first_messages(client, stream, limit):
        try:
            body = json.loads(message.data)
            body["payload"] = base64.b64decode(body.get("payload", "")).decode("utf-8")
        except (ValueError, TypeError, AttributeError):
            body = {"id": None, "job": "(not a RoadRunner job)", "options": {}}
        body["headers"] = message.headers
        body["seq"] = message.seq
        jobs.append(body)
    return jobs


def _with_client(
    args: argparse.Namespace, settings: Settings, work: Callable[[JobsClient], Awaitable[_T]]
) -> _T:
    url = _jobs_url(args, settings)
    if is_nats_url(url):
        raise UsageError(f"{url} is a NATS server: this command needs a trismtp jobs service")

    async def run() -> _T:
        async with JobsClient.connect(url, token=settings.jobs_token()) as client:
            return await work(client)

    try:
        return trio.run(run)
    except JobsUnavailable as exc:
        if args.url:
            hint = "check --url, or start the daemon (trismtp serve)"
        elif settings.jobs.url == "embedded":
            hint = (
                "is the daemon running? Start it with trismtp serve and the same settings "
                "(jobs_service.listen), or give --url"
            )
        else:
            hint = "start the jobs service (trismtp jobs serve) or check jobs.url, or give --url"
        raise CommandError(_unreachable("the jobs service", url, exc, hint)) from None
    except RpcError as exc:
        raise CommandError(f"the jobs service answered error {exc.code}: {exc.message}") from None


def _unreachable(what: str, url: str, exc: JobsUnavailable, hint: str) -> str:
    """One line: what could not be reached and why, named once, and what to do."""
    if _refused(exc):
        return f"cannot reach {what} at {url}: connection refused (nothing listens there); {hint}"
    # The message names its target itself: keep only the reason.
    reason = re.sub(r"^cannot connect to \S+: ", "", str(exc))
    return f"cannot reach {what} at {url}: {reason}"


def _refused(exc: BaseException) -> bool:
    """Was a connection refused somewhere in the causes of ``exc``?"""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionRefusedError) or (
            isinstance(item, OSError) and item.errno == errno.ECONNREFUSED
        ):
            return True
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        todo.extend(e for e in (item.__cause__, item.__context__) if e is not None)
    return False


def _print_jobs(jobs: list[dict[str, Any]], *, as_json: bool, pipeline: str) -> None:
    if as_json:
        for job in jobs:
            print(json.dumps(job, ensure_ascii=False))
        return
    if not jobs:
        print(f"no jobs in pipeline {pipeline!r}")
        return
    for job in jobs:
        print(_describe_job(job))


def _describe_job(job: dict[str, Any]) -> str:
    lines = [f"job {job.get('id')}  {job.get('job')}  pipeline {job['options'].get('pipeline')}"]
    lease = job.get("lease")
    if isinstance(lease, dict):
        lines[0] += f"  attempt {lease.get('attempt')}"
    try:
        payload = json.loads(job.get("payload", ""))
    except ValueError:
        lines.append("  payload: (not JSON)")
        return "\n".join(lines)
    if not isinstance(payload, dict):
        return "\n".join(lines)
    envelope = payload.get("envelope") or {}
    message = payload.get("message") or {}
    lines += [
        f"  received  {payload.get('received_at')} from {payload.get('remote_addr')}",
        f"  mail from {envelope.get('mail_from')!r}",
        f"  rcpt to   {', '.join(envelope.get('allRecipients') or [])}",
        f"  subject   {message.get('subject')!r}",
        f"  size      {payload.get('size')} bytes, "
        f"{len(payload.get('attachments') or [])} attachments",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """The settings as TOML: a table per section and subsection (``[smtp.tls]``)."""
    tables = section_names()
    out: list[str] = []
    for section, values in data.items():
        name = f"{prefix}{section}"
        subsections: dict[str, Any] = {}
        out.append(f"[{name}]")
        for key, value in values.items():
            if f"{name}.{key}" in tables:
                subsections[key] = value
            elif isinstance(value, dict):
                items = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
                out.append(f"{key} = {{{items}}}" if items else f"{key} = {{}}")
            else:
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
        if subsections:
            out.append(_toml(subsections, prefix=f"{name}."))
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


if __name__ == "__main__":
    main()
