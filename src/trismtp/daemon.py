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
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from functools import partial

import trio

from trismtp import allocator, systemd
from trismtp.health import serve_metrics
from trismtp.jobs.pusher import Pusher
from trismtp.metrics import Metrics
from trismtp.service.server import serve_jobs
from trismtp.service.store import JobStore
from trismtp.settings import HostPort, Settings, embedded_url
from trismtp.smtp.server import SmtpServer, load_security

__all__ = ["Daemon", "Listening"]

log = logging.getLogger("trismtp.daemon")


@dataclass(frozen=True, slots=True)
class Listening:
    """What the daemon bound, reported once it accepts connections."""

    smtp: list[HostPort]
    jobs_service: HostPort | None
    metrics: HostPort | None = None


class Daemon:
    """``trismtp serve``: see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.killed = False
        """True when the daemon was stopped at once rather than gracefully."""
        self._scope = trio.CancelScope()
        # Big messages' buffers go back to the system once freed.
        allocator.configure()
        # Certificate and users file now, so a broken one is a config error (exit 2).
        self._tls, self._users = load_security(settings.smtp)
        self.metrics = Metrics()
        """The daemon's metrics, in a registry of its own."""
        self._smtp: SmtpServer | None = None
        self._pusher: Pusher | None = None
        self._store: JobStore | None = None  # the embedded jobs service's
        self._stopping = False
        self._grace_end = math.inf

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until stopped; returns after a graceful stop or a kill."""
        settings = self.settings
        with self._scope:
            async with trio.open_nursery() as service_nursery:
                metrics_address = settings.metrics.address()
                if metrics_address is not None:
                    metrics_address = await service_nursery.start(
                        serve_metrics, metrics_address, self.metrics.registry, self.not_ready
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
                pusher = Pusher(
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
                        )
                        async with trio.open_nursery() as smtp_nursery:
                            bound = await smtp_nursery.start(self._smtp.serve)
                            if self._stopping:
                                self._smtp.shutdown(settings.shutdown.grace)
                            else:
                                listening = ", ".join(map(str, bound))
                                systemd.notify("READY=1", f"STATUS=SMTP listening on {listening}")
                            task_status.started(Listening(bound, service_address, metrics_address))
                    finally:
                        # Every session has ended: nothing more will be queued,
                        # and no session waits for what is left, so a batch
                        # still in flight may take no longer than the grace.
                        pusher.close()
                        pusher_nursery.cancel_scope.deadline = self._grace_end
                log.info("pusher flushed; stopping")
                service_nursery.cancel_scope.cancel()
        log.info("stopped" if not self.killed else "stopped at once")

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

    def kill(self) -> None:
        """Stop at once: what a second signal does."""
        self.killed = True
        self._scope.cancel()

    def reload(self) -> None:
        """What SIGHUP does: reload the certificate and the users file."""
        if self._smtp is not None:
            self._smtp.reload()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading the certificate and users file")
                    self.reload()
                elif not self._stopping:
                    log.info("received %s", name)
                    self.stop()
                else:
                    log.warning("received %s again: stopping at once", name)
                    self.kill()
