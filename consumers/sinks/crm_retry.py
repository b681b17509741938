"""When to retry a CRM request and how long to wait: pure, the caller sleeps.

A CRM answer is one of: accepted, retryable (the CRM or the network is not able to take it
now; try the same request again later, never losing the Kafka position), or rejected (the
request itself is wrong; retrying cannot help, the records go to the dead-letter topic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum


class RetryReason(StrEnum):
    """Why a request is retried; stable codes, used as a metric label."""

    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    UNAUTHORIZED = "unauthorized"
    REDIRECTED = "redirected"
    WRONG_URL = "wrong_url"
    UNEXPECTED_ANSWER = "unexpected_answer"
    RECORD_RETRYABLE = "record_retryable"


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REJECTED = "rejected"


def classify_status(status: int) -> tuple[Verdict, RetryReason | None]:
    """What an HTTP status of a whole request means for it.

    401 and 403 are retried, not rejected: a wrong or expired credential is an operator's
    problem that must not send every record to the dead-letter topic while it lasts. So is a
    3xx: the URL is wrong (http for https, a moved path), and following the redirect would
    turn the POST into a GET whose 200 says nothing about the contacts. And so are 404, 405
    and 410: no contact makes a batch endpoint unknown, the URL is wrong, and rejected, every
    contact would go to the dead-letter topic and be marked handled (a replay once the URL is
    fixed would send none of them).
    """
    if 200 <= status < 300:
        return Verdict.ACCEPTED, None
    if 300 <= status < 400:
        return Verdict.RETRY, RetryReason.REDIRECTED
    if status == 429:
        return Verdict.RETRY, RetryReason.RATE_LIMITED
    if status in (401, 403):
        return Verdict.RETRY, RetryReason.UNAUTHORIZED
    if status in (404, 405, 410):
        return Verdict.RETRY, RetryReason.WRONG_URL
    if status in (408, 425) or status >= 500:
        return Verdict.RETRY, RetryReason.SERVER_ERROR
    return Verdict.REJECTED, None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``initial_s * multiplier**attempt``, capped at ``max_s``.

    ``jitter`` (a fraction, default 0.2) spreads instances that failed together; the random
    draw in [0, 1) is passed in so the policy stays deterministic under test. Defaults:
    0.5 s initial, doubling, 60 s at most.
    """

    initial_s: float = 0.5
    max_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError("need 0 < initial_s <= max_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay_s(
        self, attempt: int, *, draw: float = 0.5, retry_after_s: float | None = None
    ) -> float:
        """Wait before retry number ``attempt`` (0 for the first retry).

        A server's ``Retry-After`` is honoured as a lower bound (never retried earlier).
        """
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        base_s = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        wait_s = base_s * (1 - self.jitter + 2 * self.jitter * draw)
        wait_s = min(wait_s, self.max_s)
        if retry_after_s is not None:
            wait_s = max(wait_s, retry_after_s)
        return wait_s


def parse_retry_after(value: str | None, *, now_epoch_s: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); None if absent."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_epoch_s)
