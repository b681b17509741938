"""``wifi-bridge sink crm``: canonical logins from Kafka into a CRM, once a day per visitor.

The service shell: it reads batches from the visits and late topics (``read_committed``,
auto-commit off), lets the pure core (:mod:`consumers.sinks.contacts`) decide which contacts
to upsert, hands them to a CRM adapter (HubSpot, a signed webhook, or the local outbox),
keeps what the CRM refused in the dead-letter topic, saves the per-user sync marks in its
SQLite file, and only then commits the batch's offsets.

A CRM outage never loses the position and never crash-loops: the batch is retried with
exponential backoff (``Retry-After`` honoured) while the consumer keeps polling with its
partitions paused, so it stays in the group; nothing is committed until the CRM took the
batch. A failure of the sink's SQLite file is retried the same way, on the batch kept in
memory. A crash between the CRM's answer and the commit re-reads the batch; the sync marks
(written before the commit) make that re-read send nothing, and an upsert by e-mail address is
idempotent in the CRM anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sqlite3
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
)
from aiokafka.structs import ConsumerRecord

from bridge.errors import ConfigError
from bridge.kafka import TopicSpec, client_options, ensure_topics
from consumers.sinks.contacts import (
    Login,
    SyncMark,
    UnreadableRecord,
    Upsert,
    chunks,
    login_from_record,
    plan_upserts,
)
from consumers.sinks.crm_dlq import DeadLetterRecord, fit_dead_letter
from consumers.sinks.crm_http import HttpClient
from consumers.sinks.crm_metrics import CrmMetrics
from consumers.sinks.crm_port import Crm, CrmBatchRejected, CrmUnavailable, truncate_detail
from consumers.sinks.crm_retry import Backoff, RetryReason
from consumers.sinks.crm_settings import CrmSettings
from consumers.sinks.hubspot import HubSpotCrm
from consumers.sinks.outbox import CrmStateError, CrmStore, OutboxCrm
from consumers.sinks.ratelimit import SlidingWindowLimiter
from consumers.sinks.webhook import WebhookCrm

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord  # [bytes, bytes]; aiokafka ships no type hints
_POLL_TIMEOUT_MS = 500
_LAG_EVERY_S = 1.0


def make_crm(settings: CrmSettings, store: CrmStore, metrics: CrmMetrics) -> Crm:
    """The adapter ``CRM_TARGET`` names."""
    if settings.target == "outbox":
        return OutboxCrm(store, max_batch_size=settings.batch_size)
    http = HttpClient(
        crm=settings.target,
        limiter=SlidingWindowLimiter(
            max_requests=settings.rate_limit_requests, window_s=settings.rate_limit_window_s
        ),
        metrics=metrics,
        timeout_s=settings.request_timeout_s,
    )
    if settings.target == "hubspot":
        assert settings.hubspot_token is not None
        return HubSpotCrm(
            base_url=settings.hubspot_base_url,
            token=settings.hubspot_token,
            http=http,
            max_batch_size=settings.batch_size,
        )
    assert settings.webhook_url is not None
    assert settings.webhook_secret is not None
    return WebhookCrm(
        url=settings.webhook_url,
        secret=settings.webhook_secret,
        http=http,
        max_batch_size=settings.batch_size,
    )


@dataclass(slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str
    status: int | None = None

    @property
    def source(self) -> str:
        return f"{self.record.topic}/{self.record.partition}/{self.record.offset}"


class DeadLetterProducer:
    """The dead-letter topic's producer (``acks=all``, idempotent), replaced when wedged.

    A broker that refuses a record (larger than the topic's ``max.message.bytes``) leaves an
    idempotent producer's sequence numbers out of step with it: every later record to that
    partition fails with ``OutOfOrderSequenceNumber``. :meth:`reset` drops such a producer;
    the next :meth:`send` starts another, which gets a new producer id.
    """

    def __init__(self, make: Callable[[], AIOKafkaProducer]) -> None:
        self._make = make
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = self._make()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def send(self, topic: str, record: DeadLetterRecord) -> None:
        await self.start()
        assert self._producer is not None
        await self._producer.send_and_wait(
            topic, key=record.key, value=record.value, headers=list(record.headers)
        )

    async def reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def stop(self) -> None:
        await self.reset()


@dataclass(slots=True)
class Batch:
    """Records read together, dealt with as one: their offsets commit once all are settled."""

    records: list[Record]
    next_offsets: dict[TopicPartition, int]
    dead_lettered: set[str] = field(default_factory=set)
    """Sources (``topic/partition/offset``) of records already in the dead-letter topic, so
    a batch handled again after a failure of the state file does not publish them twice."""

    def first_offsets(self) -> dict[str, int]:
        """``topic/partition`` -> the batch's first offset there (for logs)."""
        first: dict[str, int] = {}
        for record in self.records:
            first.setdefault(f"{record.topic}/{record.partition}", record.offset)
        return first


@dataclass(slots=True)
class Delivery:
    accepted: list[Upsert]
    rejected: list[tuple[Upsert, int, str]]
    complete: bool = True


class CrmSink:
    """One consumer's loop: poll, plan, deliver, dead-letter, mark, commit.

    Collaborators are passed in (the consumer already subscribed and started). ``draw`` is the
    random source of the backoff's jitter.
    """

    def __init__(
        self,
        *,
        settings: CrmSettings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterProducer,
        crm: Crm,
        store: CrmStore,
        metrics: CrmMetrics,
        stop: asyncio.Event,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._crm = crm
        self._store = store
        self._metrics = metrics
        self._stop = stop
        self._draw = draw
        self._backoff = Backoff(
            initial_s=settings.retry_initial_ms / 1000, max_s=float(settings.retry_max_s)
        )
        self._batch_partitions: set[TopicPartition] = set()
        self._unsaved_marks: list[SyncMark] = []
        self._paused = False
        self._lag_updated_at = 0.0

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.step()

    async def step(self) -> None:
        """Read one batch and, when it was dealt with completely, commit its offsets."""
        batches = await self._consumer.getmany(
            timeout_ms=_POLL_TIMEOUT_MS, max_records=self._settings.max_poll_records
        )
        records = [record for batch in batches.values() for record in batch]
        if records:
            batch = Batch(
                records=records,
                next_offsets={tp: batch[-1].offset + 1 for tp, batch in batches.items()},
            )
            for record in records:
                self._metrics.records.labels(topic=record.topic).inc()
            self._batch_partitions = set(batch.next_offsets)
            done = await self._settle(batch)
            if self._paused:
                self._resume(batch.next_offsets if done else {})
            if done:
                await self._commit(batch.next_offsets)
            self._batch_partitions = set()
        await self._update_lag()

    async def _settle(self, batch: Batch) -> bool:
        """:meth:`handle` the batch until it gets through; False when stopped first.

        A failure of the sink's state file (locked, disk full, an I/O error) is retried with
        backoff on the same records, kept in memory with their offsets uncommitted. What the
        failed attempt already did is not done twice: sync marks it could not save are saved
        first (so a contact the CRM accepted is not sent again) and records it dead-lettered
        are not published again.
        """
        attempt = 0
        while True:
            try:
                return await self.handle(batch)
            except CrmStateError as exc:
                self._metrics.state_errors.labels(operation=exc.operation, error=exc.error).inc()
                wait_s = self._backoff.delay_s(attempt, draw=self._draw())
                attempt += 1
                log.warning(
                    "CRM sink state file failed; the batch is tried again",
                    extra={
                        "operation": exc.operation,
                        "error": exc.error,
                        "wait_s": round(wait_s, 3),
                        "offsets": batch.first_offsets(),
                    },
                )
                if not await self._wait(wait_s):
                    return False

    async def handle(self, batch: Batch) -> bool:
        """Deliver one batch; False when stopped (or its partitions revoked) before the end.

        Raises :class:`CrmStateError` when the state file fails; the batch may be handled
        again.
        """
        self._save_marks([])
        records = batch.records
        logins: list[Login] = []
        dead: list[DeadLetter] = []
        for index, record in enumerate(records):
            try:
                value = orjson.loads(record.value) if record.value is not None else None
                if not isinstance(value, dict):
                    raise UnreadableRecord("the record is not a JSON object")
                logins.append(login_from_record(value, ref=index))
            except (orjson.JSONDecodeError, UnreadableRecord) as exc:
                detail = str(exc) if isinstance(exc, UnreadableRecord) else "not JSON"
                dead.append(DeadLetter(record, "unreadable", detail))

        known = self._store.marks(login.user_key for login in logins)
        plan = plan_upserts(logins, known, min_interval_ms=self._settings.min_interval_ms)

        delivery = await self._deliver(plan.upserts, known)
        if not delivery.complete:
            return False
        for upsert, status, detail in delivery.rejected:
            dead.append(DeadLetter(records[upsert.login.ref], "crm_rejected", detail, status))
        if dead and not await self._dead_letter(batch, dead):
            return False
        self._save_marks(
            [m for upsert, _, _ in delivery.rejected for m in upsert.marks_if_rejected(known)]
        )
        for reason, count in plan.skipped.items():
            self._metrics.skipped_records.labels(reason=reason.value).inc(count)
        log.info(
            "batch synced",
            extra={
                "records": len(records),
                "upserted": len(delivery.accepted),
                "rejected": len(delivery.rejected),
                "unreadable": sum(1 for d in dead if d.reason == "unreadable"),
                "skipped": sum(plan.skipped.values()),
                "offsets": {f"{r.topic}/{r.partition}": r.offset for r in records[-1:]},
            },
        )
        return True

    def _save_marks(self, marks: Sequence[SyncMark]) -> None:
        """Save sync marks, with any a failed save left behind; raises :class:`CrmStateError`.

        Marks that could not be saved stay in memory until a later save takes them, so the
        batch tried again plans with them (it would otherwise send accepted contacts again).
        """
        self._unsaved_marks += marks
        if self._unsaved_marks:
            self._store.save_marks(self._unsaved_marks)
            self._unsaved_marks = []

    async def _deliver(self, upserts: list[Upsert], known: Mapping[str, SyncMark]) -> Delivery:
        """Every upsert accepted or rejected for good (``complete``), unless stopped first.

        A request the CRM refuses as a whole is split in halves until the contacts at fault
        are alone (one bad address must not send a hundred good ones to the dead letters).
        """
        crm = self._crm.name
        by_email = {upsert.contact.email: upsert for upsert in upserts}
        delivery = Delivery(accepted=[], rejected=[])
        queue: deque[list[Upsert]] = deque(chunks(upserts, self._crm.max_batch_size))
        record_attempts: Counter[str] = Counter()
        outage_attempt = 0
        while queue:
            part = queue.popleft()
            try:
                result = await self._crm.upsert([upsert.contact for upsert in part])
            except CrmUnavailable as exc:
                self._metrics.retries.labels(crm=crm, reason=exc.reason.value).inc()
                self._metrics.crm_available.set(0)
                wait_s = self._backoff.delay_s(
                    outage_attempt, draw=self._draw(), retry_after_s=exc.retry_after_s
                )
                outage_attempt += 1
                log.warning(
                    "CRM unavailable, backing off",
                    extra={"crm": crm, "reason": exc.reason.value, "wait_s": round(wait_s, 3)},
                )
                queue.appendleft(part)
                if not await self._wait(wait_s):
                    delivery.complete = False
                    return delivery
                continue
            except CrmBatchRejected as exc:
                self._metrics.batches.labels(crm=crm, outcome="rejected").inc()
                if len(part) > 1:
                    half = len(part) // 2
                    queue.appendleft(part[half:])
                    queue.appendleft(part[:half])
                else:
                    delivery.rejected.append((part[0], exc.status, exc.detail))
                continue
            outage_attempt = 0
            self._metrics.crm_available.set(1)
            clean = not result.rejected and not result.retry
            self._metrics.batches.labels(crm=crm, outcome="accepted" if clean else "partial").inc()
            accepted = [by_email[contact.email] for contact in result.accepted]
            self._metrics.contacts_upserted.labels(crm=crm).inc(len(accepted))
            # Marked as soon as the CRM answered, so a crash or a stop re-sends at most the
            # request in flight.
            self._save_marks([m for u in accepted for m in u.marks_if_accepted(known)])
            delivery.accepted += accepted
            delivery.rejected += [
                (by_email[r.contact.email], r.status, r.detail) for r in result.rejected
            ]
            again: list[Upsert] = []
            for contact in result.retry:
                record_attempts[contact.email] += 1
                if record_attempts[contact.email] >= self._settings.record_max_attempts:
                    detail = "the CRM kept answering retryable; attempts exhausted"
                    delivery.rejected.append((by_email[contact.email], 207, detail))
                else:
                    again.append(by_email[contact.email])
            if again:
                self._metrics.retries.labels(
                    crm=crm, reason=RetryReason.RECORD_RETRYABLE.value
                ).inc(len(again))
                attempt = max(record_attempts[u.contact.email] for u in again) - 1
                queue.appendleft(again)
                if not await self._wait(self._backoff.delay_s(attempt, draw=self._draw())):
                    delivery.complete = False
                    return delivery
        return delivery

    async def _dead_letter(self, batch: Batch, dead: list[DeadLetter]) -> bool:
        """Publish to the dead-letter topic (acks=all); False when stopped before the end."""
        for letter in dead:
            if letter.source in batch.dead_lettered:
                continue
            if not await self._publish(letter):
                return False
            batch.dead_lettered.add(letter.source)
        return True

    async def _publish(self, letter: DeadLetter) -> bool:
        """One dead letter, cut to fit; retried while Kafka is unavailable.

        A letter the topic refuses as too large (its ``max.message.bytes`` is below
        ``CRM_DLQ_MAX_BYTES``) is cut to half its size and sent again; one refused even with
        an empty value is dropped with an error and counted, since no retry could change the
        answer and the sink must not stall on it. The source offsets in the log find it.
        """
        max_bytes = self._settings.dlq_max_bytes
        attempt = 0
        while True:
            record = fit_dead_letter(
                key=letter.record.key,
                value=letter.record.value,
                headers=self._headers(letter),
                max_bytes=max_bytes,
            )
            try:
                await self._dead_letters.send(self._settings.topic_dlq, record)
            except (MessageSizeTooLargeError, RecordListTooLargeError):
                await self._dead_letters.reset()
                if not record.value:
                    log.error(
                        "dead letter refused as too large even without its value; dropped",
                        extra={
                            "source": letter.source,
                            "reason": letter.reason,
                            "size_bytes": record.size_bytes,
                        },
                    )
                    self._metrics.dead_letters_dropped.labels(reason=letter.reason).inc()
                    return True
                max_bytes = record.size_bytes // 2
                log.warning(
                    "dead-letter topic refused a letter as too large; cutting it further",
                    extra={"source": letter.source, "max_bytes": max_bytes},
                )
                continue
            except KafkaError as exc:
                if isinstance(exc, OutOfOrderSequenceNumber):
                    await self._dead_letters.reset()
                wait_s = self._backoff.delay_s(attempt, draw=self._draw())
                attempt += 1
                log.warning(
                    "dead-letter topic unavailable, backing off",
                    extra={"error": type(exc).__name__, "wait_s": round(wait_s, 3)},
                )
                if not await self._wait(wait_s):
                    return False
                continue
            if record.value_truncated:
                log.warning(
                    "dead letter's value cut to fit the largest message",
                    extra={
                        "source": letter.source,
                        "value_bytes": len(letter.record.value or b""),
                        "max_bytes": max_bytes,
                    },
                )
            self._metrics.rejected_records.labels(reason=letter.reason).inc()
            return True

    def _headers(self, letter: DeadLetter) -> list[tuple[str, bytes]]:
        record = letter.record
        headers = [
            ("dlq-reason", letter.reason.encode()),
            ("dlq-detail", truncate_detail(letter.detail).encode()),
            ("dlq-source", letter.source.encode()),
            ("crm", self._crm.name.encode()),
        ]
        if letter.status is not None:
            headers.append(("crm-status", str(letter.status).encode()))
        headers += [(k, v) for k, v in record.headers if k == "event-id"][:1]
        return headers

    async def _wait(self, wait_s: float) -> bool:
        """Sleep ``wait_s`` while polling with every partition paused (to stay in the group).

        False when the sink is stopping, or when a rebalance took every partition of the
        batch away (its new owner re-reads it from the last commit).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not self._stop.is_set():
            assigned = self._consumer.assignment()
            if self._batch_partitions and not (self._batch_partitions & assigned):
                log.warning("partitions revoked while the CRM was unavailable; batch left")
                return False
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return True
            self._consumer.pause(*assigned)
            self._paused = True
            timeout_ms = max(1, int(min(remaining_s, _POLL_TIMEOUT_MS / 1000) * 1000))
            got = await self._consumer.getmany(timeout_ms=timeout_ms)
            for tp, batch in got.items():  # a partition assigned since the last pause
                self._consumer.seek(tp, batch[0].offset)
        return False

    def _resume(self, next_offsets: dict[TopicPartition, int]) -> None:
        assigned = self._consumer.assignment()
        for tp, offset in next_offsets.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)
        self._consumer.resume(*assigned)
        self._paused = False

    async def _commit(self, next_offsets: dict[TopicPartition, int]) -> None:
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in next_offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError:
            # A rebalance took the partitions: their new owner re-reads from the last commit,
            # and the sync marks already saved keep that from sending twice here.
            log.warning("offsets not committed: the group rebalanced")

    async def _update_lag(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._lag_updated_at < _LAG_EVERY_S:
            return
        self._lag_updated_at = loop.time()
        for tp in self._consumer.assignment():
            end = self._consumer.last_stable_offset(tp)
            if end is None:
                end = self._consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            self._metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - position)
            )


async def _metrics_server(metrics: CrmMetrics, port: int) -> web.AppRunner:
    async def render(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain"})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", render)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _until_started(
    what: str, start: Callable[[], Awaitable[object]], stop: asyncio.Event, backoff: Backoff
) -> bool:
    """Run ``start`` (a coroutine factory) until it succeeds; False when stopped first."""
    attempt = 0
    while not stop.is_set():
        try:
            await start()
            return True
        except (KafkaError, OSError) as exc:
            wait_s = backoff.delay_s(attempt, draw=random.random())
            attempt += 1
            log.warning(
                "Kafka not reachable yet",
                extra={"step": what, "error": type(exc).__name__, "wait_s": round(wait_s, 3)},
            )
            try:
                async with asyncio.timeout(wait_s):
                    await stop.wait()
            except TimeoutError:
                pass
    return False


async def serve(
    settings: CrmSettings, *, stop: asyncio.Event | None = None, handle_signals: bool = True
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT arrives); returns the exit code."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)

    metrics = CrmMetrics()
    try:
        store = CrmStore(settings.state_db)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"CRM_STATE_DB: cannot use {str(settings.state_db)!r}: {exc}") from None
    crm = make_crm(settings, store, metrics)
    runner = await _metrics_server(metrics, settings.metrics_port)
    backoff = Backoff(initial_s=0.5, max_s=10.0)
    kafka = client_options(settings.kafka)
    dead_letters = DeadLetterProducer(
        lambda: AIOKafkaProducer(
            **kafka,
            acks="all",
            enable_idempotence=True,
            max_request_size=settings.dlq_max_bytes,
        )
    )
    consumer = AIOKafkaConsumer(
        *settings.topics,
        **kafka,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
    )
    topics = [TopicSpec(t) for t in (*settings.topics, settings.topic_dlq)]
    log.info(
        "starting",
        extra={"crm": crm.name, "topics": ",".join(settings.topics), "group": settings.group_id},
    )
    try:
        started = (
            await _until_started(
                "topics", lambda: ensure_topics(settings.kafka, topics), stop, backoff
            )
            and await _until_started("producer", dead_letters.start, stop, backoff)
            and await _until_started("consumer", consumer.start, stop, backoff)
        )
        if started:
            sink = CrmSink(
                settings=settings,
                consumer=consumer,
                dead_letters=dead_letters,
                crm=crm,
                store=store,
                metrics=metrics,
                stop=stop,
            )
            await sink.run()
    finally:
        log.info("shutting down")
        await consumer.stop()
        await dead_letters.stop()
        await crm.close()
        store.close()
        await runner.cleanup()
        for signum in signals:
            loop.remove_signal_handler(signum)
        log.info("stopped")
    return 0


def run(settings: CrmSettings) -> int:
    return asyncio.run(serve(settings))
