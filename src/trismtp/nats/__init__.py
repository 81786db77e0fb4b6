"""NATS JetStream as a jobs destination, over the server's WebSocket listener.

trismtp can push jobs to a NATS server's JetStream instead of its own jobs
service (``jobs.url = "nats+ws://…"``). It speaks the NATS client protocol
over nats-server's WebSocket listener (``websocket { … }`` in its
configuration) with trio-websocket, so it needs no NATS library. The rooms:

* :mod:`~trismtp.nats.protocol`: the client protocol, sans-io (parser,
  encoders, PubAck and API error replies);
* :mod:`~trismtp.nats.client`: :class:`NatsClient`, the I/O around it;
* :mod:`~trismtp.nats.jetstream`: the JetStream API calls trismtp makes;
* :mod:`~trismtp.nats.roadrunner`: jobs in the format RoadRunner's NATS
  jobs driver reads.
"""

from trismtp.nats.client import (
    NatsAuthorizationError,
    NatsClient,
    NatsMessage,
    PublishIncomplete,
    wire_size,
)
from trismtp.nats.jetstream import (
    StoredMessage,
    ensure_stream,
    first_messages,
    get_message,
    stream_info,
)
from trismtp.nats.protocol import (
    MSG_ID_HEADER,
    JetStreamError,
    MessageTooLarge,
    Msg,
    NatsProtocolError,
    PubAck,
)
from trismtp.nats.roadrunner import roadrunner_message

__all__ = [
    "MSG_ID_HEADER",
    "JetStreamError",
    "MessageTooLarge",
    "Msg",
    "NatsAuthorizationError",
    "NatsClient",
    "NatsMessage",
    "NatsProtocolError",
    "PubAck",
    "PublishIncomplete",
    "StoredMessage",
    "ensure_stream",
    "first_messages",
    "get_message",
    "roadrunner_message",
    "stream_info",
    "wire_size",
]
