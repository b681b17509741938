"""``wifi-bridge spool status|drain DIR``: look into a spool directory, or empty it offline.

``drain`` is for a spool left behind (the volume of a pod that is gone, a host being retired):
it publishes every record to the topic it was meant for, oldest first, with the same producer
settings as the bridge, and acknowledges each only after Kafka did. It refuses a directory a
running bridge holds (the spool's lock).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from bridge.errors import BatchRefused, PublishError, RecordRefused, WifiBridgeError
from bridge.kafka import TopicSpec, ensure_topics
from bridge.metrics import BridgeMetrics
from bridge.rdkafka import RdKafkaPublisher
from bridge.settings import KafkaSettings
from bridge.spool import Spool, SpoolStats, read_stats

_PROGRESS_EVERY_S = 1.0


def _age(stats: SpoolStats) -> str:
    if stats.oldest_spooled_at_ms is None:
        return "-"
    seconds = max(0, int(time.time() - stats.oldest_spooled_at_ms / 1000))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"


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
) -> int:
    """Publish every spooled record; 0 when the spool is empty, 1 if Kafka failed us."""
    total = read_stats(directory).records
    out.write(f"draining {total} records from {directory} to {kafka.bootstrap_servers}\n")
    publisher = RdKafkaPublisher(settings=kafka, metrics=BridgeMetrics())
    try:
        await publisher.start()
    except WifiBridgeError as exc:
        out.write(f"cannot reach Kafka: {exc}\n")
        return 1
    drained = refused = 0
    known_topics: set[str] = set()
    started = last_report = time.monotonic()
    try:
        async with Spool(directory=directory) as spool:
            async for entries in spool.iter_batches(max_records=batch_records):
                new_topics = {e.record.topic for e in entries} - known_topics
                if new_topics:  # as the bridge would have (KAFKA_CREATE_TOPICS)
                    await ensure_topics(kafka, [TopicSpec(t) for t in sorted(new_topics)])
                    known_topics |= new_topics
                delivered = []
                for entry in entries:
                    record = entry.record
                    try:
                        # One at a time: a refused batch held only this record.
                        await publisher.publish(
                            record.topic,
                            key=record.key or b"",
                            value=record.value,
                            headers=list(record.headers),
                            timeout_s=timeout_s,
                        )
                    except (RecordRefused, BatchRefused) as exc:
                        refusal = exc.refusal if isinstance(exc, BatchRefused) else exc
                        saved_as = await spool.set_aside(entry, reason=refusal.code)
                        refused += 1
                        out.write(
                            f"  Kafka refuses a record for good ({refusal.message}); "
                            f"set aside as {saved_as or '(copy failed)'}\n"
                        )
                        continue
                    delivered.append(entry)
                await spool.acknowledge(delivered)
                drained += len(delivered)
                now = time.monotonic()
                if now - last_report >= _PROGRESS_EVERY_S:
                    rate = drained / (now - started)
                    out.write(f"  drained {drained}/{total} records ({rate:.0f}/s)\n")
                    last_report = now
            left = spool.stats()
    except PublishError as exc:
        out.write(f"stopped after {drained} records: {exc}; run drain again to resume\n")
        return 1
    finally:
        await publisher.stop()
    elapsed = time.monotonic() - started
    out.write(
        f"drained {drained} records in {elapsed:.1f} s; {left.records} left, "
        f"{left.corrupt_records} corrupt and {refused} refused set aside\n"
    )
    return 0
