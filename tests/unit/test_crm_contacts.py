"""The CRM sink's pure core: which logins become contact upserts, without Kafka or a CRM."""

from __future__ import annotations

import itertools
import random
from typing import Any

import orjson
import pytest

from consumers.sinks.contacts import (
    Login,
    Skip,
    SyncMark,
    UnreadableRecord,
    chunks,
    contact_of,
    login_from_record,
    plan_upserts,
)
from consumers.sinks.hubspot import contact_properties
from consumers.sinks.webhook import contact_json
from tests.fixtures.canonical import DAY_MS, HOUR_MS, canonical_login, documented_sample_record

DAY = 86_400_000


def login(user: str, event_ms: int, *, email: str | None = None, ref: int = 0) -> Login:
    return Login(
        user_key=user,
        event_id=f"{user}-{event_ms}",
        event_ms=event_ms,
        email=email if email is not None else f"{user}@example.com",
        first_name="First",
        last_name="Last",
        provider="Form",
        venue_id="1",
        venue_name="Venue",
        visit_count=3,
        ref=ref,
    )


def no_email(user: str, event_ms: int) -> Login:
    base = login(user, event_ms)
    return Login(**{**{f: getattr(base, f) for f in base.__slots__}, "email": None})


def test_documented_sample_gives_a_contact_keyed_by_lower_case_email_with_visit_count() -> None:
    got = login_from_record(documented_sample_record())
    assert got.user_key == "888"
    assert got.email == "webhook@test.com"
    assert (got.first_name, got.last_name, got.provider) == ("Webhook", "Test", "Facebook")
    assert (got.venue_id, got.venue_name) == ("888", "Your venue name")
    assert got.visit_count == 7
    assert got.event_ms == 1516282028000


def test_upper_case_address_is_lowered_and_a_value_without_at_sign_counts_as_no_email() -> None:
    assert login_from_record(canonical_login(email="Ann@Example.COM")).email == "ann@example.com"
    assert login_from_record(canonical_login(email="not an address")).email is None


def test_login_without_user_id_is_keyed_by_mac() -> None:
    record = canonical_login()
    record["user"]["id"] = None
    assert login_from_record(record).user_key.startswith("mac:")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.update(authenticationTime=None), "authenticationTime"),
        (lambda r: r.update(authenticationTime="2026-11-01T09:00:00"), "authenticationTime"),
        (lambda r: r.update(authenticationTime="yesterday"), "authenticationTime"),
        (lambda r: r.update(eventId=None), "eventId"),
        (lambda r: r.update(user=[]), "user"),
        (lambda r: r["user"].update(email=7), "user.email"),
        (lambda r: r.update(visitCounts={"1": -1}), "visitCounts"),
        (lambda r: (r["user"].update(id=None), r["client"].update(mac=None)), "user.id"),
    ],
)
def test_unreadable_record_error_names_the_field_not_the_value(change: Any, field: str) -> None:
    record = canonical_login(email="secret.person@example.com")
    change(record)
    with pytest.raises(UnreadableRecord, match=field.split(".")[0]) as caught:
        login_from_record(record)
    assert "secret.person" not in str(caught.value)


def test_two_logins_of_one_user_within_the_interval_give_one_upsert_of_the_first() -> None:
    plan = plan_upserts([login("u", 0), login("u", HOUR_MS)], {}, min_interval_ms=DAY)
    assert [u.login.event_ms for u in plan.upserts] == [0]
    assert plan.skipped == {Skip.THROTTLED: 1}


def test_login_within_the_interval_of_the_last_synced_one_is_throttled() -> None:
    known = {"u": SyncMark("u", synced_event_ms=0, handled_event_ms=0)}
    plan = plan_upserts([login("u", DAY - 1)], known, min_interval_ms=DAY)
    assert plan.upserts == []
    assert plan.skipped == {Skip.THROTTLED: 1}


def test_login_a_full_interval_after_the_last_sync_is_sent() -> None:
    known = {"u": SyncMark("u", synced_event_ms=0, handled_event_ms=0)}
    plan = plan_upserts([login("u", DAY)], known, min_interval_ms=DAY)
    assert [u.login.event_ms for u in plan.upserts] == [DAY]


def test_replayed_or_older_login_is_stale() -> None:
    known = {"u": SyncMark("u", synced_event_ms=5 * DAY, handled_event_ms=5 * DAY)}
    plan = plan_upserts([login("u", 0), login("u", 5 * DAY)], known, min_interval_ms=DAY)
    assert plan.upserts == []
    assert plan.skipped == {Skip.STALE: 2}


def test_of_several_due_logins_in_one_batch_the_latest_wins() -> None:
    logins = [login("u", 0, ref=0), login("u", 2 * DAY, ref=1), login("u", 2 * DAY + 1, ref=2)]
    plan = plan_upserts(logins, {}, min_interval_ms=DAY)
    assert [u.login.ref for u in plan.upserts] == [1]
    assert plan.skipped == {Skip.SUPERSEDED: 1, Skip.THROTTLED: 1}


def test_login_without_email_is_skipped_not_sent() -> None:
    plan = plan_upserts([no_email("u", 0)], {}, min_interval_ms=DAY)
    assert plan.upserts == []
    assert plan.skipped == {Skip.NO_EMAIL: 1}


def test_two_users_sharing_an_address_become_one_upsert_that_settles_both() -> None:
    logins = [login("a", 0, email="shared@example.com"), login("b", 5, email="shared@example.com")]
    plan = plan_upserts(logins, {}, min_interval_ms=DAY)
    assert len(plan.upserts) == 1
    upsert = plan.upserts[0]
    assert upsert.login.user_key == "b"
    assert {m.user_key: m.synced_event_ms for m in upsert.marks_if_accepted({})} == {
        "a": 0,
        "b": 5,
    }
    assert plan.skipped == {Skip.SUPERSEDED: 1}


def test_rejected_upsert_is_handled_but_not_synced() -> None:
    known = {"u": SyncMark("u", synced_event_ms=0, handled_event_ms=0)}
    upsert = plan_upserts([login("u", 2 * DAY)], known, min_interval_ms=DAY).upserts[0]
    assert upsert.marks_if_rejected(known) == [SyncMark("u", 0, 2 * DAY)]
    assert upsert.marks_if_accepted(known) == [SyncMark("u", 2 * DAY, 2 * DAY)]


def test_upserts_keep_the_order_of_their_records() -> None:
    logins = [login(f"u{i}", 0, ref=i) for i in (3, 1, 2)]
    plan = plan_upserts(logins, {}, min_interval_ms=DAY)
    assert [u.login.user_key for u in plan.upserts] == ["u1", "u2", "u3"]


def test_the_crm_ends_with_the_same_contacts_however_the_stream_is_cut_into_batches() -> None:
    rng = random.Random(7)
    stream = sorted(
        (login(f"u{rng.randrange(5)}", rng.randrange(10 * DAY_MS)) for _ in range(300)),
        key=lambda item: item.event_ms,
    )

    def final_state(cuts: list[int]) -> tuple[dict[str, int], dict[str, SyncMark]]:
        marks: dict[str, SyncMark] = {}
        crm: dict[str, int] = {}
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            plan = plan_upserts(stream[start:end], marks, min_interval_ms=DAY)
            for upsert in plan.upserts:
                crm[upsert.contact.email] = upsert.contact.last_visit_ms
                for mark in upsert.marks_if_accepted(marks):
                    marks[mark.user_key] = mark
        return crm, marks

    one_batch = final_state([])
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(1, 40)))
        assert final_state(cuts) == one_batch


def test_no_two_upserts_of_a_user_are_closer_than_the_interval_one_login_per_batch() -> None:
    rng = random.Random(3)
    times = sorted(rng.randrange(30 * DAY_MS) for _ in range(500))
    marks: dict[str, SyncMark] = {}
    sent: list[int] = []
    for event_ms in times:
        for upsert in plan_upserts([login("u", event_ms)], marks, min_interval_ms=DAY).upserts:
            sent.append(upsert.login.event_ms)
            marks = {m.user_key: m for m in upsert.marks_if_accepted(marks)}
    assert all(b - a >= DAY for a, b in itertools.pairwise(sent))
    assert len(sent) >= 15


def test_chunks_never_exceed_the_size() -> None:
    plan = plan_upserts([login(f"u{i}", 0) for i in range(250)], {}, min_interval_ms=DAY)
    assert [len(c) for c in chunks(plan.upserts, 100)] == [100, 100, 50]


def test_a_login_time_after_its_webhook_arrived_is_unreadable_not_synced() -> None:
    # A sender clock gone wrong: synced, 2099 would make every later login of the user stale.
    record = canonical_login()
    record["receivedAt"] = "2026-11-29T10:00:00.000Z"
    record["authenticationTime"] = "2099-01-01T00:00:00.000Z"
    with pytest.raises(UnreadableRecord, match="after receivedAt"):
        login_from_record(record)

    record["authenticationTime"] = "2026-11-29T10:59:00.000Z"  # within the clocks' skew
    assert login_from_record(record).event_ms > 0


@pytest.mark.parametrize(
    "moment",
    [
        "9999-12-31T23:59:59-05:00",  # 10000-01-01 in UTC
        "0001-01-01T00:00:00+05:00",  # year 0 in UTC
    ],
)
def test_a_login_time_outside_the_years_1_to_9999_in_utc_is_unreadable_not_a_crash(
    moment: str,
) -> None:
    record = canonical_login(email="ann@example.com")
    record["authenticationTime"] = moment
    record["receivedAt"] = None
    with pytest.raises(UnreadableRecord, match="authenticationTime"):
        login_from_record(record)


def test_a_visit_count_beyond_64_bits_is_unreadable_not_a_crash() -> None:
    record = canonical_login(email="ann@example.com")
    record["visitCounts"] = {str(venue): 999_999_999_999_999_999 for venue in range(20)}
    with pytest.raises(UnreadableRecord, match="visitCounts"):
        login_from_record(record)
    record["visitCounts"] = {"1": 2**63 - 1}
    assert login_from_record(record).visit_count == 2**63 - 1


@pytest.mark.parametrize(
    ("moment", "shown"),
    [
        ("0001-01-01T00:00:00.000Z", "0001-01-01T00:00:00.000Z"),
        ("0999-06-01T12:00:00.250Z", "0999-06-01T12:00:00.250Z"),
        ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
        ("2026-11-01T10:00:00.007+01:00", "2026-11-01T09:00:00.007Z"),
    ],
)
def test_every_readable_login_gives_a_contact_each_target_can_encode(
    moment: str, shown: str
) -> None:
    record = canonical_login(email="ann@example.com")
    record["authenticationTime"] = moment
    record["receivedAt"] = None
    record["visitCounts"] = {"1": 2**63 - 1}
    contact = contact_of(login_from_record(record))
    assert contact.last_visit_iso == shown
    encoded = orjson.loads(orjson.dumps(contact_json(contact)))  # the webhook's and the outbox's
    assert encoded["lastVisitAt"] == shown
    assert encoded["visitCount"] == 2**63 - 1
    assert contact_properties(contact)["wifi_last_visit_at"] == str(contact.last_visit_ms)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["user"].update(id="500\x00002"),
        lambda r: (r["user"].update(id=None), r["client"].update(mac="02:00\x00:00")),
        lambda r: r["user"].update(firstName="Ann\x00"),
    ],
)
def test_a_text_with_a_nul_character_is_unreadable(change: Any) -> None:
    record = canonical_login(email="ann@example.com")
    change(record)
    with pytest.raises(UnreadableRecord, match="NUL"):
        login_from_record(record)
