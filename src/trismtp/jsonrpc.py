"""JSON-RPC 2.0, the client's side, as a sans-io state machine.

Theory of operation
-------------------
Both of trismtp's clients of the jobs RPC speak the same framing over a
WebSocket: the pusher's trio client (:mod:`trismtp.jobs.rpc`) and the anyio
consumer library (:mod:`trismtp.consumer`). This module is that framing, and
nothing else: no sockets, no event loop, no clock (as h11 is to HTTP).

* :meth:`ClientProtocol.request` takes a method and its params, gives the
  request a fresh integer id, remembers that a reply is awaited for it, and
  returns the id and the text to send.
* :meth:`ClientProtocol.receive` takes one received WebSocket message (a
  response or a batch of them) and returns a :class:`Reply` for every awaited
  id it answers: ``result`` or an :class:`RpcError`. Replies may come in any
  order; a reply for an id nobody awaits (the caller gave up and called
  :meth:`ClientProtocol.forget`) is dropped.
* Anything that is not a JSON-RPC 2.0 response raises :class:`ProtocolError`:
  the connection can no longer be trusted and its owner should close it.

An error reply with ``"id": null`` means the service could not read one of
our requests, so it cannot say which. Every awaited call then gets that
error: the culprit must not wait forever, and the others learn nothing about
their fate either way.

The I/O adapters keep, per id, whatever their event loop uses to wake a
waiting caller; they send the text, feed every message to :meth:`receive`
and wake the callers the replies name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import orjson

__all__ = [
    "BATCH_EXPIRED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LEASE_LOST",
    "METHOD_NOT_FOUND",
    "NO_SUCH_PIPELINE",
    "PARSE_ERROR",
    "STORAGE_UNAVAILABLE",
    "TOO_LARGE",
    "ClientProtocol",
    "LeaseLost",
    "ProtocolError",
    "Reply",
    "ReplySlot",
    "RpcError",
    "encode_params",
]

logger = logging.getLogger(__name__)

# JSON-RPC 2.0 error codes, and the jobs service's own (SPEC §6, docs/rpc.md).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
NO_SUCH_PIPELINE: Final = -32001
STORAGE_UNAVAILABLE: Final = -32003
TOO_LARGE: Final = -32004
# trismtp extension: PushBatch reached the store after its expires_at.
BATCH_EXPIRED: Final = -32005
# trismtp extension: an Ack, Nack or Extend named a lease token that is no
# longer current (the lease ran out and the job went to someone else, or the
# job is gone).
LEASE_LOST: Final = -32006


class RpcError(Exception):
    """The jobs service answered the call with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (JSON-RPC error {self.code})"


class LeaseLost(RpcError):
    """An Ack, Nack or Extend named jobs whose lease token is no longer current.

    Those jobs were not touched (another consumer may hold them now); the
    others of the call were acted on: :attr:`done` says how many.
    """

    @property
    def stale(self) -> list[str]:
        """The ids whose token was stale."""
        data = self.data if isinstance(self.data, dict) else {}
        stale = data.get("stale", [])
        return [str(job_id) for job_id in stale] if isinstance(stale, list) else []

    @property
    def done(self) -> int:
        """How many jobs of the call were acted on all the same."""
        data = self.data if isinstance(self.data, dict) else {}
        for key in ("acked", "nacked", "extended"):
            value = data.get(key)
            if isinstance(value, int):
                return value
        return 0


class ProtocolError(Exception):
    """The peer sent something that is not a JSON-RPC 2.0 response."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the awaited request *id*: its ``result``, or ``error``."""

    id: int
    result: Any = None
    error: RpcError | None = None


def _loads(message: str | bytes) -> Any:
    """*message* read as JSON: by orjson, or by the standard library where
    orjson refuses it (NaN, a lone surrogate escape, nesting past 1024).

    A Reserve's reply carries megabytes of payload text; the standard
    library took a third of the consumer's CPU reading it, orjson takes a
    few percent. What either accepts reads the same, but for integers past
    64 bits, which orjson reads as floats: the service sends none (ids are
    ours, counts are small, payloads are strings).
    """
    try:
        return orjson.loads(message)
    except orjson.JSONDecodeError:
        return json.loads(message)


def encode_params(params: Mapping[str, Any]) -> str:
    """*params* as compact JSON text (non-ASCII kept as it is)."""
    return json.dumps(params, ensure_ascii=False, separators=(",", ":"))


class ClientProtocol:
    """The state of one JSON-RPC client connection: ids given, replies awaited."""

    def __init__(self) -> None:
        self._next_id = 1
        self._awaited: set[int] = set()

    @property
    def awaited(self) -> frozenset[int]:
        """The ids of the requests sent whose reply has not come yet."""
        return frozenset(self._awaited)

    def request(self, method: str, params_json: str) -> tuple[int, str]:
        """A new request: its id, and the text to send.

        *params_json* must be a JSON object as text (see :func:`encode_params`);
        it goes on the wire as it is, so a caller can encode large parts once.
        """
        request_id = self._next_id
        self._next_id += 1
        self._awaited.add(request_id)
        text = (
            f'{{"jsonrpc":"2.0","id":{request_id},'
            f'"method":{json.dumps(method)},"params":{params_json}}}'
        )
        return request_id, text

    def request_parts(self, method: str, params: Sequence[str]) -> tuple[int, list[str]]:
        """Like :meth:`request`, with the params in parts to send one after the other.

        The parts are never joined: a batch of big jobs would be copied whole
        (see :func:`trismtp.jobs.websocket.send_text`).
        """
        request_id = self._next_id
        self._next_id += 1
        self._awaited.add(request_id)
        head = f'{{"jsonrpc":"2.0","id":{request_id},"method":{json.dumps(method)},"params":'
        return request_id, [head, *params, "}"]

    def forget(self, request_id: int) -> None:
        """Stop awaiting the reply to *request_id* (its caller gave up)."""
        self._awaited.discard(request_id)

    def receive(self, message: str | bytes) -> list[Reply]:
        """The replies in one received message, for the ids still awaited.

        Raises :class:`ProtocolError` if the message is not a JSON-RPC 2.0
        response or batch of responses.
        """
        try:
            data = _loads(message)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"not JSON ({exc})") from None
        replies: list[Reply] = []
        for response in data if isinstance(data, list) else [data]:
            replies.extend(self._response(response))
        return replies

    def _response(self, response: Any) -> list[Reply]:
        if not isinstance(response, dict) or response.get("jsonrpc") != "2.0":
            raise ProtocolError("not a JSON-RPC 2.0 response object")
        response_id = response.get("id")
        if "error" in response:
            error = _rpc_error(response["error"])
            if response_id is None:
                logger.error("the jobs service rejected a request it could not read: %s", error)
                everyone = sorted(self._awaited)
                self._awaited.clear()
                # One exception object per caller: tasks raising the same one
                # at once would tangle its traceback.
                return [Reply(i, error=_rpc_error(response["error"])) for i in everyone]
            result = None
        elif "result" in response:
            error, result = None, response["result"]
        else:
            raise ProtocolError("a response needs a result or an error")
        if type(response_id) is not int or response_id not in self._awaited:
            logger.debug("reply to request %r, which no call waits for", response_id)
            return []
        self._awaited.discard(response_id)
        return [Reply(response_id, result=result, error=error)]


def _rpc_error(error: Any) -> RpcError:
    if not isinstance(error, dict):
        raise ProtocolError("an error must be an object")
    code, message = error.get("code"), error.get("message")
    if type(code) is not int or not isinstance(message, str):
        raise ProtocolError("an error needs an integer code and a string message")
    if code == LEASE_LOST:
        return LeaseLost(code, message, error.get("data"))
    return RpcError(code, message, error.get("data"))


class _Event(Protocol):
    def is_set(self) -> bool: ...

    def set(self) -> None: ...


_E = TypeVar("_E", bound=_Event)


class ReplySlot(Generic[_E]):
    """Where a client's reader leaves the reply to one waiting call.

    *done* is the event library's own (trio's or anyio's): the caller waits
    on it, the reader sets it once, with the first outcome.
    """

    __slots__ = ("done", "error", "result")

    def __init__(self, done: _E) -> None:
        self.done = done
        self.result: Any = None
        self.error: BaseException | None = None

    def resolve(self, *, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()
