"""The simulator's traffic plan: deterministic, and it says truthfully what it will send."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from consumers.pipeline.normalise import normalise
from simulator.traffic import RETRY_DELAY_MS, Layout, TrafficConfig, plan

START_MS = 1_764_410_000_000


def test_the_same_seed_gives_the_same_traffic() -> None:
    config = TrafficConfig(rate_per_s=50, duration_s=10, seed=4)
    first, first_expected = plan(config, start_ms=START_MS)
    second, second_expected = plan(config, start_ms=START_MS)
    assert first == second
    assert first_expected == second_expected
    other, _ = plan(TrafficConfig(rate_per_s=50, duration_s=10, seed=5), start_ms=START_MS)
    assert other != first


def test_the_expected_counts_match_the_deliveries() -> None:
    config = TrafficConfig(rate_per_s=40, duration_s=20, redelivery_share=0.1, seed=2)
    deliveries, expected = plan(config, start_ms=START_MS)
    sent = [d for d in deliveries if not d.fails]
    ids = Counter(d.event_id for d in sent)
    assert len(ids) == expected.unique_logins
    assert sum(ids.values()) - len(ids) == expected.redeliveries > 0
    assert expected.posts == len(sent) == 800
    assert sum(expected.logins_by_venue.values()) == expected.unique_logins
    people = {orjson.loads(d.body)["user"]["id"] for d in sent}
    assert expected.visitors == len({str(p) for p in people})
    assert expected.relogins == sum(1 for d in sent if d.kind == "relogin") > 0
    assert [d.at_ms for d in deliveries] == sorted(d.at_ms for d in deliveries)


def test_every_body_normalises_and_both_layouts_occur() -> None:
    deliveries, _ = plan(TrafficConfig(rate_per_s=20, duration_s=5), start_ms=START_MS)
    layouts = set()
    for delivery in deliveries:
        body = orjson.loads(delivery.body)
        layouts.add("venue" in body)
        record = normalise(delivery.body)
        assert record["eventId"] == delivery.event_id
    assert layouts == {True, False}


@pytest.mark.parametrize("layout", [Layout.SAMPLE, Layout.TABLE])
def test_a_single_layout_can_be_chosen(layout: Layout) -> None:
    deliveries, _ = plan(TrafficConfig(layout=layout, duration_s=5), start_ms=START_MS)
    assert {"venue" in orjson.loads(d.body) for d in deliveries} == {layout is Layout.TABLE}


def test_an_outage_holds_its_posts_and_retries_them_three_compressed_hours_later() -> None:
    config = TrafficConfig(
        rate_per_s=10, duration_s=20, outage_start_s=5, outage_duration_s=3, time_compression=1000
    )
    deliveries, expected = plan(config, start_ms=START_MS)
    failed = [d for d in deliveries if d.fails]
    retries = [d for d in deliveries if d.kind == "retry"]
    assert len(failed) == len(retries) == expected.outage_failed > 0
    assert all(5_000 <= d.at_ms < 8_000 for d in failed)
    delay_ms = RETRY_DELAY_MS // 1000
    for original in failed:
        (retry,) = [r for r in retries if r.body == original.body and r.at_ms > original.at_ms]
        assert delay_ms <= retry.at_ms - original.at_ms < delay_ms + 1000
        # the login time stays the original one: the retry arrives late
        login = orjson.loads(retry.body)["session"]["authenticationTime"]
        assert login.startswith("20")


def test_visits_expected_follow_the_gap_rule() -> None:
    # Ten visitors logging in about every 10 s at one venue for a minute.
    short_gap = TrafficConfig(rate_per_s=1, duration_s=60, users=10, venues=1, visit_gap_ms=5_000)
    long_gap = TrafficConfig(rate_per_s=1, duration_s=60, users=10, venues=1)
    deliveries, short = plan(short_gap, start_ms=START_MS)
    _, long = plan(long_gap, start_ms=START_MS)
    visitors = {orjson.loads(d.body)["user"]["id"] for d in deliveries}
    assert long.visits == len({str(v) for v in visitors})  # 30 min gap: one visit each
    assert short.visits > long.visits


@pytest.mark.parametrize(
    "bad",
    [{"rate_per_s": 0}, {"users": 0}, {"gzip_share": 1.5}, {"time_compression": 0.5}],
)
def test_impossible_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        TrafficConfig(**bad)  # type: ignore[arg-type]
