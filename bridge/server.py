"""``wifi-bridge serve``: run the receiver until SIGTERM, then shut down without loss.

Start-up never waits for Kafka: the HTTP server answers at once (records go to the local
spool until Kafka answers) while a background task provisions the topics and connects the
producer, retrying with backoff. On SIGTERM the process stops accepting connections, lets
in-flight requests finish (each waits for its ack or its spool write), flushes the producer,
closes the spool and exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl

from aiohttp import web

from bridge.durable import Connect, DurablePublisher
from bridge.errors import ConfigError
from bridge.kafka import TopicSpec, ensure_topics
from bridge.metrics import BridgeMetrics
from bridge.publisher import KafkaPublisher, Publisher
from bridge.settings import BridgeSettings, server_tls_context
from bridge.spool import DEFAULT_SEGMENT_BYTES, Spool, SpoolUnavailable
from bridge.web_app import BridgeState, Receiver, create_server

log = logging.getLogger(__name__)


def make_publisher(settings: BridgeSettings, metrics: BridgeMetrics) -> Publisher:
    if settings.producer == "aiokafka":
        return KafkaPublisher(
            settings=settings.kafka, metrics=metrics, linger_ms=settings.linger_ms
        )
    from bridge.rdkafka import RdKafkaPublisher

    return RdKafkaPublisher(settings=settings.kafka, metrics=metrics, linger_ms=settings.linger_ms)


def run(settings: BridgeSettings) -> int:
    """``serve`` on the configured event loop (uvloop when asked for or available)."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise
        else:
            return uvloop.run(serve(settings))
    return asyncio.run(serve(settings))


def _tls_context(settings: BridgeSettings) -> ssl.SSLContext | None:
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    return server_tls_context(settings.tls_certfile, settings.tls_keyfile)


def _connector(settings: BridgeSettings, metrics: BridgeMetrics) -> Connect:
    topics = [TopicSpec(settings.topic_raw), TopicSpec(settings.topic_dlq)]

    async def connect() -> Publisher:
        await ensure_topics(settings.kafka, topics)
        kafka = make_publisher(settings, metrics)
        await kafka.start()
        return kafka

    return connect


async def _finish_requests(
    runner: web.ServerRunner, metrics: BridgeMetrics, *, timeout_s: float
) -> None:
    """Stop listening, then wait (at most ``timeout_s``) for the webhooks in progress.

    Only then may the runner's cleanup close the connections: aiohttp drops the bytes that
    reach a connection it closed, so a request whose body was still arriving would never
    complete. Meanwhile each answer closes its connection (see ``Receiver.webhook``).
    """
    for site in list(runner.sites):
        await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # A poll, only while shutting down: the count is a plain number on the request path.
    while metrics.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def serve(
    settings: BridgeSettings, *, stop: asyncio.Event | None = None, handle_signals: bool = True
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT arrives); returns the exit code."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)

    metrics = BridgeMetrics()
    spool = Spool(
        directory=settings.spool_dir,
        max_bytes=settings.spool_max_bytes,
        segment_bytes=min(DEFAULT_SEGMENT_BYTES, settings.spool_max_bytes),
        fsync=settings.spool_fsync,
    )

    async def provision(topics: list[str]) -> None:
        await ensure_topics(settings.kafka, [TopicSpec(topic) for topic in topics])

    publisher = DurablePublisher(
        connect=_connector(settings, metrics), spool=spool, metrics=metrics, ensure_topics=provision
    )
    try:
        await publisher.start()
    except SpoolUnavailable as exc:
        raise ConfigError(
            f"BRIDGE_SPOOL_DIR: cannot use {str(settings.spool_dir)!r}: {exc}"
        ) from None
    state = BridgeState()
    receiver = Receiver(settings=settings, publisher=publisher, metrics=metrics, state=state)
    runner = web.ServerRunner(
        create_server(receiver), shutdown_timeout=settings.shutdown_timeout_s, handle_signals=False
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, settings.host, settings.port, ssl_context=_tls_context(settings), backlog=1024
        )
        await site.start()
    except BaseException as exc:
        await runner.cleanup()
        await publisher.stop()
        for signum in signals:
            loop.remove_signal_handler(signum)
        if isinstance(exc, socket.gaierror):
            raise ConfigError(
                f"BRIDGE_HOST: cannot listen on {settings.host!r}: {exc.strerror}"
            ) from None
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
            where = f"{settings.host}:{settings.port}"
            detail = exc.strerror or str(exc)
            raise OSError(
                exc.errno, f"cannot listen on {where} (BRIDGE_HOST, BRIDGE_PORT): {detail}"
            ) from exc
        raise
    scheme = "https" if settings.tls_certfile else "http"
    shown_path = settings.webhook_path + ("/<token>" if settings.token else "")
    log.info(
        "listening",
        extra={"url": f"{scheme}://{settings.host}:{settings.port}{shown_path}"},
    )

    # Everything allocated so far (modules, app, clients) lives as long as the process: keep it
    # out of the cyclic GC's scans, which otherwise grow with the heap and run every few
    # hundred requests (measured: about 30 us of CPU per request).
    gc.freeze()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing in-flight requests")
        state.shutting_down = True
        await _finish_requests(runner, metrics, timeout_s=settings.shutdown_timeout_s)
        await runner.cleanup()
        await publisher.stop()
        for signum in signals:
            loop.remove_signal_handler(signum)
        log.info("stopped")
    return 0
