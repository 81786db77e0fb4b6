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
id. At most :data:`MAX_IN_FLIGHT` messages per connection are being answered at
once; past that the loop stops reading, which pushes back on the client
through TCP instead of queueing without bound.

Decoding a message (JSON, then each method's params validated by pydantic) is
a pure function, :func:`decode_message`; large messages are decoded in a worker
thread so one big batch does not stall every other connection.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from trismtp.jobs.model import Job
from trismtp.jobs.rpc import (
    BATCH_EXPIRED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_SUCH_PIPELINE,
    PARSE_ERROR,
    STORAGE_UNAVAILABLE,
)
from trismtp.service.store import BatchExpired, JobStore, NoSuchPipeline, StorageUnavailable
from trismtp.settings import HostPort, JobsServiceSettings

logger = logging.getLogger(__name__)

RPC_PATH: Final = "/rpc"
# Messages answered at once per connection before we stop reading more.
MAX_IN_FLIGHT: Final = 64
# Messages at least this long are decoded in a worker thread.
THREAD_DECODE_THRESHOLD: Final = 64 * 1024
# Seconds that in-flight replies get once the service is told to stop.
STOP_GRACE: Final = 5.0
MAX_RESERVE: Final = 10_000
RECEIVE_BUFFER_SIZE: Final = 64 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0

RequestId = str | int | float | None


# -- params of each method (SPEC §6) -----------------------------------------

PipelineName = Annotated[str, Field(min_length=1)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


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
    priority: int | None = None


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
    lease: float = Field(gt=0, allow_inf_nan=False)

    async def run(self, store: JobStore) -> dict[str, Any]:
        jobs = await store.reserve(self.pipeline, self.max, self.lease)
        return {"jobs": [job.to_dict() for job in jobs]}


class _Peek(_Params):
    pipeline: PipelineName
    max: int = Field(default=10, ge=1, le=MAX_RESERVE)

    async def run(self, store: JobStore) -> dict[str, Any]:
        jobs = await store.peek(self.pipeline, self.max)
        return {"jobs": [job.to_dict() for job in jobs]}


class _Ack(_Params):
    ids: list[str]

    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.ack(self.ids)
        return {}


class _Nack(_Params):
    ids: list[str]
    requeue: bool = True
    delay: Seconds = 0.0

    async def run(self, store: JobStore) -> dict[str, Any]:
        await store.nack(self.ids, requeue=self.requeue, delay=self.delay)
        return {}


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
    except (ValueError, RecursionError) as exc:
        return RpcFailure(PARSE_ERROR, f"parse error: {exc}")
    if isinstance(data, list):
        if not data:
            return RpcFailure(INVALID_REQUEST, "invalid request: empty batch")
        return [_decode_request(item) for item in data]
    return _decode_request(data)


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


def _encode(reply: Any) -> str:
    return orjson.dumps(reply).decode()


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


def _describe_peer(where: Endpoint | str) -> str:
    if isinstance(where, Endpoint):
        return str(HostPort(str(where.address), where.port))
    return where


async def _reject(request: WebSocketRequest, status: int, body: bytes, **kwargs: Any) -> None:
    with contextlib.suppress(ConnectionClosed):  # the client may have left first
        await request.reject(status, body=body, **kwargs)


class _Service:
    """Answers the JSON-RPC requests of every connection."""

    def __init__(
        self, store: JobStore, *, token: str, grace: _StopGrace, max_request_bytes: int
    ) -> None:
        self._store = store
        self._token = token.encode()
        self._grace = grace
        self._max_request_bytes = max_request_bytes

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
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        max_message_size=self._max_request_bytes,
                        receive_buffer_size=RECEIVE_BUFFER_SIZE,
                    )
                if not handshake.cancelled_caught:
                    await self._handle(request)
                nursery.cancel_scope.cancel()
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The network failed under trio-websocket's reader: this one
            # connection is over, the service is not.
            logger.debug("connection failed: %r", group.exceptions[0])
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, request: WebSocketRequest) -> None:
        peer = _describe_peer(request.remote)
        if urlsplit(request.path).path != RPC_PATH:
            logger.info(
                "refused a connection from %s: path %r is not %s", peer, request.path, RPC_PATH
            )
            await _reject(request, 404, b"Not Found: the jobs RPC is at /rpc\n")
            return
        if self._token and not self._authorized(request.headers):
            logger.warning("refused a connection from %s: missing or wrong token", peer)
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
        in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while True:
                await in_flight.acquire()
                try:
                    message = await ws.get_message()
                except ConnectionClosed:
                    in_flight.release()
                    break
                # Boxed, so the task can drop the text once decoded: it may
                # be a batch of megabytes, and its jobs are decoded by then.
                nursery.start_soon(self._serve_message, ws, [message], in_flight)
                del message
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose()  # returns at once when the client closed first
        reason = ws.closed
        if reason is not None and reason.code == 1009:
            logger.warning(
                "closed the connection from %s: %s (jobs_service.max_request_bytes is %d)",
                peer,
                reason.reason,
                self._max_request_bytes,
            )
        else:
            logger.debug("connection from %s closed: %s", peer, reason)

    async def _serve_message(
        self, ws: WebSocketConnection, box: list[str | bytes], in_flight: trio.Semaphore
    ) -> None:
        try:
            reply = await self._respond(await self._decode(box.pop()))
            if reply is not None:
                # No checkpoint between the store's answer and this shield, so
                # a committed write's reply is sent even if we are stopping.
                with self._grace.shield():
                    await ws.send_message(reply)
        except ConnectionClosed:
            logger.debug("a client left before its reply")
        finally:
            in_flight.release()

    async def answer(self, message: str | bytes) -> str | None:
        """The reply to one message, or None when it holds only notifications."""
        return await self._respond(await self._decode(message))

    async def _decode(self, message: str | bytes) -> Request | list[Request] | RpcFailure:
        if len(message) >= THREAD_DECODE_THRESHOLD:
            return await trio.to_thread.run_sync(decode_message, message)
        return decode_message(message)

    async def _respond(self, decoded: Request | list[Request] | RpcFailure) -> str | None:
        if isinstance(decoded, RpcFailure):
            return _encode({"jsonrpc": "2.0", "id": None, "error": decoded.to_dict()})
        if isinstance(decoded, Request):
            response = await self._execute(decoded)
            return None if response is None else _encode(response)
        responses: list[dict[str, Any] | None] = [None] * len(decoded)

        async def execute_into(index: int, request: Request) -> None:
            responses[index] = await self._execute(request)

        async with trio.open_nursery() as nursery:
            for index, request in enumerate(decoded):
                nursery.start_soon(execute_into, index, request)
        answered = [response for response in responses if response is not None]
        return _encode(answered) if answered else None

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
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the jobs service until cancelled; ``task_status`` gets the bound address.

    Opens the store at ``settings.database`` and declares ``settings.pipelines``
    first. The address reported is the one actually bound, so port 0 works.
    When cancelled, replies to writes already handed to the store still go out
    within *stop_grace* seconds. *clock* is the store's clock (tests).
    """
    address = settings.address()
    grace = _StopGrace(stop_grace)
    async with JobStore.open(settings.database, clock=clock) as store:
        for name in settings.pipelines:
            await store.declare(name)
        service = _Service(
            store,
            token=settings.token.get_secret_value(),
            grace=grace,
            max_request_bytes=settings.max_request_bytes,
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
                logger.info("jobs service stopping")
