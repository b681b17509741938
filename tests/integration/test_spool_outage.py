"""A Kafka outage never reaches the sender: real broker processes stopped, bridges killed."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkafka.broker import LocalKafka, free_port
from tests.fixtures.bridge import PostLoad, RunningBridge, metric, wait_for_metric
from tests.fixtures.kafka import consume
from tests.fixtures.samples import login_body

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

Spawn = Callable[..., Awaitable[RunningBridge]]
SENDER_TIMEOUT_S = 10.0


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    """A broker of this test's own, which the test may stop and start again."""
    broker = LocalKafka(data_dir=tmp_path / "own-kafka", port=free_port())
    await asyncio.to_thread(broker.start)
    yield broker
    await asyncio.to_thread(broker.stop)


def event_ids(records: list[Any]) -> set[bytes]:
    return {dict(r.headers)["event-id"] for r in records}


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, float, Any]:
    started = time.monotonic()
    async with session.post(url, data=body) as response:
        payload = await response.json()
        return response.status, time.monotonic() - started, (payload, dict(response.headers))


async def test_broker_stopped_during_posts_every_post_gets_200_in_time_and_all_land_after_restart(
    own_broker: LocalKafka, spawn_bridge: Spawn
) -> None:
    bridge = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers, BRIDGE_ACK_TIMEOUT_MS="1500"
    )
    load = PostLoad(bridge.webhook_url)
    load.start(workers=8)
    await asyncio.sleep(1.0)
    before_outage = len(load.acknowledged)
    await asyncio.to_thread(own_broker.stop)
    await asyncio.sleep(4.0)
    during_outage = len(load.acknowledged) - before_outage
    assert await metric(bridge, "wifi_bridge_kafka_ready") == 0.0  # the alert's metric
    await asyncio.to_thread(own_broker.start)
    await asyncio.sleep(2.0)
    await load.stop()

    assert set(load.statuses) == {200}
    assert load.slowest_s < SENDER_TIMEOUT_S
    assert before_outage > 0
    assert during_outage > 0, "no post was answered while the broker was down"
    assert await metric(bridge, "wifi_bridge_spooled_records_total") > 0
    await wait_for_metric(bridge, "wifi_bridge_spool_records", 0.0)
    acknowledged = load.acknowledged
    records = await consume(
        own_broker.bootstrap_servers, bridge.topic_raw, count=len(acknowledged), timeout_s=60
    )
    missing = set(acknowledged) - event_ids(records)
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged events are missing"


async def test_a_broker_stopped_while_the_bridge_idles_is_reported_and_so_is_its_return(
    own_broker: LocalKafka, spawn_bridge: Spawn
) -> None:
    """wifi_bridge_kafka_ready (the chart's Kafka alert) and /readyz follow the broker, with
    no request to notice it and no readiness probe: the chart probes only /healthz."""
    bridge = await spawn_bridge(KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers)
    await wait_for_metric(bridge, "wifi_bridge_kafka_ready", 1.0)
    await asyncio.to_thread(own_broker.stop)
    await wait_for_metric(bridge, "wifi_bridge_kafka_ready", 0.0, timeout_s=30)
    async with aiohttp.ClientSession() as session, session.get(bridge.base_url + "/readyz") as r:
        assert (r.status, (await r.json())["kafka"]) == (200, False)  # ready: the spool takes posts
    await asyncio.to_thread(own_broker.start)
    await wait_for_metric(bridge, "wifi_bridge_kafka_ready", 1.0, timeout_s=60)


async def post_logins(url: str, count: int) -> list[bytes]:
    """Post ``count`` logins one by one, each answered 200; their event ids."""
    acknowledged = []
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            status, _, (payload, _) = await post(session, url, login_body(minute=n))
            assert status == 200
            acknowledged.append(payload["eventId"].encode())
    return acknowledged


async def test_sigkilled_bridge_drains_its_spool_after_restart(
    own_broker: LocalKafka, spawn_bridge: Spawn, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "kept-spool"
    first = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers,
        BRIDGE_ACK_TIMEOUT_MS="500",
        spool_dir=str(spool_dir),
    )
    await asyncio.to_thread(own_broker.stop)
    acknowledged = await post_logins(first.webhook_url, 20)
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)

    await asyncio.to_thread(own_broker.start)
    second = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers,
        spool_dir=str(spool_dir),
        topic_raw=first.topic_raw,
    )
    await wait_for_metric(second, "wifi_bridge_spool_records", 0.0)
    records = await consume(own_broker.bootstrap_servers, first.topic_raw, count=20, timeout_s=60)
    assert set(acknowledged) <= event_ids(records)


async def test_full_spool_answers_503_with_retry_after_and_recovers_by_itself(
    own_broker: LocalKafka, spawn_bridge: Spawn
) -> None:
    bridge = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers,
        BRIDGE_ACK_TIMEOUT_MS="300",
        BRIDGE_SPOOL_MAX_BYTES=str(1 << 20),
    )
    await asyncio.to_thread(own_broker.stop)
    big = login_body()[:-1] + b',"pad":"' + b"x" * 60_000 + b'"}'
    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(40):
            status, _, (payload, headers) = await post(session, bridge.webhook_url, big)
            answers.append(status)
            if status == 503:
                assert payload["error"] == "spool_full"
                assert headers["Retry-After"].isdigit()
                assert headers["wifiWebhookListener"] == "1"
                break
        assert answers[0] == 200
        assert answers[-1] == 503, "the spool never filled up"
        assert bridge.process is not None
        assert bridge.process.poll() is None

        await asyncio.to_thread(own_broker.start)
        await wait_for_metric(bridge, "wifi_bridge_spool_records", 0.0)
        status, _, _ = await post(session, bridge.webhook_url, big)
        assert status == 200


async def test_unwritable_spool_answers_503_keeps_running_and_recovers_by_itself(
    spawn_bridge: Spawn,
) -> None:
    bridge = await spawn_bridge(
        kafka=False, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", BRIDGE_ACK_TIMEOUT_MS="300"
    )
    assert bridge.spool_dir is not None
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(session, bridge.webhook_url, login_body())
        assert status == 200
        shutil.rmtree(bridge.spool_dir)  # the volume went away under the bridge
        status, _, (payload, headers) = await post(session, bridge.webhook_url, login_body())
        assert (status, payload["error"]) == (503, "spool_unavailable")
        assert headers["Retry-After"].isdigit()
        assert headers["wifiWebhookListener"] == "1"
        assert bridge.process is not None
        assert bridge.process.poll() is None

        bridge.spool_dir.mkdir()  # the volume is back
        status, _, _ = await post(session, bridge.webhook_url, login_body())
        assert status == 200


async def test_records_spooled_for_an_earlier_raw_topic_are_delivered_to_it(
    own_broker: LocalKafka, spawn_bridge: Spawn, tmp_path: Path
) -> None:
    # Spooled while Kafka was down, then the bridge restarted with another BRIDGE_TOPIC_RAW:
    # the broker creates no topic by itself, and the old one never existed.
    spool_dir = tmp_path / "kept-spool"
    first = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", kafka=False, spool_dir=str(spool_dir)
    )
    acknowledged = await post_logins(first.webhook_url, 5)
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=30) == 0

    second = await spawn_bridge(
        KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap_servers, spool_dir=str(spool_dir)
    )
    assert second.topic_raw != first.topic_raw
    await wait_for_metric(second, "wifi_bridge_spool_records", 0.0)
    records = await consume(own_broker.bootstrap_servers, first.topic_raw, count=5, timeout_s=60)
    assert event_ids(records) == set(acknowledged)
