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
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import orjson

from bridge.errors import WifiBridgeError

__all__ = [
    "Aggregates",
    "Login",
    "Reason",
    "RejectedRecord",
    "VenueDayDelta",
    "VisitDelta",
    "VisitorDay",
    "aggregate",
    "dedupe",
    "parse_login",
    "visitor_days",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS: Final = 86_400_000
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
    else the MAC.
    """

    event_id: str
    authentication_ms: int
    received_ms: int | None
    user_id: str | None
    client_mac: str | None
    company_id: str | None
    venue_id: str | None
    venue_name: str | None
    provider: str | None
    visit_id: str | None
    visit_is_new: bool | None
    late: bool

    @property
    def visitor(self) -> str:
        # parse_login guarantees one of the two is set.
        return self.user_id if self.user_id is not None else f"mac:{self.client_mac}"

    @property
    def day(self) -> date:
        return utc_day(self.authentication_ms)

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
            utc_datetime(self.authentication_ms),
            None if self.received_ms is None else utc_datetime(self.received_ms),
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


@dataclass(frozen=True, slots=True)
class VisitorDay:
    """One visitor seen at one venue on one UTC day (what "unique visitors" counts)."""

    venue_id: str
    day: date
    visitor: str


@dataclass(frozen=True, slots=True)
class VisitDelta:
    """What a batch adds to one ``visits`` row: its span widens, its count grows."""

    visit_id: str
    user_id: str | None
    client_mac: str | None
    venue_id: str | None
    first_login_ms: int
    last_login_ms: int
    logins: int


@dataclass(frozen=True, slots=True)
class VenueDayDelta:
    """What a batch adds to one ``venue_daily`` row."""

    venue_id: str
    day: date
    logins: int
    unique_visitors: int
    new_visits: int


@dataclass(frozen=True, slots=True)
class Aggregates:
    visits: tuple[VisitDelta, ...]
    venue_days: tuple[VenueDayDelta, ...]


def utc_datetime(epoch_ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=epoch_ms)


def utc_day(epoch_ms: int) -> date:
    return (_EPOCH + timedelta(days=epoch_ms // _DAY_MS)).date()


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
    authentication_ms = _instant(record, "authenticationTime", required=True)
    assert authentication_ms is not None
    user_id = _text(user, "id", "user.id")
    client_mac = _text(client, "mac", "client.mac")
    if user_id is None and client_mac is None:
        raise RejectedRecord(Reason.MISSING_FIELD, "neither user.id nor client.mac is set")
    late = record["late"]
    if type(late) is not bool:
        raise RejectedRecord(Reason.BAD_FIELD, "late must be a boolean")
    is_new = visit.get("isNew")
    if is_new is not None and type(is_new) is not bool:
        raise RejectedRecord(Reason.BAD_FIELD, "visit.isNew must be a boolean or null")
    return Login(
        event_id=event_id,
        authentication_ms=authentication_ms,
        received_ms=_instant(record, "receivedAt"),
        user_id=user_id,
        client_mac=client_mac,
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


def visitor_days(logins: Iterable[Login]) -> list[VisitorDay]:
    """Distinct (venue, UTC day, visitor) of the logins that have a venue, sorted."""
    found = {
        VisitorDay(login.venue_id, login.day, login.visitor)
        for login in logins
        if login.venue_id is not None
    }
    return sorted(found, key=lambda v: (v.venue_id, v.day, v.visitor))


def aggregate(
    inserted: Sequence[Login],
    *,
    known_visits: Set[str],
    new_visitor_days: Iterable[tuple[str, date]],
) -> Aggregates:
    """What the newly ``inserted`` logins add to ``visits`` and ``venue_daily``.

    ``known_visits``: the visit ids of ``inserted`` that already had a ``visits`` row before
    this batch. ``new_visitor_days``: one (venue, day) pair per visitor of ``inserted`` not
    counted before at that venue that day (the store learns these from its own insert).
    A new visit counts on the venue and day of its earliest login in the batch. Deltas come
    sorted by key, so concurrent writers lock rows in the same order.
    """
    by_visit: dict[str, list[Login]] = {}
    days: dict[tuple[str, date], list[int]] = {}  # logins, unique visitors, new visits

    def counters(venue_id: str, day: date) -> list[int]:
        return days.setdefault((venue_id, day), [0, 0, 0])

    for login in inserted:
        if login.visit_id is not None:
            by_visit.setdefault(login.visit_id, []).append(login)
        if login.venue_id is not None:
            counters(login.venue_id, login.day)[0] += 1
    for venue_id, day in new_visitor_days:
        counters(venue_id, day)[1] += 1

    visits: list[VisitDelta] = []
    for visit_id in sorted(by_visit):
        logins = by_visit[visit_id]
        first = min(logins, key=lambda login: (login.authentication_ms, login.event_id))
        visits.append(
            VisitDelta(
                visit_id=visit_id,
                user_id=first.user_id,
                client_mac=first.client_mac,
                venue_id=first.venue_id,
                first_login_ms=first.authentication_ms,
                last_login_ms=max(login.authentication_ms for login in logins),
                logins=len(logins),
            )
        )
        if visit_id not in known_visits and first.venue_id is not None:
            counters(first.venue_id, first.day)[2] += 1

    venue_days = tuple(
        VenueDayDelta(venue_id, day, logins=c[0], unique_visitors=c[1], new_visits=c[2])
        for (venue_id, day), c in sorted(days.items())
    )
    return Aggregates(visits=tuple(visits), venue_days=venue_days)


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
    return value


def _instant(record: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if type(value) is not str or not _INSTANT.fullmatch(value):
        raise RejectedRecord(
            Reason.BAD_FIELD, f"{name} must be a UTC time like 2018-01-18T13:27:08.000Z"
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RejectedRecord(Reason.BAD_FIELD, f"{name} is not a valid date and time") from None
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
