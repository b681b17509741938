from __future__ import annotations

import gzip
import zlib

import pytest

from bridge.body import decode
from bridge.errors import BadEncoding, BodyTooLarge, UnsupportedEncoding
from tests.fixtures.samples import DOCUMENTED_SAMPLE

LIMIT = 64 * 1024


def test_gzip_body_is_decompressed_to_the_exact_bytes() -> None:
    assert decode(gzip.compress(DOCUMENTED_SAMPLE), "gzip", max_bytes=LIMIT) == DOCUMENTED_SAMPLE


def test_deflate_zlib_and_raw_are_both_accepted() -> None:
    assert decode(zlib.compress(DOCUMENTED_SAMPLE), "deflate", max_bytes=LIMIT) == DOCUMENTED_SAMPLE
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = raw.compress(DOCUMENTED_SAMPLE) + raw.flush()
    assert decode(stream, "deflate", max_bytes=LIMIT) == DOCUMENTED_SAMPLE


def test_identity_and_concatenated_gzip_members() -> None:
    assert decode(DOCUMENTED_SAMPLE, "identity", max_bytes=LIMIT) == DOCUMENTED_SAMPLE
    two = gzip.compress(b'{"a":') + gzip.compress(b"1}")
    assert decode(two, "gzip", max_bytes=LIMIT) == b'{"a":1}'


def test_truncated_gzip_is_a_bad_encoding() -> None:
    stream = gzip.compress(DOCUMENTED_SAMPLE)
    with pytest.raises(BadEncoding, match="truncated"):
        decode(stream[: len(stream) // 2], "gzip", max_bytes=LIMIT)


def test_corrupt_gzip_is_a_bad_encoding() -> None:
    with pytest.raises(BadEncoding):
        decode(b"\x1f\x8b\x08\x00garbage-garbage", "gzip", max_bytes=LIMIT)


def test_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"0" * (50 * 1024 * 1024))
    assert len(bomb) < 100 * 1024
    with pytest.raises(BodyTooLarge):
        decode(bomb, "gzip", max_bytes=LIMIT)


def test_body_exactly_at_the_limit_is_accepted() -> None:
    data = b"x" * LIMIT
    assert decode(gzip.compress(data), "gzip", max_bytes=LIMIT) == data


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(UnsupportedEncoding):
        decode(b"...", "br", max_bytes=LIMIT)
