"""The analytics sink's pure core: canonical record -> row, inserted logins -> aggregates."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest

from consumers.sinks.analytics.rows import (
    LOGIN_COLUMNS,
    Login,
    Reason,
    RejectedRecord,
    aggregate,
    dedupe,
    parse_login,
    unflagged_visits,
    visitor_days,
)
from tests.fixtures.logins import canonical, encoded
from tests.fixtures.samples import DOCUMENTED_SAMPLE, TABLE_VARIANT

PERSONAL = ("webhook@test.com", "Webhook", "Test", "1970-01-01")


def login(user_id: int, minute: int, visit_id: str | None, **kwargs: Any) -> Login:
    return parse_login(
        encoded(canonical(user_id=user_id, minute=minute, visit_id=visit_id, **kwargs))
    )


def test_sample_body_becomes_a_row_without_personal_data() -> None:
    from consumers.pipeline.normalise import normalise

    record = normalise(DOCUMENTED_SAMPLE, received_at_ms=1_516_282_030_000)
    record["visit"] = {"id": "visit-1", "isNew": True}
    parsed = parse_login(orjson.dumps(record))
    row = dict(zip(LOGIN_COLUMNS, parsed.row(), strict=True))
    assert row["event_id"] == record["eventId"]
    assert row["user_id"] == "888"
    assert row["client_mac"] == "00:01:02:03:04:05"
    assert (row["company_id"], row["venue_id"]) == ("999", "888")
    assert row["authentication_time"] == datetime(2018, 1, 18, 13, 27, 8, tzinfo=UTC)
    assert row["received_at"] == datetime(2018, 1, 18, 13, 27, 10, tzinfo=UTC)
    assert (row["visit_id"], row["visit_is_new"], row["late"]) == ("visit-1", True, False)
    assert not set(PERSONAL) & {v for v in row.values() if isinstance(v, str)}


def test_both_sender_layouts_give_the_same_row() -> None:
    from consumers.pipeline.normalise import normalise

    rows = []
    for body in (DOCUMENTED_SAMPLE, TABLE_VARIANT):
        record = normalise(body)
        record["visit"] = {"id": "v", "isNew": True}
        rows.append(parse_login(orjson.dumps(record)).row())
    assert rows[0] == rows[1]


def test_a_login_without_user_id_counts_its_device() -> None:
    record = canonical(user_id=5, minute=1, visit_id="v")
    record["user"]["id"] = None
    parsed = parse_login(encoded(record))
    assert parsed.user_id is None
    assert parsed.visitor == f"mac:{parsed.client_mac}"


def _broken(change: str) -> bytes:
    record = canonical(user_id=1, minute=0, visit_id="v")
    match change:
        case "no_event_id":
            del record["eventId"]
        case "numeric_event_id":
            record["eventId"] = 42
        case "local_time":
            record["authenticationTime"] = "2026-11-29T10:00:00+01:00"
        case "impossible_date":
            record["authenticationTime"] = "2026-02-30T10:00:00.000Z"
        case "no_user":
            record["user"]["id"] = None
            record["client"]["mac"] = None
        case "venue_not_object":
            record["venue"] = "4242"
        case "late_as_text":
            record["late"] = "false"
        case "is_new_as_text":
            record["visit"]["isNew"] = "yes"
        case "empty_visit_id":
            record["visit"]["id"] = ""
        case "nul_in_venue_name":
            record["venue"]["name"] = "Caf\x00e"
        case "huge_user_id":
            record["user"]["id"] = "9" * 4000  # past PostgreSQL's B-tree entry limit as a key
    return orjson.dumps(record)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", Reason.INVALID_JSON),
        (None, Reason.INVALID_JSON),
        (b"[1, 2]", Reason.NOT_AN_OBJECT),
        (_broken("no_event_id"), Reason.MISSING_FIELD),
        (_broken("numeric_event_id"), Reason.BAD_FIELD),
        (_broken("local_time"), Reason.BAD_FIELD),
        (_broken("impossible_date"), Reason.BAD_FIELD),
        (_broken("no_user"), Reason.MISSING_FIELD),
        (_broken("venue_not_object"), Reason.BAD_FIELD),
        (_broken("late_as_text"), Reason.BAD_FIELD),
        (_broken("is_new_as_text"), Reason.BAD_FIELD),
        (_broken("empty_visit_id"), Reason.BAD_FIELD),
        (_broken("nul_in_venue_name"), Reason.BAD_FIELD),
        (_broken("huge_user_id"), Reason.BAD_FIELD),
    ],
)
def test_a_record_that_is_not_canonical_is_rejected_with_a_reason(
    value: bytes | None, reason: Reason
) -> None:
    with pytest.raises(RejectedRecord) as caught:
        parse_login(value)
    assert caught.value.reason is reason


def test_rejection_messages_never_quote_values() -> None:
    record = canonical(user_id=1, minute=0, visit_id="v")
    record["authenticationTime"] = "webhook@test.com"
    with pytest.raises(RejectedRecord) as caught:
        parse_login(orjson.dumps(record))
    assert "webhook@test.com" not in str(caught.value)


def test_dedupe_keeps_the_first_of_each_event() -> None:
    a, b = login(1, 0, "v1"), login(2, 0, "v2")
    assert dedupe([a, b, a, b, a]) == [a, b]


def test_visitor_days_are_distinct_per_venue_and_utc_day() -> None:
    logins = [
        login(1, 0, "v1"),
        login(1, 30, "v1"),
        login(1, 5, "v9", venue_id=7),
        login(1, 0, "v2", hour=23),
        login(2, 0, "v3"),
    ]
    days = visitor_days(logins)
    assert days == [
        ("4242", date(2026, 11, 29), "1"),
        ("4242", date(2026, 11, 29), "2"),
        ("7", date(2026, 11, 29), "1"),
    ]


def test_aggregate_counts_logins_new_visits_and_visit_spans() -> None:
    logins = [login(1, 0, "v1"), login(1, 20, "v1"), login(1, 10, "v1"), login(2, 5, "v2")]
    result = aggregate(
        logins, known_visits=set(), new_visitor_days=[("4242", date(2026, 11, 29))] * 2
    )
    v1, v2 = result.visits
    assert (v1.visit_id, v1.logins, v1.user_id, v1.venue_id) == ("v1", 3, "1", "4242")
    assert (v1.first_login_at, v1.last_login_at) == (
        logins[0].authentication_time,
        logins[1].authentication_time,
    )
    assert (v2.visit_id, v2.logins) == ("v2", 1)
    (day,) = result.venue_days
    assert (day.venue_id, day.day) == ("4242", date(2026, 11, 29))
    assert (day.logins, day.unique_visitors, day.new_visits) == (4, 2, 2)


def test_a_visit_already_stored_is_extended_not_counted_as_new() -> None:
    result = aggregate([login(1, 40, "v1")], known_visits={"v1"}, new_visitor_days=[])
    (visit,) = result.visits
    assert visit.logins == 1
    (day,) = result.venue_days
    assert (day.logins, day.unique_visitors, day.new_visits) == (1, 0, 0)


def test_a_new_visit_counts_on_the_day_of_its_first_login() -> None:
    late_evening = login(1, 50, "v1", hour=23)
    result = aggregate([late_evening], known_visits=set(), new_visitor_days=[])
    (day,) = result.venue_days
    assert (day.day, day.new_visits) == (date(2026, 11, 29), 1)


def test_logins_without_visit_or_venue_still_count_where_they_can() -> None:
    no_visit = login(1, 0, None)
    record = canonical(user_id=2, minute=0, visit_id="v2")
    record["venue"]["id"] = None
    no_venue = parse_login(encoded(record))
    result = aggregate([no_visit, no_venue], known_visits=set(), new_visitor_days=[])
    assert [v.visit_id for v in result.visits] == ["v2"]
    assert result.visits[0].venue_id is None
    (day,) = result.venue_days
    assert (day.venue_id, day.logins, day.new_visits) == ("4242", 1, 0)


def test_nothing_inserted_adds_nothing() -> None:
    result = aggregate([], known_visits=set(), new_visitor_days=[])
    assert (result.visits, result.venue_days) == ((), ())


def test_aggregates_come_sorted_so_writers_lock_rows_in_one_order() -> None:
    logins = [login(3, 0, "c", venue_id=9), login(1, 0, "a", venue_id=2), login(2, 0, "b")]
    result = aggregate(logins, known_visits=set(), new_visitor_days=[])
    assert [v.visit_id for v in result.visits] == ["a", "b", "c"]
    assert [d.venue_id for d in result.venue_days] == sorted(d.venue_id for d in result.venue_days)


def test_splitting_a_stream_into_batches_gives_the_same_totals() -> None:
    """What the store does per batch (inserted -> aggregate) adds up to the whole stream."""
    stream = [login(u, m, f"v{u}-{m // 30}") for u in range(1, 6) for m in (0, 10, 31, 45)]
    whole = aggregate(stream, known_visits=set(), new_visitor_days=[])
    known: set[str] = set()
    totals: dict[str, int] = {}
    new_visits = 0
    for start in range(0, len(stream), 3):
        part = aggregate(stream[start : start + 3], known_visits=known, new_visitor_days=[])
        for visit in part.visits:
            totals[visit.visit_id] = totals.get(visit.visit_id, 0) + visit.logins
            known.add(visit.visit_id)
        new_visits += sum(d.new_visits for d in part.venue_days)
    assert totals == {v.visit_id: v.logins for v in whole.visits}
    assert new_visits == sum(d.new_visits for d in whole.venue_days) == 10


def test_the_pipelines_is_new_flag_decides_which_visits_are_new() -> None:
    opened = login(1, 5, "v1", is_new=True)
    continued = login(2, 6, "v2", is_new=False)
    # Flags win over what the store knows: v2 is unknown but the pipeline says it goes on.
    result = aggregate([continued, opened], known_visits={"v1"}, new_visitor_days=[])
    (day,) = result.venue_days
    assert day.new_visits == 1


def test_a_new_visit_flagged_on_a_late_login_counts_on_that_logins_day() -> None:
    next_day_open = login(1, 0, "v1", is_new=True, hour=23)
    result = aggregate([next_day_open], known_visits=set(), new_visitor_days=[])
    assert [(d.day, d.new_visits) for d in result.venue_days] == [(date(2026, 11, 29), 1)]


def test_only_visits_without_flags_need_the_store_to_say_whether_they_are_known() -> None:
    logins = [login(1, 0, "flagged", is_new=True), login(2, 0, "unknown"), login(2, 9, "unknown")]
    assert unflagged_visits(logins) == ["unknown"]
