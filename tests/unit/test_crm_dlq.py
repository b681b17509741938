"""Dead letters of the CRM sink always fit the largest message the producer may send."""

from __future__ import annotations

import random

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumers.sinks.crm_dlq import (
    KEY_TRUNCATED_HEADER,
    MAX_HEADER_BYTES,
    MAX_KEY_BYTES,
    MIN_MESSAGE_BYTES,
    VALUE_TRUNCATED_HEADER,
    DeadLetterRecord,
    fit_dead_letter,
    record_bytes,
)
from consumers.sinks.crm_port import MAX_DETAIL_BYTES, TRUNCATED_MARKER


def headers(detail: bytes = b"Email address is invalid") -> list[tuple[str, bytes]]:
    return [
        ("dlq-reason", b"crm_rejected"),
        ("dlq-detail", detail),
        ("dlq-source", b"wifi.auth.visits/3/1234"),
        ("crm", b"hubspot"),
        ("crm-status", b"400"),
        ("event-id", b"0123456789abcdef0123456789abcdef"),
    ]


def producer_estimate(record: DeadLetterRecord) -> int:
    """What aiokafka's producer compares with its max_request_size."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        record.key, record.value, list(record.headers)
    )
    return size


def test_a_letter_that_fits_keeps_its_value_and_headers_whole() -> None:
    value = b'{"user": {"email": "a@example.com"}}'
    letter = fit_dead_letter(key=b"888", value=value, headers=headers(), max_bytes=1_048_576)
    assert letter.value == value
    assert letter.key == b"888"
    assert list(letter.headers) == headers()
    assert not letter.value_truncated


def test_a_value_too_large_is_cut_to_fit_and_a_header_gives_its_length() -> None:
    value = b"x" * 2_000_000
    letter = fit_dead_letter(key=b"888", value=value, headers=headers(), max_bytes=1_048_576)
    assert letter.size_bytes <= 1_048_576
    assert producer_estimate(letter) <= 1_048_576
    assert letter.value_truncated
    assert dict(letter.headers)[VALUE_TRUNCATED_HEADER] == b"2000000"
    assert letter.value is not None
    assert value.startswith(letter.value)
    # cut no further than needed: the headers and the key take the rest
    assert letter.size_bytes > 1_048_576 - 100


def test_a_value_is_cut_on_a_character_boundary() -> None:
    value = "é".encode() * 10_000
    letter = fit_dead_letter(key=None, value=value, headers=headers(), max_bytes=MIN_MESSAGE_BYTES)
    assert letter.value is not None
    assert set(letter.value.decode()) == {"é"}


def test_the_crm_answer_and_every_other_header_are_cut_to_their_limit_with_a_marker() -> None:
    long_headers = [*headers(detail=b"d" * 100_000), ("event-id", b"e" * 10_000)]
    letter = fit_dead_letter(key=b"k", value=b"{}", headers=long_headers, max_bytes=1_048_576)
    got = dict(letter.headers)
    assert len(got["dlq-detail"]) == MAX_DETAIL_BYTES
    assert got["dlq-detail"].endswith(TRUNCATED_MARKER.encode())
    assert [len(v) for k, v in letter.headers if k == "event-id"] == [32, MAX_HEADER_BYTES]
    assert letter.value == b"{}"


def test_a_key_too_long_is_cut_and_marked() -> None:
    letter = fit_dead_letter(key=b"k" * 5000, value=b"{}", headers=headers(), max_bytes=1_048_576)
    assert letter.key == b"k" * MAX_KEY_BYTES
    assert dict(letter.headers)[KEY_TRUNCATED_HEADER] == b"5000"


def test_any_letter_fits_the_smallest_allowed_message() -> None:
    draw = random.Random(7)
    for _ in range(300):
        count = draw.randrange(0, 9)
        some_headers = [
            (f"h{n}-" + "n" * draw.randrange(0, 14), b"v" * draw.randrange(0, 20_000))
            for n in range(count - 1)
        ]
        some_headers.append(("dlq-detail", b"d" * draw.randrange(0, 50_000)))
        max_bytes = draw.choice([MIN_MESSAGE_BYTES, 10_000, 65_536, 1_048_576])
        letter = fit_dead_letter(
            key=b"k" * draw.randrange(0, 3000) if draw.random() < 0.9 else None,
            value=b"v" * draw.randrange(0, 2_000_000) if draw.random() < 0.9 else None,
            headers=some_headers,
            max_bytes=max_bytes,
        )
        assert letter.size_bytes <= max_bytes
        assert producer_estimate(letter) <= letter.size_bytes


def test_below_the_smallest_message_the_value_is_emptied_and_the_caller_sees_the_size() -> None:
    letter = fit_dead_letter(key=b"888", value=b"v" * 1000, headers=headers(), max_bytes=100)
    assert letter.value == b""
    assert letter.size_bytes > 100
    assert letter.size_bytes == record_bytes(letter.key, letter.value, letter.headers)


def test_too_many_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="headers"):
        fit_dead_letter(key=None, value=b"", headers=[("h", b"")] * 20, max_bytes=MIN_MESSAGE_BYTES)
