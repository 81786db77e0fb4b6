"""A consumer in a process of its own, for the tests that kill or signal it.

Each job's handler appends ``started <id> <attempt>`` to ``--log``, holds the
job for ``--hold`` seconds (``inf``: until cancelled), then appends
``finished <id>``. At a clean exit the counts go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import anyio

from trismtp.consumer import Consumer, ReservedJob


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    options = parser.parse_args()

    def note(line: str) -> None:
        with options.log.open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    async def handle(job: ReservedJob) -> None:
        note(f"started {job.id} {job.lease.attempt}")
        if math.isinf(options.hold):
            await anyio.sleep_forever()
        await anyio.sleep(options.hold)
        note(f"finished {job.id}")

    consumer = Consumer(
        options.url,
        handle,
        lease=options.lease,
        grace=options.grace,
        concurrency=options.concurrency,
        idle_max=0.2,
    )
    stats = anyio.run(consumer.run_until_signalled, backend=options.backend)
    print(json.dumps({"acked": stats.acked, "returned": stats.returned}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
