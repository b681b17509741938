"""The pipeline's stateful core: exact dedup, visit windows and a bounded reorder buffer.

Nothing here talks to Kafka, reads a clock or touches the disk. Every method takes its time as
integer epoch milliseconds and every component keeps its state in memory, serialisable with
``to_bytes()`` / ``from_bytes()`` so the service can keep it in a compacted changelog topic and
restore it when a partition is assigned. Configuration (windows, bounds) is not part of the
serialised state: it comes from the settings each time a component is built or restored.

Clocks: each component keeps its own monotonic clock, the largest time it has been given. A time
that goes backwards never un-expires anything; it is handled as an out-of-order input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson

from bridge.errors import WifiBridgeError

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS

DEFAULT_DEDUP_WINDOW_MS = 24 * HOUR_MS
"""Covers the sender's 3-hour retry cycle several times over, plus any lateness."""
DEFAULT_VISIT_GAP_MS = 30 * MINUTE_MS
DEFAULT_VISIT_RETENTION_MS = 24 * HOUR_MS
DEFAULT_LATENESS_MS = 2 * MINUTE_MS
"""The sender's normal delay is seconds, up to a minute or two under load."""
DEFAULT_MAX_BUFFERED = 10_000

_STATE_VERSION = 1

T = TypeVar("T")


class CorruptState(WifiBridgeError, ValueError):
    """Serialised window state cannot be read back (wrong kind, version or shape)."""

    code = "corrupt_state"


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

    __slots__ = ("_clock_ms", "_seen", "window_ms")

    def __init__(self, *, window_ms: int = DEFAULT_DEDUP_WINDOW_MS) -> None:
        _require_positive("window_ms", window_ms)
        self.window_ms = window_ms
        self._seen: dict[str, int] = {}
        self._clock_ms: int | None = None

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, event_id: str, now_ms: int) -> bool:
        """Return True if ``event_id`` is new within the window (emit it), False if a repeat."""
        clock_ms = self._advance(now_ms)
        if event_id in self._seen:
            return False
        self._seen[event_id] = clock_ms
        return True

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
        return clock_ms

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "v": _STATE_VERSION,
                "kind": "dedup",
                "clock_ms": self._clock_ms,
                "seen": list(self._seen.items()),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, window_ms: int = DEFAULT_DEDUP_WINDOW_MS) -> Deduplicator:
        dedup = cls(window_ms=window_ms)
        with _reading("dedup"):
            state = _load(data, "dedup")
            dedup._clock_ms = _opt_int(state["clock_ms"])
            pairs = [(_str(p[0]), _int(p[1])) for p in _list(state["seen"])]
            pairs.sort(key=lambda pair: pair[1])  # expiry relies on insertion order = age
            dedup._seen = dict(pairs)
        if dedup._clock_ms is not None:
            dedup._advance(dedup._clock_ms)  # a shorter configured window applies at once
        return dedup


# --------------------------------------------------------------------------------------------
# Visit windows


@dataclass(frozen=True, slots=True)
class Visit:
    """The visit a login was assigned to, as it stands after that login."""

    visit_id: str
    is_new: bool
    login_count: int
    first_login_ms: int
    last_login_ms: int


@dataclass(slots=True)
class _Span:
    visit_id: str
    first_login_ms: int
    last_login_ms: int
    login_count: int

    def distance_ms(self, login_ms: int) -> int:
        if login_ms < self.first_login_ms:
            return self.first_login_ms - login_ms
        return max(0, login_ms - self.last_login_ms)


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

    __slots__ = ("_clock_ms", "_visits", "gap_ms", "retention_ms")

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
        self._visits: dict[tuple[str, str], list[_Span]] = {}
        self._clock_ms: int | None = None

    def __len__(self) -> int:
        """Number of visits held in state."""
        return sum(len(spans) for spans in self._visits.values())

    def assign(self, user_id: str, venue_id: str, login_ms: int) -> Visit:
        """Assign one login to a visit and return the visit as updated by it."""
        clock_ms = self._tick(login_ms)
        key = (user_id, venue_id)
        spans = self._live(self._visits.get(key, []), clock_ms)
        best: _Span | None = None
        for span in spans:  # sorted by first login: a tie keeps the earlier visit
            distance_ms = span.distance_ms(login_ms)
            if distance_ms < self.gap_ms and (
                best is None or distance_ms < best.distance_ms(login_ms)
            ):
                best = span
        if best is not None:
            best.first_login_ms = min(best.first_login_ms, login_ms)
            best.last_login_ms = max(best.last_login_ms, login_ms)
            best.login_count += 1
            spans.sort(key=lambda span: span.first_login_ms)
            self._store(key, spans)
            return _visit(best, is_new=False)
        opened = _Span(visit_id_for(user_id, venue_id, login_ms), login_ms, login_ms, 1)
        spans = self._live([*spans, opened], clock_ms)
        spans.sort(key=lambda span: span.first_login_ms)
        self._store(key, spans)
        return _visit(opened, is_new=True)

    def expire(self, now_ms: int) -> int:
        """Advance the clock (a timer tick) and drop finished visits; return how many."""
        clock_ms = self._tick(now_ms)
        before = len(self)
        for key in list(self._visits):
            self._store(key, self._live(self._visits[key], clock_ms))
        return before - len(self)

    def _tick(self, now_ms: int) -> int:
        self._clock_ms = now_ms if self._clock_ms is None else max(self._clock_ms, now_ms)
        return self._clock_ms

    def _live(self, spans: list[_Span], clock_ms: int) -> list[_Span]:
        return [s for s in spans if clock_ms - s.last_login_ms < self.retention_ms]

    def _store(self, key: tuple[str, str], spans: list[_Span]) -> None:
        if spans:
            self._visits[key] = spans
        else:
            self._visits.pop(key, None)

    def to_bytes(self) -> bytes:
        visits = [
            [
                user_id,
                venue_id,
                [[s.visit_id, s.first_login_ms, s.last_login_ms, s.login_count] for s in spans],
            ]
            for (user_id, venue_id), spans in self._visits.items()
        ]
        return orjson.dumps(
            {"v": _STATE_VERSION, "kind": "visits", "clock_ms": self._clock_ms, "visits": visits}
        )

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        gap_ms: int = DEFAULT_VISIT_GAP_MS,
        retention_ms: int = DEFAULT_VISIT_RETENTION_MS,
    ) -> VisitTracker:
        tracker = cls(gap_ms=gap_ms, retention_ms=retention_ms)
        with _reading("visits"):
            state = _load(data, "visits")
            tracker._clock_ms = _opt_int(state["clock_ms"])
            for entry in _list(state["visits"]):
                user_id, venue_id, raw_spans = _list(entry)
                spans = [
                    _Span(_str(s[0]), _int(s[1]), _int(s[2]), _int(s[3]))
                    for s in map(_list, _list(raw_spans))
                ]
                spans.sort(key=lambda span: span.first_login_ms)
                tracker._store((_str(user_id), _str(venue_id)), spans)
        return tracker


def _visit(span: _Span, *, is_new: bool) -> Visit:
    return Visit(
        visit_id=span.visit_id,
        is_new=is_new,
        login_count=span.login_count,
        first_login_ms=span.first_login_ms,
        last_login_ms=span.last_login_ms,
    )


# --------------------------------------------------------------------------------------------
# Reordering


class ItemCodec(Protocol[T]):
    """Turns a buffered item into bytes for the changelog and back."""

    def encode(self, item: T, /) -> bytes: ...

    def decode(self, data: bytes, /) -> T: ...


class BytesCodec:
    """The identity codec, for buffers that hold raw record bytes."""

    def encode(self, item: bytes, /) -> bytes:
        return item

    def decode(self, data: bytes, /) -> bytes:
        return data


@dataclass(frozen=True, slots=True)
class Added:
    """Outcome of :meth:`ReorderBuffer.add`.

    ``late`` means the item was *not* buffered: something later was already released, so the
    caller must route it to the late topic (never drop it). ``buffered`` is the count held now.
    """

    late: bool
    buffered: int


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
        "_released_through_ms",
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
        self._released_through_ms: int | None = None

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def is_full(self) -> bool:
        return len(self._heap) >= self.max_buffered

    @property
    def watermark_ms(self) -> int | None:
        """Items at or below this event time are due; None before any time was seen."""
        times = [t for t in (self._max_event_ms, self._wall_ms) if t is not None]
        return max(times) - self.lateness_ms if times else None

    def add(self, item: T, event_ms: int) -> Added:
        """Buffer ``item`` unless it is late (see the class docstring)."""
        if self._released_through_ms is not None and event_ms < self._released_through_ms:
            return Added(late=True, buffered=len(self._heap))
        heapq.heappush(self._heap, (event_ms, self._seq, item))
        self._seq += 1
        if self._max_event_ms is None or event_ms > self._max_event_ms:
            self._max_event_ms = event_ms
        return Added(late=False, buffered=len(self._heap))

    def advance(self, now_ms: int) -> None:
        """Move the watermark by wall clock; only while the partition is caught up."""
        if self._wall_ms is None or now_ms > self._wall_ms:
            self._wall_ms = now_ms

    def release(self) -> list[T]:
        """Pop every due item, then the oldest ones while the buffer is full, in order."""
        watermark_ms = self.watermark_ms
        heap = self._heap
        released: list[T] = []
        while heap and (
            (watermark_ms is not None and heap[0][0] <= watermark_ms)
            or len(heap) >= self.max_buffered
        ):
            event_ms, _, item = heapq.heappop(heap)
            released.append(item)
            self._released_through_ms = event_ms  # pops are in order: this only grows
        return released

    def to_bytes(self, codec: ItemCodec[T]) -> bytes:
        items = [
            [event_ms, seq, base64.b64encode(codec.encode(item)).decode("ascii")]
            for event_ms, seq, item in self._heap
        ]
        return orjson.dumps(
            {
                "v": _STATE_VERSION,
                "kind": "reorder",
                "seq": self._seq,
                "max_event_ms": self._max_event_ms,
                "wall_ms": self._wall_ms,
                "released_through_ms": self._released_through_ms,
                "items": items,
            }
        )

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        codec: ItemCodec[T],
        *,
        lateness_ms: int = DEFAULT_LATENESS_MS,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> ReorderBuffer[T]:
        buffer: ReorderBuffer[T] = cls(lateness_ms=lateness_ms, max_buffered=max_buffered)
        with _reading("reorder"):
            state = _load(data, "reorder")
            buffer._seq = _int(state["seq"])
            buffer._max_event_ms = _opt_int(state["max_event_ms"])
            buffer._wall_ms = _opt_int(state["wall_ms"])
            buffer._released_through_ms = _opt_int(state["released_through_ms"])
            heap = [
                (_int(e[0]), _int(e[1]), codec.decode(base64.b64decode(_str(e[2]), validate=True)))
                for e in map(_list, _list(state["items"]))
            ]
            heapq.heapify(heap)
            buffer._heap = heap
        return buffer


# --------------------------------------------------------------------------------------------
# Helpers


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@contextmanager
def _reading(kind: str) -> Iterator[None]:
    """Turn any shape error while reading state into :class:`CorruptState`."""
    try:
        yield
    except CorruptState:
        raise
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error) as exc:
        raise CorruptState(f"unreadable {kind} state: {exc}") from exc


def _load(data: bytes, kind: str) -> dict[str, Any]:
    state = orjson.loads(data)
    if not isinstance(state, dict):
        raise TypeError("state is not a JSON object")
    if state.get("kind") != kind or state.get("v") != _STATE_VERSION:
        raise CorruptState(
            f"expected {kind} state v{_STATE_VERSION}, got {state.get('kind')!r} "
            f"v{state.get('v')!r}"
        )
    return state


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value
