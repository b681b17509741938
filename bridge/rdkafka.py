"""A publisher on librdkafka (confluent-kafka), the bridge's default producer client.

Why: on the request path the producer client's cost per record dominates, and librdkafka's
``produce()`` is a C call that only enqueues. Its delivery reports are collected by a thread
of their own and handed to the event loop in batches (see :class:`RdKafkaPublisher`).
Partitioning is ``murmur2_random``: murmur2 over the key, as the Java client and Kafka Streams
compute it (librdkafka's own default, CRC32, would not co-partition).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from functools import partial
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from bridge.errors import (
    BatchRefused,
    PublishError,
    RecordRefused,
    RecordTooLarge,
    WifiBridgeError,
)
from bridge.metrics import BridgeMetrics
from bridge.publisher import Headers
from bridge.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Errors about a record itself, which no retry changes.
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_INVALID = frozenset({KafkaError.INVALID_RECORD})


#: How long librdkafka keeps trying to deliver a record (``message.timeout.ms``; its default is
#: 300 s). A record not acknowledged within the request's budget is spooled, and a spooled one
#: is sent again by the drainer after its 30 s wait: past this the producer gives a record up
#: and reports it failed, so it does not keep the copies of every earlier try queued, to be
#: delivered all at once when the brokers come back.
DELIVERY_TIMEOUT_MS = 25_000


def producer_config(settings: KafkaSettings, *, linger_ms: int) -> dict[str, Any]:
    """librdkafka settings: idempotent, acks=all, murmur2, and the project's security options."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        "partitioner": "murmur2_random",
        "message.timeout.ms": DELIVERY_TIMEOUT_MS,
    }


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka settings every client of this project takes: servers and security."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "security.protocol": settings.security_protocol.lower(),
        # Requests and acks are small and latency-bound: Nagle's algorithm would hold a
        # produce request back until the previous one's TCP ack (measured: about 15% fewer
        # requests per second through the bridge with it on).
        "socket.nagle.disable": True,
    }
    if settings.security_protocol.startswith("SASL"):
        config["sasl.mechanism"] = settings.sasl_mechanism
        config["sasl.username"] = settings.sasl_username
        config["sasl.password"] = settings.sasl_password
    if settings.ssl_cafile:
        config["ssl.ca.location"] = str(settings.ssl_cafile)
    if settings.ssl_certfile:
        config["ssl.certificate.location"] = str(settings.ssl_certfile)
    if settings.ssl_keyfile:
        config["ssl.key.location"] = str(settings.ssl_keyfile)
    if settings.ssl_key_password:
        config["ssl.key.password"] = settings.ssl_key_password
    return config


class RdKafkaPublisher:
    """Publishes with librdkafka and resolves each record's future on the event loop.

    ``publish`` returns once the broker acknowledged the record (``acks=all``), or raises
    :class:`PublishError` after ``timeout_s``; a record that times out may still be delivered
    later and keeps its event id, so consumers can drop the copy.

    Delivery reports are served by a thread of the publisher's own that blocks in
    ``poll()``, so a report reaches its request as soon as librdkafka has it. The callbacks
    only collect (future, error) pairs; after each ``poll()`` the thread hands the whole batch
    to the event loop with one ``call_soon_threadsafe``. (Polling on the loop's thread on a
    1 ms timer added up to two timer ticks to every ack and cost the loop a wake-up per tick:
    measured, the thread serves about 1.3 times the requests per second at lower p99.) A
    task on the loop fails, oldest first, the requests whose budget ran out, every
    ``timeout_check_interval_ms`` (default 20), so no request needs a timer of its own.
    """

    def __init__(
        self,
        *,
        settings: KafkaSettings,
        metrics: BridgeMetrics,
        linger_ms: int = 1,
        timeout_check_interval_ms: int = 20,
    ) -> None:
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        if timeout_check_interval_ms < 1:
            raise ValueError("timeout_check_interval_ms must be >= 1")
        self._config = producer_config(settings, linger_ms=linger_ms)
        self._config["error_cb"] = self._on_error
        # librdkafka's own log lines, through Python logging (served by poll(), on its thread).
        self._config["logger"] = logging.getLogger("librdkafka")
        self._metrics = metrics
        self._timeout_check_s = timeout_check_interval_ms / 1000
        self._producer: confluent_kafka.Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._poller: threading.Thread | None = None
        self._polling = False
        #: Requests awaiting their ack, oldest first: (deadline on the loop's clock, topic, future).
        self._waiting: deque[tuple[float, str, asyncio.Future[None]]] = deque()
        self._work = asyncio.Event()
        #: Reports collected by the delivery callbacks of the current ``poll()``; touched only
        #: by the thread that polls.
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self.fatal_error: KafkaError | None = None
        #: How many times librdkafka reported that it lost every broker connection (written
        #: only by the polling thread), and how many of those reports an acknowledged record or
        #: an answered ping that began after them has answered (written only by the loop): an
        #: ack collected before a report says nothing of what came after it. Each field has one
        #: writer, so no report can be lost between a read and a write of the other thread.
        self._down_reports = 0
        self._answered_reports = 0

    @property
    def connected(self) -> bool:
        """A producer is up, without a fatal error, and not cut off from every broker."""
        return (
            self._producer is not None
            and self.fatal_error is None
            and self._answered_reports >= self._down_reports
        )

    async def start(self) -> None:
        """Create the producer and check that a broker answers; raises if none does."""
        producer = confluent_kafka.Producer(self._config)
        try:
            await asyncio.to_thread(producer.list_topics, timeout=10)
        except KafkaException as exc:
            producer.close()
            raise PublishError(f"no Kafka broker answered: {exc.args[0]}") from None
        self._loop = asyncio.get_running_loop()
        self._producer = producer
        self._polling = True
        self._poller = threading.Thread(
            target=self._poll_thread, args=(producer, self._loop), name="rdkafka-poll", daemon=True
        )
        self._poller.start()
        self._expirer = asyncio.create_task(self._expire_loop(), name="rdkafka-expire")

    async def stop(self, *, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (within ``timeout_s``), serve the last reports, close.

        A request still waiting for its ack then fails with :class:`PublishError` (its record
        may yet have reached Kafka, which its event id makes harmless).
        """
        producer = self._producer
        if producer is None:
            return
        self._polling = False
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
            self._poller = None
        # flush() serves the remaining reports on its own thread; they are settled below.
        remaining = await asyncio.to_thread(producer.flush, timeout_s)
        if remaining:
            log.warning("records left undelivered at shutdown", extra={"records": remaining})
        producer.poll(0)
        reports, self._reports = self._reports, []
        _settle(reports)
        if self._expirer is not None:
            self._expirer.cancel()
            await asyncio.gather(self._expirer, return_exceptions=True)
        self._producer = None
        while self._waiting:
            _, _, delivered = self._waiting.popleft()
            if not delivered.done():
                delivered.set_exception(PublishError("the producer was closed before the ack"))
        producer.close()

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        producer, loop = self._producer, self._loop
        if producer is None or loop is None:
            raise PublishError("not connected to Kafka")
        started = loop.time()
        reports = self._down_reports
        delivered: asyncio.Future[None] = loop.create_future()
        try:
            producer.produce(
                topic, value, key, headers=headers, on_delivery=partial(self._collect, delivered)
            )
        except BufferError:
            self._metrics.publish_errors.labels(topic=topic, error="QueueFull").inc()
            raise PublishError("the producer's queue is full") from None
        except KafkaException as exc:
            # Refused before it was queued: whatever the reason, it is about this record alone.
            self._metrics.publish_errors.labels(topic=topic, error=_error_name(exc)).inc()
            raise _failure(exc, alone=True) from None
        self._waiting.append((started + timeout_s, topic, delivered))
        self._work.set()
        try:
            await delivered
        except KafkaException as exc:
            # The broker answers for a whole batch, which other records may have shared.
            self._metrics.publish_errors.labels(topic=topic, error=_error_name(exc)).inc()
            raise _failure(exc, alone=False) from None
        self._answered(reports)
        self._metrics.ack_latency.observe(loop.time() - started)

    async def ping(self, *, timeout_s: float) -> bool:
        """Whether a broker answers a metadata request now (a failure is the caller's to
        note: see DurablePublisher.connected)."""
        producer = self._producer
        if producer is None or self.fatal_error is not None:
            return False
        reports = self._down_reports
        try:
            metadata = await asyncio.to_thread(producer.list_topics, timeout=timeout_s)
        except KafkaException:
            return False
        if not metadata.brokers:
            return False
        self._answered(reports)
        return True

    def _answered(self, reports: int) -> None:
        """Kafka answered something begun when ``reports`` brokers-down reports were known."""
        if reports > self._answered_reports:
            self._answered_reports = reports

    def _poll_thread(
        self, producer: confluent_kafka.Producer, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Serve delivery reports until :meth:`stop`; hand each poll's batch to the loop."""
        while self._polling:
            producer.poll(0.1)  # runs the callbacks, which only collect
            if self._reports:
                reports, self._reports = self._reports, []
                try:
                    loop.call_soon_threadsafe(_settle, reports)
                except RuntimeError:  # the loop is closed: nobody awaits these any more
                    return

    def _collect(
        self, delivered: asyncio.Future[None], err: KafkaError | None, _msg: object
    ) -> None:
        self._reports.append((delivered, err))

    async def _expire_loop(self) -> None:
        waiting = self._waiting
        loop = asyncio.get_running_loop()
        while True:
            if not waiting:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(self._timeout_check_s)
            now = loop.time()
            while waiting and (waiting[0][2].done() or waiting[0][0] <= now):
                _, topic, delivered = waiting.popleft()
                if not delivered.done():
                    self._metrics.publish_errors.labels(topic=topic, error="Timeout").inc()
                    delivered.set_exception(
                        PublishError("Kafka did not acknowledge within the budget")
                    )

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka calls this from poll(), on the polling thread: set a flag and log only.
        if err.fatal():
            self.fatal_error = err
            log.error("producer hit a fatal error", extra={"error": err.name()})
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._down_reports += 1
            log.warning("Kafka client error", extra={"error": err.name()})
        else:
            log.warning("Kafka client error", extra={"error": err.name()})


def _settle(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    """Resolve the futures of one batch of delivery reports (on the event loop)."""
    for delivered, err in reports:
        if delivered.done():  # its request already ran out of time
            continue
        if err is None:
            delivered.set_result(None)
        else:
            delivered.set_exception(KafkaException(err))


def _failure(exc: KafkaException, *, alone: bool) -> WifiBridgeError:
    """What a failed publish means: a refusal of this record (``alone``), or of its batch, or
    a failure that trying again may cure."""
    err = exc.args[0] if exc.args else None
    code = err.code() if isinstance(err, KafkaError) else None
    name = _error_name(exc)
    refusal: RecordRefused
    if code in _TOO_LARGE:
        refusal = RecordTooLarge(
            f"Kafka refuses a record this large (body, key and headers): {name}"
        )
    elif code in _INVALID:
        refusal = RecordRefused(f"Kafka refuses the record: {name}")
    else:
        return PublishError(f"Kafka refused the record: {name}")
    if alone:
        return refusal
    return BatchRefused(f"Kafka refused the batch the record was in: {name}", refusal=refusal)


def _error_name(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.name() if isinstance(err, KafkaError) else type(exc).__name__
