"""``wifi-bridge spool status|drain`` on a spool left behind, damaged records included."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from bridge import spool_cli
from bridge.errors import PublishError
from bridge.kafka import TopicSpec, ensure_topics
from bridge.metrics import BridgeMetrics
from bridge.publisher import Headers
from bridge.rdkafka import RdKafkaPublisher
from bridge.settings import KafkaSettings
from bridge.spool import Spool, SpooledEntry, SpoolRecord, decode_frame, read_stats
from bridge.spool_cli import drain
from tests.fixtures.kafka import consume, unique_topic

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


async def make_spool(directory: Path, topic: str, count: int) -> None:
    async with Spool(directory=directory, segment_bytes=4096, max_bytes=1 << 20) as spool:
        for n in range(count):
            await spool.append(
                SpoolRecord(
                    topic=topic,
                    key=f"user-{n}".encode(),
                    value=b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200),
                    headers=[("event-id", f"event-{n:04d}".encode())],
                    spooled_at_ms=1_700_000_000_000 + n,
                )
            )


def wifi_bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


async def test_drain_publishes_a_left_behind_spool_and_sets_damaged_records_aside(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("drained")
    directory = tmp_path / "left-behind"
    await make_spool(directory, topic, 40)
    first_segment = sorted(directory.glob("*.seg"))[0]
    data = bytearray(first_segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle of a segment
    first_segment.write_bytes(bytes(data))
    last_segment = sorted(directory.glob("*.seg"))[-1]
    last_segment.write_bytes(last_segment.read_bytes()[:-7])  # a torn last record

    status = wifi_bridge("spool", "status", str(directory))
    assert status.returncode == 0, status.stderr
    assert "records waiting" in status.stdout

    drained = await asyncio.to_thread(
        wifi_bridge, "spool", "drain", str(directory), "--kafka-bootstrap-servers", kafka_bootstrap
    )
    assert drained.returncode == 0, drained.stderr
    assert "drained" in drained.stderr

    records = await consume(kafka_bootstrap, topic, count=38, settle_s=1.0)
    ids = {dict(r.headers)["event-id"] for r in records}
    assert len(ids) == len(records), "a record was published twice"
    assert 36 <= len(ids) <= 38  # one record lost to the flipped byte, one to the torn tail
    stats = read_stats(directory)
    assert stats.records == 0
    assert list((directory / "corrupt").iterdir()), "damaged bytes were not set aside"


def test_status_of_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = wifi_bridge("spool", "status", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "nope" in result.stderr


async def test_drain_sets_a_record_kafka_refuses_aside_and_publishes_the_rest(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("drained")
    directory = tmp_path / "left-behind"
    values = [b'{"n":0}', b'{"pad":"' + b"x" * 1_000_000 + b'"}', b'{"n":2}']
    async with Spool(directory=directory) as spool:
        for value in values:
            record = SpoolRecord(topic=topic, key=b"k", value=value, headers=[], spooled_at_ms=1)
            await spool.append(record)

    drained = await asyncio.to_thread(
        wifi_bridge, "spool", "drain", str(directory), "--kafka-bootstrap-servers", kafka_bootstrap
    )
    assert drained.returncode == 0, drained.stderr
    assert "MSG_SIZE_TOO_LARGE" in drained.stderr
    assert "1 refused set aside" in drained.stderr
    records = await consume(kafka_bootstrap, topic, count=2, settle_s=1.0)
    assert [r.value for r in records] == [values[0], values[2]]  # one key: in order
    (saved,) = (directory / "corrupt").iterdir()
    assert decode_frame(saved.read_bytes()).value == values[1]
    assert read_stats(directory).records == 0


class WatchedPublisher:
    """The bridge's librdkafka producer, noting what it is asked to publish and how much at once."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._inner = RdKafkaPublisher(settings=kafka, metrics=BridgeMetrics())
        self.published: list[bytes] = []
        self.in_flight = self.most_in_flight = 0

    @property
    def connected(self) -> bool:
        return self._inner.connected

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self, *, timeout_s: float = 30.0) -> None:
        await self._inner.stop(timeout_s=timeout_s)

    async def ping(self, *, timeout_s: float) -> bool:
        return await self._inner.ping(timeout_s=timeout_s)

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        self.published.append(value)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self._inner.publish(
                topic, key=key, value=value, headers=headers, timeout_s=timeout_s
            )
        finally:
            self.in_flight -= 1


@pytest.fixture
def acknowledged(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """The values of the records of each ``Spool.acknowledge`` call, in the order given."""
    calls: list[list[bytes]] = []
    original = Spool.acknowledge

    async def acknowledge(self: Spool, entries: Iterable[SpooledEntry]) -> None:
        entries = list(entries)
        calls.append([e.record.value for e in entries])
        await original(self, entries)

    monkeypatch.setattr(Spool, "acknowledge", acknowledge)
    return calls


async def test_drain_publishes_a_batch_at_once_and_acknowledges_it_in_order(
    kafka_bootstrap: str, tmp_path: Path, acknowledged: list[list[bytes]]
) -> None:
    topic = unique_topic("drained")
    directory = tmp_path / "left-behind"
    await make_spool(directory, topic, 60)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    publisher, out = WatchedPublisher(kafka), io.StringIO()

    assert await drain(directory, kafka, batch_records=20, out=out, publisher=publisher) == 0

    assert publisher.most_in_flight == 20  # a whole batch waits for Kafka at once
    assert len(publisher.published) == 60
    values = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200) for n in range(60)]
    assert acknowledged == [values[0:20], values[20:40], values[40:60]]
    records = await consume(kafka_bootstrap, topic, count=60, settle_s=1.0)
    assert sorted(r.value for r in records) == sorted(values)
    assert "drained 60 records" in out.getvalue()
    assert read_stats(directory).records == 0


async def test_drain_sends_a_batch_kafka_refuses_again_one_record_at_a_time(
    kafka_bootstrap: str, tmp_path: Path, acknowledged: list[list[bytes]]
) -> None:
    # The broker refuses a batch larger than the topic's max.message.bytes with every record
    # in it: only the big one is refused when each is sent alone.
    topic = unique_topic("drained-small")
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    await ensure_topics(kafka, [TopicSpec(topic, configs={"max.message.bytes": "100000"})])
    directory = tmp_path / "left-behind"
    small = [b'{"n":%d}' % n for n in range(10)]
    big = b'{"pad":"' + b"x" * 200_000 + b'"}'
    values = [*small[:5], big, *small[5:]]
    async with Spool(directory=directory, fsync=False) as spool:
        for value in values:
            record = SpoolRecord(topic=topic, key=b"k", value=value, headers=[], spooled_at_ms=1)
            await spool.append(record)
    publisher, out = WatchedPublisher(kafka), io.StringIO()

    assert await drain(directory, kafka, out=out, publisher=publisher) == 0

    assert publisher.published.count(big) == 2  # with its batch, then alone
    assert "1 refused set aside" in out.getvalue()
    # Only what Kafka took is acknowledged as delivered, in the order read; the refused
    # record afterwards, when it is set aside.
    assert acknowledged == [small, [big]]
    records = await consume(kafka_bootstrap, topic, count=10, settle_s=1.0)
    assert sorted(r.value for r in records) == sorted(small)  # each once
    (saved,) = (directory / "corrupt").iterdir()
    assert decode_frame(saved.read_bytes()).value == big
    assert read_stats(directory).records == 0


class FailingFor(WatchedPublisher):
    """Fails a record's first ``times`` publishes, as on a timeout (the others go through)."""

    def __init__(self, kafka: KafkaSettings, value: bytes, *, times: int) -> None:
        super().__init__(kafka)
        self.value, self.times = value, times

    async def publish(
        self, topic: str, *, key: bytes, value: bytes, headers: Headers, timeout_s: float
    ) -> None:
        if value == self.value and self.times > 0:
            self.times -= 1
            self.published.append(value)
            raise PublishError("Kafka did not acknowledge within the budget")
        await super().publish(topic, key=key, value=value, headers=headers, timeout_s=timeout_s)


async def test_a_batch_that_fails_is_tried_again_and_sends_only_what_kafka_did_not_take(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_cli, "_RETRY_DELAYS_S", (0.01, 0.01))
    topic = unique_topic("drained-retry")
    directory = tmp_path / "left-behind"
    await make_spool(directory, topic, 30)
    values = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200) for n in range(30)]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    publisher, out = FailingFor(kafka, values[3], times=2), io.StringIO()

    assert await drain(directory, kafka, batch_records=10, out=out, publisher=publisher) == 0

    assert out.getvalue().count("trying again") == 2
    assert sorted(publisher.published) == sorted([*values, values[3], values[3]])  # no resend
    records = await consume(kafka_bootstrap, topic, count=30, settle_s=1.0)
    assert sorted(r.value for r in records) == sorted(values)
    assert read_stats(directory).records == 0


async def test_a_batch_that_keeps_failing_stops_the_run_saying_what_is_left(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_cli, "_RETRY_DELAYS_S", (0.01,))
    topic = unique_topic("drained-stuck")
    directory = tmp_path / "left-behind"
    await make_spool(directory, topic, 10)
    values = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200) for n in range(10)]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    publisher, out = FailingFor(kafka, values[0], times=99), io.StringIO()

    assert await drain(directory, kafka, out=out, publisher=publisher) == 1

    assert "stopped: Kafka did not acknowledge within the budget; 9 records delivered" in (
        out.getvalue()
    )
    assert read_stats(directory).records == 10  # nothing committed past the first record


async def test_drain_refuses_a_spool_a_bridge_holds_before_connecting_to_kafka(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "held"
    async with Spool(directory=directory, fsync=False):  # as a running bridge holds it
        drained = await asyncio.to_thread(
            wifi_bridge,
            "spool",
            "drain",
            str(directory),
            "--kafka-bootstrap-servers",
            "127.0.0.1:1",
        )
    assert drained.returncode == 1
    assert "in use by another process" in drained.stderr
    assert "Kafka" not in drained.stderr
