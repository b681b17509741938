"""Prometheus metrics of the analytics sink, prefixed ``wifi_sink_analytics_``.

Labels carry tables, outcomes, reasons, topics and partitions: never ids or anything from a
record.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["AnalyticsMetrics"]

_WRITE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AnalyticsMetrics:
    """Every metric the analytics sink exports, on a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rows_written = Counter(
            "wifi_sink_analytics_rows_written",
            "Rows inserted, by table (logins: the one table the sink writes)",
            ["table"],
            registry=r,
        )
        self.duplicates = Counter(
            "wifi_sink_analytics_duplicate_records",
            "Logins already stored (a redelivery or a replay): skipped, not counted again",
            registry=r,
        )
        self.batches = Counter(
            "wifi_sink_analytics_batches",
            "Batches, by outcome (written, fenced, failed)",
            ["outcome"],
            registry=r,
        )
        self.write_latency = Histogram(
            "wifi_sink_analytics_batch_write_seconds",
            "Time to write one batch and its offsets in one database transaction",
            ["store"],
            buckets=_WRITE_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter(
            "wifi_sink_analytics_retries",
            "Batches or partition claims tried again after the database or Kafka refused them",
            registry=r,
        )
        self.rejected = Counter(
            "wifi_sink_analytics_rejected_records",
            "Records that are not canonical logins, sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.lag = Gauge(
            "wifi_sink_analytics_consumer_lag_records",
            "Committed records in a partition not yet written (last stable offset - position)",
            ["topic", "partition"],
            registry=r,
        )
        self.store_up = Gauge(
            "wifi_sink_analytics_store_up",
            "1 when the last database transaction succeeded, else 0",
            registry=r,
        )
        self.owned_partitions = Gauge(
            "wifi_sink_analytics_owned_partitions",
            "Partitions this instance has claimed (epoch bumped) and writes",
            registry=r,
        )

        self.hand_overs = Counter(
            "wifi_sink_analytics_file_hand_overs",
            "Times the DuckDB writer closed its file between batches for a process waiting to "
            "read it (wifi-bridge report or replay, a duckdb session that touched the mark)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
