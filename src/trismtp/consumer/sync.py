"""The consumer for code without an event loop: scripts, cron, Django, WSGI apps.

:class:`BlockingConsumer` takes a plain (blocking) handler function and runs
the async :class:`~trismtp.consumer.worker.Consumer` on an event loop of its
own that lives exactly as long as the work:

* :meth:`BlockingConsumer.run` blocks the calling thread: ``anyio.run`` in
  that thread, so the loop is created and closed by the call. From the main
  thread it also stops gracefully on SIGINT/SIGTERM. From any other thread (a
  request of a threaded web app) it works the same, without signals.
* :meth:`BlockingConsumer.start` / :meth:`BlockingConsumer.stop` (or ``with``)
  run it in the background, on one thread of anyio's blocking portal, for an
  app that keeps consuming while it serves requests. ``stop()`` stops
  gracefully and joins that thread: nothing of the consumer is left behind.

The handler runs in anyio's worker threads (``concurrency`` of them at once),
so the loop keeps extending leases while a handler blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from trismtp.consumer.model import ReservedJob
from trismtp.consumer.worker import Consumer, Stats, in_thread

__all__ = ["Backend", "BlockingConsumer"]

Backend = Literal["asyncio", "trio"]


class BlockingConsumer:
    """A :class:`~trismtp.consumer.worker.Consumer` for a blocking *handler*.

    *handler* takes a :class:`~trismtp.consumer.model.ReservedJob`; returning
    acks the job, raising gives it back. The keyword arguments are those of
    :class:`~trismtp.consumer.worker.Consumer`; *backend* picks the event loop
    (``"asyncio"``, the default, or ``"trio"``).
    """

    def __init__(
        self,
        url: str,
        handler: Callable[[ReservedJob], object],
        *,
        backend: Backend = "asyncio",
        **options: Any,
    ) -> None:
        self._backend: Backend = backend
        self._consumer = Consumer(url, in_thread(handler), **options)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._future: Future[Stats] | None = None

    @property
    def stats(self) -> Stats:
        """The counts so far (final once run() or stop() returned)."""
        return self._consumer.stats

    def run(self) -> Stats:
        """Consume in this thread until stopped (or idle, or max_jobs); return the counts."""
        if threading.current_thread() is threading.main_thread():
            return anyio.run(self._consumer.run_until_signalled, backend=self._backend)
        return anyio.run(self._consumer.run, backend=self._backend)

    def start(self) -> None:
        """Start consuming in a background thread; returns at once."""
        if self._portal is not None:
            raise RuntimeError("this consumer was already started")
        self._portal_cm = start_blocking_portal(self._backend)
        self._portal = self._portal_cm.__enter__()
        self._future = self._portal.start_task_soon(self._consumer.run)

    def stop(self, *, abort: bool = False) -> Stats:
        """Stop the background consumer gracefully (*abort*: at once) and wait for it.

        The jobs in hand are acked or given back before this returns, and the
        consumer's thread and event loop are gone. Raises what the consumer
        raised, if it failed.
        """
        if self._portal is None or self._portal_cm is None or self._future is None:
            raise RuntimeError("this consumer was not started")
        portal, portal_cm, future = self._portal, self._portal_cm, self._future
        self._portal = self._portal_cm = self._future = None
        try:
            if not future.done():
                portal.call(self._consumer.abort if abort else self._consumer.stop)
            return future.result()
        finally:
            portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingConsumer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
