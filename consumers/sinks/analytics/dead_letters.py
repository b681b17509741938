"""The analytics sink's dead letters: what a letter holds, and the producer that sends them.

A record that is not a canonical login goes to the dead-letter topic whole, with headers that
say why and where it came from. A letter must never be one Kafka refuses at every retry: the
batch that skips the record commits only once its letters are in, so a refused letter would
stall the sink for good. So a letter is cut to fit ``max_bytes`` (the producer's
``max_request_size``), and one the topic still refuses as too large (its
``max.message.bytes`` is smaller) is cut to half its size and sent again until it fits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeAlias

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
)
from aiokafka.structs import ConsumerRecord

from bridge.kafka import started
from consumers.sinks.analytics.rows import RejectedRecord
from consumers.sinks.crm_dlq import DeadLetterRecord, fit_dead_letter, record_bytes

log = logging.getLogger(__name__)

__all__ = ["DeadLetterProducer", "letter"]

Record: TypeAlias = ConsumerRecord[bytes, bytes]
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# After these the producer is replaced: a refused record, or a wedged producer.
_REPLACE = (*_TOO_LARGE, OutOfOrderSequenceNumber)
# The headers a letter keeps however small it must be: why, and where the record is.
_ESSENTIAL = ("dlq-reason", "source-topic", "source-partition", "source-offset")


def letter(record: Record, error: RejectedRecord, *, max_bytes: int) -> DeadLetterRecord:
    """The dead letter of ``record``, at most ``max_bytes`` when that can be.

    The record whole with its headers, when that fits; else only its event id is kept of its
    headers, and its value is cut to fit (``dlq-value-truncated`` holds its length; the
    record itself is still at ``source-offset``). Below what the headers alone take, the
    value is empty and the letter larger than ``max_bytes``.
    """
    own = [
        ("dlq-reason", error.reason.value.encode()),
        ("dlq-detail", error.message.encode()),
        ("source-topic", record.topic.encode()),
        ("source-partition", str(record.partition).encode()),
        ("source-offset", str(record.offset).encode()),
    ]
    copied = [(k, v or b"") for k, v in (record.headers or ()) if not k.startswith("dlq-")]
    headers = [*copied, *own]
    if record_bytes(record.key, record.value, headers) <= max_bytes:
        return DeadLetterRecord(record.key, record.value, tuple(headers))
    event_id = [(k, v) for k, v in copied if k == "event-id"][:1]
    return fit_dead_letter(
        key=record.key, value=record.value, headers=[*event_id, *own], max_bytes=max_bytes
    )


def _bare(record: DeadLetterRecord) -> DeadLetterRecord:
    """The smallest letter that still says why and where: no key, no value, no detail."""
    headers = tuple((k, v) for k, v in record.headers if k in _ESSENTIAL)
    return DeadLetterRecord(None, b"", headers)


class DeadLetterProducer:
    """The dead-letter topic's producer (``acks=all``, idempotent), replaced when wedged.

    ``max_bytes`` (the producer's ``max_request_size``) is what a letter is first cut to. A
    broker that refuses a record leaves an idempotent producer's sequence numbers out of step
    with it, and every later record to that partition fails with ``OutOfOrderSequenceNumber``
    (a broker outage can do the same: aio-libs/aiokafka#1017). Such a producer is stopped,
    and the next send starts another, which gets a new producer id.
    """

    def __init__(self, make: Callable[[], AIOKafkaProducer], *, topic: str, max_bytes: int) -> None:
        self._make = make
        self._topic = topic
        self._max_bytes = max_bytes
        self._producer: AIOKafkaProducer | None = None
        # Letters are sent together: the first to find no producer starts the one they share.
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:
            if self._producer is None:
                self._producer = await started(self._make())

    async def stop(self) -> None:
        """Stop the producer; the next send starts another."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def publish(
        self, letters: Sequence[tuple[Record, RejectedRecord]]
    ) -> list[KafkaError | None]:
        """Send the letters of ``letters``; per letter, None once Kafka has it, else the error.

        All are sent together; a letter refused as too large is then cut and sent again
        alone (see :meth:`_send_cut`), and one that met a wedged producer is sent again once
        with a new producer. Any other error (Kafka unavailable) is returned as it is: the
        caller tries again later.
        """
        if not letters:
            return []
        cut = [letter(record, error, max_bytes=self._max_bytes) for record, error in letters]
        try:
            await self.start()
        except KafkaError as exc:  # Kafka unavailable: every letter waits for the next try
            return [exc] * len(letters)
        shared = self._producer
        outcomes = await asyncio.gather(*(self._send(d) for d in cut), return_exceptions=True)
        results: list[KafkaError | None] = []
        for (record, error), dead, outcome in zip(letters, cut, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, KafkaError):
                raise outcome
            if isinstance(outcome, _REPLACE):
                if self._producer is shared:  # not yet replaced for an earlier letter
                    await self.stop()
                outcome = await self._send_cut(record, error, dead)
            results.append(outcome)
        return results

    async def _send(self, dead: DeadLetterRecord) -> None:
        await self.start()
        assert self._producer is not None
        sent = await self._producer.send(
            self._topic, key=dead.key, value=dead.value, headers=list(dead.headers)
        )
        await sent

    async def _send_alone(self, dead: DeadLetterRecord) -> KafkaError | None:
        try:
            await self._send(dead)
        except KafkaError as exc:
            if isinstance(exc, _REPLACE):
                await self.stop()
            return exc
        return None

    async def _send_cut(
        self, record: Record, error: RejectedRecord, dead: DeadLetterRecord
    ) -> KafkaError | None:
        """Send ``dead`` alone, cut to half its size after each refusal as too large.

        Down to no value at all, and then to the bare letter (reason and source headers
        only). A topic that refuses even that has a limit no letter can meet: the error is
        returned, and the batch waits (with its backoff) for the topic to be fixed, since
        dropping the record without a letter would lose it.
        """
        while True:
            outcome = await self._send_alone(dead)
            if not isinstance(outcome, _TOO_LARGE):
                return outcome
            if dead.value:
                dead = letter(record, error, max_bytes=dead.size_bytes // 2)
            elif dead != _bare(dead):
                dead = _bare(dead)
            else:
                log.error(
                    "the dead-letter topic refuses even a letter without key or value: raise "
                    "its max.message.bytes",
                    extra={
                        "topic": record.topic,
                        "partition": record.partition,
                        "offset": record.offset,
                        "dlq_topic": self._topic,
                        "size_bytes": dead.size_bytes,
                    },
                )
                return outcome
            log.warning(
                "dead-letter topic refused a letter as too large; cutting it further",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "cut_to_bytes": dead.size_bytes,
                },
            )
