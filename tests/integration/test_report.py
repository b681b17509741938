"""``wifi-bridge report`` on real stores: the numbers and the chart of a known stream."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError, Producer
from matplotlib import image

from bridge.kafka import TopicSpec, ensure_topics
from bridge.settings import KafkaSettings
from consumers.counts import TopicCount, count_topic
from consumers.report import Report, add_arguments, format_text, read_report, render_chart, run
from consumers.sinks.analytics.duckdb_store import DuckDBPort
from consumers.sinks.analytics.metrics import AnalyticsMetrics
from consumers.sinks.analytics.store import Position
from consumers.sinks.contacts import Contact
from consumers.sinks.outbox import CrmStore
from tests.fixtures.analytics import AnalyticsTarget
from tests.fixtures.kafka import unique_topic
from tests.integration.test_analytics_store import TOPIC, known_stream

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
# matplotlib's first two line colours: the busiest venue's line, then the next one's
FIRST_LINE, SECOND_LINE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def pixels_of(png: Path, colour: tuple[int, int, int]) -> np.ndarray:
    """Row and column of every pixel of the PNG drawn in ``colour`` (give or take shading)."""
    rgb = (image.imread(png)[..., :3] * 255).round().astype(int)
    return np.argwhere(np.abs(rgb - np.array(colour)).sum(axis=-1) <= 30)


def image_size(png: Path) -> tuple[int, int]:
    height, width = image.imread(png).shape[:2]
    return width, height


async def store_known_stream(target: AnalyticsTarget) -> None:
    """Write the known stream into ``target`` and close it (the report opens it itself)."""
    store = target.store()
    (claim,) = await store.claim(TOPIC, [0])
    await store.write(known_stream(), [Position(TOPIC, 0, claim.epoch, 7)])
    await target.close()


async def test_report_counts_a_known_stream_and_draws_its_chart(
    analytics_target: AnalyticsTarget, tmp_path: Path
) -> None:
    await store_known_stream(analytics_target)

    report = await read_report(analytics_target.url)

    assert (report.logins, report.late_logins, report.visitors) == (6, 1, 3)
    assert (report.visits, report.new_visits) == (4, 4)
    assert [(v.venue_id, v.logins, v.visitors, v.visits) for v in report.venues] == [
        ("4242", 5, 2, 3),
        ("7", 1, 1, 1),
    ]
    text = format_text(report)
    assert text.startswith("logins: 6 (1 late) from 2026-11-29")
    chart = tmp_path / "chart.png"
    render_chart(report, chart)
    assert chart.read_bytes()[:8] == PNG
    assert image_size(chart) == (1000, 500)  # 10 x 5 inches at 100 dpi
    busiest, other = pixels_of(chart, FIRST_LINE), pixels_of(chart, SECOND_LINE)
    assert len(busiest) > 300  # a line per venue, legend included
    assert len(other) > 300
    # venue 4242 peaks at 2 logins in a bucket, venue 7 at 1: its line reaches higher
    assert busiest[:, 0].min() < other[:, 0].min()

    empty = tmp_path / "empty.png"
    render_chart(Report(), empty)
    assert image_size(empty) == (1000, 500)
    assert len(pixels_of(empty, FIRST_LINE)) == len(pixels_of(empty, SECOND_LINE)) == 0


async def create_topics(bootstrap: str, *topics: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=3)
    await ensure_topics(kafka, [TopicSpec(topic) for topic in topics])


def produce(
    bootstrap: str, topic: str, event_ids: list[str | None], *, timestamp_ms: int = 0
) -> None:
    """One record per event id (``None``: a record without the header); all delivered."""
    producer = Producer({"bootstrap.servers": bootstrap})
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(error)

    for event_id in event_ids:
        headers: dict[str, str | bytes | None] = {} if event_id is None else {"event-id": event_id}
        producer.produce(
            topic, b"{}", headers=headers, timestamp=timestamp_ms, on_delivery=delivered
        )
    assert producer.flush(30) == 0
    assert failures == []


@pytest.mark.kafka
def test_topic_counts_are_committed_records_only_and_can_start_at_a_time(
    kafka_bootstrap: str,
) -> None:
    client = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_topic("count")
    assert count_topic(client, topic) == TopicCount()  # no such topic yet
    asyncio.run(create_topics(kafka_bootstrap, topic))
    assert count_topic(client, topic) == TopicCount()  # three empty partitions
    hour_ms = 3_600_000
    an_hour_ago_ms = int(time.time() * 1000) - hour_ms
    produce(kafka_bootstrap, topic, ["a", "b", "a", None], timestamp_ms=an_hour_ago_ms - hour_ms)
    aborted = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": topic})
    aborted.init_transactions(30)
    aborted.begin_transaction()
    aborted.produce(topic, b"{}", headers=[("event-id", b"c")])
    aborted.flush(30)
    aborted.abort_transaction(30)

    counted = count_topic(client, topic)

    assert (counted.records, counted.with_event_id, counted.redeliveries) == (4, 3, 1)
    produce(kafka_bootstrap, topic, ["d"])  # stamped now
    since = count_topic(client, topic, since_ms=an_hour_ago_ms)
    assert (since.records, since.redeliveries) == (1, 0)


@pytest.mark.kafka
async def test_report_adds_posts_redeliveries_dead_letters_and_crm_upserts_when_given_them(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'analytics.duckdb'}")
    await store_known_stream(target)
    raw, dlq = unique_topic("raw"), unique_topic("dlq")
    await create_topics(kafka_bootstrap, raw, dlq)
    produce(kafka_bootstrap, raw, ["u1-a", "u2-a", "u1-a2", "u1-a2", "u3-a", "u1-b", "u2-a2"])
    produce(kafka_bootstrap, dlq, ["x", None])
    crm = CrmStore(tmp_path / "crm-sink.db")
    crm.store_outbox(
        [
            Contact(email, None, None, None, "4242", None, 0, None, event_id)
            for email, event_id in (("a@x.test", "e1"), ("b@x.test", "e2"), ("a@x.test", "e3"))
        ]
    )
    crm.close()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--analytics-url", target.url, "--crm-state-db", str(tmp_path / "crm-sink.db")),
            *("--kafka-bootstrap-servers", kafka_bootstrap, "--raw-topic", raw),
            *("--dlq-topic", dlq),
        ]
    )

    code = await asyncio.to_thread(run, args, {})

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("logins: 6 (1 late)")
    assert lines[3:6] == [
        f"posts accepted: 7 (records in {raw}), redeliveries among them: 1",
        f"dead letters: 2 (records in {dlq})",
        "CRM upserts: 3 (outbox rows; 2 contacts)",
    ]
    args.json = True
    assert await asyncio.to_thread(run, args, {}) == 0
    numbers = orjson.loads(capsys.readouterr().out)
    assert (numbers["raw_records"], numbers["redeliveries"], numbers["dead_letters"]) == (7, 1, 2)
    assert (numbers["crm_upserts"], numbers["crm_contacts"]) == (3, 2)


async def test_report_counts_only_what_it_is_given_and_never_guesses_a_missing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = AnalyticsTarget("duckdb", f"duckdb:///{tmp_path / 'analytics.duckdb'}")
    await store_known_stream(target)
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    assert await asyncio.to_thread(run, parser.parse_args([]), {"ANALYTICS_URL": target.url}) == 0
    out = capsys.readouterr().out
    assert out.startswith("logins: 6 (1 late)")
    for counted_elsewhere in ("posts accepted", "dead letters", "CRM"):
        assert counted_elsewhere not in out

    missing = tmp_path / "crm-sink.db"
    environ = {"ANALYTICS_URL": target.url, "CRM_STATE_DB": str(missing)}
    assert await asyncio.to_thread(run, parser.parse_args([]), environ) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"CRM_STATE_DB names {missing}, which does not exist yet" in captured.err


def test_report_command_prints_the_numbers_and_names_a_missing_store(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "bridge", "report", "--analytics-url", f"duckdb:///{tmp_path}/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "does not exist yet" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "bridge", "report", "--analytics-url", "mysql://db/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "ANALYTICS_URL" in bad.stderr


async def test_an_idle_duckdb_writer_lets_readers_in(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    writer = DuckDBPort(path, idle_release_s=0.3)
    await writer.connect()
    await writer.execute("CREATE TABLE t (n INTEGER)")
    async with writer.transaction():
        await writer.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(duckdb.Error):  # held right after a batch
        duckdb.connect(str(path), read_only=True).close()

    await asyncio.sleep(0.8)  # idle: released

    with duckdb.connect(str(path), read_only=True) as reader:
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (1,)
    async with writer.transaction():  # and taken again for the next batch
        await writer.execute("INSERT INTO t VALUES (2)")
    assert await writer.fetch("SELECT count(*) FROM t") == [(2,)]
    await writer.close()


async def test_a_busy_duckdb_writer_hands_the_file_to_a_waiting_reader(tmp_path: Path) -> None:
    # A batch every 20 ms never leaves the writer idle for its 1 s: without the hand-over, the
    # reader's ten seconds of retries would all find the file locked.
    path = tmp_path / "a.duckdb"
    metrics = AnalyticsMetrics()
    writer = DuckDBPort(path, idle_release_s=1.0, on_hand_over=metrics.hand_overs.inc)
    await writer.connect()
    await writer.execute("CREATE TABLE t (n INTEGER)")
    written = 0
    stop = asyncio.Event()

    async def write_steadily() -> None:
        nonlocal written
        while not stop.is_set():
            async with writer.transaction():
                await writer.execute("INSERT INTO t VALUES ($1)", written)
            written += 1
            await asyncio.sleep(0.02)

    writing = asyncio.create_task(write_steadily())
    await asyncio.sleep(0.3)
    read = (
        "import asyncio, sys\n"
        "from consumers.report import fetch\n"
        "print(asyncio.run(fetch(sys.argv[1], 'SELECT count(*) FROM t'))[0][0])\n"
    )
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        read,
        f"duckdb:///{path}",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(reader.communicate(), timeout=60)
    written_when_read = written
    await asyncio.sleep(0.5)
    # Stopped between batches: a cancel could land while DuckDB commits on its thread, and the
    # row would be stored without being counted here.
    stop.set()
    await asyncio.wait_for(writing, timeout=30)

    assert reader.returncode == 0, err.decode()
    assert 0 < int(out) <= written_when_read  # the reader saw committed batches
    assert writer.hand_overs >= 1
    exported = metrics.registry.get_sample_value("wifi_sink_analytics_file_hand_overs_total")
    assert exported == writer.hand_overs  # what the sink's /metrics shows
    assert written > written_when_read  # and the writer took the file back and went on
    assert await writer.fetch("SELECT count(*) FROM t") == [(written,)]
    await writer.close()
