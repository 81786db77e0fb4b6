"""Two lanes to the destination: big jobs do not hold up small ones.

Theory of operation
===================

A :class:`~trismtp.jobs.pusher.Pusher` sends one batch at a time over one
connection, and a WebSocket sends one message at a time. A batch that holds
the job of a 5 MB mail (13 MB of JSON) takes a few hundred milliseconds to
encode, mask, send, decode and commit; every small message that arrives
meanwhile waits for it, then for its own batch. In the benchmark's mix of
mostly small mail with a few big ones, the small messages' p99 from the final
dot to ``250`` was dominated by that wait.

:class:`Lanes` runs two pushers on two connections to the same destination:
jobs of :data:`LARGE_JOB` bytes of JSON or more go to the *large* lane, the
others to the *small* one. Each lane keeps every guarantee of the pusher
(durable ack before ``250``, retries, expiry, shutdown flush); the lanes
only share the destination. A small job can still wait for a big one where
the destination is one writer (the embedded store commits one transaction
at a time), but that is one commit, not a whole batch's round trip.

To the SMTP server and the daemon the lanes look like one pusher.
"""

from __future__ import annotations

from functools import partial

import trio

from trismtp.jobs.pusher import Connect, Pusher
from trismtp.jobs.sinks import open_sink
from trismtp.metrics import Metrics
from trismtp.settings import JobsSettings

__all__ = ["LARGE_JOB", "Lanes"]

LARGE_JOB = 256 * 1024
"""Jobs with this many characters of JSON or more go to the large lane (a mail of ~100 KB)."""


class Lanes:
    """A small-job and a large-job :class:`Pusher` behind one interface."""

    def __init__(
        self,
        settings: JobsSettings,
        url: str,
        token: str = "",
        *,
        connect: Connect = open_sink,
        expire_batches: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        lane = partial(
            Pusher,
            settings,
            url,
            token,
            connect=connect,
            expire_batches=expire_batches,
            metrics=self._metrics,
        )
        self.small = lane()
        self.large = lane(lane="large jobs")
        self._metrics.watch_pusher(lambda: self.queued, lambda: self.connected)

    async def push(
        self, job_id: str, encoded: str, pipeline: str = "", *, last: bool = False
    ) -> None:
        """Queue one job on its lane and wait for its durable ack (see :meth:`Pusher.push`)."""
        lane = self.large if len(encoded) >= LARGE_JOB else self.small
        await lane.push(job_id, encoded, pipeline, last=last)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run both lanes until :meth:`close` and both are drained."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.small.run)
            await nursery.start(self.large.run)
            task_status.started()

    def close(self) -> None:
        """No more pushes: each lane delivers what it holds, then :meth:`run` returns."""
        self.small.close()
        self.large.close()

    @property
    def queued(self) -> int:
        """Jobs waiting in both lanes' channels."""
        return self.small.queued + self.large.queued

    @property
    def connected(self) -> bool:
        """Both lanes are connected."""
        return self.small.connected and self.large.connected

    @property
    def max_message_size(self) -> int | None:
        """The destination's limit on a mail (see :attr:`Pusher.max_message_size`)."""
        return self.small.max_message_size

    @property
    def unavailable(self) -> str | None:
        """None while both lanes are connected, else why not (``/readyz``)."""
        return self.small.unavailable or self.large.unavailable

    @property
    def outage(self) -> str | None:
        """Why the destination is known to be unreachable (either lane knows), else None."""
        return self.small.outage or self.large.outage
