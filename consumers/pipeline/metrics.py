"""Prometheus metrics of the pipeline, prefixed ``wifi_pipeline_``.

Labels carry outcomes, routes and partition numbers only: never ids or anything from a body.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from bridge import __version__

_TRANSACTION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RESTORE_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class PipelineMetrics:
    """Every metric ``wifi-bridge pipeline`` exports, on a registry of its own."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("wifi_pipeline_build", "Version of the pipeline", registry=r).info(
            {"version": __version__}
        )
        self.records_in = Counter(
            "wifi_pipeline_records_in",
            "Raw records read, by outcome (accepted, duplicate, invalid)",
            ["outcome"],
            registry=r,
        )
        self.records_out = Counter(
            "wifi_pipeline_records_out",
            "Records written, by route (visits, late, dlq)",
            ["route"],
            registry=r,
        )
        self.invalid = Counter(
            "wifi_pipeline_invalid_records",
            "Raw records sent to the dead-letter topic, by normalisation error",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "wifi_pipeline_duplicates_dropped",
            "Redelivered events dropped inside the dedup window",
            registry=r,
        )
        self.visits_opened = Counter(
            "wifi_pipeline_visits_opened", "Logins that opened a new visit", registry=r
        )
        self.late = Counter(
            "wifi_pipeline_late_records",
            "Records older than what was already released, sent to the late topic",
            registry=r,
        )
        self.received_at_capped = Counter(
            "wifi_pipeline_received_at_capped",
            "Records whose received-at was more than 5 minutes ahead of the pipeline's clock "
            "(a bridge pod's clock runs ahead): their dedup clock is the pipeline's clock plus "
            "5 minutes",
            registry=r,
        )
        self.buffered = Gauge(
            "wifi_pipeline_reorder_buffered",
            "Records waiting in the reorder buffer, by input partition",
            ["partition"],
            registry=r,
        )
        self.watermark_lag = Gauge(
            "wifi_pipeline_watermark_lag_seconds",
            "Wall clock minus the reorder watermark, by input partition",
            ["partition"],
            registry=r,
        )
        self.paused = Gauge(
            "wifi_pipeline_paused_partitions",
            "Input partitions paused because their reorder buffer is full",
            registry=r,
        )
        self.assigned = Gauge(
            "wifi_pipeline_assigned_partitions", "Input partitions this instance owns", registry=r
        )
        self.input_partitions = Gauge(
            "wifi_pipeline_input_partitions",
            "Partitions of the raw topic, as read at start and at each assignment",
            registry=r,
        )
        self.transactions = Counter(
            "wifi_pipeline_transactions",
            "Kafka transactions, by result (committed, aborted)",
            ["result"],
            registry=r,
        )
        self.producer_replacements = Counter(
            "wifi_pipeline_producer_replacements",
            "Transactional producers replaced after failing for good (fenced by the transaction "
            "coordinator, say); the partitions are rebuilt from what is committed",
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "wifi_pipeline_transaction_commit_seconds",
            "Time to write state, send offsets and commit one transaction",
            buckets=_TRANSACTION_BUCKETS_S,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "wifi_pipeline_restore_seconds",
            "Time to rebuild the state of newly assigned partitions from the changelog",
            buckets=_RESTORE_BUCKETS_S,
            registry=r,
        )
        self.changelog_corrupt = Counter(
            "wifi_pipeline_changelog_corrupt_entries",
            "Changelog entries that could not be read back and were skipped",
            registry=r,
        )
