"""The sliding-window limiter, driven by an explicit clock."""

from __future__ import annotations

import random

import pytest

from consumers.sinks.ratelimit import SlidingWindowLimiter


def test_allows_the_limit_at_once_then_waits_for_the_oldest_request_to_leave_the_window() -> None:
    limiter = SlidingWindowLimiter(max_requests=3, window_s=10)
    assert [limiter.acquire(0.0), limiter.acquire(1.0), limiter.acquire(2.0)] == [0, 0, 0]
    assert limiter.acquire(3.0) == pytest.approx(7.0)
    assert limiter.acquire(10.0) == 0
    assert limiter.acquire(10.5) == pytest.approx(0.5)


def test_a_refused_request_is_not_counted() -> None:
    limiter = SlidingWindowLimiter(max_requests=1, window_s=1)
    assert limiter.acquire(0.0) == 0
    for _ in range(10):
        assert limiter.acquire(0.5) > 0
    assert limiter.acquire(1.0) == 0


def test_never_more_than_the_limit_in_any_window_even_across_window_edges() -> None:
    rng = random.Random(11)
    limiter = SlidingWindowLimiter(max_requests=190, window_s=10)
    now, sent = 0.0, []
    while now < 60:
        wait = limiter.acquire(now)
        if wait == 0:
            sent.append(now)
        now += wait if wait > 0 else rng.uniform(0, 0.05)
    for i, start in enumerate(sent):
        in_window = [t for t in sent[i:] if t < start + 10]
        assert len(in_window) <= 190
    assert len(sent) >= 190 * 5  # and it does not hold back more than it must


def test_block_until_holds_every_request_and_never_shortens_a_block() -> None:
    limiter = SlidingWindowLimiter(max_requests=100, window_s=10)
    limiter.block_until(5.0)
    limiter.block_until(3.0)
    assert limiter.acquire(1.0) == pytest.approx(4.0)
    assert limiter.acquire(5.0) == 0


@pytest.mark.parametrize(("requests", "window_s"), [(0, 10.0), (1, 0.0), (5, -1.0)])
def test_bad_limits_are_refused_early(requests: int, window_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        SlidingWindowLimiter(max_requests=requests, window_s=window_s)


def test_a_request_counts_until_its_answer_so_a_slow_one_cannot_let_the_next_arrive_early() -> None:
    limiter = SlidingWindowLimiter(max_requests=2, window_s=10)
    assert limiter.acquire(0.0) == 0
    limiter.finished(0.0, 3.0)  # the server may have counted it as late as 3.0
    assert limiter.acquire(4.0) == 0
    limiter.finished(4.0, 4.1)
    assert limiter.acquire(10.0) == pytest.approx(3.0)
    assert limiter.acquire(13.0) == 0


def test_finishing_a_request_that_left_the_window_changes_nothing() -> None:
    limiter = SlidingWindowLimiter(max_requests=1, window_s=1)
    assert limiter.acquire(0.0) == 0
    assert limiter.acquire(2.0) == 0
    limiter.finished(0.0, 2.5)
    assert limiter.delay_s(2.9) == pytest.approx(0.1)
