"""``wifi-bridge pipeline``: the Kafka shell around :class:`PartitionPipeline`.

Exactly once, raw to visits/late/dlq. Every write of a pass (output records, the changelog
entries of the state they changed, and the input offsets) goes into one Kafka transaction. The
client is librdkafka (confluent-kafka), because it implements KIP-447: the offsets are sent with
the consumer's group metadata, so a zombie that lost its partitions in a rebalance cannot
commit offsets for them (aiokafka takes only a group id there, aio-libs/aiokafka#844).

Lifecycle of a partition:

* **assigned**: first the committed offset is fetched (for a read_committed consumer this waits
  for a transaction still pending on it), then the state is rebuilt from the same-numbered
  changelog partition, read committed to its end. Offsets and state were committed together,
  so they match.
* **running**: records are processed in consume batches; a transaction is committed at least
  every ``PIPELINE_COMMIT_INTERVAL_MS``. A timer every ``PIPELINE_TICK_MS`` moves the reorder
  watermark of caught-up partitions by wall clock.
* **revoked**: the open transaction is committed first (the offsets are still ours), then the
  partition's state is dropped. **lost** (the group moved on without us): the transaction is
  aborted.

Any failed transaction is aborted and every owned partition is rebuilt from Kafka (committed
offset + changelog), since the in-memory state had already moved past what was committed. A
transaction fails at its commit, or earlier: once a record it produced was refused (too large
for its topic, or not delivered within the transaction timeout), librdkafka refuses every
further produce of it. The rest of a consume batch read before a rebuild is dropped, and read
again from the committed offsets.

One librdkafka call is not trusted with its own timeout: ``send_offsets_to_transaction`` can
block for good when the group coordinator fails over (librdkafka issues 5456 and 5511: the
coordinator request's timeout is never checked). It runs on a thread of its own; past its
timeout plus a grace the producer is given up as failed for good and replaced, and the
partitions are rebuilt, as for any producer that failed for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import start_http_server

from bridge.kafka import TopicSpec, ensure_topics
from bridge.rdkafka import client_config
from consumers.pipeline.metrics import PipelineMetrics
from consumers.pipeline.partition import Output, PartitionPipeline, RawRecord, Route
from consumers.pipeline.settings import PipelineSettings

log = logging.getLogger(__name__)

_BATCH = 500
# What Producer.produce() takes as headers. The outputs' lists of (str, bytes) pairs are valid
# arguments as they are (the producer only reads them): cast to this alias, built once, since
# spelling the type out in the call would build it again for every record.
_ProducerHeaders = list[tuple[str, str | bytes | None]]
_KAFKA_TIMEOUT_S = 30.0
# How long past its own timeout a librdkafka call may block before it counts as hung.
_HUNG_GRACE_S = 5.0


class PipelineError(Exception):
    """The pipeline cannot go on (another instance took its transactional id, say)."""


class _TransactionFailed(Exception):
    """The open transaction cannot commit: abort it and rebuild the owned partitions.

    ``fatal``: the producer itself failed for good (librdkafka's fatal errors, such as
    ``_FENCED``, or a call that never returned); it can neither abort nor start another
    transaction and is replaced.
    """

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


class CallHung(Exception):
    """A blocking client call did not return within its deadline (it may still be running)."""


def call_with_deadline(call: Callable[[], object], *, deadline_s: float, name: str) -> None:
    """Run ``call`` on a thread of its own and wait for it at most ``deadline_s``.

    Raises what ``call`` raised, or :class:`CallHung` when it is still running at the
    deadline; the thread is then left behind (a daemon: it cannot hold up the exit).
    """
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not done.wait(deadline_s):
        raise CallHung(f"{name} did not return within {deadline_s:g} s")
    if failure:
        raise failure[0]


# A producer that fails for good is replaced, this many times within this window at most;
# more means another live instance keeps taking the transactional id, and the service stops.
_MAX_PRODUCER_REPLACEMENTS = 3
_PRODUCER_REPLACEMENT_WINDOW_S = 300.0
# Rebuilds after an abort that could not seek back, in a row, before the instance stops.
_MAX_FAILED_REBUILDS = 5
# How often the broker looks for transactions past their timeout to abort them
# (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by default), with a margin.
_TRANSACTION_ABORT_CHECK_S = 15.0
# The most a partition assignment waits for its committed offsets: well within the consumer's
# max.poll.interval.ms (300 s), past which the group would count the instance as gone.
_MAX_COMMITTED_WAIT_S = 240.0


@dataclass(slots=True)
class _Owned:
    pipeline: PartitionPipeline
    next_offset: int | None = None
    caught_up: bool = False
    paused: bool = False


class PipelineService:
    """One pipeline instance: a consumer in the group, a transactional producer, the state."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        metrics: PipelineMetrics,
        partition_type: type[PartitionPipeline] = PartitionPipeline,
    ) -> None:
        """``partition_type``: the stages each input partition runs (its ``restore()`` builds
        them); the benchmark swaps in stages that do nothing to measure this shell alone."""
        self.settings = settings
        self.metrics = metrics
        self._partition_type = partition_type
        # librdkafka's own log lines go through Python logging (served by consume() and poll()).
        base = {**client_config(settings.kafka), "logger": logging.getLogger("librdkafka")}
        self._consumer = confluent_kafka.Consumer(
            {
                **base,
                "group.id": settings.group_id,
                # Static membership: a restarted instance takes its partitions back at once,
                # without a rebalance; a zombie with the same name is fenced.
                "group.instance.id": settings.instance_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.partition.eof": True,
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
            }
        )
        self._producer_config = {
            **base,
            "transactional.id": settings.transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "transaction.timeout.ms": settings.transaction_timeout_ms,
        }
        self._producer = confluent_kafka.Producer(self._producer_config)
        # Set when the producer failed for good: it is replaced once the consume call in
        # progress has returned (init_transactions blocks; not in a rebalance callback).
        self._producer_failed: str | None = None
        self._replacements: list[float] = []
        # Set when a call into the producer hung: the thread still inside it keeps it alive.
        self._producer_hung = False
        self._restorer_config = {
            **base,
            "group.id": f"{settings.group_id}-restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,  # an empty changelog partition answers EOF at once
        }
        self._routes = {
            Route.VISITS: settings.topic_visits,
            Route.LATE: settings.topic_late,
            Route.DLQ: settings.topic_dlq,
        }
        self._records_out = {
            route: metrics.records_out.labels(route=route.value) for route in Route
        }
        # Counted here per record, moved into the Prometheus counters when the transaction
        # commits (a counter's inc() takes a lock, and an aborted transaction's records are
        # read again): see _count().
        self._out_pending = dict.fromkeys(Route, 0)
        self._owned: dict[int, _Owned] = {}
        self._in_transaction = False
        self._transaction_started = 0.0
        # Set when a transaction was aborted: the owned partitions go back to their committed
        # state and offsets once the consume call in progress has returned.
        self._rebuild_pending = False
        self._failed_rebuilds = 0
        # Set by an assignment: the raw topic's partitions are counted again after the consume
        # call (see _on_assign).
        self._count_partitions_due = False

    # ----------------------------------------------------------------------------------------
    # Main loop

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set; then commit what is open and leave the group."""
        self._prepare_topics()
        self._producer.init_transactions(_KAFKA_TIMEOUT_S)
        log.info(
            "pipeline started",
            extra={
                "group": self.settings.group_id,
                "transactional_id": self.settings.transactional_id,
                "topic": self.settings.topic_raw,
            },
        )
        self._consumer.subscribe(
            [self.settings.topic_raw],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        commit_s = self.settings.commit_interval_ms / 1000
        next_tick = time.monotonic() + self.settings.tick_ms / 1000
        try:
            while not stop.is_set():
                now = time.monotonic()
                wait_s = next_tick - now
                if self._in_transaction:
                    wait_s = min(wait_s, self._transaction_started + commit_s - now)
                try:
                    for message in self._consumer.consume(_BATCH, max(0.0, wait_s)):
                        if self._rebuild_pending:  # aborted in a callback of this consume call
                            break  # the rest was read past the committed offsets: read again
                        self._handle(message)
                    next_tick = self._after_consume(next_tick)
                except _TransactionFailed as exc:
                    self._fail(exc)
                if self._producer_failed is not None:
                    self._replace_producer()
                if self._rebuild_pending:
                    self._rebuild_owned()
                if self._count_partitions_due:
                    self._count_input_partitions()
            self._commit_open()  # what fails is read again by whoever takes the partitions
        finally:
            log.info("pipeline stopping: leaving the group")
            try:
                self._consumer.close()  # revokes; no transaction is open, so nothing to commit
            except Exception as exc:  # a callback's error re-raised by close(): still shut down
                log.warning("could not leave the group cleanly", extra={"error": str(exc)})
            if self._in_transaction:
                self._abort("shutdown")
            self._producer.flush(_KAFKA_TIMEOUT_S)
            log.info("pipeline stopped")

    def _after_consume(self, next_tick: float) -> float:
        """The timer and the commit, after a consume call; returns when the next tick is due.

        Neither runs while a rebuild is pending: after an abort the state is ahead of what was
        committed, and records released from it would be released again once it is rebuilt.
        """
        if self._rebuild_pending:
            return next_tick
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + self.settings.tick_ms / 1000
            self._tick()
        commit_s = self.settings.commit_interval_ms / 1000
        if self._in_transaction and now - self._transaction_started >= commit_s:
            self._commit()
        return next_tick

    def _handle(self, message: confluent_kafka.Message) -> None:
        error = message.error()
        partition = message.partition()
        assert partition is not None
        owned = self._owned.get(partition)
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                if owned is not None:
                    owned.caught_up = True
                return
            # A fenced static member, say: librdkafka hands it over as a _FATAL event whose
            # fatal() is False. Going on would leave the instance in the group with nothing.
            if error.fatal() or error.code() == KafkaError._FATAL:
                raise PipelineError(
                    f"the consumer failed for good ({error.str()}); a restart rejoins the "
                    "group with the committed state"
                )
            log.warning("consumer error", extra={"error": error.name()})
            return
        offset = message.offset()
        assert offset is not None
        if owned is None or (owned.next_offset is not None and offset < owned.next_offset):
            return  # fetched before a revocation or a rewind: not ours, or already processed
        self._begin()
        timestamp_type, timestamp_ms = message.timestamp()
        raw = RawRecord(
            key=message.key(),
            value=message.value() or b"",
            headers=_headers(message.headers()),
            timestamp_ms=timestamp_ms if timestamp_type else int(time.time() * 1000),
        )
        outputs = owned.pipeline.accept(raw)
        self._produce(outputs)
        owned.caught_up = False
        owned.next_offset = offset + 1
        if owned.pipeline.is_full and not owned.paused:
            owned.paused = True
            self._consumer.pause([TopicPartition(self.settings.topic_raw, partition)])
            self.metrics.paused.inc()
            log.warning("reorder buffer full: partition paused", extra={"partition": partition})

    def _tick(self) -> None:
        now_ms = int(time.time() * 1000)
        for partition, owned in self._owned.items():
            pipeline = owned.pipeline
            outputs = pipeline.tick(now_ms, caught_up=owned.caught_up)
            if outputs:
                self._begin()
                self._produce(outputs)
            if not pipeline.is_full:
                self._resume(partition, owned)
            label = str(partition)
            self.metrics.buffered.labels(partition=label).set(pipeline.buffered)
            watermark_ms = pipeline.watermark_ms
            if watermark_ms is not None:
                self.metrics.watermark_lag.labels(partition=label).set(
                    (now_ms - watermark_ms) / 1000
                )

    def _resume(self, partition: int, owned: _Owned) -> None:
        """Lift the pause ``owned`` put on its partition.

        librdkafka keeps a partition paused through seeks, and through a revocation and a
        later assignment of it: whenever the state that paused it is dropped or rebuilt, the
        pause has to go with it, or nothing resumes the partition again.
        """
        if not owned.paused:
            return
        owned.paused = False
        self.metrics.paused.dec()
        try:
            self._consumer.resume([TopicPartition(self.settings.topic_raw, partition)])
        except KafkaException as exc:
            log.warning(
                "could not resume a partition",
                extra={"partition": partition, "error": exc.args[0].name()},
            )

    def _produce(self, outputs: Sequence[Output]) -> None:
        pending = self._out_pending
        for output in outputs:
            headers = cast(_ProducerHeaders, output.headers)
            self._send(self._routes[output.route], output.key, output.value, headers=headers)
            pending[output.route] += 1

    def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        headers: list[tuple[str, str | bytes | None]] | None = None,
        partition: int | None = None,
    ) -> None:
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value, key, headers=headers)
                else:
                    self._producer.produce(topic, value, key, partition, headers=headers)
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let it drain
            except KafkaException as exc:  # the transaction failed already (see the module)
                raise self._transaction_failed(exc) from exc

    # ----------------------------------------------------------------------------------------
    # Transactions

    def _begin(self) -> None:
        if not self._in_transaction:
            try:
                self._producer.begin_transaction()
            except KafkaException as exc:
                raise self._transaction_failed(exc) from exc
            self._in_transaction = True
            self._transaction_started = time.monotonic()

    def _commit(self) -> None:
        """Write the changed state, send the offsets and commit.

        Raises :class:`_TransactionFailed` when the transaction cannot commit: the caller
        aborts it and has the partitions rebuilt (:meth:`_fail`).
        """
        started = time.monotonic()
        try:
            for partition, owned in self._owned.items():
                for key, value in owned.pipeline.take_changes():
                    self._send(self.settings.topic_changelog, key, value, partition=partition)
            offsets = self._transaction_offsets()
            if offsets:
                self._send_offsets(offsets)
            self._producer.commit_transaction(_KAFKA_TIMEOUT_S)
        except KafkaException as exc:
            raise self._transaction_failed(exc) from exc
        self._in_transaction = False
        self._producer.poll(0)  # serve its log lines
        self._count()
        self.metrics.transactions.labels(result="committed").inc()
        self.metrics.transaction_seconds.observe(time.monotonic() - started)

    def _transaction_offsets(self) -> list[TopicPartition]:
        """The input position of every owned partition, for the transaction being committed.

        Every partition's, not only those that took records: a transaction that only released
        records or moved clocks (a tick) must carry offsets too, so that the group coordinator
        refuses it from an instance that lost its partitions (KIP-447), and so that a new
        owner's read of the committed offsets waits for it before reading the changelog.
        """
        topic = self.settings.topic_raw
        return [
            TopicPartition(topic, partition, owned.next_offset)
            for partition, owned in self._owned.items()
            if owned.next_offset is not None
        ]

    def _commit_open(self) -> None:
        """Commit the open transaction, if one is; one that fails is aborted and the owned
        partitions are rebuilt after this consume call (:meth:`_fail`)."""
        if not self._in_transaction:
            return
        try:
            self._commit()
        except _TransactionFailed as exc:
            self._fail(exc)

    def _send_offsets(self, offsets: list[TopicPartition]) -> None:
        """The input offsets into the open transaction, on a thread that may hang (see the
        module's docstring); a hung call fails the producer for good."""
        producer = self._producer
        group = self._consumer.consumer_group_metadata()
        deadline_s = _KAFKA_TIMEOUT_S + _HUNG_GRACE_S
        try:
            call_with_deadline(
                lambda: producer.send_offsets_to_transaction(offsets, group, _KAFKA_TIMEOUT_S),
                deadline_s=deadline_s,
                name="send_offsets_to_transaction",
            )
        except CallHung as exc:
            log.error(
                "a Kafka call hung past its timeout: giving the producer up",
                extra={"call": "send_offsets_to_transaction", "waited_s": deadline_s},
            )
            self._producer_hung = True
            raise _TransactionFailed(str(exc), fatal=True) from exc

    def _transaction_failed(self, exc: KafkaException) -> _TransactionFailed:
        """What a producer error means for the transaction."""
        error: KafkaError = exc.args[0]
        fatal = error.fatal() or error.code() == KafkaError._FATAL
        return _TransactionFailed(error.name(), fatal=fatal)

    def _fail(self, failure: _TransactionFailed) -> None:
        """Abort the open transaction; the owned partitions are rebuilt after this consume.

        Safe inside a rebalance callback: a producer that failed for good is only marked
        for replacement here.
        """
        if failure.fatal:
            self._discard_transaction()
            log.warning("the transaction failed for good", extra={"reason": failure.reason})
            self._producer_failed = failure.reason
        elif not self._abort(failure.reason):
            self._producer_failed = failure.reason
        self._rebuild_pending = True

    def _abort(self, reason: str) -> bool:
        """Abort the open transaction; False when the producer failed for good instead.

        Either way nothing of the transaction is committed: a producer that failed for good
        cannot commit, and its replacement's init_transactions aborts what it left open.
        """
        log.warning("aborting the transaction", extra={"reason": reason})
        aborted = False
        for attempt in range(2):
            try:
                self._producer.abort_transaction(_KAFKA_TIMEOUT_S)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                log.warning(
                    "could not abort the transaction",
                    extra={"error": error.name(), "attempt": attempt + 1},
                )
                # librdkafka: a retriable error may be retried; anything else leaves the
                # producer unable to begin another transaction, so it is replaced.
                if error.retriable() and not error.fatal() and attempt == 0:
                    continue
                break
            aborted = True
            break
        self._discard_transaction()
        return aborted

    def _discard_transaction(self) -> None:
        """Forget the open transaction: it is not committed, and what it read is read again."""
        self._in_transaction = False
        # What it counted is read again (or by the next owner) and counted when committed.
        self._out_pending = dict.fromkeys(Route, 0)
        for owned in self._owned.values():
            owned.pipeline.counts.reset()
        self.metrics.transactions.labels(result="aborted").inc()

    def _replace_producer(self) -> None:
        """A new transactional producer in place of one that failed for good.

        A transaction coordinator that fails over mid-commit can leave the producer fenced
        (``_FENCED``) though no other instance runs; the new producer's init_transactions
        takes the transactional id back and aborts what the old one left open. The
        partitions are then rebuilt from what is committed.
        """
        reason, self._producer_failed = self._producer_failed, None
        now = time.monotonic()
        self._replacements = [
            t for t in self._replacements if now - t < _PRODUCER_REPLACEMENT_WINDOW_S
        ]
        if len(self._replacements) >= _MAX_PRODUCER_REPLACEMENTS:
            raise PipelineError(
                f"the transactional producer failed for good ({reason}) "
                f"{len(self._replacements) + 1} times in {_PRODUCER_REPLACEMENT_WINDOW_S:.0f} s: "
                f"another instance may use transactional id {self.settings.transactional_id}"
            )
        self._replacements.append(now)
        log.warning(
            "the transactional producer failed for good: replacing it",
            extra={"reason": reason, "transactional_id": self.settings.transactional_id},
        )
        if self._producer_hung:
            # A thread is still inside it: leave it alone (that thread holds it, so it is
            # never destroyed under it). The new producer's init_transactions fences it, so
            # nothing it still holds can commit.
            self._producer_hung = False
        else:
            self._producer.purge()  # what it holds belongs to the transaction that failed
        self._producer = confluent_kafka.Producer(self._producer_config)
        self._producer.init_transactions(_KAFKA_TIMEOUT_S)
        self.metrics.producer_replacements.inc()
        self._rebuild_pending = True

    # ----------------------------------------------------------------------------------------
    # Rebalances (called by librdkafka from inside consume())

    def _on_assign(
        self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        numbers = [tp.partition for tp in partitions]
        log.info("partitions assigned", extra={"partitions": numbers})
        # The partitions it already owns: committed first, since the restore below may wait for
        # long (a pending transaction on the new ones), and this one would time out.
        self._commit_open()
        self._restore(consumer, numbers)
        self.metrics.assigned.set(len(self._owned))
        # Counted after the consume call, not here: a metadata request from inside a
        # rebalance callback aborts the process (confluent-kafka's CallState assertion).
        self._count_partitions_due = True

    def _count_input_partitions(self) -> None:
        """Partitions may have been added to the raw topic (an assignment follows): the
        alert on unowned partitions compares with this count. Best effort, one quick call."""
        self._count_partitions_due = False
        try:
            topic = self._consumer.list_topics(self.settings.topic_raw, 2.0).topics.get(
                self.settings.topic_raw
            )
        except KafkaException:
            return
        if topic is not None and topic.error is None and topic.partitions:
            self.metrics.input_partitions.set(len(topic.partitions))

    def _on_revoke(
        self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        numbers = [tp.partition for tp in partitions]
        log.info("partitions revoked", extra={"partitions": numbers})
        self._commit_open()  # the offsets are still ours
        self._drop(numbers)

    def _on_lost(
        self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        numbers = [tp.partition for tp in partitions]
        log.warning("partitions lost", extra={"partitions": numbers})
        if self._in_transaction:
            self._fail(_TransactionFailed("partitions lost"))
        self._drop(numbers)

    def _drop(self, partitions: Sequence[int]) -> None:
        for partition in partitions:
            owned = self._owned.pop(partition, None)
            if owned is None:
                continue
            self._resume(partition, owned)  # or it stays paused when it comes back
            for gauge in (self.metrics.buffered, self.metrics.watermark_lag):
                with contextlib.suppress(KeyError):  # never set
                    gauge.remove(str(partition))
        self.metrics.assigned.set(len(self._owned))

    def _rebuild_owned(self) -> None:
        """Run the pending rebuild of every owned partition; one that failed is tried again
        after the next consume call, and :data:`_MAX_FAILED_REBUILDS` in a row stop the
        instance (a restart starts from what is committed)."""
        self._rebuild_pending = False
        if self._in_transaction:  # nothing of the state it was opened on may be committed
            self._fail(_TransactionFailed("rebuild"))
            if self._producer_failed is not None:
                self._replace_producer()
            self._rebuild_pending = False
        if self._rebuild(list(self._owned)):
            self._failed_rebuilds = 0
            return
        self._failed_rebuilds += 1
        if self._failed_rebuilds >= _MAX_FAILED_REBUILDS:
            raise PipelineError(
                f"the partitions could not be rebuilt after an abort ({self._failed_rebuilds} "
                "attempts); a restart resumes from what is committed"
            )
        # A partition assigned a moment ago may refuse a seek until it is being fetched.
        time.sleep(float(self._failed_rebuilds))
        self._rebuild_pending = True

    def _rebuild(self, partitions: Sequence[int]) -> bool:
        """After an abort: state and positions back to what Kafka holds as committed.

        False when a partition could not be moved back to its committed offset: it would go
        on from where it had read to, past records whose processing was aborted, so the
        rebuild has to be done again.
        """
        if not partitions:
            return True
        committed = self._restore(self._consumer, partitions)
        rebuilt = True
        for partition in partitions:
            offset = committed.get(partition, confluent_kafka.OFFSET_BEGINNING)
            try:
                self._consumer.seek(TopicPartition(self.settings.topic_raw, partition, offset))
            except KafkaException as exc:
                rebuilt = False
                log.error(
                    "could not seek after an abort; rebuilding again",
                    extra={"partition": partition, "error": exc.args[0].name()},
                )
        return rebuilt

    def _restore(
        self, consumer: confluent_kafka.Consumer, partitions: Sequence[int]
    ) -> dict[int, int]:
        """Rebuild the partitions' state; returns their committed offsets (when there is one)."""
        if not partitions:
            return {}
        started = time.monotonic()
        topic = self.settings.topic_raw
        # Offsets first: for a read_committed consumer this waits until no transaction that
        # carries offsets for these partitions is pending, so the changelog read below
        # already holds the state those offsets were committed with.
        committed = self._committed_offsets(consumer, topic, partitions)
        entries = _read_changelog(self._restorer_config, self.settings.topic_changelog, partitions)
        for partition in partitions:
            pipeline, corrupt = self._partition_type.restore(
                entries.get(partition, []), self.settings.windows, now_ms=int(time.time() * 1000)
            )
            if corrupt:
                self.metrics.changelog_corrupt.inc(corrupt)
            old = self._owned.get(partition)
            if old is not None:  # a rebuild: the new state pauses again if it must
                self._resume(partition, old)
            self._owned[partition] = _Owned(pipeline, next_offset=committed.get(partition))
            log.info(
                "partition state restored",
                extra={
                    "partition": partition,
                    "buffered": pipeline.buffered,
                    "dedup_entries": pipeline.dedup_entries,
                    "changelog_entries": len(entries.get(partition, [])),
                },
            )
        self.metrics.restore_seconds.observe(time.monotonic() - started)
        return committed

    def _committed_offsets(
        self, consumer: confluent_kafka.Consumer, topic: str, partitions: Sequence[int]
    ) -> dict[int, int]:
        """The committed offsets of ``partitions`` (those that have one).

        For a read_committed consumer the broker answers only once no transaction carrying
        offsets for them is pending, and an instance that died mid-transaction leaves one
        pending until the broker aborts it: up to the transaction timeout and the broker's
        check interval. So the call is repeated until then, rather than failing the
        assignment (and the instance) on the first timeout; an error for one partition is
        not taken as "no offset", which would reprocess it from the beginning.
        """
        wait_s = min(
            self.settings.transaction_timeout_ms / 1000 + _TRANSACTION_ABORT_CHECK_S,
            _MAX_COMMITTED_WAIT_S,
        )
        deadline = time.monotonic() + wait_s
        while True:
            try:
                answer = consumer.committed(
                    [TopicPartition(topic, p) for p in partitions], _KAFKA_TIMEOUT_S
                )
                failed = next((tp for tp in answer if tp.error is not None), None)
                if failed is not None:
                    raise KafkaException(failed.error)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or time.monotonic() >= deadline:
                    raise
                log.warning(
                    "committed offsets not available yet (a transaction may be pending); "
                    "asking again",
                    extra={"partitions": list(partitions), "error": error.name()},
                )
                time.sleep(1.0)
                continue
            return {tp.partition: tp.offset for tp in answer if tp.offset >= 0}

    # ----------------------------------------------------------------------------------------

    def _count(self) -> None:
        """Move the counts of the transaction just committed into the Prometheus counters.

        Only then: the records of an aborted transaction are read and counted again. (Outside
        a transaction nothing is counted: every record and every release opens one.)
        """
        for route, count in self._out_pending.items():
            if count:
                self._records_out[route].inc(count)
                self._out_pending[route] = 0
        m = self.metrics
        for partition, owned in self._owned.items():
            counts = owned.pipeline.counts
            if counts.received_at_capped:
                m.received_at_capped.inc(counts.received_at_capped)
                log.warning(
                    "received-at ahead of the pipeline's clock: capped (is a bridge pod's clock "
                    "ahead?)",
                    extra={"partition": partition, "records": counts.received_at_capped},
                )
            if counts.accepted:
                m.records_in.labels(outcome="accepted").inc(counts.accepted)
            if counts.duplicates:
                m.records_in.labels(outcome="duplicate").inc(counts.duplicates)
                m.duplicates.inc(counts.duplicates)
            for reason, count in counts.invalid.items():
                m.records_in.labels(outcome="invalid").inc(count)
                m.invalid.labels(reason=reason).inc(count)
            if counts.late:
                m.late.inc(counts.late)
            if counts.visits_opened:
                m.visits_opened.inc(counts.visits_opened)
            counts.reset()

    def _prepare_topics(self) -> None:
        metadata = self._consumer.list_topics(self.settings.topic_raw, _KAFKA_TIMEOUT_S)
        raw = metadata.topics.get(self.settings.topic_raw)
        partitions = None
        if raw is not None and raw.error is None and raw.partitions:
            partitions = len(raw.partitions)
        specs = [
            TopicSpec(self.settings.topic_raw, partitions),
            TopicSpec(self.settings.topic_visits, partitions),
            TopicSpec(self.settings.topic_late, partitions),
            TopicSpec(self.settings.topic_dlq),
            # One changelog partition per input partition: same count as the raw topic.
            TopicSpec(
                self.settings.topic_changelog,
                partitions,
                # Compaction only, never time-based deletion: the pipeline writes tombstones
                # for what left its windows, and a record still waiting in the reorder buffer
                # exists only here, however long the pipeline was stopped.
                {"cleanup.policy": "compact"},
            ),
        ]
        asyncio.run(ensure_topics(self.settings.kafka, specs))
        self._check_changelog_partitions()

    def _check_changelog_partitions(self) -> None:
        """State of raw partition N lives in changelog partition N: the counts must match."""
        raw = self._partition_count(self.settings.topic_raw)
        if raw:
            self.metrics.input_partitions.set(raw)
        changelog = self._partition_count(self.settings.topic_changelog)
        if raw and changelog < raw:
            raise PipelineError(
                f"the changelog topic {self.settings.topic_changelog} has {changelog} partitions "
                f"but {self.settings.topic_raw} has {raw}: they must match (create the changelog "
                "with as many partitions, or set PIPELINE_TOPIC_CHANGELOG to a new topic)"
            )

    def _partition_count(self, name: str) -> int:
        """Partitions of a topic; a topic created a moment ago may take a while to show."""
        deadline = time.monotonic() + _KAFKA_TIMEOUT_S
        while True:
            topic = self._consumer.list_topics(name, _KAFKA_TIMEOUT_S).topics.get(name)
            if topic is not None and topic.error is None and topic.partitions:
                return len(topic.partitions)
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.2)


def run(settings: PipelineSettings) -> int:
    """Run one instance until SIGTERM or SIGINT; the exit status for the command line."""
    metrics = PipelineMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=metrics.registry)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        PipelineService(settings, metrics=metrics).run(stop)
    except PipelineError as exc:
        log.error("pipeline failed", extra={"error": str(exc)})
        return 1
    except KafkaException as exc:
        log.error("pipeline failed", extra={"error": exc.args[0].name()})
        return 1
    return 0


def _read_changelog(
    config: dict[str, object], topic: str, partitions: Sequence[int]
) -> dict[int, list[tuple[bytes, bytes | None]]]:
    """Every committed entry of the given changelog partitions, in log order.

    Partitions that hold no record are not read at all, and a read returns as soon as every
    partition reached its end: a consume() call that asks for a batch waits its whole timeout
    unless the batch fills, so the reads are short and repeated until the deadline.
    """
    entries: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in partitions}
    if not partitions:
        return entries
    reader = confluent_kafka.Consumer(config)
    try:
        pending = set(_partitions_with_records(reader, topic, partitions))
        reader.assign(
            [TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in sorted(pending)]
        )
        deadline = time.monotonic() + 600
        while pending:
            if time.monotonic() > deadline:
                raise PipelineError(f"restoring from {topic} took longer than 10 minutes")
            for message in reader.consume(1000, _RESTORE_POLL_S):
                partition = message.partition()
                assert partition is not None
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(partition)
                        continue
                    if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        pending.clear()  # no changelog yet: empty state
                        break
                    raise PipelineError(f"cannot read {topic}: {error.str()}")
                key = message.key()
                if key is not None:
                    entries[partition].append((key, message.value()))
    finally:
        reader.close()
    return entries


_RESTORE_POLL_S = 0.05
_ABSENT = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION)


def _partitions_with_records(
    reader: confluent_kafka.Consumer, topic: str, partitions: Sequence[int]
) -> list[int]:
    """The partitions whose log is not empty: those to read to their end on a restore.

    A partition whose leader is still being elected (a changelog created a moment ago) is
    asked again for up to :data:`_WATERMARK_PATIENCE_S`; one the broker still cannot tell
    about is read, which is always right, only slower.
    """
    found = []
    for partition in partitions:
        deadline = time.monotonic() + _WATERMARK_PATIENCE_S
        while True:
            try:
                low, high = reader.get_watermark_offsets(
                    TopicPartition(topic, partition), _KAFKA_TIMEOUT_S
                )
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.code() in _ABSENT:
                    break  # no changelog yet: empty state
                transient = error.retriable() or error.code() in _LEADER_MOVING
                if transient and time.monotonic() < deadline:
                    time.sleep(_RESTORE_POLL_S)
                    continue
                found.append(partition)
                break
            if high > low:
                found.append(partition)
            break
    return found


_WATERMARK_PATIENCE_S = 2.0
_LEADER_MOVING = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)


def _headers(
    headers: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None,
) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    if type(headers) is list and all(type(value) is bytes for _, value in headers):
        return headers  # type: ignore[return-value]  # checked: the usual case, no copy
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [
        (name, value.encode() if isinstance(value, str) else value)
        for name, value in pairs
        if value is not None
    ]
