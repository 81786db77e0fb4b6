"""The bounds of one RPC connection, over real sockets: batches, calls in flight, ids, stalls."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from trismtp.jobs.rpc import INVALID_REQUEST, METHOD_NOT_FOUND, TOO_LARGE, JobsClient
from trismtp.service.server import MAX_BATCH, MAX_IN_FLIGHT

from ..gate_clock import GateClock
from .test_server import Service, job, service_settings, start_service, stored_ids


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path) -> Service:
    return await start_service(nursery, service_settings(tmp_path))


def call(request_id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def nopes(first: int, count: int) -> list[dict[str, Any]]:
    """*count* calls the service answers without its store (unknown method)."""
    return [call(first + n, "jobs.Nope") for n in range(count)]


async def no_message_waiting(ws: WebSocketConnection) -> bool:
    """True when, with every task blocked, no reply has arrived."""
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0):
        await ws.get_message()
        return False
    return True


async def push_big_jobs(url: str, count: int, size: int) -> None:
    async with JobsClient.connect(url) as client:
        for n in range(count):
            await client.call("jobs.Push", {"job": job(f"big{n}") | {"payload": "x" * size}})


class LogEvent(logging.Handler):
    """Sets :attr:`seen` when a line containing *text* is logged (in the trio thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


class StalledClient:
    """A raw WebSocket client that sends requests and never reads the replies."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(cls, url: str) -> StalledClient:
        host, port = url.removeprefix("ws://").removesuffix("/rpc").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"{host}:{port}", target="/rpc")))
        while True:
            data = await stream.receive_some(4096)
            assert data
            ws.receive_data(data)
            for event in ws.events():
                assert isinstance(event, AcceptConnection), event
                return cls(stream, ws)

    async def send(self, message: Any) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(message))))

    async def read_until_closed(self) -> None:
        try:
            while await self.stream.receive_some(1024 * 1024):
                pass
        except trio.BrokenResourceError:
            pass  # reset by the service


# -- batches -------------------------------------------------------------------------


async def test_a_batch_over_the_limit_is_refused_whole(service: Service) -> None:
    batch = [call(n, "jobs.Push", {"job": job(f"id{n}")}) for n in range(MAX_BATCH + 1)]
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        await ws.send_message(json.dumps(batch))
        reply = json.loads(await ws.get_message())

    assert reply["id"] is None
    assert reply["error"]["code"] == INVALID_REQUEST
    assert f"at most {MAX_BATCH} calls, this one {MAX_BATCH + 1}" in reply["error"]["message"]
    assert stored_ids(service.database) == set()


async def test_a_batch_counts_as_its_calls_against_the_in_flight_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    clock = GateClock()
    service = await start_service(nursery, service_settings(tmp_path), clock=clock)
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        # A batch of MAX_BATCH calls whose reply waits for a push stuck in the store.
        clock.arm()
        stuck = [call("push", "jobs.Push", {"job": job("a")}), *nopes(1, MAX_BATCH - 1)]
        await ws.send_message(json.dumps(stuck))
        await clock.entered.wait()
        room = MAX_IN_FLIGHT - MAX_BATCH

        # What is left of the in-flight limit is answered at once...
        await ws.send_message(json.dumps(nopes(1000, room)))
        assert len(json.loads(await ws.get_message())) == room
        # ...one call more must wait for the stuck batch, and the message after it too.
        await ws.send_message(json.dumps(nopes(2000, room + 1)))
        await ws.send_message(json.dumps(call(3000, "jobs.Nope")))
        assert await no_message_waiting(ws)

        clock.release()
        replies = [json.loads(await ws.get_message()) for _ in range(3)]

    assert [len(r) if isinstance(r, list) else 1 for r in replies] == [MAX_BATCH, room + 1, 1]
    assert stored_ids(service.database) == {"a"}


async def test_a_batch_reply_stays_within_max_unsent_bytes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, max_unsent_bytes=3_000_000)
    service = await start_service(nursery, settings)
    await push_big_jobs(service.url, 1, 1_000_000)
    peek = {"pipeline": "smtp", "max": 1}
    ws: WebSocketConnection
    async with open_websocket_url(service.url, max_message_size=2**26) as ws:
        await ws.send_message(json.dumps([call(n, "jobs.Peek", peek) for n in range(5)]))
        replies = json.loads(await ws.get_message())

    assert len(replies) == 5
    assert sum("result" in r for r in replies) == 2  # 2 MB of jobs; a third would pass 3 MB
    refused = [r["error"] for r in replies if "error" in r]
    assert {e["code"] for e in refused} == {TOO_LARGE}
    assert "jobs_service.max_unsent_bytes" in refused[0]["message"]


# -- ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    ["123456789012345678901234567890", "-18446744073709551617", "18446744073709551615", "7"],
)
async def test_request_ids_are_echoed_exactly(service: Service, request_id: str) -> None:
    message = f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "jobs.List"}}'
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        await ws.send_message(message)
        single = await ws.get_message()
        await ws.send_message(f"[{message}, {message.replace('List', 'Nope')}]")
        batch = await ws.get_message()

    assert isinstance(single, str)
    assert single.startswith(f'{{"jsonrpc":"2.0","id":{request_id},"result":')
    assert isinstance(batch, str)
    assert batch.count(f'"id":{request_id},') == 2
    assert json.loads(batch)[1]["error"]["code"] == METHOD_NOT_FOUND


# -- clients that do not read ----------------------------------------------------------


async def test_a_client_that_reads_nothing_is_dropped_after_send_timeout(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = service_settings(tmp_path, send_timeout=0.5)
    service = await start_service(nursery, settings)
    # One reply far bigger than what the kernel buffers on loopback.
    await push_big_jobs(service.url, 40, 1_000_000)
    stalled = await StalledClient.connect(service.url)
    for n in range(10):
        await stalled.send(call(n, "jobs.Peek", {"pipeline": "smtp", "max": 40}))

    dropped = LogEvent("dropped the connection from")
    logging.getLogger("trismtp.service.server").addHandler(dropped)
    try:
        with trio.fail_after(30):
            await dropped.seen.wait()
            await stalled.read_until_closed()  # only now: reading would unstall it
    finally:
        logging.getLogger("trismtp.service.server").removeHandler(dropped)
    await stalled.stream.aclose()

    assert "it read nothing of its replies for 0.5 s (jobs_service.send_timeout)" in caplog.text
    assert "(1008, policy)" in caplog.text
    # Everyone else is still served.
    async with JobsClient.connect(service.url) as client:
        stats = (await client.call("jobs.Stat", {}))["stats"]
        assert [s["active"] for s in stats if s["pipeline"] == "smtp"] == [40]


async def test_a_client_that_reads_gets_every_big_reply(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Defaults: replies of 4 MB, pipelined 30 deep, well over max_unsent_bytes in all.
    service = await start_service(nursery, service_settings(tmp_path))
    await push_big_jobs(service.url, 4, 1_000_000)
    results: list[int] = []
    async with JobsClient.connect(service.url) as client:

        async def peek() -> None:
            reply = await client.call("jobs.Peek", {"pipeline": "smtp", "max": 4})
            results.append(len(reply["jobs"]))

        async with trio.open_nursery() as calls:
            for _ in range(30):
                calls.start_soon(peek)

    assert results == [4] * 30
