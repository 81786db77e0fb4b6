"""A worker that takes trismtp's email jobs from the jobs service and processes them.

Every email trismtp accepts is one job in the jobs service (docs/payload.md).
This worker pulls them over the WebSocket JSON-RPC (docs/rpc.md) with
trismtp's own client, :class:`trismtp.jobs.rpc.JobsClient`:

1. ``jobs.Reserve`` leases up to ``--batch`` jobs of ``--pipeline`` for
   ``--lease`` seconds. A job that is neither acked nor nacked within its
   lease is handed out again, so choose a lease longer than your slowest job.
2. For each job it decodes the email payload (``json.loads(job["payload"])``:
   the payload is JSON *text*) and calls :func:`handle`, which prints one line
   and, with ``--save-attachments DIR``, writes the attachments to
   ``DIR/<job id>/``.
3. ``jobs.Ack`` when :func:`handle` returns: the job is deleted. When it
   raises, the error is logged and the job is given back with ``jobs.Nack``
   (``requeue``): it is handed out again after ``--retry-delay`` seconds.
   Both carry the job's lease token from Reserve. If the lease ran out and
   another consumer took the job meanwhile, the service changes nothing and
   answers "lease lost" (:class:`LeaseLost`), which is logged. After
   ``jobs_service.max_attempts`` deliveries a job goes to the dead-letter
   pipeline instead of coming back.
4. ``jobs.Reserve`` returns at once, with no jobs when the pipeline is empty,
   so the worker polls: it waits a little longer each time it finds nothing,
   up to ``--idle`` seconds, and starts again at once when it finds jobs.
5. It stops after ``--max`` jobs (acked or failed), or on Ctrl-C /
   SIGTERM: it finishes the job in hand, gives back at once the jobs it
   reserved but did not start, and exits 0. A second Ctrl-C quits at once
   (exit status 1); the jobs in hand then come back when their lease runs out.

A job may be delivered more than once (a lease ran out, a Nack): make your
handler idempotent on the job id (docs/payload.md#deduplicating).

Run it with trismtp's virtualenv, from the repository root, next to ``make run``::

    .venv/bin/python examples/python_worker.py
    .venv/bin/python examples/python_worker.py --save-attachments /tmp/mail --max 10
    TRISMTP_JOBS_TOKEN=secret .venv/bin/python examples/python_worker.py \\
        --url ws://127.0.0.1:6001/rpc --pipeline smtp

To do real work, replace the body of :func:`handle`. Exit status: 0 after
``--max`` jobs or a stop; 1 when the jobs service cannot be reached, refuses
the token or answers with an error (or after a second Ctrl-C); 2 for invalid
arguments.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import logging
import mimetypes
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from trismtp.jobs.rpc import JobsClient, JobsUnavailable, LeaseLost, RpcError

logger = logging.getLogger("python_worker")

Email = dict[str, Any]
"""The email payload (docs/payload.md): event, uuid, envelope, message, attachments…"""
Handler = Callable[[Email], None]

IDLE_FIRST = 0.1
"""Seconds to wait after the first empty Reserve; doubled each time, up to --idle."""
MAX_NAME_BYTES = 200
"""Attachment file names are cut to this many bytes (most file systems allow 255)."""


class HandlerFailed(Exception):
    """Raised by :func:`handle` for ``--fail-subject``: shows what a failing job does."""


# -- your code goes here ------------------------------------------------------------


def handle(email: Email, *, save_dir: Path | None = None, fail_subject: str | None = None) -> None:
    """Process one email. Return to have its job acked; raise to have it retried.

    Here: print one line (job id, envelope sender, subject, number of
    attachments) and, with *save_dir*, save the attachments.
    """
    message = email.get("message") or {}
    subject = message.get("subject") or ""
    attachments = email.get("attachments") or []
    if fail_subject is not None and subject == fail_subject:
        raise HandlerFailed(f"--fail-subject: refusing the email with subject {subject!r}")
    if save_dir is not None:
        save_attachments(email, save_dir)
    mail_from = (email.get("envelope") or {}).get("mail_from") or "<>"
    # JSON-quoted, so that a subject cannot break the line (and the PHP
    # consumer prints the same line).
    print(
        f"job={email.get('uuid')} from={json.dumps(mail_from, ensure_ascii=False)}"
        f" subject={json.dumps(subject, ensure_ascii=False)} attachments={len(attachments)}",
        flush=True,
    )


# -- attachments ----------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def safe_filename(name: str | None, fallback: str) -> str:
    """A file name made from *name*, which comes from the sender: never trust it.

    Keeps only the last path component (``../../etc/passwd`` → ``passwd``,
    ``C:\\x\\y.exe`` → ``y.exe``), replaces control and reserved characters,
    drops leading dots (no ``..``, no hidden files) and cuts it to
    MAX_NAME_BYTES. Returns *fallback* when nothing is left.
    """
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_CHARS.sub("_", base).strip().lstrip(".").strip()
    base = base.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore")
    return base or fallback


def save_attachments(email: Email, save_dir: Path) -> list[Path]:
    """Write the email's attachments to ``save_dir/<job id>/``; return their paths.

    A job delivered twice writes the same files again: saving is idempotent.
    """
    attachments = email.get("attachments") or []
    if not attachments:
        return []
    job_dir = save_dir / safe_filename(str(email.get("uuid") or ""), "unknown-job")
    job_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths: list[Path] = []
    for number, attachment in enumerate(attachments, start=1):
        extension = mimetypes.guess_extension(attachment.get("content_type") or "") or ".bin"
        name = safe_filename(attachment.get("filename"), f"attachment-{number}{extension}")
        if name in used:  # two attachments with the same name: keep both
            name = f"{number}-{name}"
        used.add(name)
        path = job_dir / name
        # safe_filename() already guarantees this; a second check costs nothing.
        if path.resolve().parent != job_dir.resolve():
            raise ValueError(f"unsafe attachment file name: {attachment.get('filename')!r}")
        write_atomically(path, base64.b64decode(attachment.get("content") or ""))
        paths.append(path)
    return paths


def write_atomically(path: Path, data: bytes) -> None:
    """Write *data* to a new temporary file, then rename it to *path*.

    Nobody sees a half-written file, and an existing *path* (even a symlink)
    is replaced, never written through.
    """
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".part-", delete=False) as part:
        try:
            part.write(data)
        except BaseException:
            os.unlink(part.name)
            raise
    os.replace(part.name, path)


# -- the loop -------------------------------------------------------------------------


def decode_email(job: dict[str, Any]) -> Email:
    """The email payload of *job*: its ``payload`` is JSON text, decoded a second time."""
    email = json.loads(job["payload"])
    if not isinstance(email, dict):
        raise TypeError(f"the payload is a JSON {type(email).__name__}, not an object")
    return email


class Worker:
    """Reserves, handles and acks jobs until done; :meth:`stop` ends it early."""

    def __init__(self, client: JobsClient, options: argparse.Namespace, handler: Handler) -> None:
        self.client = client
        self.options = options
        self.handler = handler
        self.acked = 0
        self.failed = 0  # given back with a retry delay
        self.returned = 0  # reserved but not started when we stopped: given back at once
        self.stopping = False
        self.aborted = False
        self._idle: trio.CancelScope | None = None

    @property
    def handled(self) -> int:
        return self.acked + self.failed

    def stop(self) -> None:
        """Reserve no more; finish the job in hand; end a wait for jobs at once."""
        self.stopping = True
        if self._idle is not None:
            self._idle.cancel()

    async def run(self) -> None:
        """Work until ``--max`` jobs are handled or :meth:`stop` is called."""
        limit: int | None = self.options.max
        idle = IDLE_FIRST
        while not self.stopping and (limit is None or self.handled < limit):
            batch = (
                self.options.batch
                if limit is None
                else min(self.options.batch, limit - self.handled)
            )
            result = await self.client.call(
                "jobs.Reserve",
                {"pipeline": self.options.pipeline, "max": batch, "lease": self.options.lease},
            )
            jobs: list[dict[str, Any]] = result["jobs"]
            if not jobs:
                # Reserve does not wait for jobs: poll, more slowly while idle.
                with trio.CancelScope() as self._idle:
                    await trio.sleep(idle)
                self._idle = None
                idle = min(idle * 2, self.options.idle)
                continue
            idle = IDLE_FIRST
            for job in jobs:
                if self.stopping:
                    # Reserved but not started: give it back now rather than
                    # have it wait for its lease to run out.
                    await self.nack(job, delay=0)
                    self.returned += 1
                    continue
                await self.process(job)

    async def process(self, job: dict[str, Any]) -> None:
        try:
            email = decode_email(job)
            # In a thread, so that signals are seen while a slow handler runs;
            # a second Ctrl-C abandons it (the job comes back after its lease).
            await trio.to_thread.run_sync(self.handler, email, abandon_on_cancel=True)
        except Exception:
            logger.exception(
                "job %s failed: giving it back, to retry in %g s",
                job["id"],
                self.options.retry_delay,
            )
            await self.nack(job, delay=self.options.retry_delay)
            self.failed += 1
        else:
            await self.settle("jobs.Ack", {"jobs": [lease_of(job)]})
            self.acked += 1

    async def nack(self, job: dict[str, Any], *, delay: float) -> None:
        await self.settle("jobs.Nack", {"jobs": [lease_of(job)], "requeue": True, "delay": delay})

    async def settle(self, method: str, params: dict[str, Any]) -> None:
        """Ack or Nack; a lost lease is logged, not fatal."""
        try:
            await self.client.call(method, params)
        except LeaseLost as exc:
            # Our lease ran out and another consumer has the job now: it is
            # theirs to finish. Raise --lease if this happens often.
            logger.warning("lease lost for job(s) %s: another consumer has them", exc.stale)


def lease_of(job: dict[str, Any]) -> dict[str, str]:
    """What Ack and Nack need: the job's id and its lease token from Reserve."""
    return {"id": job["id"], "token": job["lease"]["token"]}


async def watch_signals(
    worker: Worker, quit_now: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    """First Ctrl-C (SIGINT) or SIGTERM: stop gracefully. Second: quit at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not worker.stopping:
                logger.info(
                    "got %s: stopping after the current job (again to quit at once)",
                    signal.Signals(signum).name,
                )
                worker.stop()
            else:
                logger.warning("quitting at once: jobs in hand come back after their lease")
                worker.aborted = True
                quit_now.cancel()


async def consume(options: argparse.Namespace, handler: Handler) -> Worker:
    """Connect, work until done; return the worker (with its counts)."""
    async with JobsClient.connect(options.url, token=options.token) as client:
        worker = Worker(client, options, handler)
        with trio.CancelScope() as quit_now:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_signals, worker, quit_now)
                logger.info(
                    "connected to %s: taking jobs from pipeline %s",
                    options.url,
                    json.dumps(options.pipeline),
                )
                await worker.run()
                nursery.cancel_scope.cancel()
        return worker


# -- the command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Process trismtp's email jobs from the jobs service (see the module doc)."
    )
    parser.add_argument(
        "--url", type=_ws_url, default="ws://127.0.0.1:6001/rpc", help="the jobs service"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TRISMTP_JOBS_TOKEN", ""),
        help="jobs_service.token (default: $TRISMTP_JOBS_TOKEN; prefer that: argv is public)",
    )
    parser.add_argument("--pipeline", default="smtp", help="the pipeline (default: smtp)")
    parser.add_argument("--batch", type=_positive_int, default=10, help="jobs per Reserve")
    parser.add_argument(
        "--lease", type=_positive_float, default=60.0, help="seconds to handle a batch"
    )
    parser.add_argument(
        "--retry-delay", type=_non_negative_float, default=30.0, help="seconds before a retry"
    )
    parser.add_argument(
        "--idle", type=_positive_float, default=2.0, help="longest wait between empty Reserves"
    )
    parser.add_argument("--max", type=_positive_int, default=None, help="stop after N jobs")
    parser.add_argument(
        "--save-attachments", metavar="DIR", type=Path, help="write attachments to DIR/<job id>/"
    )
    parser.add_argument(
        "--fail-subject", metavar="SUBJECT", help="fail the emails with this subject (a demo)"
    )
    return parser.parse_args(argv)


def _ws_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError("must be ws://HOST:PORT/rpc or wss://…")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _refused(error: BaseException | None) -> bool:
    """Whether *error* was caused by a refused TCP connection (nobody listens)."""
    while error is not None:
        if isinstance(error, ConnectionRefusedError):
            return True
        if isinstance(error, BaseExceptionGroup):
            return any(_refused(inner) for inner in error.exceptions)
        error = error.__cause__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="python_worker: %(levelname)s: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A subject the terminal cannot show must not make handle() fail.
        sys.stdout.reconfigure(errors="backslashreplace")
    handler = functools.partial(
        handle, save_dir=options.save_attachments, fail_subject=options.fail_subject
    )
    worker: Worker | None = None
    try:
        worker = trio.run(consume, options, handler)
    except* (JobsUnavailable, RpcError) as group:
        # Trio's nurseries raise errors as exception groups: show the first one.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        if isinstance(error, RpcError):
            logger.error("the jobs service answered: %s", error)
        elif _refused(error):
            logger.error("%s: connection refused (is the jobs service running there?)", error)
        else:
            logger.error("%s", error)
    if worker is None:
        return 1
    logger.info(
        "done: %d acked, %d failed, %d returned unstarted",
        worker.acked,
        worker.failed,
        worker.returned,
    )
    return 1 if worker.aborted else 0


if __name__ == "__main__":
    sys.exit(main())
