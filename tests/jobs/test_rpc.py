"""The jobs RPC client against the real jobs service (and a few misbehaving peers)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import SecretStr
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from trismtp import wsmask
from trismtp.jobs.model import Job, JobOptions
from trismtp.jobs.rpc import (
    METHOD_NOT_FOUND,
    NO_SUCH_PIPELINE,
    PARSE_ERROR,
    JobsClient,
    JobsUnavailable,
    RpcError,
)
from trismtp.jobs.websocket import FRAGMENT_CHARS, _fragments, frame_header
from trismtp.service.server import serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings

from ..gate_clock import GateClock
from ..stored import payload_of


class Service:
    """The real jobs service on a free port, in its own cancel scope."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.settings = JobsServiceSettings(
            listen="127.0.0.1:0", database=tmp_path / "jobs.sqlite3", **settings
        )
        self.clock = GateClock()
        self.scope = trio.CancelScope()
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> Service:
        async def run(task_status: trio.TaskStatus[HostPort]) -> None:
            with self.scope:
                await serve_jobs(self.settings, clock=self.clock, task_status=task_status)

        address: HostPort = await nursery.start(run)
        self.url = f"ws://{address}/rpc"
        return self

    def stored_ids(self) -> set[str]:
        with sqlite3.connect(self.settings.database) as db:
            return {job_id for (job_id,) in db.execute("SELECT id FROM jobs")}


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path) -> Service:
    return await Service(tmp_path).start(nursery)


def job(job_id: str, *, pipeline: str = "smtp", payload: str = "{}") -> Job:
    return Job(
        job="smtp.email",
        id=job_id,
        payload=payload,
        headers={"uuid": [job_id]},
        options=JobOptions(pipeline=pipeline),
    )


async def start_peer(
    nursery: trio.Nursery, serve: Callable[[WebSocketConnection], Awaitable[None]]
) -> str:
    """A WebSocket server that is not the jobs service: *serve* plays its part."""

    async def handle(request: WebSocketRequest) -> None:
        await serve(await request.accept())

    server = await nursery.start(serve_websocket, handle, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/rpc"


# -- calls ---------------------------------------------------------------------------


async def test_call_returns_the_result(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        assert await client.call("jobs.List", {}) == {"pipelines": ["dead-letter", "smtp"]}
        assert not client.closed

    assert client.closed


async def test_call_encoded_sends_the_text_as_it_is(service: Service) -> None:
    # The pusher encodes each job once and joins them.
    params = '{"jobs":[' + ",".join(job(f"id{i}").to_json() for i in range(3)) + "]}"

    async with JobsClient.connect(service.url) as client:
        assert await client.call_encoded("jobs.PushBatch", params) == {}

    assert service.stored_ids() == {"id0", "id1", "id2"}


async def test_a_request_in_parts_larger_than_a_frame_arrives_whole(service: Service) -> None:
    # Parts are never joined: a big request goes out in several frames of one
    # message, and calls before and after it are unaffected.
    big = job("big", payload="x" * (FRAGMENT_CHARS * 2 + 123) + "\u00e9\U0001f600")
    parts = ['{"jobs":[', big.to_json(), ",", job("small").to_json(), "]}"]

    async with JobsClient.connect(service.url) as client:
        assert "smtp" in (await client.call("jobs.List", {}))["pipelines"]
        assert await client.call_encoded("jobs.PushBatch", parts) == {}
        assert "smtp" in (await client.call("jobs.List", {}))["pipelines"]

    assert service.stored_ids() == {"big", "small"}
    with sqlite3.connect(service.settings.database) as db:
        row = db.execute("SELECT payload, payload_file FROM jobs WHERE id = 'big'").fetchone()
    assert payload_of(service.settings.database, *row) == big.payload


def test_fragments_cut_and_join_parts_to_the_frame_size() -> None:
    parts = ["ab", "cdefg", "", "h", "ijklmnopq"]

    pieces = list(_fragments(parts, 4))

    assert pieces == ["abcd", "efgh", "ijkl", "mnop", "q"]


async def test_error_replies_are_rpc_errors(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        with pytest.raises(RpcError) as caught:
            await client.call("jobs.Push", {"job": job("a", pipeline="nope").to_dict()})

        assert caught.value.code == NO_SUCH_PIPELINE
        assert caught.value.data == {"pipelines": ["nope"]}
        assert "no such pipeline: nope" in str(caught.value)
        assert await client.call("jobs.List", {}) == {
            "pipelines": ["dead-letter", "smtp"]
        }  # still usable


async def test_a_request_the_service_cannot_parse_fails_the_waiting_calls(
    service: Service,
) -> None:
    async with JobsClient.connect(service.url) as client:
        # The service answers with id null: no call can be matched to it.
        with pytest.raises(RpcError) as caught:
            await client.call_encoded("jobs.PushBatch", '{"jobs": [')

        assert caught.value.code == PARSE_ERROR
        assert await client.call("jobs.List", {}) == {"pipelines": ["dead-letter", "smtp"]}


async def test_many_concurrent_calls_on_one_client(service: Service) -> None:
    results: dict[int, Any] = {}

    async with JobsClient.connect(service.url) as client:

        async def call(i: int) -> None:
            if i % 3 == 0:
                results[i] = await client.call("jobs.List", {})
            else:
                results[i] = await client.call("jobs.Push", {"job": job(f"id{i}").to_dict()})

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(call, i)

    assert results == {
        i: {"pipelines": ["dead-letter", "smtp"]} if i % 3 == 0 else {} for i in range(300)
    }
    assert service.stored_ids() == {f"id{i}" for i in range(300) if i % 3}


async def test_replies_out_of_order_reach_their_callers(service: Service) -> None:
    results: dict[str, Any] = {}

    async with JobsClient.connect(service.url) as client, trio.open_nursery() as nursery:

        async def push() -> None:
            results["push"] = await client.call("jobs.Push", {"job": job("a").to_dict()})

        service.clock.arm()
        nursery.start_soon(push)
        with trio.fail_after(5):
            await service.clock.entered.wait()  # the push waits in the store

        # Sent later, answered first.
        with pytest.raises(RpcError) as caught:
            await client.call("jobs.Nope", {})
        assert caught.value.code == METHOD_NOT_FOUND
        assert "push" not in results
        service.clock.release()

    assert results == {"push": {}}


async def test_a_cancelled_call_leaves_the_client_usable(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        service.clock.arm()
        with trio.CancelScope() as scope:

            async def give_up() -> None:
                await service.clock.entered.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(give_up)
                await client.call("jobs.Push", {"job": job("a").to_dict()})
        assert scope.cancelled_caught
        service.clock.release()

        # Its late reply is dropped; the next call gets its own.
        assert await client.call("jobs.List", {}) == {"pipelines": ["dead-letter", "smtp"]}
        assert not client.closed


# -- connecting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [("wrong", "refused the token"), ("", "requires a token")],
)
async def test_a_refused_token_is_jobs_unavailable(
    nursery: trio.Nursery, tmp_path: Path, token: str, message: str
) -> None:
    service = await Service(tmp_path, token=SecretStr("right")).start(nursery)

    with pytest.raises(JobsUnavailable, match=message) as caught:
        async with JobsClient.connect(service.url, token=token):
            pytest.fail("connected")

    assert "401" in str(caught.value)
    async with JobsClient.connect(service.url, token="right") as client:
        assert await client.call("jobs.List", {}) == {"pipelines": ["dead-letter", "smtp"]}


async def test_a_refused_connection_says_so() -> None:
    # Bind a port and close it again without listening: nothing answers there.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(JobsUnavailable, match="Connection refused"):
        async with JobsClient.connect(f"ws://127.0.0.1:{port}/rpc"):
            pytest.fail("connected")


async def test_a_wrong_path_is_jobs_unavailable(service: Service) -> None:
    with pytest.raises(JobsUnavailable, match="HTTP 404"):
        async with JobsClient.connect(service.url.replace("/rpc", "/")):
            pytest.fail("connected")


async def test_nobody_listening_is_jobs_unavailable(service: Service) -> None:
    service.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(5), pytest.raises(JobsUnavailable, match="cannot connect"):
        async with JobsClient.connect(service.url):
            pytest.fail("connected")


async def test_a_silent_peer_times_out(nursery: trio.Nursery) -> None:
    # Accepts TCP connections (the kernel does) but never answers the handshake.
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    try:
        with trio.fail_after(5), pytest.raises(JobsUnavailable, match="timed out"):
            async with JobsClient.connect(f"ws://127.0.0.1:{port}/rpc", connect_timeout=0.1):
                pytest.fail("connected")
    finally:
        await listener.aclose()


def test_a_url_that_is_not_websocket_is_a_value_error() -> None:
    async def connect(url: str) -> None:
        async with JobsClient.connect(url):
            pass

    for url in ["http://localhost:6001/rpc", "ws:///rpc", "ws://localhost:99999/rpc"]:
        with pytest.raises(ValueError, match="jobs URL"):
            trio.run(connect, url)


async def test_user_errors_leave_the_block_unchanged(service: Service) -> None:
    with pytest.raises(KeyError):
        async with JobsClient.connect(service.url):
            raise KeyError("mine")


# -- losing the connection -----------------------------------------------------------


async def test_stopping_the_service_fails_pending_calls_promptly(service: Service) -> None:
    outcomes: dict[str, Any] = {}

    async with JobsClient.connect(service.url) as client:

        async def call(name: str, job_id: str) -> None:
            try:
                outcomes[name] = await client.call("jobs.Push", {"job": job(job_id).to_dict()})
            except JobsUnavailable as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            service.clock.arm()
            nursery.start_soon(call, "in the store", "a")
            with trio.fail_after(5):
                await service.clock.entered.wait()
            nursery.start_soon(call, "waiting", "b")
            await trio.testing.wait_all_tasks_blocked()

            with trio.fail_after(5):
                service.scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                service.clock.release()
        assert client.closed
        with pytest.raises(JobsUnavailable):
            await client.call("jobs.List", {})

    # The write already in the store commits and is answered; the other never
    # reached the store and fails, so the pusher can send it again elsewhere.
    assert outcomes["in the store"] == {}
    assert isinstance(outcomes["waiting"], JobsUnavailable)
    assert service.stored_ids() == {"a"}


async def test_leaving_the_block_fails_calls_still_waiting(service: Service) -> None:
    outcomes: list[Any] = []

    async with trio.open_nursery() as nursery:
        async with JobsClient.connect(service.url) as client:

            async def call() -> None:
                try:
                    outcomes.append(await client.call("jobs.Push", {"job": job("a").to_dict()}))
                except JobsUnavailable as exc:
                    outcomes.append(exc)

            service.clock.arm()
            nursery.start_soon(call)
            with trio.fail_after(5):
                await service.clock.entered.wait()
        service.clock.release()

    [outcome] = outcomes
    assert isinstance(outcome, JobsUnavailable)
    assert "closed by this client" in str(outcome)


async def test_a_reply_over_max_message_size_is_jobs_unavailable(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": job("a", payload="x" * 2000).to_dict()})

    async with JobsClient.connect(service.url, max_message_size=1000) as client:
        with pytest.raises(JobsUnavailable) as caught:
            await client.call("jobs.Reserve", {"pipeline": "smtp", "max": 1, "lease": 60})

    assert caught.value.close_code == 1009


async def test_a_reply_that_is_not_json_rpc_fails_the_client(nursery: trio.Nursery) -> None:
    async def babble(ws: WebSocketConnection) -> None:
        await ws.get_message()
        await ws.send_message('{"hello": "world"}')
        await ws.get_message()  # until the client closes

    url = await start_peer(nursery, babble)

    async with JobsClient.connect(url) as client:
        with trio.fail_after(5), pytest.raises(JobsUnavailable, match="invalid reply"):
            await client.call("jobs.List", {})
        assert client.closed


async def test_a_peer_that_hangs_up_fails_waiting_calls(nursery: trio.Nursery) -> None:
    requests: list[Any] = []
    hang_up = trio.Event()

    async def hold_then_hang_up(ws: WebSocketConnection) -> None:
        for _ in range(3):
            requests.append(json.loads(await ws.get_message()))
        await hang_up.wait()
        await ws.aclose(1011, "going down")

    url = await start_peer(nursery, hold_then_hang_up)
    failures: list[JobsUnavailable] = []

    async with JobsClient.connect(url) as client:

        async def call() -> None:
            with pytest.raises(JobsUnavailable) as caught:
                await client.call("jobs.List", {})
            failures.append(caught.value)

        with trio.fail_after(5):
            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                assert sorted(request["id"] for request in requests) == [1, 2, 3]
                hang_up.set()

    assert [failure.close_code for failure in failures] == [1011] * 3
    assert "going down" in str(failures[0])


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65_535, 65_536, 65_537, 1_000_003])
@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_our_frames_parse_in_wsproto_at_every_length_boundary(
    length: int, finished: bool, masked: bool
) -> None:
    # send_text and send_message build frames themselves (header, a client's
    # key and masked payload); wsproto on the other side must read them.
    payload = ("é" * (length // 2) + "x" * (length % 2)).encode()
    key = os.urandom(4) if masked else b""
    frame = frame_header(0x1, finished=finished, length=len(payload), key=key)
    peer = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    peer.receive_data(frame + (wsmask.mask(payload, key) if masked else payload))
    events = [event for event in peer.events() if isinstance(event, TextMessage)]
    assert "".join(event.data for event in events).encode() == payload
    assert events[-1].message_finished is finished
