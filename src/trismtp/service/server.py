"""The jobs service: JSON-RPC 2.0 over WebSocket in front of the SQLite store.

Theory of operation
-------------------
:func:`serve_jobs` opens the store, declares the configured pipelines and
serves WebSocket connections. The handshake is checked before any WebSocket
traffic: a path other than ``/rpc`` gets HTTP 404; when a token is set, a
missing or wrong ``Authorization: Bearer`` header gets HTTP 401 (compared in
constant time).

On a connection, one loop reads messages. Each message (one request or a
batch array) is answered by its own task, so a slow request does not hold up
the others; replies go out as they are ready and the client matches them by
id. What one client can make the service hold is bounded
(:mod:`trismtp.service.connection`): at most :data:`MAX_IN_FLIGHT` calls per
connection are being answered at once, a batch array counting as its number
of calls (past that the loop stops reading, which pushes back on the client
through TCP instead of queueing without bound); a batch holds at most
:data:`MAX_BATCH` calls; the replies waiting to be sent are bounded by bytes
(``jobs_service.max_unsent_bytes``), and a send that makes no progress for
``jobs_service.send_timeout`` seconds drops the connection.

Decoding a message (JSON, then each method's params validated by pydantic) is
a pure function, :func:`decode_message`; large messages are decoded in a worker
thread so one big batch does not stall every other connection. Request ids are
echoed exactly as sent: an integer too large for 64 bits stays that integer.

Writes and shutdown. The store guarantees that a write it has taken is
committed or rolled back and that its caller hears which, even when cancelled.
The reply to it is then sent inside a shield (:class:`_StopGrace`) that has no
deadline while the service runs and gets ``stop_grace`` seconds once the
service is told to stop. So the daemon's shutdown does not cut short the reply
to a batch that was committed, and a client that stopped reading cannot hold
the shutdown up for longer than that. A request not yet handed to the store
when the stop comes is dropped unanswered; the client sees the connection
close (JobsUnavailable) and may repeat it, which the job ids make safe.

Size limit. trio-websocket enforces ``max_request_bytes`` while receiving
(measured with ``len()``, so characters for a text message): the message is
discarded unread and the connection closed with code 1009. Its id was never
seen, so no ``-32004`` reply can be sent; the client's calls in flight fail
with ``JobsUnavailable`` (``close_code`` 1009), and the service logs a warning.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import orjson
import trio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from trismtp import wsmask
from trismtp.jobs.model import MAX_PRIORITY, MIN_PRIORITY, Job, PipelineName
from trismtp.jsonrpc import (
    BATCH_EXPIRED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LEASE_LOST,
    METHOD_NOT_FOUND,
    NO_SUCH_PIPELINE,
    PARSE_ERROR,
    STORAGE_UNAVAILABLE,
    TOO_LARGE,
)
from trismtp.log import RepeatLimiter
from trismtp.service.connection import CallBudget, ReplyOutbox, SendGuard
from trismtp.service.store import (
    BatchExpired,
    JobStore,
    NoSuchPipeline,
    Policy,
    Settled,
    StorageUnavailable,
    StoredPayload,
)
from trismtp.settings import HostPort, JobsServiceSettings

logger = logging.getLogger(__name__)

RPC_PATH: Final = "/rpc"
# Calls answered at once per connection before we stop reading more.
MAX_IN_FLIGHT: Final = 128
# Calls in one batch array; more is refused whole (-32600).
MAX_BATCH: Final = 100
# Calls whose replies carry jobs (each up to Reserve's byte bound, 16 MiB by
# default) that one connection may have running at once: what a connection
# has in production is bounded too, not only what waits to be sent. The
# others wait their turn; the pusher and Ack/Nack are not held up by them.
JOB_REPLY_METHODS: Final = frozenset({"jobs.Reserve", "jobs.Peek"})
MAX_JOB_REPLIES_RUNNING: Final = 2
# Messages at least this long are decoded in a worker thread.
THREAD_DECODE_THRESHOLD: Final = 64 * 1024
# Characters of job payloads from which a reply is encoded in a worker thread.
THREAD_ENCODE_THRESHOLD: Final = 64 * 1024
# Seconds that in-flight replies get once the service is told to stop.
STOP_GRACE: Final = 5.0
# Jobs per Reserve, per Peek.
MAX_RESERVE: Final = 1000
MAX_PEEK: Final = 10_000
# Seconds: the longest lease, Extend and Nack delay accepted.
MAX_LEASE: Final = 86400.0
# Bytes of a Reserve or Peek reply: max_bytes' default and the range it is clamped to.
DEFAULT_REPLY_BYTES: Final = 16 * 1024 * 1024
MIN_REPLY_BYTES: Final = 1024 * 1024
MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
# Room kept in max_bytes for the response around the jobs (jsonrpc, id, result).
REPLY_OVERHEAD: Final = 1024
RECEIVE_BUFFER_SIZE: Final = 64 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0

RequestId = str | int | float | None

# Requests are unmasked in C from here on: a big PushBatch is ~25 MB to unmask.
wsmask.install()


# -- params of each method (SPEC §6) -----------------------------------------

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
LeaseSeconds = Annotated[float, Field(gt=0, le=MAX_LEASE, allow_inf_nan=False)]
Priority = Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)]


def _clamp_max_bytes(value: int) -> int:
    return min(max(value, MIN_REPLY_BYTES), MAX_REPLY_BYTES)


ReplyBytes = Annotated[int, AfterValidator(_clamp_max_bytes)]


class LeaseLost(Exception):
    """Some jobs of an Ack, Nack or Extend had a stale token (-32006)."""

    def __init__(self, verb: str, settled: Settled) -> None:
        super().__init__("lease lost")
        self.data = {"stale": settled.stale, verb: settled.done}


class _Params(BaseModel):
    """A method's params; :meth:`run` carries the method out."""

    # Unknown fields are ignored: RoadRunner clients may send more than we use.
    model_config = ConfigDict(frozen=True, extra="ignore")

    async def run(self, store: JobStore) -> dict[str, Any]:
        raise NotImplementedError


class _Push(_Params):
    job: Job

    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.push_batch([self.job])
        return {}


class _PushBatch(_Params):
    jobs: list[Job]
    # trismtp extension: wall-clock seconds after which the sender no longer
    # waits; a batch that reaches the store later is refused (-32005).
    expires_at: float | None = Field(default=None, allow_inf_nan=False)

    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.push_batch(self.jobs, expires_at=self.expires_at)
        return {}


class _List(_Params):
    async def run(self, store: JobStore) -> dict[str, Any]:
        return {"pipelines": await store.list_pipelines()}


class _Stat(_Params):
    async def run(self, store: JobStore) -> dict[str, Any]:
        return {"stats": [stat.to_dict() for stat in await store.stat()]}


class _PipelineSpec(BaseModel):
    # RoadRunner declares pipelines as a map of strings ("priority": "10"),
    # hence lax ints; fields we do not use are kept as the pipeline's config.
    model_config = ConfigDict(frozen=True, extra="allow")

    name: PipelineName
    priority: Priority | None = None


class _Declare(_Params):
    pipeline: _PipelineSpec

    async def run(self, store: JobStore) -> dict[str, Any]:
        spec = self.pipeline
        await store.declare(spec.name, priority=spec.priority, config=spec.model_extra or None)
        return {}


class _Pipelines(_Params):
    pipelines: list[PipelineName]


class _Pause(_Pipelines):
    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.pause(self.pipelines)
        return {}


class _Resume(_Pipelines):
    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.resume(self.pipelines)
        return {}


class _Destroy(_Pipelines):
    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.destroy(self.pipelines)
        return {}


class _Reserve(_Params):
    pipeline: PipelineName
    max: int = Field(ge=1, le=MAX_RESERVE)
    lease: LeaseSeconds
    max_bytes: ReplyBytes = DEFAULT_REPLY_BYTES

    async def run(self, store: JobStore) -> dict[str, Any]:
        reserved = await store.reserve(
            self.pipeline, self.max, self.lease, max_bytes=self.max_bytes - REPLY_OVERHEAD
        )
        return {"jobs": [job.to_dict() for job in reserved]}


class _Peek(_Params):
    pipeline: PipelineName
    max: int = Field(default=10, ge=1, le=MAX_PEEK)
    max_bytes: ReplyBytes = DEFAULT_REPLY_BYTES

    async def run(self, store: JobStore) -> dict[str, Any]:
        jobs = await store.peek(self.pipeline, self.max, max_bytes=self.max_bytes - REPLY_OVERHEAD)
        return {"jobs": [job.to_dict() for job in jobs]}


class _LeaseRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1, max_length=256)
    token: str = Field(min_length=1, max_length=256)


def _refuse_ids_form(data: Any) -> Any:
    if isinstance(data, dict) and "ids" in data and "jobs" not in data:
        raise ValueError(
            'the {"ids": [...]} form is gone: send {"jobs": [{"id": ID, "token": T}, ...]}'
            " with each job's lease.token from jobs.Reserve"
        )
    return data


class _Settle(_Params):
    jobs: list[_LeaseRef]

    @model_validator(mode="before")
    @classmethod
    def _new_form_only(cls, data: Any) -> Any:
        return _refuse_ids_form(data)

    def refs(self) -> list[tuple[str, str]]:
        return [(ref.id, ref.token) for ref in self.jobs]


def _settled(verb: str, settled: Settled) -> dict[str, Any]:
    if settled.stale:
        raise LeaseLost(verb, settled)
    return {verb: settled.done}


class _Ack(_Settle):
    async def run(self, store: JobStore) -> dict[str, Any]:
        return _settled("acked", await store.ack(self.refs()))


class _Nack(_Settle):
    requeue: bool = True
    delay: Annotated[float, Field(ge=0, le=MAX_LEASE, allow_inf_nan=False)] = 0.0

    async def run(self, store: JobStore) -> dict[str, Any]:
        settled = await store.nack(self.refs(), requeue=self.requeue, delay=self.delay)
        return _settled("nacked", settled)


class _Extend(_Settle):
    lease: LeaseSeconds

    async def run(self, store: JobStore) -> dict[str, Any]:
        return _settled("extended", await store.extend(self.refs(), self.lease))


METHODS: Final[dict[str, type[_Params]]] = {
    "jobs.Push": _Push,
    "jobs.PushBatch": _PushBatch,
    "jobs.List": _List,
    "jobs.Stat": _Stat,
    "jobs.Declare": _Declare,
    "jobs.Pause": _Pause,
    "jobs.Resume": _Resume,
    "jobs.Destroy": _Destroy,
    "jobs.Reserve": _Reserve,
    "jobs.Peek": _Peek,
    "jobs.Ack": _Ack,
    "jobs.Nack": _Nack,
    "jobs.Extend": _Extend,
}


# -- decoding ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcFailure:
    """A JSON-RPC error object to answer with."""

    code: int
    message: str
    data: Any = None

    def to_dict(self) -> dict[str, Any]:
        """As the ``error`` member of a response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request: ready to run (``params``) or to refuse (``failure``)."""

    id: RequestId
    method: str
    params: _Params | None = None
    failure: RpcFailure | None = None
    answer: bool = True  # False for a notification (no id): never answered

    def response(self, *, result: Any = None, failure: RpcFailure | None = None) -> dict[str, Any]:
        """The response object for this request's *result* or *failure*."""
        if failure is not None:
            return {"jsonrpc": "2.0", "id": self.id, "error": failure.to_dict()}
        return {"jsonrpc": "2.0", "id": self.id, "result": result}


def decode_message(message: str | bytes) -> Request | list[Request] | RpcFailure:
    """Decode one WebSocket message: a request, a batch, or why it is neither.

    Pure and total: any input gives a value, never an exception.
    """
    try:
        # orjson refuses NaN and Infinity, as JSON does, and bounds nesting.
        data = orjson.loads(message)
        if _has_float_id(data):
            # orjson reads an integer past 64 bits as a float; the stdlib
            # keeps it exact, so that the reply echoes the very same id.
            data = json.loads(message, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        return RpcFailure(PARSE_ERROR, f"parse error: {exc}")
    if isinstance(data, list):
        if not data:
            return RpcFailure(INVALID_REQUEST, "invalid request: empty batch")
        if len(data) > MAX_BATCH:
            return RpcFailure(
                INVALID_REQUEST,
                f"invalid request: a batch holds at most {MAX_BATCH} calls, "
                f"this one {len(data)}; send it in smaller batches",
            )
        return [_decode_request(item) for item in data]
    return _decode_request(data)


def _has_float_id(data: Any) -> bool:
    items = data if isinstance(data, list) else [data]
    return any(isinstance(item, dict) and isinstance(item.get("id"), float) for item in items)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_request(data: Any) -> Request:
    def invalid(request_id: RequestId, why: str) -> Request:
        return Request(
            request_id, "", failure=RpcFailure(INVALID_REQUEST, f"invalid request: {why}")
        )

    if not isinstance(data, dict):
        return invalid(None, "a request must be a JSON object")
    request_id = data.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int | float)
    ):
        return invalid(None, "id must be a string, a number or null")
    if data.get("jsonrpc") != "2.0":
        return invalid(request_id, 'jsonrpc must be "2.0"')
    method = data.get("method")
    if not isinstance(method, str):
        return invalid(request_id, "method must be a string")
    answer = "id" in data
    params_type = METHODS.get(method)
    if params_type is None:
        failure = RpcFailure(METHOD_NOT_FOUND, f"method not found: {method}")
        return Request(request_id, method, failure=failure, answer=answer)
    params = data.get("params", {})
    if not isinstance(params, dict):
        failure = RpcFailure(INVALID_PARAMS, "invalid params: params must be an object")
        return Request(request_id, method, failure=failure, answer=answer)
    try:
        model = params_type.model_validate(params)
    except ValidationError as exc:
        return Request(request_id, method, failure=_invalid_params(exc), answer=answer)
    return Request(request_id, method, params=model, answer=answer)


def _invalid_params(exc: ValidationError) -> RpcFailure:
    # Neither input nor context: the input may be a whole email, and context
    # may hold objects that are not JSON.
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    details = [
        {"field": ".".join(str(part) for part in error["loc"]), "problem": error["msg"]}
        for error in errors[:10]
    ]
    first = details[0]
    where = first["field"] or "params"
    return RpcFailure(INVALID_PARAMS, f"invalid params: {where}: {first['problem']}", details)


def _carries_big_payloads(response: dict[str, Any]) -> bool:
    """True for a Reserve's or Peek's response whose payloads come to
    :data:`THREAD_ENCODE_THRESHOLD` characters or more: encoded in a worker
    thread, as bytes (a 13 MB job's reply cost the event loop ~30 ms to
    encode to text and back to UTF-8, while it also serves the pushes).
    Payloads read from their files are not counted: they are copied in."""
    result = response.get("result")
    jobs = result.get("jobs") if isinstance(result, dict) else None
    if not isinstance(jobs, list):
        return False
    texts = (job.get("payload") for job in jobs)
    return sum(len(text) for text in texts if isinstance(text, str)) >= THREAD_ENCODE_THRESHOLD


def _encode_bytes(reply: Any) -> bytes:
    """The reply as UTF-8 JSON, a payload from its file copied in as stored."""
    try:
        return orjson.dumps(reply, default=_spliced)
    except orjson.JSONEncodeError:
        # orjson refuses integers past 64 bits: a request id can be one.
        text = json.dumps(reply, ensure_ascii=False, separators=(",", ":"), default=_as_text)
        return text.encode()


def _spliced(value: object) -> orjson.Fragment:
    if isinstance(value, StoredPayload):
        return orjson.Fragment(value.json)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _as_text(value: object) -> str:
    if isinstance(value, StoredPayload):
        return value.text()
    raise TypeError(f"{type(value).__name__} is not JSON")


# -- shutdown ----------------------------------------------------------------


class _StopGrace:
    """Shields for work that must finish once begun, bounded once stopping.

    While the service runs, a shield has no deadline; :meth:`stop` gives every
    shield, current and future, ``grace`` more seconds (what hypercorn does to
    its handlers' nursery: move the deadline rather than cancel).
    """

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._deadline = math.inf
        self._scopes: set[trio.CancelScope] = set()

    @contextmanager
    def shield(self) -> Iterator[None]:
        scope = trio.CancelScope(shield=True, deadline=self._deadline)
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)

    def stop(self) -> None:
        self._deadline = min(self._deadline, trio.current_time() + self._grace)
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._deadline)


# -- serving -----------------------------------------------------------------


async def _reject(request: WebSocketRequest, status: int, body: bytes, **kwargs: Any) -> None:
    with contextlib.suppress(ConnectionClosed):  # the client may have left first
        await request.reject(status, body=body, **kwargs)


@dataclass(slots=True)
class _Connection:
    """One accepted WebSocket and what bounds it."""

    ws: WebSocketConnection
    guard: SendGuard
    outbox: ReplyOutbox
    calls: trio.CancelScope  # the tasks answering its messages
    job_replies: trio.CapacityLimiter  # Reserve and Peek calls running
    dropped: str | None = None  # why the service dropped it, if it did

    async def drop(self, why: str) -> None:
        """Give up on a client that does not read its replies.

        Closes the TCP connection (which fails every send waiting on it) and
        cancels the calls not yet handed to the store: a Peek queued for the
        store would otherwise still be read and encoded, for nobody.
        """
        if self.dropped is None:
            self.dropped = why
        self.calls.cancel()
        await self.guard.abort()


class _Service:
    """Answers the JSON-RPC requests of every connection."""

    def __init__(
        self,
        store: JobStore,
        *,
        token: str,
        grace: _StopGrace,
        max_request_bytes: int,
        max_unsent_bytes: int = 16 * 1024 * 1024,
        send_timeout: float = 30.0,
    ) -> None:
        self._store = store
        self._token = token.encode()
        self._grace = grace
        self._max_request_bytes = max_request_bytes
        self._max_unsent_bytes = max_unsent_bytes
        self._send_timeout = send_timeout
        #: Warnings a client can cause over and over (run its task to flush counts).
        self.repeats = RepeatLimiter(logger)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                )
        return False

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection: handshake, requests, close.

        We accept TCP ourselves instead of using ``serve_websocket`` so that
        the socket is closed here, always: trio-websocket's ``aclose()`` leaves
        it open when the peer closed first, a message was too big, or the
        handshake was refused, and only the garbage collector would close it.
        """
        guard = SendGuard(stream, self._send_timeout)
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = str(HostPort(host, port))
        except OSError:
            peer = "a client that already left"
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                    request = await wrap_server_stream(
                        nursery,
                        guard,
                        max_message_size=self._max_request_bytes,
                        receive_buffer_size=RECEIVE_BUFFER_SIZE,
                    )
                if not handshake.cancelled_caught:
                    await self._handle(request, guard, peer)
                nursery.cancel_scope.cancel()
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The network failed under trio-websocket's reader: this one
            # connection is over, the service is not.
            logger.debug("connection failed: %r", group.exceptions[0])
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, request: WebSocketRequest, guard: SendGuard, peer: str) -> None:
        if urlsplit(request.path).path != RPC_PATH:
            logger.info(
                "refused a connection from %s: path %r is not %s", peer, request.path, RPC_PATH
            )
            await _reject(request, 404, b"Not Found: the jobs RPC is at /rpc\n")
            return
        if self._token and not self._authorized(request.headers):
            self.repeats.warning(
                "bad token", "refused a connection from %s: missing or wrong token", peer
            )
            await _reject(
                request,
                401,
                b"Unauthorized: send Authorization: Bearer <token>\n",
                extra_headers=[(b"WWW-Authenticate", b'Bearer realm="trismtp jobs"')],
            )
            return
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        logger.debug("connection from %s", peer)
        calls = CallBudget(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            outbox = ReplyOutbox(ws, self._max_unsent_bytes)
            job_replies = trio.CapacityLimiter(MAX_JOB_REPLIES_RUNNING)
            connection = _Connection(ws, guard, outbox, nursery.cancel_scope, job_replies)
            while True:
                await calls.acquire(1)
                try:
                    message = await ws.get_message()
                except ConnectionClosed:
                    calls.release(1)
                    break
                decoded = await self._decode(message)
                # Not kept until the next message: a batch may be megabytes,
                # and its jobs are decoded by now.
                del message
                count = len(decoded) if isinstance(decoded, list) else 1
                await calls.acquire(count - 1)  # a batch counts as its calls
                nursery.start_soon(self._serve_message, connection, decoded, calls, count)
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose()  # returns at once when the client closed first
        self._log_close(connection, peer)

    def _log_close(self, connection: _Connection, peer: str) -> None:
        reason = connection.ws.closed
        if connection.dropped is not None:
            self.repeats.warning(
                "slow reader",
                "dropped the connection from %s (1008, policy): %s",
                peer,
                connection.dropped,
            )
        elif reason is not None and reason.code == 1009:
            self.repeats.warning(
                "request too big",
                "closed the connection from %s: %s (jobs_service.max_request_bytes is %d)",
                peer,
                reason.reason,
                self._max_request_bytes,
            )
        else:
            logger.debug("connection from %s closed: %s", peer, reason)

    async def _serve_message(
        self,
        connection: _Connection,
        decoded: Request | list[Request] | RpcFailure,
        calls: CallBudget,
        count: int,
    ) -> None:
        try:
            reply = await self.answer(decoded, connection)
            if reply is not None:
                # No checkpoint between the store's answer and this shield, so
                # a committed write's reply is sent even if we are stopping.
                with self._grace.shield():
                    await connection.outbox.send(reply)
        except ConnectionClosed:
            if connection.guard.stalled:
                await connection.drop(
                    f"it read nothing of its replies for {self._send_timeout:g} s "
                    "(jobs_service.send_timeout)"
                )
            else:
                logger.debug("a client left before its reply")
        finally:
            calls.release(count)

    async def _decode(self, message: str | bytes) -> Request | list[Request] | RpcFailure:
        if len(message) >= THREAD_DECODE_THRESHOLD:
            return await trio.to_thread.run_sync(decode_message, message)
        return decode_message(message)

    async def answer(
        self, decoded: Request | list[Request] | RpcFailure, connection: _Connection | None = None
    ) -> bytes | None:
        """The reply to one decoded message, or None when it holds only notifications.

        On a *connection*, its Reserve and Peek calls run a few at a time, and
        only while its unsent replies leave room (see :mod:`.connection`).

        The responses to a batch together stay within ``max_unsent_bytes``
        (or are one response alone): a response that would pass it is
        replaced by a ``-32004`` error (its call did run: the jobs of a
        ``Reserve`` so answered are delivered again when their lease ends).
        """
        if isinstance(decoded, RpcFailure):
            return _encode_bytes({"jsonrpc": "2.0", "id": None, "error": decoded.to_dict()})
        if isinstance(decoded, Request):
            response = await self._execute_bounded(decoded, connection)
            if response is None:
                return None
            if _carries_big_payloads(response):
                # Shielded: a committed Reserve's reply is sent even if we are
                # stopping (see _serve_message); the encoding takes ms.
                with trio.CancelScope(shield=True):
                    return await trio.to_thread.run_sync(_encode_bytes, response)
            return _encode_bytes(response)
        responses: list[bytes | None] = [None] * len(decoded)
        total = 0

        async def execute_into(index: int, request: Request) -> None:
            nonlocal total
            response = await self._execute_bounded(request, connection)
            if response is None:
                return
            if _carries_big_payloads(response):
                with trio.CancelScope(shield=True):
                    encoded = await trio.to_thread.run_sync(_encode_bytes, response)
            else:
                encoded = _encode_bytes(response)
            if total and total + len(encoded) > self._max_unsent_bytes:
                failure = RpcFailure(
                    TOO_LARGE,
                    f"too large: the replies to this batch would pass "
                    f"{self._max_unsent_bytes} bytes (jobs_service.max_unsent_bytes); "
                    "send this call alone",
                )
                encoded = _encode_bytes(request.response(failure=failure))
            total += len(encoded)
            responses[index] = encoded

        async with trio.open_nursery() as nursery:
            for index, request in enumerate(decoded):
                nursery.start_soon(execute_into, index, request)
        answered = [response for response in responses if response is not None]
        return b"[" + b",".join(answered) + b"]" if answered else None

    async def _execute_bounded(
        self, request: Request, connection: _Connection | None
    ) -> dict[str, Any] | None:
        if connection is None or request.method not in JOB_REPLY_METHODS:
            return await self._execute(request)
        async with connection.job_replies:
            await connection.outbox.wait_for_room()
            return await self._execute(request)

    async def _execute(self, request: Request) -> dict[str, Any] | None:
        failure = request.failure
        result: Any = None
        if request.params is not None:
            try:
                result = await request.params.run(self._store)
            except NoSuchPipeline as exc:
                failure = RpcFailure(NO_SUCH_PIPELINE, str(exc), {"pipelines": exc.names})
            except BatchExpired as exc:
                failure = RpcFailure(BATCH_EXPIRED, str(exc))
            except LeaseLost as exc:
                failure = RpcFailure(LEASE_LOST, "lease lost", exc.data)
            except StorageUnavailable as exc:
                # The store logs the failure when it starts and when it ends.
                failure = RpcFailure(STORAGE_UNAVAILABLE, f"storage unavailable: {exc}")
            except Exception:
                logger.exception("%s failed", request.method)
                failure = RpcFailure(INTERNAL_ERROR, "internal error")
        if not request.answer:
            return None
        return request.response(result=result, failure=failure)


async def serve_jobs(
    settings: JobsServiceSettings,
    *,
    clock: Callable[[], float] = time.time,
    stop_grace: float = STOP_GRACE,
    on_store: Callable[[JobStore], object] | None = None,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the jobs service until cancelled; ``task_status`` gets the bound address.

    Opens the store at ``settings.database`` and declares ``settings.pipelines``
    first. The address reported is the one actually bound, so port 0 works.
    When cancelled, replies to writes already handed to the store still go out
    within *stop_grace* seconds. *clock* is the store's clock (tests).
    *on_store* is called with the open store (the daemon watches whether it
    can write, for ``/readyz`` and the metrics).
    """
    address = settings.address()
    grace = _StopGrace(stop_grace)
    policy = Policy(
        max_attempts=settings.max_attempts,
        dead_letter=settings.dead_letter_pipeline,
        dedupe_window=settings.dedupe_window,
        disk_reserve=settings.disk_reserve,
        secure_delete=settings.secure_delete,
    )
    async with JobStore.open(settings.database, clock=clock, policy=policy) as store:
        for name in [*settings.pipelines, settings.dead_letter_pipeline]:
            await store.declare(name)
        if on_store is not None:
            on_store(store)
        service = _Service(
            store,
            token=settings.token.get_secret_value(),
            grace=grace,
            max_request_bytes=settings.max_request_bytes,
            max_unsent_bytes=settings.max_unsent_bytes,
            send_timeout=settings.send_timeout,
        )
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise OSError(
                exc.errno, f"the jobs service cannot listen on {address}: {exc.strerror}"
            ) from exc
        host, port = listeners[0].socket.getsockname()[:2]
        bound = HostPort(host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.repeats.run)
            await nursery.start(trio.serve_listeners, service.serve_connection, listeners)
            logger.info(
                "jobs service listening on ws://%s%s (database %s)",
                bound,
                RPC_PATH,
                settings.database,
            )
            task_status.started(bound)
            try:
                await trio.sleep_forever()
            finally:
                grace.stop()
                service.repeats.flush(final=True)
                logger.info("jobs service stopping")
