"""Decisions of the pipeline's Kafka shell that need no broker to be seen.

The service is built with real librdkafka clients pointed at a port nobody listens on; the
code under test makes no call that needs a broker, so none is made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import pytest
from confluent_kafka import TopicPartition

from bridge.event import identify
from bridge.settings import KafkaSettings
from consumers.pipeline.metrics import PipelineMetrics
from consumers.pipeline.partition import PartitionPipeline, RawRecord, WindowConfig
from consumers.pipeline.service import PipelineService, _Owned
from consumers.pipeline.settings import PipelineSettings
from devkafka.broker import free_port
from tests.fixtures.samples import login_body


@pytest.fixture
def service() -> Iterator[PipelineService]:
    settings = PipelineSettings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        windows=WindowConfig(lateness_ms=1000),
        tick_ms=10,
        commit_interval_ms=10,
        metrics_port=0,
    )
    service = PipelineService(settings, metrics=PipelineMetrics())
    yield service
    service._consumer.close()


def buffered_pipeline(now_ms: int) -> PartitionPipeline:
    """A partition pipeline holding one login that a tick at ``now_ms`` would release."""
    pipeline = PartitionPipeline(WindowConfig(lateness_ms=1000), wall_clock_ms=now_ms)
    body = login_body(at_ms=now_ms - 5000)
    identity = identify(orjson.loads(body))
    headers = [
        ("event-id", identity.event_id.encode()),
        ("received-at", str(now_ms - 5000).encode()),
    ]
    assert pipeline.accept(RawRecord(identity.key, body, headers, now_ms - 5000)) == []
    assert pipeline.buffered == 1
    return pipeline


def test_nothing_is_released_or_committed_while_a_rebuild_is_pending(
    service: PipelineService,
) -> None:
    # A rebalance callback aborted the transaction: the state is ahead of what was committed,
    # and what a tick released from it now would be released again after the rebuild.
    pipeline = buffered_pipeline(int(time.time() * 1000))
    service._owned[0] = _Owned(pipeline, next_offset=1, caught_up=True)
    service._rebuild_pending = True
    next_tick = time.monotonic() - 1  # the timer is due
    assert service._after_consume(next_tick) == next_tick
    assert pipeline.buffered == 1
    assert not service._in_transaction


def test_every_transaction_carries_the_offsets_of_every_owned_partition(
    service: PipelineService,
) -> None:
    # A transaction that only released records (a tick) must be fenced like any other.
    now_ms = int(time.time() * 1000)
    service._owned[0] = _Owned(buffered_pipeline(now_ms), next_offset=17)
    service._owned[3] = _Owned(PartitionPipeline(WindowConfig()), next_offset=4)
    service._owned[5] = _Owned(PartitionPipeline(WindowConfig()), next_offset=None)  # nothing yet
    offsets = service._transaction_offsets()
    assert [(tp.topic, tp.partition, tp.offset) for tp in offsets] == [
        ("wifi.auth.raw", 0, 17),
        ("wifi.auth.raw", 3, 4),
    ]
    assert all(isinstance(tp, TopicPartition) for tp in offsets)
