"""Prometheus metrics of the receiver, on a registry of its own (one per app instance).

Labels carry outcomes and error classes only: never ids, e-mails or anything from a body.

The two metrics every request moves (requests by outcome, the ack latency histogram) are plain
numbers the event loop's thread adds to, exported by a collector at scrape time (also on that
thread): a prometheus-client counter or histogram takes a lock per update, which cost about 5%
of the bridge's requests per second under ``make bench``'s load.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bridge import __version__

if TYPE_CHECKING:
    from bridge.spool import Spool

_ACK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BridgeMetrics:
    """Every metric the receiver exports, prefixed ``wifi_bridge_``."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        #: Webhook requests by (method, outcome), and the ack latency histogram: updated on
        #: the event loop's thread only (see the module's docstring).
        self.requests: dict[tuple[str, str], int] = {}
        self.ack_latency = LoopHistogram(_ACK_BUCKETS_S)
        r.register(_RequestCollector(self))
        self.publish_errors = Counter(
            "wifi_bridge_publish_errors",
            "Records Kafka did not acknowledge in time, by topic and error class",
            ["topic", "error"],
            registry=r,
        )
        self.dead_letters = Counter(
            "wifi_bridge_dead_letters",
            "Authenticated bodies kept in the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        #: Webhook requests being handled now; a plain int, read by the gauge at scrape time.
        self.in_flight = 0
        Gauge(
            "wifi_bridge_in_flight_requests",
            "Webhook requests being handled now",
            registry=r,
        ).set_function(lambda: self.in_flight)
        self.kafka_ready = Gauge(
            "wifi_bridge_kafka_ready",
            "1 while Kafka takes records (its last publish, drain or check succeeded), else 0",
            registry=r,
        )
        self.spooled_records = Counter(
            "wifi_bridge_spooled_records",
            "Records written to the local spool because Kafka did not acknowledge in time",
            registry=r,
        )
        self.drained_records = Counter(
            "wifi_bridge_spool_drained_records",
            "Spooled records published to Kafka and acknowledged (rate: the drain rate)",
            registry=r,
        )
        self.drain_errors = Counter(
            "wifi_bridge_spool_drain_errors",
            "Times the spool drainer could not read or acknowledge the spool and retried",
            ["error"],
            registry=r,
        )
        self.refused_records = Counter(
            "wifi_bridge_spool_refused_records",
            "Spooled records Kafka refused for good, even alone; set aside under corrupt/",
            ["reason"],
            registry=r,
        )
        self.producer_rebuilds = Counter(
            "wifi_bridge_producer_rebuilds",
            "Kafka producers rebuilt because they failed while the broker answered",
            registry=r,
        )
        build = Gauge(
            "wifi_bridge_build_info",
            "Version of the bridge and its runtime",
            ["version", "python"],
            registry=r,
        )
        build.labels(version=__version__, python=platform.python_version()).set(1)

    content_type = CONTENT_TYPE_LATEST

    def watch_spool(self, spool: Spool) -> None:
        """Export the spool's own counters at scrape time."""
        self.registry.register(_SpoolCollector(spool))

    def count_request(self, method: str, outcome: str) -> None:
        """One more webhook request of ``method`` that ended in ``outcome``."""
        requests = self.requests
        key = (method, outcome)
        requests[key] = requests.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoopHistogram:
    """A histogram for one thread's updates: counts per bucket and a sum, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "less or equal"
        self.sum += value


class _RequestCollector(Collector):
    def __init__(self, metrics: BridgeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        requests = CounterMetricFamily(
            "wifi_bridge_requests",
            "Requests on the webhook URL, by method and outcome",
            labels=["method", "outcome"],
        )
        for (method, outcome), count in sorted(metrics.requests.items()):
            requests.add_metric([method, outcome], count)
        yield requests
        histogram = metrics.ack_latency
        cumulative, buckets = 0, []
        labels = (*(repr(bound) for bound in histogram.bounds), "+Inf")
        for label, count in zip(labels, histogram.counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(
            "wifi_bridge_kafka_ack_seconds",
            "Time from handing a record to the producer until Kafka acknowledged it",
            buckets=buckets,
            sum_value=histogram.sum,
        )


class _SpoolCollector(Collector):
    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def collect(self) -> Iterable[Metric]:
        stats = self._spool.stats()
        oldest_s = 0.0
        if stats.oldest_spooled_at_ms is not None:
            oldest_s = max(0.0, time.time() - stats.oldest_spooled_at_ms / 1000)
        yield GaugeMetricFamily(
            "wifi_bridge_spool_records", "Records in the spool not yet in Kafka", stats.records
        )
        yield GaugeMetricFamily(
            "wifi_bridge_spool_bytes", "Bytes of spool segments on disk", stats.bytes
        )
        yield GaugeMetricFamily(
            "wifi_bridge_spool_oldest_record_age_seconds",
            "Age of the oldest record waiting in the spool (0 when empty)",
            oldest_s,
        )
        yield GaugeMetricFamily(
            "wifi_bridge_spool_unreadable_segments",
            "Spool segment files that could not be read when last tried (kept, tried again)",
            stats.unreadable_segments,
        )
        yield CounterMetricFamily(
            "wifi_bridge_spool_corrupt_records",
            "Damaged spool records set aside under corrupt/",
            stats.corrupt_records,
        )
