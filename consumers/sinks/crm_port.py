"""The port every CRM adapter implements, what it answers, and the errors it raises.

An adapter makes **one attempt** to upsert at most ``max_batch_size`` contacts and says what
became of each; retries, backoff and the dead-letter topic are the service shell's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bridge.errors import WifiBridgeError
from consumers.sinks.contacts import Contact
from consumers.sinks.crm_retry import RetryReason

#: The longest CRM answer kept with a rejected record (dead-letter header), in bytes.
MAX_DETAIL_BYTES = 2048
#: Ends a text that was cut to its limit, so a reader knows it is not whole.
TRUNCATED_MARKER = " [truncated]"


class CrmError(WifiBridgeError):
    """Root of the CRM adapters' errors."""

    code = "crm_error"


class CrmUnavailable(CrmError):
    """The CRM did not take the request now; the same request may be tried again later.

    ``retry_after_s`` is the server's own advice (``Retry-After``) when it gave one;
    ``status`` and ``detail`` are its answer when it gave one (a 5xx answer's text is kept
    with a contact the CRM keeps failing on alone).
    """

    code = "crm_unavailable"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        reason: RetryReason,
        retry_after_s: float | None = None,
        status: int | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status
        self.detail = detail


class CrmRateLimited(CrmUnavailable):
    """The request was not sent: the rate limit holds every request ``retry_after_s`` more.

    The caller waits (polling Kafka and heeding a stop, which a sleep inside the adapter could
    not) and sends it again; nothing was learnt about the CRM.
    """

    code = "crm_rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, reason=RetryReason.RATE_LIMITED, retry_after_s=retry_after_s)
        self.retry_after_s: float = retry_after_s


class CrmBatchRejected(CrmError):
    """The CRM refused the request as a whole (e.g. 400): retrying it unchanged cannot help.

    The shell splits the batch to find the records at fault; a single contact rejected this
    way goes to the dead-letter topic with ``status`` and ``detail`` (the CRM's answer).
    """

    code = "crm_rejected"

    def __init__(self, message: str, *, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Rejection:
    """A contact the CRM refused for good, with its answer (kept in the dead-letter topic)."""

    contact: Contact
    status: int
    detail: str


@dataclass(slots=True)
class UpsertResult:
    """What became of each contact of one request: every contact is in exactly one list."""

    accepted: list[Contact] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    retry: list[Contact] = field(default_factory=list)


class Crm(Protocol):
    """Where contacts go. ``name`` is a metric label (``hubspot``, ``webhook``, ``outbox``)."""

    @property
    def name(self) -> str: ...

    @property
    def max_batch_size(self) -> int: ...

    async def upsert(self, contacts: Sequence[Contact]) -> UpsertResult:
        """One attempt; raises :class:`CrmUnavailable` or :class:`CrmBatchRejected`."""
        ...

    async def close(self) -> None: ...


def truncate_detail(text: str) -> str:
    """The CRM's answer cut to :data:`MAX_DETAIL_BYTES`, with :data:`TRUNCATED_MARKER` if cut."""
    return truncate_bytes(text.encode(), MAX_DETAIL_BYTES).decode(errors="replace")


def truncate_bytes(data: bytes, max_bytes: int) -> bytes:
    """``data`` when it has at most ``max_bytes``; else its start followed by
    :data:`TRUNCATED_MARKER`, ``max_bytes`` in all (never ending inside a UTF-8 character)."""
    if len(data) <= max_bytes:
        return data
    marker = TRUNCATED_MARKER.encode()
    if max_bytes <= len(marker):
        return utf8_prefix(data, max_bytes)
    return utf8_prefix(data, max_bytes - len(marker)) + marker


def utf8_prefix(data: bytes, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of ``data``, not ending inside a UTF-8 character.

    Text stays readable; bytes that are not text lose at most three more from the end.
    """
    if len(data) <= max_bytes:
        return data
    end = max(0, max_bytes)
    for _ in range(3):
        if end == 0 or (data[end] & 0xC0) != 0x80:
            break
        end -= 1
    return data[:end]
