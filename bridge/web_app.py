"""The webhook receiver on aiohttp's low-level HTTP server.

Request path on the webhook URL: allowlist -> path token -> basic auth -> method -> bounded
read -> decompress -> parse once -> publish the decompressed bytes unchanged -> 200 after the
broker's ack. Every answer on the webhook URL, errors included, carries
``wifiWebhookListener: 1`` so the portal's "Save and Validate" works.

The server has four fixed paths, so it routes them itself, by one comparison and one dict
look-up, on :class:`aiohttp.web.Server` rather than through an ``Application`` and its
router: that machinery cost about a sixth of a bare handler's time per request (measured with
``make bench``'s load, a bare handler on each: 23.9k and 28.8k requests/s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from bridge import body as bodies
from bridge.auth import Gate
from bridge.errors import (
    BadBody,
    BadEncoding,
    BodyTimeout,
    ClientDisconnected,
    RequestError,
    Unauthorized,
    UnsupportedEncoding,
    WifiBridgeError,
)
from bridge.event import identify
from bridge.metrics import BridgeMetrics
from bridge.publisher import Headers, Publisher
from bridge.settings import BridgeSettings

log = logging.getLogger(__name__)

LISTENER_HEADER = "wifiWebhookListener"
_JSON = "application/json"
_RETRY_AFTER_S = "30"
_READY_CACHE_S = 1.0
_ACCEPTED_HEADERS = {hdrs.CONTENT_TYPE: _JSON, LISTENER_HEADER: "1"}


@dataclass(slots=True)
class BridgeState:
    """What the running app knows beyond its settings; mutated only by the serve loop."""

    shutting_down: bool = False
    last_ready_check_s: float = 0.0
    last_ready: bool = False
    ready_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _json(status: int, payload: dict[str, Any], *, listener: bool = True) -> web.Response:
    response = web.Response(status=status, body=orjson.dumps(payload), content_type=_JSON)
    if listener:
        response.headers[LISTENER_HEADER] = "1"
    return response


def _raw_header(text: str) -> bytes:
    """A request header's value as the bytes it came as: aiohttp decodes them as UTF-8 with
    ``surrogateescape``, so a byte that is not UTF-8 (latin-1 text) is a lone surrogate."""
    return text.encode("utf-8", "surrogateescape")


def _error(exc: WifiBridgeError, *, listener: bool = True) -> web.Response:
    response = _json(
        exc.http_status, {"error": exc.code, "message": exc.message}, listener=listener
    )
    if isinstance(exc, Unauthorized):
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="wifi-bridge"'
    if exc.retryable:
        response.headers[hdrs.RETRY_AFTER] = _RETRY_AFTER_S
    return response


class Receiver:
    """Handles the webhook URL and the operational endpoints of one bridge process."""

    def __init__(
        self,
        *,
        settings: BridgeSettings,
        publisher: Publisher,
        metrics: BridgeMetrics,
        state: BridgeState | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.metrics = metrics
        self.state = state if state is not None else BridgeState()
        self.gate = Gate.from_settings(settings)
        self._ack_timeout_s = settings.ack_timeout_s
        self._read_timeout_s = settings.read_timeout_s
        self._webhook_path = settings.webhook_path
        self._token_prefix = settings.webhook_path + "/" if settings.token else None
        self._routes: dict[str, Handler] = {
            "/healthz": _get_only(self.healthz),
            "/readyz": _get_only(self.readyz),
            "/metrics": _get_only(self.metrics_endpoint),
        }

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: the webhook URL (``<path>/<token>`` when a token is set), the
        operational endpoints, else 404."""
        path = request.path
        prefix = self._token_prefix
        if prefix is None:
            if path == self._webhook_path:
                return await self.webhook(request, None)
        elif path.startswith(prefix):
            presented = path[len(prefix) :]
            if presented and "/" not in presented:
                return await self.webhook(request, presented)
        handler = self._routes.get(path)
        if handler is None:
            return _not_found()
        return await handler(request)

    async def webhook(self, request: web.BaseRequest, token: str | None) -> web.StreamResponse:
        """The webhook URL, with the token segment the request came with (None: none)."""
        method = request.method
        if not self.gate.token_matches(token):
            self.metrics.count_request(method, "not_found")
            return _json(404, {"error": "not_found", "message": "no such URL"}, listener=False)
        self.metrics.in_flight += 1
        try:
            outcome, response = await self._webhook(request, method)
        except ClientDisconnected as exc:
            log.info("the client went away before its body arrived")  # no one to answer
            outcome, response = exc.code, _error(exc)
        except WifiBridgeError as exc:
            outcome, response = exc.code, _error(exc)
            if isinstance(exc, BodyTimeout):  # what is left of the body is not waited for
                response.force_close()
        except Exception:
            log.exception("unexpected error handling a webhook")
            outcome = "internal_error"
            response = _json(500, {"error": "internal_error", "message": "unexpected error"})
        finally:
            self.metrics.in_flight -= 1
        self.metrics.count_request(method, outcome)
        if self.state.shutting_down:
            # Its connection closes after this answer: while in-flight requests finish, a
            # keep-alive connection brings no further one.
            response.force_close()
        return response

    async def _webhook(self, request: web.BaseRequest, method: str) -> tuple[str, web.Response]:
        gate = self.gate
        if gate.allowed_networks:
            # Every X-Forwarded-For line, in order, as one list: the last is what our proxy
            # added, the first may be anything the client wrote.
            forwarded = ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
            gate.check_source(request.remote, forwarded or None)
        if gate.basic_auth is not None:
            gate.check_basic_auth(request.headers.get(hdrs.AUTHORIZATION))
        if method in {hdrs.METH_GET, hdrs.METH_HEAD}:
            return "handshake", _json(200, {"status": "ok"})
        if method != hdrs.METH_POST:
            response = _json(
                405, {"error": "method_not_allowed", "message": "use POST (GET/HEAD to validate)"}
            )
            response.headers[hdrs.ALLOW] = "GET, HEAD, POST"
            return "method_not_allowed", response
        return await self._accept(request)

    async def _accept(self, request: web.BaseRequest) -> tuple[str, web.Response]:
        settings = self.settings
        received_ms = int(time.time() * 1000)
        content_type = request.headers.get(hdrs.CONTENT_TYPE, _JSON)
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
        raw = await bodies.read_bounded(
            request, max_bytes=settings.max_body_bytes, timeout_s=self._read_timeout_s
        )
        data = raw
        try:
            if encoding:
                data = bodies.decode(raw, encoding, max_bytes=settings.max_body_bytes)
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise BadBody(f"body is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(parsed, dict):
                raise BadBody(
                    f"body must be a JSON object, got {type(parsed).__name__}", code="not_an_object"
                )
            try:
                identity = identify(parsed)
            except Exception as exc:  # no body may end in a 500 and be lost
                raise BadBody(
                    f"the body's ids cannot be read ({type(exc).__name__})", code="unreadable"
                ) from None
        except (BadBody, BadEncoding, UnsupportedEncoding) as exc:
            # A body whose encoding is broken or unknown is kept as it came, still encoded.
            encoded = isinstance(exc, BadEncoding | UnsupportedEncoding)
            kept, kept_encoding = (raw, encoding) if encoded else (data, "")
            await self._dead_letter(exc, kept, content_type, kept_encoding, received_ms)
            raise
        event_id = identity.event_id.encode()
        headers: Headers = [
            ("event-id", event_id),
            ("received-at", b"%d" % received_ms),
            ("content-type", _raw_header(content_type)),
        ]
        await self.publisher.publish(
            settings.topic_raw,
            key=identity.key,
            value=data,
            headers=headers,
            timeout_s=self._ack_timeout_s,
        )
        body = b'{"status":"accepted","eventId":"' + event_id + b'"}'
        return "accepted", web.Response(body=body, headers=_ACCEPTED_HEADERS)

    async def _dead_letter(
        self,
        exc: RequestError,
        value: bytes,
        content_type: str,
        content_encoding: str,
        received_ms: int,
    ) -> None:
        """Keep an authenticated body that cannot be read; the answer stays a 4xx either way."""
        log.info("body kept in the dead-letter topic", extra={"reason": exc.code})
        headers: Headers = [
            ("dlq-reason", exc.code.encode()),
            ("dlq-detail", exc.message.encode()[:1024]),
            ("received-at", str(received_ms).encode()),
            ("content-type", _raw_header(content_type)),
        ]
        if content_encoding:
            headers.append(("content-encoding", _raw_header(content_encoding)))
        try:
            await self.publisher.publish(
                self.settings.topic_dlq,
                key=b"",
                value=value,
                headers=headers,
                timeout_s=self._ack_timeout_s,
            )
        except WifiBridgeError:
            log.warning(
                "could not keep a bad body in the dead-letter topic", extra={"reason": exc.code}
            )
            return
        self.metrics.dead_letters.labels(reason=exc.code).inc()

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        return _json(200, {"status": "alive"}, listener=False)

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        state = self.state
        if state.shutting_down:
            return _json(503, {"status": "shutting_down"}, listener=False)
        async with state.ready_lock:
            now = time.monotonic()
            if now - state.last_ready_check_s > _READY_CACHE_S:
                state.last_ready = await self.publisher.ping(timeout_s=2.0)
                state.last_ready_check_s = time.monotonic()
        kafka = self.publisher.connected
        self.metrics.kafka_ready.set(1 if kafka else 0)
        if not state.last_ready:
            return _json(503, {"status": "unavailable", "kafka": kafka}, listener=False)
        return _json(200, {"status": "ready", "kafka": kafka}, listener=False)

    async def metrics_endpoint(self, request: web.BaseRequest) -> web.Response:
        # Set at every scrape too: the chart probes only /healthz, and an alert reads this.
        self.metrics.kafka_ready.set(1 if self.publisher.connected else 0)
        response = web.Response(body=self.metrics.render())
        response.headers[hdrs.CONTENT_TYPE] = self.metrics.content_type
        return response


Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


#: How long an idle keep-alive connection stays open (aiohttp's own default is an hour). The
#: sender posts seconds apart within a visit at most; each new connection costs a handshake.
_KEEPALIVE_S = 30.0


class _Connection(RequestHandler):
    """aiohttp's connection handler, with a deadline for a first request head and errors of
    its own HTTP parser answered as the receiver answers (JSON, the listener header).

    Without the deadline, a client that connects and sends nothing, or half a head, would hold
    its connection (and a file descriptor) until the keep-alive timeout, before any allowlist
    or token could refuse it. Between later requests of a connection the keep-alive timeout
    (:data:`_KEEPALIVE_S`) is the bound.
    """

    def __init__(
        self, manager: _Server, *, read_timeout_s: float, metrics: BridgeMetrics, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._metrics = metrics
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._read_timeout_s, self._check_first_head)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _check_first_head(self) -> None:
        self._head_timer = None
        if self._request_count == 0 and self.transport is not None:  # no whole head yet
            self._metrics.count_request("unknown", "head_timeout")
            self.force_close()  # closes the transport too

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own answer is text quoting the bytes at fault (the request line, with a
        # URL token); it logs them, and refuses if an answer was begun already.
        answer = super().handle_error(request, status, exc, message)
        if not isinstance(exc, HttpProcessingError):  # a handler's error, not the parser's
            return answer
        self._metrics.count_request("unknown", "bad_http")
        response = _json(
            status,
            {
                "error": "bad_request" if status < 500 else "internal_error",
                "message": "the request is not valid HTTP",
            },
        )
        response.force_close()
        return response


class _Server(web.Server):
    """:class:`aiohttp.web.Server` making :class:`_Connection` handlers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        read_timeout_s: float,
        metrics: BridgeMetrics,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._metrics = metrics

    def __call__(self) -> RequestHandler:
        return _Connection(
            self,
            read_timeout_s=self._read_timeout_s,
            metrics=self._metrics,
            loop=self._loop,
            **self._kwargs,
        )


def create_server(receiver: Receiver) -> web.Server:
    """The HTTP server of ``receiver``, to run with :class:`aiohttp.web.ServerRunner`."""
    max_size = receiver.settings.max_body_bytes
    loop = asyncio.get_running_loop()

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # client_max_size bounds request.read(); see bridge.body.read_bounded.
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=max_size
        )

    return _Server(
        receiver.handle,
        read_timeout_s=receiver.settings.read_timeout_s,
        metrics=receiver.metrics,
        keepalive_timeout=_KEEPALIVE_S,
        request_factory=make_request,
        auto_decompress=False,  # bodies are decompressed by us, with a bound on the output
        access_log=None,  # an access log would print the URL token
    )


def _get_only(handler: Handler) -> Handler:
    """JSON 405 for other methods."""

    async def only_get(request: web.BaseRequest) -> web.Response:
        if request.method not in {hdrs.METH_GET, hdrs.METH_HEAD}:
            response = _json(
                405, {"error": "method_not_allowed", "message": "use GET"}, listener=False
            )
            response.headers[hdrs.ALLOW] = "GET, HEAD"
            return response
        return await handler(request)

    return only_get


def _not_found() -> web.Response:
    return _json(404, {"error": "not_found", "message": "no such URL"}, listener=False)
