"""How long the event loop waits for the GIL while a thread parses a big message.

Usage: ``python -m bench.gil [--seconds 4] [--intervals 0.005,0.001]``

The daemon parses messages of 256 KiB or more in a worker thread (Python
code, so it holds the GIL) while the event loop serves every other session.
Each time the loop makes a system call it releases the GIL and must wait up
to ``sys.getswitchinterval()`` to get it back. This measures a ping over a
socket pair on a trio loop, once a millisecond, while a thread parses a 4 MB
base64 attachment in a loop, for each switch interval given. trismtp sets
1 ms (``trismtp.cli.SWITCH_INTERVAL``); Python's default is 5 ms.
"""

from __future__ import annotations

import argparse
import base64
import email
import os
import sys
import threading
import time
from email import policy

import trio


def _message(megabytes: int) -> bytes:
    attachment = base64.encodebytes(os.urandom(megabytes * 750_000)).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--XX\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=a.bin\r\n\r\n" + attachment + b"--XX--\r\n"
    )


def _parse_until(stop: threading.Event, message: bytes) -> None:
    while not stop.is_set():
        email.message_from_bytes(message, policy=policy.default).get_body()


async def _pings(interval: float, seconds: float, message: bytes) -> list[float]:
    sys.setswitchinterval(interval)
    ours, theirs = trio.socket.socketpair()
    stop = threading.Event()
    parser = threading.Thread(target=_parse_until, args=(stop, message))
    parser.start()
    times: list[float] = []

    async def echo() -> None:
        while data := await theirs.recv(16):
            await theirs.send(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                await ours.send(b"x")
                await ours.recv(16)
                times.append(time.perf_counter() - start)
                await trio.sleep(0.001)
            ours.close()
    finally:
        stop.set()
        parser.join()
    return sorted(times)


def main() -> None:
    """Print the ping's round trips per switch interval."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--intervals", default="0.005,0.001,0.0005")
    args = parser.parse_args()
    message = _message(4)
    for interval in (float(item) for item in args.intervals.split(",")):
        times = trio.run(_pings, interval, args.seconds, message)
        print(
            f"switch interval {interval * 1000:.1f} ms: {len(times)} round trips, "
            f"p50 {times[len(times) // 2] * 1e3:.2f} ms, "
            f"p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms, max {times[-1] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
