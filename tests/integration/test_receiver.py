"""The receiver against a real broker: what the sender sees, and what lands in Kafka."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from bridge.event import identify
from bridge.settings import MAX_BODY_BYTES_LIMIT
from bridge.spool import read_stats
from tests.fixtures.bridge import RunningBridge, StartBridge, metric, wait_for_metric
from tests.fixtures.kafka import consume, read_to_end
from tests.fixtures.samples import DOCUMENTED_SAMPLE, TABLE_VARIANT, login_body

pytestmark = pytest.mark.kafka

TOKEN = "t0ken-for-tests-0123456789"


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def post(
    url: str, body: bytes, *, gzip_it: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, object]]:
    sent = dict(headers or {})
    sent.setdefault("Content-Type", "application/json")
    if gzip_it:
        body = gzip.compress(body)
        sent["Content-Encoding"] = "gzip"
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(url, data=body, headers=sent) as response,
    ):
        payload = await response.read()
        return response.status, dict(response.headers), orjson.loads(payload) if payload else {}


async def test_both_sample_layouts_plain_and_gzipped_land_keyed_888_with_exact_bytes(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    bridge = await start_bridge()
    sent: list[bytes] = []
    for body in (DOCUMENTED_SAMPLE, TABLE_VARIANT):
        for gzip_it in (False, True):
            status, headers, payload = await post(bridge.webhook_url, body, gzip_it=gzip_it)
            assert status == 200, payload
            assert headers["wifiWebhookListener"] == "1"
            sent.append(body)
    records = await consume(kafka_bootstrap, bridge.topic_raw, count=4, settle_s=1.0)
    assert len(records) == 4
    assert sorted(r.value for r in records) == sorted(sent)
    assert {r.key for r in records} == {b"888"}
    assert len({r.partition for r in records}) == 1
    event_ids = {headers_of(r)["event-id"] for r in records}
    assert event_ids == {identify(orjson.loads(DOCUMENTED_SAMPLE)).event_id.encode()}
    for record in records:
        assert headers_of(record)["content-type"] == b"application/json"
        assert int(headers_of(record)["received-at"]) > 1_700_000_000_000


async def send_raw(url: str, data: bytes) -> bytes:
    """``data`` to the server of ``url`` as it is; the whole answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def raw_post(url: str, head: bytes, body: bytes) -> tuple[int, dict[str, object]]:
    """POST with header bytes exactly as given (a client would refuse to send some of them)."""
    parts = urlsplit(url)
    response = await send_raw(
        url,
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
        % (parts.path.encode(), parts.netloc.encode(), len(body))
        + head
        + b"\r\n"
        + body,
    )
    status_line, _, rest = response.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), orjson.loads(payload)


async def test_a_content_type_that_is_not_utf8_is_kept_byte_for_byte(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    bridge = await start_bridge()
    content_type = b"application/json; charset=iso-8859-1; name=caf\xe9"  # latin-1, not UTF-8
    head = b"Content-Type: " + content_type + b"\r\n"
    status, payload = await raw_post(bridge.webhook_url, head, DOCUMENTED_SAMPLE)
    assert (status, payload["status"]) == (200, "accepted")
    status, payload = await raw_post(bridge.webhook_url, head, b"{not json")
    assert (status, payload["error"]) == (400, "invalid_json")
    (record,) = await consume(kafka_bootstrap, bridge.topic_raw, count=1)
    assert headers_of(record)["content-type"] == content_type
    (dead,) = await consume(kafka_bootstrap, bridge.topic_dlq, count=1)
    assert headers_of(dead)["content-type"] == content_type


async def test_get_and_head_answer_200_with_the_listener_header(start_bridge: StartBridge) -> None:
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        for method in ("GET", "HEAD"):
            async with session.request(method, bridge.webhook_url) as response:
                assert response.status == 200
                assert response.headers["wifiWebhookListener"] == "1"


async def test_every_error_on_the_webhook_url_carries_the_listener_header(
    start_bridge: StartBridge,
) -> None:
    bridge = await start_bridge()
    async with (
        aiohttp.ClientSession() as session,
        session.put(bridge.webhook_url, data=b"{}") as response,
    ):
        assert response.status == 405
        assert response.headers["wifiWebhookListener"] == "1"
        assert response.headers["Allow"] == "GET, HEAD, POST"
    status, headers, payload = await post(bridge.webhook_url, b"not json")
    assert (status, payload["error"]) == (400, "invalid_json")
    assert headers["wifiWebhookListener"] == "1"


async def test_path_token_accepts_the_right_token_and_hides_everything_else(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    bridge = await start_bridge(BRIDGE_TOKEN=TOKEN)
    assert bridge.webhook_url.endswith("/" + TOKEN)
    base = bridge.base_url + bridge.settings.webhook_path
    status, _, _ = await post(bridge.webhook_url, DOCUMENTED_SAMPLE)
    assert status == 200
    for wrong in (base, base + "/wrong-token-0123456789", base + "/" + TOKEN[:-1]):
        status, headers, payload = await post(wrong, DOCUMENTED_SAMPLE)
        assert status == 404
        assert payload["error"] == "not_found"
        assert "wifiWebhookListener" not in headers
    records = await consume(kafka_bootstrap, bridge.topic_raw, count=1, settle_s=1.0)
    assert len(records) == 1


async def test_basic_auth_accepts_the_right_pair_and_refuses_others(
    start_bridge: StartBridge,
) -> None:
    bridge = await start_bridge(
        BRIDGE_BASIC_AUTH_USERNAME="venue", BRIDGE_BASIC_AUTH_PASSWORD="correct horse"
    )

    def auth(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    status, _, _ = await post(
        bridge.webhook_url, DOCUMENTED_SAMPLE, headers=auth("venue", "correct horse")
    )
    assert status == 200
    for headers in ({}, auth("venue", "wrong"), auth("other", "correct horse")):
        status, answer_headers, payload = await post(
            bridge.webhook_url, DOCUMENTED_SAMPLE, headers=headers
        )
        assert status == 401
        assert payload["error"] == "unauthorized"
        assert answer_headers["WWW-Authenticate"].startswith("Basic")
        assert answer_headers["wifiWebhookListener"] == "1"
    # Bytes that are not ASCII, as a client with latin-1 credentials sends them.
    head = b"Authorization: Basic caf\xe9\r\n"
    status, payload = await raw_post(bridge.webhook_url, head, DOCUMENTED_SAMPLE)
    assert (status, payload["error"]) == (401, "unauthorized")


async def test_allowlist_accepts_listed_sources_and_forbids_others(
    start_bridge: StartBridge,
) -> None:
    allowed = await start_bridge(BRIDGE_ALLOWED_CIDRS="127.0.0.0/8")
    assert (await post(allowed.webhook_url, DOCUMENTED_SAMPLE))[0] == 200

    refused = await start_bridge(BRIDGE_ALLOWED_CIDRS="203.0.113.0/24")
    status, headers, payload = await post(
        refused.webhook_url, DOCUMENTED_SAMPLE, headers={"X-Forwarded-For": "203.0.113.7"}
    )
    assert (status, payload["error"]) == (403, "forbidden")  # the header is not trusted
    assert headers["wifiWebhookListener"] == "1"

    proxied = await start_bridge(
        BRIDGE_ALLOWED_CIDRS="203.0.113.0/24", BRIDGE_TRUSTED_PROXIES="127.0.0.1/32"
    )
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert (await post(proxied.webhook_url, DOCUMENTED_SAMPLE, headers=forwarded))[0] == 200
    spoofed = {"X-Forwarded-For": "203.0.113.7, 198.51.100.1"}
    assert (await post(proxied.webhook_url, DOCUMENTED_SAMPLE, headers=spoofed))[0] == 403
    with_port = {"X-Forwarded-For": "203.0.113.7:4711"}
    assert (await post(proxied.webhook_url, DOCUMENTED_SAMPLE, headers=with_port))[0] == 200
    garbled = {"X-Forwarded-For": "203.0.113.7, unknown"}
    status, _, payload = await post(proxied.webhook_url, DOCUMENTED_SAMPLE, headers=garbled)
    assert (status, payload["error"]) == (403, "bad_forwarded_for")
    outcome = 'wifi_bridge_requests_total{method="POST",outcome="bad_forwarded_for"}'
    assert await metric(proxied, outcome) == 1
    # A proxy may add a line of its own rather than extend the client's: both count, in order.
    two_lines = b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"
    answer = await raw_post(proxied.webhook_url, two_lines, DOCUMENTED_SAMPLE)
    assert answer[0] == 403, answer


async def _still_serves(bridge: RunningBridge) -> None:
    status, _, payload = await post(bridge.webhook_url, login_body())
    assert status == 200, payload


async def test_oversized_bodies_get_413_and_the_service_keeps_serving(
    start_bridge: StartBridge,
) -> None:
    bridge = await start_bridge(BRIDGE_MAX_BODY_BYTES="4096")
    big = b'{"pad":"' + b"x" * 8192 + b'"}'
    status, headers, payload = await post(bridge.webhook_url, big)
    assert (status, payload["error"]) == (413, "body_too_large")
    assert headers["wifiWebhookListener"] == "1"

    async def chunks() -> object:
        for _ in range(8):
            yield b"x" * 1024

    async with (
        aiohttp.ClientSession() as session,
        session.post(bridge.webhook_url, data=chunks()) as response,
    ):
        assert response.status == 413  # no Content-Length: counted while reading
    await _still_serves(bridge)


def body_of_size(size: int, **fields: Any) -> bytes:
    """A login whose JSON is exactly ``size`` bytes (padded with a field of its own)."""
    body = orjson.loads(login_body())
    body.update(fields)
    body["pad"] = ""
    body["pad"] = "x" * (size - len(orjson.dumps(body)))
    data = orjson.dumps(body)
    assert len(data) == size
    return data


@pytest.mark.parametrize("producer", ["librdkafka", "aiokafka"])
async def test_the_largest_body_the_settings_allow_lands_in_kafka(
    start_bridge: StartBridge, kafka_bootstrap: str, producer: str
) -> None:
    limit = str(MAX_BODY_BYTES_LIMIT)
    bridge = await start_bridge(BRIDGE_MAX_BODY_BYTES=limit, BRIDGE_PRODUCER=producer)
    body = body_of_size(MAX_BODY_BYTES_LIMIT)
    status, _, payload = await post(bridge.webhook_url, body)
    assert (status, payload["status"]) == (200, "accepted")
    records = await consume(kafka_bootstrap, bridge.topic_raw, count=1)
    assert [r.value for r in records] == [body]
    assert bridge.spool_dir is not None
    assert read_stats(bridge.spool_dir).records == 0  # Kafka took it, not the spool


async def test_gzip_bomb_gets_413_without_inflating_it(start_bridge: StartBridge) -> None:
    bridge = await start_bridge()
    bomb = b'{"pad":"' + b"0" * (64 * 1024 * 1024) + b'"}'
    status, _, payload = await post(bridge.webhook_url, bomb, gzip_it=True)
    assert (status, payload["error"]) == (413, "body_too_large")
    await _still_serves(bridge)


@pytest.mark.parametrize(
    ("encoding", "status", "code"),
    [("gzip", 400, "bad_encoding"), ("br", 415, "unsupported_encoding")],
    ids=["truncated-gzip", "unknown-encoding"],
)
async def test_a_body_it_cannot_decode_gets_an_error_and_is_kept_in_the_dead_letter_topic(
    start_bridge: StartBridge, kafka_bootstrap: str, encoding: str, status: int, code: str
) -> None:
    bridge = await start_bridge()
    stream = gzip.compress(DOCUMENTED_SAMPLE)
    cut = stream[: len(stream) // 2]
    answer, _, payload = await post(bridge.webhook_url, cut, headers={"Content-Encoding": encoding})
    assert (answer, payload["error"]) == (status, code)
    records = await consume(kafka_bootstrap, bridge.topic_dlq, count=1)
    assert len(records) == 1
    assert records[0].value == cut  # as it came, still encoded
    assert headers_of(records[0])["dlq-reason"] == code.encode()
    assert headers_of(records[0])["content-encoding"] == encoding.encode()
    await _still_serves(bridge)


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"{not json", "invalid_json"), (b"[1, 2, 3]", "not_an_object"), (b"", "invalid_json")],
)
async def test_body_that_is_not_a_json_object_gets_400_and_a_dead_letter(
    start_bridge: StartBridge, kafka_bootstrap: str, body: bytes, code: str
) -> None:
    bridge = await start_bridge()
    status, _, payload = await post(bridge.webhook_url, body, gzip_it=True)
    assert (status, payload["error"]) == (400, code)
    assert isinstance(payload["message"], str)
    assert payload["message"]
    records = await consume(kafka_bootstrap, bridge.topic_dlq, count=1)
    assert [r.value for r in records] == [body]  # kept decompressed, as it was meant
    assert headers_of(records[0])["dlq-reason"] == code.encode()
    assert await consume(kafka_bootstrap, bridge.topic_raw, count=0, timeout_s=1) == []
    await _still_serves(bridge)


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 1000\r\n", b"Transfer-Encoding: chunked\r\n"],
    ids=["sized", "chunked"],
)
async def test_a_client_gone_mid_body_is_its_own_outcome_and_no_error(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture, framing: bytes
) -> None:
    bridge = await start_bridge()
    parts = urlsplit(bridge.webhook_url)
    with caplog.at_level("INFO"):
        _, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (parts.path.encode(), framing))
        writer.write(b'5\r\n{"use' if b"chunked" in framing else b'{"user":')
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is reading the body
        writer.close()
        await writer.wait_closed()
        outcome = 'wifi_bridge_requests_total{method="POST",outcome="client_disconnected"}'
        deadline = asyncio.get_running_loop().time() + 10
        while (await _text_metrics(bridge)).count(outcome + " 1.0") == 0:
            assert asyncio.get_running_loop().time() < deadline, "no client_disconnected outcome"
            await asyncio.sleep(0.1)
    assert 'outcome="internal_error"' not in await _text_metrics(bridge)
    mine = [r for r in caplog.records if r.name.startswith(("bridge", "aiohttp"))]
    assert [r.levelname for r in mine if r.levelno >= logging.WARNING] == []
    (gone,) = [r for r in mine if "went away" in r.getMessage()]
    assert (gone.levelname, gone.exc_info) == ("INFO", None)
    await _still_serves(bridge)


async def _text_metrics(bridge: RunningBridge) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(bridge.base_url + "/metrics") as response,
    ):
        return await response.text()


async def test_500_concurrent_posts_all_arrive_exactly_once(
    start_bridge: StartBridge, kafka_bootstrap: str
) -> None:
    bridge = await start_bridge()
    bodies = [login_body(minute=i) for i in range(500)]
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(body: bytes) -> int:
            async with session.post(bridge.webhook_url, data=body) as response:
                return response.status

        statuses = await asyncio.gather(*(send(b) for b in bodies))
    assert statuses == [200] * 500
    records = await consume(kafka_bootstrap, bridge.topic_raw, count=500, settle_s=2.0)
    assert len(records) == 500
    assert sorted(r.value for r in records) == sorted(bodies)
    ids = [headers_of(r)["event-id"] for r in records]
    assert len(set(ids)) == 500
    for record in records:
        assert record.key == str(orjson.loads(record.value)["user"]["id"]).encode()


async def test_kafka_unreachable_the_body_is_spooled_answered_200_and_readiness_stays_green(
    start_bridge: StartBridge,
) -> None:
    from devkafka.broker import free_port

    bridge = await start_bridge(
        kafka=False, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", BRIDGE_ACK_TIMEOUT_MS="500"
    )
    status, headers, payload = await post(bridge.webhook_url, DOCUMENTED_SAMPLE)
    assert (status, payload["status"]) == (200, "accepted")
    assert headers["wifiWebhookListener"] == "1"
    async with aiohttp.ClientSession() as session:
        async with session.get(bridge.base_url + "/readyz") as response:
            assert response.status == 200
            assert (await response.json())["kafka"] is False
        async with session.get(bridge.webhook_url) as response:
            assert response.status == 200  # the handshake works without Kafka
        async with session.get(bridge.base_url + "/metrics") as response:
            assert "wifi_bridge_spool_records 1.0" in await response.text()
    assert bridge.spool_dir is not None
    assert read_stats(bridge.spool_dir).records == 1


async def test_metrics_count_outcomes_and_carry_no_personal_data(
    start_bridge: StartBridge,
) -> None:
    bridge = await start_bridge()
    body = login_body(user_id=987654321, venue_id=5550123, email="someone.private@example.org")
    await post(bridge.webhook_url, body)
    await post(bridge.webhook_url, b"[]")
    async with (
        aiohttp.ClientSession() as session,
        session.get(bridge.base_url + "/metrics") as response,
    ):
        text = await response.text()
    labels = " ".join(re.findall(r"\{[^}]*\}", text))
    for personal in ("987654321", "5550123", "someone.private", "Webhook", "1970-01-01"):
        assert personal not in labels
    assert "someone.private" not in text
    assert 'wifi_bridge_requests_total{method="POST",outcome="accepted"} 1.0' in text
    assert 'wifi_bridge_requests_total{method="POST",outcome="not_an_object"} 1.0' in text
    assert 'wifi_bridge_dead_letters_total{reason="not_an_object"} 1.0' in text
    assert "wifi_bridge_kafka_ack_seconds_bucket" in text
    assert "wifi_bridge_build_info{" in text


async def test_logs_never_contain_personal_data_or_the_token_even_at_debug(
    spawn_bridge: Callable[..., Awaitable[RunningBridge]],
) -> None:
    bridge = await spawn_bridge(BRIDGE_TOKEN=TOKEN, BRIDGE_LOG_LEVEL="DEBUG")
    body = login_body(email="private.person@example.org")
    assert (await post(bridge.webhook_url, body))[0] == 200
    assert (await post(bridge.webhook_url, body.replace(b"{", b"[", 1)))[0] == 400
    truncated = gzip.compress(body)[:40]
    assert (await post(bridge.webhook_url, truncated, headers={"Content-Encoding": "gzip"}))[
        0
    ] == 400
    # Requests aiohttp cannot parse, which it logs with the bytes at fault: the request line.
    path = urlsplit(bridge.webhook_url).path.encode()
    for broken in (
        b"POST %s HTTP/1.1x\r\n\r\n" % path,  # bad status line: logged at ERROR
        b"P\x00ST %s HTTP/1.1\r\n\r\n" % path,  # bad method: logged at DEBUG
        b"POST %s\x01 HTTP/1.1\r\n\r\n" % path,  # bad URL: logged at ERROR
    ):
        assert (await send_raw(bridge.webhook_url, broken)).startswith(b"HTTP/1.0 400")
    assert bridge.process is not None
    bridge.process.send_signal(signal.SIGTERM)
    assert bridge.process.wait(timeout=30) == 0
    text = bridge.logs()
    assert "dead-letter" in text  # the bad bodies were logged, by reason only
    for secret in ("private.person", "Webhook", "1970-01-01", TOKEN):
        assert secret not in text


async def test_sigterm_during_load_loses_no_acknowledged_request(
    spawn_bridge: Callable[..., Awaitable[RunningBridge]], kafka_bootstrap: str
) -> None:
    bridge = await spawn_bridge()
    assert bridge.process is not None
    acknowledged: list[bytes] = []
    refused = 0
    stop_sending = asyncio.Event()

    async def sender(session: aiohttp.ClientSession, worker: int) -> None:
        nonlocal refused
        minute = 0
        while not stop_sending.is_set():
            body = login_body(user_id=worker * 100000 + minute, minute=minute)
            minute += 1
            try:
                async with session.post(bridge.webhook_url, data=body) as response:
                    if response.status == 200:
                        acknowledged.append((await response.json())["eventId"].encode())
            except aiohttp.ClientError:
                refused += 1
                await asyncio.sleep(0.01)

    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(sender(session, w)) for w in range(32)]
        await asyncio.sleep(1.5)
        in_flight_before = len(acknowledged)
        bridge.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(bridge.process.wait, 30)
        stop_sending.set()
        await asyncio.gather(*workers)
    assert code == 0
    assert in_flight_before > 50, "the load did not get going before SIGTERM"
    # All of the topic, up to its end offsets: a record not read is not in Kafka.
    records = await read_to_end(kafka_bootstrap, bridge.topic_raw)
    landed = {headers_of(r)["event-id"] for r in records}
    missing = set(acknowledged) - landed
    if missing:
        # Acknowledged from the spool (Kafka was slower than the ack budget): still safe, as a
        # bridge started on the same spool must prove by delivering them.
        assert bridge.spool_dir is not None
        assert read_stats(bridge.spool_dir).records >= len(missing), bridge.logs()
        successor = await spawn_bridge(spool_dir=str(bridge.spool_dir), topic_raw=bridge.topic_raw)
        assert successor.process is not None
        await wait_for_metric(successor, "wifi_bridge_spool_records", 0.0)  # drained
        records = await read_to_end(kafka_bootstrap, bridge.topic_raw)
        missing -= {headers_of(r)["event-id"] for r in records}
    assert not missing, f"{len(missing)} acknowledged requests are lost:\n{bridge.logs()}"
