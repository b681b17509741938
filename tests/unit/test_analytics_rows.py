"""The analytics sink's pure core: canonical record -> ``logins`` row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from consumers.sinks.analytics.rows import (
    LOGIN_COLUMNS,
    Login,
    Reason,
    RejectedRecord,
    dedupe,
    parse_login,
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


def test_a_login_without_user_id_keeps_its_device() -> None:
    record = canonical(user_id=5, minute=1, visit_id="v")
    record["user"]["id"] = None
    parsed = parse_login(encoded(record))
    assert parsed.user_id is None
    assert parsed.client_mac == record["client"]["mac"]


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
