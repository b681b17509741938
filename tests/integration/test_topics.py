"""Topic provisioning (bridge.kafka.ensure_topics) against a real broker."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from tests.fixtures.kafka import unique_topic

pytestmark = pytest.mark.kafka


async def test_a_topic_named_twice_is_created_once_with_the_first_spec(
    kafka_bootstrap: str,
) -> None:
    # Kafka refuses a create request that names a topic twice ("Duplicate topic name").
    twice, other = unique_topic("twice"), unique_topic("other")
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    specs = [TopicSpec(twice, 2), TopicSpec(other), TopicSpec(twice, 5)]
    assert sorted(await ensure_topics(settings, specs)) == sorted([twice, other])
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=30)
    assert len(metadata.topics[twice].partitions) == 2
