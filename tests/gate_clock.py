"""A store clock that can hold the jobs service's writer thread mid-operation."""

from __future__ import annotations

import threading
import time

import trio
import trio.lowlevel


class GateClock:
    """The store's clock, which can hold the store's writer thread mid-operation.

    The writer reads the clock once per transaction, in its worker thread;
    when armed, that read signals :attr:`entered` and blocks until
    :meth:`release`. So a test knows for certain that a write has been handed
    to the store and is in progress.
    """

    def __init__(self) -> None:
        self.entered = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._armed = False
        self._gate = threading.Event()

    def arm(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._gate.set()

    def __call__(self) -> float:
        if self._armed:
            self._armed = False
            self._token.run_sync_soon(self.entered.set)
            self._gate.wait(timeout=10)
        return time.time()
