"""RdKafkaPublisher's view of whether Kafka is reachable, with a real librdkafka producer.

The producer points at a port nobody listens on, so nothing is delivered by itself; the tests
settle a record's future as the polling thread's report would, in the order that matters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import confluent_kafka
import pytest
from confluent_kafka import KafkaError

from bridge.metrics import BridgeMetrics
from bridge.rdkafka import RdKafkaPublisher
from bridge.settings import KafkaSettings
from devkafka.broker import free_port


@pytest.fixture
async def publisher() -> AsyncIterator[RdKafkaPublisher]:
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    publisher = RdKafkaPublisher(settings=settings, metrics=BridgeMetrics())
    # What start() sets up once a broker answered (none does here).
    publisher._producer = confluent_kafka.Producer(publisher._config)
    publisher._loop = asyncio.get_running_loop()
    yield publisher
    producer, publisher._producer = publisher._producer, None
    producer.purge()
    producer.flush(0)


async def acknowledged_publish(
    publisher: RdKafkaPublisher, *, before_ack: Callable[[], None] | None = None
) -> None:
    """A publish whose record the broker acknowledges; ``before_ack`` runs just before."""
    task = asyncio.create_task(
        publisher.publish("raw", key=b"k", value=b"v", headers=[], timeout_s=5)
    )
    await asyncio.sleep(0)  # the publish runs until it waits for the ack
    assert publisher._waiting
    if before_ack is not None:
        before_ack()
    _, _, delivered = publisher._waiting[-1]
    delivered.set_result(None)
    await task


def connected(publisher: RdKafkaPublisher) -> bool:
    return publisher.connected


def all_brokers_down(publisher: RdKafkaPublisher) -> None:
    publisher._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))


async def test_all_brokers_down_is_not_connected_until_a_later_record_is_acknowledged(
    publisher: RdKafkaPublisher,
) -> None:
    assert publisher.connected
    all_brokers_down(publisher)
    assert not connected(publisher)  # a call: the attribute read above would be narrowed
    await acknowledged_publish(publisher)
    assert publisher.connected


async def test_an_ack_of_a_record_sent_before_the_brokers_went_down_does_not_hide_it(
    publisher: RdKafkaPublisher,
) -> None:
    # One poll() serves the record's ack and then the report; the loop resumes the publish
    # after the report was handled.
    await acknowledged_publish(publisher, before_ack=lambda: all_brokers_down(publisher))
    assert not publisher.connected
