"""The jobs service over real sockets: methods, JSON-RPC framing, auth, stop."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr
from trio_websocket import (
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from trismtp.jobs.rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_SUCH_PIPELINE,
    PARSE_ERROR,
    JobsClient,
    JobsUnavailable,
    RpcError,
)
from trismtp.service.server import METHODS, Request, decode_message, serve_jobs
from trismtp.settings import HostPort, JobsServiceSettings

from ..gate_clock import GateClock


@dataclass
class Service:
    url: str
    database: Path
    scope: trio.CancelScope  # cancel it to stop the service, as the daemon does


async def start_service(
    nursery: trio.Nursery, settings: JobsServiceSettings, **kwargs: Any
) -> Service:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[HostPort]) -> None:
        with scope:
            await serve_jobs(settings, task_status=task_status, **kwargs)

    address: HostPort = await nursery.start(run)
    return Service(f"ws://{address}/rpc", settings.database, scope)


def service_settings(tmp_path: Path, **overrides: Any) -> JobsServiceSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "database": tmp_path / "jobs.sqlite3",
        "pipelines": ["smtp"],
    }
    values.update(overrides)
    return JobsServiceSettings(**values)


def job(job_id: str, pipeline: str = "smtp", **options: Any) -> dict[str, Any]:
    return {
        "job": "smtp.email",
        "id": job_id,
        "payload": json.dumps({"event": "EMAIL_RECEIVED", "uuid": job_id}),
        "headers": {"uuid": [job_id], "payload_class": ["smtp:handler"]},
        "options": {"pipeline": pipeline, **options},
    }


def stored_ids(database: Path) -> set[str]:
    """What is in the SQLite file, read through a connection of our own."""
    with sqlite3.connect(database) as db:
        return {job_id for (job_id,) in db.execute("SELECT id FROM jobs")}


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path) -> Service:
    return await start_service(nursery, service_settings(tmp_path))


@pytest.fixture
async def client(service: Service) -> AsyncIterator[JobsClient]:
    async with JobsClient.connect(service.url) as client:
        yield client


async def exchange(url: str, message: str) -> Any:
    """Send one raw text message and return the decoded reply."""
    ws: WebSocketConnection
    async with open_websocket_url(url) as ws:
        await ws.send_message(message)
        return json.loads(await ws.get_message())


async def handshake_status(
    url: str, headers: list[tuple[bytes, bytes]] | None = None
) -> int | None:
    """The HTTP status that refused the handshake, or None if it was accepted."""
    # A stream of our own: trio-websocket leaves its own open on a refusal.
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    status: int | None = None
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, parts.netloc, resource, extra_headers=headers
            )
            await ws.aclose()
    except* ConnectionRejected as group:
        [rejected] = group.exceptions
        assert isinstance(rejected, ConnectionRejected)
        status = rejected.status_code
    finally:
        await trio.aclose_forcefully(stream)
    return status


# -- methods -------------------------------------------------------------------


async def test_every_method(client: JobsClient, service: Service) -> None:
    assert await client.call("jobs.Declare", {"pipeline": {"name": "bulk", "priority": "5"}}) == {}
    assert await client.call("jobs.List", {}) == {"pipelines": ["bulk", "dead-letter", "smtp"]}
    assert await client.call("jobs.Push", {"job": job("a")}) == {}
    assert await client.call("jobs.PushBatch", {"jobs": [job("b"), job("c", "bulk")]}) == {}

    stats = (await client.call("jobs.Stat", {}))["stats"]
    assert [(s["pipeline"], s["active"], s["priority"], s["ready"]) for s in stats] == [
        ("bulk", 1, 5, True),
        ("dead-letter", 0, 10, True),
        ("smtp", 2, 10, True),
    ]
    assert set(stats[0]) == {
        "pipeline",
        "driver",
        "queue",
        "active",
        "delayed",
        "reserved",
        "ready",
        "priority",
    }

    peeked = await client.call("jobs.Peek", {"pipeline": "smtp", "max": 10})
    assert [j["id"] for j in peeked["jobs"]] == ["a", "b"]
    reserved = await client.call("jobs.Reserve", {"pipeline": "smtp", "max": 10, "lease": 60})
    leases = [j.pop("lease") for j in reserved["jobs"]]
    assert reserved["jobs"] == peeked["jobs"]
    assert reserved == {
        "jobs": [
            {
                **job("a"),
                "options": {"pipeline": "smtp", "priority": 10, "delay": 0, "auto_ack": False},
            },
            {
                **job("b"),
                "options": {"pipeline": "smtp", "priority": 10, "delay": 0, "auto_ack": False},
            },
        ]
    }
    assert [lease["attempt"] for lease in leases] == [1, 1]
    assert leases[0]["token"] != leases[1]["token"]
    assert all(isinstance(lease["expires_at"], float) for lease in leases)
    a, b = ({"id": j, "token": lease["token"]} for j, lease in zip("ab", leases, strict=True))
    assert await client.call("jobs.Extend", {"jobs": [a, b], "lease": 120}) == {"extended": 2}
    assert await client.call("jobs.Ack", {"jobs": [a]}) == {"acked": 1}
    assert await client.call("jobs.Nack", {"jobs": [b], "requeue": True, "delay": 0}) == {
        "nacked": 1
    }
    again = await client.call("jobs.Reserve", {"pipeline": "smtp", "max": 10, "lease": 60})
    [b_again] = again["jobs"]
    assert (b_again["id"], b_again["lease"]["attempt"]) == ("b", 2)
    b2 = {"id": "b", "token": b_again["lease"]["token"]}
    assert await client.call("jobs.Nack", {"jobs": [b2], "requeue": False}) == {"nacked": 1}

    assert await client.call("jobs.Pause", {"pipelines": ["bulk"]}) == {}
    assert await client.call("jobs.Reserve", {"pipeline": "bulk", "max": 1, "lease": 1}) == {
        "jobs": []
    }
    assert await client.call("jobs.Resume", {"pipelines": ["bulk"]}) == {}
    assert await client.call("jobs.Destroy", {"pipelines": ["bulk"]}) == {}
    assert await client.call("jobs.List", {}) == {"pipelines": ["dead-letter", "smtp"]}
    assert stored_ids(service.database) == set()


async def test_push_batch_is_on_disk_when_the_reply_arrives(
    client: JobsClient, service: Service
) -> None:
    await client.call("jobs.PushBatch", {"jobs": [job(f"id{i}") for i in range(100)]})

    assert stored_ids(service.database) == {f"id{i}" for i in range(100)}


async def test_pushing_an_id_again_succeeds_and_stores_nothing(
    client: JobsClient, service: Service
) -> None:
    await client.call("jobs.Push", {"job": job("a")})

    assert await client.call("jobs.PushBatch", {"jobs": [job("a"), job("a")]}) == {}

    assert stored_ids(service.database) == {"a"}


async def test_unknown_pipeline_is_refused_and_nothing_stored(
    client: JobsClient, service: Service
) -> None:
    with pytest.raises(RpcError) as caught:
        await client.call("jobs.PushBatch", {"jobs": [job("a"), job("b", "nope")]})

    assert caught.value.code == NO_SUCH_PIPELINE
    assert caught.value.data == {"pipelines": ["nope"]}
    assert stored_ids(service.database) == set()


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("jobs.PushBatch", {"jobs": [{"id": "x"}]}, "jobs.0.job"),
        ("jobs.Push", {"job": {**job("a"), "options": {}}}, "job.options.pipeline"),
        ("jobs.Reserve", {"pipeline": "smtp", "max": 0, "lease": 1}, "max"),
        ("jobs.Reserve", {"pipeline": "smtp", "max": 1}, "lease"),
        ("jobs.Nack", {"jobs": [{"id": "a", "token": "t"}], "delay": -1}, "delay"),
        ("jobs.Pause", {}, "pipelines"),
        ("jobs.Declare", {"pipeline": {"priority": 1}}, "pipeline.name"),
    ],
)
async def test_invalid_params_name_the_field(
    client: JobsClient, method: str, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(RpcError) as caught:
        await client.call(method, params)

    assert caught.value.code == INVALID_PARAMS
    assert f": {field}: " in caught.value.message


async def test_unknown_method(client: JobsClient) -> None:
    with pytest.raises(RpcError) as caught:
        await client.call("jobs.Frobnicate", {})

    assert caught.value.code == METHOD_NOT_FOUND


async def test_configured_pipelines_are_declared_at_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, pipelines=["smtp", "bounces"])
    service = await start_service(nursery, settings)

    async with JobsClient.connect(service.url) as client:
        assert await client.call("jobs.List", {}) == {
            "pipelines": ["bounces", "dead-letter", "smtp"]
        }


# -- JSON-RPC framing ----------------------------------------------------------------


async def test_bad_json_is_a_parse_error(service: Service) -> None:
    reply = await exchange(service.url, '{"jsonrpc": "2.0", "method": ')

    assert reply["id"] is None
    assert reply["error"]["code"] == PARSE_ERROR


async def test_batch_array(service: Service) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "jobs.Push", "params": {"job": job("a")}},
        {"jsonrpc": "2.0", "method": "jobs.Push", "params": {"job": job("b")}},  # notification
        {"jsonrpc": "2.0", "id": "two", "method": "jobs.Nope"},
        {"jsonrpc": "1.0", "id": 3, "method": "jobs.List"},
        {"jsonrpc": "2.0", "id": 4, "method": "jobs.List"},
    ]

    replies = await exchange(service.url, json.dumps(batch))

    by_id = {reply["id"]: reply for reply in replies}
    assert set(by_id) == {1, "two", 3, 4}
    assert by_id[1]["result"] == {}
    assert by_id["two"]["error"]["code"] == METHOD_NOT_FOUND
    assert by_id[3]["error"]["code"] == INVALID_REQUEST
    assert by_id[4]["result"] == {"pipelines": ["dead-letter", "smtp"]}
    assert stored_ids(service.database) == {"a", "b"}


async def test_empty_batch_is_an_invalid_request(service: Service) -> None:
    reply = await exchange(service.url, "[]")

    assert reply["error"]["code"] == INVALID_REQUEST


async def test_notifications_alone_get_no_reply(service: Service) -> None:
    notification = {"jsonrpc": "2.0", "method": "jobs.Push", "params": {"job": job("a")}}
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        await ws.send_message(json.dumps(notification))
        await ws.send_message(json.dumps([notification | {"params": {"job": job("b")}}]))
        # A write, so it goes through the writer after the pushes (a read would not).
        await ws.send_message(
            '{"jsonrpc": "2.0", "id": 7, "method": "jobs.Resume", "params": {"pipelines": []}}'
        )

        # Replies to the three messages may come in any order, but only one exists.
        assert json.loads(await ws.get_message())["id"] == 7
        assert stored_ids(service.database) == {"a", "b"}


async def test_a_slow_request_does_not_hold_up_others(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    clock = GateClock()
    service = await start_service(nursery, service_settings(tmp_path), clock=clock)
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        clock.arm()
        await ws.send_message(
            json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "jobs.Push", "params": {"job": job("a")}}
            )
        )
        await clock.entered.wait()  # the push is stuck in the store
        # Decoding and refusing need no store: answered while the push waits.
        await ws.send_message('{"jsonrpc": "2.0", "id": 2, "method": "jobs.Nope"}')
        assert json.loads(await ws.get_message())["id"] == 2
        clock.release()
        assert json.loads(await ws.get_message()) == {"jsonrpc": "2.0", "id": 1, "result": {}}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    ),
    st.sampled_from([*METHODS, "jobs.Nope"]),
    st.one_of(st.none(), st.integers(), st.text(), st.booleans(), st.floats()),
)
def test_any_message_decodes_to_an_answer(params: Any, method: str, request_id: Any) -> None:
    for data in (
        params,
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
        [{"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}],
    ):
        decoded = decode_message(json.dumps(data))

        for request in decoded if isinstance(decoded, list) else [decoded]:
            if isinstance(request, Request):
                assert (request.params is None) != (request.failure is None)
                if request.failure is not None:
                    json.dumps(request.response(failure=request.failure))  # must be JSON
            else:
                json.dumps(request.to_dict())


def test_undecodable_messages_are_parse_errors() -> None:
    messages: list[str | bytes] = ["", "{", "[" * 100_000, '{"a": NaN}', b"\xff\xfe{"]
    for message in messages:
        decoded = decode_message(message)
        assert not isinstance(decoded, list | Request)
        assert decoded.code == PARSE_ERROR


# -- the handshake -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 401),
        ([(b"authorization", b"Bearer wrong")], 401),
        ([(b"authorization", b"Basic c2VjcmV0")], 401),
        ([(b"authorization", b"Bearer secret")], None),
        ([(b"Authorization", b"bearer  secret")], None),
    ],
)
async def test_token(
    nursery: trio.Nursery,
    tmp_path: Path,
    headers: list[tuple[bytes, bytes]],
    status: int | None,
) -> None:
    settings = service_settings(tmp_path, token=SecretStr("secret"))
    service = await start_service(nursery, settings)

    assert await handshake_status(service.url, headers) == status


async def test_wrong_path_is_404(service: Service) -> None:
    assert await handshake_status(service.url.replace("/rpc", "/jobs")) == 404
    assert await handshake_status(service.url + "?v=1") is None


async def test_the_token_is_never_logged(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    settings = service_settings(tmp_path, token=SecretStr("s3cr3t-t0ken"))
    service = await start_service(nursery, settings)

    async with JobsClient.connect(service.url, token="s3cr3t-t0ken") as client:
        await client.call("jobs.List", {})
    with pytest.raises(JobsUnavailable):
        async with JobsClient.connect(service.url, token="wr0ng-t0ken"):
            pass

    assert "listening on ws://127.0.0.1:" in caplog.text
    assert "t0ken" not in caplog.text


async def test_a_request_over_the_size_limit_closes_the_connection(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service(nursery, service_settings(tmp_path, max_request_bytes=4096))

    async with JobsClient.connect(service.url) as client:
        with pytest.raises(JobsUnavailable, match="1009") as caught:
            await client.call("jobs.Push", {"job": job("a") | {"payload": "x" * 5000}})

    assert caught.value.close_code == 1009
    assert stored_ids(service.database) == set()
    assert "max_request_bytes is 4096" in caplog.text


# -- stopping ------------------------------------------------------------------------


async def test_stopping_still_answers_a_write_in_progress(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    clock = GateClock()
    service = await start_service(nursery, service_settings(tmp_path), clock=clock)
    replies: list[Any] = []

    async with JobsClient.connect(service.url) as client, trio.open_nursery() as calls:

        async def push() -> None:
            replies.append(await client.call("jobs.PushBatch", {"jobs": [job("a"), job("b")]}))

        clock.arm()
        calls.start_soon(push)
        with trio.fail_after(5):
            await clock.entered.wait()
        service.scope.cancel()  # the daemon shuts down while the batch commits
        await trio.testing.wait_all_tasks_blocked()
        clock.release()

    assert replies == [{}]
    assert stored_ids(service.database) == {"a", "b"}


async def test_stopping_fails_pending_and_later_calls_promptly(
    client: JobsClient, service: Service
) -> None:
    await client.call("jobs.List", {})

    service.scope.cancel()

    with trio.fail_after(5):
        with pytest.raises(JobsUnavailable):
            await client.call("jobs.List", {})
        assert client.closed
        with pytest.raises(JobsUnavailable):
            await client.call("jobs.List", {})
