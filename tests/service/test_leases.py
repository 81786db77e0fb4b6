"""Leases a consumer can trust, over the real service: tokens, attempts, dead letters,
remembered acks, bounded replies, and params refused with -32602."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trismtp.jobs.rpc import INVALID_PARAMS, LEASE_LOST, JobsClient, LeaseLost, RpcError

from .test_server import Service, job, service_settings, start_service, stored_ids


class Clock:
    """The service's wall clock, moved by the test so leases expire without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path, clock: Clock) -> Service:
    settings = service_settings(tmp_path, max_attempts=3)
    return await start_service(nursery, settings, clock=clock)


async def reserve(client: JobsClient, lease: float = 30, **params: Any) -> list[dict[str, Any]]:
    params = {"pipeline": "smtp", "max": 10, "lease": lease, **params}
    jobs: list[dict[str, Any]] = (await client.call("jobs.Reserve", params))["jobs"]
    return jobs


def ref(reserved: dict[str, Any]) -> dict[str, str]:
    return {"id": reserved["id"], "token": reserved["lease"]["token"]}


async def stat(client: JobsClient, pipeline: str = "smtp") -> dict[str, Any]:
    stats = (await client.call("jobs.Stat", {}))["stats"]
    [entry] = [s for s in stats if s["pipeline"] == pipeline]
    return {k: entry[k] for k in ("active", "delayed", "reserved")}


# -- the three ways a consumer was hurt before leases had tokens ---------------


async def test_a_late_ack_does_not_delete_the_job_another_consumer_holds(
    service: Service, clock: Clock
) -> None:
    async with JobsClient.connect(service.url) as a, JobsClient.connect(service.url) as b:
        await a.call("jobs.Push", {"job": job("j")})
        [held_by_a] = await reserve(a, lease=30)
        clock.now += 31  # A is too slow: its lease runs out
        [held_by_b] = await reserve(b, lease=30)
        assert held_by_b["lease"]["attempt"] == 2

        with pytest.raises(LeaseLost) as caught:
            await a.call("jobs.Ack", {"jobs": [ref(held_by_a)]})

        assert caught.value.code == LEASE_LOST
        assert caught.value.data == {"stale": ["j"], "acked": 0}
        assert stored_ids(service.database) == {"j"}  # B's job is still there
        assert await b.call("jobs.Ack", {"jobs": [ref(held_by_b)]}) == {"acked": 1}
        assert stored_ids(service.database) == set()


async def test_a_late_nack_does_not_hand_the_job_to_a_third_consumer(
    service: Service, clock: Clock
) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": job("j")})
        [held_by_a] = await reserve(client, lease=30)
        clock.now += 31
        [held_by_b] = await reserve(client, lease=30)

        with pytest.raises(LeaseLost) as caught:
            await client.call("jobs.Nack", {"jobs": [ref(held_by_a)], "requeue": True})

        assert caught.value.data == {"stale": ["j"], "nacked": 0}
        assert await reserve(client) == []  # C gets nothing: B still holds it
        assert await stat(client) == {"active": 0, "delayed": 0, "reserved": 1}
        assert await client.call("jobs.Ack", {"jobs": [ref(held_by_b)]}) == {"acked": 1}


async def test_a_resend_of_an_acked_id_is_not_stored_again(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.PushBatch", {"jobs": [job("j"), job("other")]})
        reserved = await reserve(client)
        assert await client.call("jobs.Ack", {"jobs": [ref(r) for r in reserved]}) == {"acked": 2}

        # The pusher never saw its ack and pushes the same ids again.
        assert await client.call("jobs.PushBatch", {"jobs": [job("j"), job("new")]}) == {}

        assert stored_ids(service.database) == {"new"}
        assert [r["id"] for r in await reserve(client)] == ["new"]


# -- the rest of the lease contract --------------------------------------------


async def test_a_slow_consumer_can_still_ack_when_nobody_took_the_job(
    service: Service, clock: Clock
) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": job("j")})
        [held] = await reserve(client, lease=30)
        clock.now += 300

        assert await client.call("jobs.Ack", {"jobs": [ref(held)]}) == {"acked": 1}
        # Acking again with the same token (a retry whose reply was lost) is no error.
        assert await client.call("jobs.Ack", {"jobs": [ref(held)]}) == {"acked": 1}


async def test_current_tokens_are_acted_on_even_when_others_are_stale(
    service: Service, clock: Clock
) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.PushBatch", {"jobs": [job("a"), job("b")]})
        first = {r["id"]: r for r in await reserve(client)}
        wrong = {"id": "b", "token": "not-the-token"}

        with pytest.raises(LeaseLost) as caught:
            await client.call("jobs.Ack", {"jobs": [ref(first["a"]), wrong]})

        assert (caught.value.stale, caught.value.done) == (["b"], 1)
        assert stored_ids(service.database) == {"b"}


async def test_extend_keeps_the_lease_past_its_first_expiry(service: Service, clock: Clock) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": job("j")})
        [held] = await reserve(client, lease=30)
        clock.now += 20
        assert await client.call("jobs.Extend", {"jobs": [ref(held)], "lease": 60}) == {
            "extended": 1
        }
        clock.now += 50  # past the first lease, inside the extension

        assert await reserve(client) == []
        assert await stat(client) == {"active": 0, "delayed": 0, "reserved": 1}
        clock.now += 11
        [again] = await reserve(client)
        with pytest.raises(LeaseLost):
            await client.call("jobs.Extend", {"jobs": [ref(held)], "lease": 60})
        assert await client.call("jobs.Ack", {"jobs": [ref(again)]}) == {"acked": 1}


async def test_a_job_that_keeps_failing_goes_to_the_dead_letter_pipeline(
    service: Service, clock: Clock
) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": job("poison")})
        for attempt in (1, 2):
            [held] = await reserve(client)
            assert held["lease"]["attempt"] == attempt
            await client.call("jobs.Nack", {"jobs": [ref(held)], "requeue": True})
        [held] = await reserve(client)
        assert held["lease"]["attempt"] == 3
        clock.now += 31  # the third delivery's lease runs out too

        assert await reserve(client) == []
        [dead] = await reserve(client, pipeline="dead-letter")
        assert dead["id"] == "poison"
        assert dead["options"]["pipeline"] == "dead-letter"
        assert dead["headers"]["dead_letter_from"] == ["smtp"]
        assert dead["headers"]["attempts"] == ["3"]
        assert dead["headers"]["uuid"] == ["poison"]  # its own headers are kept
        assert await client.call("jobs.Ack", {"jobs": [ref(dead)]}) == {"acked": 1}


async def test_the_old_ids_form_is_refused_with_a_pointer_to_the_new_one(
    client: JobsClient,
) -> None:
    for method in ("jobs.Ack", "jobs.Nack"):
        with pytest.raises(RpcError) as caught:
            await client.call(method, {"ids": ["a"]})
        assert caught.value.code == INVALID_PARAMS
        assert '"jobs": [{"id": ID, "token": T}' in caught.value.message


@pytest.fixture
async def client(service: Service) -> Any:
    async with JobsClient.connect(service.url) as client:
        yield client


# -- replies bounded by bytes --------------------------------------------------


async def raw_call(url: str, method: str, params: dict[str, Any]) -> str:
    ws: WebSocketConnection
    async with open_websocket_url(url, max_message_size=256 * 1024 * 1024) as ws:
        await ws.send_message(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        )
        reply = await ws.get_message()
        assert isinstance(reply, str)
        return reply


@pytest.mark.parametrize("method", ["jobs.Reserve", "jobs.Peek"])
async def test_replies_stay_under_max_bytes(service: Service, method: str) -> None:
    payload = "x" * 300_000
    async with JobsClient.connect(service.url) as client:
        await client.call(
            "jobs.PushBatch", {"jobs": [job(f"j{i}") | {"payload": payload} for i in range(10)]}
        )
    params = {"pipeline": "smtp", "max": 10, "lease": 30, "max_bytes": 1}  # clamped: 1 MiB

    reply = await raw_call(service.url, method, params)

    assert len(reply.encode()) <= 1024 * 1024
    assert len(json.loads(reply)["result"]["jobs"]) == 3


async def test_a_job_bigger_than_max_bytes_still_comes_alone(service: Service) -> None:
    async with JobsClient.connect(service.url) as client:
        await client.call(
            "jobs.PushBatch",
            {"jobs": [job("big") | {"payload": "x" * 1_500_000}, job("small")]},
        )
        params = {"max": 10, "max_bytes": 1024 * 1024}

        assert [r["id"] for r in await reserve(client, **params)] == ["big"]
        assert [r["id"] for r in await reserve(client, **params)] == ["small"]


# -- bad input is -32602, never -32603 -----------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("jobs.Push", {"job": job("a", priority=2**63)}, "job.options.priority"),
        ("jobs.Push", {"job": job("a", delay=2**63)}, "job.options.delay"),
        ("jobs.Push", {"job": job("a", delay=10**9)}, "job.options.delay"),
        ("jobs.Push", {"job": job("a", " ")}, "job.options.pipeline"),
        ("jobs.Reserve", {"pipeline": "smtp", "max": 1, "lease": 1e300}, "lease"),
        ("jobs.Reserve", {"pipeline": "smtp", "max": 1, "lease": 86401}, "lease"),
        ("jobs.Reserve", {"pipeline": "smtp", "max": 1001, "lease": 1}, "max"),
        ("jobs.Reserve", {"pipeline": " ", "max": 1, "lease": 1}, "pipeline"),
        ("jobs.Peek", {"pipeline": "\n"}, "pipeline"),
        ("jobs.Nack", {"jobs": [{"id": "a", "token": "t"}], "delay": 1e308}, "delay"),
        ("jobs.Extend", {"jobs": [{"id": "a", "token": "t"}], "lease": 1e9}, "lease"),
        ("jobs.Ack", {"jobs": [{"id": "a"}]}, "jobs.0.token"),
        ("jobs.Declare", {"pipeline": {"name": " smtp"}}, "pipeline.name"),
        ("jobs.Declare", {"pipeline": {"name": "p", "priority": 2**64}}, "pipeline.priority"),
        ("jobs.Pause", {"pipelines": [""]}, "pipelines.0"),
    ],
)
async def test_out_of_range_params_are_invalid_params(
    service: Service, method: str, params: dict[str, Any], field: str
) -> None:
    reply = json.loads(await raw_call(service.url, method, params))

    assert reply["error"]["code"] == INVALID_PARAMS, reply
    assert f": {field}: " in reply["error"]["message"]


@pytest.mark.parametrize("request_id", [2**64 + 1, -(2**70), 12345678901234567890123, 7, "x"])
async def test_request_ids_are_echoed_exactly(service: Service, request_id: Any) -> None:
    message = '{"jsonrpc":"2.0","id":' + json.dumps(request_id) + ',"method":"jobs.List"}'
    ws: WebSocketConnection
    async with open_websocket_url(service.url) as ws:
        await ws.send_message(message)
        reply = await ws.get_message()
        assert isinstance(reply, str)

    assert json.loads(reply)["id"] == request_id
    assert f'"id":{json.dumps(request_id)}' in reply.replace(" ", "")


@pytest.mark.parametrize("request_id", [7, 2**64 + 1])
async def test_a_big_payload_comes_back_exactly_as_it_was_pushed(
    service: Service, request_id: int
) -> None:
    # Its file holds it as a JSON string, copied into the Reserve's reply as
    # it is; a request id past 64 bits takes the standard library's encoder.
    text = 'Grüße 😀 "quoted" back\\slash \r\n\t\u2028 <b>&amp;</b> '
    payload = json.dumps({"text": text * 20_000}, ensure_ascii=False)
    pushed = {**job("big"), "payload": payload}
    async with JobsClient.connect(service.url) as client:
        await client.call("jobs.Push", {"job": pushed})
    request = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "jobs.Reserve",
        "params": {"pipeline": "smtp", "max": 10, "lease": 30},
    }
    ws: WebSocketConnection
    async with open_websocket_url(service.url, max_message_size=16 * 2**20) as ws:
        await ws.send_message(json.dumps(request))
        reply = json.loads(await ws.get_message())

    assert reply["id"] == request_id
    [reserved] = reply["result"]["jobs"]
    assert reserved["payload"] == payload
    assert {k: v for k, v in reserved.items() if k not in ("payload", "lease")} == {
        k: v for k, v in pushed.items() if k != "payload"
    } | {"options": reserved["options"]}
