"""Dead letters of the CRM sink, cut to fit the largest message Kafka takes (pure).

A dead letter is the input record (key and value) with headers that say why it was refused.
The CRM's answer travels in a header and the value is whatever the input topic held, so a
letter can be larger than the producer's ``max_request_size`` (or the dead-letter topic's
``max.message.bytes``); refused, it would be retried for ever and stall the sink. So every
header is cut to a fixed size, the key too, and the value is kept whole only when it fits in
what is left; a value that does not fit is cut, and a ``dlq-value-truncated`` header (its
original length in bytes) says so.

Sizes are upper bounds of what the producer counts for a record sent alone (aiokafka refuses
a record whose estimate passes ``max_request_size``), so a letter fitted to ``max_bytes`` is
never refused by the producer itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from consumers.sinks.crm_port import MAX_DETAIL_BYTES, truncate_bytes, utf8_prefix

DETAIL_HEADER: Final = "dlq-detail"
VALUE_TRUNCATED_HEADER: Final = "dlq-value-truncated"
KEY_TRUNCATED_HEADER: Final = "dlq-key-truncated"

#: Longest value of any header but ``dlq-detail`` (topic names, event ids, codes), in bytes.
MAX_HEADER_BYTES: Final = 512
#: Longest key kept (a user id or a MAC address in practice), in bytes.
MAX_KEY_BYTES: Final = 1024
#: Most headers a letter may carry: the sink's own, the copied event id and the two markers.
MAX_HEADERS: Final = 10
#: The smallest ``max_bytes`` that always fits a letter of :data:`MAX_HEADERS` headers cut to
#: their limits, a cut key and an empty value; a setting below it is refused.
MIN_MESSAGE_BYTES: Final = 8192

# A record batch of one record: its header (61 bytes in format v2), then the record's length,
# attributes, timestamp and offset deltas; each length below is a varint of at most 5 bytes.
_BATCH_HEADER_BYTES: Final = 61
_VARINT_BYTES: Final = 5
_RECORD_FIXED_BYTES: Final = 1 + 3 * _VARINT_BYTES


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """What goes to the dead-letter topic: key, value and headers, as the producer takes them."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def size_bytes(self) -> int:
        return record_bytes(self.key, self.value, self.headers)

    @property
    def value_truncated(self) -> bool:
        return any(name == VALUE_TRUNCATED_HEADER for name, _ in self.headers)


def record_bytes(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> int:
    """An upper bound of the bytes a record sent alone takes (never below the producer's own)."""
    size = _BATCH_HEADER_BYTES + _RECORD_FIXED_BYTES
    size += _VARINT_BYTES + len(key or b"")
    size += _VARINT_BYTES + len(value or b"")
    size += _VARINT_BYTES
    for name, data in headers:
        size += 2 * _VARINT_BYTES + len(name.encode()) + len(data)
    return size


def fit_dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    max_bytes: int,
) -> DeadLetterRecord:
    """The letter for ``key``, ``value`` and ``headers``, at most ``max_bytes`` in size.

    ``dlq-detail`` is cut to :data:`MAX_DETAIL_BYTES`, any other header to
    :data:`MAX_HEADER_BYTES` (each with a marker saying so), a longer key to
    :data:`MAX_KEY_BYTES` (``dlq-key-truncated`` holds its length). The value is kept whole
    when the rest leaves room for it, else cut to that room (``dlq-value-truncated`` holds its
    length). When not even an empty value fits (``max_bytes`` under
    :data:`MIN_MESSAGE_BYTES`), the value is empty and ``size_bytes`` exceeds ``max_bytes``:
    the caller decides what then.
    """
    if len(headers) > MAX_HEADERS - 2:
        raise ValueError(f"a dead letter carries at most {MAX_HEADERS - 2} headers of its own")
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    kept = [
        (
            name,
            truncate_bytes(data, MAX_DETAIL_BYTES if name == DETAIL_HEADER else MAX_HEADER_BYTES),
        )
        for name, data in headers
    ]
    if key is not None and len(key) > MAX_KEY_BYTES:
        kept.append((KEY_TRUNCATED_HEADER, str(len(key)).encode()))
        key = key[:MAX_KEY_BYTES]
    if record_bytes(key, value, kept) <= max_bytes or not value:
        return DeadLetterRecord(key, value, tuple(kept))
    kept.append((VALUE_TRUNCATED_HEADER, str(len(value)).encode()))
    room = max(0, max_bytes - record_bytes(key, b"", kept))
    return DeadLetterRecord(key, utf8_prefix(value, room), tuple(kept))


def _header_limit_bytes(name: str) -> int:
    return MAX_DETAIL_BYTES if name == DETAIL_HEADER else MAX_HEADER_BYTES
