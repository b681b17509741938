"""The CRM sink against a real broker and a local server that follows HubSpot's contract."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.sinks import crm as crm_service
from tests.fixtures.canonical import BASE, DAY_MS, HOUR_MS, canonical_login, produce_logins
from tests.fixtures.crm_sink import (
    CrmTopics,
    RunningSink,
    SinkRunner,
    eventually,
    partitions_of,
    uncommitted_records,
)
from tests.fixtures.hubspot import FakeHubSpot, StartHubSpot
from tests.fixtures.kafka import consume, unique_topic

pytestmark = pytest.mark.kafka


class _Abort(Exception):
    """Raised inside a transaction to abort it."""


def hubspot_env(fake: FakeHubSpot, **overrides: str) -> dict[str, str]:
    return {
        "CRM_TARGET": "hubspot",
        "CRM_HUBSPOT_BASE_URL": fake.url,
        "CRM_HUBSPOT_TOKEN": fake.token,
        **overrides,
    }


def logins_of(count: int, *, prefix: str = "visitor") -> list[dict[str, Any]]:
    return [canonical_login(email=f"{prefix}{n}@example.com") for n in range(count)]


def emails(records: list[dict[str, Any]]) -> set[str]:
    return {r["user"]["email"] for r in records}


async def settled(sink: RunningSink, records: int) -> None:
    """Until the sink has read ``records`` records and committed them: the lag measured,
    and 0, on every partition of its input topics (no sample yet is no lag measured)."""
    bootstrap, topics = sink.env["KAFKA_BOOTSTRAP_SERVERS"], set(sink.settings.topics)

    async def done() -> bool:
        if await sink.metric("wifi_crm_records_total") < records:
            return False
        partitions = await partitions_of(bootstrap, list(topics))
        lag = await sink.lag_by_partition()
        created = {topic for topic, _ in partitions} == topics
        return created and set(lag) >= partitions and not any(lag.values())

    await eventually(done, timeout_s=60, what=f"{records} records read and committed")


OUTAGE_S = 60.0


@pytest.mark.slow
async def test_crm_outage_ends_with_every_contact_synced_exactly_once(
    kafka_bootstrap: str,
    crm_topics: CrmTopics,
    spawn_crm_sink: Any,
    hubspot_server: StartHubSpot,
) -> None:
    fake = await hubspot_server()
    # The backoff doubles up to 1 s (60 s by default): the retry after the CRM is back comes
    # within a second, so a minute's outage ends the test soon after the minute.
    sink = await spawn_crm_sink(**hubspot_env(fake, CRM_RETRY_MAX_S="1"))
    assert sink.process is not None
    group, topics = sink.env["CRM_GROUP_ID"], [crm_topics.visits, crm_topics.late]
    before = logins_of(10, prefix="before")
    await produce_logins(kafka_bootstrap, crm_topics.visits, before)
    await eventually(lambda: fake.synced == emails(before), what="first logins synced")

    fake.outage(OUTAGE_S)
    back_at = time.monotonic() + OUTAGE_S
    during = logins_of(30, prefix="during")
    await produce_logins(kafka_bootstrap, crm_topics.visits, during[:20])
    await produce_logins(kafka_bootstrap, crm_topics.late, during[20:])
    while time.monotonic() < back_at - 1.0:
        assert sink.process.poll() is None, f"the sink exited in the outage:\n{sink.logs()}"
        assert fake.synced == emails(before)
        await asyncio.sleep(1.0)
    assert await sink.metric("wifi_crm_available") == 0
    assert await uncommitted_records(kafka_bootstrap, group, topics) == len(during)

    await eventually(
        lambda: fake.synced == emails(before + during), timeout_s=30, what="all synced"
    )
    recovered_s = time.monotonic() - back_at
    assert recovered_s < 5.0, f"everyone synced only {recovered_s:.1f} s after the CRM was back"
    await eventually(
        lambda: _all_committed(kafka_bootstrap, group, topics), what="offsets committed"
    )
    assert sink.process.poll() is None, "the sink exited"
    logs = sink.logs()
    assert logs.count('"starting"') == 1, "the sink started more than once"
    assert "partitions revoked" not in logs, "the sink lost its partitions in the outage"
    assert set(fake.upserts.values()) == {1}, "a contact was upserted more than once"
    # Retried all minute long at the capped backoff, each attempt a request the CRM saw.
    assert fake.statuses[503] >= 40
    assert await sink.metric("wifi_crm_retries_total", reason="server_error") == fake.statuses[503]
    assert await sink.metric("wifi_crm_contacts_upserted_total") == len(before) + len(during)
    assert await sink.metric("wifi_crm_available") == 1


async def _all_committed(bootstrap: str, group: str, topics: list[str]) -> bool:
    return await uncommitted_records(bootstrap, group, topics) == 0


async def committed(bootstrap: str, sink: RunningSink, topics: CrmTopics) -> None:
    """Until the sink's group has committed every record of the input topics."""
    group = sink.env["CRM_GROUP_ID"]
    await eventually(
        lambda: _all_committed(bootstrap, group, [topics.visits, topics.late]),
        what="offsets committed",
    )


async def test_partial_failure_sends_only_the_rejected_records_to_the_dlq(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    records = logins_of(12, prefix="partial")
    bad = {records[2]["user"]["email"], records[7]["user"]["email"]}
    flaky = records[5]["user"]["email"]
    fake = await hubspot_server(
        reject={email: "Property values were not valid" for email in bad}, fail_once={flaky}
    )
    sink = await crm_sink.start(**hubspot_env(fake))
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)

    await eventually(lambda: fake.synced == emails(records) - bad, what="good ones synced")
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=2, settle_s=1.5)
    assert len(dead) == 2
    assert {orjson.loads(letter.value)["user"]["email"] for letter in dead} == bad
    for letter in dead:
        headers = dict(letter.headers)
        assert headers["dlq-reason"] == b"crm_rejected"
        assert headers["crm"] == b"hubspot"
        assert headers["crm-status"] == b"207"
        assert b"Property values were not valid" in headers["dlq-detail"]
        assert headers["event-id"] in {r["eventId"].encode() for r in records}
    assert fake.upserts[flaky] == 1
    assert fake.statuses[207] >= 1
    await settled(sink, 12)
    assert await sink.metric("wifi_crm_rejected_records_total", reason="crm_rejected") == 2
    assert await sink.metric("wifi_crm_retries_total", reason="record_retryable") == 1
    samples = (await sink.metrics_text()).splitlines()
    assert not [line for line in samples if "@" in line], "personal data in a metric label"


@pytest.mark.parametrize("category", ["RATE_LIMITS", "INTERNAL_ERROR"])
async def test_a_contact_answered_retryable_in_a_207_is_retried_past_max_attempts_not_dead_lettered(
    kafka_bootstrap: str,
    crm_topics: CrmTopics,
    crm_sink: SinkRunner,
    hubspot_server: StartHubSpot,
    category: str,
) -> None:
    # The CRM takes the others and keeps answering this one retryable for a while (rate
    # limited, or its own error): nothing shows it at fault, so it waits, with backoff.
    records = logins_of(4, prefix="slowly")
    flaky = records[1]["user"]["email"]
    fake = await hubspot_server(fail_times=Counter({flaky: 6}), retryable_category=category)
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake, CRM_RECORD_MAX_ATTEMPTS="2"))
    await eventually(lambda: fake.synced == emails(records), what="all synced")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert fake.fail_times[flaky] == 0
    assert set(fake.upserts.values()) == {1}
    assert await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=1) == []


async def test_a_contact_that_fails_its_whole_batch_is_isolated_and_alone_dead_lettered(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    records = logins_of(10, prefix="bisect")
    poison = records[6]["user"]["email"]
    fake = await hubspot_server(poison={poison})
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    sink = await crm_sink.start(**hubspot_env(fake))
    await eventually(lambda: fake.synced == emails(records) - {poison}, what="the rest synced")
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1, settle_s=1.0)
    assert [orjson.loads(letter.value)["user"]["email"] for letter in dead] == [poison]
    assert dict(dead[0].headers)["crm-status"] == b"400"
    assert b"Email address is invalid" in dict(dead[0].headers)["dlq-detail"]
    await settled(sink, 10)
    assert set(fake.upserts.values()) == {1}


async def test_records_of_an_aborted_transaction_are_never_synced(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    committed = logins_of(3, prefix="committed")
    aborted = logins_of(2, prefix="aborted")
    await produce_logins(kafka_bootstrap, crm_topics.visits, [])  # creates the topic
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_topic("pipeline")
    )
    await producer.start()

    async def send(records: list[dict[str, Any]]) -> None:
        for record in records:
            key = record["user"]["id"].encode()
            await producer.send(crm_topics.visits, key=key, value=orjson.dumps(record))
        await producer.flush()

    async def abort_after(records: list[dict[str, Any]]) -> None:
        async with producer.transaction():
            await send(records)
            raise _Abort

    try:
        with pytest.raises(_Abort):
            await abort_after(aborted)
        async with producer.transaction():
            await send(committed)
    finally:
        await producer.stop()
    fake = await hubspot_server()
    sink = await crm_sink.start(**hubspot_env(fake))
    await eventually(lambda: fake.synced == emails(committed), what="committed ones synced")
    await settled(sink, 3)
    assert fake.synced == emails(committed)


async def test_two_logins_of_a_user_within_the_min_interval_produce_one_upsert(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server()
    sink = await crm_sink.start(**hubspot_env(fake))
    same_day = [
        canonical_login(user_id=71, email="twice@example.com", offset_ms=0),
        canonical_login(user_id=71, email="twice@example.com", offset_ms=3 * HOUR_MS),
    ]
    next_day = [
        canonical_login(user_id=72, email="daily@example.com", offset_ms=0),
        canonical_login(user_id=72, email="daily@example.com", offset_ms=DAY_MS + HOUR_MS),
    ]
    hidden = [canonical_login(user_id=73, email=None)]
    # One at a time, so the second login of each user is a batch of its own.
    for first, second in zip(same_day, next_day, strict=True):
        await produce_logins(kafka_bootstrap, crm_topics.visits, [first, second])
        await eventually(lambda: fake.upserts["daily@example.com"] >= 1, what="first synced")
    await produce_logins(kafka_bootstrap, crm_topics.visits, hidden)
    await settled(sink, 5)
    await asyncio.sleep(0.5)
    assert fake.upserts == {"twice@example.com": 1, "daily@example.com": 2}
    last_visit_ms = int(BASE.timestamp() * 1000) + DAY_MS + HOUR_MS
    assert fake.contacts["daily@example.com"]["wifi_last_visit_at"] == str(last_visit_ms)
    assert await sink.metric("wifi_crm_skipped_records_total", reason="throttled") == 1
    assert await sink.metric("wifi_crm_skipped_records_total", reason="no_email") == 1


async def test_replaying_the_topic_from_the_beginning_sends_nothing_new(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server()
    records = logins_of(15, prefix="replay")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    first = await crm_sink.start(**hubspot_env(fake))
    await eventually(lambda: fake.synced == emails(records), what="synced once")
    await settled(first, 15)
    await crm_sink.stop(first)
    requests = sum(fake.statuses.values())

    # A new consumer group reads everything again: the replay an operator would run.
    replay = await crm_sink.start(**hubspot_env(fake, CRM_GROUP_ID="replay-from-start"))
    await settled(replay, 15)
    assert sum(fake.statuses.values()) == requests, "the replay sent requests to the CRM"
    assert await replay.metric("wifi_crm_skipped_records_total", reason="stale") == 15
    assert set(fake.upserts.values()) == {1}


async def test_batches_stay_within_hubspots_limit_and_429_retry_after_is_honoured(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # The server allows 3 requests a second; the sink is told it may send 20 (a wrong setting):
    # it must meet the 429s, wait as told, and still sync every contact once.
    fake = await hubspot_server(rate_limit=3, window_s=1.0)
    sink = await crm_sink.start(
        **hubspot_env(
            fake,
            CRM_BATCH_SIZE="5",
            CRM_RATE_LIMIT_REQUESTS="20",
            CRM_RATE_LIMIT_WINDOW_S="1",
        )
    )
    records = logins_of(60, prefix="limited")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    await eventually(lambda: fake.synced == emails(records), timeout_s=60, what="all synced")
    await settled(sink, 60)
    assert max(fake.batch_sizes) <= 5
    assert fake.statuses[400] == 0
    assert fake.statuses[429] >= 1
    assert fake.requests_while_blocked == 0, "a request came before Retry-After had passed"
    assert set(fake.upserts.values()) == {1}
    assert await sink.metric("wifi_crm_retries_total", reason="rate_limited") >= 1


async def test_a_sink_within_the_rate_limit_never_meets_a_429(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server(rate_limit=4, window_s=1.0)
    sink = await crm_sink.start(
        **hubspot_env(
            fake, CRM_BATCH_SIZE="5", CRM_RATE_LIMIT_REQUESTS="4", CRM_RATE_LIMIT_WINDOW_S="1"
        )
    )
    records = logins_of(40, prefix="paced")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    await eventually(lambda: fake.synced == emails(records), timeout_s=60, what="all synced")
    await settled(sink, 40)
    assert fake.statuses[429] == 0
    assert len(fake.batch_sizes) >= 8


async def test_no_crm_configured_writes_the_outbox_idempotently(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, tmp_path: Path
) -> None:
    records = logins_of(8, prefix="outbox")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    sink = await crm_sink.start()
    assert sink.settings.target == "outbox"
    await settled(sink, 8)
    await crm_sink.stop(sink)
    again = await crm_sink.start(CRM_GROUP_ID="outbox-replay")
    await settled(again, 8)

    with sqlite3.connect(sink.settings.state_db) as db:
        rows = db.execute("SELECT email, contact FROM crm_outbox").fetchall()
    assert sorted(email for email, _ in rows) == sorted(emails(records))
    assert await again.metric("wifi_crm_contacts_upserted_total", crm="outbox") == 0


async def test_sigkilled_sink_restarted_loses_no_contact(
    kafka_bootstrap: str,
    crm_topics: CrmTopics,
    spawn_crm_sink: Any,
    hubspot_server: StartHubSpot,
) -> None:
    fake = await hubspot_server(delay_s=0.05)
    env = hubspot_env(fake, CRM_BATCH_SIZE="10", CRM_MAX_POLL_RECORDS="20")
    records = logins_of(200, prefix="killed")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    first = await spawn_crm_sink(**env)
    await eventually(lambda: len(fake.synced) >= 50, what="some contacts synced")
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    assert len(fake.synced) < 200, "the sink finished before it was killed"

    second = await spawn_crm_sink(**{**env, "CRM_GROUP_ID": first.env["CRM_GROUP_ID"]})
    await eventually(lambda: fake.synced == emails(records), timeout_s=60, what="all synced")
    await settled(second, 1)
    for sink in (first, second):
        assert "@example.com" not in sink.logs(), "a log line carries an e-mail address"
    duplicates = sum(count - 1 for count in fake.upserts.values())
    # At least once towards an HTTP CRM: at most the request in flight when the process died
    # is sent again (an upsert by e-mail address is idempotent in the CRM), as documented.
    assert duplicates <= int(env["CRM_BATCH_SIZE"])


@pytest.mark.slow
async def test_sigkilled_outbox_sink_restarted_writes_every_contact_once(
    kafka_bootstrap: str, crm_topics: CrmTopics, spawn_crm_sink: Any, tmp_path: Path
) -> None:
    records = logins_of(200, prefix="outboxkill")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    env = {"CRM_BATCH_SIZE": "10", "CRM_MAX_POLL_RECORDS": "20"}
    # The sixth request halts once the outbox committed its rows, before the sink saved its
    # sync marks or committed its offsets: the kill lands there.
    marker = tmp_path / "halted.json"
    first = await spawn_crm_sink(
        "tests.fixtures.halting_sink", HALT_AFTER_WRITES="5", HALT_MARKER=str(marker), **env
    )
    await eventually(marker.exists, what="the sink to halt after an outbox write")
    halted = orjson.loads(marker.read_bytes())
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    group, topics = first.env["CRM_GROUP_ID"], [crm_topics.visits, crm_topics.late]
    state_db = first.settings.state_db
    stored = halted["written"] + halted["in_flight"]
    assert _outbox(state_db) == {"rows": stored, "event_ids": stored, "emails": stored}
    committed = len(records) - await uncommitted_records(kafka_bootstrap, group, topics)
    assert committed < stored, "nothing in the outbox is read again: the kill came too late"

    second = await spawn_crm_sink(**{**env, "CRM_GROUP_ID": group})
    await eventually(
        lambda: _all_committed(kafka_bootstrap, group, topics), what="offsets committed"
    )
    await asyncio.sleep(0.5)
    # The request in flight was written again (its sync marks were not saved) and the
    # outbox, keyed by event id, kept one row of each.
    upserted = await second.metric("wifi_crm_contacts_upserted_total", crm="outbox")
    assert upserted == len(records) - halted["written"]
    total = len(records)
    assert _outbox(state_db) == {"rows": total, "event_ids": total, "emails": total}
    with closing(sqlite3.connect(state_db)) as db:
        stored_emails = {email for (email,) in db.execute("SELECT email FROM crm_outbox")}
        stored_ids = {event_id for (event_id,) in db.execute("SELECT event_id FROM crm_outbox")}
    assert stored_emails == emails(records)
    assert stored_ids == {r["eventId"] for r in records}


def _outbox(state_db: Path) -> dict[str, int]:
    """Rows of ``crm_outbox``, and how many distinct event ids and e-mails they hold."""
    with closing(sqlite3.connect(state_db)) as db:
        rows, event_ids, addresses = db.execute(
            "SELECT count(*), count(DISTINCT event_id), count(DISTINCT email) FROM crm_outbox"
        ).fetchone()
    return {"rows": rows, "event_ids": event_ids, "emails": addresses}


async def test_sigterm_during_a_crm_outage_exits_0_and_a_successor_syncs_everything(
    kafka_bootstrap: str,
    crm_topics: CrmTopics,
    spawn_crm_sink: Any,
    hubspot_server: StartHubSpot,
) -> None:
    fake = await hubspot_server()
    fake.outage(3600)
    env = hubspot_env(fake)
    records = logins_of(10, prefix="sigterm")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    first = await spawn_crm_sink(**env)
    await eventually(lambda: fake.statuses[503] >= 2, what="the sink meets the outage")
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.process.wait, 15) == 0
    assert '"stopped"' in first.logs()

    fake.outage(0)
    await spawn_crm_sink(**{**env, "CRM_GROUP_ID": first.env["CRM_GROUP_ID"]})
    await eventually(lambda: fake.synced == emails(records), what="all synced after restart")
    assert set(fake.upserts.values()) == {1}


async def test_an_unreadable_record_with_an_empty_event_id_header_is_dead_lettered_without_it(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner
) -> None:
    # Kafka allows a header without a value: copied as it is, it broke the letter's encoding
    # and the sink crashed on it at every start.
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_partitions=1)
    await ensure_topics(kafka, [TopicSpec(crm_topics.visits)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            crm_topics.visits, key=b"k", value=b"not json", headers=[("event-id", None)]
        )
    finally:
        await producer.stop()
    sink = await crm_sink.start()
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1)
    assert [letter.value for letter in dead] == [b"not json"]
    headers = dict(dead[0].headers)
    assert headers["dlq-reason"] == b"unreadable"
    assert "event-id" not in headers
    await committed(kafka_bootstrap, sink, crm_topics)


async def test_a_stop_ends_the_batch_between_requests_and_a_successor_syncs_the_rest_once(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server(delay_s=1.0)
    records = logins_of(8, prefix="slowcrm")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    env = hubspot_env(fake, CRM_BATCH_SIZE="1")
    first = await crm_sink.start(**env)
    await eventually(lambda: len(fake.batch_sizes) >= 1, what="first request answered")
    started = time.monotonic()
    await crm_sink.stop(first)
    took_s = time.monotonic() - started
    # at most the request in flight (1 s) is waited for, not the six or so still to send
    assert took_s < 4, f"the stop took {took_s:.1f} s"
    answered = len(fake.batch_sizes)
    assert answered < len(records)
    group = first.env["CRM_GROUP_ID"]
    assert await uncommitted_records(kafka_bootstrap, group, [crm_topics.visits]) == len(records)

    second = await crm_sink.start(**{**env, "CRM_GROUP_ID": group})
    await eventually(lambda: fake.synced == emails(records), what="the rest synced")
    await committed(kafka_bootstrap, second, crm_topics)
    assert set(fake.upserts.values()) == {1}, "a contact accepted before the stop was sent again"


async def test_consumer_lag_counts_what_is_not_committed_and_moves_while_the_sink_backs_off(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server()
    fake.outage(3600)
    await produce_logins(kafka_bootstrap, crm_topics.visits, logins_of(5, prefix="lag"))
    sink = await crm_sink.start(**hubspot_env(fake))

    async def lag_is(records: int) -> bool:
        return await sink.metric("wifi_crm_consumer_lag_records") == records

    # read, but not delivered: a restart would read them again
    await eventually(lambda: fake.statuses[503] >= 2, what="the sink meets the outage")
    await eventually(lambda: lag_is(5), what="the batch backing off counted as lag")
    await produce_logins(kafka_bootstrap, crm_topics.visits, logins_of(3, prefix="lagmore"))
    await eventually(lambda: lag_is(8), what="the lag moving while the batch backs off")
    group = sink.env["CRM_GROUP_ID"]
    assert await uncommitted_records(kafka_bootstrap, group, [crm_topics.visits]) == 8

    fake.outage(0)
    await committed(kafka_bootstrap, sink, crm_topics)
    await eventually(lambda: lag_is(0), what="no lag once committed")


PRODUCER_MAX_BYTES = 1_048_576  # aiokafka's default max_request_size, the sink's default too


def padded_login(email: str, *, record_bytes: int) -> dict[str, Any]:
    """A canonical login whose record, as ``produce_logins`` sends it, is ``record_bytes``
    (the producer's estimate, give or take a varint); the padding is a field the sink does
    not read."""
    record = canonical_login(email=email)
    record["padding"] = ""
    key = str(record["user"]["id"]).encode()
    headers = [("event-id", record["eventId"].encode())]
    bare = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, orjson.dumps(record), headers)
    record["padding"] = "p" * (record_bytes - bare - 4)  # the value's length varint grows
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, orjson.dumps(record), headers)
    assert record_bytes - 8 <= size <= record_bytes
    return record


async def dlq_topic_refusing_over(bootstrap: str, topic: str, max_message_bytes: int) -> None:
    """Creates the dead-letter topic before the sink does, with a small max.message.bytes."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=1)
    spec = TopicSpec(topic, configs={"max.message.bytes": str(max_message_bytes)})
    assert await ensure_topics(kafka, [spec]) == [topic]


async def test_a_dead_letter_larger_than_the_producer_takes_is_cut_to_fit_and_the_sink_goes_on(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # The input record just fits the producer's limit; its dead letter adds the sink's headers
    # and the CRM's answer, so whole it would not.
    big = padded_login("huge@example.com", record_bytes=PRODUCER_MAX_BYTES - 64)
    after = logins_of(3, prefix="afterhuge")
    fake = await hubspot_server(poison={"huge@example.com"})
    await produce_logins(kafka_bootstrap, crm_topics.visits, [big], partitions=1)
    await produce_logins(kafka_bootstrap, crm_topics.visits, after, partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake))

    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=30)
    assert len(dead) == 1, "the dead letter never reached the topic"
    headers = dict(dead[0].headers)
    original = orjson.dumps(big)
    assert headers["dlq-value-truncated"] == str(len(original)).encode()
    assert original.startswith(dead[0].value)
    assert len(dead[0].value) < len(original)
    assert b"Email address is invalid" in headers["dlq-detail"]
    assert headers["event-id"] == big["eventId"].encode()
    await eventually(lambda: fake.synced == emails(after), what="the later logins synced")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert await sink.metric("wifi_crm_rejected_records_total", reason="crm_rejected") == 1


async def test_a_dead_letter_the_topic_refuses_as_too_large_is_cut_until_it_fits(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # The topic takes 64 KiB, the producer 1 MiB: only the broker can refuse the letter, and
    # its refusal leaves the idempotent producer out of sequence for the next letters.
    await dlq_topic_refusing_over(kafka_bootstrap, crm_topics.dlq, 65_536)
    big = padded_login("wide@example.com", record_bytes=200_000)
    small = canonical_login(email="narrow@example.com")
    after = logins_of(3, prefix="afterwide")
    fake = await hubspot_server(poison={"wide@example.com", "narrow@example.com"})
    await produce_logins(kafka_bootstrap, crm_topics.visits, [big], partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake))
    first = await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=30)
    assert len(first) == 1, "the dead letter never reached the topic"
    await produce_logins(kafka_bootstrap, crm_topics.visits, [small, *after], partitions=1)

    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=2, timeout_s=30)
    assert [orjson.loads(d.value)["user"]["email"] for d in dead[1:]] == ["narrow@example.com"]
    headers = dict(dead[0].headers)
    assert headers["dlq-value-truncated"] == str(len(orjson.dumps(big))).encode()
    assert len(dead[0].value) < 65_536
    assert orjson.dumps(big).startswith(dead[0].value)
    assert "dlq-value-truncated" not in dict(dead[1].headers)
    await eventually(lambda: fake.synced == emails(after), what="the later logins synced")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert await sink.metric("wifi_crm_rejected_records_total", reason="crm_rejected") == 2


async def test_a_dead_letter_refused_even_without_its_value_is_dropped_not_retried_for_ever(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    await dlq_topic_refusing_over(kafka_bootstrap, crm_topics.dlq, 100)
    records = logins_of(4, prefix="nodlq")
    poison = records[1]["user"]["email"]
    fake = await hubspot_server(poison={poison})
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake))

    async def dropped() -> bool:
        return await sink.metric("wifi_crm_dead_letters_dropped_total", reason="crm_rejected") == 1

    await eventually(dropped, what="the dead letter dropped")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert fake.synced == emails(records) - {poison}
    assert await sink.metric("wifi_crm_rejected_records_total") == 0
    assert await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=2) == []


async def test_a_locked_state_file_is_retried_and_every_contact_synced_once(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    fake = await hubspot_server()
    sink = await crm_sink.start(**hubspot_env(fake))
    records = logins_of(10, prefix="locked")
    later = logins_of(5, prefix="unlocked")
    # Another process holds the write lock: the sink's save of the sync marks, after the CRM
    # accepted the contacts, fails once its busy timeout (5 s) has passed.
    with closing(sqlite3.connect(sink.settings.state_db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        await produce_logins(kafka_bootstrap, crm_topics.visits, records)

        async def retried() -> bool:
            errors = await sink.metric("wifi_crm_state_errors_total", operation="save_marks")
            return errors >= 2

        await eventually(retried, timeout_s=60, what="the failed save retried")
        assert fake.synced <= emails(records)
        group = sink.env["CRM_GROUP_ID"]
        assert await uncommitted_records(kafka_bootstrap, group, [crm_topics.visits]) == 10
        other.execute("ROLLBACK")

    await produce_logins(kafka_bootstrap, crm_topics.visits, later)
    await eventually(lambda: fake.synced == emails(records + later), what="all synced")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert set(fake.upserts.values()) == {1}, "a contact was sent twice"
    assert await sink.metric("wifi_crm_contacts_upserted_total") == 15
    assert await sink.metric("wifi_crm_state_errors_total", error="SQLITE_BUSY") >= 2
    samples = (await sink.metrics_text()).splitlines()
    assert not [line for line in samples if "@" in line], "personal data in a metric label"


async def test_a_locked_outbox_is_retried_and_every_contact_written_once(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner
) -> None:
    sink = await crm_sink.start()
    records = logins_of(8, prefix="lockedbox")
    with closing(sqlite3.connect(sink.settings.state_db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        await produce_logins(kafka_bootstrap, crm_topics.visits, records)

        async def retried() -> bool:
            return await sink.metric("wifi_crm_state_errors_total", operation="write_outbox") >= 1

        await eventually(retried, timeout_s=60, what="the failed outbox write retried")
        other.execute("ROLLBACK")

    await committed(kafka_bootstrap, sink, crm_topics)
    assert _outbox(sink.settings.state_db) == {"rows": 8, "event_ids": 8, "emails": 8}
    assert await sink.metric("wifi_crm_contacts_upserted_total", crm="outbox") == 8


async def test_a_contact_the_crm_answers_500_for_is_isolated_and_alone_dead_lettered(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    records = logins_of(10, prefix="choke")
    poison = records[6]["user"]["email"]
    fake = await hubspot_server(crash={poison})
    await produce_logins(kafka_bootstrap, crm_topics.visits, records)
    sink = await crm_sink.start(**hubspot_env(fake))

    # Split until it is alone, the others synced meanwhile (which shows the CRM up), then
    # dead-lettered after CRM_RECORD_MAX_ATTEMPTS (8) failures of its own.
    await eventually(lambda: fake.synced == emails(records) - {poison}, what="the rest synced")
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1, settle_s=1.0)
    assert [orjson.loads(letter.value)["user"]["email"] for letter in dead] == [poison]
    headers = dict(dead[0].headers)
    assert headers["dlq-reason"] == b"crm_server_error"
    assert headers["crm-status"] == b"500"
    assert b"internal error, correlation 7c1e" in headers["dlq-detail"]
    assert headers["event-id"] == records[6]["eventId"].encode()
    await committed(kafka_bootstrap, sink, crm_topics)
    assert set(fake.upserts.values()) == {1}
    assert await sink.metric("wifi_crm_rejected_records_total", reason="crm_server_error") == 1
    # a request of at most 10 is halved at most 4 times, 3 failures each, then 8 alone
    assert fake.statuses[500] <= 4 * 3 + 8

    # and the sink goes on with what comes next
    later = logins_of(3, prefix="afterchoke")
    await produce_logins(kafka_bootstrap, crm_topics.visits, later)
    await eventually(lambda: emails(later) <= fake.synced, what="later logins synced")


async def test_a_lone_contact_the_crm_answers_500_for_does_not_hold_back_later_logins(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # Alone in its batch, the contact gives no sign whether the CRM is down or chokes on it:
    # the logins read after it show the CRM up, and only then is it dead-lettered.
    alone = canonical_login(email="alone@example.com")
    fake = await hubspot_server(crash={"alone@example.com"})
    await produce_logins(kafka_bootstrap, crm_topics.visits, [alone], partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake, CRM_RECORD_MAX_ATTEMPTS="3"))
    await eventually(lambda: fake.statuses[500] >= 4, what="the contact retried alone")
    assert await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=1) == []

    later = logins_of(6, prefix="behindalone")
    await produce_logins(kafka_bootstrap, crm_topics.visits, later, partitions=1)
    await eventually(lambda: fake.synced == emails(later), what="the later logins synced")
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1, settle_s=1.0)
    assert [orjson.loads(letter.value)["user"]["email"] for letter in dead] == [
        alone["user"]["email"]
    ]
    await committed(kafka_bootstrap, sink, crm_topics)
    assert set(fake.upserts.values()) == {1}


async def test_a_contact_the_crm_answers_500_for_in_a_full_batch_does_not_hold_back_later_logins(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # The batch already holds CRM_MAX_POLL_RECORDS records, all but the failing contact
    # settled (no e-mail address): it must still read on, or nothing could ever show the CRM
    # up and the sink would retry that contact for ever.
    alone = canonical_login(email="full@example.com")
    settled_already = [canonical_login(email=None) for _ in range(4)]
    fake = await hubspot_server(crash={"full@example.com"})
    await produce_logins(
        kafka_bootstrap, crm_topics.visits, [alone, *settled_already], partitions=1
    )
    sink = await crm_sink.start(
        **hubspot_env(fake, CRM_MAX_POLL_RECORDS="5", CRM_RECORD_MAX_ATTEMPTS="2")
    )
    await eventually(lambda: fake.statuses[500] >= 3, what="the contact retried alone")

    later = logins_of(3, prefix="behindfull")
    await produce_logins(kafka_bootstrap, crm_topics.visits, later, partitions=1)
    await eventually(lambda: fake.synced == emails(later), what="the later logins synced")
    dead = await consume(kafka_bootstrap, crm_topics.dlq, count=1, settle_s=1.0)
    assert [orjson.loads(letter.value)["user"]["email"] for letter in dead] == [
        alone["user"]["email"]
    ]
    await committed(kafka_bootstrap, sink, crm_topics)
    assert await sink.metric("wifi_crm_skipped_records_total", reason="no_email") == 4


async def test_a_crm_answering_500_to_every_request_dead_letters_nothing(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # Split at the first 500, a lone contact given up after two if the CRM looked up: the
    # outage drives the request down to lone contacts that each failed twice, and still
    # none may be dead-lettered, since the CRM accepted nothing meanwhile.
    fake = await hubspot_server()
    fake.outage(3600, status=500)
    records = logins_of(4, prefix="down")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    sink = await crm_sink.start(
        **hubspot_env(fake, CRM_SPLIT_AFTER_SERVER_ERRORS="1", CRM_RECORD_MAX_ATTEMPTS="2")
    )
    # 4 -> 2 + 2 -> four lone contacts: 3 failed requests, then 2 failures of each contact
    await eventually(lambda: fake.statuses[500] >= 3 + 2 * 4, what="lone contacts failing")
    group = sink.env["CRM_GROUP_ID"]
    assert await uncommitted_records(kafka_bootstrap, group, [crm_topics.visits]) == 4
    assert await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=1) == []

    fake.outage(0)
    await eventually(lambda: fake.synced == emails(records), what="all synced once back")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert fake.batch_sizes == [1, 1, 1, 1]
    assert set(fake.upserts.values()) == {1}
    assert await consume(kafka_bootstrap, crm_topics.dlq, count=1, timeout_s=2) == []
    assert await sink.metric("wifi_crm_rejected_records_total") == 0
    assert await sink.metric("wifi_crm_retries_total", reason="server_error") == fake.statuses[500]


async def test_a_login_folded_into_another_users_upsert_is_marked_after_a_state_file_failure(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # Two users share an address: the batch, grown behind a contact the CRM fails on, sends
    # one upsert for the newer login, which settles both users. The save of a sync mark
    # then fails and the batch is handled again: planned again, it must still carry the
    # older login, or its user is never marked and their next login is sent again.
    poison = canonical_login(email="stuck@example.com")
    other = canonical_login(email="ahead@example.com")
    older = canonical_login(user_id=9101, email="shared@example.com", offset_ms=0)
    newer = canonical_login(user_id=9102, email="shared@example.com", offset_ms=HOUR_MS)
    hidden = canonical_login(email=None)
    fake = await hubspot_server(crash={"stuck@example.com"})
    await produce_logins(kafka_bootstrap, crm_topics.visits, [poison], partitions=1)
    sink = await crm_sink.start(
        **hubspot_env(fake, CRM_BATCH_SIZE="1", CRM_RECORD_MAX_ATTEMPTS="2")
    )
    await eventually(lambda: fake.statuses[500] >= 1, what="the contact failing alone")
    with closing(sqlite3.connect(sink.settings.state_db, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")
        await produce_logins(
            kafka_bootstrap, crm_topics.visits, [other, older, newer, hidden], partitions=1
        )

        async def save_failed() -> bool:
            return await sink.metric("wifi_crm_state_errors_total", operation="save_marks") >= 1

        await eventually(save_failed, timeout_s=60, what="a save of sync marks failing")
        lock.execute("ROLLBACK")
    await eventually(lambda: "shared@example.com" in fake.synced, what="the shared address")
    await committed(kafka_bootstrap, sink, crm_topics)

    # Within CRM_MIN_INTERVAL_S of the login already synced for that user: not sent.
    again = canonical_login(user_id=9101, email="shared@example.com", offset_ms=2 * HOUR_MS)
    await produce_logins(kafka_bootstrap, crm_topics.visits, [again], partitions=1)
    await committed(kafka_bootstrap, sink, crm_topics)
    assert fake.upserts["shared@example.com"] == 1, "a user's login was sent twice"
    assert await sink.metric("wifi_crm_skipped_records_total", reason="throttled") == 1
    assert await sink.metric("wifi_crm_skipped_records_total", reason="no_email") == 1


async def test_consumer_lag_reaches_0_on_a_transactional_topic_with_an_aborted_tail(
    kafka_bootstrap: str, crm_topics: CrmTopics, crm_sink: SinkRunner, hubspot_server: StartHubSpot
) -> None:
    # As the pipeline writes it: each transaction ends in a marker, which takes an offset of
    # its own, and an aborted transaction leaves its records and marker before the end.
    kept = logins_of(6, prefix="txkept")
    aborted = logins_of(2, prefix="txaborted")
    await produce_logins(kafka_bootstrap, crm_topics.visits, [])  # three partitions
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_topic("pipeline")
    )
    await producer.start()

    async def abort_after(records: list[dict[str, Any]]) -> None:
        async with producer.transaction():
            for partition, record in enumerate(records):  # partitions 0 and 1
                await producer.send(crm_topics.visits, orjson.dumps(record), partition=partition)
            await producer.flush()
            raise _Abort

    try:
        async with producer.transaction():
            for n, record in enumerate(kept):
                await producer.send(crm_topics.visits, orjson.dumps(record), partition=n % 3)
        with pytest.raises(_Abort):
            await abort_after(aborted)
    finally:
        await producer.stop()
    fake = await hubspot_server()
    sink = await crm_sink.start(**hubspot_env(fake))
    await eventually(lambda: fake.synced == emails(kept), what="the committed logins synced")
    partitions = await partitions_of(kafka_bootstrap, [crm_topics.visits, crm_topics.late])

    async def caught_up() -> bool:
        lag = await sink.lag_by_partition()
        return set(lag) == partitions and not any(lag.values())

    await eventually(caught_up, timeout_s=20, what="lag 0 on every input partition")
    assert fake.synced == emails(kept)


async def test_a_batch_the_crm_takes_slowly_request_by_request_keeps_the_consumer_in_its_group(
    kafka_bootstrap: str,
    crm_topics: CrmTopics,
    crm_sink: SinkRunner,
    hubspot_server: StartHubSpot,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # max.poll.interval cut from 300 s to 8 s: 30 requests of half a second each outlast it,
    # as 500 contacts sent one by one at 0.7 s outlast 300 s. A consumer that does not poll
    # meanwhile leaves its group, and another member would take its partitions.
    caplog.set_level(logging.INFO, logger="aiokafka.consumer.group_coordinator")
    slow_poll = functools.partial(AIOKafkaConsumer, max_poll_interval_ms=8000)
    monkeypatch.setattr(crm_service, "AIOKafkaConsumer", slow_poll)
    fake = await hubspot_server(delay_s=0.5)
    records = logins_of(30, prefix="oneatatime")
    await produce_logins(kafka_bootstrap, crm_topics.visits, records, partitions=1)
    sink = await crm_sink.start(**hubspot_env(fake, CRM_BATCH_SIZE="1"))
    await eventually(lambda: fake.synced == emails(records), timeout_s=60, what="all synced")
    await committed(kafka_bootstrap, sink, crm_topics)
    assert await sink.metric("wifi_crm_records_total") == len(records), "the batch was re-read"
    assert set(fake.upserts.values()) == {1}
    left = [r for r in caplog.records if "LeaveGroup" in r.getMessage()]
    assert not left, "the consumer left its group while the batch was delivered"
