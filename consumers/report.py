"""``wifi-bridge report``: the analytics store's numbers, and logins per venue over time as PNG.

Reads the tables the analytics sink writes (``ANALYTICS_URL``: PostgreSQL or the DuckDB file);
writes nothing. A DuckDB file is opened read-only, briefly, and the open is retried while the
sink holds it for a batch. Given a broker (``KAFKA_BOOTSTRAP_SERVERS``) it also counts the raw
topic (posts accepted, redeliveries) and the dead-letter topic; given the CRM sink's file
(``CRM_STATE_DB``), the upserts in its outbox: the numbers ``make run`` reconciles.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from bridge import config
from bridge.errors import ConfigError
from bridge.settings import KAFKA_OPTIONS, KafkaSettings
from consumers.counts import CountError, OutboxCount, TopicCount, count_outbox, count_topic
from consumers.sinks.analytics.ports import STORE_RETRY_S, sql_port
from consumers.sinks.analytics.settings import parse_store_url
from consumers.sinks.analytics.store import SqlPort

__all__ = [
    "KafkaCounts",
    "Report",
    "VenueLine",
    "add_arguments",
    "fetch",
    "format_text",
    "read_report",
    "render_chart",
    "run",
]

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


@dataclass(frozen=True, slots=True)
class KafkaCounts:
    """What the bridge's topics hold, as far as their retention reaches."""

    raw_topic: str
    raw: TopicCount
    """Every post the bridge accepted is one record here; a redelivery repeats an event id."""
    dlq_topic: str
    dead_letters: int
    """Records any stage (bridge, pipeline, either sink) wrote to the dead-letter topic."""


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
    kafka: KafkaCounts | None = None
    crm: OutboxCount | None = None

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.kafka is not None:
            extra["raw_records"] = self.kafka.raw.records
            extra["redeliveries"] = self.kafka.raw.redeliveries
            extra["dead_letters"] = self.kafka.dead_letters
        if self.crm is not None:
            extra["crm_upserts"] = self.crm.upserts
            extra["crm_contacts"] = self.crm.contacts
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
            **extra,
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
    retry_s: float = STORE_RETRY_S,
) -> T:
    for attempt in range(attempts):
        port = _port(url)
        try:
            await port.connect()
            return await read(port)
        except port.transient_errors:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(retry_s)  # the sink hands the DuckDB file over at its next batch
        finally:
            await port.close()
    raise AssertionError("unreachable")


def _port(url: str) -> SqlPort:
    store = parse_store_url(url)
    if store.path is not None and not store.path.exists():
        raise FileNotFoundError(f"ANALYTICS_URL names {store.path}, which does not exist yet")
    return sql_port(url, read_only=True)


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
    ]
    if report.kafka is not None:
        raw = report.kafka.raw
        lines += [
            f"posts accepted: {raw.records} (records in {report.kafka.raw_topic}), "
            f"redeliveries among them: {raw.redeliveries}",
            f"dead letters: {report.kafka.dead_letters} (records in {report.kafka.dlq_topic})",
        ]
    if report.crm is not None:
        lines.append(
            f"CRM upserts: {report.crm.upserts} (outbox rows; {report.crm.contacts} contacts)"
        )
    lines += [
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


# -- the command


_TOPIC_SHAPE = {
    "KAFKA_CREATE_TOPICS",
    "KAFKA_TOPIC_PARTITIONS",
    "KAFKA_REPLICATION_FACTOR",
    "KAFKA_MIN_INSYNC_REPLICAS",
}
_DEFAULT_ANALYTICS_URL = "duckdb:///.data/analytics.duckdb"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wifi-bridge report``."""
    a = parser.add_argument
    a(
        "--analytics-url",
        default=None,
        metavar="ANALYTICS_URL",
        help=f"the store to read [env ANALYTICS_URL, default {_DEFAULT_ANALYTICS_URL!r}]",
    )
    a("--chart", type=Path, default=None, help="write the chart to this PNG")
    a("--json", action="store_true", help="print the numbers as JSON")
    a(
        "--crm-state-db",
        type=Path,
        default=None,
        metavar="CRM_STATE_DB",
        help="also count the upserts in this CRM sink file's outbox [env CRM_STATE_DB; "
        "default: not counted]",
    )
    kafka = parser.add_argument_group(
        "Kafka", "given brokers, the report also counts the raw and dead-letter topics"
    )
    kafka.add_argument(
        "--kafka-bootstrap-servers",
        default=None,
        metavar="KAFKA_BOOTSTRAP_SERVERS",
        help="brokers, comma-separated host:port [env KAFKA_BOOTSTRAP_SERVERS; default: not "
        "counted]",
    )
    kafka.add_argument(
        "--raw-topic",
        default="wifi.auth.raw",
        help="the bridge's raw topic (default %(default)s)",
    )
    kafka.add_argument(
        "--dlq-topic",
        default="wifi.auth.dlq",
        help="the dead-letter topic every stage writes (default %(default)s)",
    )
    config.add_options(
        parser,
        "Kafka security",
        [
            o
            for o in KAFKA_OPTIONS
            if o.env != "KAFKA_BOOTSTRAP_SERVERS" and o.env not in _TOPIC_SHAPE
        ],
    )


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``wifi-bridge report``: exit 0, 1 when a source cannot be read, 2 for a bad setting."""
    import orjson

    url = args.analytics_url or environ.get("ANALYTICS_URL", _DEFAULT_ANALYTICS_URL)
    crm_state_db = args.crm_state_db or environ.get("CRM_STATE_DB") or None
    try:
        parse_store_url(url)
        kafka: KafkaSettings | None = None
        if args.kafka_bootstrap_servers or environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            kafka = KafkaSettings.from_values(config.resolve(KAFKA_OPTIONS, args, environ))
    except ConfigError as exc:
        print(f"wifi-bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(read_report(url))
    except FileNotFoundError as exc:
        print(f"wifi-bridge report: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the store refused: name the kind of error, never the URL
        print(f"wifi-bridge report: cannot read the store: {type(exc).__name__}", file=sys.stderr)
        return 1
    try:
        if kafka is not None:
            from bridge.rdkafka import client_config

            client = client_config(kafka)
            result.kafka = KafkaCounts(
                args.raw_topic,
                count_topic(client, args.raw_topic),
                args.dlq_topic,
                count_topic(client, args.dlq_topic).records,
            )
        if crm_state_db is not None:
            result.crm = count_outbox(Path(crm_state_db))
    except (CountError, FileNotFoundError) as exc:
        print(f"wifi-bridge report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(result))
    if args.chart is not None:
        render_chart(result, args.chart)
        print(f"chart: {args.chart}", file=sys.stderr)
    return 0
