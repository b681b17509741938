"""A sliding-window request limiter with an explicit clock (pure: the caller sleeps).

HubSpot counts requests per app in a rolling window (by default 190 per 10 s for the tiers
this project targets); a sliding log of request times keeps the sink under such a limit at
every instant, where a fixed window would allow twice the limit across a window edge.

The server counts a request when it arrives, which is some time after the client sent it.
A request is therefore logged when it is sent and logged again, later, when its answer came
back (:meth:`SlidingWindowLimiter.finished`): the server saw it in between, so a slow request
can never let a later one reach the server inside the same window.
"""

from __future__ import annotations

import bisect
from collections import deque


class SlidingWindowLimiter:
    """At most ``max_requests`` in any ``window_s`` seconds.

    :meth:`acquire` takes the current time in seconds (any monotonic clock) and either records
    a request and answers 0, or answers how many seconds to wait before asking again.
    :meth:`block_until` makes every request wait until a time (a server's ``Retry-After``).
    """

    def __init__(self, *, max_requests: int, window_s: float) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.max_requests = max_requests
        self.window_s = window_s
        self._sent_at_s: deque[float] = deque()
        self._blocked_until_s = float("-inf")

    def delay_s(self, now_s: float) -> float:
        """Seconds until a request may be sent (0: now); records nothing."""
        while self._sent_at_s and self._sent_at_s[0] <= now_s - self.window_s:
            self._sent_at_s.popleft()
        wait_s = max(0.0, self._blocked_until_s - now_s)
        if len(self._sent_at_s) >= self.max_requests:
            oldest_s = self._sent_at_s[len(self._sent_at_s) - self.max_requests]
            wait_s = max(wait_s, oldest_s + self.window_s - now_s)
        return wait_s

    def acquire(self, now_s: float) -> float:
        """Record a request at ``now_s`` and answer 0, or answer the wait without recording."""
        wait_s = self.delay_s(now_s)
        if wait_s > 0:
            return wait_s
        self._sent_at_s.append(now_s)
        return 0.0

    def finished(self, sent_s: float, answered_s: float) -> None:
        """The request sent at ``sent_s`` got its answer at ``answered_s``: count it from then."""
        try:
            self._sent_at_s.remove(sent_s)
        except ValueError:
            return  # it left the window already
        bisect.insort(self._sent_at_s, answered_s)

    def block_until(self, until_s: float) -> None:
        """No request before ``until_s`` (never shortens an earlier block)."""
        self._blocked_until_s = max(self._blocked_until_s, until_s)
