"""What one big message costs in memory, stage by stage (docs/guarantees.md, "Memory").

    .venv/bin/python -m bench.memory                 # a 20 MB text message and a
    .venv/bin/python -m bench.memory --size 5000000  # base64 attachment of that size

Each stage runs in this process on the same message, as the daemon runs it:
the SMTP protocol receiving it in 64 KiB reads, the parse and the job's JSON,
the embedded jobs service decoding the PushBatch request, and the SQLite
insert. Before each stage the heap is trimmed and the kernel's high-water mark
of the resident set is reset (``/proc/self/clear_refs``), so the peak printed
is what that stage adds, as a multiple of the message's size; "held" is what
is still resident after it (the stage's output, which the next one needs).
Linux and glibc only.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from trismtp.jobs.email import EmailJob
from trismtp.jobs.model import Job
from trismtp.message import Envelope
from trismtp.service.server import Request, decode_message
from trismtp.service.store import JobStore
from trismtp.settings import JobsSettings
from trismtp.smtp.protocol import NEED_DATA, MessageReceived, ProtocolConfig, ServerConnection
from trismtp.smtp.server import READ_SIZE, _encode_job

T = TypeVar("T")

LINE = b"0123456789 The quick brown fox jumps over the lazy dog; memory bench body.\r\n"
_LIBC = ctypes.CDLL(None)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _stage(name: str, size: int, run: Callable[[], T]) -> T:
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to VmRSS
    before = _status("VmRSS")
    out = run()
    peak, held = _status("VmHWM") - before, _status("VmRSS") - before
    print(f"  {name:<24} peak +{peak / size:5.2f} x   held +{held / size:5.2f} x")
    return out


def _message(size: int, kind: str) -> bytes:
    if kind == "text":
        return b"Subject: bench\r\nMessage-ID: <bench@memory>\r\n\r\n" + LINE * (size // len(LINE))
    data = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"Subject: bench\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b"--XX\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + data + b"--XX--\r\n"
    )


def _receive(message: bytes) -> bytes:
    conn = ServerConnection(ProtocolConfig(max_message_size=len(message) + 1))
    conn.greeting()
    for line in (b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n"):
        conn.receive_data(line)
        event = conn.next_event()
        assert not isinstance(event, type(NEED_DATA) | MessageReceived)
        conn.send(event.reply)  # type: ignore[union-attr]
    for start in range(0, len(message), READ_SIZE):
        conn.receive_data(message[start : start + READ_SIZE])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(b".\r\n")
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    return event.data


def _store(job: Job) -> None:
    async def insert() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with JobStore.open(Path(tmp) / "jobs.sqlite3") as store:
                await store.declare("smtp")
                await store.push_batch([job])

    trio.run(insert)


def measure(size: int, kind: str) -> None:
    """Print each stage's peak for a message of about ``size`` octets."""
    message = _message(size, kind)
    size = len(message)
    print(f"{kind}: {size:,} octets")
    data = _stage("SMTP DATA received", size, partial(_receive, message))
    del message
    email = EmailJob(raw=data, envelope=Envelope("x", "a@b", ("c@d",), "192.0.2.1:25"))
    del data
    _job_id, job_json = _stage(
        "parse + job JSON", size, partial(_encode_job, email, JobsSettings(), True)
    )
    del email
    request = (
        '{"jsonrpc":"2.0","id":1,"method":"jobs.PushBatch","params":{"jobs":[' + job_json + "]}}"
    )
    del job_json
    decoded = _stage("service decodes", size, partial(decode_message, request))
    del request
    assert isinstance(decoded, Request)
    jobs: list[Job] = getattr(decoded.params, "jobs", [])
    job = jobs[0]
    del decoded
    _stage("SQLite insert", size, partial(_store, job))


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20_000_000, help="octets (about)")
    args = parser.parse_args()
    for kind in ("text", "attachment"):
        measure(args.size, kind)


if __name__ == "__main__":
    main()
