"""Retry policy: what an answer means, how long to wait, and Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from consumers.sinks.crm_retry import (
    Backoff,
    RetryReason,
    Verdict,
    classify_status,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("status", "verdict", "reason"),
    [
        (200, Verdict.ACCEPTED, None),
        (207, Verdict.ACCEPTED, None),
        (429, Verdict.RETRY, RetryReason.RATE_LIMITED),
        (500, Verdict.RETRY, RetryReason.SERVER_ERROR),
        (503, Verdict.RETRY, RetryReason.SERVER_ERROR),
        (408, Verdict.RETRY, RetryReason.SERVER_ERROR),
        (401, Verdict.RETRY, RetryReason.UNAUTHORIZED),
        (403, Verdict.RETRY, RetryReason.UNAUTHORIZED),
        (301, Verdict.RETRY, RetryReason.REDIRECTED),
        (308, Verdict.RETRY, RetryReason.REDIRECTED),
        (404, Verdict.RETRY, RetryReason.WRONG_URL),
        (405, Verdict.RETRY, RetryReason.WRONG_URL),
        (410, Verdict.RETRY, RetryReason.WRONG_URL),
        (400, Verdict.REJECTED, None),
        (409, Verdict.REJECTED, None),
        (422, Verdict.REJECTED, None),
    ],
)
def test_status_classification(status: int, verdict: Verdict, reason: RetryReason | None) -> None:
    assert classify_status(status) == (verdict, reason)


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=10, jitter=0)
    assert [backoff.delay_s(n) for n in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay_s(10_000) == 10


def test_jitter_stays_within_its_fraction_and_under_the_cap() -> None:
    backoff = Backoff(initial_s=1, max_s=4, jitter=0.2)
    assert backoff.delay_s(0, draw=0.0) == pytest.approx(0.8)
    assert backoff.delay_s(0, draw=0.999) == pytest.approx(1.2, abs=0.001)
    assert backoff.delay_s(5, draw=0.999) == 4


def test_retry_after_is_a_lower_bound() -> None:
    backoff = Backoff(initial_s=0.5, max_s=60, jitter=0)
    assert backoff.delay_s(0, retry_after_s=7) == 7
    assert backoff.delay_s(6, retry_after_s=1) == 32


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
    later = format_datetime(datetime(2026, 11, 29, 10, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after("3", now_epoch_s=now.timestamp()) == 3
    assert parse_retry_after(" 1.5 ", now_epoch_s=0) == 1.5
    assert parse_retry_after(later, now_epoch_s=now.timestamp()) == pytest.approx(30)
    assert parse_retry_after("-4", now_epoch_s=0) == 0
    assert parse_retry_after(None, now_epoch_s=0) is None
    assert parse_retry_after("soon", now_epoch_s=0) is None
    assert parse_retry_after("inf", now_epoch_s=0) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0}, {"initial_s": 5, "max_s": 1}, {"multiplier": 0.5}, {"jitter": 1.0}],
)
def test_bad_backoff_is_refused_early(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        Backoff(**kwargs)
