"""HubSpot adapter: contacts batch upsert keyed by e-mail address.

``POST {base_url}/crm/v3/objects/contacts/batch/upsert`` with a private-app bearer token; at
most 100 inputs per request. Each input carries ``objectWriteTraceId`` (its index in the
request) so a 207 multi-status answer says which inputs failed. Custom properties
(``wifi_*``) must exist in the HubSpot portal; see the README.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from consumers.sinks.contacts import Contact
from consumers.sinks.crm_http import HttpClient
from consumers.sinks.crm_port import CrmUnavailable, Rejection, UpsertResult, truncate_detail
from consumers.sinks.crm_retry import RetryReason

log = logging.getLogger(__name__)

UPSERT_PATH: Final = "/crm/v3/objects/contacts/batch/upsert"
MAX_BATCH_SIZE: Final = 100

# Error categories of a multi-status answer that may succeed when sent again.
_RETRYABLE_CATEGORIES: Final = frozenset({"RATE_LIMITS", "INTERNAL_ERROR", "TIMEOUT"})
_RETRYABLE_STATUSES: Final = frozenset({"429", "500", "502", "503", "504"})


def contact_properties(contact: Contact) -> dict[str, str]:
    """HubSpot property values (text, as HubSpot takes them); unknown values are left out
    so an upsert never blanks what the CRM already holds."""
    values: dict[str, str | int | None] = {
        "email": contact.email,
        "firstname": contact.first_name,
        "lastname": contact.last_name,
        "wifi_login_provider": contact.provider,
        "wifi_last_venue_id": contact.last_venue_id,
        "wifi_last_venue_name": contact.last_venue_name,
        "wifi_last_visit_at": contact.last_visit_ms,
        "wifi_visit_count": contact.visit_count,
    }
    return {name: str(value) for name, value in values.items() if value is not None}


def upsert_body(contacts: Sequence[Contact]) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {
                    "idProperty": "email",
                    "id": contact.email,
                    "objectWriteTraceId": str(index),
                    "properties": contact_properties(contact),
                }
                for index, contact in enumerate(contacts)
            ]
        }
    )


def read_answer(status: int, text: str, contacts: Sequence[Contact]) -> UpsertResult:
    """Sort the contacts of a 2xx answer into accepted, rejected and retry (pure).

    200/201: all accepted. 207: an error names its inputs by ``context.objectWriteTraceId``
    (or, failing that, ``context.ids`` / ``context.id`` holding e-mail addresses); inputs in
    ``results`` are accepted; an input the answer does not mention is retried.

    Any other 2xx answer, or a 200/201 whose body is not a JSON object, is not HubSpot's
    (a proxy's or a web server's page at a wrong ``CRM_HUBSPOT_BASE_URL``): it raises
    :class:`CrmUnavailable` (``unexpected_answer``), retried like an outage, since taking it
    as accepted would mark contacts as synced that no CRM stored.
    """
    if status != 207:
        if status not in (200, 201) or not _is_json_object(text):
            raise CrmUnavailable(
                f"hubspot answered {status} with a body that is not HubSpot's",
                reason=RetryReason.UNEXPECTED_ANSWER,
                status=status,
                detail=truncate_detail(text),
            )
        return UpsertResult(accepted=list(contacts))
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    by_trace = {str(i): i for i in range(len(contacts))}
    by_email = {contact.email: i for i, contact in enumerate(contacts)}
    fate: dict[int, tuple[str, str] | None] = {}  # index -> None (accepted) or (kind, detail)

    for error in _objects(answer.get("errors")):
        context = error.get("context")
        context = context if isinstance(context, Mapping) else {}
        indexes = [by_trace[t] for t in _texts(context.get("objectWriteTraceId")) if t in by_trace]
        if not indexes:
            emails = _texts(context.get("ids")) + _texts(context.get("id"))
            indexes = [by_email[e.lower()] for e in emails if e.lower() in by_email]
        retryable = (
            str(error.get("category")) in _RETRYABLE_CATEGORIES
            or str(error.get("status")) in _RETRYABLE_STATUSES
        )
        detail = truncate_detail(orjson.dumps(error).decode())
        for index in indexes:
            fate[index] = ("retry" if retryable else "reject", detail)

    for result in _objects(answer.get("results")):
        trace = result.get("objectWriteTraceId")
        found = by_trace.get(str(trace)) if trace is not None else None
        if found is None:
            email = _email_of(result)
            found = by_email.get(email) if email else None
        if found is not None and found not in fate:
            fate[found] = None

    outcome = UpsertResult()
    for index, contact in enumerate(contacts):
        if index not in fate:
            outcome.retry.append(contact)
            continue
        verdict = fate[index]
        if verdict is None:
            outcome.accepted.append(contact)
        elif verdict[0] == "retry":
            outcome.retry.append(contact)
        else:
            outcome.rejected.append(Rejection(contact, 207, verdict[1]))
    return outcome


class HubSpotCrm:
    """The HubSpot contacts API behind the :class:`~consumers.sinks.crm_port.Crm` port."""

    name = "hubspot"

    def __init__(
        self, *, base_url: str, token: str, http: HttpClient, max_batch_size: int = MAX_BATCH_SIZE
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        if not token:
            raise ValueError("a HubSpot token is required")
        if not 1 <= max_batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"max_batch_size must be within 1..{MAX_BATCH_SIZE}")
        self._url = base_url.rstrip("/") + UPSERT_PATH
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
        }
        self._http = http
        self.max_batch_size = max_batch_size

    async def upsert(self, contacts: Sequence[Contact]) -> UpsertResult:
        if len(contacts) > self.max_batch_size:
            raise ValueError(f"at most {self.max_batch_size} contacts per request")
        if not contacts:
            return UpsertResult()
        answer = await self._http.post(self._url, upsert_body(contacts), self._headers)
        try:
            return read_answer(answer.status, answer.text, contacts)
        except CrmUnavailable:
            log.error(
                "the CRM's answer is not HubSpot's: check CRM_HUBSPOT_BASE_URL",
                extra={"crm": self.name, "status": answer.status},
            )
            raise

    async def close(self) -> None:
        await self._http.close()


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def _objects(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(item) for item in value if isinstance(item, str | int)]
    return []


def _email_of(result: Mapping[str, Any]) -> str | None:
    properties = result.get("properties")
    if isinstance(properties, Mapping) and isinstance(properties.get("email"), str):
        return str(properties["email"]).lower()
    return None
