"""``wifi-bridge spool status|drain`` on a spool left behind, damaged records included."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.spool import Spool, SpoolRecord, decode_frame, read_stats
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
