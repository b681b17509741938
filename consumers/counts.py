"""Counts of what the stages other than the analytics store hold: a topic, the CRM outbox.

``wifi-bridge report`` and ``make run`` show these beside the analytics store's numbers. Both
readers only read: a topic is read from a chosen start to its end as ``read_committed`` (a
record of an aborted transaction, or a transaction marker, is not a record), and the CRM
sink's SQLite file is opened read-only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from bridge.errors import WifiBridgeError

__all__ = ["CountError", "OutboxCount", "TopicCount", "count_outbox", "count_topic"]

_EVENT_ID = "event-id"


class CountError(WifiBridgeError):
    """A topic or the CRM outbox could not be counted; no number is better than a guess."""

    code = "count_failed"
    retryable = True


@dataclass(frozen=True, slots=True)
class TopicCount:
    """Committed records of one topic, and how many carry an event id seen before in it."""

    records: int = 0
    with_event_id: int = 0
    distinct_event_ids: int = 0

    @property
    def redeliveries(self) -> int:
        """Records whose ``event-id`` header came earlier in the topic: the same login again."""
        return self.with_event_id - self.distinct_event_ids


@dataclass(frozen=True, slots=True)
class OutboxCount:
    upserts: int
    """Rows of ``crm_outbox``: one per upsert the CRM sink made (its outbox target)."""
    contacts: int
    """Distinct e-mails among them."""


def count_topic(
    client: Mapping[str, Any],
    topic: str,
    *,
    since_ms: int | None = None,
    timeout_s: float = 60.0,
) -> TopicCount:
    """Reads ``topic`` to its end (as it is now) and counts its committed records.

    ``client`` is a librdkafka configuration (servers, security). ``since_ms`` (epoch ms)
    starts each partition at its first record stamped at or after it; ``None`` reads from
    the oldest record the topic still retains. A topic that does not exist holds nothing.
    Raises :class:`CountError` when Kafka does not answer within ``timeout_s``.
    """
    consumer = confluent_kafka.Consumer(
        {
            **client,
            "group.id": "wifi-bridge-count",  # assign() only: never joins, never commits
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,  # an empty partition answers EOF at once
        }
    )
    try:
        return _count(consumer, topic, since_ms, time.monotonic() + timeout_s)
    except KafkaException as exc:
        raise CountError(f"cannot read {topic}: {exc.args[0]}") from None
    finally:
        consumer.close()


def _count(
    consumer: confluent_kafka.Consumer, topic: str, since_ms: int | None, deadline: float
) -> TopicCount:
    metadata = consumer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
    described = metadata.topics.get(topic)
    if described is None or not described.partitions:
        return TopicCount()
    if described.error is not None:
        if described.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return TopicCount()
        raise CountError(f"cannot read {topic}: {described.error.str()}")
    partitions = sorted(described.partitions)
    if since_ms is None:
        starts = [TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in partitions]
    else:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions],
            timeout=max(0.1, deadline - time.monotonic()),
        )
        starts = [tp for tp in found if tp.offset >= 0]  # -1: nothing stamped since then
    if not starts:
        return TopicCount()
    consumer.assign(starts)
    pending = {tp.partition for tp in starts}
    records = with_event_id = 0
    event_ids: set[bytes] = set()
    while pending:
        if time.monotonic() > deadline:
            raise CountError(f"reading {topic} to its end took too long")
        for message in consumer.consume(1000, 0.5):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    partition = message.partition()
                    assert partition is not None
                    pending.discard(partition)
                    continue
                raise CountError(f"cannot read {topic}: {error.str()}")
            records += 1
            headers = message.headers() or []
            for name, value in headers.items() if isinstance(headers, dict) else headers:
                if name == _EVENT_ID and value is not None:
                    with_event_id += 1
                    event_ids.add(value.encode() if isinstance(value, str) else value)
                    break
    return TopicCount(records, with_event_id, len(event_ids))


def count_outbox(path: Path) -> OutboxCount:
    """Upserts in the CRM sink's outbox (``CRM_STATE_DB``); the file is opened read-only."""
    if not path.exists():
        raise FileNotFoundError(f"CRM_STATE_DB names {path}, which does not exist yet")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA busy_timeout=5000")  # the sink may be writing a batch
            (upserts, contacts) = db.execute(
                "SELECT count(*), count(DISTINCT email) FROM crm_outbox"
            ).fetchone()
    except sqlite3.Error as exc:
        raise CountError(f"cannot read the CRM outbox in {path}: {exc}") from None
    return OutboxCount(int(upserts), int(contacts))
