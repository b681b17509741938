"""One input partition's pipeline: normalise, drop redeliveries, reorder, assign visits.

Pure: records and times go in, output records and changelog entries come out; nothing here
talks to Kafka or reads a clock. The service (:mod:`consumers.pipeline.service`) owns one
:class:`PartitionPipeline` per assigned partition and writes what it returns inside the same
Kafka transaction as the input offsets.

Stages, in order:

1. **normalise** the raw body; one that cannot be normalised goes to the dead-letter route with
   the reason, unchanged.
2. **dedup** on the event id, with the bridge's receive time as the clock (so a replay decides
   exactly as the first run did): a redelivery within the dedup window is dropped. The receive
   time comes from a bridge pod's clock; one more than :data:`RECEIVED_AT_TOLERANCE_MS` ahead of
   the pipeline's own clock (the latest :meth:`PartitionPipeline.tick` time) is taken as that
   clock plus the tolerance, so a pod whose clock runs days ahead cannot move the dedup clock
   past every id at once (the sender's retries of those logins would be emitted again).
3. **reorder** by ``authenticationTime``: the record waits in the buffer until the watermark
   passes it; one older than what was already released goes to the late route at once.
4. **visits** are assigned as records leave the buffer, that is in event-time order, so
   ``visit.isNew`` marks the login that opened the visit. A late record gets its visit too.

Changelog: every change of state is also an entry ``(key, value)`` for a compacted topic (see
:mod:`consumers.pipeline.changelog`); :meth:`PartitionPipeline.take_changes` hands over the
entries changed since the last call, one per key, the meta entry last. Entries are encoded
there, not as the state changes: a key changed many times in one transaction is encoded once,
and an event released before its transaction ends is written without its record, since the meta
of that transaction already says it left the buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from consumers.pipeline import changelog
from consumers.pipeline.normalise import NormalisationError, Reason, normalise_timed
from consumers.pipeline.windows import (
    DEFAULT_DEDUP_WINDOW_MS,
    DEFAULT_LATENESS_MS,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_VISIT_GAP_MS,
    DEFAULT_VISIT_RETENTION_MS,
    Deduplicator,
    ReorderBuffer,
    VisitTracker,
)

__all__ = [
    "FUTURE_TOLERANCE_MS",
    "RECEIVED_AT_TOLERANCE_MS",
    "Output",
    "PartitionPipeline",
    "RawRecord",
    "Route",
    "WindowConfig",
]

log = logging.getLogger(__name__)

_VISIT_EXPIRY_INTERVAL_MS = 60_000
#: How far a login time may be ahead of its receive time (the clocks of the sender and the
#: bridge differ a little); a login further ahead goes to the dead-letter route.
FUTURE_TOLERANCE_MS = 5 * 60_000
#: How far a receive time may be ahead of the pipeline's clock (the clocks of the bridge and
#: the pipeline differ a little, and a record may arrive between two ticks); a receive time
#: further ahead is capped to the pipeline's clock plus this.
RECEIVED_AT_TOLERANCE_MS = 5 * 60_000
# The instants ISO 8601 can write (years 1 to 9999), as epoch milliseconds.
_MIN_MS = -62_135_596_800_000
_MAX_MS = 253_402_300_799_999


class Route(StrEnum):
    """Where an output record goes; the service maps each route to a topic."""

    VISITS = "visits"
    LATE = "late"
    DLQ = "dlq"


@dataclass(slots=True)
class RawRecord:
    """One record of the raw topic, as the service read it."""

    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]
    timestamp_ms: int
    """The Kafka record timestamp: the receive time when the ``received-at`` header is absent."""


@dataclass(slots=True)
class Output:
    route: Route
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowConfig:
    """Window sizes and bounds; every time in milliseconds."""

    dedup_window_ms: int = DEFAULT_DEDUP_WINDOW_MS
    visit_gap_ms: int = DEFAULT_VISIT_GAP_MS
    visit_retention_ms: int = DEFAULT_VISIT_RETENTION_MS
    lateness_ms: int = DEFAULT_LATENESS_MS
    max_buffered: int = DEFAULT_MAX_BUFFERED


@dataclass(slots=True)
class Counts:
    """What happened since the service last read (and reset) the counts."""

    accepted: int = 0
    duplicates: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    emitted: int = 0
    late: int = 0
    visits_opened: int = 0
    received_at_capped: int = 0

    def reset(self) -> None:
        self.accepted = self.duplicates = self.emitted = self.late = self.visits_opened = 0
        self.received_at_capped = 0
        self.invalid.clear()


_Item = tuple[bytes | None, bytes, int, str, str, str]
"""A record in the buffer: (raw key, record JSON as normalised, event ms, event id, user key,
venue id).

A plain tuple of bytes, strings and ints instead of the record's dicts: records wait in the
buffer for the lateness window, and the garbage collector's passes over thousands of waiting
dicts cost more than the window logic itself (see ``windows._Span``). The JSON ends with
:data:`_UNSET`; :meth:`PartitionPipeline._emit` writes the visit and late fields in its place,
the bytes ``orjson.dumps`` gives for the record with those fields set.
"""

_UNSET = b',"visit":{"id":null,"isNew":null},"late":false}'
_JSON_BOOL = {True: b"true", False: b"false"}

_Seen = tuple[int, _Item | None, int | None]
"""An event accepted since the last take_changes: (first-seen ms, item, seq); the item is None
for a record that went to the late route."""


class PartitionPipeline:
    """The state and stages of one input partition (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_buffered_ids",
        "_dedup",
        "_dirty_visits",
        "_last_visit_expiry_ms",
        "_outlived",
        "_released_outlived",
        "_seen",
        "_visits",
        "_wall_clock_ms",
        "_written_meta",
        "config",
        "counts",
    )

    def __init__(
        self,
        config: WindowConfig,
        *,
        dedup: Deduplicator | None = None,
        visits: VisitTracker | None = None,
        buffer: ReorderBuffer[_Item] | None = None,
        wall_clock_ms: int | None = None,
    ) -> None:
        self.config = config
        # "is None", not "or": each component has a length, so an empty restored one is falsy,
        # yet its clocks, sequence and release point are state.
        self._dedup = Deduplicator(window_ms=config.dedup_window_ms) if dedup is None else dedup
        self._visits = (
            VisitTracker(gap_ms=config.visit_gap_ms, retention_ms=config.visit_retention_ms)
            if visits is None
            else visits
        )
        self._buffer: ReorderBuffer[_Item] = (
            ReorderBuffer(lateness_ms=config.lateness_ms, max_buffered=config.max_buffered)
            if buffer is None
            else buffer
        )
        self._seen: dict[str, _Seen] = {}
        # The ids of the records waiting in the buffer. A record may wait longer than its id
        # stays in the dedup window (its watermark moves only with newer login times, or the
        # wall clock once caught up): its entry, which holds the record, must not be written
        # as a tombstone before it leaves, and a copy must not be let in meanwhile.
        self._buffered_ids: set[str] = {item[3] for item in self._buffer}
        #: Waiting ids out of the dedup window: their tombstones wait for their release.
        self._outlived: set[str] = {i for i in self._buffered_ids if i not in self._dedup}
        #: Outlived ids released since the last take_changes: their tombstones are due.
        self._released_outlived: list[str] = []
        self._dirty_visits: set[tuple[str, str]] = set()
        self._last_visit_expiry_ms: int | None = None
        # The pipeline's own clock, which receive times are checked against; not state: a
        # restored pipeline gets the wall clock of its restore.
        self._wall_clock_ms = wall_clock_ms
        # What the changelog holds already: a fresh pipeline's meta needs no entry, a restored
        # one's is what it was restored from (set by restore()).
        self._written_meta = self._meta()
        self.counts = Counts()

    # ----------------------------------------------------------------------------------------
    # Introspection

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def is_full(self) -> bool:
        return self._buffer.is_full

    @property
    def watermark_ms(self) -> int | None:
        return self._buffer.watermark_ms

    @property
    def dedup_entries(self) -> int:
        return len(self._dedup)

    # ----------------------------------------------------------------------------------------
    # Stages

    def accept(self, raw: RawRecord) -> list[Output]:
        """Take one raw record; returns what it sends out now (dead letter, late, released)."""
        headers = dict(raw.headers)
        received_at_ms = _received_at_ms(headers.get("received-at"), raw.timestamp_ms)
        # The clocks below go by the receive time; the record keeps the one the bridge wrote.
        clock_ms = received_at_ms
        if self._wall_clock_ms is not None:
            limit_ms = self._wall_clock_ms + RECEIVED_AT_TOLERANCE_MS
            if clock_ms > limit_ms:
                clock_ms = limit_ms
                self.counts.received_at_capped += 1
        header_id = headers.get("event-id")
        try:
            record, event_ms = normalise_timed(
                raw.value,
                event_id=header_id.decode("ascii", "replace") if header_id else None,
                received_at_ms=received_at_ms,
            )
            if event_ms > clock_ms + FUTURE_TOLERANCE_MS:
                # It would move the watermark past the records still to come and turn them late
                # (one login dated 9999 would, for good).
                raise NormalisationError(
                    Reason.FUTURE_AUTHENTICATION_TIME,
                    "session.authenticationTime is more than 5 minutes after the receive time",
                )
            # Encoded here, inside the guard: a record orjson cannot write (an integer beyond
            # 64 bits, say) would otherwise raise out of the partition on every restart.
            item = _item(raw.key, record, event_ms)
        except NormalisationError as exc:
            return [self._dead_letter(raw, exc.reason, str(exc))]
        except Exception as exc:  # no body may stop its partition
            detail = f"the body could not be normalised: {type(exc).__name__}"
            return [self._dead_letter(raw, Reason.UNREADABLE, detail)]

        event_id: str = record["eventId"]
        if event_id in self._buffered_ids:  # its first copy still waits, in the window or not
            self._dedup.expire(clock_ms)  # the clock moves as for any record
            self.counts.duplicates += 1
            return []
        if not self._dedup.check(event_id, clock_ms):
            self.counts.duplicates += 1
            return []
        self.counts.accepted += 1
        seen_ms = self._dedup.clock_ms
        assert seen_ms is not None  # check() just set it
        added = self._buffer.add(item, event_ms)
        if added.late:
            self._seen[event_id] = (seen_ms, None, None)
            return [self._emit(item, late=True)]
        self._seen[event_id] = (seen_ms, item, added.seq)
        self._buffered_ids.add(event_id)
        return self._release(early=False)

    def tick(self, now_ms: int, *, caught_up: bool) -> list[Output]:
        """A timer pass: move the watermark by wall clock when the input is caught up.

        While the partition lags, the wall clock says nothing about the records still to come,
        so only the buffer bound can release anything then: a full buffer (its input paused
        since :meth:`accept` filled it) releases its oldest records early here.

        ``now_ms`` is also the clock receive times are checked against, caught up or not.
        """
        if self._wall_clock_ms is None or now_ms > self._wall_clock_ms:
            self._wall_clock_ms = now_ms
        if caught_up:
            self._buffer.advance(now_ms)
        if (
            self._last_visit_expiry_ms is None
            or now_ms - self._last_visit_expiry_ms >= _VISIT_EXPIRY_INTERVAL_MS
        ):
            self._last_visit_expiry_ms = now_ms
            self._visits.expire(self._visits.clock_ms or 0)
            self._dirty_visits.update(self._visits.take_removed())  # their tombstones
        return self._release()

    def take_changes(self) -> list[tuple[bytes, bytes | None]]:
        """Changelog entries changed since the last call; the meta entry comes last.

        The meta entry is written whenever it changed, also with no other entry: a pass that
        only dropped duplicates or moved the wall clock moved clocks a restore must see.
        """
        meta = self._meta()
        seen = self._seen
        # Ids out of the dedup window: tombstones, first (an id seen again in this pass is
        # written after them), so the compacted topic forgets them.
        expired = self._dedup.take_expired()
        if expired and self._buffered_ids:
            waiting = self._buffered_ids
            self._outlived.update(i for i in expired if i in waiting)
            expired = [i for i in expired if i not in waiting]
        if self._released_outlived:
            expired += self._released_outlived
            self._released_outlived = []
        entries: list[tuple[bytes, bytes | None]] = [
            (changelog.event_key(event_id), None) for event_id in expired if event_id not in seen
        ]
        # Ids accepted in this pass that left the window in it too (and were not let in again).
        gone = {i for i in expired if i in seen and i not in self._dedup} if expired else None
        if not seen and not self._dirty_visits:
            if not entries and meta == self._written_meta:
                return []
            self._written_meta = meta
            entries.append((changelog.META_KEY, changelog.encode_meta(meta)))
            return entries
        released = self._buffer.released_through
        for event_id, (seen_ms, item, seq) in self._seen.items():
            if item is None or seq is None or (released and (item[2], seq) <= released):
                if gone and event_id in gone:  # out of the window already: nothing to keep
                    entries.append((changelog.event_key(event_id), None))
                    continue
                # Late, or released already: the meta below covers it, only dedup needs it.
                value = changelog.encode_event(
                    seen_ms=seen_ms, event_ms=None, seq=None, record=None
                )
            else:  # still buffered: its record as accepted (visit and late unset)
                value = changelog.encode_buffered_event(
                    seen_ms=seen_ms, event_ms=item[2], seq=seq, record_json=item[1]
                )
            entries.append((changelog.event_key(event_id), value))
        self._seen.clear()
        for user_key, venue_id in self._dirty_visits:
            held = self._visits.held(user_key, venue_id)
            entries.append(
                (
                    changelog.visit_key(user_key, venue_id),
                    changelog.encode_held(held) if held else None,
                )
            )
        self._dirty_visits.clear()
        self._written_meta = meta
        entries.append((changelog.META_KEY, changelog.encode_meta(meta)))
        return entries

    def _meta(self) -> changelog.Meta:
        return changelog.Meta(
            next_seq=self._buffer.next_seq,
            max_event_ms=self._buffer.max_event_ms,
            wall_ms=self._buffer.wall_ms,
            released_through=self._buffer.released_through,
            dedup_clock_ms=self._dedup.clock_ms,
            visit_clock_ms=self._visits.clock_ms,
        )

    def discard_changes(self) -> None:
        self._seen.clear()
        self._dirty_visits.clear()
        self._dedup.take_expired()
        self._visits.take_removed()

    # ----------------------------------------------------------------------------------------
    # Restore

    @classmethod
    def restore(
        cls,
        entries: Iterable[tuple[bytes, bytes | None]],
        config: WindowConfig,
        *,
        now_ms: int | None = None,
    ) -> tuple[PartitionPipeline, int]:
        """Rebuild from a changelog partition read in order; returns it and the corrupt count.

        A corrupt entry is skipped (and counted) rather than stopping the partition; a corrupt
        meta leaves its predecessor's, or none, so every entry holding a record released since
        is taken as still waiting and emitted again (duplicates rather than a loss). ``now_ms``
        is the wall clock of the restore: receive times are checked against it until the first
        :meth:`tick` (without it, not at all until then).
        """
        state = changelog.fold(entries)
        meta = state.meta or changelog.Meta()
        dedup = Deduplicator.restore(
            ((event_id, e.seen_ms) for event_id, e in state.events.items()),
            clock_ms=meta.dedup_clock_ms,
            window_ms=config.dedup_window_ms,
        )
        visits = VisitTracker.restore(
            ((user, venue, held) for (user, venue), held in state.visits.items()),
            clock_ms=meta.visit_clock_ms,
            gap_ms=config.visit_gap_ms,
            retention_ms=config.visit_retention_ms,
        )
        items = []
        corrupt = state.corrupt
        for event_id, e in state.events.items():
            if e.record is None or e.event_ms is None or e.seq is None:
                continue
            try:
                item = _item(_key_of(e.record), e.record, e.event_ms)
            except Exception:  # a record entry that is JSON but not a record: skip, count
                log.warning("changelog entry holds no readable record", extra={"event": event_id})
                corrupt += 1
                continue
            items.append((e.event_ms, e.seq, item))
        # The meta is written after the entries of its transaction, so it covers them, unless
        # it was lost (a corrupt entry): then no new record may get a number a buffered one
        # holds, or releasing one of the two would count the other as released.
        next_seq = max([meta.next_seq, *(seq + 1 for _, seq, _ in items)])
        buffer: ReorderBuffer[_Item] = ReorderBuffer.restore(
            items,
            next_seq=next_seq,
            max_event_ms=meta.max_event_ms,
            wall_ms=meta.wall_ms,
            released_through=meta.released_through,
            lateness_ms=config.lateness_ms,
            max_buffered=config.max_buffered,
        )
        pipeline = cls(config, dedup=dedup, visits=visits, buffer=buffer, wall_clock_ms=now_ms)
        return pipeline, corrupt

    # ----------------------------------------------------------------------------------------

    def _release(self, *, early: bool = True) -> list[Output]:
        return [self._emit(item, late=False) for item in self._buffer.release(early=early)]

    def _dead_letter(self, raw: RawRecord, reason: Reason, detail: str) -> Output:
        self.counts.invalid[reason.value] = self.counts.invalid.get(reason.value, 0) + 1
        dlq_headers = [
            *raw.headers,
            ("dlq-reason", reason.value.encode()),
            ("dlq-detail", detail.encode()[:1024]),
            ("dlq-stage", b"pipeline"),
        ]
        return Output(Route.DLQ, raw.key, raw.value, dlq_headers)

    def _emit(self, item: _Item, *, late: bool) -> Output:
        key, record_json, event_ms, event_id, user_key, venue_id = item
        if not late:  # out of the buffer
            self._buffered_ids.discard(event_id)
            if self._outlived and event_id in self._outlived:
                self._outlived.discard(event_id)
                self._released_outlived.append(event_id)
        visit = self._visits.assign(user_key, venue_id, event_ms)
        self._dirty_visits.add((user_key, venue_id))
        self.counts.emitted += 1
        if late:
            self.counts.late += 1
        if visit.is_new:
            self.counts.visits_opened += 1
        value = b'%s,"visit":{"id":%s,"isNew":%s},"late":%s}' % (
            record_json[: -len(_UNSET)],
            orjson.dumps(visit.visit_id),
            _JSON_BOOL[visit.is_new],
            _JSON_BOOL[late],
        )
        headers = [("event-id", event_id.encode())]
        return Output(Route.LATE if late else Route.VISITS, key, value, headers)


def _item(key: bytes | None, record: dict[str, Any], event_ms: int) -> _Item:
    record_json = orjson.dumps(record)
    if not record_json.endswith(_UNSET):  # not as normalise builds it: put the fields last
        unset = {"visit": {"id": None, "isNew": None}, "late": False}
        record = {name: v for name, v in record.items() if name not in unset} | unset
        record_json = orjson.dumps(record)
    user_key = record["user"]["id"] or record["client"]["mac"] or ""
    venue_id = record["venue"]["id"] or ""
    return (key, record_json, event_ms, record["eventId"], user_key, venue_id)


def _key_of(record: dict[str, Any]) -> bytes:
    """The raw topic's key of a record: user id, else MAC, else the bridge's constant."""
    user_id = record["user"]["id"]
    mac = record["client"]["mac"]
    return (user_id or mac or "unknown").encode()


def _received_at_ms(header: bytes | None, fallback_ms: int) -> int:
    """The ``received-at`` header, else (absent, not a number, or beyond the years ISO 8601
    can write) the record's timestamp."""
    if header:
        try:
            received_ms = int(header)
        except ValueError:
            return fallback_ms
        if _MIN_MS <= received_ms <= _MAX_MS:
            return received_ms
    return fallback_ms
