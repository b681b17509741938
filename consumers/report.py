"""``wifi-bridge report``: the analytics store's numbers, and logins per venue over time as PNG.

Reads the tables the analytics sink writes (``ANALYTICS_URL``: PostgreSQL or the DuckDB file);
writes nothing. A DuckDB file is opened read-only, briefly, and the open is retried while the
sink holds it for a batch.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from consumers.sinks.analytics.settings import parse_store_url
from consumers.sinks.analytics.store import SqlPort

__all__ = ["Report", "VenueLine", "fetch", "format_text", "read_report", "render_chart"]

_MAX_BUCKETS = 60
_MIN_BUCKET_S = 10
_CHART_WINDOW = timedelta(days=1)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class VenueLine:
    venue_id: str
    venue_name: str | None
    logins: int
    visitors: int
    visits: int


@dataclass(slots=True)
class Report:
    logins: int = 0
    late_logins: int = 0
    visitors: int = 0
    visits: int = 0
    new_visits: int = 0
    first_login: datetime | None = None
    last_login: datetime | None = None
    venues: list[VenueLine] = field(default_factory=list)
    by_second: dict[str, dict[datetime, int]] = field(default_factory=dict)
    """Logins per venue id and UTC second, over the day before the latest login."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "logins": self.logins,
            "late_logins": self.late_logins,
            "unique_visitors": self.visitors,
            "visits": self.visits,
            "new_visits": self.new_visits,
            "venues": [
                {
                    "venue_id": v.venue_id,
                    "venue_name": v.venue_name,
                    "logins": v.logins,
                    "unique_visitors": v.visitors,
                    "visits": v.visits,
                }
                for v in self.venues
            ],
        }


_TOTALS = """
SELECT count(*),
       count(*) FILTER (WHERE late),
       count(DISTINCT coalesce(user_id, client_mac)),
       count(DISTINCT visit_id),
       count(*) FILTER (WHERE visit_is_new),
       CAST(min(authentication_time) AS VARCHAR),
       CAST(max(authentication_time) AS VARCHAR)
FROM logins
"""
_VENUES = """
SELECT venue_id, max(venue_name), count(*),
       count(DISTINCT coalesce(user_id, client_mac)), count(DISTINCT visit_id)
FROM logins GROUP BY venue_id ORDER BY count(*) DESC, venue_id
"""
_BY_SECOND = """
SELECT venue_id, CAST(date_trunc('second', authentication_time) AS VARCHAR), count(*)
FROM logins
WHERE authentication_time > (SELECT max(authentication_time) FROM logins) - CAST($1 AS INTERVAL)
GROUP BY 1, 2
"""


async def read_report(url: str) -> Report:
    """Everything the report shows, read from the store at ``url`` (``ANALYTICS_URL``)."""
    return await _reading(url, _read)


async def fetch(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """One read-only query against the store at ``url``, retried while the file is busy."""

    async def run(port: SqlPort) -> list[tuple[Any, ...]]:
        return await port.fetch(query, *args)

    return await _reading(url, run)


async def _reading(
    url: str,
    read: Callable[[SqlPort], Awaitable[T]],
    *,
    attempts: int = 50,
    retry_s: float = 0.2,
) -> T:
    for attempt in range(attempts):
        port = _port(url)
        try:
            await port.connect()
            return await read(port)
        except port.transient_errors:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(retry_s)  # the sink holds the DuckDB file for a batch
        finally:
            await port.close()
    raise AssertionError("unreachable")


def _port(url: str) -> SqlPort:
    store = parse_store_url(url)
    if store.kind == "postgresql":
        from consumers.sinks.analytics.postgres import PostgresPort

        return PostgresPort(store.url)
    from consumers.sinks.analytics.duckdb_store import DuckDBPort

    assert store.path is not None
    if not store.path.exists():
        raise FileNotFoundError(f"ANALYTICS_URL names {store.path}, which does not exist yet")
    return DuckDBPort(store.path, read_only=True)


async def _read(port: SqlPort) -> Report:
    report = Report()
    (totals,) = await port.fetch(_TOTALS)
    (
        report.logins,
        report.late_logins,
        report.visitors,
        report.visits,
        report.new_visits,
        first,
        last,
    ) = (
        int(totals[0]),
        int(totals[1]),
        int(totals[2]),
        int(totals[3]),
        int(totals[4] or 0),
        totals[5],
        totals[6],
    )
    report.first_login = _time(first)
    report.last_login = _time(last)
    report.venues = [
        VenueLine(str(row[0]), row[1], int(row[2]), int(row[3]), int(row[4]))
        for row in await port.fetch(_VENUES)
    ]
    by_second: dict[str, dict[datetime, int]] = defaultdict(dict)
    for venue_id, second, count in await port.fetch(_BY_SECOND, _CHART_WINDOW):
        moment = _time(second)
        if moment is not None:
            by_second[str(venue_id)][moment] = int(count)
    report.by_second = dict(by_second)
    return report


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def format_text(report: Report) -> str:
    span = ""
    if report.first_login and report.last_login:
        span = (
            f" from {report.first_login:%Y-%m-%d %H:%M} to {report.last_login:%Y-%m-%d %H:%M} UTC"
        )
    lines = [
        f"logins: {report.logins} ({report.late_logins} late){span}",
        f"unique visitors: {report.visitors}",
        f"visits: {report.visits} (new visits: {report.new_visits})",
        "",
        f"{'venue':<10}{'name':<24}{'logins':>8}{'visitors':>10}{'visits':>8}",
    ]
    for venue in report.venues:
        lines.append(
            f"{venue.venue_id:<10}{(venue.venue_name or '')[:23]:<24}{venue.logins:>8}"
            f"{venue.visitors:>10}{venue.visits:>8}"
        )
    return "\n".join(lines) + "\n"


def render_chart(report: Report, path: Path, *, top_venues: int = 10) -> None:
    """Logins per venue over time, as a PNG at ``path``.

    Shows the busiest ``top_venues`` over the day that ends with the latest login, in at most
    60 buckets of 10 s or more.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    from matplotlib import pyplot

    seconds = sorted({m for series in report.by_second.values() for m in series})
    figure, axes = pyplot.subplots(figsize=(10, 5), dpi=100)
    if seconds:
        start = seconds[0]
        span_s = int((seconds[-1] - start).total_seconds()) + 1
        bucket_s = max(_MIN_BUCKET_S, math.ceil(span_s / _MAX_BUCKETS))
        count = -(-span_s // bucket_s)
        buckets = [start + timedelta(seconds=bucket_s * i) for i in range(count)]
        names = {v.venue_id: v.venue_name or v.venue_id for v in report.venues}
        for venue in report.venues[:top_venues]:
            counts = [0] * count
            for moment, logins in report.by_second.get(venue.venue_id, {}).items():
                counts[int((moment - start).total_seconds()) // bucket_s] += logins
            axes.plot(range(count), counts, marker="o", markersize=3, label=names[venue.venue_id])
        ticks = list(range(0, count, max(1, count // 8)))
        axes.set_xticks(ticks, [f"{buckets[i]:%H:%M:%S}" for i in ticks])
        axes.set_xlabel(f"login time (UTC), {start:%Y-%m-%d}")
        axes.set_ylabel(f"logins per {bucket_s} s")
        axes.legend(loc="upper left", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no logins yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_title("Wi-Fi logins per venue")
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    pyplot.close(figure)
