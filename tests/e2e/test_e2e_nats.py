"""trismtp → NATS JetStream end to end: a real nats-server, ``trismtp serve``, smtplib.

With ``jobs.url = "nats+ws://…"`` every ``250 … queued as <id>`` is one
message of the JetStream stream (``jobs.nats.stream``), in RoadRunner's
format, the job's id in its ``uuid`` header and no ``Nats-Msg-Id`` (which
would make RoadRunner's requeue lose jobs); the ``trismtp jobs`` commands read the
stream; ``examples/nats_consumer.py`` consumes it; a server that is down or
refuses the credentials gives ``451 4.3.0``.

nats-server (JetStream, WebSocket listener on 127.0.0.1) is started by
:class:`tests.nats.nats_server.NatsServer`: skipped without it, a failure
when CI=true. The stream is read back with trismtp's own NATS client
(``STREAM.MSG.GET``, which neither consumes nor acknowledges).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from trismtp.nats import NatsClient, StoredMessage, first_messages, stream_info
from trismtp.nats.roadrunner import accepted_message_size

from ..nats.nats_server import NatsServer, NatsServers
from .trismtp_e2e import (
    CLI_TIMEOUT,
    UUID4_RE,
    Daemon,
    Launcher,
    clean_env,
    queued_id,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")

PUSH_TIMEOUT = 2.0
STREAM = "trismtp"  # the defaults of [jobs.nats]
SUBJECT = "trismtp.jobs"
USER = "trismtp"
PASSWORD = "nats-Pw-4kQz8rTj"  # distinctive, to look for in logs
WRONG_PASSWORD = "wrong-Pw-7Hq3xZcB"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nats_consumer.py"


# -- helpers --------------------------------------------------------------------


def nats_daemon(
    launch: Launcher,
    nats: NatsServer,
    nats_settings: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Daemon:
    """A started daemon whose jobs go to *nats*'s JetStream."""
    settings: dict[str, dict[str, Any]] = {
        "jobs": {"url": nats.url, "push_timeout": PUSH_TIMEOUT},
        "jobs.nats": nats_settings or {},
    }
    return launch.daemon(settings, **kwargs)


def with_nats(
    nats: NatsServer,
    work: Callable[[NatsClient], Awaitable[T]],
    *,
    user: str = "",
    password: str = "",
) -> T:
    """Run *work* with a NATS client connected to *nats* (in a trio run of its own)."""

    async def run() -> T:
        async with NatsClient.connect(nats.url, user=user, password=password) as client:
            return await work(client)

    return trio.run(run)


def stream_messages(nats: NatsServer, **credentials: str) -> list[StoredMessage]:
    """Every message of the stream, oldest first (read without consuming)."""

    async def read(client: NatsClient) -> list[StoredMessage]:
        return await first_messages(client, STREAM, 100_000)

    return with_nats(nats, read, **credentials)


def stream_state(nats: NatsServer, **credentials: str) -> dict[str, Any]:
    """The stream's info (``config``, ``state``); fails if there is no stream."""

    async def read(client: NatsClient) -> dict[str, Any] | None:
        return await stream_info(client, STREAM)

    info = with_nats(nats, read, **credentials)
    assert info is not None, f"no stream {STREAM!r}"
    return info


def send(
    port: int, subject: str, *, message_id: str | None = None, timeout: float = 15
) -> tuple[int, str]:
    """One message over smtplib: the code and text of the reply to its data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.e2e.test", timeout=timeout) as smtp:
        return transaction(smtp, subject, message_id)


def transaction(smtp: smtplib.SMTP, subject: str, message_id: str | None) -> tuple[int, str]:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = "Rcpt <rcpt@example.com>"
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(f"Body of {subject}.\n")
    smtp.ehlo_or_helo_if_needed()
    code, text = smtp.mail("sender@example.org")
    assert code == 250, (code, text)
    code, text = smtp.rcpt("rcpt@example.com")
    if code != 250:  # 451 at once while the daemon knows NATS is down
        smtp.rset()
        return code, f"{code} {text.decode()}"
    try:
        code, text = smtp.data(msg.as_bytes(policy=SMTP))
    except smtplib.SMTPDataError as exc:  # smtplib raises for anything but 250
        error = exc.smtp_error
        text = error if isinstance(error, bytes) else error.encode()
        return exc.smtp_code, f"{exc.smtp_code} {text.decode()}"
    return code, f"{code} {text.decode()}"


def roadrunner_job(message: StoredMessage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The RoadRunner body of a stream message, and the email payload in it."""
    body = json.loads(message.data)
    assert isinstance(body, dict), body
    payload = json.loads(base64.b64decode(body["payload"], validate=True))
    assert isinstance(payload, dict), payload
    return body, payload


def msg_ids(messages: list[StoredMessage]) -> list[str]:
    """The job id of each message: its ``uuid`` header (one each)."""
    ids = []
    for message in messages:
        values = message.headers.get("uuid", [])
        assert len(values) == 1, f"message {message.seq}: uuid {values}"
        ids.append(values[0])
    return ids


def text_table(stdout: str) -> dict[str, dict[str, str]]:
    """A ``jobs stat`` table as {PIPELINE: {COLUMN: cell}}, cut at the header's
    column starts (cells may be empty)."""
    header, *rows = stdout.splitlines()
    columns = header.split()
    starts = [header.index(f"{c} " if c != columns[-1] else c) for c in columns]
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        bounds = [*starts[1:], None]
        cells = {
            c: row[start:end].strip() for c, start, end in zip(columns, starts, bounds, strict=True)
        }
        table[cells[columns[0]]] = cells
    return table


# -- the tests --------------------------------------------------------------------


def test_one_message_is_one_roadrunner_message_in_the_stream(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """(a) 250 → exactly one stream message: headers (no Nats-Msg-Id), body, payload."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    _, reply = send(daemon.smtp_port, "Grüße über NATS", message_id="one@e2e.test")
    job_id = queued_id(reply)

    messages = stream_messages(nats)
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.headers == {
        "uuid": [job_id],
        "payload_class": ["smtp:handler"],
    }
    body, payload = roadrunner_job(message)
    assert list(body) == ["job", "id", "payload", "options"], body
    assert body["job"] == "smtp.email"
    assert body["id"] == job_id
    assert body["options"] == {"priority": 10, "pipeline": "smtp", "delay": 0, "auto_ack": False}

    assert payload["event"] == "EMAIL_RECEIVED"
    assert payload["uuid"] == job_id
    assert payload["remote_addr"].startswith("127.0.0.1:")
    envelope = payload["envelope"]
    assert envelope["helo"] == "client.e2e.test"
    assert envelope["mail_from"] == "sender@example.org"
    assert envelope["allRecipients"] == ["rcpt@example.com"]
    assert envelope["from"] == [{"email": "sender@example.org", "name": "Sender"}]
    email = payload["message"]
    assert email["subject"] == "Grüße über NATS"
    assert email["id"] == "<one@e2e.test>"
    assert email["body"].replace("\r\n", "\n") == "Body of Grüße über NATS.\n"
    raw = email["raw"]
    assert raw.startswith("From: Sender <sender@example.org>\r\n"), raw
    assert "Message-ID: <one@e2e.test>\r\n" in raw
    assert payload["size"] == len(raw.encode("utf-8"))

    # The stream the daemon created, as [jobs.nats] says, and the subject.
    info = stream_state(nats)
    config = info["config"]
    assert config["subjects"] == [SUBJECT]
    # limits, so that RoadRunner's pipeline can declare itself on it (test_e2e_roadrunner).
    assert config["retention"] == "limits"
    assert config["storage"] == "file"
    assert config["duplicate_window"] == 120 * 10**9
    assert config["num_replicas"] == 1
    assert info["state"]["messages"] == 1

    async def raw_get(client: NatsClient) -> dict[str, Any]:
        reply = await client.request(f"$JS.API.STREAM.MSG.GET.{STREAM}", b'{"seq":1}', 5)
        data: dict[str, Any] = json.loads(reply)["message"]
        return data

    assert with_nats(nats, raw_get)["subject"] == SUBJECT


def test_jobs_stat_and_peek_read_the_stream(nats_servers: NatsServers, launch: Launcher) -> None:
    """(b) ``trismtp jobs stat|peek --url nats+ws://…``: counts and jobs, nothing consumed."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    subjects = ["stat one", "stat two"]
    ids = [queued_id(send(daemon.smtp_port, subject)[1]) for subject in subjects]
    cwd = daemon.workdir

    stat = run_cli("jobs", "stat", "--url", nats.url, cwd=cwd, check=True)
    table = text_table(stat.stdout)
    assert "smtp" in table, stat.stdout
    assert table["smtp"]["DRIVER"] == "nats", stat.stdout
    assert table["smtp"]["ACTIVE"] == "2", stat.stdout

    stat_json = run_cli("jobs", "stat", "--json", "--url", nats.url, cwd=cwd, check=True)
    stats = json.loads(stat_json.stdout)
    assert isinstance(stats, list), stats
    assert len(stats) == 1, stats
    row = stats[0]
    assert {k: row.get(k) for k in ("pipeline", "driver", "queue", "active")} == {
        "pipeline": "smtp",
        "driver": "nats",
        "queue": STREAM,
        "active": 2,
    }, row

    peek = run_cli("jobs", "peek", "--url", nats.url, cwd=cwd, check=True)
    lines = peek.stdout.splitlines()
    for job_id, subject in zip(ids, subjects, strict=True):
        assert any(line.startswith(f"job {job_id}") for line in lines), peek.stdout
        shown = rf"\s+subject\s+{re.escape(repr(subject))}"
        assert any(re.fullmatch(shown, line) for line in lines), peek.stdout

    peek_json = run_cli("jobs", "peek", "--json", "--url", nats.url, cwd=cwd, check=True)
    jobs = [json.loads(line) for line in peek_json.stdout.splitlines()]
    assert [job["id"] for job in jobs] == ids, peek_json.stdout
    for job, subject in zip(jobs, subjects, strict=True):
        assert json.loads(job["payload"])["message"]["subject"] == subject

    # Peeking consumed nothing.
    assert stream_state(nats)["state"]["messages"] == 2


def test_example_consumer_consumes_and_acks_everything(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """(c) examples/nats_consumer.py, as a user runs it, with a user and password:
    one line per job, every job acked, and the work-queue stream is empty."""
    count = 7
    nats = nats_servers.new(user=USER, password=PASSWORD).start()
    daemon = nats_daemon(launch, nats, {"user": USER, "password": PASSWORD})
    sent = {
        queued_id(send(daemon.smtp_port, f"consume {n}")[1]): f"consume {n}" for n in range(count)
    }
    assert len(sent) == count

    # --batch 3 < --max: three fetches (3, 3, 1); the password comes from the environment.
    result = subprocess.run(
        [
            sys.executable, str(EXAMPLE),
            "--url", nats.url, "--stream", STREAM, "--durable", "e2e-worker",
            "--max", str(count), "--batch", "3", "--user", USER,
        ],
        cwd=daemon.workdir,
        env={**clean_env(), "NATS_PASSWORD": PASSWORD},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )  # fmt: skip
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert len(lines) == count, output
    seen: dict[str, str] = {}
    for line in lines:
        job_id, rest = line.split("  ", 1)
        assert UUID4_RE.match(job_id), line
        seen[job_id] = rest
    assert set(seen) == set(sent), output
    for job_id, rest in seen.items():
        assert rest == f"from sender@example.org  to rcpt@example.com  subject {sent[job_id]!r}"
    assert f"processed {count} jobs" in result.stderr, output
    assert PASSWORD not in result.stdout + result.stderr

    # Acked and deleted (as RoadRunner's delete_after_ack does), so gone.
    credentials = {"user": USER, "password": PASSWORD}
    assert stream_state(nats, **credentials)["state"]["messages"] == 0
    assert stream_messages(nats, **credentials) == []

    async def consumer_info(client: NatsClient) -> dict[str, Any]:
        reply = await client.request(f"$JS.API.CONSUMER.INFO.{STREAM}.e2e-worker", b"", 5)
        data: dict[str, Any] = json.loads(reply)
        return data

    consumer = with_nats(nats, consumer_info, **credentials)
    assert consumer["config"]["ack_policy"] == "explicit"
    assert consumer["num_ack_pending"] == 0, consumer
    assert consumer["num_pending"] == 0, consumer
    assert consumer["num_redelivered"] == 0, consumer
    assert consumer["ack_floor"]["stream_seq"] == count, consumer


@contextmanager
def example_consumer(
    tmp_path: Path, nats: NatsServer, durable: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """examples/nats_consumer.py running against *nats*: its process, stdout and
    stderr files; killed on the way out if the test did not stop it."""
    out, err = tmp_path / f"{durable}.out", tmp_path / f"{durable}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        consumer = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--url", nats.url, "--durable", durable],
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        yield consumer, out, err
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(10)


def test_example_consumer_waits_for_jobs_and_stops_on_sigint(
    nats_servers: NatsServers, launch: Launcher, tmp_path: Path
) -> None:
    """(c) The example without --max: it waits for jobs, processes each as it
    comes, and on SIGINT (Ctrl-C) stops at once with status 0, all acked."""
    nats = nats_servers.new().start()
    daemon = nats_daemon(launch, nats)
    # The stream exists (the pusher creates it once connected, shortly after
    # SMTP listens); the next test starts the example before it does.
    daemon.wait_for_log("connected to the NATS server")
    with example_consumer(tmp_path, nats, "e2e-waiter") as (consumer, out, err):

        def output() -> str:
            return f"stdout:\n{out.read_text()}\nstderr:\n{err.read_text()}"

        wait_until(lambda: "created durable consumer" in err.read_text(), 10, "the consumer")
        ids = {queued_id(send(daemon.smtp_port, f"waited for {n}")[1]) for n in range(3)}
        wait_until(
            lambda: len(out.read_text().splitlines()) == len(ids),
            10,
            "the consumer to process 3 jobs",
            detail=output,
        )
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(10) == 0, output()
    assert {line.split()[0] for line in out.read_text().splitlines()} == ids, output()
    assert "got SIGINT: stopping" in err.read_text(), output()
    assert "processed 3 jobs" in err.read_text(), output()
    assert stream_state(nats)["state"]["messages"] == 0


def test_example_consumer_started_before_the_stream_waits_for_it(
    nats_servers: NatsServers, launch: Launcher, tmp_path: Path
) -> None:
    """A worker started before trismtp (a compose file starts both at once)
    waits for the stream trismtp creates, then takes the jobs."""
    nats = nats_servers.new().start()
    with example_consumer(tmp_path, nats, "early") as (consumer, out, err):
        wait_until(lambda: "waiting for the stream" in err.read_text(), 10, "the worker to wait")
        daemon = nats_daemon(launch, nats)
        wait_until(lambda: "created durable consumer" in err.read_text(), 10, "the consumer")
        ids = {queued_id(send(daemon.smtp_port, f"early {n}")[1]) for n in range(2)}
        wait_until(lambda: len(out.read_text().splitlines()) == len(ids), 10, "2 jobs done")
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(10) == 0, err.read_text()
    assert {line.split()[0] for line in out.read_text().splitlines()} == ids
    assert err.read_text().count("waiting for the stream") == 1, err.read_text()


def test_example_consumer_waiting_for_the_stream_stops_on_sigint(
    nats_servers: NatsServers, tmp_path: Path
) -> None:
    nats = nats_servers.new().start()
    with example_consumer(tmp_path, nats, "never") as (consumer, _, err):
        wait_until(lambda: "waiting for the stream" in err.read_text(), 10, "the worker to wait")
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(10) == 0, err.read_text()
    assert "got SIGINT: stopping" in err.read_text()
    assert "processed 0 jobs" in err.read_text()


def test_two_daemons_push_into_one_stream_concurrently(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """(d) Two daemons, one stream, 320 messages at once: one stream message per 250."""
    per_connection, connections = 40, 8  # half of the connections to each daemon
    nats = nats_servers.new().start()
    daemons = [nats_daemon(launch, nats), nats_daemon(launch, nats)]

    def client(n: int) -> list[tuple[str, int, str]]:
        port = daemons[n % 2].smtp_port
        results = []
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.e2e.test", timeout=15) as smtp:
            for i in range(per_connection):
                message_id = f"c{n}.m{i}@two-daemons.e2e.test"
                code, reply = transaction(smtp, f"two daemons {n}/{i}", message_id)
                results.append((message_id, code, reply))
        return results

    with ThreadPoolExecutor(connections) as pool:
        results = [r for batch in pool.map(client, range(connections)) for r in batch]
    assert len(results) == per_connection * connections
    acked = {message_id: queued_id(reply) for message_id, code, reply in results if code == 250}
    others = [reply for _, code, reply in results if code != 250]
    assert not others, f"{len(others)} replies other than 250: {others[:5]}"

    messages = stream_messages(nats)
    ids = msg_ids(messages)
    duplicates = [job for job, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"job ids stored more than once: {duplicates[:5]}"
    assert len(messages) == len(acked), "one stream message per 250"
    assert set(ids) == set(acked.values())
    # And each under its own email: the Message-ID in the payload is the one sent.
    by_job = {job: message_id for message_id, job in acked.items()}
    for job_id, message in zip(ids, messages, strict=True):
        body, payload = roadrunner_job(message)
        assert body["id"] == job_id == payload["uuid"]
        assert payload["message"]["id"] == f"<{by_job[job_id]}>"
    assert stream_state(nats)["state"]["messages"] == len(acked)
    # Both daemons did their share.
    for daemon in daemons:
        assert daemon.log_text().count("queued as") == per_connection * connections // 2


def test_nats_down_at_start_gives_451_then_250_once_it_runs(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """(e) No nats-server when the daemon starts: 451 4.3.0 within push_timeout;
    started later, the pusher connects and messages get 250 again."""
    nats = nats_servers.new()  # ports chosen, not started
    daemon = nats_daemon(launch, nats)
    daemon.wait_for_log("cannot connect to the NATS server")

    started = time.monotonic()
    code, reply = send(daemon.smtp_port, "while down")
    elapsed = time.monotonic() - started
    assert code == 451, reply
    assert reply.startswith("451 4.3.0 "), reply
    assert elapsed < PUSH_TIMEOUT + 1, f"451 after {elapsed:.1f} s"
    assert daemon.running

    nats.start()
    tempfails = 0

    def accepted() -> str | None:
        nonlocal tempfails
        code, reply = send(daemon.smtp_port, "after the start")
        assert code in (250, 451), reply
        if code == 451:
            tempfails += 1
            return None
        return queued_id(reply)

    first = wait_until(accepted, 20, "a 250 once nats-server runs", detail=daemon.log_tail)
    code, reply = send(daemon.smtp_port, "steady")
    assert code == 250, reply
    ids = [first, queued_id(reply)]

    # The 451s stored nothing; each 250 is in the stream once.
    assert msg_ids(stream_messages(nats)) == ids
    print(f"451 replies after nats-server started: {tempfails}")


def test_wrong_nats_password_gives_451_and_a_clear_log_without_it(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    """(f) A wrong [jobs.nats] password: 451, a log line that says the credentials
    were refused, and neither password anywhere in the daemon's output."""
    nats = nats_servers.new(user=USER, password=PASSWORD).start()
    daemon = nats_daemon(launch, nats, {"user": USER, "password": WRONG_PASSWORD})
    daemon.wait_for_log("cannot connect to the NATS server")

    code, reply = send(daemon.smtp_port, "wrong password")
    assert code == 451, reply
    assert reply.startswith("451 4.3.0 "), reply
    assert daemon.running

    log = daemon.log_text()
    refused = [line for line in log.splitlines() if "refused the user and password" in line]
    assert refused, log
    assert "Authorization Violation" in refused[0], refused[0]
    assert "cannot connect to the NATS server" in refused[0], refused[0]
    outputs = [log, *(path.read_text(errors="replace") for path in daemon.workdir.glob("*.out"))]
    for text in outputs:
        assert WRONG_PASSWORD not in text
        assert PASSWORD not in text
    # The password is in the config file only (the daemon read it from there).
    assert WRONG_PASSWORD in daemon.config.read_text()

    # Nothing reached JetStream: the daemon never got as far as creating the stream.
    async def no_stream(client: NatsClient) -> bool:
        return await stream_info(client, STREAM) is None

    assert with_nats(nats, no_stream, user=USER, password=PASSWORD)


def test_a_message_over_what_max_payload_carries_gets_552_and_others_are_stored(
    nats_servers: NatsServers, launch: Launcher
) -> None:
    # A job the server can never take must be refused for good, not retried
    # with 451s: with the server's max_payload known, SIZE says what fits, and
    # a larger message is refused by the SMTP side, before the pusher.
    nats = nats_servers.new(max_payload=64 * 1024).start()
    daemon = nats_daemon(launch, nats)
    daemon.wait_for_log("connected to the NATS server")
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100  # 100 KB
    results: dict[str, tuple[int, bytes]] = {}

    def deliver(name: str, body: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=15) as smtp:
            smtp.ehlo()
            results["size"] = (int(smtp.esmtp_features["size"]), b"")
            smtp.mail("sender@example.org")
            smtp.rcpt("rcpt@example.com")
            try:
                code, text = smtp.data(body)
            except smtplib.SMTPDataError as exc:
                error = exc.smtp_error
                code, text = exc.smtp_code, error if isinstance(error, bytes) else error.encode()
            results[name] = (code, text)

    # Sent together, so that they may share a batch.
    threads = [
        threading.Thread(target=deliver, args=("big", big)),
        threading.Thread(target=deliver, args=("small", b"Subject: small\r\n\r\nhi\r\n")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results["size"][0] == accepted_message_size(64 * 1024), results
    assert results["big"][0] == 552, results
    assert results["big"][1].startswith(b"5.3.4"), results
    assert results["small"][0] == 250, results
    messages = stream_messages(nats)
    assert msg_ids(messages) == [queued_id(f"250 {results['small'][1].decode()}")]
    # Refused by SMTP, so never retried nor sent.
    assert "larger than the NATS server's max_payload" not in daemon.log_text()
