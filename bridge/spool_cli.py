"""``wifi-bridge spool status|drain DIR``: look into a spool directory, or empty it offline.

``drain`` is for a spool left behind (the volume of a pod that is gone, a host being retired):
it publishes every record to the topic it was meant for, oldest first, with the same producer
settings as the bridge, and acknowledges each only after Kafka did. A batch of records is in
flight at once, as in the bridge's drainer; a batch Kafka refuses is sent again one record at a
time, so only the record at fault is set aside. It refuses a directory a running bridge holds
(the spool's lock), before it connects to Kafka.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

from bridge.durable import publish_spooled
from bridge.errors import PublishError, RecordRefused, WifiBridgeError
from bridge.kafka import TopicSpec, ensure_topics
from bridge.metrics import BridgeMetrics
from bridge.publisher import Publisher
from bridge.rdkafka import RdKafkaPublisher
from bridge.settings import KafkaSettings
from bridge.spool import Spool, SpoolStats, SpoolUnavailable, read_stats

#: Waits before a failed batch is tried again, then the run stops (its exit status 1).
_RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0)
_PROGRESS_EVERY_S = 1.0


def _duration(seconds: float) -> str:
    hours, rest = divmod(max(0, int(seconds)), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"


def _age(stats: SpoolStats) -> str:
    if stats.oldest_spooled_at_ms is None:
        return "-"
    return _duration(time.time() - stats.oldest_spooled_at_ms / 1000)


def status(directory: Path, out: TextIO = sys.stdout) -> int:
    stats = read_stats(directory)
    out.write(
        f"spool {directory}\n"
        f"  records waiting   {stats.records}\n"
        f"  bytes on disk     {stats.bytes}\n"
        f"  segments          {stats.segments}\n"
        f"  oldest record age {_age(stats)}\n"
        f"  corrupt records   {stats.corrupt_records} ({stats.corrupt_bytes} bytes set aside)\n"
        f"  unreadable files  {stats.unreadable_segments}"
        f"{' (their records are not counted above)' if stats.unreadable_segments else ''}\n"
    )
    return 0


async def drain(
    directory: Path,
    kafka: KafkaSettings,
    *,
    batch_records: int = 500,
    timeout_s: float = 30.0,
    out: TextIO = sys.stderr,
    publisher: Publisher | None = None,
) -> int:
    """Publish every spooled record; 0 when the spool is empty, 1 if Kafka failed us.

    ``batch_records`` (default 500) records are in flight at once, each waited for at most
    ``timeout_s`` (default 30); ``publisher`` (default: the bridge's librdkafka producer on
    ``kafka``) is started and stopped here.
    """
    if not await asyncio.to_thread(directory.is_dir):  # the spool would create it
        raise SpoolUnavailable(f"cannot read spool {directory}: no such directory")
    # The spool first: a directory a running bridge holds is refused before Kafka is tried.
    async with Spool(directory=directory) as spool:
        total = spool.stats().records
        out.write(f"draining {total} records from {directory} to {kafka.bootstrap_servers}\n")
        if publisher is None:
            publisher = RdKafkaPublisher(settings=kafka, metrics=BridgeMetrics())
        try:
            await publisher.start()
        except WifiBridgeError as exc:
            out.write(f"cannot reach Kafka: {exc}\n")
            return 1
        try:
            return await _drain(spool, publisher, kafka, total, batch_records, timeout_s, out)
        finally:
            await publisher.stop()


async def _drain(
    spool: Spool,
    publisher: Publisher,
    kafka: KafkaSettings,
    total: int,
    batch_records: int,
    timeout_s: float,
    out: TextIO,
) -> int:
    drained = refused = failed_tries = 0
    known_topics: set[str] = set()
    started = last_report = time.monotonic()
    while entries := await spool.read_batch(batch_records):
        new_topics = {e.record.topic for e in entries} - known_topics
        if new_topics:  # as the bridge would have (KAFKA_CREATE_TOPICS)
            await ensure_topics(kafka, [TopicSpec(t) for t in sorted(new_topics)])
            known_topics |= new_topics
        results = await publish_spooled(publisher, entries, timeout_s=timeout_s)
        delivered = [e for e, result in zip(entries, results, strict=True) if result is None]
        await spool.acknowledge(delivered)
        drained += len(delivered)
        failure: PublishError | None = None
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, RecordRefused):
                saved_as = await spool.set_aside(entry, reason=result.code)
                refused += 1
                out.write(
                    f"  Kafka refuses a record for good ({result.message}); "
                    f"set aside as {saved_as or '(copy failed)'}\n"
                )
            elif isinstance(result, PublishError):
                failure = result
                break  # it and what follows are read again
            elif result is not None:
                raise result
        if failure is not None:
            # Tried again in this run: the records Kafka took meanwhile are not sent again
            # (the spool remembers them until it is closed; a later run would resend them).
            if failed_tries == len(_RETRY_DELAYS_S):
                out.write(
                    f"stopped: {failure}; {drained} records delivered, "
                    f"{spool.stats().records} still in the spool; run drain again to resume\n"
                )
                return 1
            delay_s = _RETRY_DELAYS_S[failed_tries]
            failed_tries += 1
            out.write(f"  {failure}; trying again in {delay_s:g} s\n")
            await spool.rewind()
            await asyncio.sleep(delay_s)
            continue
        failed_tries = 0
        now = time.monotonic()
        if now - last_report >= _PROGRESS_EVERY_S:
            out.write(f"  {_progress(drained, total - refused, now - started)}\n")
            last_report = now
    left = spool.stats()
    elapsed_s = time.monotonic() - started
    out.write(
        f"drained {drained} records in {elapsed_s:.1f} s ({drained / max(elapsed_s, 1e-3):.0f}/s); "
        f"{left.records} left, {left.corrupt_records} corrupt and {refused} refused set aside\n"
    )
    return 0


def _progress(drained: int, total: int, elapsed_s: float) -> str:
    """``drained 1500/9000 records (750/s, about 0h00m10s left)``."""
    rate = drained / elapsed_s if elapsed_s > 0 else 0.0
    left = f"about {_duration(max(0, total - drained) / rate)} left" if rate > 0 else "waiting"
    return f"drained {drained}/{total} records ({rate:.0f}/s, {left})"
