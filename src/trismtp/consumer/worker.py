"""The consumer: reserve, handle N jobs at once, ack or nack, never lose one.

Theory of operation
-------------------
:meth:`Consumer.run` runs four kinds of tasks:

* the **link** (:class:`~trismtp.consumer.link.Link`) keeps one connection to
  the jobs service open, and opens a new one when it fails;
* the **reserver** asks ``jobs.Reserve`` for as many jobs as there are free
  handler slots (``concurrency`` minus the jobs in hand): back-pressure, and
  no job waits in our memory while its lease runs. When the pipeline is
  empty it waits before asking again, doubling from ``idle_first`` up to
  ``idle_max``, and starts again at once when it finds jobs;
* one **handler** task per job in hand calls the user's handler, then
  ``jobs.Ack`` when it returns and ``jobs.Nack`` (requeue, ``retry_delay``)
  when it raises;
* beside each handler, a **lease keeper** calls ``jobs.Extend`` every third
  of the lease, so a handler slower than the lease keeps its job.

Ack, Nack and Extend name the delivery's lease token and are sent again on
the next connection if the connection is lost: the tokens live in the
service's database, so they survive our reconnecting and its restarting.
A token that is no longer current (``-32006``: the lease ran out and the job
went to someone else) is logged and counted in ``stats.lease_lost``.

Stopping
--------
:meth:`Consumer.stop` (or a cancellation of :meth:`Consumer.run`, or
SIGTERM with :meth:`Consumer.run_until_signalled`) stops the reserver and
gives the jobs in hand ``grace`` seconds to finish; each is acked as usual.
Then the handlers still running are cancelled and their jobs nacked with
requeue and no delay, so another consumer gets them at once. Jobs reserved
but not yet started are nacked the same way. Only then is the connection
closed. Nothing is dropped: a job is acked, or goes back to the queue, or
(if the service cannot be reached at all while stopping) comes back when
its lease runs out.

The work runs under a shielded cancel scope, so that a cancellation of
:meth:`run` (a FastAPI lifespan ending, a task group cancelled) becomes a
graceful stop instead of abandoning leased jobs; :meth:`abort` cuts the
grace short.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc

from trismtp.consumer.client import DEFAULT_MAX_MESSAGE_SIZE
from trismtp.consumer.link import Link
from trismtp.consumer.model import ReservedJob
from trismtp.jobs.websocket import JobsUnavailable
from trismtp.jsonrpc import LEASE_LOST, STORAGE_UNAVAILABLE, RpcError

__all__ = ["Consumer", "Handler", "Stats", "in_thread"]

logger = logging.getLogger("trismtp.consumer")

Handler = Callable[[ReservedJob], Awaitable[None]]
"""An async function that handles one job; returning acks it, raising nacks it."""

# Seconds that an Ack or Nack still gets once the grace period is over.
SETTLE_TIMEOUT: Final = 5.0
# The most jobs one jobs.Reserve may ask for (docs/rpc.md).
MAX_RESERVE: Final = 1000


@dataclass(slots=True)
class Stats:
    """What a consumer did, counted as it goes."""

    #: Jobs whose handler returned, and that the service then deleted.
    acked: int = 0
    #: Jobs whose handler raised: given back with ``retry_delay``.
    failed: int = 0
    #: Jobs given back unfinished at once because the consumer was stopping.
    returned: int = 0
    #: Acks, Nacks or Extends refused because the lease was no longer ours.
    lease_lost: int = 0
    #: Connections opened to the service (more than 1 after reconnecting).
    connections: int = 0


def in_thread(handler: Callable[[ReservedJob], object]) -> Handler:
    """A :data:`Handler` that runs the blocking *handler* in a worker thread.

    The event loop stays free meanwhile (leases are extended, other jobs go
    on). A thread cannot be cancelled: when the consumer stops, a handler
    still running is waited for, and its job acked if it returns.
    """

    async def run(job: ReservedJob) -> None:
        await anyio.to_thread.run_sync(handler, job)

    run.__name__ = getattr(handler, "__name__", "handler")
    return run


class Consumer:
    """Takes jobs from one pipeline of the jobs service and hands them to *handler*.

    *handler* is an async function of one :class:`~trismtp.consumer.model.ReservedJob`
    (wrap a blocking function with :func:`in_thread`). Run it with
    :meth:`run` under asyncio or trio (it uses anyio). The arguments:

    - ``url``: ``ws://HOST:PORT/rpc`` or ``wss://…``; ``token``: jobs_service.token;
      ``ssl_context`` for ``wss://`` (default: the system's trust store).
    - ``pipeline``: where jobs are taken from.
    - ``concurrency``: how many handlers run at once (and so how many jobs
      are reserved at most).
    - ``lease``: seconds each reservation and each extension lasts. The job
      is extended every ``lease / 3`` s while its handler runs, so a short
      lease only means a dead consumer's jobs come back sooner.
    - ``retry_delay``: seconds before a job whose handler raised is handed out again.
    - ``idle_first``, ``idle_max``: the waits between empty Reserves.
    - ``reconnect_first``, ``reconnect_max``: the waits between connection attempts.
    - ``retry_on_failed_connect``: keep trying when the first connection
      fails; by default run() then raises JobsUnavailable at once (a wrong
      URL is said at once). Once connected, the consumer always reconnects.
    - ``grace``: seconds the jobs in hand get to finish once stopping.
    - ``max_jobs``: stop after taking this many jobs (None: no limit).
    - ``stop_when_idle``: stop when a Reserve finds nothing (a cron run).
    """

    def __init__(
        self,
        url: str,
        handler: Handler,
        *,
        pipeline: str = "smtp",
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        concurrency: int = 1,
        lease: float = 60.0,
        retry_delay: float = 30.0,
        idle_first: float = 0.05,
        idle_max: float = 2.0,
        reconnect_first: float = 0.1,
        reconnect_max: float = 5.0,
        grace: float = 30.0,
        max_jobs: int | None = None,
        stop_when_idle: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
        retry_on_failed_connect: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0 < lease <= 86400:
            raise ValueError("lease must be more than 0 and at most 86400 seconds")
        if not 0 <= retry_delay <= 86400:
            raise ValueError("retry_delay must be between 0 and 86400 seconds")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError("max_jobs must be at least 1 (or None)")
        if inspect.isfunction(handler) and not inspect.iscoroutinefunction(handler):
            raise TypeError(
                f"handler {handler.__name__} is not an async function: wrap it with in_thread()"
            )
        self.pipeline = pipeline
        self._handler = handler
        self._concurrency = concurrency
        self._lease = lease
        self._retry_delay = retry_delay
        self._idle_first = idle_first
        self._idle_max = idle_max
        self._grace = grace
        self._max_jobs = max_jobs
        self._stop_when_idle = stop_when_idle
        self._link = Link(
            url,
            token=token,
            ssl_context=ssl_context,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
            reconnect_first=reconnect_first,
            reconnect_max=reconnect_max,
            retry_on_failed_connect=retry_on_failed_connect,
        )
        self.stats = Stats()
        self._in_hand = 0
        self._taken = 0
        self._slot_freed = anyio.Event()
        self._started = False
        self._stopping = False
        self._aborted = False
        self._wait_scope: anyio.CancelScope | None = None
        self._grace_scope: anyio.CancelScope | None = None

    # -- control -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (or run() was cancelled)."""
        return self._stopping

    def stop(self) -> None:
        """Stop gracefully: reserve no more, let the jobs in hand finish within ``grace``."""
        if not self._stopping:
            logger.info("stopping: no new jobs; %d in hand get %g s", self._in_hand, self._grace)
        self._stopping = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def abort(self) -> None:
        """Stop now: cancel the handlers still running and give their jobs back."""
        self._aborted = True
        self.stop()
        if self._grace_scope is not None:
            self._grace_scope.cancel()

    # -- running -------------------------------------------------------------------

    async def run(self) -> Stats:
        """Consume until stopped; return the counts.

        A cancellation of this call is a graceful stop (see the module doc):
        it returns (raises the cancellation) once the jobs in hand are acked
        or given back. Raises :class:`~trismtp.consumer.websocket.HandshakeRejected`
        if the service refuses the token, and :class:`~trismtp.jsonrpc.RpcError`
        if it refuses the Reserve for good (e.g. ``-32001``: no such pipeline).
        """
        if self._started:
            raise RuntimeError("a Consumer runs once: make a new one to run again")
        self._started = True
        finished = anyio.Event()
        failure: list[BaseException] = []

        async def shielded() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    await self._serve()
                except Exception as exc:
                    failure.append(exc)
                finally:
                    finished.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(shielded)
            try:
                await finished.wait()
            except anyio.get_cancelled_exc_class():
                self.stop()
                raise
        if failure:
            raise _unwrap(failure[0])
        return self.stats

    async def run_until_signalled(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> Stats:
        """:meth:`run`; the first of *signals* stops gracefully, a second aborts.

        Signal handlers can only be set from the main thread.
        """
        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                with anyio.open_signal_receiver(*signals) as received:
                    async for signum in received:
                        if not self._stopping:
                            logger.info(
                                "got %s: stopping after the jobs in hand (again to give"
                                " them back now)",
                                signal.Signals(signum).name,
                            )
                            self.stop()
                        else:
                            logger.warning(
                                "got %s again: giving the jobs in hand back now",
                                signal.Signals(signum).name,
                            )
                            self.abort()

            tasks.start_soon(watch)
            stats = await self.run()
            tasks.cancel_scope.cancel()
        return stats

    async def _serve(self) -> None:
        async with anyio.create_task_group() as link_tasks:
            await link_tasks.start(self._link.maintain)
            try:
                async with anyio.create_task_group() as handlers:
                    try:
                        await self._reserve_loop(handlers)
                        # A natural end (max_jobs, stop_when_idle): the jobs in
                        # hand finish; a stop() from now on cuts it to the grace.
                        while self._in_hand and not self._stopping:
                            await self._interruptible(self._slot_freed.wait())
                    finally:
                        self._stopping = True
                        await self._give_grace()
                        handlers.cancel_scope.cancel()
            finally:
                self.stats.connections = self._link.connections
                link_tasks.cancel_scope.cancel()

    async def _give_grace(self) -> None:
        with anyio.CancelScope() as self._grace_scope:
            if self._aborted:
                self._grace_scope.cancel()
            with anyio.move_on_after(self._grace):
                while self._in_hand:
                    await self._slot_freed.wait()
        if self._in_hand:
            logger.warning("giving back the %d jobs still in hand", self._in_hand)

    async def _reserve_loop(self, handlers: anyio.abc.TaskGroup) -> None:
        idle = self._idle_first
        logger.info("taking jobs from pipeline %s", json.dumps(self.pipeline))
        while not self._stopping:
            free = min(self._concurrency - self._in_hand, MAX_RESERVE)
            if free == 0:
                await self._interruptible(self._slot_freed.wait())
                continue
            if self._max_jobs is not None:
                free = min(free, self._max_jobs - self._taken)
                if free == 0:
                    break
            await self._interruptible(self._link.wait_connected())
            if self._stopping:
                break
            try:
                result = await self._link.call(
                    "jobs.Reserve",
                    {"pipeline": self.pipeline, "max": free, "lease": self._lease},
                    retry=False,
                )
            except JobsUnavailable:
                continue  # the link reconnects; the next call waits for it
            except RpcError as exc:
                if exc.code != STORAGE_UNAVAILABLE:
                    raise
                logger.warning("the jobs service cannot use its storage: %s", exc)
                await self._interruptible(anyio.sleep(self._idle_max))
                continue
            jobs = [ReservedJob.model_validate(job) for job in result["jobs"]]
            if not jobs:
                if self._stop_when_idle:
                    break
                await self._interruptible(anyio.sleep(idle))
                idle = min(idle * 2, self._idle_max)
                continue
            idle = self._idle_first
            self._taken += len(jobs)
            for job in jobs:
                self._in_hand += 1
                handlers.start_soon(self._handle, job, name=f"job {job.id}")

    async def _interruptible(self, wait: Awaitable[Any]) -> None:
        """Await *wait*, or return early when stop() is called."""
        with anyio.CancelScope() as self._wait_scope:
            if self._stopping:
                self._wait_scope.cancel()
            await wait
        self._wait_scope = None

    # -- one job -------------------------------------------------------------------

    async def _handle(self, job: ReservedJob) -> None:
        returned = False  # the handler returned: the job is done, ack it
        settled = False
        try:
            if not self._stopping:  # else reserved but not started: give it back
                error: Exception | None = None
                async with anyio.create_task_group() as keeper:
                    keeper.start_soon(self._keep_lease, job)
                    try:
                        await self._handler(job)
                        returned = True
                    except Exception as exc:
                        error = exc
                    keeper.cancel_scope.cancel()
                if error is None:
                    await self._ack(job)
                else:
                    logger.error(
                        "job %s failed: giving it back, to retry in %g s (attempt %d)",
                        job.id,
                        self._retry_delay,
                        job.lease.attempt,
                        exc_info=error,
                    )
                    await self._nack(job, delay=self._retry_delay)
                    self.stats.failed += 1
                settled = True
        finally:
            if not settled:
                # Cancelled (stopping) or a bug: settle the job before leaving,
                # even under cancellation, within a bound.
                with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT):
                    if returned:
                        await self._ack(job)
                    else:
                        logger.info("job %s: given back unfinished (stopping)", job.id)
                        await self._nack(job, delay=0)
                        self.stats.returned += 1
            self._in_hand -= 1
            freed, self._slot_freed = self._slot_freed, anyio.Event()
            freed.set()

    async def _keep_lease(self, job: ReservedJob) -> None:
        every = self._lease / 3
        while True:
            await anyio.sleep(every)
            try:
                if not await self._settle("jobs.Extend", job, {"lease": self._lease}):
                    return  # someone else has it now; the handler's Ack will say so too
            except RpcError as exc:
                logger.error("job %s: cannot extend its lease: %s", job.id, exc)
                return

    async def _ack(self, job: ReservedJob) -> None:
        if await self._settle("jobs.Ack", job, {}):
            self.stats.acked += 1

    async def _nack(self, job: ReservedJob, *, delay: float) -> None:
        await self._settle("jobs.Nack", job, {"requeue": True, "delay": delay})

    async def _settle(self, method: str, job: ReservedJob, extra: dict[str, Any]) -> bool:
        """Send *method* for *job* until answered; False if the lease was lost."""
        delay = self._idle_first
        while True:
            try:
                await self._link.call(method, {"jobs": [job.ref()], **extra}, retry=True)
            except RpcError as exc:
                if exc.code == LEASE_LOST:
                    break
                if exc.code != STORAGE_UNAVAILABLE:
                    raise
                logger.warning("job %s: %s: %s; trying again", job.id, method, exc)
            else:
                return True
            await anyio.sleep(delay)
            delay = min(delay * 2, self._idle_max)
        self.stats.lease_lost += 1
        logger.warning(
            "job %s: %s refused, the lease is no longer ours (it ran out and the job"
            " went to another consumer, or the job is gone)",
            job.id,
            method,
        )
        return False


def _unwrap(error: BaseException) -> BaseException:
    """The one error a caller should see: task groups wrap it in groups of one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
