"""``wifi-bridge pipeline`` against a real broker: every input event exactly once, read
committed, across redeliveries, disorder, crashes and rebalances."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter

import confluent_kafka
import orjson
import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.pipeline.service import _partitions_with_records, _read_changelog
from tests.fixtures.kafka import unique_topic
from tests.fixtures.pipeline import Out, PipelineProcess, PipelineRig, Raw
from tests.fixtures.samples import login_body

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def event_ids(outs: list[Out], topic: str | None = None) -> Counter[str]:
    return Counter(o.record["eventId"] for o in outs if topic is None or o.topic == topic)


def test_redeliveries_are_dropped_and_relogins_form_one_visit(pipeline_rig: PipelineRig) -> None:
    rig = pipeline_rig
    rig.spawn()
    base = now_ms()
    logins = [login_body(user_id=u, at_ms=base + k * 100 + u) for k in range(3) for u in range(10)]
    rig.produce(logins)
    rig.produce(logins[:10])  # the sender posts the first login of every visit again

    outs = rig.read(count=30)

    assert len(outs) == 30
    assert {o.topic for o in outs} == {rig.topics["visits"]}
    assert max(event_ids(outs).values()) == 1
    by_user: dict[str, list[Out]] = {}
    for out in outs:
        by_user.setdefault(out.record["user"]["id"], []).append(out)
    assert len(by_user) == 10
    for user_outs in by_user.values():
        assert len({o.record["visit"]["id"] for o in user_outs}) == 1
        first = min(user_outs, key=lambda o: o.record["authenticationTime"])
        assert [o.record["visit"]["isNew"] for o in user_outs].count(True) == 1
        assert first.record["visit"]["isNew"] is True
        assert all(o.record["late"] is False for o in user_outs)
        assert all(o.key == o.record["user"]["id"].encode() for o in user_outs)
        assert all(o.headers["event-id"] == o.record["eventId"].encode() for o in user_outs)


def test_shuffled_deliveries_come_out_in_login_time_order(pipeline_rig: PipelineRig) -> None:
    rig = pipeline_rig
    rig.spawn()
    base = now_ms() + 1_000
    logins = [login_body(user_id=n % 20, at_ms=base + n * 10) for n in range(60)]
    random.Random(7).shuffle(logins)  # disorder of up to 600 ms, inside the 2 s lateness
    rig.produce(logins)

    outs = rig.read(count=60)

    assert len(outs) == 60
    assert {o.topic for o in outs} == {rig.topics["visits"]}
    for partition in {o.partition for o in outs}:
        in_partition = sorted((o for o in outs if o.partition == partition), key=lambda o: o.offset)
        times = [o.record["authenticationTime"] for o in in_partition]
        assert times == sorted(times)


def test_a_retry_three_hours_later_is_dropped_and_a_late_first_delivery_goes_to_late(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    rig.spawn()
    t0 = now_ms()
    first = login_body(user_id=1, at_ms=t0)
    rig.produce([Raw(first, t0)])
    assert len(rig.read(count=1, settle_s=0)) == 1  # released: the partition moved past t0

    # The sender retries the same login 3 hours later; and a login of 3 hours ago, whose
    # every delivery failed until now, arrives for the first time.
    late_login = login_body(user_id=1, at_ms=t0 - 3 * HOUR_MS)
    rig.produce([Raw(first, t0 + 3 * HOUR_MS), Raw(late_login, now_ms())])

    outs = rig.read(count=2)

    assert len(outs) == 2
    late = [o for o in outs if o.topic == rig.topics["late"]]
    assert len(late) == 1
    assert late[0].record["late"] is True
    assert late[0].record["visit"]["id"]  # a late login still belongs to a visit
    assert event_ids(outs)[late[0].record["eventId"]] == 1
    assert sum(event_ids(outs, rig.topics["visits"]).values()) == 1


def test_a_body_that_cannot_be_normalised_goes_to_the_dlq_with_its_reason(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    rig.spawn()
    no_time = orjson.loads(login_body(user_id=5))
    del no_time["session"]["authenticationTime"]
    rig.produce([b"not json", orjson.dumps(no_time), login_body(user_id=6, at_ms=now_ms())])

    outs = rig.read(count=3)

    dlq = [o for o in outs if o.topic == rig.topics["dlq"]]
    assert sorted(o.headers["dlq-reason"] for o in dlq) == [
        b"invalid_json",
        b"missing_authentication_time",
    ]
    assert {o.record["raw"] for o in dlq} == {b"not json", orjson.dumps(no_time)}
    assert len([o for o in outs if o.topic == rig.topics["visits"]]) == 1


def test_records_waiting_in_the_buffer_survive_a_restart(pipeline_rig: PipelineRig) -> None:
    rig = pipeline_rig
    first = rig.spawn(PIPELINE_LATENESS_S="8")
    at = now_ms()
    rig.produce([login_body(user_id=u, at_ms=at) for u in range(5)])
    deadline = time.monotonic() + 30
    while (first.metric('wifi_pipeline_records_in_total{outcome="accepted"}') or 0) < 5:
        assert time.monotonic() < deadline, first.logs()
        time.sleep(0.2)
    assert rig.stop(first) == 0
    assert rig.read(count=1, timeout_s=1, settle_s=0) == []  # still waiting: nothing released

    rig.spawn(PIPELINE_LATENESS_S="8")
    outs = rig.read(count=5, timeout_s=60)

    assert len(outs) == 5
    assert max(event_ids(outs).values()) == 1
    # They were kept in the changelog, which no retention time may clean: only compaction.
    changelog = rig.topics["group"] + "-changelog"
    admin = AdminClient({"bootstrap.servers": rig.bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, changelog)
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"


def _stream(rig: PipelineRig, *, seconds: float, rate_per_s: int, seed: int) -> list[bytes]:
    """Posts unique logins (and some redeliveries) for ``seconds``; returns the unique ones."""
    rng = random.Random(seed)
    sent: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = [
            login_body(user_id=rng.randrange(200), at_ms=now_ms() - rng.randrange(500))
            for _ in range(rate_per_s // 10)
        ]
        sent += batch
        redeliveries = rng.sample(sent, k=min(2, len(sent)))
        rig.produce(batch + redeliveries)
        time.sleep(0.1)
    return sent


def _expected_ids(bodies: list[bytes]) -> set[str]:
    from bridge.event import identify

    return {identify(orjson.loads(body)).event_id for body in bodies}


def test_sigkill_during_a_stream_loses_and_duplicates_nothing(pipeline_rig: PipelineRig) -> None:
    rig = pipeline_rig
    running = rig.spawn()
    sent: list[bytes] = []
    producer = threading.Thread(
        target=lambda: sent.extend(_stream(rig, seconds=15, rate_per_s=100, seed=1))
    )
    producer.start()
    for pause_s in (3.0, 4.0, 3.0):
        time.sleep(pause_s)
        rig.kill(running)
        running = rig.spawn(wait=False)  # the same instance id: fences its predecessor
    producer.join()
    expected = _expected_ids(sent)

    outs = rig.read(count=len(expected), timeout_s=120)

    got = event_ids(outs)
    assert set(got) == expected, running.logs()
    assert max(got.values()) == 1
    assert not [o for o in outs if o.topic == rig.topics["dlq"]]


def test_two_instances_rebalancing_during_a_stream_emit_each_event_once(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    a = rig.spawn("a")
    sent: list[bytes] = []
    producer = threading.Thread(
        target=lambda: sent.extend(_stream(rig, seconds=16, rate_per_s=100, seed=2))
    )
    producer.start()
    time.sleep(3)
    b = rig.spawn("b", wait=False)  # joins: partitions move from a to b
    time.sleep(4)
    assert rig.stop(a) == 0  # leaves: b takes everything once a's session ends
    time.sleep(3)
    rig.spawn("c", wait=False)  # and another one joins
    producer.join()
    expected = _expected_ids(sent)

    outs = rig.read(count=len(expected), timeout_s=120)

    got = event_ids(outs)
    assert set(got) == expected, b.logs()
    assert max(got.values()) == 1


def test_a_full_reorder_buffer_pauses_and_releases_early_without_losing_records(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    running = rig.spawn(PIPELINE_LATENESS_S="600", PIPELINE_MAX_BUFFERED="5")
    at = now_ms()
    rig.produce([login_body(user_id=7, at_ms=at + n) for n in range(40)])  # one partition

    outs = rig.read(count=35, timeout_s=60)  # 600 s lateness: only the bound releases them

    assert 35 <= len(outs) < 40  # fewer than 5 stay waiting
    assert max(event_ids(outs).values()) == 1
    times = [o.record["authenticationTime"] for o in sorted(outs, key=lambda o: o.offset)]
    assert times == sorted(times)
    paused = running.metric("wifi_pipeline_paused_partitions")
    assert paused is not None
    assert "reorder buffer full: partition paused" in running.logs()


def _dead_letter_too_large_for(limit_bytes: int, *, user_id: int) -> bytes:
    """A body without a login time (a dead letter) keyed like ``user_id``'s logins."""
    return orjson.dumps({"user": {"id": user_id, "note": "x" * (2 * limit_bytes)}})


def _wait_for(running: PipelineProcess, metric: str, at_least: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (running.metric(metric) or 0) < at_least:
        assert time.monotonic() < deadline, running.logs()
        time.sleep(0.1)


_ABORTED = 'wifi_pipeline_transactions_total{result="aborted"}'


def test_a_partition_paused_when_its_transaction_aborts_is_read_again_after_the_rebuild(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    rig.limit_dlq_record_bytes(2_000)  # every transaction holding the dead letter aborts
    at = now_ms()
    poison = _dead_letter_too_large_for(2_000, user_id=7)
    # More records than a consume batch, so the first batch comes at once; three waiting
    # records fill the buffer and pause the partition, and no tick (once a minute) resumes it
    # before the transaction fails to commit.
    rig.produce([poison, *(login_body(user_id=7, at_ms=at + n) for n in range(600))])
    running = rig.spawn(
        PIPELINE_MAX_BUFFERED="3", PIPELINE_LATENESS_S="600", PIPELINE_TICK_MS="60000"
    )
    _wait_for(running, _ABORTED, 1, timeout_s=30)
    assert "reorder buffer full: partition paused" in running.logs()

    rig.limit_dlq_record_bytes(1_048_588)  # the broker's default again

    outs = rig.read(count=1, timeout_s=30)  # only the bound or a tick releases the logins
    assert [o.record["raw"] for o in outs] == [poison], running.logs()


def test_a_partition_paused_when_revoked_is_read_again_when_it_comes_back(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    at = now_ms()
    # Every partition fills its buffer of three and is paused; no tick (every 15 s) resumes
    # one before b takes some. (A consume call waits for the tick too, unless its batch fills
    # or a transaction is open: a's reads below come at its ticks.)
    rig.produce([login_body(user_id=n % 300, at_ms=at + n) for n in range(600)])
    a = rig.spawn(
        "a", PIPELINE_MAX_BUFFERED="3", PIPELINE_LATENESS_S="600", PIPELINE_TICK_MS="15000"
    )
    _wait_for(a, "wifi_pipeline_paused_partitions", rig.partitions, timeout_s=30)
    b = rig.spawn("b", PIPELINE_MAX_BUFFERED="3", PIPELINE_LATENESS_S="600")  # takes some
    assert rig.stop(b) == 0  # static member: its partitions go back to a after 10 s
    _wait_for(a, "wifi_pipeline_assigned_partitions", rig.partitions, timeout_s=40)
    revoked = re.findall(r"partitions revoked +partitions=\[([\d, ]+)\]", a.logs())
    moved = {int(n) for numbers in revoked for n in numbers.split(",")}
    assert moved, a.logs()

    # One login into each partition that moved: a reads it (full or not, a restored state
    # starts unpaused; the partitions a kept are full, and read one record per tick).
    users = {_partition_of(str(n).encode(), rig.partitions): n for n in range(1000, 1100)}
    rig.produce([login_body(user_id=users[p], at_ms=now_ms()) for p in sorted(moved)])

    lag = _committed_lag(rig, moved, timeout_s=40)
    assert lag == dict.fromkeys(moved, 0), a.logs()


def test_the_raw_topics_partition_count_is_exported_for_the_unowned_partitions_alert(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    running = rig.spawn("a")
    _wait_for(running, "wifi_pipeline_assigned_partitions", rig.partitions, timeout_s=30)
    assert running.metric("wifi_pipeline_input_partitions") == rig.partitions


def _partition_of(key: bytes, partitions: int) -> int:
    """The partition the bridge's murmur2 partitioner gives ``key``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def _committed_lag(
    rig: PipelineRig, partitions: set[int], *, timeout_s: float = 30.0
) -> dict[int, int]:
    """Raw records of ``partitions`` the pipeline group has not committed, by partition
    (after up to ``timeout_s`` for them all to be committed)."""
    t = rig.topics
    group = {"bootstrap.servers": rig.bootstrap, "group.id": t["group"]}
    consumer = confluent_kafka.Consumer(group)
    try:
        tps = [confluent_kafka.TopicPartition(t["raw"], p) for p in sorted(partitions)]
        deadline = time.monotonic() + timeout_s
        while True:
            ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
            committed = consumer.committed(tps, timeout=10)
            lag = {
                tp.partition: end - max(tp.offset, 0)
                for tp, end in zip(committed, ends, strict=True)
            }
            if not any(lag.values()) or time.monotonic() > deadline:
                return lag
            time.sleep(0.5)
    finally:
        consumer.close()


def test_an_output_the_broker_refuses_aborts_the_transaction_and_the_pipeline_goes_on(
    pipeline_rig: PipelineRig,
) -> None:
    """A produce that fails after it was queued fails the transaction: the next produce of
    the same transaction is refused, and that must abort and rebuild, not stop the process."""
    rig = pipeline_rig
    rig.limit_dlq_record_bytes(2_000)
    poison = _dead_letter_too_large_for(2_000, user_id=8)
    rig.produce([poison, login_body(user_id=8, at_ms=now_ms())])
    running = rig.spawn()  # the login is released by a tick, into the failed transaction
    _wait_for(running, _ABORTED, 3, timeout_s=60)
    assert running.process.poll() is None, running.logs()

    rig.limit_dlq_record_bytes(1_048_588)
    outs = rig.read(count=2, timeout_s=30)

    assert sorted(o.topic for o in outs) == sorted([rig.topics["dlq"], rig.topics["visits"]])
    assert running.process.poll() is None, running.logs()


def test_an_aborted_transaction_counts_nothing_in_the_metrics(pipeline_rig: PipelineRig) -> None:
    """The records of an aborted transaction are read again: counted once, when committed."""
    rig = pipeline_rig
    rig.limit_dlq_record_bytes(2_000)
    poison = _dead_letter_too_large_for(2_000, user_id=8)
    rig.produce([poison, login_body(user_id=8, at_ms=now_ms())])
    running = rig.spawn()  # ticks every 200 ms, between the reads and the failed commits
    _wait_for(running, _ABORTED, 3, timeout_s=60)

    rig.limit_dlq_record_bytes(1_048_588)
    assert len(rig.read(count=2, timeout_s=30, settle_s=1)) == 2
    _wait_for(running, 'wifi_pipeline_transactions_total{result="committed"}', 1, timeout_s=5)

    expected = {
        'wifi_pipeline_records_in_total{outcome="accepted"}': 1,
        'wifi_pipeline_records_in_total{outcome="invalid"}': 1,
        'wifi_pipeline_invalid_records_total{reason="missing_authentication_time"}': 1,
        'wifi_pipeline_records_out_total{route="dlq"}': 1,
        'wifi_pipeline_records_out_total{route="visits"}': 1,
        "wifi_pipeline_visits_opened_total": 1,
    }
    assert {name: running.metric(name) for name in expected} == expected


def test_a_changelog_with_fewer_partitions_than_the_input_stops_with_a_clear_error(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    changelog = rig.topics["group"] + "-changelog"
    settings = KafkaSettings(bootstrap_servers=rig.bootstrap, topic_partitions=1)
    asyncio.run(ensure_topics(settings, [TopicSpec(changelog)]))

    running = rig.spawn(wait=False)

    assert running.process.wait(timeout=60) == 1
    assert f"the changelog topic {changelog} has 1 partitions" in running.logs()


def test_a_restore_reads_the_committed_entries_and_skips_partitions_that_hold_none(
    kafka_bootstrap: str,
) -> None:
    topic = unique_topic("changelog")
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_partitions=3)
    asyncio.run(ensure_topics(settings, [TopicSpec(topic)]))
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_topic("restore")}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for n in range(3):
        producer.produce(topic, b"value-%d" % n, b"key-%d" % n, partition=0)
    producer.produce(topic, None, b"key-1", partition=0)  # a tombstone is an entry too
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted", b"key-a", partition=1)
    producer.flush(30)
    producer.abort_transaction(30)
    config = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": unique_topic("restore"),
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    }

    reader = confluent_kafka.Consumer(config)
    try:
        assert _partitions_with_records(reader, topic, [0, 1, 2]) == [0, 1]
        assert _partitions_with_records(reader, unique_topic("absent"), [0]) == []
    finally:
        reader.close()
    entries = _read_changelog(config, topic, [0, 1, 2])

    assert entries == {
        0: [
            (b"key-0", b"value-0"),
            (b"key-1", b"value-1"),
            (b"key-2", b"value-2"),
            (b"key-1", None),
        ],
        1: [],  # only an aborted transaction's record: nothing committed to restore
        2: [],
    }
    assert _read_changelog(config, unique_topic("absent"), [0, 1]) == {0: [], 1: []}


def test_a_producer_fenced_for_good_is_replaced_and_every_event_still_comes_once(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    running = rig.spawn("a")
    sent: list[bytes] = []
    producer = threading.Thread(
        target=lambda: sent.extend(_stream(rig, seconds=10, rate_per_s=100, seed=3))
    )
    producer.start()
    time.sleep(3)
    # What a coordinator failover can do to it too: the epoch moves on, _FENCED is fatal.
    intruder = confluent_kafka.Producer(
        {"bootstrap.servers": rig.bootstrap, "transactional.id": rig.topics["group"] + "-a"}
    )
    intruder.init_transactions(30)
    producer.join()
    expected = _expected_ids(sent)

    outs = rig.read(count=len(expected), timeout_s=120)

    assert running.process.poll() is None, running.logs()
    # Once, or twice when the intruder's own init_transactions finished after the first
    # replacement's (it waits for the transaction it aborted) and fenced the new one too.
    replaced = running.metric("wifi_pipeline_producer_replacements_total") or 0
    assert 1 <= replaced <= 2, running.logs()
    got = event_ids(outs)
    assert set(got) == expected
    assert max(got.values()) == 1


def test_a_consumer_fenced_for_good_stops_the_instance_with_the_reason(
    pipeline_rig: PipelineRig,
) -> None:
    rig = pipeline_rig
    running = rig.spawn("a")
    # Another member with the same static id: the group fences the pipeline's consumer, which
    # librdkafka reports only as an error event. The instance must not stay on with nothing.
    intruder = confluent_kafka.Consumer(
        {
            "bootstrap.servers": rig.bootstrap,
            "group.id": rig.topics["group"],
            "group.instance.id": "a",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10_000,
        }
    )
    intruder.subscribe([rig.topics["raw"]])
    try:
        deadline = time.monotonic() + 60
        while running.process.poll() is None and time.monotonic() < deadline:
            intruder.poll(0.5)
    finally:
        intruder.close()

    assert running.process.poll() == 1, running.logs()
    assert "the consumer failed for good" in running.logs()
