"""The anyio WebSocket JSON-RPC connection, against the real jobs service."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from trismtp.consumer import HandshakeRejected, JobsUnavailable, RpcClient, RpcError
from trismtp.jsonrpc import METHOD_NOT_FOUND

from ..e2e.trismtp_e2e import HOST, Launcher, free_port

pytestmark = pytest.mark.anyio

TOKEN = "consumer-client-token-0123456789"


async def test_calls_with_the_token_and_many_in_flight(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})
    async with RpcClient.connect(service.url, token=TOKEN) as client:
        replies: list[object] = []

        async def call(method: str) -> None:
            replies.append(await client.call(method, {}))

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(call, "jobs.List")
                tasks.start_soon(call, "jobs.Stat")
        assert len(replies) == 40
        assert sum("smtp" in reply.get("pipelines", []) for reply in replies) == 20  # type: ignore[attr-defined]
        with pytest.raises(RpcError) as info:
            await client.call("jobs.Nope", {})
        assert info.value.code == METHOD_NOT_FOUND
        assert not client.closed


async def test_a_refused_or_missing_token_is_said_plainly(launch: Launcher) -> None:
    service = launch.jobs_service({"jobs_service": {"token": TOKEN}})
    with pytest.raises(HandshakeRejected, match=r"refused the token \(HTTP 401\)") as info:
        async with RpcClient.connect(service.url, token="wrong"):
            pass
    assert info.value.status_code == 401
    with pytest.raises(HandshakeRejected, match=r"requires a token \(HTTP 401\)"):
        async with RpcClient.connect(service.url):
            pass


async def test_nobody_listening_is_connection_refused() -> None:
    url = f"ws://{HOST}:{free_port()}/rpc"
    with pytest.raises(JobsUnavailable, match="Connection refused"):
        async with RpcClient.connect(url):
            pass


async def test_calls_fail_once_the_service_is_gone(launch: Launcher) -> None:
    service = launch.jobs_service()
    async with RpcClient.connect(service.url) as client:
        await client.call("jobs.List", {})
        service.kill()
        with pytest.raises(JobsUnavailable, match="lost the connection"):
            await client.call("jobs.List", {})
        await client.wait_closed()
        assert client.closed


async def fake_service(
    script: Callable[[anyio.abc.ByteStream, WSConnection], Awaitable[None]],
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A WebSocket server that is not the jobs service: *script* plays its part
    after the handshake (wsproto's server side, on an anyio listener)."""
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            ws = WSConnection(ConnectionType.SERVER)
            while True:
                ws.receive_data(await stream.receive())
                requests = [e for e in ws.events() if isinstance(e, Request)]
                if requests:
                    await stream.send(ws.send(AcceptConnection()))
                    break
            await script(stream, ws)

    task_status.started(listener.extra(SocketAttribute.local_port))
    await listener.serve(handle)


async def next_event(stream: anyio.abc.ByteStream, ws: WSConnection) -> Event:
    while True:
        for event in ws.events():
            return event
        ws.receive_data(await stream.receive())


async def test_pings_are_answered_and_fragments_joined() -> None:
    pongs: list[bytes] = []

    async def script(stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        await stream.send(ws.send(Ping(payload=b"are you there")))
        # The pong and the request come in either order.
        request: TextMessage | None = None
        while request is None or not pongs:
            event = await next_event(stream, ws)
            if isinstance(event, Pong):
                pongs.append(bytes(event.payload))
            else:
                assert isinstance(event, TextMessage), event
                request = event
        reply = json.dumps({"jsonrpc": "2.0", "id": json.loads(request.data)["id"],
                            "result": {"text": "é" * 1000}})  # fmt: skip
        await stream.send(ws.send(TextMessage(data=reply[:700], message_finished=False)))
        await stream.send(ws.send(TextMessage(data=reply[700:], message_finished=True)))
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tasks:
        port = await tasks.start(fake_service, script)
        async with RpcClient.connect(f"ws://{HOST}:{port}/rpc") as client:
            with anyio.fail_after(10):
                assert await client.call("jobs.List", {}) == {"text": "é" * 1000}
        tasks.cancel_scope.cancel()
    assert pongs == [b"are you there"]


async def test_a_reply_over_the_size_limit_closes_with_1009() -> None:
    async def script(stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        request = await next_event(stream, ws)
        assert isinstance(request, TextMessage)
        reply = {"jsonrpc": "2.0", "id": json.loads(request.data)["id"], "result": "x" * 5000}
        await stream.send(ws.send(TextMessage(data=json.dumps(reply))))
        closing = await next_event(stream, ws)
        assert isinstance(closing, CloseConnection)
        assert closing.code == 1009

    async with anyio.create_task_group() as tasks:
        port = await tasks.start(fake_service, script)
        url = f"ws://{HOST}:{port}/rpc"
        async with RpcClient.connect(url, max_message_size=1000) as client:
            with anyio.fail_after(10), pytest.raises(JobsUnavailable) as info:
                await client.call("jobs.List", {})
        assert info.value.close_code == 1009
        assert "larger than the receiver accepts" in str(info.value)
        tasks.cancel_scope.cancel()
