"""Publishing records to Kafka and waiting for the broker's acknowledgement."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from bridge.errors import BatchRefused, PublishError, RecordTooLarge
from bridge.kafka import client_options, started
from bridge.metrics import BridgeMetrics
from bridge.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Broker errors about a batch's size, which no retry changes.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

Headers = list[tuple[str, str | bytes | None]]


class Publisher(Protocol):
    """Where accepted records go; :meth:`publish` returns once the record is safe."""

    @property
    def connected(self) -> bool:
        """Whether a producer is up (it may still be waiting for a broker)."""
        ...

    async def start(self) -> None: ...

    async def stop(self, *, timeout_s: float = 30.0) -> None: ...

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None: ...

    async def ping(self, *, timeout_s: float) -> bool: ...


class KafkaPublisher:
    """An idempotent ``acks=all`` producer whose :meth:`publish` waits for the ack.

    Partitioning is aiokafka's default, murmur2 over the key: the same partition the Java
    client and Kafka Streams compute for the same key. ``linger_ms`` (default 2) lets
    concurrent requests share a batch.
    """

    def __init__(
        self,
        *,
        settings: KafkaSettings,
        metrics: BridgeMetrics,
        linger_ms: int = 2,
        request_timeout_ms: int = 30000,
    ) -> None:
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        self._metrics = metrics
        self._options: dict[str, Any] = {
            **client_options(settings),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "request_timeout_ms": request_timeout_ms,
            "max_batch_size": 256 * 1024,
        }
        self._producer: AIOKafkaProducer | None = None

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Connect; a failed start leaves nothing behind, so it can simply be tried again."""
        self._producer = await started(AIOKafkaProducer(**self._options))

    async def stop(self, *, timeout_s: float = 30.0) -> None:
        """Send what is buffered and wait for its acks (up to ``timeout_s``), then close."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await producer.flush()
        except TimeoutError:
            log.warning("records left undelivered at shutdown")
        finally:
            await producer.stop()

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        producer = self._producer
        if producer is None:
            raise PublishError("not connected to Kafka")
        started = time.perf_counter()
        sent = False
        try:
            async with asyncio.timeout(timeout_s):
                # The delivery future is safe to abandon on timeout: aiokafka skips
                # futures that are already done when the batch completes.
                delivery = await producer.send(topic, value=value, key=key, headers=headers)
                sent = True
                await delivery
        except TimeoutError:
            self._metrics.publish_errors.labels(topic=topic, error="Timeout").inc()
            raise PublishError(f"Kafka did not acknowledge within {timeout_s:.1f} s") from None
        except KafkaError as exc:
            name = type(exc).__name__
            self._metrics.publish_errors.labels(topic=topic, error=name).inc()
            if isinstance(exc, _TOO_LARGE):
                refusal = RecordTooLarge(
                    f"Kafka refuses a record this large (body, key and headers): {name}"
                )
                if not sent:  # send() checks the record alone, before it joins a batch
                    raise refusal from None
                raise BatchRefused(
                    f"Kafka refused the batch the record was in: {name}", refusal=refusal
                ) from None
            raise PublishError(f"Kafka refused the record: {name}") from exc
        self._metrics.ack_latency.observe(time.perf_counter() - started)

    async def ping(self, *, timeout_s: float) -> bool:
        """Whether a broker answers a metadata request now."""
        producer = self._producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError, OSError):
            return False
        return True
