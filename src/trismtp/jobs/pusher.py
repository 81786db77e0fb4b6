"""The batching pusher: many SMTP sessions, one RPC connection, durable acks.

Theory of operation
===================

Every session that received a message calls :meth:`Pusher.push` with the
job's id and its JSON text, and waits. ``push`` puts a :class:`_Pending`
slot into a bounded trio memory channel and waits for the slot's outcome,
the whole wait bounded by ``jobs.push_timeout``. A full channel therefore
makes sessions wait (backpressure), never grows a queue without bound, and a
session that waited too long gives up and answers ``451``.

The bound is kept by :meth:`Pusher.run`, not by a cancel scope per push
(which cost as much as the rest of the hand-over): every slot's deadline is
``push_timeout`` after it was pushed, so the slots in push order are in
deadline order too, and one task sleeps until the oldest unanswered slot's
deadline and answers it (and any others then due) as timed out. ``push``
therefore needs :meth:`run` running, as it does to be delivered at all.

One task, :meth:`Pusher.run`, takes slots out of the channel and groups them
into a ``jobs.PushBatch`` call: it flushes when the batch holds
``batch_max_jobs`` jobs, before it would grow past ``batch_max_bytes``, or
``batch_linger`` seconds after the first job arrived. One batch is in flight
at a time; while it is, the next one fills up in the channel, so batches grow
with load.

A job pushed with ``last=True`` ends the linger: the SMTP server says so when
every other session is already waiting for its ack, so nothing more can join
the batch before it is sent (a lone sender's message never waits). Twenty
sessions on kept connections move in step with the batches (all wait for one,
get ``250``, send their next message); the linger was then a pause of every
session at every turn, for no job.

Where a batch goes is a *sink* (:mod:`trismtp.jobs.sinks`): ``jobs.PushBatch``
to a jobs service, or pipelined publishes to a NATS JetStream stream for a
``nats+ws://`` URL; everything here is the same for both.

The batch's outcome goes to every slot in it: ack → ``250``, error → ``451``.
When the connection fails (refused, dropped, stalled), the pusher reconnects
with exponential backoff and jitter and sends the same batch again, with the
same ids, as long as some session in it is still waiting. That is safe
because the jobs service stores an id at most once. Slots whose session has
already given up are left out of the next attempt: their client was told
``451`` and will retry, and leaving them out narrows the window in which that
retry becomes a second job (see docs/architecture.md, "Delivery guarantee").

With ``expire_batches`` (setting ``jobs.batch_expiry``), each PushBatch
carries ``expires_at`` in wall-clock time: the
moment the first of its sessions gives up, less a short margin for the
commit and the reply. A batch that reaches the store
later (the service was stalled, the connection slow) stores nothing and is
refused with ``-32005``; the pusher sends what still waits again. That closes
most of the window in which a ``451`` leaves a stored job behind; what is
left is the time between the commit and the reply reaching the session.

While no job is queued, the pusher still keeps its connection up: one lost
then (the service restarted) is opened again at once, with the same
backoff, rather than by the next job. So that job does not pay for the
connect, and :attr:`Pusher.connected` (``/readyz``) tells the truth between
messages: a load balancer that waits for readiness before sending mail
would otherwise wait for ever.

While the pusher *knows* it has no destination (a connect failed, or the
connection was lost, and it has not reconnected since), :attr:`Pusher.outage`
says why, and the SMTP server refuses new recipients and DATA with ``451``
at once instead of taking an upload it would answer ``451`` to
``push_timeout`` later. What it cannot know (a destination that stalls
without closing the connection) still costs the sessions their
``push_timeout``. Reconnecting while idle ends the outage as soon as the
destination is back.

Log lines name the destination as what it is ("jobs service" or "NATS
server") and give the cause of a failure: refused or lost connection, no
reply in time (stalled or overloaded), or a queue that stayed full.

Shutdown: the daemon closes the send side only after every session has
ended, so :meth:`run` drains everything that was queued, delivers it, and
returns. The receive side is never closed while jobs are queued.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio

from trismtp.jobs.rpc import BATCH_EXPIRED, JobsUnavailable, RpcError
from trismtp.jobs.sinks import (
    JobsTooLarge,
    JobsUncertain,
    Sink,
    expected_message_size,
    is_nats_url,
    open_sink,
)
from trismtp.metrics import Metrics
from trismtp.settings import JobsSettings

__all__ = ["PushFailed", "Pusher"]

log = logging.getLogger("trismtp.pusher")

# Reconnect backoff: first retry soon (a restarting service is back in a
# moment), then double up to a cap that still lets a session waiting
# push_timeout see a few attempts.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0

# While idle, how often the pusher checks that its connection is still up.
IDLE_CHECK = 0.5

# The most time an expiring batch leaves for commit and reply (see _margin).
EXPIRY_MARGIN = 0.1
# An "expired" answer this long before our own deadline means the clocks differ.
CLOCK_SKEW_WARNING = 1.0

Connect = Callable[[str, str, JobsSettings], AbstractAsyncContextManager[Sink]]


class PushFailed(Exception):
    """The job was not acknowledged as durable; the session answers 451.

    ``permanent`` when retrying cannot help (the job is larger than the
    destination takes): the session answers 552 instead.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(eq=False, slots=True)
class _Pending:
    job_id: str
    encoded: str
    size: int
    pipeline: str
    deadline: float
    queued_at: float  # for the push latency metric
    last: bool = False  # no other job can join its batch (module docstring)
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    permanent: bool = False
    abandoned: bool = False  # its session gave up (push_timeout, or cancelled)
    queued: bool = False  # it got into the channel

    def resolve(self, error: str | None, *, permanent: bool = False) -> None:
        if not self.done.is_set():
            self.error = error
            self.permanent = permanent
            self.done.set()
            # Answered: the JSON (megabytes for a big message) is not needed
            # again, though the batch that held this slot may live on.
            self.encoded = ""


def _still_waiting(batch: list[_Pending], margin: float = 0.0) -> list[_Pending]:
    now = trio.current_time() + margin
    return [p for p in batch if not p.abandoned and not p.done.is_set() and p.deadline > now]


class Pusher:
    """Delivers jobs to the jobs service in batches; see the module docstring.

    ``expire_batches`` sends each batch's deadline as wall-clock time, which
    needs the jobs service's clock in step with this host's (NTP).
    """

    def __init__(
        self,
        settings: JobsSettings,
        url: str,
        token: str = "",
        *,
        connect: Connect = open_sink,
        expire_batches: bool = False,
        metrics: Metrics | None = None,
        lane: str = "",
    ) -> None:
        self._settings = settings
        # Which lane this is (trismtp.jobs.lanes), for the connection's log lines.
        self._lane = f" ({lane})" if lane else ""
        self._url = url
        self._token = token
        self._connect = connect
        self._expire_batches = expire_batches
        # Expiry leaves the store this long to commit and the reply to come
        # back before the first session gives up.
        self._margin = min(EXPIRY_MARGIN, settings.push_timeout / 20) if expire_batches else 0.0
        self._send, self._receive = trio.open_memory_channel[_Pending](settings.queue_size)
        # Every slot pushed and maybe not answered yet, in push (= deadline)
        # order; see _expire_overdue.
        self._unanswered: deque[_Pending] = deque()
        self._overdue_wait: trio.CancelScope | None = None
        self._carry: _Pending | None = None
        self._client: Sink | None = None
        self._release: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._failures = 0
        self._connections = 0
        self._last_error = ""
        self._size_limit = expected_message_size(url)
        # Why the destination is known to be unreachable; None when it is
        # connected or not known to be down (see outage).
        self._down: str | None = None
        self._what = "NATS server" if is_nats_url(url) else "jobs service"
        # The causes of a job not acked in time (_timed_out).
        self._overloaded = f"overloaded, more mail than the {self._what} takes"
        self._queued = f"they waited in the queue past jobs.push_timeout: {self._overloaded}"
        self._no_reply = f"no reply from the {self._what} in time (stalled or overloaded)"
        # Why jobs are not acked in time, for the sessions' log lines: what
        # the batch being delivered ran into, or the last one that failed.
        self._cause = ""
        # Without the daemon's metrics, count into a registry nobody reads.
        self._metrics = metrics if metrics is not None else Metrics()
        self._metrics.watch_pusher(lambda: self.queued, lambda: self.connected)

    # -- the sessions' side -------------------------------------------------

    async def push(
        self, job_id: str, encoded: str, pipeline: str = "", *, last: bool = False
    ) -> None:
        """Queue one job and wait for its durable ack; raise PushFailed if none.

        ``encoded`` is the job as JSON text. The whole wait, including the
        wait for room in the channel, is bounded by ``jobs.push_timeout``.
        ``last``: no other job will come before this one's batch is sent,
        so the batch goes without waiting ``batch_linger``.
        """
        timeout = self._settings.push_timeout
        # batch_max_bytes counts bytes on the wire, not characters.
        size = len(encoded) if encoded.isascii() else len(encoded.encode())
        now = trio.current_time()
        pending = _Pending(job_id, encoded, size, pipeline, now + timeout, now, last)
        unanswered = self._unanswered
        while unanswered and unanswered[0].done.is_set():
            unanswered.popleft()
        unanswered.append(pending)
        if len(unanswered) == 1 and self._overdue_wait is not None:
            self._overdue_wait.deadline = pending.deadline
        try:
            try:
                # Without the checkpoint of send() while there is room
                # (nearly always): the wait for the ack parks us anyway.
                self._send.send_nowait(pending)
                pending.queued = True
            except trio.WouldBlock:
                with trio.move_on_at(pending.deadline):
                    await self._send.send(pending)
                    pending.queued = True
            if pending.queued:
                # Answered by run(): acked, failed, or timed out (_expire_overdue).
                await pending.done.wait()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise PushFailed("the pusher is stopped") from None
        finally:
            if not pending.done.is_set():
                pending.abandoned = True
        if not pending.queued:
            raise PushFailed(
                f"the pusher's queue (jobs.queue_size = {self._settings.queue_size}) stayed "
                f"full for jobs.push_timeout ({timeout:g} s): {self._overloaded}"
            )
        if pending.error is not None:
            raise PushFailed(pending.error, permanent=pending.permanent)

    def close(self) -> None:
        """No more pushes: :meth:`run` delivers what is queued, then returns."""
        self._send.close()

    @property
    def queued(self) -> int:
        """Jobs waiting in the channel."""
        return self._receive.statistics().current_buffer_used

    @property
    def max_message_size(self) -> int | None:
        """The largest email whose job the destination always takes, if it has a
        limit (NATS: from the server's ``max_payload``); SMTP advertises no more."""
        if self._client is not None:
            self._size_limit = self._client.max_message_size
        return self._size_limit

    @property
    def connected(self) -> bool:
        """The connection to the destination is open (as far as is known)."""
        return self._client is not None and not self._client.closed

    @property
    def unavailable(self) -> str | None:
        """None while :attr:`connected`, else one line saying why not (``/readyz``)."""
        if self.connected:
            return None
        if self._client is not None:
            reason = "the connection was lost"
        else:
            reason = self._last_error or "not connected yet"
        return f"no connection to the {self._what}: {reason}"

    @property
    def outage(self) -> str | None:
        """Why the destination is *known* to be unreachable, else None.

        Known: the connection closed, or the last connect failed, and no
        connection has been made since. Not known, so None: connected, the
        first connect still under way, or a call that stalled (the
        destination may answer yet). The SMTP server refuses mail before the
        upload while this is set (module docstring).
        """
        if self._client is not None:
            # Closed is known at once; the idle loop reconnects within IDLE_CHECK.
            if self._client.closed:
                return f"no connection to the {self._what}: the connection was lost"
            return None
        if self._down is None:
            return None
        return f"no connection to the {self._what}: {self._down}"

    # -- the pusher task ----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch and deliver until :meth:`close` and the channel is drained."""
        # The connection lives in a task of its own (see _hold_connection):
        # a connection opened inside one delivery's deadline scope would
        # outlive that scope, which structured concurrency forbids.
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            expiry = trio.CancelScope()
            nursery.start_soon(self._expire_overdue, expiry)
            task_status.started()
            with trio.move_on_after(self._settings.push_timeout):
                # Connect early so the first message does not pay for it, and
                # so a wrong URL or token shows in the log at start.
                await self._ensure_client()
            async for batch in self._batches():
                await self._deliver(batch)
            self._drop_client()
            expiry.cancel()  # drained: no session waits any more

    async def _expire_overdue(self, scope: trio.CancelScope) -> None:
        """Give up on each job not answered within push_timeout (module docstring)."""
        unanswered = self._unanswered
        with scope:
            while True:
                deadline = unanswered[0].deadline if unanswered else math.inf
                with trio.CancelScope(deadline=deadline) as self._overdue_wait:
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._overdue_wait = None
                now = trio.current_time()
                while unanswered and (unanswered[0].done.is_set() or unanswered[0].deadline <= now):
                    pending = unanswered.popleft()
                    if not pending.done.is_set():
                        # _deliver logs it with the rest of its batch.
                        pending.abandoned = True
                        pending.resolve(self._timed_out(self.outage or self._cause or self._queued))

    def _timed_out(self, cause: str) -> str:
        """What a session whose job was not acked within push_timeout is told, and why."""
        timeout = self._settings.push_timeout
        return f"no ack from the {self._what} within jobs.push_timeout ({timeout:g} s): {cause}"

    async def _batches(self) -> AsyncIterator[list[_Pending]]:
        settings = self._settings
        while True:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                try:
                    first = await self._next_job()
                except trio.EndOfChannel:
                    return
            batch = [first]
            size = first.size
            ended = False
            # After a job marked last, only what is queued already joins.
            linger = not first.last
            with trio.move_on_after(settings.batch_linger):
                while len(batch) < settings.batch_max_jobs:
                    try:
                        item = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        if not linger:
                            break
                        try:
                            item = await self._receive.receive()
                        except trio.EndOfChannel:
                            ended = True
                            break
                    except trio.EndOfChannel:
                        ended = True
                        break
                    if size + item.size > settings.batch_max_bytes:
                        self._carry = item
                        break
                    batch.append(item)
                    size += item.size
                    linger = linger and not item.last
            yield batch
            if ended and self._carry is None:
                return

    async def _next_job(self) -> _Pending:
        """Wait for a job; meanwhile, reopen a lost connection (module docstring).

        Raises EndOfChannel once :meth:`close` was called and all is drained.
        """
        while True:
            try:
                return self._receive.receive_nowait()
            except trio.WouldBlock:
                pass
            wait = IDLE_CHECK
            if not self.connected and await self._ensure_client() is None:
                wait = self._backoff()
            with trio.move_on_after(wait):
                return await self._receive.receive()

    async def _deliver(self, batch: list[_Pending]) -> None:
        live = _still_waiting(batch, self._margin)
        # Why the jobs left unanswered are: what the last attempt ran into.
        # Kept in self._cause too as it changes, for the jobs that
        # _expire_overdue answers meanwhile.
        cause = self._queued
        while live:
            deadline = max(p.deadline for p in live)
            cause = self._cause = self._no_reply
            with trio.move_on_after(deadline - trio.current_time()):
                error = await self._attempt(live)
                if error is None:
                    # Jobs _attempt already answered (too large) are not acked.
                    self._acked([p for p in live if not p.done.is_set()])
                    return
                if isinstance(error, RpcError) and error.code == BATCH_EXPIRED:
                    # A session in the batch gave up before the batch reached
                    # the store, so nothing was stored: send the rest again.
                    left = min(p.deadline for p in live) - trio.current_time()
                    if left > CLOCK_SKEW_WARNING:
                        log.warning(
                            "the jobs service refused a batch as expired %.1f s before its "
                            "deadline: are its clock and this host's in step?",
                            left,
                        )
                    cause = self._cause = f"the {self._what} refused the batch as expired"
                    live = _still_waiting(live, self._margin)
                    continue
                if isinstance(error, RpcError):
                    for p in live:
                        p.resolve(f"{self._what} error {error.code}: {error.message}")
                    log.error(
                        "the %s refused a batch of %d jobs (%s): error %d: %s",
                        self._what,
                        len(live),
                        ", ".join(p.job_id for p in live),
                        error.code,
                        error.message,
                    )
                    return
                cause = self._cause = self.outage or f"{self._what} unavailable: {error}"
                await trio.sleep(self._backoff())
            live = _still_waiting(live, self._margin)
        # Jobs left out for want of time are not answered here: each is
        # answered at its own deadline, push_timeout after its DATA, by
        # _expire_overdue (with self._cause), which may have done so already.
        failed = [p for p in batch if p.abandoned or not p.done.is_set()]
        if failed:
            log.error(
                "could not push %d %s (%s) within jobs.push_timeout: %s",
                len(failed),
                "job" if len(failed) == 1 else "jobs",
                ", ".join(p.job_id for p in failed),
                cause,
            )

    async def _attempt(self, live: list[_Pending]) -> RpcError | JobsUnavailable | None:
        """One batch; returns the error or None on ack."""
        expires_at = None
        if self._expire_batches:
            # The first session to give up bounds the batch: stored later, its
            # job would be a duplicate of the client's retry.
            left = min(p.deadline for p in live) - trio.current_time() - self._margin
            expires_at = time.time() + left
        try:
            client = await self._ensure_client()
            if client is None:
                return JobsUnavailable("not connected")
            try:
                await client.push_batch([(p.job_id, p.encoded) for p in live], expires_at)
            except trio.Cancelled:
                # A stalled call: the connection holds an unanswered
                # request; start afresh next time.
                self._drop_client()
                raise
        except JobsTooLarge as exc:
            # The others of the batch are durable; these can never be.
            too_large = set(exc.ids)
            for p in live:
                if p.job_id in too_large:
                    p.resolve(str(exc), permanent=True)
            log.error("%s: %s", ", ".join(exc.ids), exc)
        except JobsUncertain as exc:
            # Sending these again could store them twice, and JetStream's
            # Nats-Msg-Id cannot be used to stop that (sinks.py says why):
            # their clients get 451 and send them again as new jobs.
            self._drop_client()
            self._last_error = str(exc)
            self._down = str(exc)
            stored, unknown = set(exc.stored), set(exc.unknown)
            self._acked([p for p in live if p.job_id in stored])
            for p in live:
                if p.job_id in unknown:
                    p.resolve(f"the connection was lost before the {self._what} acknowledged it")
            log.warning(
                "%s connection lost with %d jobs in flight: %d were acknowledged, "
                "%d may or may not be stored and get 451 without being sent again (%s): %s",
                self._what,
                len(live),
                len(exc.stored),
                len(exc.unknown),
                ", ".join(exc.unknown),
                exc,
            )
            if any(not p.done.is_set() for p in live):
                return exc  # never sent: the next attempt sends them
        except RpcError as exc:
            return exc
        except JobsUnavailable as exc:
            log.warning("%s connection lost: %s", self._what, exc)
            self._last_error = str(exc)
            self._down = str(exc)
            self._drop_client()
            return exc
        self._failures = 0
        self._cause = ""
        return None

    def _acked(self, jobs: list[_Pending]) -> None:
        """These jobs are durable: their sessions answer 250."""
        if not jobs:
            return
        now = trio.current_time()
        self._metrics.batch_acked(len(jobs))
        for p in jobs:
            p.resolve(None)
            self._metrics.job_acked(now - p.queued_at)
            log.debug("pushed job %s to pipeline %s", p.job_id, p.pipeline)

    async def _ensure_client(self) -> Sink | None:
        if self._client is not None:
            if not self._client.closed:
                return self._client
            # Lost between batches (a batch that fails drops the client itself).
            log.warning(
                "the connection to the %s was lost between batches; reconnecting", self._what
            )
            self._last_error = "the connection was lost"
            self._down = self._last_error
        self._drop_client()
        assert self._nursery is not None
        # The release event is ours before the connection exists: should this
        # call be cancelled just as the connection is handed over, the next
        # _drop_client() still closes it.
        self._release = trio.Event()
        try:
            self._client = await self._nursery.start(self._hold_connection, self._release)
        except JobsUnavailable as exc:
            self._failures += 1
            self._last_error = str(exc)
            self._down = str(exc)
            if self._failures == 1 or math.log2(self._failures).is_integer():
                log.warning(
                    "cannot connect to the %s at %s%s: %s", self._what, self._url, self._lane, exc
                )
            return None
        self._down = None
        self._connections += 1
        if self._connections > 1:
            self._metrics.reconnected()
        if self._failures or self._connections > 1:
            log.info("reconnected to the %s at %s%s", self._what, self._url, self._lane)
        else:
            log.info("connected to the %s at %s%s", self._what, self._url, self._lane)
        return self._client

    async def _hold_connection(
        self, release: trio.Event, *, task_status: trio.TaskStatus[Sink]
    ) -> None:
        """Open a connection, hand it over, keep it open until ``release``."""
        started = False
        try:
            async with self._connect(self._url, self._token, self._settings) as client:
                task_status.started(client)
                started = True
                # Leaving the block without cancellation lets the close
                # handshake complete at once.
                await release.wait()
        except JobsUnavailable:
            # Before started(), nursery.start() re-raises this to the
            # pusher; after it, the failure reaches the pusher through the
            # client's pending calls instead.
            if not started:
                raise

    def _drop_client(self) -> None:
        self._client = None
        if self._release is not None:
            self._release.set()
            self._release = None

    def _backoff(self) -> float:
        self._failures = max(self._failures, 1)
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self._failures - 1))
        return float(ceiling * random.uniform(0.5, 1.0))
