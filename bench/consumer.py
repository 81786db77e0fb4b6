"""How fast the Python consumer library drains a pipeline: jobs/s by backend and concurrency.

    .venv/bin/python -m bench.consumer                  # 2000 jobs, asyncio and trio, 1 and 16
    .venv/bin/python -m bench.consumer --jobs 500 --concurrency 1,4,64

It starts ``trismtp jobs serve`` (its own port and database in a temp dir,
stopped by PID), pushes the email jobs in batches, then times one
``Consumer`` with ``stop_when_idle`` from its start to its return: every job
reserved, handled (its payload decoded into the typed ``Email``) and acked.
Each Reserve, Ack and Extend is a durable transaction in the service, so
the figures depend on the disk's fsync as much as on the library.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio

from bench.procs import HOST, Children, clean_env, free_port, wait_for_port
from bench.servers import trismtp_binary
from trismtp.consumer import Consumer, ReservedJob, RpcClient
from trismtp.jobs.email import EmailJob
from trismtp.message import Envelope
from trismtp.settings import JobsSettings

MESSAGE = b"From: a@example.org\r\nSubject: bench\r\n\r\n" + b"Hello, consumer.\r\n" * 100
ENVELOPE = Envelope("bench.test", "a@example.org", ("b@example.com",), f"{HOST}:1")


async def push(url: str, count: int) -> None:
    async with RpcClient.connect(url) as client:
        for start in range(0, count, 500):
            batch = [
                EmailJob(MESSAGE, ENVELOPE).to_job(JobsSettings(), include_raw=True).to_dict()
                for _ in range(start, min(start + 500, count))
            ]
            await client.call("jobs.PushBatch", {"jobs": batch})


async def drain(url: str, concurrency: int) -> tuple[int, float]:
    async def handle(job: ReservedJob) -> None:
        job.email()

    consumer = Consumer(url, handle, concurrency=concurrency, stop_when_idle=True)
    started = time.perf_counter()
    stats = await consumer.run()
    return stats.acked, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--concurrency", default="1,16")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Children(Path(tmp)) as children:
        port = free_port()
        config = Path(tmp) / "jobs.toml"
        config.write_text(
            f'[jobs_service]\nlisten = "{HOST}:{port}"\ndatabase = "{tmp}/jobs.sqlite3"\n'
            '[log]\nlevel = "warning"\n',
            encoding="utf-8",
        )
        service = children.spawn(
            "jobs-service", [*trismtp_binary(), "jobs", "serve", "--config", str(config)],
            cwd=Path(tmp), env=clean_env(),
        )  # fmt: skip
        wait_for_port(port, service, timeout=30)
        url = f"ws://{HOST}:{port}/rpc"
        print("| backend | concurrency | jobs | seconds | jobs/s |\n|---|---|---|---|---|")
        for backend in options.backends.split(","):
            for concurrency in (int(n) for n in options.concurrency.split(",")):
                anyio.run(push, url, options.jobs, backend=backend)
                acked, seconds = anyio.run(drain, url, concurrency, backend=backend)
                rate = acked / seconds
                print(f"| {backend} | {concurrency} | {acked} | {seconds:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
