"""The per-partition pipeline and its changelog, without Kafka."""

from __future__ import annotations

import random

import orjson
import pytest

from bridge.event import identify
from consumers.pipeline import changelog
from consumers.pipeline.normalise import normalise_timed
from consumers.pipeline.partition import (
    FUTURE_TOLERANCE_MS,
    RECEIVED_AT_TOLERANCE_MS,
    Output,
    PartitionPipeline,
    RawRecord,
    Route,
    WindowConfig,
)
from consumers.pipeline.windows import VisitTracker
from tests.fixtures.samples import DOCUMENTED_SAMPLE, TABLE_VARIANT, login_body

T0 = 1_764_410_000_000
CONFIG = WindowConfig(lateness_ms=1_000, max_buffered=100)


def raw(body: bytes, received_at_ms: int = T0) -> RawRecord:
    """A raw record as the bridge writes it: key and event id from the body."""
    headers = [("received-at", str(received_at_ms).encode())]
    try:
        identity = identify(orjson.loads(body))
        headers.append(("event-id", identity.event_id.encode()))
        key: bytes | None = identity.key
    except (orjson.JSONDecodeError, AttributeError):  # not a JSON object: no id to take
        key = b"unknown"
    return RawRecord(key=key, value=body, headers=headers, timestamp_ms=received_at_ms)


def records(outputs: list[Output]) -> list[dict[str, object]]:
    return [orjson.loads(o.value) for o in outputs]


def times(outputs: list[Output]) -> list[str]:
    return [orjson.loads(o.value)["authenticationTime"] for o in outputs]


def test_a_record_waits_for_the_watermark_then_carries_its_visit() -> None:
    pipeline = PartitionPipeline(CONFIG)
    assert pipeline.accept(raw(login_body(user_id=1, at_ms=T0))) == []
    assert pipeline.buffered == 1

    released = pipeline.tick(T0 + 1_000, caught_up=True)

    assert [o.route for o in released] == [Route.VISITS]
    record = records(released)[0]
    assert record["visit"] == {"id": record["visit"]["id"], "isNew": True}  # type: ignore[index]
    assert record["late"] is False
    assert released[0].key == b"1"
    assert released[0].headers == [("event-id", str(record["eventId"]).encode())]


def test_the_wall_clock_moves_only_a_caught_up_partition() -> None:
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0)))
    assert pipeline.tick(T0 + 60_000, caught_up=False) == []
    assert len(pipeline.tick(T0 + 60_000, caught_up=True)) == 1


def test_both_sender_layouts_give_the_same_record() -> None:
    outputs = []
    for body in (DOCUMENTED_SAMPLE, TABLE_VARIANT):
        pipeline = PartitionPipeline(CONFIG)
        pipeline.accept(raw(body))
        outputs += pipeline.tick(T0 + 10**12, caught_up=True)
    first, second = records(outputs)
    assert first == second


def test_a_redelivery_inside_the_window_is_dropped_and_counted() -> None:
    pipeline = PartitionPipeline(CONFIG)
    body = login_body(user_id=1, at_ms=T0)
    pipeline.accept(raw(body, T0))
    assert pipeline.accept(raw(body, T0 + 3 * 3_600_000)) == []  # the sender's 3-hour retry
    assert pipeline.counts.duplicates == 1
    assert len(pipeline.tick(T0 + 3 * 3_600_000, caught_up=True)) == 1


def test_a_bridge_clock_days_ahead_does_not_expire_the_ids_before_it() -> None:
    """A received-at far ahead of the pipeline's clock is capped to it: the sender's 3-hour
    retries of logins seen before it are still dropped, and so are its own."""
    pipeline = PartitionPipeline(CONFIG)
    pipeline.tick(T0, caught_up=False)
    first = login_body(user_id=1, at_ms=T0)
    skewed = login_body(user_id=2, at_ms=T0 + 1_000)
    out = pipeline.accept(raw(first, T0))
    out += pipeline.accept(raw(skewed, T0 + 2 * 24 * 3_600_000))  # a bridge pod 2 days ahead
    assert pipeline.counts.received_at_capped == 1

    retry_ms = T0 + 3 * 3_600_000
    out += pipeline.tick(retry_ms, caught_up=True)
    out += pipeline.accept(raw(first, retry_ms))
    out += pipeline.accept(raw(skewed, retry_ms + 1))
    out += pipeline.tick(retry_ms + 10**6, caught_up=True)

    assert pipeline.counts.duplicates == 2
    assert pipeline.counts.received_at_capped == 1  # the retries are within the tolerance
    assert [r["user"]["id"] for r in records(out)] == ["1", "2"]  # type: ignore[index]
    # The record keeps the receive time the bridge wrote: only the clocks are capped.
    assert records(out)[1]["receivedAt"] == "2025-12-01T09:53:20.000Z"


def test_a_received_at_is_capped_from_a_restore_on_by_the_wall_clock_it_is_given() -> None:
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0), T0))
    restored, _ = PartitionPipeline.restore(pipeline.take_changes(), CONFIG, now_ms=T0 + 1_000)
    ahead = T0 + 1_000 + RECEIVED_AT_TOLERANCE_MS
    restored.accept(raw(login_body(user_id=2, at_ms=T0 + 2_000), ahead))  # at the tolerance
    restored.accept(raw(login_body(user_id=3, at_ms=T0 + 2_000), ahead + 1))
    assert restored.counts.received_at_capped == 1


def test_shuffled_input_leaves_in_login_time_order() -> None:
    pipeline = PartitionPipeline(CONFIG)
    bodies = [login_body(user_id=n % 7, at_ms=T0 + n * 10) for n in range(80)]
    random.Random(5).shuffle(bodies)  # 800 ms of disorder, inside the 1 s lateness
    out: list[Output] = []
    for n, body in enumerate(bodies):
        out += pipeline.accept(raw(body, T0 + n))
    out += pipeline.tick(T0 + 10_000, caught_up=True)
    assert len(out) == 80
    assert all(o.route is Route.VISITS for o in out)
    assert times(out) == sorted(times(out))


def test_a_record_older_than_what_was_released_goes_late_with_its_visit() -> None:
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0)))
    pipeline.tick(T0 + 5_000, caught_up=True)

    out = pipeline.accept(raw(login_body(user_id=1, at_ms=T0 - 60_000), T0 + 6_000))

    assert [o.route for o in out] == [Route.LATE]
    record = records(out)[0]
    assert record["late"] is True
    # One minute before the first login: it joins that visit, which it does not open.
    assert record["visit"]["isNew"] is False  # type: ignore[index]
    assert pipeline.counts.late == 1


def test_relogins_of_a_visit_share_its_id_and_only_the_first_is_new() -> None:
    pipeline = PartitionPipeline(CONFIG)
    released: list[Output] = []
    for minute in (0, 10, 20, 120):  # the last one opens a new visit
        at_ms = T0 + minute * 60_000
        released += pipeline.accept(raw(login_body(user_id=1, at_ms=at_ms), at_ms))
    released += pipeline.tick(T0 + 10**9, caught_up=True)
    out = records(released)
    visits = [r["visit"] for r in out]
    assert [v["isNew"] for v in visits] == [True, False, False, True]  # type: ignore[index]
    assert len({v["id"] for v in visits[:3]}) == 1  # type: ignore[index]
    assert visits[3]["id"] != visits[0]["id"]  # type: ignore[index]
    assert pipeline.counts.visits_opened == 2


def test_a_login_dated_far_after_its_receipt_goes_to_the_dlq_and_leaves_the_order_alone() -> None:
    pipeline = PartitionPipeline(CONFIG)
    future = raw(login_body(user_id=9, at_ms=253_402_300_799_000))  # 9999-12-31, received T0
    (out,) = pipeline.accept(future)
    assert out.route is Route.DLQ
    assert dict(out.headers)["dlq-reason"] == b"future_authentication_time"
    assert pipeline.watermark_ms is None  # nothing moved
    # Within the tolerance (clocks differ a little) a login is ordered as usual.
    ahead = raw(login_body(user_id=9, at_ms=T0 + FUTURE_TOLERANCE_MS))
    assert pipeline.accept(ahead) == []  # waits in the buffer
    # A record a second out of order afterwards is still put in order, not sent late.
    assert pipeline.accept(raw(login_body(user_id=8, at_ms=T0 + FUTURE_TOLERANCE_MS - 500))) == []
    released = records(pipeline.tick(T0 + 10**9, caught_up=True))
    assert [r["user"]["id"] for r in released] == ["8", "9"]  # type: ignore[index]
    assert pipeline.counts.late == 0


def test_no_body_stops_its_partition_whatever_fails_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A header beyond ISO 8601's years falls back to the record time; nothing raises."""
    pipeline = PartitionPipeline(CONFIG)
    body = login_body(user_id=1, at_ms=T0)
    odd = RawRecord(
        key=b"1", value=body, headers=[("received-at", b"100000000000000000")], timestamp_ms=T0
    )
    (out,) = pipeline.accept(odd) + pipeline.tick(T0 + 10**9, caught_up=True)
    assert out.route is Route.VISITS
    assert records([out])[0]["receivedAt"] == "2025-11-29T09:53:20.000Z"

    def fails(*_: object, **__: object) -> None:
        raise ValueError("a defect of the normaliser")

    monkeypatch.setattr("consumers.pipeline.partition.normalise_timed", fails)
    (out,) = pipeline.accept(raw(body))
    assert out.route is Route.DLQ
    assert out.value == body
    assert dict(out.headers)["dlq-reason"] == b"unreadable"
    assert dict(out.headers)["dlq-detail"] == b"the body could not be normalised: ValueError"


def test_a_body_whose_record_cannot_be_written_goes_to_the_dlq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writing the record (orjson) is guarded like normalising it: no body stops its partition."""
    pipeline = PartitionPipeline(CONFIG)
    body = login_body(user_id=1, at_ms=T0)
    record, event_ms = normalise_timed(body)
    record["visitCounts"] = {"4242": 10**20}  # beyond the 64-bit integers orjson writes
    monkeypatch.setattr(
        "consumers.pipeline.partition.normalise_timed", lambda *_, **__: (record, event_ms)
    )
    (out,) = pipeline.accept(raw(body))
    assert out.route is Route.DLQ
    assert dict(out.headers)["dlq-reason"] == b"unreadable"
    assert pipeline.buffered == 0
    assert pipeline.dedup_entries == 0  # a redelivery is judged again, not dropped unseen


def test_an_unreadable_body_goes_to_the_dlq_unchanged_with_its_reason() -> None:
    pipeline = PartitionPipeline(CONFIG)
    bad = raw(b"[1, 2]")
    out = pipeline.accept(bad)
    assert len(out) == 1
    assert out[0].route is Route.DLQ
    assert out[0].value == b"[1, 2]"
    headers = dict(out[0].headers)
    assert headers["dlq-reason"] == b"not_an_object"
    assert headers["received-at"] == str(T0).encode()
    assert pipeline.counts.invalid == {"not_an_object": 1}


def test_a_full_buffer_waits_for_a_tick_to_release_early() -> None:
    pipeline = PartitionPipeline(WindowConfig(lateness_ms=3_600_000, max_buffered=3))
    for n in range(3):
        assert pipeline.accept(raw(login_body(user_id=n, at_ms=T0 + n))) == []
    assert pipeline.is_full  # the service pauses the partition now
    out = pipeline.tick(T0, caught_up=False)
    assert len(out) == 1
    assert not pipeline.is_full


def test_changes_hold_one_entry_per_key_and_the_meta_last() -> None:
    pipeline = PartitionPipeline(CONFIG)
    assert pipeline.take_changes() == []
    for minute in (0, 1):
        pipeline.accept(raw(login_body(user_id=1, at_ms=T0 + minute * 60_000)))
    pipeline.tick(T0 + 10**6, caught_up=True)
    changes = pipeline.take_changes()
    keys = [key for key, _ in changes]
    assert len(keys) == len(set(keys)) == 4  # two events, one (user, venue), the meta
    assert keys[-1] == changelog.META_KEY
    assert pipeline.take_changes() == []


def test_restore_from_the_changelog_continues_exactly_as_without_a_restart() -> None:
    rng = random.Random(9)
    bodies = [
        login_body(user_id=rng.randrange(5), at_ms=T0 + rng.randrange(20_000)) for _ in range(150)
    ]
    bodies += rng.sample(bodies, 20)  # redeliveries

    def run(pipeline: PartitionPipeline, start: int, stop: int) -> list[bytes]:
        out: list[Output] = []
        for n in range(start, stop):
            out += pipeline.accept(raw(bodies[n], T0 + n * 100))
            if n % 10 == 0:
                out += pipeline.tick(T0 + n * 100, caught_up=True)
        return [o.value for o in out]

    expected = run(PartitionPipeline(CONFIG), 0, len(bodies))
    for cut in (0, 1, 33, 99, 150, len(bodies)):
        first = PartitionPipeline(CONFIG)
        got = run(first, 0, cut)
        log: list[tuple[bytes, bytes | None]] = []
        log += first.take_changes()
        second, corrupt = PartitionPipeline.restore(log, CONFIG)
        assert corrupt == 0
        got += run(second, cut, len(bodies))
        assert got == expected


def test_a_restore_with_nothing_buffered_keeps_what_was_released() -> None:
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0 + 60_000)))
    assert len(pipeline.tick(T0 + 10**6, caught_up=True)) == 1
    restored, _ = PartitionPipeline.restore(pipeline.take_changes(), CONFIG)
    assert restored.buffered == 0  # an empty buffer, dedup and visit state are state too

    older = restored.accept(raw(login_body(user_id=2, at_ms=T0), T0 + 1))
    assert [o.route for o in older] == [Route.LATE]  # as without the restart
    assert restored.watermark_ms == pipeline.watermark_ms


@pytest.mark.parametrize(
    ("meta", "arrivals"),
    [
        # No meta: the sequence restarts at 0, so the second new record gets user 2's number.
        pytest.param("absent", [(3, 5), (4, 2)], id="meta-absent"),
        # The last meta unreadable: the first (next seq 1) hands out user 2's number at once.
        pytest.param("stale", [(4, 2), (3, 5)], id="entries-newer-than-meta"),
    ],
)
def test_a_restore_whose_meta_lags_its_entries_gives_new_records_sequence_numbers_of_their_own(
    meta: str, arrivals: list[tuple[int, int]]
) -> None:
    """A new record must not get the (login time, sequence) of one restored into the buffer:
    once one of the two is released, the next restore takes the other for released too."""
    config = WindowConfig(lateness_ms=3_600_000, max_buffered=3)
    pipeline = PartitionPipeline(config)
    log: list[tuple[bytes, bytes | None]] = []
    for user_id in (1, 2):
        pipeline.accept(raw(login_body(user_id=user_id, at_ms=T0 + user_id)))
        log += pipeline.take_changes()
    assert log[-1][0] == changelog.META_KEY
    if meta == "absent":
        log = [(key, value) for key, value in log if key != changelog.META_KEY]
    else:
        log[-1] = (changelog.META_KEY, b"[]")
    restored, _ = PartitionPipeline.restore(log, config)
    assert restored.buffered == 2

    for user_id, offset_ms in arrivals:  # user 4 at user 2's login time
        restored.accept(raw(login_body(user_id=user_id, at_ms=T0 + offset_ms)))
    early = restored.tick(T0, caught_up=False)  # over the bound: the two oldest leave
    assert [r["user"]["id"] for r in records(early)] == ["1", "2"]  # type: ignore[index]

    again, _ = PartitionPipeline.restore(log + restored.take_changes(), config)
    rest = again.tick(T0 + 10**9, caught_up=True)
    assert [r["user"]["id"] for r in records(rest)] == ["4", "3"]  # type: ignore[index]


def test_visit_entries_encoded_from_held_tuples_match_the_documented_encoding() -> None:
    tracker = VisitTracker(gap_ms=60_000, retention_ms=10**9)
    for login_ms in (T0, T0 + 30_000, T0 + 10**6, T0 - 5_000):
        tracker.assign("u1", "v1", login_ms)
    assert len(tracker.held("u1", "v1")) == 2
    encoded = changelog.encode_held(tracker.held("u1", "v1"))
    assert encoded == changelog.encode_visits(tracker.spans("u1", "v1"))
    assert changelog.encode_event(seen_ms=T0, event_ms=None, seq=None, record=None) == (
        orjson.dumps({"s": T0, "t": None, "q": None, "r": None})
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a\x1fb", "c"), ("a", "b\x1fc")),
        (("a\\", "s\x1fc"), ("a\\s", "c")),
        (("a\\s", "c"), ("a\x1f", "c")),
    ],
)
def test_visits_of_ids_holding_the_separator_or_a_backslash_keep_their_own_entries(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    tracker = VisitTracker(gap_ms=60_000, retention_ms=10**9)
    tracker.assign(*first, T0)
    tracker.assign(*second, T0 + 1_000)
    entries = [
        (changelog.visit_key(*pair), changelog.encode_held(tracker.held(*pair)))
        for pair in (first, second)
    ]
    assert entries[0][0] != entries[1][0]

    state = changelog.fold(entries)

    assert state.corrupt == 0
    assert {pair: [v.first_login_ms for v in vs] for pair, vs in state.visits.items()} == {
        first: [T0],
        second: [T0 + 1_000],
    }


def test_a_visit_key_of_plain_ids_is_the_user_the_separator_and_the_venue() -> None:
    assert changelog.visit_key("888", "23") == b"v888\x1f23"
    assert changelog.fold([(b"vu\\x\x1f23", b"[]")]).visits == {("u\\x", "23"): []}


def test_restore_skips_and_counts_corrupt_entries() -> None:
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0)))
    entries = pipeline.take_changes()
    entries[:0] = [(b"e" + b"x", b"not json"), (b"zzz", b"{}"), (changelog.META_KEY, b"[]")]
    restored, corrupt = PartitionPipeline.restore(entries, CONFIG)
    assert corrupt == 3
    assert restored.buffered == 1


@pytest.mark.parametrize("value", [None, b'{"v": 1, "seq": 0}'])
def test_a_meta_tombstone_or_incomplete_meta_does_not_crash_a_restore(
    value: bytes | None,
) -> None:
    restored, corrupt = PartitionPipeline.restore([(changelog.META_KEY, value)], CONFIG)
    assert restored.buffered == 0
    assert corrupt == (0 if value is None else 1)


def test_a_pass_that_only_drops_duplicates_still_saves_the_clock_it_moved() -> None:
    """Restored after such a pass, dedup decides as the uninterrupted pipeline does."""
    config = WindowConfig(dedup_window_ms=10_000, lateness_ms=0)

    def login(user_id: int, received_ms: int) -> RawRecord:
        return raw(login_body(user_id=user_id, at_ms=T0), T0 + received_ms)

    def run(*, restore: bool) -> int:
        pipeline = PartitionPipeline(config)
        changelog: list[tuple[bytes, bytes | None]] = []
        pipeline.accept(login(1, 0))  # X, first seen at 0
        pipeline.accept(login(2, 9_000))  # Y
        changelog += pipeline.take_changes()
        assert pipeline.accept(login(2, 10_500)) == []  # Y again: dropped; the clock moves on
        changes = pipeline.take_changes()
        # X's tombstone (it left the window), and the meta with the new clock
        assert [(key[:1], value is None) for key, value in changes] == [(b"e", True), (b"m", False)]
        changelog += changes
        if restore:
            pipeline, _ = PartitionPipeline.restore(changelog, config)
        # X again, 9.5 s after it came: its first sighting has left the window by the clock
        return len(pipeline.accept(login(1, 9_500)) + pipeline.tick(T0 + 10**9, caught_up=True))

    assert run(restore=True) == run(restore=False) == 1


def test_the_changelog_forgets_what_left_the_windows_so_compaction_bounds_it() -> None:
    """Expired ids and visits get tombstones: folded, the changelog holds only live state."""
    config = WindowConfig(
        dedup_window_ms=10_000, visit_gap_ms=1_000, visit_retention_ms=5_000, lateness_ms=0
    )
    pipeline = PartitionPipeline(config)
    written: list[tuple[bytes, bytes | None]] = []
    for n in range(200):
        at_ms = T0 + n * 1_000
        pipeline.accept(raw(login_body(user_id=n, venue_id=n, at_ms=at_ms), at_ms))
        if n % 10 == 9:
            pipeline.tick(at_ms + 60_000, caught_up=False)  # the visit expiry runs per minute
            written += pipeline.take_changes()
    state = changelog.fold(written)
    assert len(state.events) <= 11  # the last 10 s of ids
    assert len(state.visits) <= 70  # at most the visits since the last expiry pass
    restored, corrupt = PartitionPipeline.restore(written, config)
    assert corrupt == 0
    assert restored.dedup_entries == pipeline.dedup_entries


def test_a_buffered_entry_that_is_json_but_no_record_is_skipped_and_counted_on_restore() -> None:
    """A damaged entry must not stop its partition from being assigned (a crash loop)."""
    pipeline = PartitionPipeline(CONFIG)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0)))
    entries = pipeline.take_changes()
    entries.insert(0, (changelog.event_key("damaged"), b'{"s":1,"t":5,"q":0,"r":{}}'))

    restored, corrupt = PartitionPipeline.restore(entries, CONFIG)

    assert corrupt == 1
    assert restored.buffered == 1  # the readable record is still there
    assert [o.key for o in restored.tick(T0 + 10**9, caught_up=True)] == [b"1"]


def test_an_id_that_comes_and_leaves_the_window_in_one_pass_gets_its_tombstone() -> None:
    """Or the compacted changelog keeps an entry for it until some restore expires it."""
    config = WindowConfig(dedup_window_ms=10_000, lateness_ms=0)
    pipeline = PartitionPipeline(config, wall_clock_ms=T0 + 10**6)
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0), T0))
    pipeline.accept(raw(login_body(user_id=2, at_ms=T0 + 20_000), T0 + 20_000))  # 1 expires
    log = pipeline.take_changes()
    for n in range(3, 8):
        at_ms = T0 + n * 20_000
        pipeline.accept(raw(login_body(user_id=n, at_ms=at_ms), at_ms))
        log += pipeline.take_changes()

    folded = changelog.fold(log)

    assert len(folded.events) == pipeline.dedup_entries == 1


def test_a_record_waiting_past_its_dedup_window_keeps_its_entry_and_drops_copies() -> None:
    """Its watermark moves only with newer logins (or the wall clock once caught up): late
    retries move the dedup clock past its id while it waits, as in a lagging partition."""
    config = WindowConfig(dedup_window_ms=720_000, lateness_ms=120_000)
    pipeline = PartitionPipeline(config, wall_clock_ms=T0)
    log: list[tuple[bytes, bytes | None]] = []
    pipeline.accept(raw(login_body(user_id=1, at_ms=T0 - 600_000), T0))
    waiting = login_body(user_id=2, at_ms=T0)
    pipeline.accept(raw(waiting, T0))
    log += pipeline.take_changes()
    for minute in range(1, 15):  # 14 minutes of 3-hour-old retries: all late
        now_ms = T0 + minute * 60_000
        pipeline.tick(now_ms, caught_up=False)
        retry = raw(login_body(user_id=100 + minute, at_ms=T0 - 3 * 3_600_000), now_ms)
        assert [o.route for o in pipeline.accept(retry)] == [Route.LATE]
        log += pipeline.take_changes()
    assert pipeline.accept(raw(waiting, now_ms)) == []  # a copy while the first still waits
    log += pipeline.take_changes()

    restored, corrupt = PartitionPipeline.restore(log, config, now_ms=now_ms)

    assert corrupt == 0
    assert pipeline.buffered == restored.buffered == 1
    for state in (pipeline, restored):
        released = state.tick(now_ms + 10**9, caught_up=True)
        assert [o.key for o in released] == [b"2"]
    # Released, its id (long out of the window) is forgotten by the changelog too.
    log += pipeline.take_changes()
    assert len(changelog.fold(log).events) == pipeline.dedup_entries
