"""Prometheus metrics of the receiver, on a registry of its own (one per app instance).

Labels carry outcomes and error classes only: never ids, e-mails or anything from a body.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bridge import __version__

_ACK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZE_BUCKETS_BYTES = (256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144)


class BridgeMetrics:
    """Every metric the receiver exports, prefixed ``wifi_bridge_``."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wifi_bridge_requests",
            "Requests on the webhook URL, by method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.ack_latency = Histogram(
            "wifi_bridge_kafka_ack_seconds",
            "Time from handing a record to the producer until Kafka acknowledged it",
            buckets=_ACK_BUCKETS_S,
            registry=r,
        )
        self.body_size = Histogram(
            "wifi_bridge_body_bytes",
            "Decompressed size of accepted bodies",
            buckets=_SIZE_BUCKETS_BYTES,
            registry=r,
        )
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
        self.in_flight = Gauge(
            "wifi_bridge_in_flight_requests",
            "Webhook requests being handled now",
            registry=r,
        )
        self.kafka_ready = Gauge(
            "wifi_bridge_kafka_ready",
            "1 when the last readiness probe reached Kafka, else 0",
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
