"""Clients that stall, trickle, wait for 100 Continue or speak broken HTTP, and a SIGTERM that
meets a body still arriving: the receiver answers or closes in bounded time, never hangs."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import orjson
import pytest

from bridge.event import identify
from tests.fixtures.bridge import RunningBridge, StartBridge
from tests.fixtures.kafka import consume
from tests.fixtures.samples import login_body

pytestmark = pytest.mark.kafka

Spawn = Callable[..., Awaitable[RunningBridge]]


async def connect(bridge: RunningBridge) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(bridge.webhook_url)
    return await asyncio.open_connection(parts.hostname, parts.port)


def head(bridge: RunningBridge, length: int, *extra: bytes) -> bytes:
    path = urlsplit(bridge.webhook_url).path.encode()
    lines = [b"POST %s HTTP/1.1" % path, b"Host: x", b"Content-Length: %d" % length, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    top, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, orjson.loads(payload)


async def test_a_body_that_stops_arriving_gets_408_with_the_listener_header(
    start_bridge: StartBridge,
) -> None:
    bridge = await start_bridge(BRIDGE_READ_TIMEOUT_MS="500")
    reader, writer = await connect(bridge)
    body = login_body()
    started = time.monotonic()
    writer.write(head(bridge, len(body)) + body[:20])
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)  # the JSON answer's end
    answered_s = time.monotonic() - started
    status, headers, payload = parse(answer)
    assert (status, payload["error"]) == (408, "body_timeout")
    assert (headers["wifiwebhooklistener"], headers["connection"]) == ("1", "close")
    assert 0.4 < answered_s < 5
    # The connection goes too (once aiohttp's lingering read of what is left has ended).
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()


@pytest.mark.parametrize("sent", [b"", b"POST /webhooks/bt-wifi HTTP/1.1\r\nHost: x\r\n"])
async def test_a_connection_without_a_whole_request_head_is_closed_after_the_read_timeout(
    start_bridge: StartBridge, sent: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(BRIDGE_READ_TIMEOUT_MS="500")
    reader, writer = await connect(bridge)
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        writer.write(sent)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing to answer
        writer.close()
        assert 0.4 < time.monotonic() - started < 5
        await asyncio.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # A connection that sent its request in time is not cut by the deadline.
    reader, writer = await connect(bridge)
    body = login_body()
    writer.write(head(bridge, len(body)) + body)
    status, _, _ = parse(await reader.readuntil(b"}"))
    assert status == 200
    await asyncio.sleep(0.8)
    writer.write(head(bridge, len(body), b"Connection: close") + body)
    status, _, _ = parse(await asyncio.wait_for(reader.read(), 10))
    assert status == 200
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    bridge = await start_bridge()
    reader, writer = await connect(bridge)
    body = login_body()
    writer.write(head(bridge, len(body), b"Expect: 100-continue", b"Connection: close"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    status, headers, payload = parse(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert status == 200
    assert headers["wifiwebhooklistener"] == "1"
    (record,) = await consume(kafka_bootstrap, bridge.topic_raw, count=1)
    assert record.value == body
    assert payload["eventId"] == identify(orjson.loads(body)).event_id


async def test_a_body_still_arriving_at_sigterm_is_finished_and_acknowledged(
    spawn_bridge: Spawn, kafka_bootstrap: str
) -> None:
    bridge = await spawn_bridge()
    assert bridge.process is not None
    reader, writer = await connect(bridge)
    body = login_body()
    writer.write(head(bridge, len(body)) + body[:100])
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is reading the body
    bridge.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    writer.write(body[100:])
    status, headers, _ = parse(await asyncio.wait_for(reader.read(), 20))
    writer.close()
    assert status == 200
    assert headers["connection"] == "close"
    assert await asyncio.to_thread(bridge.process.wait, 30) == 0
    (record,) = await consume(kafka_bootstrap, bridge.topic_raw, count=1)
    assert record.value == body


async def test_ids_nested_too_deep_to_print_are_no_ids_and_the_body_is_kept_not_a_500(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    # A JSON object, so the receiver keeps it (the pipeline dead-letters it for its user.id);
    # turning the nested arrays into text for the event id ran out of stack.
    bridge = await start_bridge()
    body = b'{"user":{"id":' + b"[" * 1000 + b"]" * 1000 + b'},"session":{}}'
    reader, writer = await connect(bridge)
    writer.write(head(bridge, len(body), b"Connection: close") + body)
    status, headers, payload = parse(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert (status, headers["wifiwebhooklistener"]) == (200, "1")
    assert payload["eventId"] == identify({"session": {}}).event_id  # no id, no MAC, no time
    (record,) = await consume(kafka_bootstrap, bridge.topic_raw, count=1)
    assert record.value == body


async def test_requests_aiohttp_cannot_parse_get_json_errors_with_the_listener_header(
    start_bridge: StartBridge,
) -> None:
    token = "t0ken-for-tests-0123456789"
    bridge = await start_bridge(BRIDGE_TOKEN=token)
    path = urlsplit(bridge.webhook_url).path.encode()
    for broken in (
        b"POST %s HTTP/1.1x\r\n\r\n" % path,  # bad status line
        b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" % path,
    ):
        reader, writer = await connect(bridge)
        writer.write(broken)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status, headers, payload = parse(answer)
        assert (status, headers["wifiwebhooklistener"]) == (400, "1")
        assert payload["error"] == "bad_request"
        assert token.encode() not in answer  # aiohttp's own answer quotes the request line
