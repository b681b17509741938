"""The analytics tables on real databases (a DuckDB file, a PostgreSQL server), no Kafka."""

from __future__ import annotations

import asyncio
from datetime import date
from urllib.parse import urlsplit

import asyncpg
import pytest

from consumers.sinks.analytics.rows import LOGIN_COLUMNS, Login, dedupe, parse_login
from consumers.sinks.analytics.store import MIGRATIONS, Fenced, Position
from tests.fixtures.analytics import (
    AnalyticsTarget,
    assert_aggregates_match_logins,
    fetch_one,
    snapshot,
)
from tests.fixtures.logins import canonical, encoded
from tests.fixtures.postgres import create_database, drop_database

TOPIC = "wifi.auth.visits"


def login(user_id: int, minute: int, visit_id: str | None, **kwargs: object) -> Login:
    record = canonical(user_id=user_id, minute=minute, visit_id=visit_id, **kwargs)  # type: ignore[arg-type]
    return parse_login(encoded(record))


def known_stream() -> list[Login]:
    """Three people at two venues: two visits for user 1, a redelivery, a late login."""
    return [
        login(1, 0, "u1-a", is_new=True),
        login(2, 3, "u2-a", is_new=True),
        login(1, 10, "u1-a", is_new=False),
        login(1, 10, "u1-a", is_new=False),  # the same login delivered twice
        login(3, 20, "u3-a", venue_id=7, is_new=True),
        login(1, 55, "u1-b", is_new=True),
        login(2, 15, "u2-a", is_new=False, late=True),
    ]


async def test_tables_are_created_once_and_migrating_again_changes_nothing(
    analytics_target: AnalyticsTarget,
) -> None:
    first, second, third = (analytics_target.store() for _ in range(3))
    await first.open()
    await first.open()
    await first.close()
    await asyncio.gather(second.open(), third.open())  # two instances starting together
    assert await second.schema_version() == MIGRATIONS[-1][0]
    port = analytics_target.port()
    assert await fetch_one(port, "SELECT count(*) FROM schema_version") == len(MIGRATIONS)


async def test_known_stream_gives_its_rows_and_aggregates(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    result = await store.write(known_stream(), [Position(TOPIC, 0, claim.epoch, 7)])
    assert (result.logins_inserted, result.duplicates) == (6, 1)

    tables = await snapshot(analytics_target.port())
    assert len(tables["logins"]) == 6
    assert [(v[0], v[1], v[3], v[6]) for v in tables["visits"]] == [
        ("u1-a", "1", "4242", 2),
        ("u1-b", "1", "4242", 1),
        ("u2-a", "2", "4242", 2),
        ("u3-a", "3", "7", 1),
    ]
    day = date(2026, 11, 29)
    assert tables["venue_daily"] == [("4242", day, 5, 2, 3), ("7", day, 1, 1, 1)]
    late = [row for row in tables["logins"] if row[11]]
    assert [row[9] for row in late] == ["u2-a"]
    await assert_aggregates_match_logins(analytics_target.port())


async def test_replaying_the_stream_in_other_batches_changes_no_table(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    stream = known_stream()
    await store.write(stream[:4], [Position(TOPIC, 0, claim.epoch, 4)])
    await store.write(stream[4:], [Position(TOPIC, 0, claim.epoch, 7)])
    before = await snapshot(analytics_target.port())

    for size in (1, 3, 7):
        for start in range(0, len(stream), size):
            result = await store.write(stream[start : start + size], [])
            assert result.logins_inserted == 0
    assert await snapshot(analytics_target.port()) == before
    await assert_aggregates_match_logins(analytics_target.port())


async def test_a_zombie_with_a_stale_epoch_writes_nothing(
    analytics_target: AnalyticsTarget,
) -> None:
    zombie, successor = analytics_target.store(), analytics_target.store()
    (old,) = await zombie.claim(TOPIC, [0])
    await zombie.write([login(1, 0, "v1")], [Position(TOPIC, 0, old.epoch, 1)])
    (new,) = await successor.claim(TOPIC, [0])
    assert (new.epoch, new.next_offset) == (old.epoch + 1, 1)
    before = await snapshot(analytics_target.port())

    with pytest.raises(Fenced) as caught:
        await zombie.write([login(2, 0, "v2")], [Position(TOPIC, 0, old.epoch, 2)])
    assert caught.value.partitions == ((TOPIC, 0),)
    assert await snapshot(analytics_target.port()) == before
    port = analytics_target.port()
    assert await fetch_one(port, "SELECT next_offset FROM sink_offsets") == 1

    await successor.write([login(2, 0, "v2")], [Position(TOPIC, 0, new.epoch, 2)])
    assert await fetch_one(port, "SELECT count(*) FROM logins") == 2


async def test_one_fenced_partition_rolls_back_the_whole_batch(
    analytics_target: AnalyticsTarget,
) -> None:
    zombie, successor = analytics_target.store(), analytics_target.store()
    p0, p1 = await zombie.claim(TOPIC, [0, 1])
    await successor.claim(TOPIC, [1])
    with pytest.raises(Fenced):
        await zombie.write(
            [login(1, 0, "v1"), login(2, 0, "v2")],
            [Position(TOPIC, 0, p0.epoch, 1), Position(TOPIC, 1, p1.epoch, 1)],
        )
    port = analytics_target.port()
    assert await fetch_one(port, "SELECT count(*) FROM logins") == 0
    assert await fetch_one(port, "SELECT count(*) FROM sink_offsets WHERE next_offset IS NULL") == 2


async def test_positions_are_kept_per_consumer_group(analytics_target: AnalyticsTarget) -> None:
    live, replay = analytics_target.store("live"), analytics_target.store("replay")
    (claim,) = await live.claim(TOPIC, [0])
    await live.write([login(1, 0, "v1")], [Position(TOPIC, 0, claim.epoch, 1)])
    (fresh,) = await replay.claim(TOPIC, [0])
    assert (fresh.epoch, fresh.next_offset) == (1, None)


async def test_a_batch_mixing_stored_and_new_logins_adds_only_the_new_ones(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    stream = known_stream()
    await store.write(stream[:3], [Position(TOPIC, 0, claim.epoch, 3)])
    result = await store.write(stream, [Position(TOPIC, 0, claim.epoch, 7)])
    assert (result.logins_inserted, result.duplicates) == (3, 4)
    tables = await snapshot(analytics_target.port())
    assert [(v[0], v[6]) for v in tables["visits"]] == [
        ("u1-a", 2),
        ("u1-b", 1),
        ("u2-a", 2),
        ("u3-a", 1),
    ]
    day = date(2026, 11, 29)
    assert tables["venue_daily"] == [("4242", day, 5, 2, 3), ("7", day, 1, 1, 1)]
    await assert_aggregates_match_logins(analytics_target.port())


def at(user_id: int, instant: str, visit_id: str, **kwargs: object) -> Login:
    record = canonical(user_id=user_id, minute=0, visit_id=visit_id, **kwargs)  # type: ignore[arg-type]
    record["authenticationTime"] = instant
    record["eventId"] = f"{record['eventId']}-{instant}"
    return parse_login(encoded(record))


async def test_days_are_utc_days_whatever_the_readers_time_zone(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    evening = at(1, "2026-11-29T23:30:00.000Z", "v1", is_new=True)
    after_midnight = at(1, "2026-11-30T00:30:00.000Z", "v1", is_new=False)
    await store.write([evening, after_midnight], [Position(TOPIC, 0, claim.epoch, 2)])

    reader = analytics_target.port()
    await reader.connect()
    await reader.execute("SET TimeZone = 'Asia/Tokyo'")  # 09:00 ahead: both logins on the 30th
    assert await reader.fetch("SELECT day, logins, new_visits FROM venue_daily ORDER BY day") == [
        (date(2026, 11, 29), 1, 1),
        (date(2026, 11, 30), 1, 0),
    ]


async def test_a_visitor_without_user_id_is_counted_by_device(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    anonymous = []
    for user_id, minute in ((5, 0), (5, 20), (6, 40)):
        record = canonical(user_id=user_id, minute=minute, visit_id=f"d{user_id}")
        record["user"]["id"] = None
        record["client"]["mac"] = f"02-00-00-00-00-{user_id:02x}"
        anonymous.append(parse_login(encoded(record)))
    await store.write([*anonymous, login(5, 50, "u5")], [Position(TOPIC, 0, claim.epoch, 4)])
    port = analytics_target.port()
    # Two devices and one user id (the same person as a device, but nothing says so).
    assert await fetch_one(port, "SELECT unique_visitors FROM venue_daily") == 3
    await assert_aggregates_match_logins(port)


async def test_a_visit_takes_its_user_device_and_venue_from_its_earliest_login(
    analytics_target: AnalyticsTarget,
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    await store.write([login(1, 30, "v", venue_id=8)], [Position(TOPIC, 0, claim.epoch, 1)])
    await store.write([login(2, 10, "v", venue_id=9)], [Position(TOPIC, 0, claim.epoch, 2)])
    (visit,) = (await snapshot(analytics_target.port()))["visits"]
    assert (visit[1], visit[3], visit[6]) == ("2", "9", 2)


async def test_a_schema_1_store_keeps_its_figures_when_migrated(
    analytics_target: AnalyticsTarget,
) -> None:
    """Schema 1 kept visits and venue_daily as tables; schema 2 derives them from logins."""
    port = analytics_target.port()
    await port.connect()
    async with port.transaction():
        await port.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for statement in MIGRATIONS[0][1]:
            assert isinstance(statement, str)
            await port.execute(statement)
        await port.execute("INSERT INTO schema_version VALUES (1, current_timestamp)")
        await port.insert_new(
            "logins", LOGIN_COLUMNS, [row.row() for row in dedupe(known_stream()[:6])]
        )
    await port.close()

    store = analytics_target.store()
    assert await store.schema_version() == MIGRATIONS[-1][0]
    tables = await snapshot(analytics_target.port())
    assert len(tables["visits"]) == 4
    day = date(2026, 11, 29)
    assert tables["venue_daily"] == [("4242", day, 4, 2, 3), ("7", day, 1, 1, 1)]
    await assert_aggregates_match_logins(analytics_target.port())


@pytest.mark.postgres
@pytest.mark.parametrize("via", ["unix socket", "tcp"])
async def test_a_postgresql_url_without_a_host_reaches_the_server_pghost_names(
    postgres_server: str, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    url = await create_database(postgres_server)
    try:
        server = urlsplit(postgres_server)
        admin = await asyncpg.connect(postgres_server)
        try:
            socket_dir = str(await admin.fetchval("SHOW unix_socket_directories")).split(",")[0]
        finally:
            await admin.close()
        monkeypatch.setenv("PGHOST", socket_dir.strip() if via == "unix socket" else "127.0.0.1")
        monkeypatch.setenv("PGPORT", str(server.port))
        monkeypatch.setenv("PGUSER", server.username or "postgres")
        target = AnalyticsTarget("postgresql", f"postgresql:///{url.rpartition('/')[2]}")
        store = target.store()
        (claim,) = await store.claim(TOPIC, [0])
        await store.write(known_stream(), [Position(TOPIC, 0, claim.epoch, 7)])
        assert await fetch_one(target.port(), "SELECT count(*) FROM logins") == 6
        await target.close()
    finally:
        await drop_database(postgres_server, url)
