"""DurablePublisher's decisions, with the real spool and a scripted producer behind the seam."""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.durable import DurablePublisher
from bridge.errors import BatchRefused, PublishError, RecordTooLarge
from bridge.metrics import BridgeMetrics
from bridge.publisher import Headers, Publisher
from bridge.rdkafka import producer_config
from bridge.settings import KafkaSettings
from bridge.spool import Spool, decode_frame


class ScriptedProducer:
    """Acknowledges, or fails every publish as a producer does when it is wedged."""

    def __init__(self, *, fails: bool, broker_answers: bool = True) -> None:
        self.fails = fails
        self.broker_answers = broker_answers
        self.published: list[bytes] = []
        self.stopped = False

    @property
    def connected(self) -> bool:
        return not self.stopped

    async def start(self) -> None:
        return None

    async def stop(self, *, timeout_s: float = 30.0) -> None:
        self.stopped = True

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        if self.fails:
            raise PublishError("Kafka did not acknowledge within the budget")
        self.published.append(value)

    async def ping(self, *, timeout_s: float) -> bool:
        return self.broker_answers


async def settle(condition: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def durable(
    tmp_path: Path,
    producers: list[ScriptedProducer],
    *,
    ensure_topics: Callable[[list[str]], Awaitable[None]] | None = None,
) -> tuple[DurablePublisher, BridgeMetrics]:
    queue = list(producers)

    async def connect() -> Publisher:
        return queue.pop(0)

    metrics = BridgeMetrics()
    spool = Spool(
        directory=tmp_path / "spool", fsync=False, max_bytes=1 << 20, segment_bytes=1 << 16
    )
    publisher = DurablePublisher(
        connect=connect, spool=spool, metrics=metrics, ensure_topics=ensure_topics
    )
    return publisher, metrics


def sample(metrics: BridgeMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def publish(publisher: DurablePublisher, n: int) -> None:
    await publisher.publish("raw", key=b"k", value=b"%d" % n, headers=[], timeout_s=0.1)


async def leave_spooled(tmp_path: Path, n: int, *, topic: str = "raw") -> None:
    """A bridge that spooled records 0 to n-1 while Kafka was down, then stopped."""
    first, _ = durable(tmp_path, [ScriptedProducer(fails=True, broker_answers=False)])
    await first.start()
    for i in range(n):
        await first.publish(topic, key=b"k", value=b"%d" % i, headers=[], timeout_s=0.1)
    await first.stop()


async def test_a_producer_failing_while_its_broker_answers_is_rebuilt_and_the_spool_drains_in_order(
    tmp_path: Path,
) -> None:
    wedged, healthy = ScriptedProducer(fails=True), ScriptedProducer(fails=False)
    publisher, metrics = durable(tmp_path, [wedged, healthy])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        for n in range(10):
            await publish(publisher, n)  # never raises: what Kafka did not take, the spool did
        await settle(lambda: healthy.published == [b"%d" % n for n in range(10)])
        assert wedged.stopped
        assert sample(metrics, "wifi_bridge_producer_rebuilds_total") == 1
        assert sample(metrics, "wifi_bridge_spooled_records_total") == 10
    finally:
        await publisher.stop()


async def test_a_producer_whose_broker_is_down_is_kept_and_records_wait_in_the_spool(
    tmp_path: Path,
) -> None:
    down = ScriptedProducer(fails=True, broker_answers=False)
    publisher, metrics = durable(tmp_path, [down])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        for n in range(5):
            await publish(publisher, n)
        await asyncio.sleep(0.3)
        assert not down.stopped
        assert sample(metrics, "wifi_bridge_producer_rebuilds_total") == 0
        assert sample(metrics, "wifi_bridge_spool_records") == 5
        down.fails, down.broker_answers = False, True  # the broker is back
        await settle(lambda: len(down.published) == 5, timeout_s=20)
    finally:
        await publisher.stop()


async def test_records_left_in_the_spool_at_start_are_drained_before_new_ones(
    tmp_path: Path,
) -> None:
    await leave_spooled(tmp_path, 3)

    healthy = ScriptedProducer(fails=False)
    second, _ = durable(tmp_path, [healthy])
    await second.start()
    try:
        await settle(lambda: second.connected)
        await publish(second, 3)  # queues behind the backlog
        await settle(lambda: len(healthy.published) == 4)
        assert healthy.published == [b"0", b"1", b"2", b"3"]
    finally:
        await second.stop()


class FailingOnce(ScriptedProducer):
    """Fails the first publish of one value (its batch's neighbours are delivered)."""

    def __init__(self, value: bytes) -> None:
        super().__init__(fails=False)
        self.value: bytes | None = value

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        if value == self.value:
            self.value = None
            raise PublishError("Kafka did not acknowledge within the budget")
        await super().publish(topic, key=key, value=value, headers=headers, timeout_s=timeout_s)


async def test_a_failed_drain_sends_again_only_what_kafka_did_not_take(tmp_path: Path) -> None:
    await leave_spooled(tmp_path, 5)
    flaky = FailingOnce(b"1")
    second, metrics = durable(tmp_path, [flaky])
    await second.start()
    try:
        await settle(lambda: b"1" in flaky.published, timeout_s=20)
        await settle(lambda: sample(metrics, "wifi_bridge_spool_records") == 0)
        assert sorted(flaky.published) == [b"0", b"1", b"2", b"3", b"4"]  # each once
    finally:
        await second.stop()


async def test_an_outage_logs_one_spooling_warning_however_many_requests_it_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = ScriptedProducer(fails=True, broker_answers=False)
    publisher, _ = durable(tmp_path, [down])
    await publisher.start()

    def warnings() -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith("spooling records"))

    try:
        await settle(lambda: publisher.connected)
        with caplog.at_level("WARNING", logger="bridge.durable"):
            # requests in flight together when Kafka goes: each fails before any is spooled
            await asyncio.gather(*(publish(publisher, n) for n in range(20)))
            assert warnings() == 1
            down.fails, down.broker_answers = False, True
            await settle(lambda: len(down.published) == 20, timeout_s=20)
            await settle(lambda: not publisher._backlog)  # the drainer caught up
            await publish(publisher, 20)  # straight to Kafka once the spool drained
            down.fails = True  # the next outage says so again
            await publish(publisher, 21)
            assert warnings() == 2
    finally:
        await publisher.stop()


def test_drain_batch_must_be_positive(tmp_path: Path) -> None:
    spool = Spool(directory=tmp_path / "s", fsync=False)

    async def connect() -> Publisher:
        raise AssertionError

    with pytest.raises(ValueError, match="drain_batch_records"):
        DurablePublisher(
            connect=connect, spool=spool, metrics=BridgeMetrics(), drain_batch_records=0
        )


async def test_metrics_say_whether_kafka_is_connected_without_a_readiness_probe(
    tmp_path: Path,
) -> None:
    """The chart never probes /readyz; its Kafka alert reads wifi_bridge_kafka_ready."""
    from aiohttp import web
    from aiohttp.test_utils import RawTestServer, TestClient

    from bridge.settings import BridgeSettings
    from bridge.web_app import Receiver

    producer = ScriptedProducer(fails=False)
    publisher, metrics = durable(tmp_path, [producer])
    await publisher.start()
    receiver = Receiver(
        settings=BridgeSettings.load(None, {}), publisher=publisher, metrics=metrics
    )
    try:
        client: TestClient[web.BaseRequest, None]
        async with TestClient(RawTestServer(receiver.handle)) as client:
            await settle(lambda: publisher.connected)
            text = await (await client.get("/metrics")).text()
            assert "wifi_bridge_kafka_ready 1.0" in text
            producer.stopped = True  # the producer is gone: no longer connected
            text = await (await client.get("/metrics")).text()
            assert "wifi_bridge_kafka_ready 0.0" in text
    finally:
        await publisher.stop()


async def test_kafka_going_away_while_running_is_reported_until_it_takes_records_again(
    tmp_path: Path,
) -> None:
    # A broker outage is no fatal error: the producer stays, and only its failures tell.
    producer = ScriptedProducer(fails=False)
    publisher, _ = durable(tmp_path, [producer])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        producer.fails, producer.broker_answers = True, False  # the outage begins
        await publish(publisher, 0)  # spooled
        assert not publisher.connected
        producer.fails, producer.broker_answers = False, True
        await settle(lambda: producer.published == [b"0"], timeout_s=20)  # drained
        assert publisher.connected
    finally:
        await publisher.stop()


async def test_an_outage_without_traffic_is_seen_by_a_check_and_so_is_the_recovery(
    tmp_path: Path,
) -> None:
    producer = ScriptedProducer(fails=False)
    publisher, _ = durable(tmp_path, [producer])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        producer.broker_answers = False
        await publisher.ping(timeout_s=1)  # a readiness probe, or the bridge's own check
        assert not publisher.connected
        producer.broker_answers = True  # no request, nothing spooled: only a check can tell
        await settle(lambda: publisher.connected, timeout_s=15)
    finally:
        await publisher.stop()


class SizeLimitedProducer(ScriptedProducer):
    """Refuses a record over ``limit_bytes`` as librdkafka does: at once when it is produced
    (``local``), or as the broker does, with every record that shared its batch (records
    published within the same 10 ms)."""

    def __init__(self, *, limit_bytes: int, local: bool) -> None:
        super().__init__(fails=False)
        self.limit_bytes = limit_bytes
        self.local = local
        self._batch: list[bytes] | None = None

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        if self.fails:
            raise PublishError("Kafka did not acknowledge within the budget")
        if self.local and len(value) > self.limit_bytes:
            raise RecordTooLarge("Kafka refuses a record this large: MSG_SIZE_TOO_LARGE")
        batch = self._batch
        if batch is None:
            batch = self._batch = []
        batch.append(value)
        await asyncio.sleep(0.01)  # the batch fills, then goes
        self._batch = None
        if any(len(v) > self.limit_bytes for v in batch):
            refusal = RecordTooLarge("Kafka refuses a record this large: MSG_SIZE_TOO_LARGE")
            raise BatchRefused("Kafka refused the batch: MSG_SIZE_TOO_LARGE", refusal=refusal)
        self.published.append(value)


async def test_a_record_kafka_refuses_alone_is_answered_with_the_refusal_and_never_spooled(
    tmp_path: Path,
) -> None:
    producer = SizeLimitedProducer(limit_bytes=100, local=True)
    publisher, metrics = durable(tmp_path, [producer])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        with pytest.raises(RecordTooLarge):
            await publisher.publish("raw", key=b"k", value=b"x" * 101, headers=[], timeout_s=1)
        assert sample(metrics, "wifi_bridge_spool_records") == 0
        await publish(publisher, 1)  # Kafka is fine: the next record goes straight in
        assert producer.published == [b"1"]
        assert sample(metrics, "wifi_bridge_spooled_records_total") == 0
    finally:
        await publisher.stop()


@pytest.mark.parametrize("local", [True, False], ids=["refused-at-once", "batch-refused"])
async def test_a_spooled_record_kafka_refuses_is_set_aside_and_the_drain_goes_on(
    tmp_path: Path, local: bool
) -> None:
    producer = SizeLimitedProducer(limit_bytes=100, local=local)
    producer.fails = True  # Kafka is down while the records arrive: all of them are spooled
    publisher, metrics = durable(tmp_path, [producer])
    await publisher.start()
    values = [b"0", b"1", b"x" * 101, b"3", b"4"]
    try:
        await settle(lambda: publisher.connected)
        for value in values:
            await publisher.publish("raw", key=b"k", value=value, headers=[], timeout_s=0.1)
        producer.fails = False
        reason = {"reason": "record_too_large"}
        await settle(lambda: sample(metrics, "wifi_bridge_spool_refused_records_total", reason))
        await settle(lambda: sample(metrics, "wifi_bridge_spool_records") == 0)
        assert producer.published == [b"0", b"1", b"3", b"4"]
        assert sample(metrics, "wifi_bridge_spool_refused_records_total", reason) == 1
        (saved,) = (tmp_path / "spool" / "corrupt").iterdir()
        assert saved.name.endswith("_record_too_large.bin")
        assert decode_frame(saved.read_bytes()).value == b"x" * 101
        await publish(publisher, 5)  # the spool caught up: straight to Kafka again
        assert producer.published[-1] == b"5"
    finally:
        await publisher.stop()


async def test_a_spool_that_cannot_be_read_for_a_while_is_drained_once_it_can(
    tmp_path: Path,
) -> None:
    producer = ScriptedProducer(fails=True, broker_answers=False)
    publisher, metrics = durable(tmp_path, [producer])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        for n in range(3):
            await publish(publisher, n)
        # The segment is unreadable: in its place a directory, which read() answers with EISDIR.
        # Kafka stays down until a read has failed, so a read that began before the swap
        # cannot deliver what it got; every read after that failure meets the directory.
        (segment,) = (tmp_path / "spool").glob("*.seg")
        moved = segment.rename(tmp_path / "moved.seg")
        segment.mkdir()
        errors = {"error": "spool_unavailable"}
        await settle(lambda: sample(metrics, "wifi_bridge_spool_drain_errors_total", errors))
        producer.fails, producer.broker_answers = False, True
        failed = sample(metrics, "wifi_bridge_spool_drain_errors_total", errors) or 0
        await settle(
            lambda: (sample(metrics, "wifi_bridge_spool_drain_errors_total", errors) or 0) > failed,
            timeout_s=30,
        )
        assert producer.published == []
        # Kafka is back; the records wait for the disk, not for Kafka, and the check says so.
        await settle(lambda: publisher.connected, timeout_s=15)
        segment.rmdir()
        moved.rename(segment)
        await settle(lambda: producer.published == [b"0", b"1", b"2"], timeout_s=20)
        await settle(lambda: sample(metrics, "wifi_bridge_spool_records") == 0)
    finally:
        await publisher.stop()


class SlowToAnswer(ScriptedProducer):
    """A producer whose broker does not answer, and whose ping waits out its timeout on a
    worker thread, as a metadata request to a broker that is gone does."""

    def __init__(self) -> None:
        super().__init__(fails=True, broker_answers=False)
        self.pinging = 0
        self.most_pinging = 0

    async def ping(self, *, timeout_s: float) -> bool:
        self.pinging += 1
        self.most_pinging = max(self.most_pinging, self.pinging)
        try:
            await asyncio.to_thread(time.sleep, 0.5)
        finally:
            self.pinging -= 1
        return False


async def test_requests_failing_together_start_one_broker_check_and_are_spooled_at_once(
    tmp_path: Path,
) -> None:
    down = SlowToAnswer()
    publisher, metrics = durable(tmp_path, [down])
    await publisher.start()
    try:
        await settle(lambda: publisher.connected)
        started = time.monotonic()
        # Kafka just went away: every request in flight fails at the same moment.
        await asyncio.gather(*(publish(publisher, n) for n in range(64)))
        spooled_s = time.monotonic() - started
        assert sample(metrics, "wifi_bridge_spool_records") == 64
        assert down.most_pinging == 1
        # Each answered once written, not behind 62 checks holding the worker threads.
        assert spooled_s < 5, spooled_s
    finally:
        await publisher.stop()


async def test_a_spool_segment_unreadable_at_start_is_drained_once_it_can_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await leave_spooled(tmp_path, 3)
    (segment,) = (tmp_path / "spool").glob("*.seg")
    real_pread = os.pread

    def pread(fd: int, *args: Any) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(segment.name):
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, *args)

    monkeypatch.setattr(os, "pread", pread)
    healthy = ScriptedProducer(fails=False)
    second, metrics = durable(tmp_path, [healthy])
    await second.start()  # its records cannot be counted: still, there is a backlog
    try:
        assert sample(metrics, "wifi_bridge_spool_unreadable_segments") == 1
        errors = {"error": "spool_unavailable"}
        await settle(lambda: sample(metrics, "wifi_bridge_spool_drain_errors_total", errors))
        assert healthy.published == []
        monkeypatch.undo()
        await settle(lambda: healthy.published == [b"0", b"1", b"2"], timeout_s=30)
        assert sample(metrics, "wifi_bridge_spool_unreadable_segments") == 0
    finally:
        await second.stop()


def test_the_producer_gives_a_record_up_before_the_drainer_sends_it_again() -> None:
    """Or every try of a failed drain leaves its copies queued in librdkafka, to be delivered
    all at once when the brokers come back."""
    drain_timeout_s = inspect.signature(DurablePublisher).parameters["drain_timeout_s"].default
    config = producer_config(KafkaSettings(), linger_ms=1)
    assert config["message.timeout.ms"] < drain_timeout_s * 1000


class KnownTopicsOnly(ScriptedProducer):
    """Publishes only to topics that exist, as a broker without auto-creation does."""

    def __init__(self, topics: set[str]) -> None:
        super().__init__(fails=False)
        self.topics = topics

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        if topic not in self.topics:
            raise PublishError("Kafka did not acknowledge within the budget")
        self.published.append(value)


async def test_records_spooled_for_a_topic_kafka_does_not_have_get_it_created_and_drain(
    tmp_path: Path,
) -> None:
    # Spooled under an earlier BRIDGE_TOPIC_RAW, say: connecting creates only today's topics.
    await leave_spooled(tmp_path, 1, topic="raw.old")

    kafka = KnownTopicsOnly({"raw"})
    created: list[list[str]] = []

    async def ensure_topics(names: list[str]) -> None:
        created.append(names)
        kafka.topics.update(names)

    second, _ = durable(tmp_path, [kafka], ensure_topics=ensure_topics)
    await second.start()
    try:
        await settle(lambda: kafka.published == [b"0"])
        assert created == [["raw.old"]]
    finally:
        await second.stop()
