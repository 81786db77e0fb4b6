"""A worker that takes trismtp's email jobs from the jobs service and processes them.

Built on trismtp's consumer library (:mod:`trismtp.consumer`, docs/rpc.md "A
Python consumer"), which does the jobs RPC part: it reserves jobs for free
handler slots, extends their leases while :func:`handle` works, acks a job
when :func:`handle` returns and gives it back (Nack, requeue) to retry in
``--retry-delay`` seconds when it raises, polls with a growing wait when the
pipeline is empty, and reconnects when the service restarts.

:func:`handle` prints one line per email and, with ``--save-attachments
DIR``, writes the attachments to ``DIR/<job id>/``. Replace its body to do
real work; make it idempotent on the job id, since a job may be delivered
again (docs/payload.md#deduplicating).

It stops after ``--max`` jobs, or on Ctrl-C / SIGTERM: the jobs in hand are
finished (within ``--grace`` seconds, else given back) and it exits 0. A
second Ctrl-C ends the grace at once; a :func:`handle` call already running
(in its thread) is still waited for, and its job acked. Exit status 1 when the
jobs service cannot be reached, refuses the token or the pipeline; 2 for
invalid arguments.

Run it with trismtp's virtualenv, from the repository root, next to ``make run``::

    .venv/bin/python examples/python_worker.py
    .venv/bin/python examples/python_worker.py --save-attachments /tmp/mail --max 10
    TRISMTP_JOBS_TOKEN=secret .venv/bin/python examples/python_worker.py --concurrency 4
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import mimetypes
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from trismtp.consumer import Consumer, Email, JobsUnavailable, ReservedJob, RpcError, in_thread

logger = logging.getLogger("python_worker")

MAX_NAME_BYTES = 200
"""Attachment file names are cut to this many bytes (most file systems allow 255)."""


class HandlerFailed(Exception):
    """Raised by :func:`handle` for ``--fail-subject``: shows what a failing job does."""


# -- your code goes here ------------------------------------------------------------


def handle(email: Email, *, save_dir: Path | None = None, fail_subject: str | None = None) -> None:
    """Process one email. Return to have its job acked; raise to have it retried."""
    subject = email.message.subject
    if fail_subject is not None and subject == fail_subject:
        raise HandlerFailed(f"--fail-subject: refusing the email with subject {subject!r}")
    if save_dir is not None:
        save_attachments(email, save_dir)
    # JSON-quoted, so that a subject cannot break the line (and the PHP
    # consumer prints the same line). One write, newline included: with
    # --concurrency, handlers print from several threads at once.
    mail_from = json.dumps(email.envelope.mail_from or "<>", ensure_ascii=False)
    sys.stdout.write(
        f"job={email.uuid} from={mail_from} subject={json.dumps(subject, ensure_ascii=False)}"
        f" attachments={len(email.attachments)}\n"
    )
    sys.stdout.flush()


# -- attachments ----------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def safe_filename(name: str | None, fallback: str) -> str:
    """A file name made from *name*, which comes from the sender: never trust it.

    Keeps only the last path component (``../../etc/passwd`` → ``passwd``),
    replaces control and reserved characters, drops leading dots (no ``..``,
    no hidden files) and cuts it to MAX_NAME_BYTES; *fallback* if nothing is left.
    """
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_CHARS.sub("_", base).strip().lstrip(".").strip()
    base = base.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore")
    return base or fallback


def save_attachments(email: Email, save_dir: Path) -> list[Path]:
    """Write the attachments to ``save_dir/<job id>/`` (again, if delivered twice)."""
    if not email.attachments:
        return []
    job_dir = save_dir / safe_filename(email.uuid, "unknown-job")
    job_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths: list[Path] = []
    for number, attachment in enumerate(email.attachments, start=1):
        extension = mimetypes.guess_extension(attachment.content_type) or ".bin"
        name = safe_filename(attachment.filename, f"attachment-{number}{extension}")
        if name in used:  # two attachments with the same name: keep both
            name = f"{number}-{name}"
        used.add(name)
        path = job_dir / name
        if path.resolve().parent != job_dir.resolve():  # safe_filename() ensures it
            raise ValueError(f"unsafe attachment file name: {attachment.filename!r}")
        write_atomically(path, attachment.content)
        paths.append(path)
    return paths


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename: no half-written file, no symlink followed."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".part-", delete=False) as part:
        try:
            part.write(data)
        except BaseException:
            os.unlink(part.name)
            raise
    os.replace(part.name, path)


# -- the command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Process trismtp's email jobs (module doc).")
    add = parser.add_argument
    add("--url", default="ws://127.0.0.1:6001/rpc", help="the jobs service (ws:// or wss://)")
    add(
        "--token",
        default=os.environ.get("TRISMTP_JOBS_TOKEN", ""),
        help="jobs_service.token (default: $TRISMTP_JOBS_TOKEN; prefer that: argv is public)",
    )
    add("--pipeline", default="smtp", help="the pipeline (default: smtp)")
    add("--concurrency", type=_count, default=1, help="jobs handled at once (default: 1)")
    add("--lease", type=_seconds, default=60.0, help="lease seconds, extended while handling")
    add("--retry-delay", type=_seconds0, default=30.0, help="seconds before a failed job's retry")
    add("--idle", type=_seconds, default=2.0, help="longest wait between empty Reserves")
    add("--grace", type=_seconds0, default=30.0, help="seconds the jobs in hand get at a stop")
    add("--max", type=_count, default=None, help="stop after N jobs")
    add("--backend", choices=("trio", "asyncio"), default="trio", help="the event loop")
    add("--save-attachments", metavar="DIR", type=Path, help="write attachments to DIR/<job id>/")
    add("--fail-subject", metavar="SUBJECT", help="fail the emails with this subject (a demo)")
    return parser.parse_args(argv)


def _count(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return int(text)


def _seconds(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return float(text)


def _seconds0(text: str) -> float:
    if not float(text) >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return float(text)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="python_worker: %(levelname)s: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")  # any subject prints
    on_email = functools.partial(
        handle, save_dir=options.save_attachments, fail_subject=options.fail_subject
    )

    def on_job(job: ReservedJob) -> None:
        on_email(job.email())

    consumer = Consumer(
        options.url,
        in_thread(on_job),  # handle() blocks (files): in a thread, leases go on
        token=options.token,
        pipeline=options.pipeline,
        concurrency=options.concurrency,
        lease=options.lease,
        retry_delay=options.retry_delay,
        idle_max=options.idle,
        grace=options.grace,
        max_jobs=options.max,
    )
    try:
        stats = anyio.run(consumer.run_until_signalled, backend=options.backend)
    except RpcError as error:
        logger.error("the jobs service answered: %s", error)
        return 1
    except JobsUnavailable as error:
        logger.error("%s", error)
        return 1
    logger.info(
        "done: %d acked, %d failed, %d returned unstarted",
        stats.acked,
        stats.failed,
        stats.returned,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
