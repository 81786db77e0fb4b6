"""The jobs store's work for the mix, alone: CPU per MB of job JSON.

``python -m bench.store [--jobs N] [--pragma "cache_size=-2000" ...]``

Pushes *N* jobs with the sizes of :mod:`bench.mix`'s jobs (80 % 5-25 KB,
15 % 0.25-1.3 MB, 5 % 5-13 MB of JSON: a mail is ~2.6x smaller than its
job), and after every second push reserves and acks what is ready, as a
consumer keeping up would; at the end it drains the rest. What it prints is
the process's user and system CPU and the wall time per MB of payload, and
the WAL's size: the store's own cost, without SMTP or WebSocket. Each
``--pragma`` runs on the store's connections after its own settings (to try
another cache size or checkpoint interval).
"""

from __future__ import annotations

import argparse
import random
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import trio

from trismtp.jobs.model import Job, JobOptions
from trismtp.service.store import JobStore

_KB = 1000


def _sizes(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.80:
            out.append(rng.randint(5 * _KB, 25 * _KB))
        elif r < 0.95:
            out.append(rng.randint(250 * _KB, 1300 * _KB))
        else:
            out.append(rng.randint(5000 * _KB, 13000 * _KB))
    return out


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def _run(sizes: list[int], pragmas: list[str], workdir: Path) -> str:
    def on_connect(db: sqlite3.Connection) -> None:
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}").fetchall()

    text = "".join(chr(65 + i % 26) for i in range(64))
    blob = text * (max(sizes) // len(text) + 1)
    path = workdir / "jobs.sqlite3"
    async with JobStore.open(path, on_connect=on_connect) as store:
        await store.declare("smtp")

        async def drain() -> None:
            while got := await store.reserve("smtp", 10, 30.0):
                await store.ack([(r.job.id, r.lease.token) for r in got])

        user0, sys0 = _cpu()
        started = time.perf_counter()
        for i, size in enumerate(sizes):
            job = Job(
                job="smtp.email",
                id=f"bench-{i}",
                payload=blob[:size],
                options=JobOptions(pipeline="smtp"),
            )
            await store.push_batch([job])
            if i % 2:
                await drain()
        await drain()
        user1, sys1 = _cpu()
        wall = time.perf_counter() - started
        wal = path.with_name(path.name + "-wal")  # before closing truncates it
        wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
    mb = sum(sizes) / 1e6
    return (
        f"{len(sizes)} jobs, {mb:.0f} MB of payload, pragmas {pragmas or 'none'}: "
        f"user {(user1 - user0) / mb * 1e3:.1f} + system {(sys1 - sys0) / mb * 1e3:.1f} ms "
        f"of CPU per MB, wall {wall / mb * 1e3:.1f} ms per MB; WAL {wal_mb:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--jobs", type=int, default=300, help="jobs pushed (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pragma", action="append", default=[], help='e.g. "cache_size=-2000"')
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args(argv)
    sizes = _sizes(args.jobs, args.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        print(trio.run(_run, sizes, args.pragma, Path(workdir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
