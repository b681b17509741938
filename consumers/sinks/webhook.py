"""Generic CRM adapter: contacts POSTed as JSON to a URL, signed with HMAC-SHA256.

Headers of every request:

- ``X-Wifi-Crm-Timestamp``: Unix time in seconds when the request was signed;
- ``X-Wifi-Crm-Signature``: ``v1=`` and the lower-case hex HMAC-SHA256, keyed with the shared
  secret, of ``<timestamp>.`` followed by the exact body bytes.

A receiver recomputes the signature over the raw body (:func:`verify` does it), compares in
constant time and refuses a timestamp older than a few minutes, so a captured request cannot be
replayed later. Body: ``{"contacts": [{"email": ..., ...}]}``. Any 2xx accepts the whole
request; 429, 5xx, 3xx, 401, 403, 404, 405 and 410 are retried; any other status rejects it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

from consumers.sinks.contacts import Contact
from consumers.sinks.crm_http import HttpClient
from consumers.sinks.crm_port import UpsertResult

TIMESTAMP_HEADER: Final = "X-Wifi-Crm-Timestamp"
SIGNATURE_HEADER: Final = "X-Wifi-Crm-Signature"
DEFAULT_TOLERANCE_S: Final = 300
_SCHEME: Final = "v1="


def sign(secret: bytes, timestamp_s: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp_s``."""
    mac = hmac.new(secret, str(timestamp_s).encode() + b"." + body, hashlib.sha256)
    return _SCHEME + mac.hexdigest()


def verify(
    secret: bytes,
    *,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now_s: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """Whether a request is authentic and fresh (for receivers, and the tests)."""
    if timestamp is None or signature is None or not timestamp.isdigit():
        return False
    if abs(now_s - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature.strip())


def contact_json(contact: Contact) -> dict[str, Any]:
    return {
        "email": contact.email,
        "firstName": contact.first_name,
        "lastName": contact.last_name,
        "provider": contact.provider,
        "lastVenueId": contact.last_venue_id,
        "lastVenueName": contact.last_venue_name,
        "lastVisitAt": contact.last_visit_iso,
        "visitCount": contact.visit_count,
        "eventId": contact.event_id,
    }


class WebhookCrm:
    """Signed JSON webhook behind the :class:`~consumers.sinks.crm_port.Crm` port."""

    name = "webhook"

    def __init__(
        self,
        *,
        url: str,
        secret: str,
        http: HttpClient,
        max_batch_size: int = 100,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must be an http(s) URL")
        if len(secret) < 16:
            raise ValueError("the webhook secret must have at least 16 characters")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._url = url
        self._secret = secret.encode()
        self._http = http
        self._wall_clock = wall_clock
        self.max_batch_size = max_batch_size

    def request(self, contacts: Sequence[Contact]) -> tuple[bytes, Mapping[str, str]]:
        """Body and headers of one request (signed now)."""
        body = orjson.dumps({"contacts": [contact_json(c) for c in contacts]})
        timestamp_s = int(self._wall_clock())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp_s),
            SIGNATURE_HEADER: sign(self._secret, timestamp_s, body),
        }
        return body, headers

    async def upsert(self, contacts: Sequence[Contact]) -> UpsertResult:
        if len(contacts) > self.max_batch_size:
            raise ValueError(f"at most {self.max_batch_size} contacts per request")
        if not contacts:
            return UpsertResult()
        body, headers = self.request(contacts)
        await self._http.post(self._url, body, headers)
        return UpsertResult(accepted=list(contacts))

    async def close(self) -> None:
        await self._http.close()
