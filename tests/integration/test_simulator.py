"""The simulator through a real bridge and pipeline: what it says it sent is what lands."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from simulator.sender import send
from simulator.traffic import TrafficConfig, plan
from tests.fixtures.bridge import RunningBridge
from tests.fixtures.pipeline import PipelineRig

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_simulated_traffic_reconciles_with_the_pipeline_output(
    pipeline_rig: PipelineRig, spawn_bridge: Callable[..., Awaitable[RunningBridge]]
) -> None:
    rig = pipeline_rig
    bridge = await spawn_bridge(topic_raw=rig.topics["raw"])
    running = rig.spawn(PIPELINE_LATENESS_S="3")
    config = TrafficConfig(
        rate_per_s=40,
        duration_s=8,
        users=60,
        outage_start_s=2,
        outage_duration_s=2,
        time_compression=4000,  # the 3-hour retry after 2.7 s
        seed=11,
    )
    deliveries, expected = plan(config, start_ms=int(time.time() * 1000))

    tally = await send(deliveries, bridge.webhook_url, time_compression=4000, progress=None)

    assert tally.accepted == expected.posts
    assert tally.gave_up == 0
    outs = rig.read(count=expected.unique_logins, timeout_s=90)
    ids = Counter(o.record["eventId"] for o in outs)
    assert len(ids) == expected.unique_logins
    assert max(ids.values()) == 1
    assert not [o for o in outs if o.topic == rig.topics["dlq"]]
    opened = sum(1 for o in outs if o.record["visit"]["isNew"])
    assert opened == expected.visits
    assert running.metric("wifi_pipeline_duplicates_dropped_total") == expected.redeliveries
    assert [o for o in outs if o.topic == rig.topics["late"]]  # the outage's retries came late
