"""The webhook receiver as an aiohttp application.

Request path on the webhook URL: allowlist -> path token -> basic auth -> method -> bounded
read -> decompress -> parse once -> publish the decompressed bytes unchanged -> 200 after the
broker's ack. Every answer on the webhook URL, errors included, carries
``wifiWebhookListener: 1`` so the portal's "Save and Validate" works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import hdrs, web

from bridge import body as bodies
from bridge.auth import Gate
from bridge.errors import (
    BadBody,
    BadEncoding,
    PublishError,
    RequestError,
    Unauthorized,
    WifiBridgeError,
)
from bridge.event import identify
from bridge.metrics import BridgeMetrics
from bridge.publisher import Publisher
from bridge.settings import BridgeSettings

log = logging.getLogger(__name__)

LISTENER_HEADER = "wifiWebhookListener"
_JSON = "application/json"
_RETRY_AFTER_S = "30"
_READY_CACHE_S = 1.0


@dataclass(slots=True)
class BridgeState:
    """What the running app knows beyond its settings; mutated only by the serve loop."""

    publisher_started: bool = False
    shutting_down: bool = False
    last_ready_check_s: float = 0.0
    last_ready: bool = False
    ready_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _json(status: int, payload: dict[str, Any], *, listener: bool = True) -> web.Response:
    response = web.Response(status=status, body=orjson.dumps(payload), content_type=_JSON)
    if listener:
        response.headers[LISTENER_HEADER] = "1"
    return response


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

    async def webhook(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        if not self.gate.token_matches(request.match_info.get("token")):
            self.metrics.requests.labels(method=method, outcome="not_found").inc()
            return _json(404, {"error": "not_found", "message": "no such URL"}, listener=False)
        self.metrics.in_flight.inc()
        try:
            outcome, response = await self._webhook(request, method)
        except WifiBridgeError as exc:
            outcome, response = exc.code, _error(exc)
        except Exception:
            log.exception("unexpected error handling a webhook")
            outcome = "internal_error"
            response = _json(500, {"error": "internal_error", "message": "unexpected error"})
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(method=method, outcome=outcome).inc()
        return response

    async def _webhook(self, request: web.Request, method: str) -> tuple[str, web.Response]:
        self.gate.check_source(request.remote, request.headers.get(hdrs.X_FORWARDED_FOR))
        self.gate.check_basic_auth(request.headers.get(hdrs.AUTHORIZATION))
        if method in {hdrs.METH_GET, hdrs.METH_HEAD}:
            return "handshake", _json(200, {"status": "ok"})
        if method != hdrs.METH_POST:
            response = _json(
                405, {"error": "method_not_allowed", "message": "use POST (GET/HEAD to validate)"}
            )
            response.headers[hdrs.ALLOW] = "GET, HEAD, POST"
            return "method_not_allowed", response
        return await self._accept(request)

    async def _accept(self, request: web.Request) -> tuple[str, web.Response]:
        settings = self.settings
        received_ms = int(time.time() * 1000)
        content_type = request.headers.get(hdrs.CONTENT_TYPE, _JSON)
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
        raw = await bodies.read_bounded(request, max_bytes=settings.max_body_bytes)
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
        except (BadBody, BadEncoding) as exc:
            # A body whose encoding is broken is kept as it came, still encoded.
            kept, kept_encoding = (raw, encoding) if isinstance(exc, BadEncoding) else (data, "")
            await self._dead_letter(exc, kept, content_type, kept_encoding, received_ms)
            raise
        if not self.state.publisher_started:
            raise PublishError("not connected to Kafka yet")

        identity = identify(parsed)
        headers = [
            ("event-id", identity.event_id.encode()),
            ("received-at", str(received_ms).encode()),
            ("content-type", content_type.encode()),
        ]
        await self.publisher.publish(
            settings.topic_raw,
            key=identity.key,
            value=data,
            headers=headers,
            timeout_s=settings.ack_timeout_s,
        )
        self.metrics.body_size.observe(len(data))
        return "accepted", _json(200, {"status": "accepted", "eventId": identity.event_id})

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
        if not self.state.publisher_started:
            self.metrics.publish_errors.labels(
                topic=self.settings.topic_dlq, error="NotStarted"
            ).inc()
            return
        headers = [
            ("dlq-reason", exc.code.encode()),
            ("dlq-detail", exc.message.encode()[:1024]),
            ("received-at", str(received_ms).encode()),
            ("content-type", content_type.encode()),
        ]
        if content_encoding:
            headers.append(("content-encoding", content_encoding.encode()))
        try:
            await self.publisher.publish(
                self.settings.topic_dlq,
                key=b"",
                value=value,
                headers=headers,
                timeout_s=self.settings.ack_timeout_s,
            )
        except PublishError:
            log.warning(
                "could not keep a bad body in the dead-letter topic", extra={"reason": exc.code}
            )
            return
        self.metrics.dead_letters.labels(reason=exc.code).inc()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"}, listener=False)

    async def readyz(self, request: web.Request) -> web.Response:
        state = self.state
        if state.shutting_down:
            return _json(503, {"status": "shutting_down"}, listener=False)
        async with state.ready_lock:
            now = time.monotonic()
            if now - state.last_ready_check_s > _READY_CACHE_S:
                state.last_ready = state.publisher_started and await self.publisher.ping(
                    timeout_s=2.0
                )
                state.last_ready_check_s = time.monotonic()
                self.metrics.kafka_ready.set(1 if state.last_ready else 0)
        if not state.last_ready:
            return _json(503, {"status": "kafka_unreachable"}, listener=False)
        return _json(200, {"status": "ready"}, listener=False)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers[hdrs.CONTENT_TYPE] = self.metrics.content_type
        return response


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Routing errors (unknown path, wrong method) as JSON like every other error."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        response = _json(exc.status, {"error": code, "message": exc.reason}, listener=False)
        for name in (hdrs.ALLOW,):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response


RECEIVER = web.AppKey("receiver", Receiver)


def create_app(receiver: Receiver) -> web.Application:
    settings = receiver.settings
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_body_bytes)
    app[RECEIVER] = receiver
    route = settings.webhook_path + ("/{token}" if settings.token else "")
    app.router.add_route("*", route, receiver.webhook)
    app.router.add_get("/healthz", receiver.healthz)
    app.router.add_get("/readyz", receiver.readyz)
    app.router.add_get("/metrics", receiver.metrics_endpoint)
    return app
