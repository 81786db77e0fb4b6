"""The blocking facade: from a plain script, from a thread of a sync web app, in the background.

These tests are synchronous, as the code that uses the facade is. Each checks
that nothing of the consumer is left once it returns: no thread of its own
still running, no event loop left open (its epoll and self-pipe would be
open file descriptors).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from trismtp.consumer import BlockingConsumer, ReservedJob
from trismtp.consumer.sync import Backend

from ..e2e.trismtp_e2e import HOST, Launcher
from .support import assert_empty, push_emails

BACKENDS: list[Backend] = ["asyncio", "trio"]
JOIN_TIMEOUT = 30.0
"""Seconds a leftover thread gets to end (trio keeps idle worker threads 10 s)."""


@contextmanager
def nothing_left_behind(*, trio_cache_too: bool = False) -> Iterator[None]:
    """Fail if the block leaves a thread running or a file descriptor open.

    trio keeps idle worker threads in a process-wide cache for 10 s (named
    "Trio thread N"), to be reused by any trio code; they are waited for only
    with *trio_cache_too*, so that one test pays those 10 s, not each.
    """
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    yield
    for thread in set(threading.enumerate()) - threads:
        if thread.name.startswith("Trio thread") and not trio_cache_too:
            continue
        # anyio's and trio's worker threads end on their own once idle: wait
        # for that (a join, not a sleep), then insist.
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive(), f"thread {thread.name} is still running"
    assert set(os.listdir("/proc/self/fd")) == fds, "file descriptors left open"


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_from_a_plain_script(launch: Launcher, backend: Backend) -> None:
    service = launch.jobs_service()
    ids = anyio.run(push_emails, service.url, 5)
    handled: list[str] = []

    def handle(job: ReservedJob) -> None:
        handled.append(job.email().uuid)

    with nothing_left_behind():
        consumer = BlockingConsumer(
            service.url, handle, backend=backend, concurrency=2, stop_when_idle=True
        )
        stats = consumer.run()

    assert sorted(handled) == sorted(ids)
    assert stats.acked == 5
    anyio.run(assert_empty, service.url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_from_a_request_thread_of_a_web_app(launch: Launcher, backend: Backend) -> None:
    service = launch.jobs_service()
    ids = anyio.run(push_emails, service.url, 6)
    handled: list[str] = []
    request_threads: list[str] = []

    class App(BaseHTTPRequestHandler):
        """POST /drain handles the jobs ready now and answers how many."""

        def do_POST(self) -> None:
            request_threads.append(threading.current_thread().name)
            consumer = BlockingConsumer(
                service.url,
                lambda job: handled.append(job.id),
                backend=backend,
                concurrency=3,
                stop_when_idle=True,
            )
            body = json.dumps({"acked": consumer.run().acked}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with nothing_left_behind(trio_cache_too=True):
        server = ThreadingHTTPServer((HOST, 0), App)
        serving = threading.Thread(target=server.serve_forever, name="web app")
        serving.start()
        try:
            url = f"http://{HOST}:{server.server_address[1]}/drain"
            with urllib.request.urlopen(urllib.request.Request(url, method="POST")) as reply:
                answer = json.load(reply)
        finally:
            server.shutdown()
            server.server_close()
            serving.join()

    assert answer == {"acked": 6}
    assert sorted(handled) == sorted(ids)
    assert len(request_threads) == 1
    assert request_threads[0] != threading.main_thread().name
    anyio.run(assert_empty, service.url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_the_background_of_an_app(launch: Launcher, backend: Backend) -> None:
    service = launch.jobs_service()
    handled: list[str] = []
    all_in = threading.Event()

    def handle(job: ReservedJob) -> None:
        handled.append(job.id)
        if len(handled) == 4:
            all_in.set()

    with nothing_left_behind():
        with BlockingConsumer(service.url, handle, backend=backend, idle_max=0.1) as consumer:
            # The app goes on with its own work meanwhile: here, producing jobs.
            ids = anyio.run(push_emails, service.url, 4)
            assert all_in.wait(60), handled
        stats = consumer.stats

    assert sorted(handled) == sorted(ids)
    assert stats.acked == 4
    anyio.run(assert_empty, service.url)
