"""Canonical login records as table rows, and what one batch adds to the aggregates.

Pure: no I/O, no clock. The service shell parses each Kafka record with :func:`parse_login`,
the store inserts the batch's logins idempotently (on ``event_id``) and hands the logins it
*actually inserted* back to :func:`aggregate`, which says what to add to ``visits`` and
``venue_daily``. Because only newly inserted logins are ever aggregated, a replay adds nothing.

Times are integer epoch milliseconds inside (``*_ms``); rows carry aware UTC datetimes because
that is what both database drivers bind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

import orjson

from bridge.errors import WifiBridgeError

__all__ = [
    "Aggregates",
    "Login",
    "Reason",
    "RejectedRecord",
    "VenueDayDelta",
    "VisitDelta",
    "aggregate",
    "dedupe",
    "parse_login",
    "unflagged_visits",
    "visitor_days",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: The longest text a stored field may hold (ids, MAC, venue name, provider); a longer value
#: rejects the record to the dead-letter topic.
MAX_TEXT_CHARS: Final = 512
_INSTANT: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_REQUIRED: Final = (
    "eventId",
    "authenticationTime",
    "receivedAt",
    "user",
    "client",
    "company",
    "venue",
    "visitCounts",
    "visit",
    "late",
)


class Reason(StrEnum):
    """Why a record is not a canonical login; stable codes, fit for a metric label."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"


class RejectedRecord(WifiBridgeError):
    """A Kafka record that is not a canonical ``login.v1`` record; it goes to the DLQ.

    The message names the field and at most its JSON type, never its value.
    """

    code = "rejected_record"

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Login:
    """One login as stored in ``logins``: no names, e-mails, birth dates or user agents.

    ``user_id`` and ``client_mac`` are pseudonymous identifiers (kept so a deletion request can
    find the rows); ``visitor`` is the one that identifies the person for counting: the user id,
    else ``mac:`` and the MAC. Times are computed once, when the record is parsed:
    ``authentication_ms`` (epoch milliseconds) orders logins, ``authentication_time`` (aware,
    UTC) is what the databases store, ``day`` is its UTC date.
    """

    event_id: str
    authentication_ms: int
    authentication_time: datetime
    day: date
    received_at: datetime | None
    user_id: str | None
    client_mac: str | None
    visitor: str
    company_id: str | None
    venue_id: str | None
    venue_name: str | None
    provider: str | None
    visit_id: str | None
    visit_is_new: bool | None
    late: bool

    def row(self) -> tuple[Any, ...]:
        """The ``logins`` columns in :data:`LOGIN_COLUMNS` order."""
        return (
            self.event_id,
            self.user_id,
            self.client_mac,
            self.company_id,
            self.venue_id,
            self.venue_name,
            self.provider,
            self.authentication_time,
            self.received_at,
            self.visit_id,
            self.visit_is_new,
            self.late,
        )


LOGIN_COLUMNS: Final = (
    "event_id",
    "user_id",
    "client_mac",
    "company_id",
    "venue_id",
    "venue_name",
    "provider",
    "authentication_time",
    "received_at",
    "visit_id",
    "visit_is_new",
    "late",
)


class VisitDelta(NamedTuple):
    """What a batch adds to one ``visits`` row: its span widens, its count grows.

    A tuple in :data:`VISIT_COLUMNS` order, so it is its own row (built once per visit per
    batch, the hot path of the write; a frozen dataclass cost a third of the aggregation).
    """

    visit_id: str
    user_id: str | None
    client_mac: str | None
    venue_id: str | None
    first_login_at: datetime
    last_login_at: datetime
    logins: int


VISIT_COLUMNS: Final = (
    "visit_id",
    "user_id",
    "client_mac",
    "venue_id",
    "first_login_at",
    "last_login_at",
    "logins",
)


class VenueDayDelta(NamedTuple):
    """What a batch adds to one ``venue_daily`` row (a tuple in its column order)."""

    venue_id: str
    day: date
    logins: int
    unique_visitors: int
    new_visits: int


@dataclass(frozen=True, slots=True)
class Aggregates:
    visits: tuple[VisitDelta, ...]
    venue_days: tuple[VenueDayDelta, ...]


def parse_login(value: bytes | None) -> Login:
    """The :class:`Login` of one Kafka record value; :class:`RejectedRecord` if it is not one.

    Checks what the sink relies on (required keys, types, the UTC instant format, one of user
    id and MAC); fields it does not store are only required to be present.
    """
    if value is None:
        raise RejectedRecord(Reason.INVALID_JSON, "record has no value (a tombstone)")
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RejectedRecord(
            Reason.INVALID_JSON, f"value is not valid JSON (at byte {exc.pos})"
        ) from None
    if type(record) is not dict:
        raise RejectedRecord(Reason.NOT_AN_OBJECT, "value must be a JSON object")
    for name in _REQUIRED:
        if name not in record:
            raise RejectedRecord(Reason.MISSING_FIELD, f"{name} is missing")
    user = _section(record, "user")
    client = _section(record, "client")
    company = _section(record, "company")
    venue = _section(record, "venue")
    visit = _section(record, "visit")

    event_id = _text(record, "eventId", "eventId", required=True)
    assert event_id is not None
    authentication_time = _instant(record, "authenticationTime", required=True)
    assert authentication_time is not None
    user_id = _text(user, "id", "user.id")
    client_mac = _text(client, "mac", "client.mac")
    if user_id is not None:
        visitor = user_id
    elif client_mac is not None:
        visitor = f"mac:{client_mac}"
    else:
        raise RejectedRecord(Reason.MISSING_FIELD, "neither user.id nor client.mac is set")
    late = record["late"]
    if type(late) is not bool:
        raise RejectedRecord(Reason.BAD_FIELD, "late must be a boolean")
    is_new = visit.get("isNew")
    if is_new is not None and type(is_new) is not bool:
        raise RejectedRecord(Reason.BAD_FIELD, "visit.isNew must be a boolean or null")
    delta = authentication_time - _EPOCH
    return Login(
        event_id=event_id,
        authentication_ms=(delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000,
        authentication_time=authentication_time,
        day=authentication_time.date(),
        received_at=_instant(record, "receivedAt"),
        user_id=user_id,
        client_mac=client_mac,
        visitor=visitor,
        company_id=_text(company, "id", "company.id"),
        venue_id=_text(venue, "id", "venue.id"),
        venue_name=_text(venue, "name", "venue.name"),
        provider=_text(user, "provider", "user.provider"),
        visit_id=_text(visit, "id", "visit.id"),
        visit_is_new=is_new,
        late=late,
    )


def dedupe(logins: Iterable[Login]) -> list[Login]:
    """The batch with each ``event_id`` once (the first), in order."""
    seen: dict[str, Login] = {}
    for login in logins:
        seen.setdefault(login.event_id, login)
    return list(seen.values())


def visitor_days(logins: Iterable[Login]) -> list[tuple[str, date, str]]:
    """Distinct (venue, UTC day, visitor) of the logins that have a venue, sorted."""
    return sorted(
        {
            (login.venue_id, login.day, login.visitor)
            for login in logins
            if login.venue_id is not None
        }
    )


def aggregate(
    inserted: Sequence[Login],
    *,
    known_visits: Set[str],
    new_visitor_days: Iterable[tuple[str, date]],
) -> Aggregates:
    """What the newly ``inserted`` logins add to ``visits`` and ``venue_daily``.

    A visit is new when one of its inserted logins says so (``visit.isNew``, set by the
    pipeline's visit stage) and counts on that login's venue and day. When the pipeline did not
    say (``isNew`` null), the visit is new unless it is in ``known_visits`` (the visit ids that
    already had a ``visits`` row before this batch), and counts on the venue and day of its
    earliest login in the batch. ``new_visitor_days``: one (venue, day) pair per visitor of
    ``inserted`` not counted before at that venue that day (the store learns these from its
    own insert). Deltas come sorted by key, so concurrent writers lock rows in the same order.
    """
    visits: dict[str, list[Any]] = {}  # visit id -> [first login, last time, count, flagged]
    days: dict[tuple[str, date], list[int]] = {}  # logins, unique visitors, new visits

    # The hot loop of a batch write: locals and plain comparisons rather than tuples and max().
    for login in inserted:
        venue_id, visit_id, is_new = login.venue_id, login.visit_id, login.visit_is_new
        if venue_id is not None:
            key = (venue_id, login.day)
            counts = days.get(key)
            if counts is None:
                counts = days[key] = [0, 0, 0]
            counts[0] += 1
            if is_new and visit_id is not None:
                counts[2] += 1
        if visit_id is None:
            continue
        visit = visits.get(visit_id)
        if visit is None:
            visits[visit_id] = [login, login.authentication_time, 1, is_new]
            continue
        first = visit[0]
        at_ms = login.authentication_ms
        if at_ms < first.authentication_ms or (
            at_ms == first.authentication_ms and login.event_id < first.event_id
        ):
            visit[0] = login
        if login.authentication_time > visit[1]:
            visit[1] = login.authentication_time
        visit[2] += 1
        if is_new is not None:
            visit[3] = bool(visit[3]) or is_new
    for venue_id, day in new_visitor_days:
        counts = days.get((venue_id, day))
        if counts is None:
            counts = days[venue_id, day] = [0, 0, 0]
        counts[1] += 1

    deltas: list[VisitDelta] = []
    for visit_id in sorted(visits):
        first, last_at, count, flagged = visits[visit_id]
        deltas.append(
            VisitDelta(
                visit_id,
                first.user_id,
                first.client_mac,
                first.venue_id,
                first.authentication_time,
                last_at,
                count,
            )
        )
        if flagged is None and visit_id not in known_visits and first.venue_id is not None:
            days[first.venue_id, first.day][2] += 1

    venue_days = tuple(
        VenueDayDelta(venue_id, day, *counts) for (venue_id, day), counts in sorted(days.items())
    )
    return Aggregates(visits=tuple(deltas), venue_days=venue_days)


def unflagged_visits(inserted: Iterable[Login]) -> list[str]:
    """Visit ids whose logins do not say whether they opened the visit (``isNew`` null)."""
    flagged = {login.visit_id for login in inserted if login.visit_is_new is not None}
    return sorted(
        {
            login.visit_id
            for login in inserted
            if login.visit_id is not None and login.visit_id not in flagged
        }
    )


def _section(record: dict[str, Any], name: str) -> dict[str, Any]:
    value = record.get(name)
    if type(value) is not dict:
        raise RejectedRecord(Reason.BAD_FIELD, f"{name} must be an object")
    return value


def _text(section: dict[str, Any], name: str, path: str, *, required: bool = False) -> str | None:
    value = section.get(name)
    if value is None:
        if required:
            raise RejectedRecord(Reason.MISSING_FIELD, f"{path} is missing")
        return None
    if type(value) is not str or not value:
        raise RejectedRecord(Reason.BAD_FIELD, f"{path} must be a non-empty string or null")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL: such a row would fail every retry and stall the sink.
        raise RejectedRecord(Reason.BAD_FIELD, f"{path} contains a NUL character")
    if len(value) > MAX_TEXT_CHARS:
        # Ids are parts of primary keys, and a B-tree entry over about 2.7 kB makes PostgreSQL
        # refuse the row: again every retry would fail.
        raise RejectedRecord(Reason.BAD_FIELD, f"{path} is longer than {MAX_TEXT_CHARS} characters")
    return value


def _instant(record: dict[str, Any], name: str, *, required: bool = False) -> datetime | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if type(value) is not str or not _INSTANT.fullmatch(value):
        raise RejectedRecord(
            Reason.BAD_FIELD, f"{name} must be a UTC time like 2018-01-18T13:27:08.000Z"
        )
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise RejectedRecord(Reason.BAD_FIELD, f"{name} is not a valid date and time") from None
