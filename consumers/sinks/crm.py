"""``wifi-bridge sink crm``: canonical logins from Kafka into a CRM, once a day per visitor.

The service shell: it reads batches from the visits and late topics (``read_committed``,
auto-commit off), lets the pure core (:mod:`consumers.sinks.contacts`) decide which contacts
to upsert, hands them to a CRM adapter (HubSpot, a signed webhook, or the local outbox),
keeps what the CRM refused in the dead-letter topic, saves the per-user sync marks in its
SQLite file, and only then commits the batch's offsets.

A CRM outage never loses the position and never crash-loops: the batch is retried with
exponential backoff (``Retry-After`` honoured) while the consumer keeps polling with its
partitions paused, so it stays in the group; nothing is committed until the CRM took the
batch. A request the CRM keeps answering 5xx is split in halves, so that one contact the CRM
chokes on cannot hold back the others (:mod:`consumers.sinks.crm_requests` decides when such
a contact, left alone, is dead-lettered: never in an outage). A failure of the sink's SQLite
file is retried like an outage, on the batch kept in memory. A crash between the CRM's
answer and the commit re-reads the batch; the sync marks (written before the commit) make
that re-read send nothing, and an upsert by e-mail address is idempotent in the CRM anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
)
from aiokafka.structs import ConsumerRecord

from bridge.errors import ConfigError
from bridge.kafka import TopicSpec, client_options, ensure_topics, started
from consumers.sinks.contacts import (
    Login,
    Skip,
    SyncMark,
    UnreadableRecord,
    Upsert,
    login_from_record,
    plan_upserts,
)
from consumers.sinks.crm_dlq import DeadLetterRecord, fit_dead_letter
from consumers.sinks.crm_http import HttpClient
from consumers.sinks.crm_metrics import CrmMetrics
from consumers.sinks.crm_port import (
    Crm,
    CrmBatchRejected,
    CrmRateLimited,
    CrmUnavailable,
    truncate_detail,
)
from consumers.sinks.crm_requests import Outcome, RequestQueue
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
_KEEP_ALIVE_S = 5.0
"""The longest the sink sends requests without polling Kafka: a consumer that does not
poll within max.poll.interval (300 s) leaves its group."""


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


def _json_object(record: Record) -> dict[str, object]:
    value = orjson.loads(record.value) if record.value is not None else None
    if not isinstance(value, dict):
        raise UnreadableRecord("the record is not a JSON object")
    return value


def _concerns(record: Record, users: set[str], addresses: set[str]) -> bool:
    """Whether ``record`` is a login of one of ``users`` or for one of ``addresses``."""
    try:
        login = login_from_record(_json_object(record))
    except (orjson.JSONDecodeError, UnreadableRecord):
        return False
    return login.user_key in users or login.email in addresses


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
        self._producer = await started(self._make())

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
    """Records read together, dealt with as one: their offsets commit once all are settled.

    While the CRM fails on every request of the batch, the batch may grow by the records
    read after it (see :meth:`CrmSink._wait`); ``next_offsets`` follows, and a partition
    whose next record must wait for the batch to end is ``blocked``.
    """

    records: dict[int, Record]
    """The records it holds, by ``ref`` (the order they were read in). A login read while
    the batch grew whose user no upsert carries (skipped: no address, stale, throttled) is
    not held: a long outage must not fill memory with them, and a batch handled again plans
    the same without it. One folded into another login's upsert is held: planned again
    without it, its user would not be marked."""
    next_offsets: dict[TopicPartition, int]
    read: int = 0
    """Records read into the batch, held or not; the ``ref`` of the next one."""
    dead_lettered: set[str] = field(default_factory=set)
    """Sources (``topic/partition/offset``) of records already in the dead-letter topic, so
    a batch handled again after a failure of the state file does not publish them twice."""
    blocked: set[TopicPartition] = field(default_factory=set)
    read_on: Counter[TopicPartition] = field(default_factory=Counter)
    """Records read into it per partition, held or not: none is committed until it ends."""
    dropped_skips: Counter[Skip] = field(default_factory=Counter)
    """Why the logins no longer held were skipped, counted once the batch is settled."""

    def first_offsets(self) -> dict[str, int]:
        """``topic/partition`` -> the batch's first offset there (for logs)."""
        first: dict[str, int] = {}
        for record in self.records.values():
            first.setdefault(f"{record.topic}/{record.partition}", record.offset)
        return first


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upsert that goes to the dead-letter topic, with the CRM's answer."""

    upsert: Upsert
    status: int
    detail: str
    reason: str = "crm_rejected"


@dataclass(slots=True)
class Delivery:
    accepted: list[Upsert]
    refused: list[Refusal]
    complete: bool = True


#: Why a contact the CRM kept answering 5xx for, alone, while it took other requests, is
#: dead-lettered (``dlq-reason``): it may succeed once the CRM is fixed, unlike a rejection.
SERVER_ERROR_REASON = "crm_server_error"


@dataclass(frozen=True, slots=True)
class Growth:
    """How a batch whose every waiting request fails may take the records read after it."""

    room: Callable[[], int]
    """How many more records it may read now."""
    take: Callable[[dict[TopicPartition, list[Record]]], bool]
    """Adds records read; True when they give requests to send."""


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
        self._batch: Batch | None = None
        self._unsaved_marks: list[SyncMark] = []
        self._paused = False
        self._polled_at: float | None = None
        """When the consumer last polled (the event loop's clock)."""

    async def run(self) -> None:
        # Beside the loop, not in it: the lag must go on moving while a batch backs off.
        lag = asyncio.create_task(self._report_lag())
        try:
            while not self._stop.is_set():
                await self.step()
        finally:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)

    async def step(self) -> None:
        """Read one batch and, when it was dealt with completely, commit its offsets."""
        batches = await self._consumer.getmany(
            timeout_ms=_POLL_TIMEOUT_MS, max_records=self._settings.max_poll_records
        )
        self._polled_at = asyncio.get_running_loop().time()
        records = [record for batch in batches.values() for record in batch]
        if records:
            batch = Batch(
                records=dict(enumerate(records)),
                next_offsets={tp: batch[-1].offset + 1 for tp, batch in batches.items()},
                read=len(records),
                read_on=Counter({tp: len(batch) for tp, batch in batches.items()}),
            )
            for record in records:
                self._metrics.records.labels(topic=record.topic).inc()
            self._batch = batch
            done = await self._settle(batch)
            if self._paused:
                self._resume(batch.next_offsets if done else {})
            if done:
                await self._commit(batch.next_offsets)
            self._batch = None

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
        dead: list[DeadLetter] = []
        logins = self._read(batch.records.items(), dead)
        known = self._store.marks(login.user_key for login in logins)
        plan = plan_upserts(logins, known, min_interval_ms=self._settings.min_interval_ms)
        skipped = Counter(plan.skipped)
        queue = RequestQueue(
            plan.upserts,
            max_batch_size=self._crm.max_batch_size,
            split_after=self._settings.split_after_server_errors,
            max_attempts=self._settings.record_max_attempts,
        )

        def room() -> int:
            """Records the batch may still read: it holds at most ``CRM_MAX_POLL_RECORDS``
            unsettled ones (contacts waiting, letters to publish). Settled records do not
            count: a batch full of logins already dealt with must still read on, or a lone
            contact the CRM fails on could never be shown to be at fault."""
            return self._settings.max_poll_records - sum(1 for _ in queue.items()) - len(dead)

        def grow(got: dict[TopicPartition, list[Record]]) -> bool:
            """Records read after the batch join it; True when they give requests to send."""
            taken = self._take(batch, got, list(queue.items()))
            more_logins = self._read(taken, dead)
            more_known = self._store.marks(login.user_key for login in more_logins)
            known.update(more_known)
            more = plan_upserts(
                more_logins, more_known, min_interval_ms=self._settings.min_interval_ms
            )
            # A login whose user no upsert carries needs nothing more, now or when the batch
            # is handled again (its marks only move on); an unreadable record stays held
            # until it is in the dead-letter topic (a batch handled again must publish it).
            carried = {key for upsert in more.upserts for key, _ in upsert.users}
            dropped = [login for login in more_logins if login.user_key not in carried]
            for login in dropped:
                del batch.records[login.ref]
            # Planned alone, those logins are skipped exactly as in the whole plan: the
            # verdict on a user without an upsert depends only on its logins and its mark.
            dropped_skips = plan_upserts(
                dropped, more_known, min_interval_ms=self._settings.min_interval_ms
            ).skipped
            batch.dropped_skips.update(dropped_skips)
            skipped.update(more.skipped - dropped_skips)
            queue.add(more.upserts)
            return bool(more.upserts)

        delivery = await self._deliver(queue, known, Growth(room, grow))
        if not delivery.complete:
            return False
        records = batch.records
        for refusal in delivery.refused:
            record = records[refusal.upsert.login.ref]
            dead.append(DeadLetter(record, refusal.reason, refusal.detail, refusal.status))
        if dead and not await self._dead_letter(batch, dead):
            return False
        self._save_marks(
            [m for refusal in delivery.refused for m in refusal.upsert.marks_if_rejected(known)]
        )
        skipped += batch.dropped_skips
        for reason, count in skipped.items():
            self._metrics.skipped_records.labels(reason=reason.value).inc(count)
        log.info(
            "batch synced",
            extra={
                "records": batch.read,
                "upserted": len(delivery.accepted),
                "rejected": len(delivery.refused),
                "unreadable": sum(1 for d in dead if d.reason == "unreadable"),
                "skipped": sum(skipped.values()),
                "offsets": {
                    f"{tp.topic}/{tp.partition}": n - 1 for tp, n in batch.next_offsets.items()
                },
            },
        )
        return True

    @staticmethod
    def _read(records: Iterable[tuple[int, Record]], dead: list[DeadLetter]) -> list[Login]:
        """The logins of ``(ref, record)`` pairs; the records that hold none join ``dead``."""
        logins: list[Login] = []
        for ref, record in records:
            try:
                logins.append(login_from_record(_json_object(record), ref=ref))
            except (orjson.JSONDecodeError, UnreadableRecord) as exc:
                detail = str(exc) if isinstance(exc, UnreadableRecord) else "not JSON"
                dead.append(DeadLetter(record, "unreadable", detail))
        return logins

    def _take(
        self, batch: Batch, got: dict[TopicPartition, list[Record]], waiting: Sequence[Upsert]
    ) -> list[tuple[int, Record]]:
        """The records of ``got`` that join ``batch`` (with their ``ref``), which holds them.

        On each partition they stop before the first login of a user, or an address, whose
        contact still waits in the batch: that login must not overtake it (nor be planned
        against marks that do not have it yet). The partition goes back to that record and
        stays blocked until the batch ends.
        """
        users = {key for upsert in waiting for key, _ in upsert.users}
        addresses = {upsert.contact.email for upsert in waiting}
        taken: list[tuple[int, Record]] = []
        for tp, records in got.items():
            for record in records:
                if _concerns(record, users, addresses):
                    self._consumer.seek(tp, record.offset)
                    batch.blocked.add(tp)
                    break
                taken.append((batch.read, record))
                batch.records[batch.read] = record
                batch.read += 1
                batch.read_on[tp] += 1
                batch.next_offsets[tp] = record.offset + 1
                self._metrics.records.labels(topic=record.topic).inc()
        return taken

    def _save_marks(self, marks: Sequence[SyncMark]) -> None:
        """Save sync marks, with any a failed save left behind; raises :class:`CrmStateError`.

        Marks that could not be saved stay in memory until a later save takes them, so the
        batch tried again plans with them (it would otherwise send accepted contacts again).
        """
        self._unsaved_marks += marks
        if self._unsaved_marks:
            self._store.save_marks(self._unsaved_marks)
            self._unsaved_marks = []

    async def _deliver(
        self, queue: RequestQueue[Upsert], known: Mapping[str, SyncMark], grow: Growth
    ) -> Delivery:
        """Every upsert accepted or refused for good (``complete``), unless stopped first.

        A request the CRM refuses as a whole (4xx) is split in halves until the contacts at
        fault are alone (one bad address must not send a hundred good ones to the dead
        letters). One it answers 5xx is retried with backoff; :class:`RequestQueue` splits it
        when that repeats, and gives a lone contact up only while the CRM takes the others.
        When every request waiting fails, ``grow`` lets the records read after the batch
        join it: they can show the CRM up, and must not wait behind a contact it fails on.
        """
        crm = self._crm.name
        delivery = Delivery(accepted=[], refused=[])
        outage_attempt = 0
        while queue:
            if self._stop.is_set():
                # Between requests: what the CRM answered is marked, the rest is read again
                # from the last commit by the next start.
                delivery.complete = False
                return delivery
            if not await self._keep_polling():
                delivery.complete = False
                return delivery
            request = queue.pop()
            part = request.items
            try:
                result = await self._crm.upsert([upsert.contact for upsert in part])
                if result.retry and not result.accepted and not result.rejected:
                    # It took none of them: for the request, no better than a 5xx.
                    raise CrmUnavailable(
                        f"{crm} answered every contact retryable",
                        reason=RetryReason.RECORD_RETRYABLE,
                        status=207,
                        detail=f"{crm} kept answering this contact retryable",
                    )
            except CrmRateLimited as exc:
                # Waited for here, where the consumer polls and a stop is heard: a 429's
                # Retry-After may hold the limiter longer than Kafka's max.poll.interval.
                queue.deferred(request)
                if not await self._wait(exc.retry_after_s):
                    delivery.complete = False
                    return delivery
                continue
            except CrmUnavailable as exc:
                if exc.reason in (RetryReason.SERVER_ERROR, RetryReason.RECORD_RETRYABLE):
                    outcome = queue.server_error(request)
                else:
                    queue.unavailable(request)
                    outcome = Outcome.RETRY
                if outcome is Outcome.GIVE_UP:
                    log.warning(
                        "the CRM keeps failing on one contact while it takes others; dead-lettered",
                        extra={
                            "crm": crm,
                            "status": exc.status,
                            "attempts": request.failures,
                            "event_id": part[0].contact.event_id,
                        },
                    )
                    detail = exc.detail or str(exc)
                    status = exc.status or 0
                    delivery.refused.append(Refusal(part[0], status, detail, SERVER_ERROR_REASON))
                    continue
                self._metrics.retries.labels(crm=crm, reason=exc.reason.value).inc()
                self._metrics.crm_available.set(0)
                wait_s = self._backoff.delay_s(
                    outage_attempt, draw=self._draw(), retry_after_s=exc.retry_after_s
                )
                outage_attempt += 1
                log.warning(
                    "CRM unavailable, backing off",
                    extra={
                        "crm": crm,
                        "reason": exc.reason.value,
                        "wait_s": round(wait_s, 3),
                        "contacts": len(part),
                        "split": outcome is Outcome.SPLIT,
                    },
                )
                more = grow if queue.needs_other_work else None
                if not await self._wait(wait_s, grow=more):
                    delivery.complete = False
                    return delivery
                continue
            except CrmBatchRejected as exc:
                self._metrics.batches.labels(crm=crm, outcome="rejected").inc()
                if not queue.refused(request):
                    delivery.refused.append(Refusal(part[0], exc.status, exc.detail))
                continue
            queue.accepted(request)
            outage_attempt = 0
            self._metrics.crm_available.set(1)
            clean = not result.rejected and not result.retry
            self._metrics.batches.labels(crm=crm, outcome="accepted" if clean else "partial").inc()
            by_email = {upsert.contact.email: upsert for upsert in part}
            accepted = [by_email[contact.email] for contact in result.accepted]
            self._metrics.contacts_upserted.labels(crm=crm).inc(len(accepted))
            # Marked as soon as the CRM answered, so a crash or a stop re-sends at most the
            # request in flight.
            self._save_marks([m for u in accepted for m in u.marks_if_accepted(known)])
            delivery.accepted += accepted
            delivery.refused += [
                Refusal(by_email[r.contact.email], r.status, r.detail) for r in result.rejected
            ]
            if result.retry:
                # Retried like a server error of their own: without limit while the CRM
                # fails (rate limits, its own errors), not dead-lettered after a few tries.
                again = [by_email[contact.email] for contact in result.retry]
                outcome = queue.failed_in_part(request, again)
                if outcome is Outcome.GIVE_UP:
                    log.warning(
                        "the CRM keeps failing on one contact while it takes others; dead-lettered",
                        extra={"crm": crm, "status": 207, "event_id": again[0].contact.event_id},
                    )
                    detail = f"{crm} kept answering this contact retryable"
                    delivery.refused.append(Refusal(again[0], 207, detail, SERVER_ERROR_REASON))
                    continue
                self._metrics.retries.labels(
                    crm=crm, reason=RetryReason.RECORD_RETRYABLE.value
                ).inc(len(again))
                wait_s = self._backoff.delay_s(outage_attempt, draw=self._draw())
                outage_attempt += 1
                more = grow if queue.needs_other_work else None
                if not await self._wait(wait_s, grow=more):
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
        # Kafka allows a header without a value; such an event id is no id to keep.
        headers += [(k, v) for k, v in record.headers if k == "event-id" and v is not None][:1]
        return headers

    async def _keep_polling(self) -> bool:
        """Between requests: once ``_KEEP_ALIVE_S`` passed since the last poll, a poll with
        every partition paused. A batch the CRM takes request after request (one contact
        each, a slow CRM) may last longer than max.poll.interval; without a poll the
        consumer would leave its group and the batch's commit would fail. False as
        :meth:`_wait`."""
        polled_at = self._polled_at
        if polled_at is not None and asyncio.get_running_loop().time() - polled_at < _KEEP_ALIVE_S:
            return True
        return await self._wait(0.0)

    async def _wait(self, wait_s: float, *, grow: Growth | None = None) -> bool:
        """Sleep ``wait_s`` while polling with every partition paused (to stay in the group);
        it polls once at least.

        With ``grow``, the partitions the batch may grow on (all assigned but the blocked
        ones) are read on while it has room, and what they give is handed to ``grow``; the
        wait ends early once that gives requests to send.

        False when the sink is stopping, or when a rebalance took every partition of the
        batch away (its new owner re-reads it from the last commit).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        polled = False
        while not self._stop.is_set():
            assigned = self._consumer.assignment()
            batch = self._batch
            if batch is not None and not (set(batch.next_offsets) & assigned):
                log.warning("partitions revoked while the batch was delivered; batch left")
                return False
            remaining_s = deadline - loop.time()
            if remaining_s <= 0 and polled:
                return True
            room = 0
            readable: set[TopicPartition] = set()
            if grow is not None and batch is not None:
                room = grow.room()
                readable = assigned - batch.blocked if room > 0 else set()
            self._consumer.pause(*(assigned - readable))
            self._consumer.resume(*readable)
            self._paused = True
            timeout_ms = max(1, int(min(remaining_s, _POLL_TIMEOUT_MS / 1000) * 1000))
            got = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=room if readable else None
            )
            self._polled_at = loop.time()
            polled = True
            self._consumer.pause(*self._consumer.assignment())
            fresh: dict[TopicPartition, list[Record]] = {}
            for tp, records in got.items():
                if tp in readable:
                    fresh[tp] = records
                else:  # a partition assigned since the last pause
                    self._consumer.seek(tp, records[0].offset)
            if fresh and grow is not None and grow.take(fresh):
                return True
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
            return

    async def _report_lag(self) -> None:
        while True:
            try:
                await self._update_lag()
            except (KafkaError, OSError) as exc:
                log.debug("consumer lag not updated", extra={"error": type(exc).__name__})
            await asyncio.sleep(_LAG_EVERY_S)

    async def _update_lag(self) -> None:
        """``wifi_crm_consumer_lag_records``: per partition assigned, the records a restart
        would read again: those of the batch still being delivered, and those not read yet,
        from the consumer's position to the ``read_committed`` end offset.

        Not from the committed offset: that is the last record's offset + 1, and on the
        pipeline's transactional topics the end offset lies past the transaction's marker
        (and past the records of an aborted transaction), so a partition read to its end
        would never show 0. The position moves past markers and aborted records as they are
        read; what is not read yet is counted by offsets, markers included.
        """
        assigned = self._consumer.assignment()
        if not assigned:
            return
        ends = await self._consumer.end_offsets(list(assigned))
        for tp, end in ends.items():
            try:
                # A partition just assigned has no position until its offset is found.
                async with asyncio.timeout(_LAG_EVERY_S):
                    position = await self._consumer.position(tp)
            except (TimeoutError, IllegalStateError):
                continue
            batch = self._batch
            in_batch = batch.read_on[tp] if batch is not None else 0
            self._metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                in_batch + max(0, end - position)
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
