"""The CRM requests of one batch still to send, and what a failed request means (pure).

A CRM that answers 5xx to every request is down. One that answers 5xx only to the requests
that hold a given contact chokes on that contact, and sending the same request again would
stall the sink for ever. One answer cannot tell the two apart, so :class:`RequestQueue`:

- splits a request of several contacts in halves once it failed ``split_after`` times in a
  row with a server error; the halves the CRM accepts are done;
- sends a request that failed again only after the others waiting, so they get their turn
  (and the chance to show that the CRM is up);
- gives a lone contact up (the caller dead-letters it) only when the CRM is demonstrably up
  and this contact alone fails: it failed ``max_attempts`` times in a row, the CRM accepted
  another request after the requests holding it began to fail, and no other request failed
  since the CRM's latest acceptance. In an outage the CRM accepts nothing, so nothing is
  ever given up; the requests are retried until it is back.

A lone contact that failed on every attempt since the CRM's latest acceptance (alone in its
batch, say) cannot meet that test: :attr:`RequestQueue.needs_other_work` says so, and the
caller may add other items (the records read next), whose acceptance would show the CRM up.
One case cannot be told from a contact the CRM chokes on: the CRM fails a contact once,
accepts the others, then goes down while that contact is the only one left; it is given up.

No I/O and no clock: the caller sends, waits and says what the CRM answered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Outcome(StrEnum):
    """What becomes of a request after a server error."""

    RETRY = "retry"
    """It waits behind the others and is sent again."""
    SPLIT = "split"
    """Its halves wait in its place."""
    GIVE_UP = "give_up"
    """A lone contact the CRM fails on while it takes other requests; not sent again."""


@dataclass(eq=False, slots=True)
class Request(Generic[T]):
    """Contacts sent together. ``failures``: server errors in a row (since it was formed).

    Compared (and hashed) by identity: two requests of the same items are two requests.
    """

    items: list[T]
    failures: int = 0
    accepted_at_first_failure: int | None = field(default=None, repr=False)
    """The queue's count of accepted requests when this one, or the request it was split
    from, first failed: since then, requests holding these items have been failing."""


class RequestQueue(Generic[T]):
    """The requests of a batch that wait to be sent, at most ``max_batch_size`` items each.

    ``split_after``: server errors in a row before a request of several items is split;
    ``max_attempts``: server errors in a row before a lone item may be given up. Both >= 1.
    """

    def __init__(
        self,
        items: Sequence[T],
        *,
        max_batch_size: int,
        split_after: int,
        max_attempts: int,
    ) -> None:
        if max_batch_size < 1 or split_after < 1 or max_attempts < 1:
            raise ValueError("max_batch_size, split_after and max_attempts must be >= 1")
        self._max_batch_size = max_batch_size
        self._split_after = split_after
        self._max_attempts = max_attempts
        self._waiting: deque[Request[T]] = deque()
        self._accepted = 0
        # Requests that failed (for any reason) since the CRM last accepted one.
        self._failed_since_accepted: set[Request[T]] = set()
        self.add(items)

    def __len__(self) -> int:
        return len(self._waiting)

    def items(self) -> Iterator[T]:
        """Every item still waiting."""
        for request in self._waiting:
            yield from request.items

    def add(self, items: Sequence[T]) -> None:
        """More items (the batch grew): sent before the requests that already failed, so a
        CRM that takes them shows it is up."""
        size = self._max_batch_size
        fresh = [self._request(items[i : i + size]) for i in range(0, len(items), size)]
        self._waiting.extendleft(reversed(fresh))

    def add_first(self, items: Sequence[T]) -> None:
        """Items to send next, in one request (those a multi-status answer asked to retry)."""
        if items:
            self._waiting.appendleft(self._request(items))

    def pop(self) -> Request[T]:
        """The request to send now; the caller reports what became of it."""
        return self._waiting.popleft()

    def accepted(self, request: Request[T]) -> None:
        """The CRM answered 2xx: it is up."""
        self._accepted += 1
        self._failed_since_accepted.clear()

    def refused(self, request: Request[T]) -> bool:
        """The CRM refused the request as a whole (a 4xx): its halves go first, to find the
        items at fault. False for a lone item, which the caller rejects."""
        if len(request.items) == 1:
            return False
        half = len(request.items) // 2
        self._waiting.appendleft(self._request(request.items[half:]))
        self._waiting.appendleft(self._request(request.items[:half]))
        return True

    def unavailable(self, request: Request[T]) -> None:
        """Not taken now for a reason unrelated to its items (rate limit, timeout, a refused
        credential): the same request goes first again."""
        self._failed_since_accepted.add(request)
        self._waiting.appendleft(request)

    def failed_in_part(self, request: Request[T], items: Sequence[T]) -> Outcome:
        """The CRM took ``request`` (see :meth:`accepted`) but answered ``items`` of it with a
        retryable error (a multi-status answer): they fail as a request of their own, which
        keeps the failures in a row of the request, like a server error (:meth:`server_error`).
        So they are retried for as long as the CRM fails, and a lone item is given up only
        while the CRM takes other requests."""
        part = Request(
            list(items),
            failures=request.failures,
            accepted_at_first_failure=request.accepted_at_first_failure,
        )
        return self.server_error(part)

    def deferred(self, request: Request[T]) -> None:
        """Not sent (the client's own rate limit holds it): it goes first again, and nothing
        is learnt about the CRM."""
        self._waiting.appendleft(request)

    def server_error(self, request: Request[T]) -> Outcome:
        """The CRM answered 5xx to the whole request: retry it, split it, or give it up."""
        request.failures += 1
        if request.accepted_at_first_failure is None:
            request.accepted_at_first_failure = self._accepted
        crm_up = self._accepted > request.accepted_at_first_failure and not (
            self._failed_since_accepted - {request}
        )
        # Even when it is given up, its failure counts against the verdict on the others
        # until the CRM accepts a request again: the CRM may have gone down just now.
        self._failed_since_accepted.add(request)
        if len(request.items) == 1 and request.failures >= self._max_attempts and crm_up:
            return Outcome.GIVE_UP
        if len(request.items) > 1 and request.failures >= self._split_after:
            half = len(request.items) // 2
            since = request.accepted_at_first_failure
            self._waiting.append(Request(request.items[:half], accepted_at_first_failure=since))
            self._waiting.append(Request(request.items[half:], accepted_at_first_failure=since))
            return Outcome.SPLIT
        self._waiting.append(request)
        return Outcome.RETRY

    @property
    def needs_other_work(self) -> bool:
        """Every request waiting failed since the CRM last accepted one, at least one with a
        server error: only a request of other items (more records) can show whether the CRM
        is up, and so whether a lone item failing is at fault or waiting out an outage."""
        return (
            bool(self._waiting)
            and all(r in self._failed_since_accepted for r in self._waiting)
            and any(r.failures for r in self._waiting)
        )

    def _request(self, items: Sequence[T]) -> Request[T]:
        return Request(list(items))
