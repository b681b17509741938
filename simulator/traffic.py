"""A deterministic plan of BT Wi-Fi traffic: which bodies are posted when, and what to expect.

Pure: given a :class:`TrafficConfig` (with its seed) and a start time, :func:`plan` returns
every delivery the sender would attempt, in send order, and the :class:`Expected` outcome a
store should hold afterwards. No clock, no network: :mod:`simulator.sender` posts the plan.

What the sender does, per its contract (see ``docs/simulator.md``):

* one post per login; a visitor may log in again during a visit (a **re-login**: a new login
  time, so a new event);
* the same login is sometimes posted again (a **redelivery**: the same body, the same event);
* posts can arrive a little **out of order** (a few seconds of delay, inside the pipeline's
  lateness);
* during an **outage** of the listener every post fails; the sender retries each one about
  3 hours later, in no particular order. With ``time_compression`` (default 1000) those
  3 hours pass in 10.8 s of the run; the login times stay as they were, so the retried
  logins arrive late.

Bodies use both of the sender's layouts (venue inside ``user`` with ``visitCountsForVenues``,
or venue at the top level with ``visitCountForVenues`` and ids as strings).
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from bridge.event import identify

__all__ = ["Delivery", "Expected", "Layout", "TrafficConfig", "plan"]

RETRY_DELAY_MS = 3 * 3_600_000
"""The sender retries a failed delivery only after 3 hours."""

_FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gita", "Hugo", "Isla", "Jon")
_LAST_NAMES = ("Archer", "Bell", "Clark", "Dunn", "Evans", "Fox", "Grant", "Hale", "Ito")
_PROVIDERS = ("Facebook", "Google", "Email", "Twitter", "LinkedIn")
_AGENT = "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Mobile"


class Layout(StrEnum):
    SAMPLE = "sample"
    """As the sender's documented sample: venue inside ``user``, numeric ids."""
    TABLE = "table"
    """As the sender's field table: venue at the top level, ids as strings."""
    BOTH = "both"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrafficConfig:
    """What to simulate; times carry their unit, shares are fractions in [0, 1]."""

    rate_per_s: float = 20.0
    duration_s: float = 30.0
    venues: int = 5
    users: int = 200
    relogin_share: float = 0.2
    redelivery_share: float = 0.05
    disorder_share: float = 0.05
    disorder_max_ms: int = 5_000
    gzip_share: float = 0.3
    layout: Layout = Layout.BOTH
    outage_start_s: float | None = None
    outage_duration_s: float = 0.0
    time_compression: float = 1000.0
    visit_gap_ms: int = 30 * 60_000
    first_user_id: int = 10_000
    """Visitors get ids from here: runs with different values simulate different people."""
    seed: int = 1

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration must be positive")
        if self.venues < 1 or self.users < 1:
            raise ValueError("venues and users must be at least 1")
        for name in ("relogin_share", "redelivery_share", "disorder_share", "gzip_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.time_compression < 1:
            raise ValueError("time_compression must be at least 1")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One post: ``at_ms`` is when to send it, relative to the start of the run."""

    at_ms: int
    body: bytes
    event_id: str
    gzip: bool
    kind: str
    """``login``, ``relogin``, ``redelivery`` or ``retry`` (a post failed in the outage)."""
    fails: bool = False
    """Sent while the listener is "down": the sender counts it failed and retries it later."""


@dataclass(slots=True)
class Expected:
    """What the stores should hold once every delivery went through the whole chain."""

    posts: int = 0
    unique_logins: int = 0
    redeliveries: int = 0
    relogins: int = 0
    outage_failed: int = 0
    visits: int = 0
    visitors: int = 0
    """Distinct people who logged in: the CRM contacts a run should create."""
    logins_by_venue: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "unique_logins": self.unique_logins,
            "redeliveries": self.redeliveries,
            "relogins": self.relogins,
            "outage_failed": self.outage_failed,
            "visits": self.visits,
            "visitors": self.visitors,
            "logins_by_venue": dict(sorted(self.logins_by_venue.items())),
        }


@dataclass(slots=True)
class _Person:
    user_id: int
    mac: str
    first_name: str
    last_name: str
    email: str
    provider: str
    gender: str
    birth: str
    visits: dict[int, int] = field(default_factory=dict)
    last_login: tuple[int, int] | None = None  # (venue, login ms) of the latest login


def plan(config: TrafficConfig, *, start_ms: int) -> tuple[list[Delivery], Expected]:
    """Every delivery of the run in send order, and the expected outcome.

    ``start_ms`` is the wall-clock epoch ms the run starts at: login times are
    ``start_ms + at_ms`` of the login's first delivery, as a real sender stamps them.
    """
    rng = random.Random(config.seed)
    people = [_person(rng, config.first_user_id + n) for n in range(config.users)]
    venues = [_venue(rng, n) for n in range(config.venues)]
    total = max(1, round(config.rate_per_s * config.duration_s))
    interval_ms = 1000 / config.rate_per_s
    outage = _outage_window(config)

    deliveries: list[Delivery] = []
    expected = Expected()
    logins: dict[tuple[int, str], list[int]] = defaultdict(list)
    sent_logins: list[Delivery] = []
    for n in range(total):
        at_ms = round(n * interval_ms)
        roll = rng.random()
        if sent_logins and roll < config.redelivery_share:
            original = rng.choice(sent_logins[-200:])
            delivery = Delivery(
                at_ms, original.body, original.event_id, original.gzip, "redelivery"
            )
            expected.redeliveries += 1
        else:
            person, venue, kind = _who_and_where(rng, config, people, venues, at_ms)
            login_ms = start_ms + at_ms
            body = _body(rng, config, person, venue, login_ms)
            event_id = identify(orjson.loads(body)).event_id
            delivery = Delivery(at_ms, body, event_id, rng.random() < config.gzip_share, kind)
            sent_logins.append(delivery)
            expected.unique_logins += 1
            expected.relogins += kind == "relogin"
            venue_id = str(venue["id"])
            logins[(person.user_id, venue_id)].append(login_ms)
            expected.logins_by_venue[venue_id] = expected.logins_by_venue.get(venue_id, 0) + 1
        if rng.random() < config.disorder_share:
            delivery = _delayed(delivery, rng.randrange(1, config.disorder_max_ms + 1))
        if outage is not None and outage[0] <= delivery.at_ms < outage[1]:
            deliveries.append(_failed(delivery))
            retry_at_ms = delivery.at_ms + round(RETRY_DELAY_MS / config.time_compression)
            # "in no particular order": each retry lands somewhere in a second-wide window
            retry_at_ms += rng.randrange(0, 1000)
            deliveries.append(_retry(delivery, retry_at_ms))
            expected.outage_failed += 1
        else:
            deliveries.append(delivery)
    deliveries.sort(key=lambda d: d.at_ms)  # stable: equal times keep their order
    expected.posts = sum(1 for d in deliveries if not d.fails)
    expected.visits = _count_visits(logins, config.visit_gap_ms)
    expected.visitors = len({user for user, _ in logins})
    return deliveries, expected


def _outage_window(config: TrafficConfig) -> tuple[int, int] | None:
    if config.outage_start_s is None or config.outage_duration_s <= 0:
        return None
    start_ms = round(config.outage_start_s * 1000)
    return start_ms, start_ms + round(config.outage_duration_s * 1000)


def _who_and_where(
    rng: random.Random,
    config: TrafficConfig,
    people: list[_Person],
    venues: list[dict[str, Any]],
    at_ms: int,
) -> tuple[_Person, dict[str, Any], str]:
    recent = [p for p in people[-50:] if p.last_login is not None] if people else []
    if recent and rng.random() < config.relogin_share:
        person = rng.choice(recent)
        assert person.last_login is not None
        venue = venues[person.last_login[0]]
        kind = "relogin"
    else:
        person = rng.choice(people)
        venue = rng.choice(venues)
        kind = "login"
    venue_index = venues.index(venue)
    person.last_login = (venue_index, at_ms)
    person.visits[venue_index] = person.visits.get(venue_index, 0) + (kind == "login")
    people.remove(person)
    people.append(person)  # the most recent visitors are at the end
    return person, venue, kind


def _count_visits(logins: dict[tuple[int, str], list[int]], gap_ms: int) -> int:
    """Visits = per (user, venue), 1 + the gaps between consecutive logins of at least gap."""
    visits = 0
    for times in logins.values():
        times.sort()
        visits += 1 + sum(1 for a, b in itertools.pairwise(times) if b - a >= gap_ms)
    return visits


def _person(rng: random.Random, user_id: int) -> _Person:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    n = user_id
    return _Person(
        user_id=user_id,
        mac="-".join(f"{b:02X}" for b in (0x02, n >> 16 & 255, n >> 8 & 255, n & 255, 0x5A, 0x11)),
        first_name=first,
        last_name=last,
        email=f"{first.lower()}.{last.lower()}.{user_id}@example.com",
        provider=rng.choice(_PROVIDERS),
        gender=rng.choice(("F", "M", "")),
        birth=f"{rng.randrange(1950, 2006)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
    )


def _venue(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "id": 500 + n,
        "name": f"Venue {n + 1}",
        "latitude": f"{rng.uniform(50.0, 55.0):.7f}",
        "longitude": f"{rng.uniform(-4.0, 1.0):.7f}",
    }


def _body(
    rng: random.Random,
    config: TrafficConfig,
    person: _Person,
    venue: dict[str, Any],
    login_ms: int,
) -> bytes:
    layout = config.layout
    if layout is Layout.BOTH:
        layout = Layout.SAMPLE if rng.random() < 0.5 else Layout.TABLE
    moment = datetime.fromtimestamp(login_ms / 1000, UTC)
    # The sender's spelling: seconds and a +0000 offset; the milliseconds keep logins apart.
    login_time = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{login_ms % 1000:03d}+0000"
    counts = {str(venue["id"]): max(1, sum(person.visits.values()))}
    user: dict[str, Any] = {
        "id": person.user_id,
        "email": person.email,
        "firstName": person.first_name,
        "lastName": person.last_name,
        "gender": person.gender,
        "dateOfBirth": person.birth,
        "provider": person.provider,
    }
    body: dict[str, Any] = {
        "client": {"mac": person.mac, "userAgent": _AGENT},
        "company": {"id": 999, "name": "Simulated Company"},
        "session": {"authenticationTime": login_time},
        "user": user,
    }
    if layout is Layout.SAMPLE:
        user["visitCountsForVenues"] = counts
        user["venue"] = dict(venue)
    else:
        user["id"] = str(person.user_id)
        user["visitCountForVenues"] = counts
        body["company"]["id"] = "999"
        body["venue"] = {**venue, "id": str(venue["id"])}
    return orjson.dumps(body)


def _delayed(delivery: Delivery, delay_ms: int) -> Delivery:
    return Delivery(
        delivery.at_ms + delay_ms, delivery.body, delivery.event_id, delivery.gzip, delivery.kind
    )


def _failed(delivery: Delivery) -> Delivery:
    return Delivery(
        delivery.at_ms, delivery.body, delivery.event_id, delivery.gzip, delivery.kind, fails=True
    )


def _retry(delivery: Delivery, at_ms: int) -> Delivery:
    return Delivery(at_ms, delivery.body, delivery.event_id, delivery.gzip, "retry")
