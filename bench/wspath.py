"""The WebSocket JSON-RPC path alone: what one PushBatch costs in CPU.

Usage: ``python -m bench.wspath [--big 4] [--small 1000] [--jobs 5] [--peek 0] [--null-store]``.

Runs the real jobs service (``serve_jobs``, 127.0.0.1, a temporary database)
and the pusher's real client (``JobsClient`` through ``RpcSink``) in one
process, as ``trismtp serve`` does, and reports the process CPU time
(``time.process_time``: every thread, the store's too) per call:

* ``big``: PushBatch calls of one job made from a 10 MiB mail with a base64
  attachment (about 25 MB of JSON), one at a time;
* ``small``: PushBatch calls of ``--jobs`` jobs made from 2 KB mails, one
  at a time;
* ``peek`` (SQLite store only): Peek calls whose reply holds one big job,
  the way back (the service sends, the client reads).

``--null-store`` answers PushBatch without SQLite (the store's push_batch
does nothing), which leaves the cost of the WebSocket and JSON-RPC layers.
This is a benchmark, not a mode of the product; compare figures taken on
the same machine under the same load.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from trismtp.jobs.email import EmailJob, new_job_id
from trismtp.jobs.rpc import JobsClient
from trismtp.jobs.sinks import RpcSink
from trismtp.message import Envelope
from trismtp.service.server import serve_jobs
from trismtp.service.store import JobStore
from trismtp.settings import HostPort, JobsServiceSettings, JobsSettings

__all__ = ["main"]

_ENVELOPE = Envelope("client.example", "a@example.com", ("b@example.com",), "127.0.0.1:1")


def _mail(size: int) -> bytes:
    """A mail of about *size* bytes: a short text part and a base64 attachment."""
    head = (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: bench\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
        b"--BB\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
    )
    if size <= 4096:
        return head + b"x" * max(size - len(head) - 8, 0) + b"\r\n--BB--\r\n"
    blob = os.urandom((size - len(head)) * 3 // 4 - 1024)
    b64 = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    attachment = (
        b"--BB\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=a.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    return head + attachment + b64 + b"--BB--\r\n"


def _encoded_job(raw: bytes) -> tuple[str, str]:
    job = EmailJob(raw, _ENVELOPE, received_at=datetime.datetime.now(datetime.UTC))
    encoded = orjson.dumps(job.to_job(JobsSettings(pipeline="smtp"), include_raw=True).to_dict())
    return job.id, encoded.decode()


async def _null_push_batch(self: JobStore, jobs: Sequence[Any], **kwargs: Any) -> None:
    await trio.lowlevel.checkpoint()


async def _run(args: argparse.Namespace, database: Path) -> dict[str, float]:
    if args.null_store:
        JobStore.push_batch = _null_push_batch  # type: ignore[method-assign]
    settings = JobsServiceSettings(listen="127.0.0.1:0", database=database, pipelines=["smtp"])
    big_raw = _mail(10 * 1024 * 1024)
    small_raw = _mail(2048)
    figures: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        address: HostPort = await nursery.start(serve_jobs, settings)
        async with JobsClient.connect(f"ws://{address}/rpc") as client:
            sink = RpcSink(client)
            # Warm up: imports, pydantic's first validations, the store's thread.
            for _ in range(3):
                await sink.push_batch([_encoded_job(small_raw)], None)
            if args.big:
                # One mail built and parsed once; each job has its own id.
                job_id, text = _encoded_job(big_raw)
                jobs = []
                for _ in range(args.big):
                    fresh = new_job_id()
                    jobs.append((fresh, text.replace(job_id, fresh)))
                figures["big_bytes"] = len(jobs[0][1])
                start = time.process_time()
                for one in jobs:
                    await sink.push_batch([one], None)
                figures["big_cpu_ms"] = (time.process_time() - start) * 1000 / args.big
                del jobs
            if args.peek and not args.null_store:
                # Replies the other way: the service sends, the client reads.
                peek = {"pipeline": "smtp", "max": 4, "max_bytes": 64 * 1024 * 1024}
                start = time.process_time()
                for _ in range(args.peek):
                    await client.call("jobs.Peek", peek)
                figures["peek_cpu_ms"] = (time.process_time() - start) * 1000 / args.peek
            if args.small:
                batches = [
                    [_encoded_job(small_raw) for _ in range(args.jobs)] for _ in range(args.small)
                ]
                figures["small_bytes"] = len(batches[0][0][1])
                start = time.process_time()
                for batch in batches:
                    await sink.push_batch(batch, None)
                figures["small_cpu_us"] = (time.process_time() - start) * 1e6 / args.small
        nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=4, help="PushBatch calls of one big job")
    parser.add_argument("--small", type=int, default=1000, help="PushBatch calls of small jobs")
    parser.add_argument("--jobs", type=int, default=5, help="jobs per small PushBatch")
    parser.add_argument(
        "--peek", type=int, default=0, help="then Peek calls whose reply holds a big job"
    )
    parser.add_argument("--null-store", action="store_true", help="answer without SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wspath-") as tmp:
        figures = trio.run(_run, args, Path(tmp) / "jobs.sqlite3")
    store = "null store" if args.null_store else "SQLite store"
    if "big_cpu_ms" in figures:
        print(
            f"big:   {figures['big_cpu_ms']:.1f} ms CPU per PushBatch of one "
            f"{figures['big_bytes'] / 1e6:.1f} MB job ({store})"
        )
    if "peek_cpu_ms" in figures:
        print(f"peek:  {figures['peek_cpu_ms']:.1f} ms CPU per Peek answered with a big job")
    if "small_cpu_us" in figures:
        print(
            f"small: {figures['small_cpu_us']:.0f} us CPU per PushBatch of {args.jobs} "
            f"{figures['small_bytes']} B jobs ({store})"
        )


if __name__ == "__main__":
    main()
