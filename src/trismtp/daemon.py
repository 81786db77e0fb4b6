"""The daemon: one nursery that wires the SMTP server, the pusher and the jobs service.

Theory of operation
===================

The parts nest so that each one outlives everything that depends on it::

    service scope   the metrics endpoint (metrics.listen), and the embedded
                    jobs service (jobs.url = "embedded")
      pusher scope    the batching pusher, connected over the loopback WebSocket
        SMTP scope      listeners and one task per session

The metrics endpoint (:mod:`trismtp.health`) starts first and stops last, so
``/readyz`` answers ``503`` while the daemon starts and while it drains.

Startup goes outside in: the jobs service is listening before the pusher
connects, and the pusher runs before the first SMTP connection is accepted.
Shutdown goes inside out. :meth:`Daemon.stop` (SIGTERM or SIGINT) closes the
listeners and gives open sessions ``shutdown.grace`` seconds; when the last
session has ended, the pusher's channel is closed, the pusher delivers every
job still queued and returns, and only then is the jobs service stopped. A
second signal, or :meth:`Daemon.kill`, cancels everything at once: sessions
that were waiting for an ack get no answer, so their clients retry.

SIGHUP reloads the TLS certificate and the AUTH users file (see
:meth:`SmtpServer.reload`); other settings need a restart.

With ``smtp.workers`` > 1 this process (the primary) also starts the other
SMTP worker processes once its own SMTP server listens, and waits for them
to exit before it stops the jobs service; each of them runs this class too,
with ``worker`` set: an SMTP server and a pusher only (:mod:`trismtp.workers`).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio
from prometheus_client import generate_latest

from trismtp import allocator, systemd
from trismtp import log as logs
from trismtp.health import serve_metrics
from trismtp.jobs.lanes import Lanes
from trismtp.metrics import Metrics
from trismtp.service.server import serve_jobs
from trismtp.service.store import JobStore
from trismtp.settings import HostPort, Settings, embedded_url
from trismtp.smtp.server import Listeners, SmtpServer, load_security, open_listeners
from trismtp.workers import WorkerOptions, WorkerPool, read_commands

__all__ = ["Daemon", "Listening"]

KILL_GRACE = 5.0
"""After the grace, how long the secondaries get to flush before they are killed."""

log = logging.getLogger("trismtp.daemon")


@dataclass(frozen=True, slots=True)
class Listening:
    """What the daemon bound, reported once it accepts connections."""

    smtp: list[HostPort]
    jobs_service: HostPort | None
    metrics: HostPort | None = None


class Daemon:
    """``trismtp serve``: see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker: WorkerOptions | None = None,
        config: str | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        """Set in a secondary worker process: what the primary passed it."""
        self._config_path = config  # passed on to the secondaries
        self._workers = settings.smtp.worker_count()
        self._pool: WorkerPool | None = None
        self._others: Sequence[Listeners] = ()  # the secondaries' sockets, kept to restart them
        self.killed = False
        """True when the daemon was stopped at once rather than gracefully."""
        self._scope = trio.CancelScope()
        # Big messages' buffers go back to the system once freed; the heaps keep
        # at most this process's share of the memory budget for the next ones.
        allocator.configure(settings.smtp.memory_budget_bytes() // self._workers)
        # Certificate and users file now, so a broken one is a config error (exit 2).
        self._tls, self._users = load_security(settings.smtp)
        self.metrics = Metrics()
        """The daemon's metrics, in a registry of its own."""
        self._smtp: SmtpServer | None = None
        self._pusher: Lanes | None = None
        self._store: JobStore | None = None  # the embedded jobs service's
        self._stopping = False
        self._signalled = False
        self._grace_end = math.inf

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until stopped; returns after a graceful stop or a kill."""
        if self.worker is not None:
            await self._run_secondary(self.worker, handle_signals=handle_signals)
            return
        settings = self.settings
        with self._scope:
            async with trio.open_nursery() as service_nursery:
                metrics_address = settings.metrics.address()
                if metrics_address is not None:
                    metrics_address = await service_nursery.start(
                        partial(
                            serve_metrics,
                            metrics_address,
                            self.metrics.registry,
                            self.not_ready,
                            others=self._other_metrics,
                        )
                    )
                service_address: HostPort | None = None
                if settings.jobs.url == "embedded":
                    service_address = await service_nursery.start(
                        partial(serve_jobs, settings.jobs_service, on_store=self._watch_store)
                    )
                    url = embedded_url(service_address)
                else:
                    url = settings.jobs.url
                if handle_signals:
                    service_nursery.start_soon(self._watch_signals)
                own, *others = await open_listeners(settings.smtp, self._workers)
                self._others = others
                async with trio.open_nursery() as workers_nursery:
                    await self._serve_smtp(
                        url,
                        own,
                        others,
                        workers_nursery=workers_nursery,
                        reported=(service_address, metrics_address),
                        task_status=task_status,
                    )
                    # The secondaries stop by the same grace, then flush
                    # their pushers to the jobs service, still running here.
                    workers_nursery.cancel_scope.deadline = self._grace_end + KILL_GRACE
                self._close_others()
                log.info("pusher flushed; stopping")
                service_nursery.cancel_scope.cancel()
        log.info("stopped" if not self.killed else "stopped at once")

    async def _serve_smtp(
        self,
        url: str,
        listeners: Listeners,
        others: Sequence[Listeners] = (),
        *,
        workers_nursery: trio.Nursery | None = None,
        reported: tuple[HostPort | None, HostPort | None] = (None, None),
        task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The pusher and the SMTP server: what every worker runs.

        *reported* is the jobs service's and the metrics endpoint's address,
        for the :class:`Listening` reported once SMTP accepts.
        """
        settings = self.settings
        pusher = Lanes(
            settings.jobs,
            url,
            settings.jobs_token(),
            expire_batches=settings.jobs.batch_expiry,
            metrics=self.metrics,
        )
        self._pusher = pusher
        async with trio.open_nursery() as pusher_nursery:
            await pusher_nursery.start(pusher.run)
            try:
                self._smtp = SmtpServer(
                    settings.smtp,
                    settings.jobs,
                    pusher.push,
                    tls=self._tls,
                    users=self._users,
                    metrics=self.metrics,
                    size_limit=lambda: pusher.max_message_size,
                    destination_down=lambda: pusher.outage,
                    share=self._workers,
                )
                async with trio.open_nursery() as smtp_nursery:
                    bound = await smtp_nursery.start(self._smtp.serve, listeners)
                    if workers_nursery is not None and others:
                        await self._start_workers(workers_nursery, url, others)
                    if self._stopping:
                        self._smtp.shutdown(settings.shutdown.grace)
                    elif self.worker is None:
                        listening = ", ".join(map(str, bound))
                        systemd.notify("READY=1", f"STATUS=SMTP listening on {listening}")
                    task_status.started(Listening(bound, *reported))
            finally:
                # Every session has ended: nothing more will be queued,
                # and no session waits for what is left, so a batch
                # still in flight may take no longer than the grace.
                pusher.close()
                pusher_nursery.cancel_scope.deadline = self._grace_end

    async def _start_workers(
        self, nursery: trio.Nursery, url: str, listeners: Sequence[Listeners]
    ) -> None:
        # The primary keeps its copy of every secondary's sockets: a worker
        # started again accepts the connections that queued meanwhile.
        pool = WorkerPool.of(
            [
                WorkerOptions(index, url, *copy.filenos(), self._config_path)
                for index, copy in enumerate(listeners, start=1)
            ]
        )
        self._pool = pool
        log.info("starting SMTP workers 1 to %d (smtp.workers = %d)", len(listeners), self._workers)
        await nursery.start(pool.run)
        if self._stopping:
            pool.stop()

    async def _run_secondary(self, worker: WorkerOptions, *, handle_signals: bool) -> None:
        logs.set_worker(worker.index)
        listeners = Listeners.from_filenos(worker.plain_fds, worker.implicit_fds)
        with self._scope:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(self._watch_signals)
                nursery.start_soon(
                    read_commands,
                    self.stop,
                    self.kill,
                    self.reload,
                    partial(generate_latest, self.metrics.registry),
                )
                await self._serve_smtp(worker.jobs_url, listeners, task_status=_ReportReady())
                nursery.cancel_scope.cancel()
        log.info("stopped" if not self.killed else "stopped at once")

    async def _other_metrics(self) -> list[str]:
        return await self._pool.metrics() if self._pool is not None else []

    def _watch_store(self, store: JobStore) -> None:
        self._store = store
        self.metrics.watch_store(store.free_bytes, lambda: store.unwritable is None)

    def not_ready(self) -> str | None:
        """None when the daemon takes and delivers mail, else why not (``/readyz``)."""
        if self._stopping:
            return "shutting down"
        if self._store is not None and (reason := self._store.unwritable) is not None:
            return reason
        if self._smtp is None or not self._smtp.listening:
            return "SMTP is not listening yet"
        if self._pusher is None:
            return "starting"
        return self._pusher.unavailable

    def stop(self) -> None:
        """Graceful stop: what SIGTERM and SIGINT do."""
        if self._stopping:
            return
        self._stopping = True
        systemd.notify("STOPPING=1", "STATUS=stopping")
        grace = self.settings.shutdown.grace
        self._grace_end = trio.current_time() + grace
        log.info("shutting down (grace %g s); a second signal stops at once", grace)
        if self._smtp is not None:
            self._smtp.shutdown(grace)
        if self._pool is not None:
            self._pool.stop()
        # Each secondary closes its own copy as it stops accepting; with ours
        # closed too, new connections go to no socket that nobody accepts on.
        self._close_others()

    def _close_others(self) -> None:
        for listeners in self._others:
            for listener in listeners.plain + listeners.implicit:
                listener.socket.close()
        self._others = ()

    def kill(self) -> None:
        """Stop at once: what a second signal does."""
        self.killed = True
        if self._pool is not None:
            self._pool.kill()
        self._scope.cancel()

    def reload(self) -> None:
        """What SIGHUP does: reload the certificate and the users file."""
        if self._smtp is not None:
            self._smtp.reload()
        if self._pool is not None:
            self._pool.reload()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading the certificate and users file")
                    self.reload()
                elif not self._signalled and not (self._stopping and self.worker is None):
                    # A secondary may have been told to stop by the primary
                    # already: the first signal it gets is still the first.
                    self._signalled = True
                    log.info("received %s", name)
                    self.stop()
                else:
                    log.warning("received %s again: stopping at once", name)
                    self.kill()


class _ReportReady:
    """A secondary's task status: tells the primary on stdout that it accepts."""

    def started(self, value: Listening | None = None) -> None:
        sys.stdout.buffer.write(b"ready\n")
        sys.stdout.buffer.flush()
