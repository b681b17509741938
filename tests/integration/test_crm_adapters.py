"""The HTTP CRM adapters against local servers: signatures, status handling, batch limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from consumers.sinks.contacts import Contact
from consumers.sinks.crm_http import MAX_RETRY_AFTER_S, HttpClient
from consumers.sinks.crm_metrics import CrmMetrics
from consumers.sinks.crm_port import CrmBatchRejected, CrmRateLimited, CrmUnavailable
from consumers.sinks.crm_retry import RetryReason
from consumers.sinks.hubspot import HubSpotCrm
from consumers.sinks.ratelimit import SlidingWindowLimiter
from consumers.sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookCrm, verify
from devkafka.broker import free_port
from tests.fixtures.canonical import canonical_login, produce_logins
from tests.fixtures.crm_sink import CrmTopics, SinkRunner, eventually
from tests.fixtures.hubspot import StartHubSpot

SECRET = "webhook-secret-0123456789"


@dataclass
class Receiver:
    """A CRM endpoint that checks the signature as a real receiver would."""

    secret: bytes
    status: int = 200
    retry_after: str | None = None
    url: str = ""
    contacts: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        authentic = verify(
            self.secret,
            timestamp=request.headers.get(TIMESTAMP_HEADER),
            signature=request.headers.get(SIGNATURE_HEADER),
            body=body,
            now_s=time.time(),
        )
        if not authentic:
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        if self.status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": "no"}, status=self.status, headers=headers)
        self.contacts += orjson.loads(body)["contacts"]
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    crm = Receiver(secret=SECRET.encode())
    app = web.Application()
    app.router.add_post("/contacts", crm.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    crm.url = f"http://127.0.0.1:{port}/contacts"
    yield crm
    await runner.cleanup()


def http(crm: str = "webhook") -> HttpClient:
    return HttpClient(
        crm=crm,
        limiter=SlidingWindowLimiter(max_requests=100, window_s=1),
        metrics=CrmMetrics(),
        timeout_s=5,
    )


def contacts(count: int) -> list[Contact]:
    return [
        Contact(
            email=f"person{n}@example.com",
            first_name="Pat",
            last_name="Doe",
            provider="Form",
            last_venue_id="1",
            last_venue_name="Hall",
            last_visit_ms=1_800_000_000_000,
            visit_count=n,
            event_id=f"event-{n}",
        )
        for n in range(count)
    ]


async def test_webhook_signature_verifies_at_the_receiver(receiver: Receiver) -> None:
    crm = WebhookCrm(url=receiver.url, secret=SECRET, http=http())
    try:
        result = await crm.upsert(contacts(3))
    finally:
        await crm.close()
    assert len(result.accepted) == 3
    assert receiver.refused == 0
    assert [c["email"] for c in receiver.contacts] == [f"person{n}@example.com" for n in range(3)]
    assert receiver.contacts[0]["lastVisitAt"] == "2027-01-15T08:00:00.000Z"


async def test_webhook_with_the_wrong_secret_is_refused_and_retried_not_dead_lettered(
    receiver: Receiver,
) -> None:
    crm = WebhookCrm(url=receiver.url, secret="not-the-shared-secret", http=http())
    try:
        with pytest.raises(CrmUnavailable) as caught:
            await crm.upsert(contacts(1))
    finally:
        await crm.close()
    assert caught.value.reason is RetryReason.UNAUTHORIZED
    assert receiver.refused == 1


@pytest.mark.parametrize(
    ("status", "error"), [(400, CrmBatchRejected), (422, CrmBatchRejected), (503, CrmUnavailable)]
)
async def test_webhook_status_decides_between_rejected_and_retry(
    receiver: Receiver, status: int, error: type[Exception]
) -> None:
    receiver.status = status
    crm = WebhookCrm(url=receiver.url, secret=SECRET, http=http())
    try:
        with pytest.raises(error):
            await crm.upsert(contacts(2))
    finally:
        await crm.close()


@pytest.mark.parametrize(
    ("retry_after", "wait_s"), [("30", 30.0), ("86400", MAX_RETRY_AFTER_S), ("1e300", 900.0)]
)
async def test_a_retry_after_longer_than_the_sink_waits_is_capped(
    receiver: Receiver, retry_after: str, wait_s: float
) -> None:
    receiver.status, receiver.retry_after = 503, retry_after
    crm = WebhookCrm(url=receiver.url, secret=SECRET, http=http())
    try:
        with pytest.raises(CrmUnavailable) as caught:
            await crm.upsert(contacts(1))
    finally:
        await crm.close()
    assert caught.value.retry_after_s == wait_s


async def test_a_redirecting_crm_url_is_retried_and_never_counts_as_accepted() -> None:
    # An http:// URL in front of an https-only CRM, say: a client that followed the 301 would
    # GET the target, get its 200 and take the contacts as upserted.
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(location="/contacts")

    async def target(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/old", moved)
    app.router.add_get("/contacts", target)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    crm = WebhookCrm(url=f"http://127.0.0.1:{port}/old", secret=SECRET, http=http())
    try:
        with pytest.raises(CrmUnavailable) as raised:
            await crm.upsert(contacts(2))
        assert raised.value.reason is RetryReason.REDIRECTED
    finally:
        await crm.close()
        await runner.cleanup()


async def test_a_hubspot_url_answering_200_with_a_web_page_is_retried_never_accepted() -> None:
    # CRM_HUBSPOT_BASE_URL set to a web site (or behind a proxy's sign-in page): 200 to any POST.
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/crm/v3/objects/contacts/batch/upsert", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    crm = HubSpotCrm(base_url=f"http://127.0.0.1:{port}", token="pat-test", http=http("hubspot"))
    try:
        with pytest.raises(CrmUnavailable) as raised:
            await crm.upsert(contacts(2))
        assert raised.value.reason is RetryReason.UNEXPECTED_ANSWER
        assert raised.value.status == 200
    finally:
        await crm.close()
        await runner.cleanup()


async def test_a_crm_url_that_is_not_found_is_retried_never_dead_lettered(
    receiver: Receiver,
) -> None:
    # A path mistyped in CRM_WEBHOOK_URL: rejected, every contact would be dead-lettered.
    crm = WebhookCrm(url=receiver.url + "-typo", secret=SECRET, http=http())
    try:
        with pytest.raises(CrmUnavailable) as raised:
            await crm.upsert(contacts(2))
        assert raised.value.reason is RetryReason.WRONG_URL
        assert raised.value.status == 404
    finally:
        await crm.close()


async def test_unreachable_crm_is_a_connection_error_to_retry() -> None:
    crm = WebhookCrm(url=f"http://127.0.0.1:{free_port()}/", secret=SECRET, http=http())
    try:
        with pytest.raises(CrmUnavailable) as caught:
            await crm.upsert(contacts(1))
    finally:
        await crm.close()
    assert caught.value.reason is RetryReason.CONNECTION_ERROR


async def test_hubspot_server_refuses_an_oversized_batch_with_400(
    hubspot_server: StartHubSpot,
) -> None:
    fake = await hubspot_server(max_batch=10)
    crm = HubSpotCrm(base_url=fake.url, token=fake.token, http=http("hubspot"))
    try:
        with pytest.raises(CrmBatchRejected) as caught:
            await crm.upsert(contacts(11))
        with pytest.raises(ValueError, match="at most 100"):
            await crm.upsert(contacts(101))
        assert len((await crm.upsert(contacts(10))).accepted) == 10
    finally:
        await crm.close()
    assert caught.value.status == 400
    assert "at most 10 inputs" in caught.value.detail


async def test_hubspot_429_carries_retry_after_and_holds_back_the_next_request(
    hubspot_server: StartHubSpot,
) -> None:
    fake = await hubspot_server(rate_limit=1, window_s=1.0)
    crm = HubSpotCrm(base_url=fake.url, token=fake.token, http=http("hubspot"))
    try:
        await crm.upsert(contacts(1))
        with pytest.raises(CrmUnavailable) as caught:
            await crm.upsert(contacts(1))
        assert caught.value.reason is RetryReason.RATE_LIMITED
        assert caught.value.retry_after_s == 1
        started = time.monotonic()
        await crm.upsert(contacts(1))  # waits for Retry-After inside the limiter
        assert time.monotonic() - started >= 0.9
    finally:
        await crm.close()
    assert fake.requests_while_blocked == 0


async def test_a_request_the_rate_limit_holds_long_is_handed_back_not_slept_on(
    hubspot_server: StartHubSpot,
) -> None:
    # A Retry-After of a minute: sleeping on it inside the request would keep the sink from
    # polling Kafka and from hearing a stop; the caller is told how long to wait instead.
    fake = await hubspot_server(rate_limit=1, window_s=60.0)
    crm = HubSpotCrm(base_url=fake.url, token=fake.token, http=http("hubspot"))
    try:
        await crm.upsert(contacts(1))
        with pytest.raises(CrmUnavailable) as answered:
            await crm.upsert(contacts(1))
        assert answered.value.retry_after_s == 60
        started = time.monotonic()
        with pytest.raises(CrmRateLimited) as held:
            await crm.upsert(contacts(1))
        assert time.monotonic() - started < 0.5
        assert held.value.reason is RetryReason.RATE_LIMITED
        assert 55 < held.value.retry_after_s <= 60
    finally:
        await crm.close()
    assert fake.requests_while_blocked == 0


@pytest.mark.kafka
async def test_a_stop_while_the_rate_limit_holds_a_request_ends_promptly(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server()
    records = [canonical_login(email=f"held{n}@example.com") for n in range(2)]
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    sink = await crm_sink.start(
        CRM_TARGET="hubspot",
        CRM_HUBSPOT_BASE_URL=fake.url,
        CRM_HUBSPOT_TOKEN=fake.token,
        CRM_BATCH_SIZE="1",
        CRM_RATE_LIMIT_REQUESTS="1",
        CRM_RATE_LIMIT_WINDOW_S="60",
    )
    await eventually(lambda: len(fake.batch_sizes) == 1, what="the first request answered")
    await asyncio.sleep(1.0)  # the second now waits a minute for the limiter
    started = time.monotonic()
    await crm_sink.stop(sink)
    took_s = time.monotonic() - started
    assert took_s < 5, f"the stop took {took_s:.1f} s"
    assert len(fake.batch_sizes) == 1


@pytest.mark.kafka
async def test_sink_with_the_webhook_target_delivers_signed_contacts(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, receiver: Receiver
) -> None:
    records = [canonical_login(email=f"hook{n}@example.com") for n in range(5)]
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    await crm_sink.start(
        CRM_TARGET="webhook", CRM_WEBHOOK_URL=receiver.url, CRM_WEBHOOK_SECRET=SECRET
    )
    await eventually(lambda: len(receiver.contacts) == 5, what="5 contacts delivered")
    assert receiver.refused == 0
    assert {c["email"] for c in receiver.contacts} == {f"hook{n}@example.com" for n in range(5)}
