"""The pipeline's changelog entries: one compacted-topic record per piece of state.

Each input partition's state lives in the same-numbered partition of the changelog topic, as
separate entries, so a transaction writes only what changed and no record nears Kafka's size
limit however large the state grows:

===================  =====================================================================
key                  value (JSON)
===================  =====================================================================
``e`` + event id     ``{"s": first-seen ms, "t": event ms, "q": seq, "r": record}``: the id
                     for dedup and, while ``t``/``q``/``r`` are set, a buffered record
                     (``null`` for a record that went straight to the late topic or left
                     the buffer before its transaction committed)
``v`` + user US venue ``[[visit id, first login ms, last login ms, logins], ...]``; a
                     tombstone once the (user, venue) holds no visit. US is the unit
                     separator, U+001F; in the user id a backslash is written ``\\\\``
                     and a US ``\\s``, so the first US in a key is always the separator
``m``                the partition's meta: buffer sequence, watermark inputs, the
                     ``(event ms, seq)`` released through, the dedup and visit clocks
===================  =====================================================================

A buffered record's entry is not rewritten when it is released: the meta's
``released_through`` tells which entries are still buffered, because the buffer releases in
``(event ms, seq)`` order. For the same reason a record released within the transaction that
accepted it is written without ``t``/``q``/``r``: the meta of that transaction covers it, so a
restore rebuilds the same state, and the transaction carries a few bytes instead of the record.
The meta is written last in every transaction that writes any entry of its partition, so a
restore never sees an entry newer than the meta that covers it.

The topic is compacted, never cleaned by time (``cleanup.policy=compact``): an id that left the
dedup window and a (user, venue) whose visits all expired are written as tombstones, so the
topic holds the live state plus what compaction has not yet removed. A record still waiting in
the reorder buffer is kept however long the pipeline stays stopped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumers.pipeline.windows import Visit

log = logging.getLogger(__name__)

META_KEY = b"m"
_EVENT = b"e"
_VISITS = b"v"
_SEPARATOR = "\x1f"
_META_VERSION = 1


@dataclass(frozen=True, slots=True)
class EventEntry:
    seen_ms: int
    event_ms: int | None
    seq: int | None
    record: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Meta:
    next_seq: int = 0
    max_event_ms: int | None = None
    wall_ms: int | None = None
    released_through: tuple[int, int] | None = None
    dedup_clock_ms: int | None = None
    visit_clock_ms: int | None = None


@dataclass(slots=True)
class State:
    """A changelog partition folded into its latest entries."""

    events: dict[str, EventEntry] = field(default_factory=dict)
    visits: dict[tuple[str, str], list[Visit]] = field(default_factory=dict)
    meta: Meta | None = None
    corrupt: int = 0


def event_key(event_id: str) -> bytes:
    return _EVENT + event_id.encode()


def visit_key(user_id: str, venue_id: str) -> bytes:
    if "\\" in user_id or _SEPARATOR in user_id:  # rare: ids are digits, venue ids too
        user_id = user_id.replace("\\", "\\\\").replace(_SEPARATOR, "\\s")
    return _VISITS + f"{user_id}{_SEPARATOR}{venue_id}".encode()


_ESCAPE = re.compile(r"\\([\\s])")


def _unescape_user(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else _SEPARATOR, text)


def encode_event(
    *, seen_ms: int, event_ms: int | None, seq: int | None, record: dict[str, Any] | None
) -> bytes:
    if event_ms is None and seq is None and record is None:  # most entries: what orjson writes
        return _SEEN_ONLY % seen_ms
    return orjson.dumps({"s": seen_ms, "t": event_ms, "q": seq, "r": record})


_SEEN_ONLY = b'{"s":%d,"t":null,"q":null,"r":null}'


def encode_buffered_event(*, seen_ms: int, event_ms: int, seq: int, record_json: bytes) -> bytes:
    """:func:`encode_event` of a record already encoded (``orjson.dumps(record)``): same bytes."""
    return b'{"s":%d,"t":%d,"q":%d,"r":%s}' % (seen_ms, event_ms, seq, record_json)


def encode_visits(visits: Iterable[Visit]) -> bytes:
    return orjson.dumps(
        [[v.visit_id, v.first_login_ms, v.last_login_ms, v.login_count] for v in visits]
    )


def encode_held(held: Sequence[tuple[str, int, int, int]]) -> bytes:
    """:func:`encode_visits` of :meth:`VisitTracker.held`'s tuples: the same bytes."""
    return orjson.dumps(held)


def encode_meta(meta: Meta) -> bytes:
    return orjson.dumps(
        {
            "v": _META_VERSION,
            "seq": meta.next_seq,
            "max_event_ms": meta.max_event_ms,
            "wall_ms": meta.wall_ms,
            "released": list(meta.released_through) if meta.released_through else None,
            "dedup_clock_ms": meta.dedup_clock_ms,
            "visit_clock_ms": meta.visit_clock_ms,
        }
    )


def fold(entries: Iterable[tuple[bytes, bytes | None]]) -> State:
    """The latest value of every key, decoded; unreadable entries are counted and skipped."""
    state = State()
    for key, value in entries:
        try:
            _apply(state, key, value)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
            state.corrupt += 1
            kind = key[:1].decode("ascii", "replace")
            log.error(
                "skipped an unreadable changelog entry",
                extra={"entry_kind": kind, "error": type(exc).__name__},
            )
    return state


def _apply(state: State, key: bytes, value: bytes | None) -> None:
    kind, rest = key[:1], key[1:].decode()
    if kind == _EVENT:
        if value is None:
            state.events.pop(rest, None)
            return
        raw = _object(orjson.loads(value))
        state.events[rest] = EventEntry(
            seen_ms=_int(raw["s"]),
            event_ms=_opt_int(raw["t"]),
            seq=_opt_int(raw["q"]),
            record=_opt_dict(raw["r"]),
        )
    elif kind == _VISITS:
        escaped_user, venue_id = rest.split(_SEPARATOR, 1)
        user_id = _unescape_user(escaped_user)
        if value is None:
            state.visits.pop((user_id, venue_id), None)
            return
        state.visits[(user_id, venue_id)] = [
            Visit(
                visit_id=str(v[0]),
                is_new=False,
                first_login_ms=_int(v[1]),
                last_login_ms=_int(v[2]),
                login_count=_int(v[3]),
            )
            for v in orjson.loads(value)
        ]
    elif key == META_KEY:
        if value is None:
            state.meta = None
            return
        raw = _object(orjson.loads(value))
        if raw.get("v") != _META_VERSION:
            raise ValueError(f"unknown meta version {raw.get('v')!r}")
        released = raw["released"]
        state.meta = Meta(
            next_seq=_int(raw["seq"]),
            max_event_ms=_opt_int(raw["max_event_ms"]),
            wall_ms=_opt_int(raw["wall_ms"]),
            released_through=(_int(released[0]), _int(released[1])) if released else None,
            dedup_clock_ms=_opt_int(raw["dedup_clock_ms"]),
            visit_clock_ms=_opt_int(raw["visit_clock_ms"]),
        )
    else:
        raise ValueError(f"unknown entry kind {kind!r}")


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError("expected an integer")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _opt_dict(value: object) -> dict[str, Any] | None:
    return None if value is None else _object(value)


def _object(value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise TypeError("expected an object")
    return value
