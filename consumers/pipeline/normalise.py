"""One raw login body, in either of the sender's layouts, as one canonical record.

Pure: no I/O, no clock. The identifying fields are read with :mod:`bridge.event`, so a record's
``eventId`` is the ``event-id`` header the bridge put on the raw record. The canonical record is
described field by field in ``docs/data-contract.md`` and by the JSON Schema at
:data:`SCHEMA_PATH`.

Required: ``session.authenticationTime`` (with an offset) and at least one of ``user.id`` and
``client.mac``. Everything else may be missing and becomes ``null``. Error messages name fields
and JSON types, never values: bodies carry personal data.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import orjson

from bridge.errors import WifiBridgeError
from bridge.event import id_string, identify, normalise_mac, parse_time_ms

__all__ = ["SCHEMA_PATH", "NormalisationError", "Reason", "normalise", "normalise_timed"]

#: JSON Schema (draft 2020-12) of the record :func:`normalise` returns.
SCHEMA_PATH: Final = Path(__file__).resolve().parent / "schema" / "login.v1.json"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# The sender's sample spells it one way, its field table the other.
_VISIT_COUNT_FIELDS: Final = ("visitCountsForVenues", "visitCountForVenues")
# Field names accepted in the list form of the visit counts, which the sender's table calls an
# array without showing one: a guess, kept narrow.
_ENTRY_VENUE_FIELDS: Final = ("venueId", "id")
_ENTRY_COUNT_FIELDS: Final = ("count", "visitCount")
# 18 digits: any real count, far from int()'s digit limit, and within the 64-bit integers
# orjson writes (a whole float such as 1e20 stands for an integer it cannot write).
_MAX_COUNT: Final = 10**18 - 1
_MAX_LATITUDE: Final = 90.0
_MAX_LONGITUDE: Final = 180.0
_MIN_MS: Final = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_MAX_MS: Final = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)


class Reason(StrEnum):
    """Why a body cannot be normalised; stable codes, fit for a metric label."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    BAD_SECTION = "bad_section"
    MISSING_AUTHENTICATION_TIME = "missing_authentication_time"
    BAD_AUTHENTICATION_TIME = "bad_authentication_time"
    MISSING_USER_ID = "missing_user_id"
    BAD_ID = "bad_id"
    BAD_COORDINATES = "bad_coordinates"
    BAD_VISIT_COUNTS = "bad_visit_counts"
    FUTURE_AUTHENTICATION_TIME = "future_authentication_time"
    UNREADABLE = "unreadable"


class NormalisationError(WifiBridgeError):
    """A body that cannot become a canonical record; ``reason`` says why.

    The message names the offending field and at most its JSON type, never its value.
    """

    code = "normalisation_error"

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalise(
    raw: bytes, *, event_id: str | None = None, received_at_ms: int | None = None
) -> dict[str, Any]:
    """The canonical record (``login.v1``) of one raw body, ready for ``orjson.dumps``.

    ``event_id`` is the raw record's ``event-id`` header; without it the id is computed as the
    bridge computes it. ``received_at_ms`` is the ``received-at`` header (epoch milliseconds).
    Raises :class:`NormalisationError` when the body cannot be normalised.
    """
    return normalise_timed(raw, event_id=event_id, received_at_ms=received_at_ms)[0]


def normalise_timed(
    raw: bytes, *, event_id: str | None = None, received_at_ms: int | None = None
) -> tuple[dict[str, Any], int]:
    """:func:`normalise`, and the login time as epoch milliseconds (the pipeline orders by it)."""
    body = _parse(raw)
    client = _section(body, "client", "client")
    company = _section(body, "company", "company")
    session = _section(body, "session", "session")
    user = _section(body, "user", "user")
    top_venue = _section(body, "venue", "venue")
    # Where bridge.event.venue_section looks: inside user, else at the top level.
    venue = _section(user, "venue", "user.venue") or top_venue

    authentication_ms = _authentication_ms(session)
    user_id = _id(user.get("id"), "user.id")
    mac = normalise_mac(client.get("mac"))
    if user_id is None and mac is None:
        raise NormalisationError(
            Reason.MISSING_USER_ID, "neither user.id nor client.mac is present"
        )

    record = {
        "eventId": event_id or identify(body).event_id,
        "authenticationTime": _iso_login(authentication_ms),
        "receivedAt": (
            _iso_received(received_at_ms)
            if received_at_ms is not None and _MIN_MS <= received_at_ms <= _MAX_MS
            else None
        ),
        "user": {
            "id": user_id,
            "email": _text(user, "email"),
            "firstName": _text(user, "firstName"),
            "lastName": _text(user, "lastName"),
            "gender": _text(user, "gender"),
            "dateOfBirth": _text(user, "dateOfBirth"),
            "provider": _text(user, "provider"),
        },
        "client": {"mac": mac, "userAgent": _text(client, "userAgent")},
        "company": {"id": _id(company.get("id"), "company.id"), "name": _text(company, "name")},
        "venue": {
            "id": _id(venue.get("id"), "venue.id"),
            "name": _text(venue, "name"),
            "latitude": _coordinate(venue.get("latitude"), "venue.latitude", _MAX_LATITUDE),
            "longitude": _coordinate(venue.get("longitude"), "venue.longitude", _MAX_LONGITUDE),
        },
        "visitCounts": _visit_counts(user, body),
        "visit": {"id": None, "isNew": None},
        "late": False,
    }
    return record, authentication_ms


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # The position only: orjson's own message could quote the body in future versions.
        raise NormalisationError(
            Reason.INVALID_JSON, f"body is not valid JSON (at byte {exc.pos})"
        ) from None
    if type(parsed) is not dict:
        raise NormalisationError(
            Reason.NOT_AN_OBJECT, f"body must be a JSON object, got {_json_type(parsed)}"
        )
    return parsed


def _section(holder: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    value = holder.get(name)
    if value is None:
        return {}
    if type(value) is not dict:
        raise NormalisationError(
            Reason.BAD_SECTION, f"{path} must be an object, got {_json_type(value)}"
        )
    return value


def _authentication_ms(session: dict[str, Any]) -> int:
    value = session.get("authenticationTime")
    if value is None or value == "":
        raise NormalisationError(
            Reason.MISSING_AUTHENTICATION_TIME, "session.authenticationTime is missing"
        )
    time_ms = parse_time_ms(value)
    # A local time in year 1 or 9999 can have its UTC instant outside the years ISO can write.
    if time_ms is not None and _MIN_MS <= time_ms <= _MAX_MS:
        return time_ms
    raise NormalisationError(
        Reason.BAD_AUTHENTICATION_TIME,
        "session.authenticationTime is not an ISO 8601 time with a UTC offset",
    )


class _IsoUtc:
    """``2018-01-18T13:27:08.000Z`` from epoch ms: always UTC, always milliseconds.

    Records of one field are close in time but not in order (logins arrive seconds apart and
    shuffled), so each formatter keeps the text of the last ``_ISO_CACHED_SECONDS`` seconds it
    wrote (one per field: login and receive times differ), and starts afresh when full.
    """

    __slots__ = ("_prefixes",)

    def __init__(self) -> None:
        self._prefixes: dict[int, str] = {}

    def __call__(self, epoch_ms: int) -> str:
        seconds, millis = divmod(epoch_ms, 1000)
        prefix = self._prefixes.get(seconds)
        if prefix is None:
            if len(self._prefixes) >= _ISO_CACHED_SECONDS:
                self._prefixes.clear()
            moment = _EPOCH + timedelta(seconds=seconds)
            prefix = moment.isoformat(timespec="seconds").removesuffix("+00:00")
            self._prefixes[seconds] = prefix
        return prefix + _MILLIS[millis]


_ISO_CACHED_SECONDS: Final = 4096
_MILLIS: Final = tuple(f".{millis:03d}Z" for millis in range(1000))


_iso_login = _IsoUtc()
_iso_received = _IsoUtc()


def _id(value: Any, path: str) -> str | None:
    """888, 888.0, "888" and "888.0" are one id, "888", as in :func:`bridge.event.identify`."""
    kind = type(value)
    if kind is str:
        return id_string(value)
    if kind is int:
        return str(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise NormalisationError(
            Reason.BAD_ID, f"{path} must be a number or a string, got {_json_type(value)}"
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise NormalisationError(Reason.BAD_ID, f"{path} must be a whole number")
        if abs(value) >= _EXACT_FLOAT_LIMIT:
            # A JSON integer too large for 64 bits is parsed as a float, which has lost its
            # digits: taken as it is, two users' ids could become one.
            raise NormalisationError(
                Reason.BAD_ID, f"{path} is too large a number to read exactly (send it as a string)"
            )
        value = int(value)
    return str(value)


_EXACT_FLOAT_LIMIT: Final = 2**53  # every whole number below it is exact as a float


def _text(section: dict[str, Any], name: str) -> str | None:
    # Descriptive fields are not worth losing a login over: anything but text becomes null.
    value = section.get(name)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _coordinate(value: Any, path: str, limit: float) -> float | None:
    if value is None or value == "":
        return None
    number: float | None = None
    if isinstance(value, str):  # the sender's spelling: tested first
        try:
            number = float(value)
        except ValueError:
            number = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or abs(number) > limit:
        raise NormalisationError(
            Reason.BAD_COORDINATES, f"{path} must be a number between -{limit:g} and {limit:g}"
        )
    return number


def _visit_counts(user: dict[str, Any], body: dict[str, Any]) -> dict[str, int] | None:
    """Visit counts by venue id, from ``user`` (both documented layouts) or the top level."""
    for holder, prefix in ((user, "user."), (body, "")):
        for name in _VISIT_COUNT_FIELDS:
            value = holder.get(name)
            if value is not None:
                return _counts(value, prefix + name)
    return None


def _counts(value: Any, path: str) -> dict[str, int]:
    if type(value) is dict:
        pairs = list(value.items())
    elif type(value) is list:
        pairs = [_count_entry(entry, path) for entry in value]
    else:
        raise NormalisationError(
            Reason.BAD_VISIT_COUNTS,
            f"{path} must be an object or an array, got {_json_type(value)}",
        )
    counts: dict[str, int] = {}
    for venue, count in pairs:
        if type(venue) is str and type(count) is int and 0 <= count <= _MAX_COUNT:  # usual
            key = id_string(venue)
            if key and key not in counts:
                counts[key] = count
                continue
        venue_id = _id(venue, f"{path} venue id")
        if venue_id is None or venue_id in counts:
            raise NormalisationError(
                Reason.BAD_VISIT_COUNTS, f"{path} has an empty or repeated venue id"
            )
        counts[venue_id] = _count(count, path)
    return counts


def _count_entry(entry: Any, path: str) -> tuple[Any, Any]:
    if type(entry) is dict:
        venue = next((entry[f] for f in _ENTRY_VENUE_FIELDS if entry.get(f) is not None), None)
        count = next((entry[f] for f in _ENTRY_COUNT_FIELDS if entry.get(f) is not None), None)
        if venue is not None and count is not None:
            return venue, count
    raise NormalisationError(
        Reason.BAD_VISIT_COUNTS, f"each entry of {path} must be an object with venueId and count"
    )


def _count(value: Any, path: str) -> int:
    count: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    elif isinstance(value, str) and value.strip().isdecimal() and len(value.strip()) <= 18:
        count = int(value.strip())
    if count is None or not 0 <= count <= _MAX_COUNT:
        raise NormalisationError(
            Reason.BAD_VISIT_COUNTS,
            f"{path} counts must be whole numbers of at least 0 and at most 18 digits",
        )
    return count


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: safe to put in a message, unlike the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
