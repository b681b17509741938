"""Kafka first, the local spool when Kafka does not acknowledge in time.

The sender retries a failed delivery only after 3 hours and disables a listener that keeps
failing, so a Kafka outage must not become errors towards it. :class:`DurablePublisher` wraps
the producer: a record goes to Kafka and, when no ack comes within the budget (or the producer
is not connected, or older records still wait in the spool), it is appended to the spool and
fsynced instead; either way it is safe when ``publish`` returns. A drainer publishes spooled
records oldest first and acknowledges them in the spool only after Kafka acknowledged them.
While the spool holds a backlog, new records queue behind it, so a key's records reach Kafka
in the order they were received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.errors import BatchRefused, PublishError, RecordRefused
from bridge.metrics import BridgeMetrics
from bridge.publisher import Headers, Publisher
from bridge.rdkafka import RdKafkaPublisher
from bridge.spool import Spool, SpooledEntry, SpoolFull, SpoolRecord, SpoolUnavailable

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[Publisher]]
EnsureTopics = Callable[[list[str]], Awaitable[None]]

_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
#: Consecutive failed publishes after which a producer whose broker answers is rebuilt.
_WEDGED_AFTER_FAILURES = 3


#: How often, and with what timeout, Kafka is checked while it is not known to take records.
_WATCH_INTERVAL_S = 5.0
_WATCH_TIMEOUT_S = 2.0


def _backoff(attempt: int) -> float:
    return _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]


class DurablePublisher:
    """A :class:`Publisher` that never loses an accepted record while the disk holds.

    ``connect`` returns a started producer (it provisions topics first); it is retried with
    backoff until it succeeds and again whenever the producer has to be rebuilt.
    ``ack_timeout_s`` bounds the wait for Kafka on the request path; ``drain_timeout_s``
    (default 30, longer than the producer's own delivery timeout, so that a failed batch's
    records are reported failed by the producer, not still queued in it, when they are sent
    again) bounds the drainer's wait for a batch; ``drain_batch_records`` (default 500)
    is how many spooled records one drain step publishes at once. ``ensure_topics`` creates
    topics that are missing: a spooled record's topic may not be one ``connect`` provisions
    (spooled under an earlier topic setting, say), and without it would fail every try.
    """

    def __init__(
        self,
        *,
        connect: Connect,
        spool: Spool,
        metrics: BridgeMetrics,
        drain_batch_records: int = 500,
        drain_timeout_s: float = 30.0,
        ensure_topics: EnsureTopics | None = None,
    ) -> None:
        if drain_batch_records < 1:
            raise ValueError("drain_batch_records must be >= 1")
        self._connect = connect
        self._spool = spool
        self._metrics = metrics
        self._drain_batch_records = drain_batch_records
        self._drain_timeout_s = drain_timeout_s
        self._ensure_topics = ensure_topics
        self._ensured: set[str] = set()
        self._kafka: Publisher | None = None
        self._backlog = False
        # Whether this outage's "spooling" warning was logged: the requests in flight when
        # Kafka goes away all fail at once, and one line says what each of them would.
        self._spooling_logged = False
        self._spool_failing = False
        self._failures = 0
        #: Whether Kafka took the last record offered to it (or answered the last check):
        #: False from a failed publish, drain or check until one succeeds.
        self._kafka_answers = True
        #: False while the drainer cannot read the spool: its backlog then says nothing of
        #: Kafka, and a check may say that Kafka answers.
        self._draining = True
        self._wakeup = asyncio.Event()
        self._kafka_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """Whether Kafka takes records now: a producer is up and the last try succeeded."""
        kafka = self._kafka
        return kafka is not None and kafka.connected and self._kafka_answers

    async def start(self) -> None:
        """Open the spool (raises SpoolUnavailable if it cannot) and start connecting."""
        await self._spool.open()
        stats = self._spool.stats()
        # A segment that could not be read at open holds records too: the drainer tries it.
        self._backlog = stats.records > 0 or stats.unreadable_segments > 0
        if self._backlog:
            log.info("spool holds records from before", extra={"records": stats.records})
        self._metrics.watch_spool(self._spool)
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name="kafka-connect"),
            asyncio.create_task(self._drain_loop(), name="spool-drain"),
            asyncio.create_task(self._watch_loop(), name="kafka-watch"),
        ]

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop draining, flush the producer, close the spool (what is left stays there).

        Every answered request is already in Kafka or in the spool, so the flush is bounded by
        ``timeout_s`` (default 5): what the producer still holds then belongs to requests that
        timed out and were spooled.
        """
        tasks = [*self._tasks, *self._checks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kafka, self._kafka = self._kafka, None
        if kafka is not None:
            await kafka.stop(timeout_s=timeout_s)
        await self._spool.close()

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        kafka = self._kafka
        reason = "not_connected"
        if kafka is not None and not self._backlog:
            try:
                await kafka.publish(
                    topic, key=key, value=value, headers=headers, timeout_s=timeout_s
                )
            except RecordRefused as exc:
                # About this record alone: Kafka is fine, and the spool would only hold it back.
                log.info(
                    "Kafka refuses a record for good", extra={"topic": topic, "error": exc.code}
                )
                raise
            except PublishError as exc:
                reason = str(exc)
                if not isinstance(exc, BatchRefused):  # the broker answered: not wedged
                    self._kafka_answers = False
                    self._note_failure(kafka, exc)
            else:
                self._failures = 0
                self._kafka_answers = True
                self._spooling_logged = False
                return
        if not self._backlog and not self._spooling_logged:
            self._spooling_logged = True
            log.warning("spooling records until Kafka takes them again", extra={"reason": reason})
        record = SpoolRecord(
            topic=topic,
            key=key,
            value=value,
            headers=[
                (name, v if isinstance(v, bytes) else (v or "").encode()) for name, v in headers
            ],
            spooled_at_ms=int(time.time() * 1000),
        )
        try:
            await self._spool.append(record)
        except SpoolFull:
            raise  # the caller answers 503; the spool recovers as the drainer empties it
        except SpoolUnavailable:
            self._spool_failing = True
            raise
        self._spool_failing = False
        self._backlog = True
        self._metrics.spooled_records.inc()
        self._wakeup.set()

    async def ping(self, *, timeout_s: float) -> bool:
        """Ready while Kafka answers or the spool still takes records."""
        kafka = self._kafka
        if kafka is not None:
            if await kafka.ping(timeout_s=timeout_s):
                # With a backlog being drained, the drain says whether Kafka takes records.
                if not self._backlog or not self._draining:
                    self._kafka_answers = True
                return True
            self._kafka_answers = False
        return not self._spool_failing and self._spool.stats().bytes < self._spool.max_bytes

    # -- background ----------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            if self._kafka is not None:
                self._kafka_changed.clear()
                await self._kafka_changed.wait()
                continue
            try:
                self._kafka = await self._connect()
            except Exception as exc:
                delay = _backoff(attempt)
                attempt += 1
                log.warning(
                    "Kafka not reachable yet, retrying",
                    extra={"error": type(exc).__name__, "retry_in_s": delay, "attempt": attempt},
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._failures = 0
            self._kafka_answers = True
            log.info("connected to Kafka")
            self._wakeup.set()

    def _note_failure(self, kafka: Publisher, exc: PublishError) -> None:
        self._failures += 1
        fatal = isinstance(kafka, RdKafkaPublisher) and kafka.fatal_error is not None
        # One check at a time: when Kafka goes away every request in flight fails at once, and
        # a check each would be that many metadata requests, each holding a worker thread for
        # its whole timeout.
        if self._checks and not fatal:
            return
        if fatal or self._failures >= _WEDGED_AFTER_FAILURES:
            task = asyncio.create_task(self._maybe_rebuild(kafka, fatal=fatal))
            self._checks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._checks.discard)

    async def _maybe_rebuild(self, kafka: Publisher, *, fatal: bool) -> None:
        """Rebuild a producer that fails while its broker answers (a wedged idempotent producer).

        When the broker does not answer either, Kafka is down: keep the producer, which
        reconnects by itself, and let the spool take the records meanwhile.
        """
        if self._kafka is not kafka:
            return  # already being rebuilt
        if not fatal and not await kafka.ping(timeout_s=2.0):
            return
        if self._kafka is not kafka:
            return
        log.warning(
            "rebuilding the Kafka producer", extra={"fatal": fatal, "failures": self._failures}
        )
        self._metrics.producer_rebuilds.inc()
        self._kafka = None
        self._failures = 0
        self._kafka_changed.set()
        with contextlib.suppress(Exception):
            await kafka.stop(timeout_s=1.0)

    async def _watch_loop(self) -> None:
        """While Kafka is not known to take records, check it now and then: with no request
        and nothing spooled to drain, no other try would notice that it is back."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if self._kafka is not None and not self.connected:
                with contextlib.suppress(Exception):
                    await self.ping(timeout_s=_WATCH_TIMEOUT_S)

    async def _drain_loop(self) -> None:
        attempt = 0
        while True:
            if not self._backlog:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            kafka = self._kafka
            if kafka is None:
                self._wakeup.clear()
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation
                # that meets its timeout, which left stop() waiting on this task for good.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_backoff(attempt)):
                        await self._wakeup.wait()
                continue
            delay = _backoff(attempt)
            try:
                drained = await self._drain_next(kafka)
            except SpoolUnavailable as exc:
                # A segment that cannot be read now (an I/O error, a volume being remounted):
                # its records stay where they are, and the drainer stays to try again.
                self._draining = False
                self._metrics.drain_errors.labels(error=exc.code).inc()
                log.warning(
                    "cannot read the spool, retrying",
                    extra={"error": exc.message, "retry_in_s": delay},
                )
                drained = False
            except Exception:
                # A bug must not leave the spool undrained until the next restart either.
                self._metrics.drain_errors.labels(error="internal_error").inc()
                log.exception("the spool drainer failed, retrying", extra={"retry_in_s": delay})
                drained = False
            if drained:
                attempt = 0
                continue
            # What was read and not acknowledged is read again, in order.
            with contextlib.suppress(SpoolUnavailable):
                await self._spool.rewind()
            attempt += 1
            await asyncio.sleep(delay)

    async def _drain_next(self, kafka: Publisher) -> bool:
        """Read the next batch and publish it; False when it has to be tried again."""
        entries = await self._spool.read_batch(self._drain_batch_records)
        self._draining = True
        if not entries:
            self._backlog = False  # caught up: new records may go straight to Kafka
            self._spooling_logged = False
            return True
        missing = sorted({e.record.topic for e in entries} - self._ensured)
        if missing and self._ensure_topics is not None:
            try:
                await self._ensure_topics(missing)
            except Exception as exc:
                self._metrics.drain_errors.labels(error="topic_unavailable").inc()
                log.warning(
                    "cannot create the topics of spooled records, retrying",
                    extra={"topics": missing, "error": type(exc).__name__},
                )
                return False
            self._ensured.update(missing)
        return await self._drain(kafka, entries)

    async def _drain(self, kafka: Publisher, entries: list[SpooledEntry]) -> bool:
        """Publish one batch in order; acknowledge what Kafka acknowledged. True if all were.

        A record Kafka refuses for good is set aside, so it can never stop the drain.
        """
        started = time.monotonic()
        results = await publish_spooled(kafka, entries, timeout_s=self._drain_timeout_s)
        delivered = [e for e, result in zip(entries, results, strict=True) if result is None]
        await self._spool.acknowledge(delivered)
        self._metrics.drained_records.inc(len(delivered))
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, RecordRefused):
                await self._set_aside(entry, result)
            elif result is not None:
                break  # what follows is read again after the rewind
        failures = [r for r in results if r is not None and not isinstance(r, RecordRefused)]
        if not failures:
            self._failures = 0
            self._kafka_answers = True
            log.info(
                "drained spooled records",
                extra={"records": len(entries), "seconds": round(time.monotonic() - started, 3)},
            )
            return True
        first = failures[0]
        error = first if isinstance(first, PublishError) else PublishError(repr(first))
        log.warning(
            "draining the spool failed, retrying",
            extra={"failed": len(failures), "records": len(entries), "error": str(error)},
        )
        self._kafka_answers = False
        self._note_failure(kafka, error)
        return False

    async def _set_aside(self, entry: SpooledEntry, refusal: RecordRefused) -> None:
        saved_as = await self._spool.set_aside(entry, reason=refusal.code)
        self._metrics.refused_records.labels(reason=refusal.code).inc()
        log.warning(
            "Kafka refuses a spooled record for good; set aside, draining on",
            extra={
                "topic": entry.record.topic,
                "segment_id": entry.segment_id,
                "offset": entry.offset,
                "reason": refusal.code,
                "error": refusal.message,
                "saved_as": str(saved_as) if saved_as else None,
            },
        )


async def publish_spooled(
    kafka: Publisher, entries: list[SpooledEntry], *, timeout_s: float
) -> list[BaseException | None]:
    """Publish spooled ``entries`` all at once; for each, None once Kafka acknowledged it,
    else why not (a :class:`RecordRefused` when Kafka refuses that record for good).

    A refused batch held the record at fault and maybe others that only shared it: sent
    alone, in order and with nothing else of the drain in flight, each record tells. (Records
    read after them may be in Kafka by then: a refused batch's neighbours lose their order.)
    """

    async def send(entry: SpooledEntry) -> None:
        record = entry.record
        await kafka.publish(
            record.topic,
            key=record.key or b"",
            value=record.value,
            headers=list(record.headers),
            timeout_s=timeout_s,
        )

    results: list[BaseException | None] = list(
        await asyncio.gather(*(send(e) for e in entries), return_exceptions=True)
    )
    for i, (entry, result) in enumerate(zip(entries, results, strict=True)):
        if isinstance(result, BatchRefused):
            try:
                await send(entry)
            except BatchRefused as exc:
                results[i] = exc.refusal  # refused alone: the record is the cause
            except Exception as exc:
                results[i] = exc
            else:
                results[i] = None
    return results
