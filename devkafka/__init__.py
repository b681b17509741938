"""devkafka: a real Apache Kafka broker (KRaft, no ZooKeeper, no Docker) for dev and tests.

``python -m devkafka up|down|status`` manages a detached broker for ``make kafka-up`` /
``make run``; :class:`LocalKafka` (one node) and :class:`LocalKafkaCluster` (N nodes)
start brokers owned by the calling process, e.g. from a pytest fixture.  A
:class:`LocalKafka` can also open SASL_PLAINTEXT, SSL and SASL_SSL client listeners, for
testing clients' security settings.  Needs Java 17+, and Maven once to fetch the jars
(see :func:`ensure_jars`); the TLS listeners also need ``openssl``.
"""

from devkafka.broker import (
    DEFAULT_SASL_USERS,
    KAFKA_VERSION,
    SASL_MECHANISMS,
    DevKafkaError,
    LocalKafka,
    LocalKafkaCluster,
    broker_ids,
    default_cache_dir,
    ensure_jars,
    ensure_tls_material,
    free_port,
    is_serving,
)

__all__ = [
    "DEFAULT_SASL_USERS",
    "KAFKA_VERSION",
    "SASL_MECHANISMS",
    "DevKafkaError",
    "LocalKafka",
    "LocalKafkaCluster",
    "broker_ids",
    "default_cache_dir",
    "ensure_jars",
    "ensure_tls_material",
    "free_port",
    "is_serving",
]
