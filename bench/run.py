"""``make bench``: trismtp against aiosmtpd (null handler) and Postfix's smtp-sink.

Optionally (``--servers …,trismtp-nats``) also trismtp publishing to a NATS
JetStream server that the harness starts per run.

Runs, in order (see bench/README.md for the method and caveats):

1. throughput: every load of :func:`bench.loads.standard_loads` against every
   server, each run on a freshly started server (trismtp: a fresh database,
   whose job count must equal the messages sent);
2. latency: trismtp at half its peak rate, open loop (:mod:`bench.latency`);
3. idle: N idle connections to trismtp (:mod:`bench.idle`), RSS per
   connection, and the throughput of a load alongside them;
4. mix: the production-like mix of issue 16 (:mod:`bench.mix`) at fixed
   rates, open loop, with a consumer draining the jobs service meanwhile.

trismtp (and trismtp-nats) run with ``smtp.workers = --trismtp-workers``
(default ``"auto"``); every CPU time and RSS figure of a server sums its
process and its children (:class:`bench.procs.ProcessTree`).

Results go to bench/results/: results.json (raw), results.md, throughput.png,
latency.png, latency-samples.raw. Scale down with ``BENCH_MESSAGES=2000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loads import Load, run_smtp_source, standard_loads
from bench.mix import DRAIN_GRACE as MIX_DRAIN_GRACE
from bench.procs import Children, find_tool, raise_nofile, read_line, wait_sampling
from bench.report import write_report
from bench.servers import (
    REPO,
    SERVERS,
    STORING_SERVERS,
    RunningServer,
    Workers,
    count_jobs,
    count_stream,
    expected_workers,
    parse_workers,
    start_server,
)

__all__ = ["Options", "main"]

RESULTS = REPO / "bench" / "results"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass(frozen=True)
class Options:
    """What to run; from the command line, with BENCH_* environment defaults."""

    messages: int
    sessions: int
    concurrent: int
    repeat: int
    servers: tuple[str, ...]
    loads: tuple[str, ...]
    latency_seconds: float
    latency_connections: int
    latency_rate: float | None
    idle: int
    big_messages: int
    mix_rates: tuple[float, ...]
    mix_seconds: float
    load_timeout: float
    results: Path
    workdir: Path | None
    keep_work: bool
    trismtp_workers: Workers = "auto"
    """``smtp.workers`` of every trismtp the harness starts."""
    trismtp_workers_expected: int = 1
    """What trismtp resolves that to here (``"auto"``: one per CPU, as the budget feeds)."""


def parse_args(argv: list[str] | None) -> Options:
    """The command line; every BENCH_* variable is only a default."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--messages",
        type=int,
        default=_env_int("BENCH_MESSAGES", 20000),
        help="messages per load (env BENCH_MESSAGES; default 20000)",
    )
    p.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    p.add_argument(
        "--concurrent",
        type=int,
        default=_env_int("BENCH_CONCURRENT", 1000),
        help="sessions of the many-connections load (default 1000)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=_env_int("BENCH_REPEAT", 1),
        help="runs per server and load; the median is reported (default 1)",
    )
    p.add_argument(
        "--servers",
        default="trismtp,aiosmtpd,aiosmtpd-sqlite,smtp-sink",
        help="comma-separated, of " + ", ".join(SERVERS) + " (default: all but trismtp-nats)",
    )
    p.add_argument(
        "--loads",
        default="kept-2k,new-2k,kept-100k,new-100k,conc-2k,kept-10m",
        help="comma-separated (default: all six)",
    )
    p.add_argument(
        "--big-messages",
        type=int,
        default=_env_int("BENCH_BIG_MESSAGES", 40),
        help="messages of the 10 MiB load, over 4 sessions (env BENCH_BIG_MESSAGES; default 40)",
    )
    p.add_argument(
        "--mix-rates",
        default=os.environ.get("BENCH_MIX_RATES", "100,150"),
        help="msg/s of the production-like mix, one trismtp run each; empty skips it "
        "(env BENCH_MIX_RATES; default 100,150)",
    )
    p.add_argument(
        "--mix-seconds",
        type=float,
        default=float(_env_int("BENCH_MIX_SECONDS", 60)),
        help="how long each mix run offers messages (env BENCH_MIX_SECONDS; default 60; "
        "the issue's soak: 600)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=float(_env_int("BENCH_LATENCY_SECONDS", 20)),
        help="length of the open-loop run; 0 skips it (default 20)",
    )
    p.add_argument("--latency-connections", type=int, default=20, help="(default 20)")
    p.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="msg/s of the open-loop run (default: half trismtp's kept-2k rate)",
    )
    p.add_argument(
        "--idle",
        type=int,
        default=_env_int("BENCH_IDLE", 10000),
        help="idle connections; 0 skips that phase (env BENCH_IDLE; default 10000)",
    )
    p.add_argument(
        "--load-timeout",
        type=float,
        default=900.0,
        help="seconds one smtp-source run may take before it is stopped",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="(default bench/results)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the servers' databases go (default: a temp dir)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep logs and databases")
    p.add_argument(
        "--trismtp-workers",
        default=os.environ.get("BENCH_TRISMTP_WORKERS", "").strip() or "auto",
        help='smtp.workers of trismtp and trismtp-nats: a number or "auto" '
        "(env BENCH_TRISMTP_WORKERS; default auto)",
    )
    a = p.parse_args(argv)
    try:
        workers = parse_workers(a.trismtp_workers)
        workers_expected = expected_workers(workers)
    except ValueError as exc:
        p.error(f"--trismtp-workers: {exc}")
    if a.messages <= 0 or a.repeat <= 0 or a.sessions <= 0 or a.concurrent <= 0:
        p.error("--messages, --repeat, --sessions and --concurrent must be positive")
    if a.big_messages <= 0:
        p.error("--big-messages must be positive")
    try:
        mix_rates = tuple(float(r) for r in a.mix_rates.split(",") if r.strip())
    except ValueError:
        p.error(f"--mix-rates: not a list of numbers: {a.mix_rates!r}")
    if any(r <= 0 for r in mix_rates) or a.mix_seconds <= 0:
        p.error("--mix-rates and --mix-seconds must be positive")
    servers = tuple(dict.fromkeys(s for s in a.servers.split(",") if s))
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        p.error(f"--servers: unknown {unknown}; choose from {', '.join(SERVERS)}")
    return Options(
        messages=a.messages,
        sessions=a.sessions,
        concurrent=a.concurrent,
        repeat=a.repeat,
        servers=servers,
        loads=tuple(s for s in a.loads.split(",") if s),
        latency_seconds=a.latency_seconds,
        latency_connections=a.latency_connections,
        latency_rate=a.latency_rate,
        idle=a.idle,
        big_messages=a.big_messages,
        mix_rates=mix_rates,
        mix_seconds=a.mix_seconds,
        load_timeout=a.load_timeout,
        results=a.results,
        workdir=a.workdir,
        keep_work=a.keep_work,
        trismtp_workers=workers,
        trismtp_workers_expected=workers_expected,
    )


@dataclass
class Context:
    """Shared by the phases: options, tools, the process registry, a work directory."""

    options: Options
    smtp_source: str
    smtp_sink: str
    children: Children
    workroot: Path
    nats_server: str | None = None
    runs: int = 0
    last_cpu_seconds: float | None = None
    """CPU time of the server that :meth:`finish` stopped last."""
    last_helpers: tuple[float | None, int | None] = (None, None)
    """CPU seconds and peak RSS (KiB) of that server's helpers (nats-server), if any."""
    last_tree: dict[str, Any] = field(default_factory=dict)
    """How that server's figures were summed over its processes (:meth:`finish`)."""
    workers_seen: set[int] = field(default_factory=set)
    """How many SMTP processes each trismtp that started ran (one value, normally)."""

    def rundir(self, name: str) -> Path:
        """A fresh directory for one server run."""
        self.runs += 1
        path = self.workroot / f"{self.runs:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def start(self, name: str, rundir: Path, max_connections: int = 1000) -> RunningServer:
        """Start server *name*; trismtp with ``--trismtp-workers``."""
        server = start_server(
            name,
            self.children,
            rundir,
            smtp_sink=self.smtp_sink,
            nats_server=self.nats_server,
            max_connections=max_connections,
            trismtp_workers=self.options.trismtp_workers,
        )
        if server.workers is not None:
            self.workers_seen.add(server.workers)
        return server

    def connections_limit(self, connections: int) -> int:
        """``smtp.max_connections`` for a load of *connections* at once.

        Each of trismtp's N workers takes max_connections / N, and the kernel
        spreads connections over them by a hash, not evenly: with more than
        one worker the harness leaves twice the room, so that no worker
        refuses a connection of the load (1000 at once: ~500 ± 16 a worker
        of 2, against a share of 1050).
        """
        if self.options.trismtp_workers_expected > 1:
            return max(1000, 2 * connections + 100)
        return max(1000, connections + 100)

    def finish(self, server: RunningServer, rundir: Path) -> tuple[int | None, int | None]:
        """Peak RSS (read before the stop), stop by PID, count what it stored; free the disk.

        trismtp-nats: the stream is counted after trismtp stopped and before its
        nats-server is stopped (by PID, like every child).
        """
        peak = server.peak_rss_kib()
        self.last_cpu_seconds = server.cpu_seconds()
        self.last_helpers = (server.helpers_cpu_seconds(), server.helpers_peak_rss_kib())
        tree = server.tree
        self.last_tree = {
            "workers": server.workers,
            "processes": len(tree.last),
            "processes_seen": tree.processes_seen,
            "samples": tree.samples,
            "peak_rss_hwm_sum_kib": tree.hwm_sum_kib(),
            "notes": [],
            "problems": [],
        }
        if tree.processes_seen > len(tree.last):
            self.last_tree["notes"].append(
                f"{tree.processes_seen - len(tree.last)} of {server.name}'s processes exited "
                "during the run (a worker restarted?): their CPU time counts through their "
                "parent's cutime/cstime once it reaped them; their RSS no longer counts"
            )
        try:
            code = self.children.stop(server.child)
            jobs = None
            if server.database:
                jobs = count_jobs(server.database)
            elif server.nats_url and server.config:
                jobs = count_stream(server.config, server.nats_url)
        finally:
            for helper in server.helpers:
                self.children.stop(helper)
        if server.child.leftovers:
            self.last_tree["problems"].append(
                f"processes {server.child.leftovers} of {server.name} still ran after it "
                "exited, and were stopped by PID"
            )
        log = server.child.log_tail(5)
        if server.name in STORING_SERVERS and (code != 0 or log):
            print(f"  note: {server.name} exited {code}; its log ends:\n{log}", file=sys.stderr)
        if not self.options.keep_work:
            shutil.rmtree(rundir, ignore_errors=True)
        return peak, jobs


@dataclass
class ThroughputRun:
    """One smtp-source run against one freshly started server."""

    server: str
    load: str
    repeat: int
    messages: int
    seconds: float
    rate: float
    valid: bool
    problems: list[str] = field(default_factory=list)
    peak_rss_kib: int | None = None
    jobs_stored: int | None = None
    server_cpu_seconds: float | None = None
    """CPU time of the server process from its first greeting to its stop."""
    broker_cpu_seconds: float | None = None
    """trismtp-nats: nats-server's CPU time over the same span."""
    broker_peak_rss_kib: int | None = None
    """trismtp-nats: nats-server's peak RSS (VmHWM)."""
    workers: int | None = None
    """trismtp: its SMTP processes (primary and secondaries) in this run."""
    peak_rss_hwm_sum_kib: int | None = None
    """The sum of each of the server's processes' own peak (VmHWM): an upper bound."""
    notes: list[str] = field(default_factory=list)


def throughput_run(ctx: Context, server_name: str, load: Load, repeat: int) -> ThroughputRun:
    """Start *server_name*, run *load*, stop it; check the count trismtp stored."""
    rundir = ctx.rundir(f"{server_name}-{load.key}")
    messages = load.messages or ctx.options.messages
    try:
        server = ctx.start(server_name, rundir, ctx.connections_limit(load.sessions))
    except RuntimeError as exc:
        return ThroughputRun(server_name, load.key, repeat, messages, 0.0, 0.0, False, [str(exc)])
    try:
        run = run_smtp_source(
            ctx.children, ctx.smtp_source, load, server.port, messages,
            workdir=rundir, name=f"source-{rundir.name}", timeout=ctx.options.load_timeout,
            server=server.tree,
        )  # fmt: skip
    finally:
        peak, jobs = ctx.finish(server, rundir)
    problems = [p for p in [run.problem()] if p] + ctx.last_tree["problems"]
    what = "stream messages" if server_name == "trismtp-nats" else "stored jobs"
    if server_name in STORING_SERVERS and jobs != messages:
        problems.append(f"{what} {jobs} != messages sent {messages}")
    if server_name not in STORING_SERVERS:
        peak = None
    cpu = ctx.last_cpu_seconds
    broker_cpu, broker_rss = ctx.last_helpers
    tree = ctx.last_tree
    return ThroughputRun(
        server_name, load.key, repeat, messages, round(run.seconds, 3), round(run.rate, 1),
        not problems, problems, peak, jobs, round(cpu, 2) if cpu is not None else None,
        round(broker_cpu, 2) if broker_cpu is not None else None, broker_rss,
        tree["workers"], tree["peak_rss_hwm_sum_kib"] if peak is not None else None,
        tree["notes"],
    )  # fmt: skip


def throughput_phase(ctx: Context, loads: list[Load]) -> list[ThroughputRun]:
    """Every load × repeat × server; servers interleave so drift hits them alike."""
    runs = []
    for load in loads:
        for repeat in range(1, ctx.options.repeat + 1):
            for server in ctx.options.servers:
                run = throughput_run(ctx, server, load, repeat)
                runs.append(run)
                mark = "ok" if run.valid else "INVALID: " + "; ".join(run.problems)
                extra = f", peak RSS {run.peak_rss_kib / 1024:.0f} MiB" if run.peak_rss_kib else ""
                if run.server_cpu_seconds is not None:
                    extra += f", server CPU {run.server_cpu_seconds:.1f} s"
                if run.broker_cpu_seconds is not None:
                    extra += f", nats-server CPU {run.broker_cpu_seconds:.1f} s"
                if run.workers is not None:
                    extra += f", {run.workers} worker{'s' if run.workers > 1 else ''}"
                mark += "".join(f"; note: {n}" for n in run.notes)
                mbs = f" = {run.rate * load.size / 1e6:.1f} MB/s" if load.size >= 1e6 else ""
                print(
                    f"  {server:15} {load.key:9} #{repeat}: {run.messages} msgs in "
                    f"{run.seconds:.2f} s = {run.rate:,.1f} msg/s{mbs}{extra} [{mark}]",
                    flush=True,
                )
    return runs


def peak_rate(runs: list[ThroughputRun]) -> tuple[float, str] | None:
    """trismtp's reference peak: its median kept-2k rate, else its best valid 2 KB rate."""
    kept = [r.rate for r in runs if r.server == "trismtp" and r.load == "kept-2k" and r.valid]
    if kept:
        return statistics.median(kept), "kept-2k"
    other = [r for r in runs if r.server == "trismtp" and r.load.endswith("-2k") and r.valid]
    if other:
        best = max(other, key=lambda r: r.rate)
        return best.rate, best.load
    return None


def latency_phase(ctx: Context, runs: list[ThroughputRun]) -> dict[str, Any]:
    """trismtp at half its peak rate, open loop: the final dot → 250 distribution."""
    opts = ctx.options
    peak = peak_rate(runs)
    if opts.latency_rate:
        rate, peak_value, peak_from = opts.latency_rate, 2 * opts.latency_rate, "--latency-rate"
    elif peak is None:
        return {"valid": False, "problems": ["no valid trismtp 2 KB throughput to halve"]}
    else:
        peak_value, peak_from = peak
        rate = peak_value / 2
    count = max(100, round(rate * opts.latency_seconds))
    rundir = ctx.rundir("trismtp-latency")
    out = rundir / "latency.json"
    raw = opts.results / "latency-samples.raw"
    raw.unlink(missing_ok=True)
    server = ctx.start("trismtp", rundir)
    problems: list[str] = []
    result: dict[str, Any] | None = None
    try:
        child = ctx.children.spawn(
            "latency",
            [sys.executable, "-m", "bench.latency", "--port", str(server.port),
             "--rate", f"{rate:.3f}", "--count", str(count),
             "--connections", str(opts.latency_connections), "--size", "2048",
             "--out", str(out), "--raw", str(raw)],
            cwd=REPO,
        )  # fmt: skip
        try:
            code: int | None = wait_sampling(child.popen, count / rate + 120, server.tree)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            problems.append("latency generator timed out")
        elif out.exists():
            result = json.loads(out.read_text(encoding="utf-8"))
        else:
            problems.append(f"latency generator exit {code}: {child.log_tail(3)}")
    finally:
        peak_rss, jobs = ctx.finish(server, rundir)
    problems += ctx.last_tree["problems"]
    if result is not None:
        if result["ok"] != count:
            problems.append(f"{result['ok']} of {count} messages got 250 ({result['codes']})")
        if result["errors"]:
            problems.append(f"client errors: {result['errors']}")
        if jobs != result["ok"]:
            problems.append(f"stored jobs {jobs} != 250s received {result['ok']}")
    return {
        "valid": result is not None and not problems,
        "problems": problems,
        "peak_rate": peak_value,
        "peak_from": peak_from,
        "result": result,
        "jobs_stored": jobs,
        "peak_rss_kib": peak_rss,
        "peak_rss_hwm_sum_kib": ctx.last_tree["peak_rss_hwm_sum_kib"],
        "workers": server.workers,
        "server_cpu_seconds": _round(ctx.last_cpu_seconds),
        "notes": ctx.last_tree["notes"],
    }


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def idle_phase(ctx: Context, runs: list[ThroughputRun]) -> dict[str, Any]:
    """N idle connections to trismtp: RSS per connection, and a load alongside."""
    opts = ctx.options
    n = opts.idle
    rundir = ctx.rundir("trismtp-idle")
    server = ctx.start("trismtp", rundir, max_connections=max(20000, 2 * n))
    info: dict[str, Any] = {"connections": n, "problems": [], "valid": False}
    info["workers"] = server.workers
    loads = standard_loads(opts.sessions, opts.concurrent, opts.big_messages)
    kept = next(ld for ld in loads if ld.key == "kept-2k")
    warmup = min(500, opts.messages)
    problems: list[str] = info["problems"]
    try:
        run = run_smtp_source(
            ctx.children, ctx.smtp_source, kept, server.port, warmup,
            workdir=rundir, name="source-idle-warmup", timeout=opts.load_timeout,
            server=server.tree,
        )  # fmt: skip
        if run.problem():
            problems.append(f"warm-up: {run.problem()}")
        time.sleep(0.5)
        info["rss_before_kib"] = server.rss_kib()
        _hold_idle_and_load(ctx, server, rundir, kept, info, server.tree.last)
    finally:
        peak, jobs = ctx.finish(server, rundir)
    problems += ctx.last_tree["problems"]
    info["notes"] = ctx.last_tree["notes"]
    info["peak_rss_kib"] = peak
    info["peak_rss_hwm_sum_kib"] = ctx.last_tree["peak_rss_hwm_sum_kib"]
    info["jobs_stored"] = jobs
    info["jobs_expected"] = warmup + opts.messages
    if jobs != info["jobs_expected"]:
        problems.append(f"stored jobs {jobs} != messages sent {info['jobs_expected']}")
    baseline = [r.rate for r in runs if r.server == "trismtp" and r.load == "kept-2k" and r.valid]
    info["baseline_rate"] = statistics.median(baseline) if baseline else None
    info["valid"] = not problems and info.get("rss_per_connection_kib") is not None
    return info


def _hold_idle_and_load(
    ctx: Context,
    server: RunningServer,
    rundir: Path,
    kept: Load,
    info: dict[str, Any],
    before: tuple[tuple[int, int], ...],
) -> None:
    """Open the idle connections, measure RSS, run the load, release them.

    *before*: the server's processes when ``rss_before_kib`` was read.
    """
    opts, problems = ctx.options, info["problems"]
    client = ctx.children.spawn(
        "idle-client",
        [sys.executable, "-m", "bench.idle", "--port", str(server.port),
         "--connections", str(opts.idle), "--hold-max", str(opts.load_timeout + 600)],
        cwd=REPO, pipe_stdio=True,
    )  # fmt: skip
    try:
        assert client.popen.stdout is not None
        assert client.popen.stdin is not None
        ready = _json_line(read_line(client.popen.stdout, 300.0))
        if ready.get("event") != "ready":
            problems.append(f"idle client not ready: {ready or client.log_tail(3)}")
            return
        info |= {"opened": ready["opened"], "open_seconds": ready["seconds"]}
        if ready["opened"] < opts.idle:
            problems.append(f"only {ready['opened']} of {opts.idle} opened: {ready['failures']}")
        time.sleep(2.0)  # let the server settle after the burst of accepts
        info["rss_idle_kib"] = server.rss_kib()
        if server.tree.last != before:
            # A worker restarted in between: the two sums are of different processes.
            problems.append(
                f"trismtp's processes changed between the two RSS readings: "
                f"{[pid for pid, _ in before]} → {[pid for pid, _ in server.tree.last]}"
            )
        elif info["rss_idle_kib"] is not None and info["rss_before_kib"] is not None:
            grown = info["rss_idle_kib"] - info["rss_before_kib"]
            info["rss_per_connection_kib"] = round(grown / max(ready["opened"], 1), 2)
        run = run_smtp_source(
            ctx.children, ctx.smtp_source, kept, server.port, opts.messages,
            workdir=rundir, name="source-idle-load", timeout=opts.load_timeout,
            server=server.tree,
        )  # fmt: skip
        info |= {"load_messages": opts.messages, "load_rate": round(run.rate, 1)}
        if run.problem():
            problems.append(f"load: {run.problem()}")
        client.popen.stdin.write(b"release\n")
        client.popen.stdin.flush()
        done = _json_line(read_line(client.popen.stdout, 60.0))
        info["still_open"] = done.get("still_open")
        if done.get("still_open") != ready["opened"]:
            problems.append(f"server closed idle connections: {done or 'no report'}")
    finally:
        ctx.children.stop(client)


def mix_phase(ctx: Context, rate: float) -> dict[str, Any]:
    """The production-like mix at *rate* msg/s against a fresh trismtp, a consumer draining.

    Valid when the generator got no connection error, every message that got
    250 was delivered to the consumer, none was delivered twice, and no job
    was left in the database after the drain. A server that falls behind the
    rate is cut off ``DRAIN_GRACE`` s after the last message fell due: that is
    a figure (noted, and the sustained-rate target fails), not an invalid run.
    """
    opts = ctx.options
    rundir = ctx.rundir(f"trismtp-mix-{rate:g}")
    sent_json, drained_json = rundir / "send.json", rundir / "drained.json"
    server = ctx.start("trismtp", rundir)
    assert server.rpc_url is not None
    problems: list[str] = []
    send: dict[str, Any] | None = None
    drained: dict[str, Any] | None = None
    try:
        consumer = ctx.children.spawn(
            f"mix-consumer-{rate:g}",
            [sys.executable, "-m", "bench.mix", "consume", "--url", server.rpc_url,
             "--out", str(drained_json)],
            cwd=REPO,
        )  # fmt: skip
        sender = ctx.children.spawn(
            f"mix-send-{rate:g}",
            [sys.executable, "-m", "bench.mix", "send", "--port", str(server.port),
             "--rate", f"{rate:g}", "--seconds", f"{opts.mix_seconds:g}",
             "--out", str(sent_json)],
            cwd=REPO,
        )  # fmt: skip
        try:
            wait_sampling(sender.popen, opts.mix_seconds + MIX_DRAIN_GRACE + 120, server.tree)
        except subprocess.TimeoutExpired:
            problems.append("mix generator timed out")
        ctx.children.stop(sender)
        if consumer.alive:
            consumer.popen.send_signal(signal.SIGUSR1)  # drain, then stop when idle
            try:
                wait_sampling(consumer.popen, 600, server.tree)
            except subprocess.TimeoutExpired:
                problems.append("consumer did not finish draining in 600 s")
        ctx.children.stop(consumer)
        if sent_json.exists():
            send = json.loads(sent_json.read_text(encoding="utf-8"))
        else:
            problems.append(f"mix generator wrote no result: {sender.log_tail(3)}")
        if drained_json.exists():
            drained = json.loads(drained_json.read_text(encoding="utf-8"))
        else:
            problems.append(f"consumer wrote no result: {consumer.log_tail(3)}")
    finally:
        peak, left = ctx.finish(server, rundir)
    problems += ctx.last_tree["problems"]
    info: dict[str, Any] = {
        "rate": rate,
        "seconds": opts.mix_seconds,
        "problems": problems,
        "peak_rss_kib": peak,
        "peak_rss_hwm_sum_kib": ctx.last_tree["peak_rss_hwm_sum_kib"],
        "jobs_left": left,
        "server_cpu_seconds": round(ctx.last_cpu_seconds or 0.0, 2),
        "workers": server.workers,
        "notes": list(ctx.last_tree["notes"]),
    }
    if send is not None and drained is not None:
        ok = set(send.pop("ok_indices"))
        not_ok = set(send.pop("not_ok_indices"))
        delivered = {int(k): v for k, v in drained.pop("delivered").items()}
        info |= {"send": send, "consumer": drained}
        lost = sorted(ok - delivered.keys())
        twice = sorted(i for i, n in delivered.items() if n > 1)
        strangers = sorted(delivered.keys() - ok - not_ok)
        info |= {
            "lost": len(lost),
            "duplicates": len(twice),
            "stored_without_250": len(delivered.keys() & not_ok),
            "delivered": len(delivered),
        }
        if lost:
            problems.append(f"{len(lost)} messages got 250 but were never drained: {lost[:5]}")
        if twice:
            problems.append(f"{len(twice)} messages drained more than once: {twice[:5]}")
        if strangers or drained.get("unknown"):
            problems.append(f"drained jobs never sent: {strangers[:5]} {drained.get('unknown')}")
        if send.get("errors"):
            problems.append(f"generator errors: {send['errors']}")
        if send.get("cut_off"):  # a figure (it fell behind), not a failure of the run
            in_flight = send.get("in_flight_at_cut_off", 0)
            never = send["count"] - send["sent"] - in_flight
            info["notes"] += [
                f"cut off {MIX_DRAIN_GRACE:g} s after the last message fell due: of "
                f"{send['count']}, {never} never sent and {in_flight} sent but unanswered "
                "(the server fell behind the offered rate)"
            ]
    if left != 0:
        problems.append(f"{left} jobs left in the database after the drain")
    info["valid"] = send is not None and drained is not None and not problems
    return info


def _mix_line(mix: dict[str, Any]) -> str:
    send = mix.get("send") or {}
    small = (send.get("by_kind") or {}).get("small", {}).get("dot_to_reply_ms", {})
    mark = "ok" if mix["valid"] else "INVALID: " + "; ".join(mix["problems"])
    return (
        f"{send.get('ok')}/{send.get('count')} got 250 at {send.get('achieved_rate')} msg/s "
        f"({send.get('mb_per_s')} MB/s), codes {send.get('codes')}, small dot→250 p50 "
        f"{small.get('p50')} ms p99 {small.get('p99')} ms, lost {mix.get('lost')}, "
        f"duplicates {mix.get('duplicates')}, generator CPU {send.get('generator_cpu_pct')} %, "
        f"server CPU {mix['server_cpu_seconds']} s [{mark}]"
    )


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="ascii").split()[:3])
    except OSError:
        return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nats_version(binary: str) -> str:
    """``nats-server --version`` (``nats-server: v2.9.10``) → ``v2.9.10``."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().rpartition(" ")[2] or "?"


def _meta(opts: Options, loads: list[Load], nats_server: str | None) -> dict[str, Any]:
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_before": _loadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trismtp_version": _version("trismtp"),
        "aiosmtpd_version": _version("aiosmtpd"),
        "messages": opts.messages,
        "sessions": opts.sessions,
        "concurrent": opts.concurrent,
        "repeat": opts.repeat,
        "idle_connections": opts.idle,
        "big_messages": opts.big_messages,
        "mix_rates": list(opts.mix_rates),
        "mix_seconds": opts.mix_seconds,
        "servers": list(opts.servers),
        "loads": [load.key for load in loads],
        "trismtp_workers": opts.trismtp_workers,
        "trismtp_workers_expected": opts.trismtp_workers_expected,
    }
    if nats_server is not None and "trismtp-nats" in opts.servers:
        meta["nats_server_version"] = _nats_version(nats_server)
    return meta


def _tools() -> tuple[str, str]:
    source, sink = find_tool("smtp-source"), find_tool("smtp-sink")
    if source is None or sink is None:
        sys.exit(
            "bench: Postfix's smtp-source and smtp-sink are needed (/usr/sbin): "
            "apt-get install postfix (see .ci/run for an install that starts no mail server)"
        )
    return source, sink


def _nats_tool(opts: Options) -> tuple[Options, str | None]:
    """nats-server's path if trismtp-nats is asked for; without it, skip that server."""
    if "trismtp-nats" not in opts.servers:
        return opts, None
    nats = find_tool("nats-server")
    if nats is not None:
        return opts, nats
    print(
        "bench: nats-server not found (PATH, /usr/sbin): skipping the trismtp-nats server "
        "(install it with: apt-get install nats-server)",
        file=sys.stderr,
    )
    servers = tuple(s for s in opts.servers if s != "trismtp-nats")
    if not servers:
        sys.exit("bench: no server left to run")
    return dataclasses.replace(opts, servers=servers), None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every child is still stopped by its PID."""
    del frame
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run every phase, write bench/results/, print the table."""
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    smtp_source, smtp_sink = _tools()
    opts, nats_server = _nats_tool(opts)
    limit = raise_nofile()
    if limit < max(opts.concurrent, opts.idle) + 1024:
        print(f"bench: warning: RLIMIT_NOFILE is only {limit}", file=sys.stderr)
    every = standard_loads(opts.sessions, opts.concurrent, opts.big_messages)
    loads = [ld for ld in every if ld.key in opts.loads]
    opts.results.mkdir(parents=True, exist_ok=True)
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
    workroot = Path(tempfile.mkdtemp(prefix="trismtp-bench-", dir=opts.workdir))
    meta = _meta(opts, loads, nats_server)
    results: dict[str, Any] = {"meta": meta, "loads": [asdict(ld) for ld in loads]}
    try:
        with Children(logdir=workroot) as children:
            ctx = Context(opts, smtp_source, smtp_sink, children, workroot, nats_server)
            print(f"throughput: {opts.messages} messages a load, work dir {workroot}", flush=True)
            runs = throughput_phase(ctx, loads)
            results["throughput"] = [asdict(r) for r in runs]
            if opts.latency_seconds > 0 and "trismtp" in opts.servers:
                print("latency: trismtp at half its peak rate, open loop", flush=True)
                results["latency"] = latency_phase(ctx, runs)
            if opts.idle > 0 and "trismtp" in opts.servers:
                print(f"idle: {opts.idle} idle connections to trismtp", flush=True)
                results["idle"] = idle_phase(ctx, runs)
            if opts.mix_rates and "trismtp" in opts.servers:
                results["mix"] = []
                for rate in opts.mix_rates:
                    print(f"mix: trismtp at {rate:g} msg/s for {opts.mix_seconds:g} s", flush=True)
                    mix = mix_phase(ctx, rate)
                    results["mix"].append(mix)
                    print(f"  {_mix_line(mix)}", flush=True)
            seen = sorted(ctx.workers_seen)
            # Normally one value; more would mean trismtp resolved "auto" differently.
            meta["trismtp_workers_effective"] = seen[0] if len(seen) == 1 else seen or None
    finally:
        if not opts.keep_work:
            shutil.rmtree(workroot, ignore_errors=True)
    results["meta"]["loadavg_after"] = _loadavg()
    print(write_report(results, opts.results))
    print(f"written: {opts.results}/results.md, results.json, throughput.png, latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
