"""Prometheus metrics of the receiver, on a registry of its own (one per app instance).

Labels carry outcomes and error classes only: never ids, e-mails or anything from a body.
"""

from __future__ import annotations

import platform
from typing import Any

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
        self._request_children: dict[tuple[str, str], Any] = {}
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

    def count_request(self, method: str, outcome: str) -> None:
        """``requests.labels(method, outcome).inc()`` without the label lookup per request."""
        child = self._request_children.get((method, outcome))
        if child is None:
            child = self._request_children[method, outcome] = self.requests.labels(
                method=method, outcome=outcome
            )
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
