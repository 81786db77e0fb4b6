"""Frame masking in C (trismtp.wsmask): the same bytes as wsproto's, on every path.

The masker is swapped into wsproto by name; these tests fail if the swap is
gone (an upgrade of wsproto or websockets that bypasses it would quietly
make every big PushBatch ~80 ms slower) and if it changed one byte on the
wire (checked against wsproto's own masker, and against peers in another
process that never loaded trismtp).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, Message, TextMessage

from trismtp import wsmask
from trismtp.jobs.rpc import JobsClient
from trismtp.jobs.websocket import FRAGMENT_CHARS

from .service.test_server import job, service_settings, start_service, stored_ids
from .stored import payload_of


@pytest.mark.parametrize(
    "module", ["trismtp.jobs.rpc", "trismtp.service.server", "trismtp.consumer"]
)
def test_loading_either_end_makes_wsproto_mask_in_c(module: str) -> None:
    # In a fresh interpreter: loading the client or the service alone is enough.
    check = f"import {module}, trismtp.wsmask; assert trismtp.wsmask.installed()"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, (
        f"wsproto masks in Python after importing {module} "
        f"(is websockets, with its C speedups, installed?): {result.stderr}"
    )


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    data=st.binary(max_size=3000),
    key=st.binary(min_size=4, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
)
def test_same_bytes_as_wsproto_piece_by_piece(data: bytes, key: bytes, cuts: list[int]) -> None:
    # A frame's payload arrives in pieces of any length; the key carries on
    # from where the last piece left it.
    fast, simple = wsmask.FastMasker(key), wsmask.WSPROTO_MASKER(bytearray(key))
    masked = b""
    for piece in _pieces(data, cuts):
        out = fast.process(bytearray(piece))
        assert out == simple.process(bytearray(piece))
        masked += out
    assert masked == bytes(wsmask.WSPROTO_MASKER(key).process(bytearray(data)))
    assert wsmask.FastMasker(key).process(masked) == data


def test_same_bytes_as_wsproto_for_megabytes_at_odd_offsets() -> None:
    data = os.urandom(3 * 1024 * 1024 + 3)
    key = os.urandom(4)
    fast, simple = wsmask.FastMasker(key), wsmask.WSPROTO_MASKER(key)
    for piece in _pieces(data, [65535, 65536 + 65535, 1024 * 1024 + 1, 2 * 1024 * 1024 + 2]):
        assert fast.process(memoryview(piece)) == simple.process(bytearray(piece))


class _Recording(wsmask.FastMasker):
    calls = 0

    def process(self, data: bytes | bytearray | memoryview) -> bytes:
        _Recording.calls += 1
        return super().process(data)


def _send(connection: Connection, data: str | bytes, chunk: int) -> list[bytes]:
    """*data* as a client sends it, in frames of *chunk*: the wire bytes."""
    frames = []
    for start in range(0, len(data), chunk):
        end = start + chunk
        event: Message[Any] = (
            TextMessage(data=data[start:end], message_finished=end >= len(data))
            if isinstance(data, str)
            else BytesMessage(data=data[start:end], message_finished=end >= len(data))
        )
        frames.append(connection.send(event))
    return frames


def _receive(wire: bytes, pieces: int) -> str | bytes:
    """What a server makes of *wire* fed in *pieces* roughly equal parts."""
    server = Connection(ConnectionType.SERVER)
    parts: list[Any] = []
    step = max(len(wire) // pieces, 1)
    for start in range(0, len(wire), step):
        server.receive_data(wire[start : start + step])
        parts.extend(event.data for event in server.events() if isinstance(event, Message))
    return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)


def test_wsproto_calls_the_masker_to_send_and_to_receive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # If a wsproto upgrade stopped building its masker by this name, the
    # swap would be bypassed silently: this is where it shows.
    monkeypatch.setattr(wsproto.frame_protocol, "XorMaskerSimple", _Recording)
    text = "é" * 5001 + "x" * 3
    wire = b"".join(_send(Connection(ConnectionType.CLIENT), text, 2000))
    sent = _Recording.calls
    assert sent == 3  # one per frame
    assert _receive(wire, 7) == text
    assert _Recording.calls > sent


@pytest.mark.parametrize("data", ["ü" * 70_001 + "!", os.urandom(200_003)], ids=["text", "bytes"])
def test_frames_masked_fast_unmask_with_wsproto_and_back(
    monkeypatch: pytest.MonkeyPatch, data: str | bytes
) -> None:
    fast_wire = b"".join(_send(Connection(ConnectionType.CLIENT), data, 65_537))
    monkeypatch.setattr(wsproto.frame_protocol, "XorMaskerSimple", wsmask.WSPROTO_MASKER)
    assert _receive(fast_wire, 13) == data
    simple_wire = b"".join(_send(Connection(ConnectionType.CLIENT), data, 65_537))
    monkeypatch.undo()
    assert wsmask.installed()
    assert _receive(simple_wire, 13) == data


# -- against peers in a process that never loaded trismtp ------------------

# A plain trio-websocket peer: wsproto's own masker, nothing of ours.
_PLAIN_PEER = r"""
import hashlib, json, sys
import trio, wsproto.frame_protocol
from trio_websocket import open_websocket_url, serve_websocket

assert "trismtp" not in sys.modules and "websockets" not in sys.modules
assert wsproto.frame_protocol.XorMaskerSimple.__module__ == "wsproto.frame_protocol"

async def client(url, size):
    # One PushBatch of one job whose payload is *size* characters, not ASCII.
    payload = ("é" * (size // 2)) + "x" * (size % 2)
    job = {"job": "smtp.email", "id": "plain-1", "payload": payload,
           "headers": {}, "options": {"pipeline": "smtp"}}
    request = {"jsonrpc": "2.0", "id": 7, "method": "jobs.PushBatch",
               "params": {"jobs": [job]}}
    async with open_websocket_url(url, max_message_size=2**30) as ws:
        await ws.send_message(json.dumps(request, ensure_ascii=False))
        print(await ws.get_message(), flush=True)

async def server():
    async def answer(request):
        ws = await request.accept()
        message = await ws.get_message()
        call = json.loads(message)
        digest = hashlib.sha256(message.encode()).hexdigest()
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": digest}))
        await ws.get_message()  # until the client closes

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_websocket(
                answer, "127.0.0.1", 0, ssl_context=None, max_message_size=2**30,
                task_status=task_status,
            )
        )
        print(listeners.port, flush=True)

if sys.argv[1] == "client":
    trio.run(client, sys.argv[2], int(sys.argv[3]))
else:
    trio.run(server)
"""


def _plain_peer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PLAIN_PEER, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )


async def test_a_plain_trio_websocket_client_pushes_to_the_service(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    service = await start_service(nursery, service_settings(tmp_path))
    size = 3 * 1024 * 1024 + 1
    peer = _plain_peer("client", service.url, str(size))
    try:
        out, _ = await trio.to_thread.run_sync(peer.communicate, None, 60)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert peer.returncode == 0
    assert json.loads(out) == {"jsonrpc": "2.0", "id": 7, "result": {}}
    assert stored_ids(service.database) == {"plain-1"}
    with sqlite3.connect(service.database) as db:
        row = db.execute("SELECT payload, payload_file FROM jobs").fetchone()
    assert payload_of(service.database, *row) == "é" * (size // 2) + "x"


async def test_our_client_sends_to_a_plain_trio_websocket_server() -> None:
    peer = _plain_peer("server")
    try:
        assert peer.stdout is not None
        port = int(await trio.to_thread.run_sync(peer.stdout.readline))
        # Longer than a fragment, in parts of odd lengths, not ASCII.
        payload = "ß" * (FRAGMENT_CHARS + 12_345) + "é" * 3
        params = json.dumps({"jobs": [job("ours-1") | {"payload": payload}]}, ensure_ascii=False)
        async with JobsClient.connect(f"ws://127.0.0.1:{port}/rpc") as client:
            digest = await client.call_encoded(
                "jobs.PushBatch", [params[:1001], params[1001:-7], params[-7:]]
            )
        expected = f'{{"jsonrpc":"2.0","id":1,"method":"jobs.PushBatch","params":{params}}}'
        assert digest == hashlib.sha256(expected.encode()).hexdigest()
    finally:
        peer.kill()
        await trio.to_thread.run_sync(peer.wait)
