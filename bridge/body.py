"""Bounded reading and decompression of request bodies.

The wire body is read in chunks and refused as soon as it passes the limit, so a large body is
never held whole. Decompression is bounded by the same limit on its output, which turns a gzip
bomb into a 413 after at most ``max_bytes + 1`` bytes of output.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import HttpVersion11, hdrs, web

from bridge.errors import (
    BadEncoding,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    UnsupportedEncoding,
)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_GZIP_WBITS = 16 + zlib.MAX_WBITS


async def read_bounded(request: web.BaseRequest, *, max_bytes: int, timeout_s: float) -> bytes:
    """The raw request body; :class:`BodyTooLarge` once it passes ``max_bytes``,
    :class:`BodyTimeout` when it is not complete within ``timeout_s``, and
    :class:`ClientDisconnected` when the client goes away before it is complete.

    The request's ``client_max_size`` must be ``max_bytes`` (see
    :func:`bridge.web_app.create_server`): aiohttp then counts the bytes as they arrive
    (chunked bodies included) and stops reading past the limit. A client that sent
    ``Expect: 100-continue`` is told to go on here, once the checks before the body passed
    (aiohttp does that only in an Application's router, which the receiver does not use).
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    try:
        if request.content.is_eof():  # the usual case: the body came with the head
            return await request.read()
        if request.version == HttpVersion11:
            expect = request.headers.get(hdrs.EXPECT)
            if expect is not None and expect.lower() == "100-continue":
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0  # the answer proper is still to come
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds the limit of {max_bytes} bytes") from None
    except ConnectionResetError:  # aiohttp's word for a connection lost mid-body
        raise ClientDisconnected("the connection closed before the body was complete") from None


def decode(raw: bytes, content_encoding: str, *, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity, or a list of them)."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in {"gzip", "x-gzip"}:
            data = _inflate(data, _GZIP_WBITS, coding, max_bytes)
        elif coding == "deflate":
            # HTTP's deflate is zlib-wrapped, but some clients send a raw deflate stream.
            try:
                data = _inflate(data, zlib.MAX_WBITS, coding, max_bytes)
            except BadEncoding:
                data = _inflate(data, -zlib.MAX_WBITS, coding, max_bytes)
        else:
            raise UnsupportedEncoding(
                f"Content-Encoding {coding!r} is not supported (use gzip, deflate or identity)"
            )
    return data


def _inflate(data: bytes, wbits: int, coding: str, max_bytes: int) -> bytes:
    out = bytearray()
    remaining = data
    # A gzip body may hold several members back to back; each is inflated in turn.
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(remaining, max_bytes + 1 - len(out))
        except zlib.error as exc:
            raise BadEncoding(f"{coding} stream is corrupt: {exc}") from None
        if len(out) > max_bytes:
            raise BodyTooLarge(f"decompressed body exceeds the limit of {max_bytes} bytes")
        if not inflater.eof:
            raise BadEncoding(f"{coding} stream is truncated")
        remaining = inflater.unused_data
        if not remaining or wbits != _GZIP_WBITS:
            if remaining:
                raise BadEncoding(f"{coding} stream has trailing data")
            return bytes(out)
