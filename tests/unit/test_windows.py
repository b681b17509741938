from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from consumers.pipeline.windows import (
    HOUR_MS,
    MINUTE_MS,
    Deduplicator,
    ReorderBuffer,
    VisitTracker,
    visit_id_for,
)

T0 = 1_700_000_000_000  # an epoch-ms instant in 2023

# --------------------------------------------------------------------------------------------
# Deduplicator


def test_duplicate_within_the_window_is_emitted_once() -> None:
    dedup = Deduplicator(window_ms=10_000)
    assert dedup.check("e1", T0)
    assert not dedup.check("e1", T0 + 1)
    assert not dedup.check("e1", T0 + 9_999)
    assert dedup.check("e2", T0 + 9_999)


def test_duplicate_at_or_beyond_the_window_is_emitted_again() -> None:
    dedup = Deduplicator(window_ms=10_000)
    assert dedup.check("e1", T0)
    assert dedup.check("e1", T0 + 10_000)
    assert not dedup.check("e1", T0 + 10_001)
    assert dedup.check("e1", T0 + 50_000)


def test_default_window_covers_the_senders_three_hour_retries() -> None:
    dedup = Deduplicator()
    assert dedup.check("e1", T0)
    for retry in range(1, 7):
        assert not dedup.check("e1", T0 + retry * 3 * HOUR_MS)


def test_expiry_bounds_memory_to_the_ids_of_one_window() -> None:
    dedup = Deduplicator(window_ms=1_000)
    for i in range(10_000):
        assert dedup.check(f"e{i}", T0 + i * 10)  # 100 new ids per window
        assert len(dedup) <= 100
    assert dedup.expire(T0 + 10_000 * 10 + 1_000) == 100
    assert len(dedup) == 0


def test_clock_going_backwards_neither_readmits_nor_unexpires() -> None:
    dedup = Deduplicator(window_ms=1_000)
    assert dedup.check("new", T0 + 5_000)
    assert dedup.check("old", T0)  # an earlier time is recorded at the clock
    assert not dedup.check("old", T0 + 5_999)
    assert dedup.check("old", T0 + 6_000)


def test_restored_dedup_keeps_ids_and_their_expiry() -> None:
    seen = [("b", T0 + 500), ("a", T0)]  # any order: expiry goes by first-seen time
    restored = Deduplicator.restore(seen, clock_ms=T0 + 500, window_ms=1_000)
    assert len(restored) == 2
    assert restored.clock_ms == T0 + 500
    assert not restored.check("a", T0 + 999)
    assert restored.check("a", T0 + 1_000)
    assert not restored.check("b", T0 + 1_499)


def test_restoring_with_a_shorter_window_expires_at_once() -> None:
    seen = [("a", T0), ("b", T0 + 5_000)]
    restored = Deduplicator.restore(seen, clock_ms=T0 + 5_000, window_ms=1_000)
    assert len(restored) == 1
    assert restored.check("a", T0 + 5_000)


# --------------------------------------------------------------------------------------------
# VisitTracker


def test_logins_with_gaps_under_the_limit_form_one_visit() -> None:
    tracker = VisitTracker(gap_ms=30 * MINUTE_MS)
    visits = [tracker.assign("u1", "v1", T0 + i * 29 * MINUTE_MS) for i in range(5)]
    assert len({v.visit_id for v in visits}) == 1
    assert [v.login_count for v in visits] == [1, 2, 3, 4, 5]
    assert visits[-1].first_login_ms == T0
    assert visits[-1].last_login_ms == T0 + 4 * 29 * MINUTE_MS


def test_a_gap_of_exactly_the_limit_opens_a_new_visit() -> None:
    tracker = VisitTracker(gap_ms=30 * MINUTE_MS)
    first = tracker.assign("u1", "v1", T0)
    second = tracker.assign("u1", "v1", T0 + 30 * MINUTE_MS)
    assert second.is_new
    assert second.visit_id != first.visit_id
    assert second.login_count == 1


def test_is_new_is_true_only_for_the_first_login_of_a_visit() -> None:
    tracker = VisitTracker(gap_ms=1_000)
    flags = [tracker.assign("u1", "v1", T0 + t).is_new for t in (0, 500, 900, 5_000, 5_100)]
    assert flags == [True, False, False, True, False]


def test_visit_id_is_a_hash_of_user_venue_and_first_login() -> None:
    visit = VisitTracker().assign("u1", "v1", T0)
    assert visit.visit_id == visit_id_for("u1", "v1", T0)
    assert len(visit.visit_id) == 32
    assert visit_id_for("u1", "v1", T0) != visit_id_for("u1", "v1", T0 + 1)
    assert visit_id_for("u1", "v1", T0) != visit_id_for("v1", "u1", T0)


def test_visit_ids_are_stable_across_a_replay() -> None:
    rng = random.Random(7)
    logins = [
        (f"u{rng.randrange(5)}", f"v{rng.randrange(3)}", T0 + rng.randrange(6 * HOUR_MS))
        for _ in range(500)
    ]
    tracker = VisitTracker()
    first_run = [tracker.assign(*login) for login in logins]
    replay = VisitTracker()
    assert [replay.assign(*login) for login in logins] == first_run


def test_visits_are_separate_per_venue_and_per_user() -> None:
    tracker = VisitTracker(gap_ms=HOUR_MS)
    a = tracker.assign("u1", "v1", T0)
    b = tracker.assign("u1", "v2", T0 + 1)
    c = tracker.assign("u2", "v1", T0 + 2)
    assert [a.is_new, b.is_new, c.is_new] == [True, True, True]
    assert len({a.visit_id, b.visit_id, c.visit_id}) == 3
    again = tracker.assign("u1", "v1", T0 + 3)
    assert (again.visit_id, again.is_new, again.login_count) == (a.visit_id, False, 2)


def test_late_login_inside_a_visit_joins_it() -> None:
    tracker = VisitTracker(gap_ms=10_000)
    opened = tracker.assign("u1", "v1", T0)
    tracker.assign("u1", "v1", T0 + 8_000)
    late = tracker.assign("u1", "v1", T0 + 4_000)
    assert (late.visit_id, late.is_new, late.login_count) == (opened.visit_id, False, 3)
    assert (late.first_login_ms, late.last_login_ms) == (T0, T0 + 8_000)


def test_late_login_shortly_before_a_visit_joins_it_and_keeps_its_id() -> None:
    tracker = VisitTracker(gap_ms=10_000)
    opened = tracker.assign("u1", "v1", T0)
    late = tracker.assign("u1", "v1", T0 - 9_999)
    assert (late.visit_id, late.is_new, late.first_login_ms) == (opened.visit_id, False, T0 - 9_999)
    earlier = tracker.assign("u1", "v1", T0 - 9_999 - 10_000)
    assert earlier.is_new


def test_late_login_between_two_visits_joins_the_nearer_and_the_earlier_on_a_tie() -> None:
    tracker = VisitTracker(gap_ms=10_000)
    a = tracker.assign("u1", "v1", T0)
    b = tracker.assign("u1", "v1", T0 + 15_000)
    assert tracker.assign("u1", "v1", T0 + 9_000).visit_id == b.visit_id  # 9 s vs 6 s
    assert tracker.assign("u1", "v1", T0 + 4_000).visit_id == a.visit_id  # 4 s vs 5 s
    tie = VisitTracker(gap_ms=10_000)
    a = tie.assign("u1", "v1", T0)
    tie.assign("u1", "v1", T0 + 16_000)
    assert tie.assign("u1", "v1", T0 + 8_000).visit_id == a.visit_id
    assert len(tie) == 2  # joined, never merged


def test_late_login_far_from_known_visits_opens_its_own_visit() -> None:
    tracker = VisitTracker(gap_ms=10_000)
    current = tracker.assign("u1", "v1", T0 + HOUR_MS)
    late = tracker.assign("u1", "v1", T0)
    assert (late.is_new, late.visit_id) == (True, visit_id_for("u1", "v1", T0))
    follow_up = tracker.assign("u1", "v1", T0 + HOUR_MS + 1)
    assert (follow_up.visit_id, follow_up.login_count) == (current.visit_id, 2)


def test_finished_visits_expire_and_their_state_is_dropped() -> None:
    tracker = VisitTracker(gap_ms=MINUTE_MS, retention_ms=HOUR_MS)
    for user in range(100):
        tracker.assign(f"u{user}", "v1", T0)
    assert len(tracker) == 100
    assert tracker.expire(T0 + HOUR_MS - 1) == 0
    assert tracker.expire(T0 + HOUR_MS) == 100
    assert len(tracker) == 0
    assert tracker.spans("u1", "v1") == []


def test_old_visits_of_a_key_are_pruned_when_the_key_is_seen_again() -> None:
    tracker = VisitTracker(gap_ms=MINUTE_MS, retention_ms=HOUR_MS)
    for i in range(5):
        tracker.assign("u1", "v1", T0 + i * HOUR_MS)
    assert len(tracker) == 1


def test_a_login_later_than_the_retention_cannot_rejoin_its_visit() -> None:
    tracker = VisitTracker(gap_ms=10 * MINUTE_MS, retention_ms=HOUR_MS)
    tracker.assign("u1", "v1", T0)
    tracker.assign("u2", "v1", T0 + 2 * HOUR_MS)  # moves the clock
    late = tracker.assign("u1", "v1", T0 + 1)
    assert late.is_new
    assert len(tracker) == 1  # the late visit is already past retention: not kept


def test_visit_state_round_trip_mid_stream_gives_the_same_visits() -> None:
    rng = random.Random(11)
    logins = [
        (f"u{rng.randrange(4)}", f"v{rng.randrange(2)}", T0 + rng.randrange(3 * HOUR_MS))
        for _ in range(300)
    ]
    tracker = VisitTracker(gap_ms=20 * MINUTE_MS, retention_ms=2 * HOUR_MS)
    expected = [tracker.assign(*login) for login in logins]
    first = VisitTracker(gap_ms=20 * MINUTE_MS, retention_ms=2 * HOUR_MS)
    got = [first.assign(*login) for login in logins[:150]]
    keys = {(user, venue) for user, venue, _ in logins}
    resumed = VisitTracker.restore(
        [(user, venue, first.spans(user, venue)) for user, venue in keys],
        clock_ms=first.clock_ms,
        gap_ms=20 * MINUTE_MS,
        retention_ms=2 * HOUR_MS,
    )
    got += [resumed.assign(*login) for login in logins[150:]]
    assert got == expected


def test_retention_shorter_than_the_gap_is_refused() -> None:
    with pytest.raises(ValueError, match="retention_ms"):
        VisitTracker(gap_ms=HOUR_MS, retention_ms=MINUTE_MS)


# --------------------------------------------------------------------------------------------
# ReorderBuffer


def drain(buffer: ReorderBuffer[bytes], now_ms: int) -> list[bytes]:
    buffer.advance(now_ms)
    return buffer.release()


def item(event_ms: int, tag: str = "") -> bytes:
    return f"{event_ms}{tag}".encode()


def test_shuffled_input_within_the_lateness_is_released_sorted() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=1_000)
    times = [T0 + t for t in (500, 0, 900, 100, 1_000, 300, 999, 200)]
    released: list[bytes] = []
    for t in times:
        assert not buffer.add(item(t), t).late
        released += buffer.release()
    released += drain(buffer, T0 + 10_000)
    assert released == [item(t) for t in sorted(times)]


def test_an_item_exactly_lateness_older_than_the_newest_is_released() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=1_000)
    buffer.add(item(T0), T0)
    buffer.add(item(T0 + 1), T0 + 1)
    buffer.add(item(T0 + 999), T0 + 999)
    assert buffer.release() == []
    buffer.add(item(T0 + 1_000), T0 + 1_000)
    assert buffer.watermark_ms == T0
    assert buffer.release() == [item(T0)]
    assert len(buffer) == 3  # T0 + 1 is 999 ms older than the newest: held


def test_equal_event_times_keep_arrival_order() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=0)
    buffer.add(item(T0 + 1, "a"), T0 + 1)
    buffer.add(item(T0, "b"), T0)
    buffer.add(item(T0 + 1, "c"), T0 + 1)
    buffer.add(item(T0, "d"), T0)
    assert buffer.release() == [item(T0, "b"), item(T0, "d"), item(T0 + 1, "a"), item(T0 + 1, "c")]


def test_an_idle_partition_is_released_by_the_wall_clock() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=MINUTE_MS)
    buffer.add(item(T0), T0)
    buffer.add(item(T0 + 10), T0 + 10)
    assert buffer.release() == []
    assert drain(buffer, T0 + MINUTE_MS - 1) == []
    assert drain(buffer, T0 + MINUTE_MS) == [item(T0)]
    assert drain(buffer, T0 + MINUTE_MS + 10) == [item(T0 + 10)]


def test_an_older_wall_clock_never_moves_the_watermark_back() -> None:
    assert ReorderBuffer[bytes](lateness_ms=1_000).watermark_ms is None
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=1_000)
    assert buffer.release() == []
    buffer.add(item(T0 + 5_000), T0 + 5_000)
    buffer.advance(T0)
    assert buffer.watermark_ms == T0 + 4_000
    buffer.advance(T0 + 9_000)
    buffer.advance(T0 + 2_000)
    assert buffer.watermark_ms == T0 + 8_000


def test_an_item_older_than_what_was_released_is_late_and_not_buffered() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=1_000)
    buffer.add(item(T0 + 500), T0 + 500)
    assert drain(buffer, T0 + 1_500) == [item(T0 + 500)]
    added = buffer.add(item(T0 + 499), T0 + 499)
    assert added.late
    assert added.buffered == 0
    assert buffer.release() == []


def test_an_item_at_the_released_time_or_only_behind_the_watermark_is_still_in_order() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=1_000)
    buffer.add(item(T0 + 500), T0 + 500)
    assert drain(buffer, T0 + 3_000) == [item(T0 + 500)]  # watermark now T0 + 2000
    assert not buffer.add(item(T0 + 500, "again"), T0 + 500).late
    assert not buffer.add(item(T0 + 1_500), T0 + 1_500).late
    assert buffer.release() == [item(T0 + 500, "again"), item(T0 + 1_500)]


def test_the_buffer_bound_reports_full_and_release_emits_the_oldest_early() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=HOUR_MS, max_buffered=3)
    for t in (T0 + 3, T0 + 1, T0 + 2):
        assert not buffer.is_full
        buffer.add(item(t), t)
    assert buffer.is_full
    assert buffer.release() == [item(T0 + 1)]
    assert (len(buffer), buffer.is_full) == (2, False)
    assert buffer.add(item(T0), T0).late  # older than the early release: late, not dropped


def test_reorder_restore_mid_stream_gives_the_same_output() -> None:
    rng = random.Random(3)
    ops: list[tuple[str, int]] = []
    for _ in range(200):
        if rng.random() < 0.1:
            ops.append(("tick", T0 + rng.randrange(20_000)))
        else:
            ops.append(("add", T0 + rng.randrange(20_000)))

    def run(
        buffer: ReorderBuffer[bytes], start: int, stop: int, log: list[tuple[int, int, bytes]]
    ) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for n in range(start, stop):
            op, t = ops[n]
            if op == "tick":
                buffer.advance(t)
            else:
                value = item(t, f"#{n}")
                added = buffer.add(value, t)
                if added.late:
                    out.append(("late", value))
                else:
                    assert added.seq is not None
                    log.append((t, added.seq, value))  # what a changelog records
            out += [("out", v) for v in buffer.release()]
        return out

    def fresh() -> ReorderBuffer[bytes]:
        return ReorderBuffer(lateness_ms=2_000, max_buffered=50)

    expected = run(fresh(), 0, len(ops), [])
    assert any(kind == "late" for kind, _ in expected)
    for cut in (0, 1, 57, 120, 199, 200):
        first = fresh()
        log: list[tuple[int, int, bytes]] = []
        got = run(first, 0, cut, log)
        second: ReorderBuffer[bytes] = ReorderBuffer.restore(
            log,  # every item ever added: the released ones are skipped
            next_seq=first.next_seq,
            max_event_ms=first.max_event_ms,
            wall_ms=first.wall_ms,
            released_through=first.released_through,
            lateness_ms=2_000,
            max_buffered=50,
        )
        assert len(second) == len(first)
        got += run(second, cut, len(ops), log)
        assert got == expected


def test_a_full_buffer_releases_early_only_when_asked() -> None:
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=HOUR_MS, max_buffered=2)
    buffer.add(item(T0 + 2), T0 + 2)
    buffer.add(item(T0 + 1), T0 + 1)
    assert buffer.is_full
    assert buffer.release(early=False) == []
    assert buffer.is_full
    assert buffer.release() == [item(T0 + 1)]


@pytest.mark.parametrize("seed", range(20))
def test_random_shuffles_are_never_dropped_and_release_in_order(seed: int) -> None:
    rng = random.Random(seed)
    lateness_ms = rng.choice((0, 50, 500))
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=lateness_ms, max_buffered=64)
    times = [T0 + rng.randrange(2_000) for _ in range(300)]
    key_of = {item(t, f"#{n}"): (t, n) for n, t in enumerate(times)}
    released: list[bytes] = []
    late: list[bytes] = []
    for value, (t, _) in key_of.items():
        if buffer.add(value, t).late:
            late.append(value)
        released += buffer.release()
        assert len(buffer) < 64
    released += drain(buffer, T0 + 10_000)
    assert len(buffer) == 0
    assert sorted(released + late) == sorted(key_of)
    order = [key_of[value] for value in released]
    assert order == sorted(order)
    assert all(key_of[value][0] < max(t for t, _ in order) for value in late)


@pytest.mark.parametrize("seed", range(20))
def test_disorder_within_the_lateness_is_never_late(seed: int) -> None:
    rng = random.Random(seed)
    lateness_ms = 1_000
    buffer: ReorderBuffer[bytes] = ReorderBuffer(lateness_ms=lateness_ms)
    newest = T0
    times: list[int] = []
    for _ in range(500):
        newest += rng.randrange(50)
        times.append(newest - rng.randrange(lateness_ms + 1))
    released: list[bytes] = []
    for n, t in enumerate(times):
        assert not buffer.add(item(t, f"#{n}"), t).late
        released += buffer.release()
    released += drain(buffer, newest + lateness_ms)
    expected = sorted(range(len(times)), key=lambda n: (times[n], n))
    assert released == [item(times[n], f"#{n}") for n in expected]


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "build",
    [
        lambda: Deduplicator(window_ms=0),
        lambda: VisitTracker(gap_ms=0),
        lambda: ReorderBuffer[bytes](lateness_ms=-1),
        lambda: ReorderBuffer[bytes](max_buffered=0),
    ],
)
def test_constructors_refuse_impossible_settings(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must"):
        build()
