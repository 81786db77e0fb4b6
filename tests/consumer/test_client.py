"""The anyio WebSocket JSON-RPC connection, against the real jobs service."""

from __future__ import annotations

import anyio
import pytest

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
