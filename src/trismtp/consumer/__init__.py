"""Consume trismtp's jobs from Python: asyncio, trio or plain blocking code.

The library is written on anyio, so the same :class:`Consumer` runs under
asyncio (FastAPI, aiohttp, plain asyncio) and trio; :class:`BlockingConsumer`
is its facade for code without an event loop (scripts, cron, Django, WSGI).
docs/rpc.md, "A Python consumer", is the guide. The rooms:

- :mod:`~trismtp.consumer.model`: the reserved job, its lease, the typed email payload;
- :mod:`~trismtp.consumer.websocket`: a WebSocket client (wsproto on anyio streams);
- :mod:`~trismtp.consumer.client`: JSON-RPC over it (the sans-io :mod:`trismtp.jsonrpc`);
- :mod:`~trismtp.consumer.link`: the connection that comes back by itself;
- :mod:`~trismtp.consumer.worker`: reserve, handle, extend, ack or nack, stop gracefully;
- :mod:`~trismtp.consumer.sync`: the blocking facade.
"""

from trismtp.consumer.client import RpcClient
from trismtp.consumer.model import (
    Address,
    Attachment,
    Authentication,
    Email,
    Envelope,
    Lease,
    Message,
    PayloadError,
    ReservedJob,
    Tls,
)
from trismtp.consumer.sync import BlockingConsumer
from trismtp.consumer.websocket import HandshakeRejected
from trismtp.consumer.worker import Consumer, Handler, Stats, in_thread
from trismtp.jobs.websocket import JobsUnavailable
from trismtp.jsonrpc import RpcError

__all__ = [
    "Address",
    "Attachment",
    "Authentication",
    "BlockingConsumer",
    "Consumer",
    "Email",
    "Envelope",
    "Handler",
    "HandshakeRejected",
    "JobsUnavailable",
    "Lease",
    "Message",
    "PayloadError",
    "ReservedJob",
    "RpcClient",
    "RpcError",
    "Stats",
    "Tls",
    "in_thread",
]
