"""``wifi-bridge sink analytics`` end to end: real Kafka, real PostgreSQL, real DuckDB file.

The pipeline's output is played by the tests: canonical records (built from the sender's
sample with the pipeline's normaliser) produced transactionally, keyed by user id, to topics of
the tests' own; the sink reads them with ``read_committed``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, OutOfOrderSequenceNumber
from aiokafka.structs import ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.sinks.analytics import service
from consumers.sinks.analytics.dead_letters import DeadLetterProducer
from consumers.sinks.analytics.metrics import AnalyticsMetrics
from consumers.sinks.analytics.rows import Reason, RejectedRecord
from consumers.sinks.analytics.service import serve
from consumers.sinks.analytics.settings import AnalyticsSettings
from consumers.sinks.analytics.store import AnalyticsStore, Position, StoreUnavailable
from devkafka.broker import free_port
from tests.fixtures.analytics import (
    AnalyticsTarget,
    assert_aggregates_match_logins,
    fetch_one,
    snapshot,
)
from tests.fixtures.kafka import consume, unique_topic
from tests.fixtures.logins import canonical, encoded

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 3


@dataclass
class Topics:
    visits: str = field(default_factory=lambda: unique_topic("visits"))
    late: str = field(default_factory=lambda: unique_topic("late"))
    dlq: str = field(default_factory=lambda: unique_topic("dlq"))


@pytest.fixture
async def topics(kafka_bootstrap: str) -> Topics:
    names = Topics()
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS)
    await ensure_topics(
        kafka, [TopicSpec(names.visits), TopicSpec(names.late), TopicSpec(names.dlq)]
    )
    return names


def sink_env(
    bootstrap: str, target: AnalyticsTarget, topics: Topics, **overrides: str
) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
        "ANALYTICS_URL": target.url,
        "ANALYTICS_TOPICS": f"{topics.visits},{topics.late}",
        "ANALYTICS_TOPIC_DLQ": topics.dlq,
        "ANALYTICS_GROUP_ID": f"sink-test-{uuid.uuid4().hex[:8]}",
        "ANALYTICS_BATCH_WAIT_MS": "50",
        "ANALYTICS_METRICS_HOST": "127.0.0.1",
        "ANALYTICS_METRICS_PORT": str(free_port()),
        "ANALYTICS_LOG_FORMAT": "json",
    }
    env.update(overrides)
    return env


Message = tuple[str, bytes, bytes]  # topic, key, value


async def produce(
    bootstrap: str, messages: Sequence[Message], *, per_transaction: int = 50
) -> None:
    """As the pipeline does: transactions, key = user id, murmur2 partitioning."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"test-pipeline-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        for start in range(0, len(messages), per_transaction):
            async with producer.transaction():
                for topic, key, value in messages[start : start + per_transaction]:
                    await producer.send(topic, value=value, key=key)
    finally:
        await producer.stop()


def login_message(topic: str, user_id: int, minute: int, visit: str, **kw: Any) -> Message:
    record = canonical(user_id=user_id, minute=minute, visit_id=visit, **kw)
    return topic, str(user_id).encode(), encoded(record)


def known_stream(topics: Topics) -> list[Message]:
    """Three people at two venues, a redelivered login, a late login on the late topic."""
    v = topics.visits
    return [
        login_message(v, 1, 0, "u1-a", is_new=True),
        login_message(v, 2, 3, "u2-a", is_new=True),
        login_message(v, 1, 10, "u1-a", is_new=False),
        login_message(v, 1, 10, "u1-a", is_new=False),
        login_message(v, 3, 20, "u3-a", venue_id=7, is_new=True),
        login_message(v, 1, 55, "u1-b", is_new=True),
        login_message(topics.late, 2, 15, "u2-a", is_new=False, late=True),
    ]


def processed(metrics: AnalyticsMetrics) -> float:
    """Records the sink has finished with: stored, skipped as duplicates, or dead-lettered."""
    registry = metrics.registry
    total = (
        registry.get_sample_value("wifi_sink_analytics_rows_written_total", {"table": "logins"})
        or 0.0
    )
    total += registry.get_sample_value("wifi_sink_analytics_duplicate_records_total") or 0.0
    for reason in ("invalid_json", "not_an_object", "missing_field", "bad_field"):
        total += (
            registry.get_sample_value(
                "wifi_sink_analytics_rejected_records_total", {"reason": reason}
            )
            or 0.0
        )
    return total


RunSink = Callable[..., Awaitable[AnalyticsMetrics]]


@pytest.fixture
def run_sink_until(kafka_bootstrap: str, topics: Topics) -> RunSink:
    """Runs the sink in this process until it has processed ``count`` records, then stops it."""

    async def run(
        target: AnalyticsTarget, count: int, timeout_s: float = 60.0, **overrides: str
    ) -> AnalyticsMetrics:
        settings = AnalyticsSettings.load(
            None, sink_env(kafka_bootstrap, target, topics, **overrides)
        )
        metrics, stop = AnalyticsMetrics(), asyncio.Event()
        task = asyncio.create_task(
            serve(settings, stop=stop, handle_signals=False, metrics=metrics)
        )
        deadline = time.monotonic() + timeout_s
        try:
            while processed(metrics) < count:
                assert not task.done(), "the sink stopped by itself"
                assert time.monotonic() < deadline, f"processed {processed(metrics)} of {count}"
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0
        return metrics

    return run


async def test_known_stream_lands_as_rows_and_aggregates(
    kafka_bootstrap: str, topics: Topics, analytics_target: AnalyticsTarget, run_sink_until: RunSink
) -> None:
    stream = known_stream(topics)
    await produce(kafka_bootstrap, stream, per_transaction=3)
    metrics = await run_sink_until(analytics_target, len(stream))

    assert metrics.registry.get_sample_value("wifi_sink_analytics_duplicate_records_total") == 1
    port = analytics_target.port()
    tables = await snapshot(port)
    assert len(tables["logins"]) == 6
    assert [(v[0], v[6]) for v in tables["visits"]] == [
        ("u1-a", 2),
        ("u1-b", 1),
        ("u2-a", 2),
        ("u3-a", 1),
    ]
    assert [row[2:] for row in tables["venue_daily"]] == [(5, 2, 3), (1, 1, 1)]
    assert [row[9] for row in tables["logins"] if row[11]] == ["u2-a"]
    await assert_aggregates_match_logins(port)
    # Every record's position is in the database, in the same transactions as the rows.
    stored = await port.fetch("SELECT topic, next_offset FROM sink_offsets WHERE next_offset > 0")
    assert {topic for topic, _ in stored} == {topics.visits, topics.late}


async def test_replay_from_the_beginning_leaves_every_table_unchanged(
    kafka_bootstrap: str, topics: Topics, analytics_target: AnalyticsTarget, run_sink_until: RunSink
) -> None:
    stream = known_stream(topics)
    await produce(kafka_bootstrap, stream)
    await run_sink_until(analytics_target, len(stream), ANALYTICS_GROUP_ID="live")
    port = analytics_target.port()
    before = await snapshot(port)

    # A new consumer group starts from the beginning of the topics ...
    replay = await run_sink_until(analytics_target, len(stream), ANALYTICS_GROUP_ID="replay")
    assert replay.registry.get_sample_value("wifi_sink_analytics_duplicate_records_total") == 7
    assert await snapshot(port) == before
    # ... and so does the same group once its stored positions are reset.
    await port.execute("UPDATE sink_offsets SET next_offset = NULL WHERE consumer_group = 'live'")
    await run_sink_until(analytics_target, len(stream), ANALYTICS_GROUP_ID="live")
    assert await snapshot(port) == before


async def test_a_record_that_is_not_a_canonical_login_goes_to_the_dlq_with_its_reason(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, run_sink_until: RunSink
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    no_event_id = canonical(user_id=9, minute=1, visit_id="u9")
    del no_event_id["eventId"]
    stream = [
        login_message(topics.visits, 1, 0, "u1"),
        (topics.visits, b"5", b"{this is not json"),
        (topics.visits, b"9", encoded(no_event_id)),
        login_message(topics.visits, 2, 0, "u2"),
    ]
    await produce(kafka_bootstrap, stream)
    metrics = await run_sink_until(target, len(stream))

    dead = await consume(kafka_bootstrap, topics.dlq, count=2, settle_s=1.0)
    reasons = sorted(dict(r.headers)["dlq-reason"] for r in dead)
    assert reasons == [b"invalid_json", b"missing_field"]
    assert {r.value for r in dead} == {stream[1][2], stream[2][2]}
    for record in dead:
        headers = dict(record.headers)
        assert headers["source-topic"] == topics.visits.encode()
        assert b"this is not json" not in headers["dlq-detail"]
    assert (
        metrics.registry.get_sample_value(
            "wifi_sink_analytics_rejected_records_total", {"reason": "invalid_json"}
        )
        == 1
    )
    assert await fetch_one(target.port(), "SELECT count(*) FROM logins") == 2
    await target.close()
    # Labels name tables, outcomes, reasons and partitions, never anything from a record.
    exported = metrics.render().decode()
    for _, _, value in (stream[0], stream[3]):
        assert orjson.loads(value)["eventId"] not in exported
    assert "visitor@example.com" not in exported


# -- the sink as its own process: crashes, signals, a database outage


@dataclass
class SinkProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


SpawnSink = Callable[..., SinkProcess]


@pytest.fixture
def spawn_sink(kafka_bootstrap: str, topics: Topics, tmp_path: Path) -> Iterator[SpawnSink]:
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(target: AnalyticsTarget, module: str = "bridge", **overrides: str) -> SinkProcess:
        """``python -m <module> sink analytics`` (another module: a drop-in for the CLI)."""
        env = sink_env(kafka_bootstrap, target, topics, **overrides)
        log_path = tmp_path / f"sink-{len(processes)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", module, "sink", "analytics"],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        url = f"http://127.0.0.1:{env['ANALYTICS_METRICS_PORT']}/metrics"
        return SinkProcess(process, log_path, url)

    yield spawn
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, sink: SinkProcess, timeout_s: float = 90.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert sink.process.poll() is None, f"sink exited while waiting for {what}:\n{sink.logs()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{sink.logs()}"
        await asyncio.sleep(0.1)


def many_logins(topics: Topics, users: int, per_user: int) -> list[Message]:
    """``users`` people, each with ``per_user`` logins in visits of three logins."""
    return [
        login_message(
            topics.visits, 1000 + u, minute, f"visit-{u}-{minute // 3}", is_new=minute % 3 == 0
        )
        for u in range(users)
        for minute in range(per_user)
    ]


async def count_logins(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM logins"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await connection.close()


@pytest.mark.slow
async def test_sigkill_during_a_batch_then_restart_loses_nothing_and_duplicates_nothing(
    kafka_bootstrap: str,
    topics: Topics,
    spawn_sink: SpawnSink,
    analytics_target: AnalyticsTarget,
    tmp_path: Path,
) -> None:
    target = analytics_target
    stream = many_logins(topics, users=60, per_user=30)
    await produce(kafka_bootstrap, stream, per_transaction=200)
    group = {"ANALYTICS_GROUP_ID": "crash-test", "ANALYTICS_BATCH_MAX_RECORDS": "100"}

    # The fourth batch halts inside its transaction, its logins inserted, its aggregates and
    # its position not yet written: the kill lands there, on either store.
    marker = tmp_path / "halted.json"
    first = spawn_sink(
        target,
        module="tests.fixtures.halting_sink",
        HALT_AFTER_WRITES="3",
        HALT_MARKER=str(marker),
        **group,
    )
    await wait_for(_exists(marker), "the sink to halt inside a batch", first)
    halted = orjson.loads(marker.read_bytes())
    assert halted["in_flight"] > 0
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    port = target.port()
    # The batch in flight left nothing; the batches before it are all there.
    assert await fetch_one(port, "SELECT count(*) FROM logins") == halted["written"]
    await assert_aggregates_match_logins(port)
    await target.close()  # DuckDB admits one process at a time: the sink's turn
    remaining = len(stream) - halted["written"]
    assert 0 < remaining < len(stream)

    second = spawn_sink(target, **group)
    logins_written = "wifi_sink_analytics_rows_written_total"
    await wait_for(
        lambda: _sample_at_least(second, logins_written, remaining, table="logins"),
        "every login after the restart",
        second,
    )
    await asyncio.sleep(1.0)  # anything duplicated would show up now
    assert await _sample(second, logins_written, table="logins") == remaining
    # It resumed from the positions stored with the rows: nothing already stored was re-read.
    assert await _sample(second, "wifi_sink_analytics_duplicate_records_total") == 0
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=30) == 0, second.logs()

    port = target.port()
    assert await fetch_one(port, "SELECT count(*) FROM logins") == len(stream)
    assert await fetch_one(port, "SELECT count(DISTINCT event_id) FROM logins") == len(stream)
    assert await fetch_one(port, "SELECT sum(logins) FROM visits") == len(stream)
    assert await fetch_one(port, "SELECT sum(logins) FROM venue_daily") == len(stream)
    assert await fetch_one(port, "SELECT sum(new_visits) FROM venue_daily") == 60 * 10
    assert await fetch_one(port, "SELECT sum(unique_visitors) FROM venue_daily") == 60
    await assert_aggregates_match_logins(port)
    assert '"level":"error"' not in second.logs()


def _exists(path: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(path.exists)

    return check


async def _sample(sink: SinkProcess, name: str, **labels: str) -> float:
    """The value of one sample the sink exports (0 when absent or not answering yet)."""
    try:
        body = await _scrape(sink)
    except aiohttp.ClientError:
        return 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def _sample_at_least(sink: SinkProcess, name: str, value: float, **labels: str) -> bool:
    return await _sample(sink, name, **labels) >= value


async def _at_least(url: str, count: int) -> bool:
    return await count_logins(url) >= count


@pytest.mark.slow
@pytest.mark.postgres
async def test_database_outage_backs_off_and_resumes_without_losing_a_record(
    kafka_bootstrap: str,
    topics: Topics,
    spawn_sink: SpawnSink,
    postgres_server: str,
) -> None:
    from tests.fixtures.postgres import create_database, drop_database

    target = AnalyticsTarget("postgresql", await create_database(postgres_server))
    name = target.url.rpartition("/")[2]
    first_half = many_logins(topics, users=20, per_user=5)
    await produce(kafka_bootstrap, first_half)
    sink = spawn_sink(target, ANALYTICS_RETRY_MAX_BACKOFF_MS="500")
    admin = await asyncpg.connect(postgres_server)
    try:
        await wait_for(lambda: _at_least(target.url, len(first_half)), "the first logins", sink)
        # The outage: no new connections, and the sink's own connection cut.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        second_half = [login_message(topics.visits, 5000 + u, 0, f"later-{u}") for u in range(40)]
        await produce(kafka_bootstrap, second_half)
        await wait_for(lambda: _retried(sink, 3), "retries during the outage", sink)
        assert sink.process.poll() is None

        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        total = len(first_half) + len(second_half)
        await wait_for(lambda: _at_least(target.url, total), "every login after the outage", sink)
        port = target.port()
        assert await fetch_one(port, "SELECT sum(logins) FROM venue_daily") == total
        await assert_aggregates_match_logins(port)
        assert b"wifi_sink_analytics_store_up 1.0" in await _scrape(sink)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await target.close()
        await drop_database(postgres_server, target.url)


async def _scrape(sink: SinkProcess) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(sink.metrics_url) as response:
        return await response.read()


async def _retried(sink: SinkProcess, at_least: int) -> bool:
    try:
        body = await _scrape(sink)
    except aiohttp.ClientError:
        return False
    for line in body.splitlines():
        if line.startswith(b"wifi_sink_analytics_retries_total "):
            return float(line.split()[1]) >= at_least
    return False


@pytest.mark.postgres
async def test_two_instances_share_the_partitions_and_write_each_login_once(
    kafka_bootstrap: str, topics: Topics, postgres_server: str
) -> None:
    from tests.fixtures.postgres import create_database, drop_database

    target = AnalyticsTarget("postgresql", await create_database(postgres_server))
    env = sink_env(kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0")
    first_half = many_logins(topics, users=30, per_user=4)
    second_half = [login_message(topics.visits, 7000 + u, 0, f"second-{u}") for u in range(60)]
    total = len(first_half) + len(second_half)
    stops = [asyncio.Event(), asyncio.Event()]
    tasks: list[asyncio.Task[int]] = []
    metrics = [AnalyticsMetrics(), AnalyticsMetrics()]

    def start(n: int) -> None:
        settings = AnalyticsSettings.load(None, env)
        tasks.append(
            asyncio.create_task(
                serve(settings, stop=stops[n], handle_signals=False, metrics=metrics[n])
            )
        )

    async def landed(count: int) -> None:
        deadline = time.monotonic() + 60
        while await count_logins(target.url) < count:
            assert not any(task.done() for task in tasks), "a sink stopped by itself"
            assert time.monotonic() < deadline, f"{await count_logins(target.url)} of {count}"
            await asyncio.sleep(0.1)

    try:
        await produce(kafka_bootstrap, first_half)
        start(0)
        await landed(len(first_half))
        start(1)  # a rebalance: some partitions move, the newcomer claims them in the database
        deadline = time.monotonic() + 60
        while not metrics[1].registry.get_sample_value("wifi_sink_analytics_owned_partitions"):
            assert time.monotonic() < deadline, "the second instance claimed no partition"
            await asyncio.sleep(0.1)
        await produce(kafka_bootstrap, second_half)
        await landed(total)
        await asyncio.sleep(1.0)
    finally:
        for stop in stops:
            stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results == [0, 0]

    port = target.port()
    try:
        assert await fetch_one(port, "SELECT count(*) FROM logins") == total
        assert await fetch_one(port, "SELECT sum(logins) FROM venue_daily") == total
        await assert_aggregates_match_logins(port)
        epochs = await port.fetch("SELECT max(epoch) FROM sink_offsets")
        assert epochs[0][0] >= 1
        written = [
            m.registry.get_sample_value(
                "wifi_sink_analytics_rows_written_total", {"table": "logins"}
            )
            for m in metrics
        ]
        assert all(written), f"each instance wrote logins: {written}"
    finally:
        await target.close()
        await drop_database(postgres_server, target.url)


@pytest.mark.postgres
async def test_a_batch_under_a_stale_epoch_is_refused_and_the_partition_reclaimed(
    kafka_bootstrap: str, topics: Topics, postgres_server: str
) -> None:
    from tests.fixtures.postgres import create_database, drop_database

    target = AnalyticsTarget("postgresql", await create_database(postgres_server))
    env = sink_env(kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0")
    before = many_logins(topics, users=10, per_user=3)
    after = [login_message(topics.visits, 8000 + u, 0, f"after-{u}") for u in range(30)]
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    task = asyncio.create_task(
        serve(AnalyticsSettings.load(None, env), stop=stop, handle_signals=False, metrics=metrics)
    )
    port = target.port()
    try:
        await produce(kafka_bootstrap, before)
        while await count_logins(target.url) < len(before):
            assert not task.done()
            await asyncio.sleep(0.1)
        # What another instance's claim does: this instance's epochs are stale from now on.
        await port.connect()
        await port.execute("UPDATE sink_offsets SET epoch = epoch + 1")
        await produce(kafka_bootstrap, after)
        deadline = time.monotonic() + 60
        while await count_logins(target.url) < len(before) + len(after):
            assert not task.done()
            assert time.monotonic() < deadline, "the sink did not recover its partitions"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    try:
        fenced = metrics.registry.get_sample_value(
            "wifi_sink_analytics_batches_total", {"outcome": "fenced"}
        )
        assert fenced is not None
        assert fenced >= 1
        total = len(before) + len(after)
        assert await fetch_one(port, "SELECT count(*) FROM logins") == total
        assert await fetch_one(port, "SELECT sum(logins) FROM venue_daily") == total
        await assert_aggregates_match_logins(port)
    finally:
        await target.close()
        await drop_database(postgres_server, target.url)


async def store_positions(target: AnalyticsTarget, topic: str, next_offset: int) -> str:
    """Store ``next_offset`` for every partition of ``topic`` under a new group; returns it."""
    group = f"sink-test-{uuid.uuid4().hex[:8]}"
    store = target.store(group_id=group)
    claims = await store.claim(topic, list(range(PARTITIONS)))
    await store.write([], [Position(topic, c.partition, c.epoch, next_offset) for c in claims])
    await target.close()
    return group


async def test_a_stored_position_past_the_end_of_a_recreated_topic_reads_it_from_the_start(
    kafka_bootstrap: str, topics: Topics, analytics_target: AnalyticsTarget, run_sink_until: RunSink
) -> None:
    # Positions left by an earlier life of these topics (another cluster, a deleted topic).
    group = await store_positions(analytics_target, topics.visits, 1_000)
    stream = known_stream(topics)
    await produce(kafka_bootstrap, stream, per_transaction=3)

    await run_sink_until(analytics_target, len(stream), ANALYTICS_GROUP_ID=group)

    assert await fetch_one(analytics_target.port(), "SELECT count(*) FROM logins") == 6


async def test_a_kafka_error_while_positioning_a_claim_is_retried_not_a_crash(
    kafka_bootstrap: str,
    topics: Topics,
    analytics_target: AnalyticsTarget,
    run_sink_until: RunSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stored positions, so the claim asks Kafka where each partition ends.
    group = await store_positions(analytics_target, topics.visits, 0)
    stream = known_stream(topics)
    await produce(kafka_bootstrap, stream, per_transaction=3)
    # What a partition without a leader (a broker restarting) answers, once.
    end_offsets = AIOKafkaConsumer.end_offsets
    failures = [KafkaTimeoutError()]

    async def first_call_times_out(self: AIOKafkaConsumer, partitions: Any) -> Any:
        if failures:
            raise failures.pop()
        return await end_offsets(self, partitions)

    monkeypatch.setattr(AIOKafkaConsumer, "end_offsets", first_call_times_out)

    metrics = await run_sink_until(analytics_target, len(stream), ANALYTICS_GROUP_ID=group)

    assert not failures
    retries = metrics.registry.get_sample_value("wifi_sink_analytics_retries_total")
    assert retries is not None
    assert retries >= 1
    assert await fetch_one(analytics_target.port(), "SELECT count(*) FROM logins") == 6


async def test_a_batch_retried_after_a_store_failure_counts_its_dead_letters_once(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    # One partition (one key), the record that is not a login first: it is in every attempt.
    stream = [
        (topics.visits, b"1", b"{this is not json"),
        login_message(topics.visits, 1, 0, "u1-a"),
        login_message(topics.visits, 1, 1, "u1-a"),
    ]
    await produce(kafka_bootstrap, stream)
    # The database refuses the first three attempts (what an outage does), then takes them.
    write = AnalyticsStore.write
    failures = [StoreUnavailable("refused")] * 3

    async def refused_three_times(self: AnalyticsStore, *args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await write(self, *args)

    monkeypatch.setattr(AnalyticsStore, "write", refused_three_times)
    settings = AnalyticsSettings.load(
        None,
        sink_env(
            kafka_bootstrap,
            target,
            topics,
            ANALYTICS_METRICS_PORT="0",
            ANALYTICS_RETRY_MAX_BACKOFF_MS="200",
        ),
    )
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, handle_signals=False, metrics=metrics))
    registry = metrics.registry
    try:
        deadline = time.monotonic() + 60
        while (
            registry.get_sample_value("wifi_sink_analytics_rows_written_total", {"table": "logins"})
            != 2
        ):
            assert not task.done(), "the sink stopped by itself"
            assert time.monotonic() < deadline, "the logins were not written"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    assert not failures
    assert registry.get_sample_value("wifi_sink_analytics_retries_total") == 3
    dead = await consume(kafka_bootstrap, topics.dlq, count=1, settle_s=1.0)
    assert len(dead) == 1
    rejected = registry.get_sample_value(
        "wifi_sink_analytics_rejected_records_total", {"reason": "invalid_json"}
    )
    assert rejected == 1, "one record went to the dead-letter topic, once"


async def test_the_retry_backoff_doubles_while_the_store_stays_down(
    kafka_bootstrap: str,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await produce(kafka_bootstrap, [login_message(topics.visits, u, 0, f"v{u}") for u in range(5)])
    attempts: list[float] = []

    async def down(self: AnalyticsStore, *args: Any) -> Any:
        attempts.append(time.monotonic())
        raise StoreUnavailable("refused")

    # The poll after a rewind comes back empty when the fetch from the rewound position is
    # not back yet (a fetch for the old position still waiting on the broker): made certain.
    getmany = AIOKafkaConsumer.getmany

    async def empty_after_a_rewind(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        if len(empty_polls) < len(attempts):  # the first poll since the last failed write
            empty_polls.append(len(attempts))
            await asyncio.sleep(kwargs.get("timeout_ms", 0) / 1000)
            return {}
        return await getmany(self, *args, **kwargs)

    empty_polls: list[int] = []
    monkeypatch.setattr(AnalyticsStore, "write", down)
    monkeypatch.setattr(AIOKafkaConsumer, "getmany", empty_after_a_rewind)
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    settings = AnalyticsSettings.load(
        None, sink_env(kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0")
    )
    caplog.set_level(logging.WARNING, logger=service.__name__)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, handle_signals=False))
    try:
        deadline = time.monotonic() + 20
        while len(attempts) < 6:
            assert not task.done(), "the sink stopped by itself"
            assert time.monotonic() < deadline, f"{len(attempts)} attempts"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    backoffs = [
        getattr(r, "backoff_s", None)
        for r in caplog.records
        if r.getMessage() == "batch not written, retrying"
    ]
    assert backoffs[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    gaps_s = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(gap >= (wait or 0) for gap, wait in zip(gaps_s, backoffs, strict=False))


async def test_a_record_too_large_to_dead_letter_whole_is_cut_to_fit_and_the_sink_goes_on(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    # Just under what the producer takes: with the dead-letter headers it would not fit, and
    # a letter the producer refuses failed the batch at every retry.
    big = b"x" * 1_048_450
    stream = [(topics.visits, b"1", big), login_message(topics.visits, 1, 0, "u1-a")]
    await produce(kafka_bootstrap, stream)
    settings = AnalyticsSettings.load(
        None, sink_env(kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0")
    )
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, handle_signals=False, metrics=metrics))
    registry = metrics.registry
    try:
        deadline = time.monotonic() + 30
        while not registry.get_sample_value(
            "wifi_sink_analytics_rows_written_total", {"table": "logins"}
        ):
            assert not task.done(), "the sink stopped by itself"
            assert time.monotonic() < deadline, "the sink is stuck on the large record"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    (letter,) = await consume(kafka_bootstrap, topics.dlq, count=1, settle_s=1.0)
    headers = dict(letter.headers)
    assert headers["dlq-reason"] == b"invalid_json"
    assert headers["dlq-value-truncated"] == str(len(big)).encode()
    assert headers["source-offset"] == b"0"
    assert letter.value is not None
    assert 0 < len(letter.value) < len(big)
    assert big.startswith(letter.value)


async def run_sink_until_written(
    settings: AnalyticsSettings, logins: int, timeout_s: float = 30.0
) -> AnalyticsMetrics:
    """Runs the sink in this process until it has written ``logins`` logins, then stops it."""
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, handle_signals=False, metrics=metrics))
    registry = metrics.registry
    try:
        deadline = time.monotonic() + timeout_s
        while (
            registry.get_sample_value("wifi_sink_analytics_rows_written_total", {"table": "logins"})
            or 0
        ) < logins:
            assert not task.done(), "the sink stopped by itself"
            assert time.monotonic() < deadline, "the sink is stuck"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    return metrics


async def test_a_letter_the_dlq_topic_refuses_as_too_large_is_cut_until_it_fits(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics()
    await ensure_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_partitions=1),
        [
            TopicSpec(topics.visits),
            TopicSpec(topics.late),
            # A smaller limit on the dead-letter topic than the producer's 1 MiB (an
            # operator's, or a managed cluster's): the broker refuses a letter that fits 1 MiB.
            TopicSpec(topics.dlq, configs={"max.message.bytes": "65536"}),
        ],
    )
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    bad = b"x" * 100_000
    await produce(
        kafka_bootstrap, [(topics.visits, b"1", bad), login_message(topics.visits, 1, 0, "u1-a")]
    )
    settings = AnalyticsSettings.load(
        None,
        sink_env(
            kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0", KAFKA_TOPIC_PARTITIONS="1"
        ),
    )

    metrics = await run_sink_until_written(settings, 1)

    assert await fetch_one(target.port(), "SELECT count(*) FROM logins") == 1
    await target.close()
    (letter,) = await consume(kafka_bootstrap, topics.dlq, count=1, settle_s=1.0)
    headers = dict(letter.headers)
    assert headers["dlq-reason"] == b"invalid_json"
    assert headers["source-topic"] == topics.visits.encode()
    assert headers["source-offset"] == b"0"
    assert headers["dlq-value-truncated"] == str(len(bad)).encode()
    assert letter.value is not None
    assert 30_000 < len(letter.value) < 65_536
    assert bad.startswith(letter.value)
    rejected = metrics.registry.get_sample_value(
        "wifi_sink_analytics_rejected_records_total", {"reason": "invalid_json"}
    )
    assert rejected == 1


async def test_a_wedged_dead_letter_producer_is_replaced_and_the_letter_delivered(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    stream = [(topics.visits, b"1", b"{this is not json"), login_message(topics.visits, 1, 0, "u1")]
    await produce(kafka_bootstrap, stream)
    # What an idempotent producer does after a broker outage (aio-libs/aiokafka#1017): the
    # first producer fails every send from then on; a new one sends again.
    send = AIOKafkaProducer.send
    wedged: list[AIOKafkaProducer] = []

    async def first_producer_wedged(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        if not wedged:
            wedged.append(self)
        if self is wedged[0]:
            raise OutOfOrderSequenceNumber()
        return await send(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaProducer, "send", first_producer_wedged)
    settings = AnalyticsSettings.load(
        None, sink_env(kafka_bootstrap, target, topics, ANALYTICS_METRICS_PORT="0")
    )

    await run_sink_until_written(settings, 1)

    (letter,) = await consume(kafka_bootstrap, topics.dlq, count=1, settle_s=1.0)
    assert dict(letter.headers)["dlq-reason"] == b"invalid_json"
    assert letter.value == stream[0][2]
    assert await fetch_one(target.port(), "SELECT count(*) FROM logins") == 1
    await target.close()


async def test_letters_sent_together_without_a_producer_start_one_and_leave_none_running(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No producer: the sink's first letters, or the next try after a replacement failed.
    await ensure_topics(KafkaSettings(bootstrap_servers=kafka_bootstrap), [TopicSpec(topics.dlq)])
    start, stop = AIOKafkaProducer.start, AIOKafkaProducer.stop
    started: list[AIOKafkaProducer] = []
    stopped: list[AIOKafkaProducer] = []

    async def counted_start(self: AIOKafkaProducer) -> None:
        started.append(self)
        await start(self)

    async def counted_stop(self: AIOKafkaProducer) -> None:
        stopped.append(self)
        await stop(self)

    monkeypatch.setattr(AIOKafkaProducer, "start", counted_start)
    monkeypatch.setattr(AIOKafkaProducer, "stop", counted_stop)
    letters = DeadLetterProducer(
        lambda: AIOKafkaProducer(bootstrap_servers=kafka_bootstrap),
        topic=topics.dlq,
        max_bytes=1 << 20,
    )
    rejected = [
        (
            ConsumerRecord(topics.visits, 0, n, 0, 0, b"k", b"{not json", None, 0, 9, []),
            RejectedRecord(Reason.INVALID_JSON, "value is not JSON"),
        )
        for n in range(4)
    ]
    try:
        assert await letters.publish(rejected) == [None] * 4
    finally:
        await letters.stop()
    assert len(started) == 1
    assert stopped == started
    assert len(await consume(kafka_bootstrap, topics.dlq, count=4)) == 4


async def test_kafka_unreachable_at_start_is_waited_out_not_a_crash(
    kafka_bootstrap: str,
    topics: Topics,
    analytics_target: AnalyticsTarget,
    run_sink_until: RunSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = known_stream(topics)
    await produce(kafka_bootstrap, stream, per_transaction=3)
    # What a broker restarting with the sink answers: the first two attempts cannot connect.
    failures = [KafkaConnectionError(), KafkaConnectionError()]

    async def unreachable_twice(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await ensure_topics(*args)

    monkeypatch.setattr(service, "ensure_topics", unreachable_twice)

    metrics = await run_sink_until(analytics_target, len(stream))

    assert not failures
    assert metrics.registry.get_sample_value("wifi_sink_analytics_retries_total") == 2
    assert await fetch_one(analytics_target.port(), "SELECT count(*) FROM logins") == 6


async def test_a_sink_started_without_a_broker_waits_and_stops_cleanly(
    topics: Topics, tmp_path: Path
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'a.duckdb'}")
    env = sink_env(f"127.0.0.1:{free_port()}", target, topics, ANALYTICS_METRICS_PORT="0")
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    task = asyncio.create_task(
        serve(AnalyticsSettings.load(None, env), stop=stop, handle_signals=False, metrics=metrics)
    )
    await asyncio.sleep(2)
    assert not task.done(), "the sink exited while Kafka was unreachable"
    stop.set()
    assert await asyncio.wait_for(task, 30) == 0
    retries = metrics.registry.get_sample_value("wifi_sink_analytics_retries_total")
    assert retries is not None
    assert retries >= 2
