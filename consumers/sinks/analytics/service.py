"""The analytics sink's I/O shell: Kafka in, one database transaction per batch out.

Positions live in the database (``sink_offsets``), written in the same transaction as the rows,
so the database alone says what has been stored. Kafka's group membership only decides which
instance reads which partition:

- when partitions are assigned, the instance pauses them and *claims* them in the database
  (bumping each one's epoch), seeks to the stored position and resumes them;
- each batch is written under the epochs it claimed; if another instance claimed a partition
  since (a rebalance this one has not noticed yet: a zombie), the transaction writes nothing,
  and this instance pauses the partition until Kafka revokes it or, if Kafka still assigns it
  here, claims it again after a backoff;
- when a write fails (database down, Kafka down for the dead-letter topic), the consumer seeks
  back to the batch's first offsets and tries again after an exponential backoff, polling in
  between so it keeps its group membership: no position is lost, and the process does not
  exit into a crash loop.

A record that is not a canonical login is published to the dead-letter topic with a
``dlq-reason`` header before the batch that skips it commits: nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from bridge.kafka import TopicSpec, client_options, ensure_topics
from consumers.sinks.analytics.dead_letters import DeadLetterProducer
from consumers.sinks.analytics.metrics import AnalyticsMetrics
from consumers.sinks.analytics.ports import sql_port
from consumers.sinks.analytics.rows import Login, RejectedRecord, parse_login
from consumers.sinks.analytics.settings import AnalyticsSettings
from consumers.sinks.analytics.store import (
    AnalyticsStore,
    Fenced,
    Position,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

__all__ = ["AnalyticsSink", "build_store", "run", "serve"]

Record: TypeAlias = ConsumerRecord[bytes, bytes]
_FIRST_BACKOFF_S = 0.1
_KAFKA_COMMIT_TIMEOUT_S = 5.0
# How often the sink checks, between batches, that its claims are still its own.
_CLAIM_CHECK_S = 5.0


def build_store(settings: AnalyticsSettings, metrics: AnalyticsMetrics) -> AnalyticsStore:
    """The store ``ANALYTICS_URL`` names (nothing is opened yet)."""
    sql = sql_port(
        settings.store.url,
        statement_timeout_ms=settings.statement_timeout_ms,
        # A DuckDB file is released after a second without batches, so readers
        # (wifi-bridge report, wifi-bridge replay) get in.
        idle_release_s=1.0,
        on_hand_over=metrics.hand_overs.inc,
    )
    return AnalyticsStore(sql, group_id=settings.group_id)


@dataclass(slots=True)
class _Batch:
    logins: list[Login]
    rejects: list[tuple[Record, RejectedRecord]]
    first_offsets: dict[TopicPartition, int]
    positions: list[Position]

    @property
    def records(self) -> int:
        return len(self.logins) + len(self.rejects)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: AnalyticsSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._sink.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._sink.partitions_assigned(assigned)


class AnalyticsSink:
    """Consumes canonical logins and writes them to the store, batch by batch.

    ``stop`` ends :meth:`run` after the batch in hand is written. Backoff while the store is
    down doubles from 0.1 s up to ``settings.retry_max_backoff_ms``.
    """

    def __init__(
        self,
        *,
        settings: AnalyticsSettings,
        store: AnalyticsStore,
        metrics: AnalyticsMetrics,
        stop: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._stop = stop
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters = DeadLetterProducer(
            self._make_producer, topic=settings.topic_dlq, max_bytes=settings.dlq_max_bytes
        )
        #: Partitions claimed in the database: their epoch and the next offset to write.
        self._epochs: dict[TopicPartition, int] = {}
        self._next: dict[TopicPartition, int] = {}
        #: Assigned by Kafka but not claimed in the database yet (paused meanwhile).
        self._unclaimed: set[TopicPartition] = set()
        #: Rejected records already in the dead-letter topic (a retried batch skips them).
        self._dead_lettered: dict[TopicPartition, int] = {}
        self._lag_exported: set[TopicPartition] = set()
        self._backoff_s = _FIRST_BACKOFF_S

    # -- rebalance callbacks (no I/O: the loop claims, so a database outage cannot stall them)

    def partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        fresh = set(assigned) - set(self._epochs)
        if fresh and self._consumer is not None:
            self._consumer.pause(*fresh)
        self._unclaimed |= fresh
        log.info("partitions assigned", extra={"partitions": _names(fresh)})

    def partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = set(revoked)
        for tp in gone:
            self._forget(tp)
        self._unclaimed -= gone
        self._metrics.owned_partitions.set(len(self._epochs))
        log.info("partitions revoked", extra={"partitions": _names(gone)})

    def _reclaim(self, consumer: AIOKafkaConsumer, lost: Iterable[TopicPartition]) -> None:
        """Partitions whose claim is no longer this instance's: claim them again, paused."""
        assigned = consumer.assignment()
        for tp in lost:
            self._forget(tp)
            # Still ours in Kafka's view: a claim that raced a rebalance, or positions moved by
            # `wifi-bridge replay`. Claim it again (after the backoff) and resume from what the
            # database holds; if this instance is the zombie, its revocation is near. (Pausing
            # a partition Kafka took away meanwhile would raise.)
            if tp in assigned:
                consumer.pause(tp)
                self._unclaimed.add(tp)
        self._metrics.owned_partitions.set(len(self._epochs))

    async def _check_claims(self, consumer: AIOKafkaConsumer) -> None:
        """Between batches: notice claims that moved on without this instance writing.

        A partition whose epoch changed in the database (another instance claimed it, or its
        position was moved) is claimed again now, rather than at its next batch, which on a
        quiet topic may be far off.
        """
        if not self._epochs:
            return
        try:
            stored = await self._store.epochs(sorted({tp.topic for tp in self._epochs}))
        except StoreUnavailable:
            return  # the next batch (or check) meets the outage and backs off
        moved = {
            tp
            for tp, epoch in self._epochs.items()
            if stored.get((tp.topic, tp.partition)) != epoch
        }
        if moved:
            log.warning(
                "partitions claimed or moved since this instance claimed them: claiming again",
                extra={"partitions": _names(moved)},
            )
            self._reclaim(consumer, moved)

    def _forget(self, tp: TopicPartition) -> None:
        self._epochs.pop(tp, None)
        self._next.pop(tp, None)
        self._dead_lettered.pop(tp, None)
        if tp in self._lag_exported:
            self._lag_exported.discard(tp)
            self._metrics.lag.remove(tp.topic, str(tp.partition))

    # -- main loop

    async def run(self) -> None:
        """Start the Kafka clients (waiting for Kafka, with backoff), then read until stopped."""
        settings = self._settings
        topics = [TopicSpec(t) for t in (*settings.topics, settings.topic_dlq)]
        try:
            started = (
                await self._until_started("topics", lambda: ensure_topics(settings.kafka, topics))
                and await self._until_started("producer", self._dead_letters.start)
                and await self._until_started("consumer", self._start_consumer)
            )
            if started:
                assert self._consumer is not None
                await self._loop(self._consumer)
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            await self._dead_letters.stop()
            await self._store.close()

    async def _until_started(self, what: str, start: Callable[[], Awaitable[object]]) -> bool:
        """Run ``start`` until it succeeds; False when stopped first.

        Kafka unreachable when the sink starts (a broker restarting with it) is waited out,
        as an outage later is: exiting would only restart the process into the same wait.
        """
        while not self._stop.is_set():
            try:
                await start()
            except (KafkaError, OSError) as exc:
                self._metrics.retries.inc()
                log.warning(
                    "Kafka not reachable yet, retrying",
                    extra={"step": what, "error": type(exc).__name__, "backoff_s": self._backoff_s},
                )
                await self._pause()
                continue
            self._backoff_s = _FIRST_BACKOFF_S
            return True
        return False

    def _make_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **client_options(self._settings.kafka),
            acks="all",
            enable_idempotence=True,
            max_request_size=self._settings.dlq_max_bytes,
        )

    async def _start_consumer(self) -> None:
        settings = self._settings
        consumer = AIOKafkaConsumer(
            **client_options(settings.kafka),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=settings.batch_max_records,
        )
        consumer.subscribe(list(settings.topics), listener=_Rebalance(self))
        # Set before it starts: an assignment the rebalance callback meets pauses its partitions.
        self._consumer = consumer
        try:
            await consumer.start()
        except BaseException:
            self._consumer = None
            await consumer.stop()
            raise

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        next_check_s = time.monotonic() + _CLAIM_CHECK_S
        while not self._stop.is_set():
            # Whether a claim or a write was tried, and whether all that was tried worked.
            tried, healthy = False, True
            if time.monotonic() >= next_check_s:
                next_check_s = time.monotonic() + _CLAIM_CHECK_S
                await self._check_claims(consumer)
            if self._unclaimed:
                tried, healthy = True, await self._claim(consumer)
            # Poll even while the database is down: a consumer that stops polling for
            # max.poll.interval.ms is dropped from its group.
            fetched = await consumer.getmany(
                timeout_ms=self._settings.batch_wait_ms,
                max_records=self._settings.batch_max_records,
            )
            batch = self._assemble(fetched)
            if batch.records:
                tried, healthy = True, await self._write(consumer, batch) and healthy
            self._update_lag(consumer)
            if not healthy:
                await self._pause()
            elif tried:
                # Only a success ends the backoff: a poll that comes back empty (as the one
                # after a rewind often does, before the fetch from the new position) proves
                # nothing.
                self._backoff_s = _FIRST_BACKOFF_S

    async def _claim(self, consumer: AIOKafkaConsumer) -> bool:
        """Claim every unclaimed partition, seek to its stored position; False on failure."""
        by_topic: dict[str, list[int]] = {}
        for tp in self._unclaimed:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        try:
            for topic, partitions in by_topic.items():
                for claim in await self._store.claim(topic, partitions):
                    tp = TopicPartition(claim.topic, claim.partition)
                    if tp not in self._unclaimed:
                        continue
                    next_offset = claim.next_offset
                    if next_offset is not None:
                        end = (await consumer.end_offsets([tp]))[tp]
                        if tp not in self._unclaimed:
                            continue  # revoked meanwhile: its new owner claims it
                        if next_offset > end:
                            # The stored position is past the end of the log: the topic was
                            # deleted and created again (or this database met another
                            # cluster). Reading it from the start is safe, since logins are
                            # stored once per event id, and skips nothing.
                            log.warning(
                                "stored position is past the end of the partition: reading it "
                                "from the beginning",
                                extra={
                                    "topic": tp.topic,
                                    "partition": tp.partition,
                                    "offset": next_offset,
                                    "end_offset": end,
                                },
                            )
                            next_offset = None
                    if next_offset is None:
                        await consumer.seek_to_beginning(tp)
                        if tp not in self._unclaimed:
                            continue
                    else:
                        consumer.seek(tp, next_offset)
                    self._epochs[tp] = claim.epoch
                    self._next[tp] = next_offset or 0
                    self._unclaimed.discard(tp)
                    consumer.resume(tp)
                    log.info(
                        "partition claimed",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "epoch": claim.epoch,
                            "offset": claim.next_offset,
                        },
                    )
        except StoreUnavailable as exc:
            self._metrics.store_up.set(0)
            self._metrics.retries.inc()
            log.warning(
                "cannot claim partitions, retrying",
                extra={"error": exc.message, "backoff_s": self._backoff_s},
            )
            return False
        except KafkaError as exc:
            # No leader for a partition (a broker restarting) or a rebalance under the seek:
            # the partitions left unclaimed stay paused and are claimed after the backoff.
            self._metrics.retries.inc()
            log.warning(
                "cannot position claimed partitions, retrying",
                extra={"error": type(exc).__name__, "backoff_s": self._backoff_s},
            )
            return False
        self._metrics.store_up.set(1)
        self._metrics.owned_partitions.set(len(self._epochs))
        return True

    def _assemble(self, fetched: dict[TopicPartition, list[Record]]) -> _Batch:
        batch = _Batch([], [], {}, [])
        for tp, records in fetched.items():
            epoch = self._epochs.get(tp)
            if epoch is None:
                continue  # not (or no longer) ours: its owner reads it from the stored offset
            fresh = [r for r in records if r.offset >= self._next.get(tp, 0)]
            if not fresh:
                continue
            batch.first_offsets[tp] = fresh[0].offset
            batch.positions.append(Position(tp.topic, tp.partition, epoch, fresh[-1].offset + 1))
            for record in fresh:
                try:
                    batch.logins.append(parse_login(record.value))
                except RejectedRecord as exc:
                    batch.rejects.append((record, exc))
        return batch

    async def _write(self, consumer: AIOKafkaConsumer, batch: _Batch) -> bool:
        """Write one batch; False when it must be tried again (the consumer was rewound)."""
        started = time.perf_counter()
        try:
            await self._dead_letter(batch.rejects)
            result = await self._store.write(batch.logins, batch.positions)
        except Fenced as exc:
            self._metrics.batches.labels(outcome="fenced").inc()
            lost = {TopicPartition(topic, partition) for topic, partition in exc.partitions}
            log.warning(
                "partitions claimed by another instance since this one claimed them",
                extra={"partitions": _names(lost)},
            )
            self._reclaim(consumer, lost)
            self._rewind(consumer, batch)
            return False
        except (StoreUnavailable, KafkaError) as exc:
            self._metrics.batches.labels(outcome="failed").inc()
            self._metrics.retries.inc()
            if isinstance(exc, StoreUnavailable):
                self._metrics.store_up.set(0)
            detail = exc.message if isinstance(exc, StoreUnavailable) else type(exc).__name__
            log.warning(
                "batch not written, retrying",
                extra={"error": detail, "records": batch.records, "backoff_s": self._backoff_s},
            )
            self._rewind(consumer, batch)
            return False
        elapsed_s = time.perf_counter() - started
        self._metrics.store_up.set(1)
        self._metrics.write_latency.labels(store=self._store.kind).observe(elapsed_s)
        self._metrics.batches.labels(outcome="written").inc()
        self._metrics.rows_written.labels(table="logins").inc(result.logins_inserted)
        self._metrics.duplicates.inc(result.duplicates)
        for position in batch.positions:
            self._next[TopicPartition(position.topic, position.partition)] = position.next_offset
        log.debug(
            "batch written",
            extra={"records": batch.records, "inserted": result.logins_inserted},
        )
        if self._settings.commit_kafka_offsets:
            await self._commit_to_kafka(consumer, batch.positions)
        return True

    async def _dead_letter(self, rejects: Sequence[tuple[Record, RejectedRecord]]) -> None:
        """Publish the batch's dead letters; raises the first KafkaError that kept one out.

        Letters a failed batch already published are skipped when it is tried again: per
        partition, up to the first letter Kafka did not take.
        """
        fresh = [
            (record, error)
            for record, error in rejects
            if record.offset >= self._dead_lettered.get(_partition(record), 0)
        ]
        outcomes = await self._dead_letters.publish(fresh)
        failed: set[TopicPartition] = set()
        first_error: KafkaError | None = None
        for (record, error), outcome in zip(fresh, outcomes, strict=True):
            tp = _partition(record)
            if outcome is not None or tp in failed:
                failed.add(tp)
                first_error = first_error or outcome
                continue
            # Counted once, when published: a batch tried again skips (and does not count) it.
            self._dead_lettered[tp] = max(self._dead_lettered.get(tp, 0), record.offset + 1)
            self._metrics.rejected.labels(reason=error.reason.value).inc()
            log.warning(
                "record is not a canonical login: sent to the dead-letter topic",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "reason": error.reason.value,
                },
            )
        if first_error is not None:
            raise first_error

    def _rewind(self, consumer: AIOKafkaConsumer, batch: _Batch) -> None:
        """Seek the partitions still ours back to the batch's first records."""
        for tp, offset in batch.first_offsets.items():
            if tp in self._epochs:
                consumer.seek(tp, offset)

    async def _pause(self) -> None:
        """Wait out the backoff (or until stopped), then double it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self._settings.retry_max_backoff_ms / 1000)

    async def _commit_to_kafka(
        self, consumer: AIOKafkaConsumer, positions: Sequence[Position]
    ) -> None:
        offsets = {
            TopicPartition(p.topic, p.partition): p.next_offset
            for p in positions
            if TopicPartition(p.topic, p.partition) in self._epochs
        }
        if not offsets:
            return
        try:
            # Monitoring only (the database holds the real position), so it may not hold the
            # loop up: aiokafka retries a missing coordinator without a limit of its own.
            async with asyncio.timeout(_KAFKA_COMMIT_TIMEOUT_S):
                await consumer.commit(offsets)
        except (KafkaError, TimeoutError) as exc:
            log.debug("offsets not committed to Kafka", extra={"error": type(exc).__name__})

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        for tp in self._epochs:
            if tp not in assigned:
                continue  # revoked while the batch was written; forgotten at the next callback
            end = consumer.last_stable_offset(tp)
            if end is None:
                end = consumer.highwater(tp)
            if end is not None:
                position = self._next.get(tp, 0)
                self._lag_exported.add(tp)
                self._metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, end - position)
                )


def _partition(record: Record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)


async def _metrics_server(
    settings: AnalyticsSettings, metrics: AnalyticsMetrics
) -> web.AppRunner | None:
    if settings.metrics_port == 0:
        return None

    async def render(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", render)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    return runner


async def serve(
    settings: AnalyticsSettings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    metrics: AnalyticsMetrics | None = None,
) -> int:
    """Run the sink until ``stop`` is set (or SIGTERM/SIGINT); returns the exit code."""
    stop = stop if stop is not None else asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    metrics = metrics if metrics is not None else AnalyticsMetrics()
    runner = await _metrics_server(settings, metrics)
    store = build_store(settings, metrics)
    sink = AnalyticsSink(settings=settings, store=store, metrics=metrics, stop=stop)
    log.info(
        "analytics sink starting",
        extra={"store": store.kind, "topics": list(settings.topics), "group": settings.group_id},
    )
    try:
        await sink.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("analytics sink stopped")
    return 0


def run(settings: AnalyticsSettings) -> int:
    return asyncio.run(serve(settings))
