"""``wifi-bridge replay`` on a real broker, and on a real DuckDB file and PostgreSQL database.

A consumer group's committed offsets move to a time, the start or the end (only while the group
has no member); the analytics sink's stored positions move while the sink keeps running, which
then reads the topics again without changing a table.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence

import confluent_kafka
import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from bridge import cli
from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.sinks.analytics.metrics import AnalyticsMetrics
from consumers.sinks.analytics.service import serve
from consumers.sinks.analytics.settings import AnalyticsSettings
from devkafka.broker import free_port
from tests.fixtures.analytics import AnalyticsTarget, assert_aggregates_match_logins, snapshot
from tests.fixtures.kafka import unique_topic
from tests.fixtures.logins import canonical, encoded

pytestmark = pytest.mark.kafka

PARTITIONS = 3
HOUR_MS = 3_600_000


async def make_topic(bootstrap: str) -> str:
    topic = unique_topic("replay")
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=PARTITIONS)
    await ensure_topics(kafka, [TopicSpec(topic)])
    return topic


async def produce(bootstrap: str, topic: str, values: Sequence[bytes], *, at_ms: int) -> None:
    """One record per value, keyed round the partitions, all stamped ``at_ms``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for n, value in enumerate(values):
            await producer.send_and_wait(
                topic, value, key=str(n).encode(), partition=n % PARTITIONS, timestamp_ms=at_ms
            )
    finally:
        await producer.stop()


def consume_and_commit(bootstrap: str, topic: str, group: str, count: int) -> None:
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    seen, deadline = 0, time.monotonic() + 30
    while seen < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            seen += 1
    consumer.commit(asynchronous=False)
    consumer.close()
    assert seen == count


def committed(bootstrap: str, group: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)]).values()
    return {tp.partition: tp.offset for tp in future.result(30).topic_partitions}


def replay(bootstrap: str, *arguments: str) -> int:
    return cli.main(["replay", *arguments, "--kafka-bootstrap-servers", bootstrap])


async def test_a_group_moves_to_the_first_records_at_a_time(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, group = await make_topic(kafka_bootstrap), f"replay-{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    await produce(kafka_bootstrap, topic, [b"old"] * 6, at_ms=now_ms - 3 * HOUR_MS)
    await produce(kafka_bootstrap, topic, [b"new"] * 9, at_ms=now_ms - HOUR_MS)
    await asyncio.to_thread(consume_and_commit, kafka_bootstrap, topic, group, 15)
    assert committed(kafka_bootstrap, group) == {0: 5, 1: 5, 2: 5}

    assert replay(kafka_bootstrap, "group", group, "--topics", topic, "--ago", "2h") == 0
    assert "dry run: nothing changed" in capsys.readouterr().out
    assert committed(kafka_bootstrap, group) == {0: 5, 1: 5, 2: 5}

    code = replay(kafka_bootstrap, "group", group, "--topics", topic, "--ago", "2h", "--execute")
    assert code == 0
    out = capsys.readouterr().out
    assert "9 records to read again" in out
    assert committed(kafka_bootstrap, group) == {0: 2, 1: 2, 2: 2}  # the old records stay read

    # Back to where it was: the 9 records it read once and would now read again.
    code = replay(
        kafka_bootstrap,
        "group",
        group,
        "--topics",
        topic,
        "--to",
        "end",
        "--execute",
        "--allow-skip",
    )
    assert code == 0
    assert committed(kafka_bootstrap, group) == {0: 5, 1: 5, 2: 5}


async def test_a_move_past_records_not_read_yet_is_refused_unless_skipping_is_allowed(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, group = await make_topic(kafka_bootstrap), f"replay-{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    await produce(kafka_bootstrap, topic, [b"read"] * 6, at_ms=now_ms - 3 * HOUR_MS)
    await asyncio.to_thread(consume_and_commit, kafka_bootstrap, topic, group, 6)
    await produce(kafka_bootstrap, topic, [b"unread"] * 9, at_ms=now_ms - HOUR_MS)
    assert committed(kafka_bootstrap, group) == {0: 2, 1: 2, 2: 2}  # 3 unread on each

    # The dry run shows the plan, the skip marked on each partition.
    assert replay(kafka_bootstrap, "group", group, "--topics", topic, "--to", "end") == 0
    out = capsys.readouterr().out
    assert out.count("SKIP 3 (never read)") == PARTITIONS
    assert "SKIPS 9 records not read yet" in out
    assert "--allow-skip" in out

    # A time later than where the group is skips too: every record is older than 30 minutes.
    for where in (["--to", "end"], ["--ago", "30m"]):
        code = replay(kafka_bootstrap, "group", group, "--topics", topic, *where, "--execute")
        assert code == 1
        error = capsys.readouterr().err
        assert "would skip 9 records not read yet" in error
        for partition in range(PARTITIONS):
            assert f"{topic}[{partition}] 3" in error
        assert "--allow-skip" in error
        assert committed(kafka_bootstrap, group) == {0: 2, 1: 2, 2: 2}

    code = replay(
        kafka_bootstrap,
        "group",
        group,
        "--topics",
        topic,
        "--to",
        "end",
        "--execute",
        "--allow-skip",
    )
    assert code == 0
    assert committed(kafka_bootstrap, group) == {0: 5, 1: 5, 2: 5}


async def test_a_group_with_a_running_consumer_is_not_moved(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, group = await make_topic(kafka_bootstrap), f"replay-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap, topic, [b"x"] * 3, at_ms=int(time.time() * 1000))
    await asyncio.to_thread(consume_and_commit, kafka_bootstrap, topic, group, 3)
    member = confluent_kafka.Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    member.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        while not member.assignment() and time.monotonic() < deadline:
            member.poll(0.2)
        assert member.assignment()
        code = replay(
            kafka_bootstrap, "group", group, "--topics", topic, "--to", "beginning", "--execute"
        )
    finally:
        member.close()
    assert code == 1
    assert "active member" in capsys.readouterr().err
    assert committed(kafka_bootstrap, group) == {0: 1, 1: 1, 2: 1}


def test_the_pipeline_group_and_a_bad_time_are_refused_naming_the_problem(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = replay(kafka_bootstrap, "group", "wifi-pipeline", "--topics", "t", "--to", "end")
    assert code == 2
    assert "the pipeline's group" in capsys.readouterr().err
    code = replay(kafka_bootstrap, "group", "g", "--topics", "t", "--to", "yesterday")
    assert code == 2
    assert "--to must be beginning, end or a time" in capsys.readouterr().err
    code = replay(kafka_bootstrap, "group", "g", "--topics", "t", "--ago", "3 fortnights")
    assert code == 2
    assert "--ago must be a duration" in capsys.readouterr().err


def group_state(bootstrap: str, group: str) -> confluent_kafka.ConsumerGroupState:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.describe_consumer_groups([group]).values()
    state: confluent_kafka.ConsumerGroupState = future.result(30).state
    return state


async def test_a_group_kafka_does_not_know_is_refused_not_created_unless_asked_to(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, group = await make_topic(kafka_bootstrap), f"replay-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap, topic, [b"x"] * 6, at_ms=int(time.time() * 1000))
    await asyncio.to_thread(consume_and_commit, kafka_bootstrap, topic, group, 6)
    mistyped = group + "x"

    for execute in ([], ["--execute"]):
        code = replay(
            kafka_bootstrap, "group", mistyped, "--topics", topic, "--to", "beginning", *execute
        )
        assert code == 1
        error = capsys.readouterr().err
        assert f"group {mistyped} does not exist" in error
        assert "--create" in error
    assert committed(kafka_bootstrap, mistyped) == {}
    assert group_state(kafka_bootstrap, mistyped) is confluent_kafka.ConsumerGroupState.DEAD

    # A group that exists but never read these topics is no more a target than a mistyped one.
    other = await make_topic(kafka_bootstrap)
    code = replay(kafka_bootstrap, "group", group, "--topics", other, "--to", "beginning")
    assert code == 1
    assert f"group {group} has committed no offsets on {other}" in capsys.readouterr().err

    # On purpose: a new consumer group that is to start at the beginning.
    code = replay(
        kafka_bootstrap,
        "group", mistyped, "--topics", topic, "--to", "beginning", "--execute", "--create",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert committed(kafka_bootstrap, mistyped) == {0: 0, 1: 0, 2: 0}


async def test_a_renamed_pipeline_group_is_refused_by_its_changelog_topic(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, group = await make_topic(kafka_bootstrap), f"pipeline-eu-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS)
    await ensure_topics(kafka, [TopicSpec(f"{group}-changelog")])  # as the pipeline names it
    await produce(kafka_bootstrap, topic, [b"x"] * 6, at_ms=int(time.time() * 1000))
    await asyncio.to_thread(consume_and_commit, kafka_bootstrap, topic, group, 6)

    code = replay(
        kafka_bootstrap, "group", group, "--topics", topic, "--to", "beginning", "--execute"
    )
    assert code == 2
    assert f"{group} is the pipeline's group" in capsys.readouterr().err
    assert committed(kafka_bootstrap, group) == {0: 2, 1: 2, 2: 2}


def login(topic: str, user_id: int, minute: int) -> tuple[str, bytes, bytes]:
    record = canonical(user_id=user_id, minute=minute, visit_id=f"v{user_id}", is_new=minute == 0)
    return topic, str(user_id).encode(), encoded(record)


async def test_a_running_analytics_sink_reads_its_topics_again_and_counts_nothing_twice(
    kafka_bootstrap: str,
    analytics_target: AnalyticsTarget,
    capsys: pytest.CaptureFixture[str],
) -> None:
    visits, late = await make_topic(kafka_bootstrap), await make_topic(kafka_bootstrap)
    dlq = await make_topic(kafka_bootstrap)
    stream = [login(visits, user, minute) for user in range(1, 9) for minute in (0, 5)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    for topic, key, value in stream:
        await producer.send_and_wait(topic, value, key=key)
    group = f"sink-replay-{uuid.uuid4().hex[:8]}"
    settings = AnalyticsSettings.load(
        None,
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "ANALYTICS_URL": analytics_target.url,
            "ANALYTICS_TOPICS": f"{visits},{late}",
            "ANALYTICS_TOPIC_DLQ": dlq,
            "ANALYTICS_GROUP_ID": group,
            "ANALYTICS_BATCH_WAIT_MS": "50",
            "ANALYTICS_METRICS_PORT": str(free_port()),
            "ANALYTICS_METRICS_HOST": "127.0.0.1",
        },
    )
    metrics, stop = AnalyticsMetrics(), asyncio.Event()
    sink = asyncio.create_task(serve(settings, stop=stop, handle_signals=False, metrics=metrics))

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    async def until(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert not sink.done(), "the sink stopped by itself"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)

    written, duplicates = (
        "wifi_sink_analytics_rows_written_total",
        "wifi_sink_analytics_duplicate_records_total",
    )
    try:
        await until("the first pass", lambda: sample(written, table="logins") == len(stream))
        before = await snapshot(analytics_target.port())
        await analytics_target.close()  # the DuckDB file is the sink's again

        code = await asyncio.to_thread(
            replay,
            kafka_bootstrap,
            "analytics",
            "--analytics-url",
            analytics_target.url,
            "--group",
            group,
            "--topics",
            f"{visits},{late}",
            "--to",
            "beginning",
            "--execute",
        )
        assert code == 0, capsys.readouterr().err
        assert f"{len(stream)} records to read again" in capsys.readouterr().out
        # No new record arrives: the sink notices between batches that its claims moved,
        # claims the partitions again and reads them from the new positions.
        await until("the second pass", lambda: sample(duplicates) == len(stream))
        assert sample(written, table="logins") == len(stream)
        # A newcomer after the replay is written once, as usual.
        newcomer = login(visits, 99, 0)
        await producer.send_and_wait(newcomer[0], newcomer[2], key=newcomer[1])
        await until("the newcomer", lambda: sample(written, table="logins") == len(stream) + 1)
        assert sample(duplicates) == len(stream)
    finally:
        await producer.stop()
        stop.set()
        assert await asyncio.wait_for(sink, 30) == 0
    after = await snapshot(analytics_target.port())
    newcomers = [row for row in after["logins"] if row[1] == "99"]
    assert len(newcomers) == 1
    assert [row for row in after["logins"] if row[1] != "99"] == before["logins"]
    assert set(before["visits"]) < set(after["visits"])
    assert len(after["visits"]) == len(before["visits"]) + 1
    await assert_aggregates_match_logins(analytics_target.port())


async def test_analytics_positions_move_to_a_time_and_show_before_they_move(
    kafka_bootstrap: str,
    analytics_target: AnalyticsTarget,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = await make_topic(kafka_bootstrap)
    now_ms = int(time.time() * 1000)
    await produce(kafka_bootstrap, topic, [b"{}"] * 3, at_ms=now_ms - 3 * HOUR_MS)
    await produce(kafka_bootstrap, topic, [b"{}"] * 6, at_ms=now_ms - HOUR_MS)
    group = f"sink-replay-{uuid.uuid4().hex[:8]}"
    store = analytics_target.store(group_id=group)
    await store.claim(topic, range(PARTITIONS))
    await analytics_target.close()
    arguments = ["--analytics-url", analytics_target.url, "--group", group, "--topics", topic]

    code = await asyncio.to_thread(replay, kafka_bootstrap, "analytics", *arguments, "--ago", "2h")
    assert code == 0
    assert "dry run" in capsys.readouterr().out
    store = analytics_target.store(group_id=group)
    assert await store.positions([topic]) == {(topic, p): None for p in range(PARTITIONS)}

    # The sink has read nothing yet: the 3 older records would never be read.
    code = await asyncio.to_thread(
        replay, kafka_bootstrap, "analytics", *arguments, "--ago", "2h", "--execute"
    )
    assert code == 1
    assert "would skip 3 records not read yet" in capsys.readouterr().err
    assert await store.positions([topic]) == {(topic, p): None for p in range(PARTITIONS)}

    code = await asyncio.to_thread(
        replay, kafka_bootstrap, "analytics", *arguments, "--ago", "2h", "--execute", "--allow-skip"
    )
    assert code == 0
    assert await store.positions([topic]) == {(topic, p): 1 for p in range(PARTITIONS)}
    port = analytics_target.port()
    await port.connect()
    epochs = await port.fetch(
        "SELECT partition, epoch FROM sink_offsets WHERE consumer_group = $1 ORDER BY 1", group
    )
    assert epochs == [(p, 2) for p in range(PARTITIONS)]  # claimed once, then fenced


async def test_analytics_replay_moves_the_topics_the_sink_reads_from_its_environment(
    kafka_bootstrap: str,
    analytics_target: AnalyticsTarget,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in the sink's pod: ANALYTICS_TOPICS (the chart sets it), ANALYTICS_URL and
    # ANALYTICS_GROUP_ID in the environment, no flags.
    visits, late = await make_topic(kafka_bootstrap), await make_topic(kafka_bootstrap)
    await produce(kafka_bootstrap, visits, [b"{}"] * 6, at_ms=int(time.time() * 1000))
    group = f"sink-replay-{uuid.uuid4().hex[:8]}"
    store = analytics_target.store(group_id=group)
    await store.claim(visits, range(PARTITIONS))
    await store.claim(late, range(PARTITIONS))
    await store.move({(visits, p): 2 for p in range(PARTITIONS)})  # read to the end
    await analytics_target.close()
    monkeypatch.setenv("ANALYTICS_TOPICS", f"{visits},{late}")
    monkeypatch.setenv("ANALYTICS_URL", analytics_target.url)
    monkeypatch.setenv("ANALYTICS_GROUP_ID", group)

    code = await asyncio.to_thread(
        replay, kafka_bootstrap, "analytics", "--to", "beginning", "--execute"
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"group {group}" in out
    assert out.count(visits) == PARTITIONS
    assert out.count(late) == PARTITIONS
    assert "6 records to read again" in out
    store = analytics_target.store(group_id=group)
    moved = await store.positions([visits, late])
    assert moved == {(t, p): None for t in (visits, late) for p in range(PARTITIONS)}
