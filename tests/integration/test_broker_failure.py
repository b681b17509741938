"""A broker of a three-node cluster dies and comes back while the bridge and the pipeline work.

Topics have replication factor 3 and ``min.insync.replicas`` 2, as in production, so one node
down leaves every partition writable with ``acks=all`` once its leadership has moved. The
bridge must answer every post in time and lose no acknowledged event; the pipeline must go on
by itself (no restart) and still emit every event exactly once, read committed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from bridge.event import identify
from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from devkafka.broker import LocalKafkaCluster
from tests.fixtures.bridge import PostLoad, RunningBridge, wait_for_metric
from tests.fixtures.kafka import consume
from tests.fixtures.pipeline import PipelineProcess, PipelineRig
from tests.fixtures.samples import login_body

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

Spawn = Callable[..., Awaitable[RunningBridge]]
SENDER_TIMEOUT_S = 10.0
REPLICATED = {"KAFKA_REPLICATION_FACTOR": "3", "KAFKA_MIN_INSYNC_REPLICAS": "2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    """Three local nodes, each broker and controller; one may be down at a time."""
    nodes = LocalKafkaCluster(data_dir=tmp_path_factory.mktemp("cluster"), nodes=3)
    nodes.start()
    yield nodes
    nodes.stop()


def leader_index(cluster: LocalKafkaCluster, topic: str, partition: int = 0) -> int:
    """The 0-based index of the node that leads ``topic``'s ``partition``."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    leader = admin.list_topics(topic, timeout=30).topics[topic].partitions[partition].leader
    return leader - 1  # node.id i + 1 is nodes[i]


def create_replicated_topic(cluster: LocalKafkaCluster, topic: str, partitions: int) -> None:
    settings = KafkaSettings(
        bootstrap_servers=cluster.bootstrap_servers,
        topic_partitions=partitions,
        replication_factor=3,
        min_insync_replicas=2,
    )
    asyncio.run(ensure_topics(settings, [TopicSpec(topic)]))


async def test_a_leader_killed_during_posts_delays_no_answer_past_the_sender_and_loses_nothing(
    cluster: LocalKafkaCluster, spawn_bridge: Spawn
) -> None:
    bridge = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap_servers,
        BRIDGE_ACK_TIMEOUT_MS="3000",
        **REPLICATED,
    )
    load = PostLoad(bridge.webhook_url)
    load.start(workers=8)
    await asyncio.sleep(2.0)
    victim = cluster.node(leader_index(cluster, bridge.topic_raw))
    await asyncio.to_thread(victim.kill)
    await asyncio.sleep(5.0)
    during_outage = len(load.acknowledged)
    await asyncio.to_thread(victim.start)
    await asyncio.sleep(2.0)
    await load.stop()

    assert set(load.statuses) == {200}, load.statuses
    assert load.slowest_s < SENDER_TIMEOUT_S
    assert len(load.acknowledged) > during_outage > 0
    await wait_for_metric(bridge, "wifi_bridge_spool_records", 0.0)  # what it spooled is sent
    # A record can reach Kafka twice (the same event id), so the count alone is no end mark.
    records = await consume(
        cluster.bootstrap_servers,
        bridge.topic_raw,
        count=len(load.acknowledged),
        timeout_s=90,
        settle_s=5,
    )
    missing = set(load.acknowledged) - {dict(r.headers)["event-id"] for r in records}
    assert not missing, f"{len(missing)} of {len(load.acknowledged)} acknowledged are missing"


def test_each_node_killed_in_turn_during_a_stream_leaves_every_event_once(
    cluster: LocalKafkaCluster, tmp_path: Path
) -> None:
    rig = PipelineRig(cluster.bootstrap_servers, tmp_path)
    create_replicated_topic(cluster, rig.topics["raw"], rig.partitions)

    def spawn(*, wait: bool) -> PipelineProcess:
        return rig.spawn(
            "a", wait=wait, KAFKA_REPLICATION_FACTOR="3", KAFKA_MIN_INSYNC_REPLICAS="2"
        )

    running = [spawn(wait=True)]
    sent: list[bytes] = []
    streaming = threading.Event()
    streaming.set()

    def stream() -> None:
        rng = random.Random(7)
        while streaming.is_set():
            at_ms = int(time.time() * 1000)
            batch = [
                login_body(user_id=rng.randrange(200), at_ms=at_ms - rng.randrange(500))
                for _ in range(10)
            ]
            sent.extend(batch)
            rig.produce(batch + rng.sample(sent, k=2))  # with redeliveries
            time.sleep(0.1)

    def supervise() -> None:
        # What the StatefulSet does: an instance that stopped is started again, same id.
        while streaming.is_set() or running[-1].process.poll() is not None:
            if running[-1].process.poll() is not None:
                running.append(spawn(wait=False))
            time.sleep(0.5)

    producer = threading.Thread(target=stream)
    supervisor = threading.Thread(target=supervise)
    producer.start()
    supervisor.start()
    try:
        time.sleep(3.0)
        for index in range(3):  # the transaction coordinator and every leader go down once
            node = cluster.node(index)
            node.kill()
            time.sleep(4.0)
            node.start()
            time.sleep(2.0)
    finally:
        streaming.clear()
        producer.join()
        supervisor.join()
    expected = {identify(orjson.loads(body)).event_id for body in sent}

    try:
        outs = rig.read(count=len(expected), timeout_s=120)
    finally:
        rig.cleanup()

    # An instance either went on by itself or stopped saying why (a static member the
    # coordinator failover fenced); never did one stay on without its partitions.
    logs = "\n".join(r.logs() for r in running)
    for stopped in running[:-1]:
        assert stopped.process.returncode == 1, stopped.logs()
        assert "failed for good" in stopped.logs(), stopped.logs()
    assert len(running) <= 3, logs
    got = Counter(o.record["eventId"] for o in outs)
    assert set(got) == expected, logs
    assert max(got.values()) == 1
    assert not [o for o in outs if o.topic == rig.topics["dlq"]]
