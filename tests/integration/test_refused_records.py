"""Records Kafka refuses for good, against a real broker: never taken for an outage.

librdkafka refuses a record over its ``message.max.bytes`` (1,000,000 bytes with key and
headers) when it is produced, aiokafka one over ``max_request_size`` (1 MiB) when it is sent;
a broker refuses a batch over the topic's ``max.message.bytes`` with every record in it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import MAX_BODY_BYTES_LIMIT, KafkaSettings
from bridge.spool import Spool, SpoolRecord, decode_frame, read_stats
from tests.fixtures.bridge import RunningBridge, StartBridge, metric
from tests.fixtures.kafka import consume, unique_topic
from tests.fixtures.samples import login_body
from tests.integration.test_receiver import post

pytestmark = pytest.mark.kafka

PRODUCERS = pytest.mark.parametrize("producer", ["librdkafka", "aiokafka"])
REFUSED = 'wifi_bridge_spool_refused_records_total{reason="record_too_large"}'


def keyed_by_a_huge_user_id() -> bytes:
    """A body within BRIDGE_MAX_BODY_BYTES whose key (its user id) doubles the record's size."""
    body = orjson.loads(login_body())
    body["user"]["id"] = "9" * 600_000
    return orjson.dumps(body)


async def wait_for(bridge: RunningBridge, name: str, wanted: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (value := await _metric_or_zero(bridge, name)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {value}, not {wanted}, after {timeout_s} s")
        await asyncio.sleep(0.2)


async def _metric_or_zero(bridge: RunningBridge, name: str) -> float:
    try:
        return await metric(bridge, name)
    except AssertionError:
        return 0.0  # a labelled counter appears with its first increment


@PRODUCERS
async def test_a_record_too_large_for_kafka_gets_413_and_the_next_one_goes_straight_in(
    start_bridge: StartBridge, kafka_bootstrap: str, producer: str
) -> None:
    bridge = await start_bridge(
        BRIDGE_MAX_BODY_BYTES=str(MAX_BODY_BYTES_LIMIT), BRIDGE_PRODUCER=producer
    )
    status, headers, payload = await post(bridge.webhook_url, keyed_by_a_huge_user_id())
    assert (status, payload["error"]) == (413, "record_too_large"), payload
    assert headers["wifiWebhookListener"] == "1"
    assert bridge.spool_dir is not None
    assert read_stats(bridge.spool_dir).records == 0  # not taken for an outage
    body = login_body()
    status, _, payload = await post(bridge.webhook_url, body)
    assert (status, payload["status"]) == (200, "accepted")
    assert [r.value for r in await consume(kafka_bootstrap, bridge.topic_raw, count=1)] == [body]
    outcome = 'wifi_bridge_requests_total{method="POST",outcome="record_too_large"}'
    assert await metric(bridge, outcome) == 1
    assert read_stats(bridge.spool_dir).records == 0


@PRODUCERS
async def test_a_record_the_topic_refuses_is_set_aside_and_the_records_behind_it_arrive(
    start_bridge: StartBridge, kafka_bootstrap: str, producer: str
) -> None:
    raw = unique_topic("raw-small")
    small_records = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    await ensure_topics(small_records, [TopicSpec(raw, configs={"max.message.bytes": "100000"})])
    bridge = await start_bridge(
        BRIDGE_TOPIC_RAW=raw,
        BRIDGE_MAX_BODY_BYTES=str(MAX_BODY_BYTES_LIMIT),
        BRIDGE_PRODUCER=producer,
    )
    big = orjson.loads(login_body())
    big["pad"] = "x" * 200_000
    # The broker refuses the batch, which may have held other records: the spool keeps it
    # until the drainer, sending it alone, knows it is the cause.
    status, _, payload = await post(bridge.webhook_url, orjson.dumps(big))
    assert (status, payload["status"]) == (200, "accepted")
    followers = [login_body() for _ in range(3)]
    for body in followers:
        assert (await post(bridge.webhook_url, body))[0] == 200
    records = await consume(kafka_bootstrap, raw, count=3, settle_s=1.0)
    assert sorted(r.value for r in records) == sorted(followers)
    await wait_for(bridge, REFUSED, 1)
    assert bridge.spool_dir is not None
    (saved,) = (bridge.spool_dir / "corrupt").iterdir()
    assert orjson.loads(decode_frame(saved.read_bytes()).value) == big
    assert read_stats(bridge.spool_dir).records == 0


async def test_a_refused_record_left_in_the_spool_is_set_aside_and_the_drain_goes_on(
    start_bridge: StartBridge, kafka_bootstrap: str, tmp_path: Path
) -> None:
    raw = unique_topic("raw")
    spool_dir = tmp_path / "left-behind"
    values = [login_body(), keyed_by_a_huge_user_id(), login_body()]
    async with Spool(directory=spool_dir, fsync=False) as spool:
        for value in values:
            key = str(orjson.loads(value)["user"]["id"]).encode()
            record = SpoolRecord(topic=raw, key=key, value=value, headers=[], spooled_at_ms=1)
            await spool.append(record)
    bridge = await start_bridge(BRIDGE_TOPIC_RAW=raw, BRIDGE_SPOOL_DIR=str(spool_dir))
    records = await consume(kafka_bootstrap, raw, count=2, settle_s=1.0)
    assert sorted(r.value for r in records) == sorted([values[0], values[2]])
    await wait_for(bridge, REFUSED, 1)
    (saved,) = (spool_dir / "corrupt").iterdir()
    assert decode_frame(saved.read_bytes()).value == values[1]
    assert read_stats(spool_dir).records == 0
