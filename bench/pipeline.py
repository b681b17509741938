"""``make bench`` (pipeline part): ``wifi-bridge pipeline`` beside plain consume-and-produce loops.

One input topic is filled once with realistic raw records (distinct users and venues, login
times in order with small disorder, a share of redeliveries, the bridge's headers). Then each
contender reads all of it from the beginning in a fresh consumer group and writes to its own
output topic, in turn, rounds alternating:

- ``passthrough``: consume and produce each record unchanged, librdkafka (the same client as
  the pipeline), no state, no transactions, auto-commit: the plain loop;
- ``normalising``: the same loop, but each record is normalised first (stateless work that the
  pipeline does too), to show how much of the gap is normalisation rather than state and
  transactions;
- ``passthrough-aiokafka``: the plain loop as most people write it with aiokafka (``getmany``
  and ``send``);
- ``pipeline``: the shipped service (state, changelog, transactions, read_committed);
- ``logic-only``: the pipeline's stages (normalise, dedup, reorder, visits, changelog entries)
  on the same records in this process, without Kafka: what the stages cost by themselves;
- ``shell``: the shipped service with stages that do nothing but forward each record and
  write one changelog entry for it (read_committed, transactions, changelog, offsets): what
  exactly-once costs on this client before any of the pipeline's own work.

Each contender's clock starts when its partitions are assigned (group-join delays are the
broker's, not the contender's) and stops when the last output is written (committed, for the
pipeline). The ratios printed at the end are measured in this same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

import confluent_kafka
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import SAMPLE_PATH, broker
from bridge.event import identify
from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.pipeline.metrics import PipelineMetrics
from consumers.pipeline.normalise import normalise
from consumers.pipeline.partition import Output, PartitionPipeline, RawRecord, Route, WindowConfig
from consumers.pipeline.service import PipelineService
from consumers.pipeline.settings import PipelineSettings

TARGET_PIPELINE_VS_PLAIN = 0.5
PARTITIONS = 6


def make_records(*, records: int, seed: int = 1) -> list[RawRecord]:
    """Realistic raw records, as the bridge writes them (body, key, headers, timestamp)."""
    rng = random.Random(seed)
    sample = orjson.loads(SAMPLE_PATH.read_bytes())
    start_ms = int(time.time() * 1000) - 2 * 3_600_000  # two hours ago: all due by the end
    sent: list[bytes] = []
    raw: list[RawRecord] = []
    for n in range(records):
        if sent and rng.random() < 0.05:
            body = rng.choice(sent[-5000:])  # a redelivery
        else:
            at_ms = start_ms + n * 20 - rng.randrange(2_000)
            sample["user"]["id"] = rng.randrange(20_000)
            sample["user"]["venue"]["id"] = rng.randrange(50)
            sample["client"]["mac"] = f"02-00-00-{rng.randrange(256):02x}-00-01"
            sample["session"]["authenticationTime"] = datetime.fromtimestamp(
                at_ms / 1000, UTC
            ).isoformat(timespec="milliseconds")
            body = orjson.dumps(sample)
            sent.append(body)
        identity = identify(orjson.loads(body))
        received_ms = start_ms + n * 20
        headers = [
            ("event-id", identity.event_id.encode()),
            ("received-at", str(received_ms).encode()),
            ("content-type", b"application/json"),
        ]
        raw.append(RawRecord(identity.key, body, headers, received_ms))
    return raw


def make_input(bootstrap: str, topic: str, records: list[RawRecord]) -> int:
    """Fill ``topic``; returns the number of distinct logins (the pipeline's expected output)."""
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20}
    )
    distinct: set[bytes] = set()
    for record in records:
        distinct.add(record.headers[0][1])
        headers = cast(list[tuple[str, str | bytes | None]], record.headers)
        while True:
            try:
                producer.produce(topic, record.value, record.key, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    return len(distinct)


def _logic_only(records: list[RawRecord]) -> float:
    """The pipeline's own stages without Kafka: accept every record, take the changes as a
    commit would (every 500 records); one :class:`PartitionPipeline` per input partition."""
    pipelines = [PartitionPipeline(WindowConfig()) for _ in range(PARTITIONS)]
    started = time.perf_counter()
    for n, record in enumerate(records, 1):
        pipelines[hash(record.key) % PARTITIONS].accept(record)
        if n % 500 == 0:
            for pipeline in pipelines:
                pipeline.take_changes()
    return time.perf_counter() - started


def _plain(bootstrap: str, source: str, target: str, total: int, *, transform: bool) -> float:
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-plain-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"}
    )
    started: list[float] = []
    consumer.subscribe([source], on_assign=lambda *_: started.append(time.perf_counter()))
    seen = 0
    try:
        while seen < total:
            for message in consumer.consume(500, 0.5):
                if message.error() is not None:
                    continue
                value = message.value() or b""
                if transform:
                    raw_headers = message.headers() or []
                    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
                    headers = {k: v for k, v in pairs if isinstance(v, bytes)}
                    received = headers.get("received-at")
                    event_id = headers.get("event-id")
                    record = normalise(
                        value,
                        event_id=event_id.decode() if event_id else None,
                        received_at_ms=int(received) if received else None,
                    )
                    value = orjson.dumps(record)
                while True:
                    try:
                        producer.produce(target, value, message.key())
                        break
                    except BufferError:
                        producer.poll(0.05)
                seen += 1
            producer.poll(0)
        producer.flush(60)
        return time.perf_counter() - started[0]
    finally:
        consumer.close()


async def _plain_aiokafka(bootstrap: str, source: str, target: str, total: int) -> float:
    started: list[float] = []
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"bench-aiokafka-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    seen = 0
    try:
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            if batches and not started:
                started.append(time.perf_counter())
            for records in batches.values():
                for record in records:
                    await producer.send(target, record.value, key=record.key)
                    seen += 1
        await producer.flush()
        return time.perf_counter() - started[0]
    finally:
        await producer.stop()
        await consumer.stop()


class _Forwarding(PartitionPipeline):
    """Stages that do nothing: each record goes out as it came, with one changelog entry."""

    __slots__ = ("_entries",)

    def __init__(self, config: WindowConfig) -> None:
        super().__init__(config)
        self._entries: list[tuple[bytes, bytes | None]] = []

    @classmethod
    def restore(
        cls,
        entries: object,
        config: WindowConfig,
        *,
        now_ms: int | None = None,
    ) -> tuple[PartitionPipeline, int]:
        return cls(config), 0

    def accept(self, raw: RawRecord) -> list[Output]:
        event_id = raw.headers[0][1]
        self._entries.append((b"e" + event_id, b'{"s":%d}' % raw.timestamp_ms))
        self.counts.accepted += 1
        return [Output(Route.VISITS, raw.key, raw.value, [("event-id", event_id)])]

    def tick(self, now_ms: int, *, caught_up: bool) -> list[Output]:
        return []

    def take_changes(self) -> list[tuple[bytes, bytes | None]]:
        entries, self._entries = self._entries, []
        return entries


def _pipeline(
    bootstrap: str,
    source: str,
    target: str,
    expected: int,
    partition_type: type[PartitionPipeline] = PartitionPipeline,
) -> float:
    group = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    settings = PipelineSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=PARTITIONS),
        group_id=group,
        instance_id="bench",
        topic_raw=source,
        topic_visits=target,
        topic_late=target + ".late",
        topic_dlq=target + ".dlq",
        topic_changelog=group + "-changelog",
        windows=WindowConfig(),
        metrics_port=0,
    )
    metrics = PipelineMetrics()
    service = PipelineService(settings, metrics=metrics, partition_type=partition_type)
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    started: float | None = None
    while True:
        if started is None and metrics.assigned._value.get() > 0:
            started = time.perf_counter()
        out = sum(
            metrics.records_out.labels(route=route)._value.get() for route in ("visits", "late")
        )
        if out >= expected:
            break
        if not runner.is_alive():
            raise RuntimeError("the pipeline stopped before writing every record")
        time.sleep(0.005)
    stop.set()  # the last transaction commits on the way out
    runner.join()
    assert started is not None
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench-pipeline", description=__doc__)
    parser.add_argument("--records", type=int, default=100_000, help="raw records in the input")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per contender (median)")
    args = parser.parse_args(argv)

    with broker() as bootstrap:
        source = f"bench.pipeline.raw.{uuid.uuid4().hex[:6]}"
        settings = KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=PARTITIONS)
        asyncio.run(ensure_topics(settings, [TopicSpec(source)]))
        print(f"filling {source} with {args.records} raw records ...", flush=True)
        records = make_records(records=args.records)
        expected = make_input(bootstrap, source, records)
        print(f"{expected} distinct logins, {args.records - expected} redeliveries", flush=True)

        contenders: dict[str, Callable[[str], float]] = {
            "passthrough": lambda target: _plain(
                bootstrap, source, target, args.records, transform=False
            ),
            "normalising": lambda target: _plain(
                bootstrap, source, target, args.records, transform=True
            ),
            "passthrough-aiokafka": lambda target: asyncio.run(
                _plain_aiokafka(bootstrap, source, target, args.records)
            ),
            "pipeline": lambda target: _pipeline(bootstrap, source, target, expected),
            "logic-only": lambda _target: _logic_only(records),
            "shell": lambda target: _pipeline(bootstrap, source, target, args.records, _Forwarding),
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(1, args.rounds + 1):
            for name, run in contenders.items():
                target = f"bench.pipeline.{name}.{uuid.uuid4().hex[:6]}"
                if name != "logic-only":
                    asyncio.run(ensure_topics(settings, [TopicSpec(target)]))
                seconds = run(target)
                rate = args.records / seconds
                rates[name].append(rate)
                print(
                    f"round {round_no}/{args.rounds} {name:<22} {rate:9.0f} records/s "
                    f"({seconds:.2f} s)",
                    flush=True,
                )

    median = {name: statistics.median(values) for name, values in rates.items()}
    print()
    print(f"{args.records} raw records, {PARTITIONS} partitions, median of {args.rounds} rounds")
    for name, rate in median.items():
        print(f"{name:<24}{rate:>10.0f} records/s")
    print()
    ratio = median["pipeline"] / median["passthrough"]
    print(
        f"pipeline / plain passthrough loop (same client): {ratio:.2f}  "
        f"(target >= {TARGET_PIPELINE_VS_PLAIN})"
    )
    print(
        "pipeline / normalising loop (stateless, no transactions): "
        f"{median['pipeline'] / median['normalising']:.2f}"
    )
    print(
        "pipeline / plain loop on aiokafka: "
        f"{median['pipeline'] / median['passthrough-aiokafka']:.2f}"
    )
    print(
        "exactly-once shell with stages that do nothing / plain passthrough loop: "
        f"{median['shell'] / median['passthrough']:.2f} (the most any stages could reach)"
    )
    # What the target leaves per record, beside what the stages alone cost in this process.
    plain_us = 1e6 / median["passthrough"]
    logic_us = 1e6 / median["logic-only"]
    budget_us = plain_us / TARGET_PIPELINE_VS_PLAIN - plain_us
    print(
        f"per record: plain loop {plain_us:.1f} us, pipeline {1e6 / median['pipeline']:.1f} us; "
        f"the target leaves {budget_us:.1f} us for all pipeline work on top of the loop, "
        f"its stages alone (no Kafka) take {logic_us:.1f} us"
    )
    return 0
