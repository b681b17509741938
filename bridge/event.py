"""Identity of a login: the partition key and the stable event id.

Pure functions over the parsed body. They read only the four identifying fields, in either of
the sender's two layouts (``venue`` inside ``user`` as in its sample, or at the top level as in
its field table; ids as numbers or numeric strings), so both layouts of one login get the same
key and the same event id. Everything else about the body is the pipeline's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

#: Key used when a body names neither a user nor a client MAC. All such records share a
#: partition, which keeps them ordered and visible rather than scattered.
FALLBACK_KEY = "unknown"

_EMPTY: dict[str, Any] = {}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_EVENT_ID_VERSION = "v1"
_SEPARATOR = "\x1f"
_MAC_SEPARATORS = str.maketrans("", "", "-:. ")
_HEX_DIGITS = frozenset("0123456789abcdef")
# The spellings senders use (one separator, six pairs): the answer is the text, lowercased, with
# colons, so the general path below is needed only for the others.
_USUAL_MAC = re.compile(r"[0-9A-Fa-f]{2}([-:])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")


@dataclass(frozen=True, slots=True)
class LoginIdentity:
    key: bytes
    event_id: str


# A whole number written with a zero fraction: "888.0" is the text of the number 888.0.
_ZERO_FRACTION = re.compile(r"(-?[0-9]+)\.0+")


def id_string(text: str) -> str | None:
    """An id the sender wrote as a string: ``" 888 "``, ``"888"`` and ``"888.0"`` are ``888``
    (the text of the numbers 888 and 888.0); any other text is the id as it is."""
    text = text.strip()
    if "." in text:
        whole = _ZERO_FRACTION.fullmatch(text)
        if whole is not None:
            return whole[1]
    return text or None


def _id_text(value: Any) -> str | None:
    """An id as the sender means it: 888, "888", 888.0 and "888.0" are one id; bool, and
    anything but a number or a string (an array, an object), is not an id."""
    kind = type(value)
    if kind is str:
        return id_string(value)
    if kind is int:
        return str(value)
    if kind is not float:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def normalise_mac(value: Any) -> str | None:
    """``00-01-02-03-04-05`` and ``00:01:02:03:04:05`` are one MAC: ``00:01:02:03:04:05``."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    usual = _USUAL_MAC.fullmatch(text)
    if usual is not None:
        lowered = text.lower()
        return lowered if usual[1] == ":" else lowered.replace("-", ":")
    digits = text.translate(_MAC_SEPARATORS).lower()
    if len(digits) != 12 or not _HEX_DIGITS.issuperset(digits):
        return text or None
    return ":".join(
        (digits[0:2], digits[2:4], digits[4:6], digits[6:8], digits[8:10], digits[10:12])
    )


def parse_time_ms(value: Any) -> int | None:
    """``2018-01-18T13:27:08+0000`` (and ISO 8601 spellings of it) as epoch milliseconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        # Python 3.11 reads every ISO 8601 spelling the sender uses, "+0000" included.
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    # In integers: float seconds times 1000 is a millisecond off for many times outside 1970-2038.
    return (moment - _EPOCH) // _MILLISECOND


def _section(body: dict[str, Any], name: str) -> dict[str, Any]:
    section = body.get(name)
    return section if type(section) is dict else _EMPTY


def venue_section(body: dict[str, Any]) -> dict[str, Any]:
    """The venue, wherever this body's layout puts it."""
    nested = _section(_section(body, "user"), "venue")
    return nested or _section(body, "venue")


def identify(body: dict[str, Any]) -> LoginIdentity:
    """Key and event id of one login body.

    The key is ``user.id`` as text, else the client MAC, else :data:`FALLBACK_KEY`. The event id
    is a hash of (user id, client MAC, venue id, authenticationTime): a redelivery of the same
    login has the same id, another login of the same person has another.
    """
    user = _section(body, "user")
    user_id = _id_text(user.get("id"))
    mac = normalise_mac(_section(body, "client").get("mac"))
    venue = _section(user, "venue") or _section(body, "venue")
    venue_id = _id_text(venue.get("id"))
    raw_time = _section(body, "session").get("authenticationTime")
    time_ms = parse_time_ms(raw_time)
    if time_ms is not None:
        time_text = str(time_ms)
    else:  # not a time: as the sender wrote it, if it wrote a string or a number
        kind = type(raw_time)
        time_text = str(raw_time) if raw_time and kind in (str, int, float) else ""

    key = user_id or mac or FALLBACK_KEY
    identity = _SEPARATOR.join(
        (_EVENT_ID_VERSION, user_id or "", mac or "", venue_id or "", time_text)
    )
    return LoginIdentity(key=key.encode(), event_id=sha256(identity.encode()).hexdigest()[:32])
