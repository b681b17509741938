"""The pipeline's stateful core: exact dedup, visit windows and a bounded reorder buffer.

Nothing here talks to Kafka, reads a clock or touches the disk. Every method takes its time as
integer epoch milliseconds and every component keeps its state in memory. Each exposes what a
changelog needs to persist it entry by entry and a ``restore()`` that rebuilds it from those
entries (:mod:`consumers.pipeline.changelog` holds the encoding). Configuration (windows,
bounds) is not part of the state: it comes from the settings each time a component is built or
restored.

Clocks: each component keeps its own monotonic clock, the largest time it has been given. A time
that goes backwards never un-expires anything; it is handled as an out-of-order input.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import orjson

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS

DEFAULT_DEDUP_WINDOW_MS = 24 * HOUR_MS
"""Covers the sender's 3-hour retry cycle several times over, plus any lateness."""
DEFAULT_VISIT_GAP_MS = 30 * MINUTE_MS
DEFAULT_VISIT_RETENTION_MS = 24 * HOUR_MS
DEFAULT_LATENESS_MS = 2 * MINUTE_MS
"""The sender's normal delay is seconds, up to a minute or two under load."""
DEFAULT_MAX_BUFFERED = 10_000

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Exact dedup


class Deduplicator:
    """Emits each event id once within ``window_ms`` (default 24 h) of its first sighting.

    ``check(event_id, now_ms)`` answers True the first time an id is seen and False for every
    repeat until the id expires, that is once the clock reaches ``first_seen_ms + window_ms``
    (a repeat exactly ``window_ms`` later is emitted again). ``now_ms`` may be stream time or
    wall-clock time, as long as the caller is consistent; the clock is the largest value seen.

    Memory bound: one entry (the id and an int) per distinct id first seen during the last
    ``window_ms`` of the clock, i.e. about arrival rate x window. Ids are recorded at the clock,
    so insertion order is expiry order and expiry costs O(1) per expired id.
    """

    __slots__ = ("_clock_ms", "_expired", "_seen", "window_ms")

    def __init__(self, *, window_ms: int = DEFAULT_DEDUP_WINDOW_MS) -> None:
        _require_positive("window_ms", window_ms)
        self.window_ms = window_ms
        self._seen: dict[str, int] = {}
        self._clock_ms: int | None = None
        self._expired: list[str] = []

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, event_id: object) -> bool:
        """Whether ``event_id`` is within the window (a repeat of it would be dropped)."""
        return event_id in self._seen

    @property
    def clock_ms(self) -> int | None:
        """The largest time given so far; a new id is recorded at this time."""
        return self._clock_ms

    @classmethod
    def restore(
        cls,
        seen: Iterable[tuple[str, int]],
        *,
        clock_ms: int | None,
        window_ms: int = DEFAULT_DEDUP_WINDOW_MS,
    ) -> Deduplicator:
        """Rebuild from (event id, first-seen ms) entries, as kept in the changelog."""
        dedup = cls(window_ms=window_ms)
        dedup._seen = dict(sorted(seen, key=lambda pair: pair[1]))  # expiry needs age order
        times = [t for t in (clock_ms, *dedup._seen.values()) if t is not None]
        if times:
            dedup._advance(max(times))
        return dedup

    def check(self, event_id: str, now_ms: int) -> bool:
        """Return True if ``event_id`` is new within the window (emit it), False if a repeat."""
        clock_ms = self._advance(now_ms)
        if event_id in self._seen:
            return False
        self._seen[event_id] = clock_ms
        return True

    def take_expired(self) -> list[str]:
        """The ids that left the window since the last call (their changelog tombstones)."""
        expired, self._expired = self._expired, []
        return expired

    def expire(self, now_ms: int) -> int:
        """Advance the clock without a record (a timer tick); return how many ids expired."""
        before = len(self._seen)
        self._advance(now_ms)
        return before - len(self._seen)

    def _advance(self, now_ms: int) -> int:
        clock_ms = now_ms if self._clock_ms is None else max(self._clock_ms, now_ms)
        self._clock_ms = clock_ms
        horizon_ms = clock_ms - self.window_ms
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > horizon_ms:
                break
            del seen[oldest]
            self._expired.append(oldest)
        return clock_ms


# --------------------------------------------------------------------------------------------
# Visit windows


class Visit(NamedTuple):
    """The visit a login was assigned to, as it stands after that login."""

    visit_id: str
    is_new: bool
    login_count: int
    first_login_ms: int
    last_login_ms: int


_Span = tuple[str, int, int, int]
"""A visit held in state: (visit id, first login ms, last login ms, logins).

A plain tuple of a string and ints, not an object: the tracker holds about one per (user,
venue) seen in a day, and the garbage collector stops scanning such tuples, which it cannot do
for class instances (with instances, full collections took a fifth of the benchmark's time).
"""


def _distance_ms(span: _Span, login_ms: int) -> int:
    _, first_login_ms, last_login_ms, _ = span
    if login_ms < first_login_ms:
        return first_login_ms - login_ms
    return max(0, login_ms - last_login_ms)


def visit_id_for(user_id: str, venue_id: str, first_login_ms: int) -> str:
    """The deterministic id of a visit: a hash of user, venue and the visit's opening login."""
    material = orjson.dumps([user_id, venue_id, first_login_ms])
    return hashlib.blake2b(material, digest_size=16).hexdigest()


class VisitTracker:
    """Groups one user's logins at one venue into visits.

    A login joins a known visit of the same (user, venue) when it lies inside the visit or less
    than ``gap_ms`` (default 30 min) before its first or after its last login; a gap of exactly
    ``gap_ms`` opens a new visit. Out-of-order logins follow the same rule, so a late login that
    falls inside or next to an earlier visit joins it (``is_new=False``) and may move its
    ``first_login_ms`` earlier. If it is close to two visits it joins the nearer one (the
    earlier on a tie); visits are never merged, because their ids are already published.

    ``visit_id`` is :func:`visit_id_for` the login that opened the visit and never changes
    afterwards, so replaying the same input in the same order yields the same ids.

    State per (user, venue) is the short list of visits whose last login is less than
    ``retention_ms`` (default 24 h, at least ``gap_ms``) behind the clock, the largest login or
    ``expire()`` time seen. A login arriving later than that after its visit opens a new one.
    """

    __slots__ = ("_clock_ms", "_removed", "_visits", "gap_ms", "retention_ms")

    def __init__(
        self,
        *,
        gap_ms: int = DEFAULT_VISIT_GAP_MS,
        retention_ms: int = DEFAULT_VISIT_RETENTION_MS,
    ) -> None:
        _require_positive("gap_ms", gap_ms)
        if retention_ms < gap_ms:
            raise ValueError(f"retention_ms ({retention_ms}) must be at least gap_ms ({gap_ms})")
        self.gap_ms = gap_ms
        self.retention_ms = retention_ms
        self._visits: dict[tuple[str, str], tuple[_Span, ...]] = {}
        self._clock_ms: int | None = None
        self._removed: list[tuple[str, str]] = []

    def __len__(self) -> int:
        """Number of visits held in state."""
        return sum(len(spans) for spans in self._visits.values())

    @property
    def clock_ms(self) -> int | None:
        return self._clock_ms

    def spans(self, user_id: str, venue_id: str) -> list[Visit]:
        """The visits held for one (user, venue), oldest first (``is_new`` is False)."""
        return [_visit(span, is_new=False) for span in self._visits.get((user_id, venue_id), ())]

    def held(self, user_id: str, venue_id: str) -> tuple[tuple[str, int, int, int], ...]:
        """:meth:`spans` as ``(visit id, first login ms, last login ms, logins)``, no copies."""
        return self._visits.get((user_id, venue_id), ())

    @classmethod
    def restore(
        cls,
        visits: Iterable[tuple[str, str, Iterable[Visit]]],
        *,
        clock_ms: int | None,
        gap_ms: int = DEFAULT_VISIT_GAP_MS,
        retention_ms: int = DEFAULT_VISIT_RETENTION_MS,
    ) -> VisitTracker:
        """Rebuild from (user, venue, visits) entries, as :meth:`spans` gave them."""
        tracker = cls(gap_ms=gap_ms, retention_ms=retention_ms)
        tracker._clock_ms = clock_ms
        for user_id, venue_id, held in visits:
            spans = [(v.visit_id, v.first_login_ms, v.last_login_ms, v.login_count) for v in held]
            spans.sort(key=_first_login_ms)
            tracker._store((user_id, venue_id), spans)
        return tracker

    def assign(self, user_id: str, venue_id: str, login_ms: int) -> Visit:
        """Assign one login to a visit and return the visit as updated by it."""
        clock_ms = self._tick(login_ms)
        key = (user_id, venue_id)
        held = self._visits.get(key)
        spans = self._live(held, clock_ms) if held else []
        gap_ms = self.gap_ms
        best = -1
        best_distance_ms = 0
        for index, span in enumerate(spans):  # sorted by first login: a tie keeps the earlier
            distance_ms = _distance_ms(span, login_ms)
            if distance_ms < gap_ms and (best < 0 or distance_ms < best_distance_ms):
                best = index
                best_distance_ms = distance_ms
        if best >= 0:
            visit_id, first_login_ms, last_login_ms, login_count = spans[best]
            joined = (
                visit_id,
                min(first_login_ms, login_ms),
                max(last_login_ms, login_ms),
                login_count + 1,
            )
            spans[best] = joined
            if len(spans) > 1:
                spans.sort(key=_first_login_ms)
            self._visits[key] = tuple(spans)  # not empty: it holds the joined visit
            return _visit(joined, is_new=False)
        opened = (visit_id_for(user_id, venue_id, login_ms), login_ms, login_ms, 1)
        if clock_ms - login_ms < self.retention_ms:  # else it is expired at once
            spans.append(opened)
            if len(spans) > 1:
                spans.sort(key=_first_login_ms)
        self._store(key, spans)
        return _visit(opened, is_new=True)

    def expire(self, now_ms: int) -> int:
        """Advance the clock (a timer tick) and drop finished visits; return how many."""
        clock_ms = self._tick(now_ms)
        before = len(self)
        for key in list(self._visits):
            spans = self._live(self._visits[key], clock_ms)
            if not spans:
                self._removed.append(key)
            self._store(key, spans)
        return before - len(self)

    def take_removed(self) -> list[tuple[str, str]]:
        """The (user, venue) pairs :meth:`expire` emptied since the last call (tombstones)."""
        removed, self._removed = self._removed, []
        return removed

    def _tick(self, now_ms: int) -> int:
        self._clock_ms = now_ms if self._clock_ms is None else max(self._clock_ms, now_ms)
        return self._clock_ms

    def _live(self, spans: tuple[_Span, ...], clock_ms: int) -> list[_Span]:
        retention_ms = self.retention_ms
        if len(spans) == 1:  # the usual case, without a comprehension's frame
            span = spans[0]
            return [span] if clock_ms - span[2] < retention_ms else []
        return [s for s in spans if clock_ms - s[2] < retention_ms]

    def _store(self, key: tuple[str, str], spans: list[_Span]) -> None:
        if spans:
            self._visits[key] = tuple(spans)
        else:
            self._visits.pop(key, None)


def _visit(span: _Span, *, is_new: bool) -> Visit:
    visit_id, first_login_ms, last_login_ms, login_count = span
    return Visit(visit_id, is_new, login_count, first_login_ms, last_login_ms)


def _first_login_ms(span: _Span) -> int:
    return span[1]


# --------------------------------------------------------------------------------------------
# Reordering


@dataclass(slots=True)
class Added:
    """Outcome of :meth:`ReorderBuffer.add`.

    ``late`` means the item was *not* buffered: something later was already released, so the
    caller must route it to the late topic (never drop it). ``buffered`` is the count held now.
    """

    late: bool
    buffered: int
    seq: int | None = None
    """The item's place in arrival order (None when late): ``(event_ms, seq)`` orders items."""


class ReorderBuffer(Generic[T]):
    """Releases one partition's items in event-time order once the watermark passes them.

    Watermark (epoch ms) = max(largest event time added, largest ``advance()`` wall-clock time)
    minus ``lateness_ms`` (default 2 min). An item is released when its ``event_ms`` is at or
    below the watermark: an item exactly ``lateness_ms`` older than the newest is released, one
    a millisecond younger is held. Releases come out ordered by (event_ms, arrival order).

    Wall clock: stream time only moves when records arrive, so the service calls
    ``advance(now_ms)`` from a timer to release a quiet partition's items. That is sound only
    while the partition is caught up (consumer position at the log end): then every record still
    to come is newer than ``now_ms - lateness_ms`` unless it is late anyway. While the partition
    lags (a replay, a backlog) the wall clock says nothing about the records in the log, and the
    caller must not call ``advance()``.

    Late: an item older than the newest item already released cannot be emitted in order;
    ``add()`` reports it as late and does not buffer it. An item older than the watermark but
    not older than what was released is still buffered and released in order.

    Bound: ``is_full`` turns true at ``max_buffered`` items (default 10 000); the caller stops
    adding (pauses the partition) and calls ``release()``, which then emits the oldest items
    early until fewer than ``max_buffered`` remain. Early release never drops anything; it can
    only make later arrivals older than those items late.
    """

    __slots__ = (
        "_heap",
        "_max_event_ms",
        "_released_through",
        "_seq",
        "_wall_ms",
        "lateness_ms",
        "max_buffered",
    )

    def __init__(
        self, *, lateness_ms: int = DEFAULT_LATENESS_MS, max_buffered: int = DEFAULT_MAX_BUFFERED
    ) -> None:
        if lateness_ms < 0:
            raise ValueError(f"lateness_ms must not be negative, got {lateness_ms}")
        _require_positive("max_buffered", max_buffered)
        self.lateness_ms = lateness_ms
        self.max_buffered = max_buffered
        self._heap: list[tuple[int, int, T]] = []
        self._seq = 0
        self._max_event_ms: int | None = None
        self._wall_ms: int | None = None
        self._released_through: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[T]:
        """The items waiting, in no particular order."""
        return (entry[2] for entry in self._heap)

    @property
    def is_full(self) -> bool:
        return len(self._heap) >= self.max_buffered

    @property
    def released_through(self) -> tuple[int, int] | None:
        """``(event_ms, seq)`` of the last item released: every item at or before it is out."""
        return self._released_through

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def max_event_ms(self) -> int | None:
        return self._max_event_ms

    @property
    def wall_ms(self) -> int | None:
        return self._wall_ms

    @classmethod
    def restore(
        cls,
        items: Iterable[tuple[int, int, T]],
        *,
        next_seq: int,
        max_event_ms: int | None,
        wall_ms: int | None,
        released_through: tuple[int, int] | None,
        lateness_ms: int = DEFAULT_LATENESS_MS,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> ReorderBuffer[T]:
        """Rebuild from ``(event_ms, seq, item)`` entries and the buffer's meta values.

        Entries at or before ``released_through`` were released already and are skipped, so
        the caller may pass every item it ever recorded.
        """
        buffer: ReorderBuffer[T] = cls(lateness_ms=lateness_ms, max_buffered=max_buffered)
        buffer._seq = next_seq
        buffer._max_event_ms = max_event_ms
        buffer._wall_ms = wall_ms
        buffer._released_through = released_through
        heap = [
            entry
            for entry in items
            if released_through is None or (entry[0], entry[1]) > released_through
        ]
        heapq.heapify(heap)
        buffer._heap = heap
        return buffer

    @property
    def watermark_ms(self) -> int | None:
        """Items at or below this event time are due; None before any time was seen."""
        event_ms, wall_ms = self._max_event_ms, self._wall_ms
        if wall_ms is None or (event_ms is not None and event_ms >= wall_ms):
            return None if event_ms is None else event_ms - self.lateness_ms
        return wall_ms - self.lateness_ms

    def add(self, item: T, event_ms: int) -> Added:
        """Buffer ``item`` unless it is late (see the class docstring)."""
        if self._released_through is not None and event_ms < self._released_through[0]:
            return Added(late=True, buffered=len(self._heap))
        seq = self._seq
        heapq.heappush(self._heap, (event_ms, seq, item))
        self._seq += 1
        if self._max_event_ms is None or event_ms > self._max_event_ms:
            self._max_event_ms = event_ms
        return Added(late=False, buffered=len(self._heap), seq=seq)

    def advance(self, now_ms: int) -> None:
        """Move the watermark by wall clock; only while the partition is caught up."""
        if self._wall_ms is None or now_ms > self._wall_ms:
            self._wall_ms = now_ms

    def release(self, *, early: bool = True) -> list[T]:
        """Pop every due item, then (``early``) the oldest ones while the buffer is full.

        With ``early=False`` a full buffer stays full: the caller pauses its input instead and
        releases early later, if the watermark has not made room by then.
        """
        watermark_ms = self.watermark_ms
        heap = self._heap
        limit = self.max_buffered if early else len(heap) + 1
        released: list[T] = []
        while heap and (
            (watermark_ms is not None and heap[0][0] <= watermark_ms) or len(heap) >= limit
        ):
            event_ms, seq, item = heapq.heappop(heap)
            released.append(item)
            self._released_through = (event_ms, seq)  # pops are in order: this only grows
        return released


# --------------------------------------------------------------------------------------------
# Helpers


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
