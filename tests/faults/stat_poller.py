"""Polls ``jobs.Stat`` once a second from a process of its own, on command.

Run as a script by tests/faults/test_store_load.py: a Stat latency measured
from the test process would include that process's own event loop, which is
busy generating SMTP load. Each line on stdin is a number of seconds to poll
for; the answer is one line on stdout, JSON: the latencies (seconds) of each
Stat, and of a call the service answers without its store (an unknown
method, -32601) made right after it: the floor that the machine's load and
the event loops set for any call.
"""

from __future__ import annotations

import contextlib
import json
import sys

import trio

from trismtp.jobs.rpc import JobsClient, RpcError


async def timed(client: JobsClient, method: str) -> float:
    started = trio.current_time()
    with contextlib.suppress(RpcError):  # the unknown method's -32601
        await client.call(method, {})
    return trio.current_time() - started


async def main(url: str) -> None:
    async with JobsClient.connect(url) as client:
        await client.call("jobs.Stat", {})  # connected and warm before the first command
        print("ready", flush=True)
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            end = trio.current_time() + float(line)
            stat: list[float] = []
            floor: list[float] = []
            while trio.current_time() < end:
                started = trio.current_time()
                stat.append(await timed(client, "jobs.Stat"))
                floor.append(await timed(client, "jobs.NoSuchMethod"))
                await trio.sleep_until(started + 1.0)
            print(json.dumps({"stat": stat, "floor": floor}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
