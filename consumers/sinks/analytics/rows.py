"""Canonical login records as rows of the ``logins`` table.

Pure: no I/O, no clock. The service shell parses each Kafka record with :func:`parse_login`;
the store inserts the batch's logins idempotently (on ``event_id``), and the ``visits`` and
``venue_daily`` views are computed from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import orjson

from bridge.errors import WifiBridgeError

__all__ = [
    "Login",
    "Reason",
    "RejectedRecord",
    "dedupe",
    "parse_login",
]

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
    find the rows); one of them is always set, and the views count a visitor by the user id,
    else ``mac:`` and the MAC. Times are aware UTC datetimes, what both database drivers bind.
    """

    event_id: str
    authentication_time: datetime
    received_at: datetime | None
    user_id: str | None
    client_mac: str | None
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
        authentication_time=authentication_time,
        received_at=_instant(record, "receivedAt"),
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
