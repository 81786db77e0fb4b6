"""The sans-io JSON-RPC client framing, driven directly: text in, replies out."""

from __future__ import annotations

import json

import pytest

from trismtp.jsonrpc import (
    LEASE_LOST,
    PARSE_ERROR,
    ClientProtocol,
    ProtocolError,
    Reply,
    encode_params,
)


def test_requests_get_fresh_ids_and_carry_params_as_given() -> None:
    protocol = ClientProtocol()
    first, text = protocol.request("jobs.Ack", encode_params({"jobs": [{"id": "é", "token": "t"}]}))
    second, _ = protocol.request("jobs.List", "{}")
    assert (first, second) == (1, 2)
    assert json.loads(text) == {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "jobs.Ack",
        "params": {"jobs": [{"id": "é", "token": "t"}]},
    }
    assert "é" in text  # not \u-escaped: the service counts characters
    assert protocol.awaited == {1, 2}


def test_replies_in_any_order_and_in_a_batch_are_matched_by_id() -> None:
    protocol = ClientProtocol()
    for _ in range(3):
        protocol.request("jobs.List", "{}")
    assert protocol.receive('{"jsonrpc":"2.0","id":2,"result":{"n":2}}') == [Reply(2, {"n": 2})]
    batch = protocol.receive(
        '[{"jsonrpc":"2.0","id":3,"result":3},'
        '{"jsonrpc":"2.0","id":1,"error":{"code":-32006,"message":"lease lost",'
        '"data":{"stale":["a"]}}}]'
    )
    assert [reply.id for reply in batch] == [3, 1]
    error = batch[1].error
    assert error is not None
    assert (error.code, error.message, error.data) == (LEASE_LOST, "lease lost", {"stale": ["a"]})
    assert str(error) == "lease lost (JSON-RPC error -32006)"
    assert protocol.awaited == frozenset()


def test_a_reply_nobody_awaits_is_dropped() -> None:
    protocol = ClientProtocol()
    request_id, _ = protocol.request("jobs.List", "{}")
    protocol.forget(request_id)
    assert protocol.receive(f'{{"jsonrpc":"2.0","id":{request_id},"result":{{}}}}') == []
    assert protocol.receive('{"jsonrpc":"2.0","id":"other","result":{}}') == []


def test_an_error_without_id_answers_every_awaited_call() -> None:
    protocol = ClientProtocol()
    ids = [protocol.request("jobs.List", "{}")[0] for _ in range(2)]
    replies = protocol.receive(
        '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}'
    )
    assert [reply.id for reply in replies] == ids
    assert all(r.error is not None and r.error.code == PARSE_ERROR for r in replies)
    assert replies[0].error is not replies[1].error
    assert protocol.awaited == frozenset()


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1]",
        '{"id":1,"result":{}}',
        '{"jsonrpc":"2.0","id":1}',
        '{"jsonrpc":"2.0","id":1,"error":"bad"}',
        '{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}',
        "[" * 100_000,
    ],
)
def test_anything_but_a_response_is_a_protocol_error(message: str) -> None:
    protocol = ClientProtocol()
    protocol.request("jobs.List", "{}")
    with pytest.raises(ProtocolError):
        protocol.receive(message)


def test_replies_read_the_same_whichever_json_parser_reads_them() -> None:
    # orjson reads replies (a Reserve's carries megabytes of payload); what it
    # refuses and the standard library reads still comes through as before.
    protocol = ClientProtocol()
    for _ in range(3):
        protocol.request("jobs.List", "{}")
    payload = json.dumps({"subject": "Grüße", "body": "line\r\n" * 1000})
    reply = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"payload": payload}})
    assert protocol.receive(reply.encode()) == [Reply(1, {"payload": payload})]
    (nan,) = protocol.receive('{"jsonrpc":"2.0","id":2,"result":{"x":NaN}}')
    assert nan.result["x"] != nan.result["x"]
    lone = protocol.receive('{"jsonrpc":"2.0","id":3,"result":"\\ud800"}')
    assert lone == [Reply(3, "\ud800")]
