"""devkafka: a real Apache Kafka broker (KRaft, no ZooKeeper, no Docker) for dev and tests.

``python -m devkafka up|down|status`` manages a detached broker for ``make kafka-up`` /
``make run``; :class:`LocalKafka` (one node) and :class:`LocalKafkaCluster` (N nodes)
start brokers owned by the calling process, e.g. from a pytest fixture.  Needs Java 17+,
and Maven once to fetch the jars (see :func:`ensure_jars`).
"""

from devkafka.broker import (
    KAFKA_VERSION,
    DevKafkaError,
    LocalKafka,
    LocalKafkaCluster,
    broker_ids,
    default_cache_dir,
    ensure_jars,
    free_port,
    is_serving,
)

__all__ = [
    "KAFKA_VERSION",
    "DevKafkaError",
    "LocalKafka",
    "LocalKafkaCluster",
    "broker_ids",
    "default_cache_dir",
    "ensure_jars",
    "free_port",
    "is_serving",
]
