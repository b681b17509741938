"""``wifi-bridge report`` on real stores: the numbers and the chart of a known stream."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from consumers.report import format_text, read_report, render_chart
from consumers.sinks.analytics.duckdb_store import DuckDBPort
from consumers.sinks.analytics.store import Position
from tests.fixtures.analytics import AnalyticsTarget
from tests.integration.test_analytics_store import TOPIC, known_stream

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


async def test_report_counts_a_known_stream_and_draws_its_chart(
    analytics_target: AnalyticsTarget, tmp_path: Path
) -> None:
    store = analytics_target.store()
    (claim,) = await store.claim(TOPIC, [0])
    await store.write(known_stream(), [Position(TOPIC, 0, claim.epoch, 7)])
    await analytics_target.close()  # the report opens the store itself

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
