"""A cron job that handles the email jobs waiting in trismtp's jobs service, then exits.

Plain blocking Python, no event loop in sight: :class:`trismtp.consumer.BlockingConsumer`
runs one for the duration of :meth:`~trismtp.consumer.BlockingConsumer.run`
and closes it. With ``stop_when_idle`` the run ends as soon as the pipeline
has nothing ready, after the jobs in hand are done. A crontab line::

    */5 * * * * TRISMTP_JOBS_TOKEN=secret /srv/trismtp/.venv/bin/python cron_worker.py

The same two calls work from a Django management command or a view of a
threaded WSGI app. Exit status 0 when done (the summary is the last line),
1 when the jobs service cannot be reached or refuses the token or pipeline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trismtp.consumer import BlockingConsumer, JobsUnavailable, ReservedJob, RpcError


def handle(job: ReservedJob) -> None:
    """Your code: return to ack the job, raise to have it retried later."""
    email = job.email()
    sizes = sum(len(attachment.content) for attachment in email.attachments)
    # One write per line, newline included: handlers run in several threads
    # at once, and print()'s separate write of the newline could interleave.
    sys.stdout.write(f"{job.id} {email.message.subject!r} attachments={sizes} bytes\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:6001/rpc")
    parser.add_argument("--pipeline", default="smtp")
    parser.add_argument("--concurrency", type=int, default=4)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="cron_worker: %(levelname)s: %(message)s")

    consumer = BlockingConsumer(
        options.url,
        handle,
        token=os.environ.get("TRISMTP_JOBS_TOKEN", ""),
        pipeline=options.pipeline,
        concurrency=options.concurrency,
        stop_when_idle=True,
    )
    try:
        stats = consumer.run()
    except (JobsUnavailable, RpcError) as error:
        print(f"cron_worker: {error}", file=sys.stderr)
        return 1
    print(f"done: {stats.acked} acked, {stats.failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
