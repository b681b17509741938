"""The CRM sink's pure core: canonical login records folded into per-contact upserts.

No I/O and no clock. :func:`login_from_record` reads the fields the CRM needs from one
canonical record (``login.v1``); :func:`plan_upserts` decides, for a batch of logins and what
the sink remembers of each user (:class:`SyncMark`), which contacts to upsert now.

Time is the login's event time (``authenticationTime``, epoch milliseconds), not the wall
clock, so the outcome does not depend on when or in which batches the records are read:

- a login at or before the user's ``handled_event_ms`` was dealt with already (a replay, or a
  late login older than what the CRM holds) and is skipped as ``stale``;
- a login less than ``min_interval_ms`` after the user's last synced login is ``throttled``
  (the sender's advice: contact a visitor at most once a day);
- of several logins of one user in a batch that are due, the latest wins (the others are
  ``superseded``): the CRM gets one upsert per contact per batch, with the newest data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from bridge.errors import WifiBridgeError


class Skip(StrEnum):
    """Why a login did not become an upsert; stable codes, fit for a metric label."""

    NO_EMAIL = "no_email"
    THROTTLED = "throttled"
    STALE = "stale"
    SUPERSEDED = "superseded"


class UnreadableRecord(WifiBridgeError, ValueError):
    """A record on the input topic is not a canonical login; it goes to the dead-letter topic.

    The message names the field, never its value (records carry personal data).
    """

    code = "unreadable_record"


@dataclass(frozen=True, slots=True)
class Login:
    """What the CRM sink needs of one canonical login record.

    ``ref`` is the caller's handle on the record it came from (an index into its batch).
    """

    user_key: str
    event_id: str
    event_ms: int
    email: str | None
    first_name: str | None
    last_name: str | None
    provider: str | None
    venue_id: str | None
    venue_name: str | None
    visit_count: int | None
    ref: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact as the CRM receives it; ``email`` (lower case) is its identity there.

    ``last_visit_ms`` is the login's event time; ``visit_count`` the user's visits at the
    company by the sender's own count (the sum over its venues), None when it sent none.
    """

    email: str
    first_name: str | None
    last_name: str | None
    provider: str | None
    last_venue_id: str | None
    last_venue_name: str | None
    last_visit_ms: int
    visit_count: int | None
    event_id: str

    @property
    def last_visit_iso(self) -> str:
        """``last_visit_ms`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, four-digit year before 1000 too."""
        stamp = _EPOCH + timedelta(milliseconds=self.last_visit_ms)
        return stamp.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


@dataclass(frozen=True, slots=True)
class SyncMark:
    """What the sink remembers of one user, kept across restarts.

    ``synced_event_ms``: event time of the last login the CRM accepted (None: never synced);
    ``handled_event_ms``: the newest login dealt with (accepted or rejected by the CRM).
    """

    user_key: str
    synced_event_ms: int | None
    handled_event_ms: int


@dataclass(frozen=True, slots=True)
class Upsert:
    """One contact to send, the login it comes from, and every user it settles."""

    contact: Contact
    login: Login
    users: tuple[tuple[str, int], ...]
    """(user key, event ms) of each user whose due login this upsert carries."""

    def marks_if_accepted(self, known: Mapping[str, SyncMark]) -> list[SyncMark]:
        return [
            SyncMark(key, event_ms, max(event_ms, _handled(known.get(key))))
            for key, event_ms in self.users
        ]

    def marks_if_rejected(self, known: Mapping[str, SyncMark]) -> list[SyncMark]:
        """A rejected login is handled (a replay does not send it again), not synced."""
        marks = []
        for key, event_ms in self.users:
            mark = known.get(key)
            synced = mark.synced_event_ms if mark else None
            marks.append(SyncMark(key, synced, max(event_ms, _handled(mark))))
        return marks


@dataclass(slots=True)
class Plan:
    upserts: list[Upsert]
    skipped: Counter[Skip]


#: How far a login's time may lie after the bridge received its webhook: the sender's and the
#: bridge's clocks may disagree a little, a login cannot come after its own webhook.
MAX_CLOCK_SKEW_MS: Final = 3_600_000
#: The largest visit count a contact carries: a signed 64-bit integer, what JSON encoders, the
#: outbox and a CRM's number property take. A larger sum is a broken record, not a count.
MAX_VISIT_COUNT: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def login_from_record(record: Mapping[str, Any], *, ref: int = 0) -> Login:
    """The fields of a canonical record the CRM needs; raises :class:`UnreadableRecord`."""
    user = _section(record, "user")
    client = _section(record, "client")
    venue = _section(record, "venue")
    user_id = _optional_text(user, "id", "user.id")
    mac = _optional_text(client, "mac", "client.mac")
    if user_id is not None:
        user_key = user_id
    elif mac is not None:
        user_key = "mac:" + mac
    else:
        raise UnreadableRecord("neither user.id nor client.mac is set")
    event_id = _optional_text(record, "eventId", "eventId")
    if event_id is None:
        raise UnreadableRecord("eventId is missing")
    email = _optional_text(user, "email", "user.email")
    event_ms = _time_ms(record.get("authenticationTime"), "authenticationTime")
    received = record.get("receivedAt")
    if received is not None and event_ms > _time_ms(received, "receivedAt") + MAX_CLOCK_SKEW_MS:
        # A login cannot happen after its webhook arrived. Synced, such a time would make every
        # later login of the user look stale until the clocks caught up with it.
        raise UnreadableRecord("authenticationTime is more than an hour after receivedAt")
    return Login(
        user_key=user_key,
        event_id=event_id,
        event_ms=event_ms,
        email=email.lower() if email and "@" in email else None,
        first_name=_optional_text(user, "firstName", "user.firstName"),
        last_name=_optional_text(user, "lastName", "user.lastName"),
        provider=_optional_text(user, "provider", "user.provider"),
        venue_id=_optional_text(venue, "id", "venue.id"),
        venue_name=_optional_text(venue, "name", "venue.name"),
        visit_count=_visit_count(record.get("visitCounts")),
        ref=ref,
    )


def contact_of(login: Login) -> Contact:
    if login.email is None:
        raise ValueError("a login without an e-mail address has no contact")
    return Contact(
        email=login.email,
        first_name=login.first_name,
        last_name=login.last_name,
        provider=login.provider,
        last_venue_id=login.venue_id,
        last_venue_name=login.venue_name,
        last_visit_ms=login.event_ms,
        visit_count=login.visit_count,
        event_id=login.event_id,
    )


def plan_upserts(
    logins: Iterable[Login], known: Mapping[str, SyncMark], *, min_interval_ms: int
) -> Plan:
    """Which contacts to upsert for ``logins``, given the marks ``known`` per user key.

    The result has at most one upsert per e-mail address (two users sharing one address
    become one upsert: the newer login wins) and counts every login that was not sent.
    """
    if min_interval_ms < 0:
        raise ValueError("min_interval_ms must be >= 0")
    skipped: Counter[Skip] = Counter()
    by_user: dict[str, list[Login]] = {}
    for login in logins:
        if login.email is None:
            skipped[Skip.NO_EMAIL] += 1
            continue
        by_user.setdefault(login.user_key, []).append(login)

    chosen: list[Login] = []
    for user_key, user_logins in by_user.items():
        mark = known.get(user_key)
        anchor_ms = mark.synced_event_ms if mark else None
        handled_ms = mark.handled_event_ms if mark else None
        pick: Login | None = None
        for login in sorted(user_logins, key=lambda item: (item.event_ms, item.event_id)):
            if handled_ms is not None and login.event_ms <= handled_ms:
                skipped[Skip.STALE] += 1
            elif anchor_ms is not None and login.event_ms - anchor_ms < min_interval_ms:
                skipped[Skip.THROTTLED] += 1
            else:
                if pick is not None:
                    skipped[Skip.SUPERSEDED] += 1
                pick, anchor_ms = login, login.event_ms
        if pick is not None:
            chosen.append(pick)

    by_email: dict[str, list[Login]] = {}
    for login in chosen:
        assert login.email is not None
        by_email.setdefault(login.email, []).append(login)
    upserts = []
    for same_address in by_email.values():
        same_address.sort(key=lambda item: (item.event_ms, item.event_id))
        newest = same_address[-1]
        if len(same_address) > 1:
            skipped[Skip.SUPERSEDED] += len(same_address) - 1
        upserts.append(
            Upsert(
                contact=contact_of(newest),
                login=newest,
                users=tuple((login.user_key, login.event_ms) for login in same_address),
            )
        )
    upserts.sort(key=lambda upsert: upsert.login.ref)
    return Plan(upserts=upserts, skipped=skipped)


def chunks(items: Sequence[Upsert], size: int) -> list[list[Upsert]]:
    """``items`` in consecutive lists of at most ``size``."""
    if size < 1:
        raise ValueError("size must be >= 1")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------
# Reading fields


def _handled(mark: SyncMark | None) -> int:
    return mark.handled_event_ms if mark else -(2**62)


def _section(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = record.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UnreadableRecord(f"{name} is not an object")
    return value


def _optional_text(section: Mapping[str, Any], name: str, path: str) -> str | None:
    value = section.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UnreadableRecord(f"{path} is not a string")
    if "\x00" in value:
        # SQLite's JSON functions end a text at NUL: the sync mark of such a user id would
        # never be found again, and every login (a replay too) would be sent once more.
        raise UnreadableRecord(f"{path} contains a NUL character")
    value = value.strip()
    return value or None


def _time_ms(value: Any, name: str) -> int:
    if not isinstance(value, str):
        raise UnreadableRecord(f"{name} is missing or not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UnreadableRecord(f"{name} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise UnreadableRecord(f"{name} has no UTC offset")
    try:
        # A contact carries the time in UTC (lastVisitAt): an offset that moves it out of the
        # years 1-9999 would fail every attempt to send it, and stall the sink on its record.
        utc = parsed.astimezone(UTC)
    except OverflowError:
        raise UnreadableRecord(f"{name} is outside the years 1 to 9999 in UTC") from None
    return round((utc - _EPOCH) / timedelta(milliseconds=1))


def _visit_count(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UnreadableRecord("visitCounts is not an object")
    total = 0
    for count in value.values():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UnreadableRecord("visitCounts has a count that is not a whole number >= 0")
        total += count
    if total > MAX_VISIT_COUNT:
        # Encoded as JSON (webhook, outbox) it would fail every attempt and stall the sink.
        raise UnreadableRecord("visitCounts adds up to more than a 64-bit count")
    return total
