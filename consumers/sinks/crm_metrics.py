"""Prometheus metrics of the CRM sink, prefixed ``wifi_crm_``, on a registry of their own.

Labels carry the CRM's name, outcomes, reasons, topics and partitions: never an e-mail
address, a user id or anything else from a record.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CrmMetrics:
    """Every metric of ``wifi-bridge sink crm``."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "wifi_crm_records", "Records read from the input topics", ["topic"], registry=r
        )
        self.contacts_upserted = Counter(
            "wifi_crm_contacts_upserted",
            "Contacts the CRM accepted",
            ["crm"],
            registry=r,
        )
        self.batches = Counter(
            "wifi_crm_batches",
            "CRM requests answered, by outcome (accepted, partial, rejected)",
            ["crm", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "wifi_crm_request_seconds",
            "Time a CRM request took, waits for the rate limit excluded",
            ["crm"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter(
            "wifi_crm_retries",
            "CRM requests (or records of a multi-status answer) tried again, by reason",
            ["crm", "reason"],
            registry=r,
        )
        self.rejected_records = Counter(
            "wifi_crm_rejected_records",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.dead_letters_dropped = Counter(
            "wifi_crm_dead_letters_dropped",
            "Dead letters the dead-letter topic refused even with an empty value (logged)",
            ["reason"],
            registry=r,
        )
        self.skipped_records = Counter(
            "wifi_crm_skipped_records",
            "Logins not sent to the CRM, by reason (no_email, throttled, stale, superseded)",
            ["reason"],
            registry=r,
        )
        self.state_errors = Counter(
            "wifi_crm_state_errors",
            "Failures of the sink's SQLite state file, by operation and SQLite error name "
            "(the batch is tried again)",
            ["operation", "error"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "wifi_crm_consumer_lag_records",
            "Records of a partition a restart would read again: those of the batch still being "
            "delivered, and those not read yet (to the read_committed end offset)",
            ["topic", "partition"],
            registry=r,
        )
        self.crm_available = Gauge(
            "wifi_crm_available",
            "0 while the CRM does not take requests (the sink is backing off), else 1",
            registry=r,
        )
        self.crm_available.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
