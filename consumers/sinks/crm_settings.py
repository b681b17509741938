"""Settings of ``wifi-bridge sink crm``, declared once in :data:`CRM_OPTIONS`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge import config
from bridge.config import Option
from bridge.errors import ConfigError
from bridge.settings import KAFKA_OPTIONS, KafkaSettings
from consumers.sinks.crm_dlq import MIN_MESSAGE_BYTES

#: The longest CRM request and rate-limit window allowed, in seconds. A request is awaited
#: without polling Kafka, and a consumer that does not poll within ``max.poll.interval.ms``
#: (300 s, aiokafka's default) leaves its group: its partitions move and the batch is re-read.
MAX_REQUEST_TIMEOUT_S = 240
MAX_RATE_LIMIT_WINDOW_S = 300

CRM_OPTIONS: tuple[Option, ...] = (
    Option(
        "CRM_TARGET",
        "outbox",
        "where contacts go: outbox (a local table, nothing sent), hubspot or webhook",
        choices=("outbox", "hubspot", "webhook"),
    ),
    Option(
        "CRM_TOPICS",
        "wifi.auth.visits,wifi.auth.late",
        "canonical login topics to read (comma-separated)",
    ),
    Option("CRM_TOPIC_DLQ", "wifi.auth.dlq", "topic for records the CRM rejected or unreadable"),
    Option(
        "CRM_DLQ_MAX_BYTES",
        "1048576",
        "largest dead letter sent (the producer's max_request_size, at least 8192); a record "
        "value that does not fit beside the headers is cut and marked dlq-value-truncated",
    ),
    Option("CRM_GROUP_ID", "wifi-sink-crm", "Kafka consumer group"),
    Option(
        "CRM_MIN_INTERVAL_S",
        "86400",
        "upsert a user's contact at most once per this many seconds of login time",
    ),
    Option(
        "CRM_STATE_DB",
        ".data/crm-sink.db",
        "SQLite file of the sink: per-user sync times and the outbox (not the analytics file)",
    ),
    Option("CRM_BATCH_SIZE", "100", "contacts per CRM request (HubSpot takes at most 100)"),
    Option("CRM_MAX_POLL_RECORDS", "500", "records read from Kafka per batch"),
    Option("CRM_RATE_LIMIT_REQUESTS", "190", "CRM requests allowed per CRM_RATE_LIMIT_WINDOW_S"),
    Option(
        "CRM_RATE_LIMIT_WINDOW_S",
        "10",
        f"the rate limit's sliding window, in seconds (at most {MAX_RATE_LIMIT_WINDOW_S})",
    ),
    Option(
        "CRM_REQUEST_TIMEOUT_S",
        "30",
        f"how long one CRM request may take (at most {MAX_REQUEST_TIMEOUT_S}: the consumer "
        "does not poll Kafka meanwhile, and leaves its group after 300 s without a poll)",
    ),
    Option("CRM_RETRY_INITIAL_MS", "500", "first wait before retrying a failed CRM request"),
    Option("CRM_RETRY_MAX_S", "60", "longest wait between retries (the backoff doubles up to it)"),
    Option(
        "CRM_RECORD_MAX_ATTEMPTS",
        "8",
        "failures in a row (a 5xx, or retryable in a multi-status answer) of a contact sent "
        "alone while the CRM accepts other requests; then it goes to the dead-letter topic "
        "(outages and rate limits are retried without limit)",
    ),
    Option(
        "CRM_SPLIT_AFTER_SERVER_ERRORS",
        "3",
        "5xx answers in a row to a request of several contacts before it is split in halves, "
        "so a contact the CRM fails on cannot hold back the others",
    ),
    Option("CRM_HUBSPOT_BASE_URL", "https://api.hubapi.com", "HubSpot API base URL"),
    Option("CRM_HUBSPOT_TOKEN", None, "HubSpot private app access token", secret=True),
    Option("CRM_WEBHOOK_URL", None, "URL the webhook target POSTs contacts to"),
    Option(
        "CRM_WEBHOOK_SECRET",
        None,
        "HMAC-SHA256 key of the webhook signature (16 characters or more)",
        secret=True,
    ),
    Option("CRM_METRICS_PORT", "9103", "port of /metrics and /healthz"),
    *config.log_options("CRM"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class CrmSettings:
    """Settings of the CRM sink; times carry their unit in the name."""

    kafka: KafkaSettings
    target: str = "outbox"
    topics: tuple[str, ...] = ("wifi.auth.visits", "wifi.auth.late")
    topic_dlq: str = "wifi.auth.dlq"
    dlq_max_bytes: int = 1_048_576
    group_id: str = "wifi-sink-crm"
    min_interval_s: int = 86400
    state_db: Path = Path(".data/crm-sink.db")
    batch_size: int = 100
    max_poll_records: int = 500
    rate_limit_requests: int = 190
    rate_limit_window_s: int = 10
    request_timeout_s: int = 30
    retry_initial_ms: int = 500
    retry_max_s: int = 60
    record_max_attempts: int = 8
    split_after_server_errors: int = 3
    hubspot_base_url: str = "https://api.hubapi.com"
    hubspot_token: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    metrics_port: int = 9103
    log_level: str = "INFO"
    log_format: str = "auto"

    @classmethod
    def from_values(cls, values: config.Values) -> CrmSettings:
        topics = config.topics(values, "CRM_TOPICS")
        settings = cls(
            kafka=KafkaSettings.from_values(values),
            target=config.text(values, "CRM_TARGET"),
            topics=topics,
            topic_dlq=config.topic(values, "CRM_TOPIC_DLQ"),
            dlq_max_bytes=config.integer(values, "CRM_DLQ_MAX_BYTES", minimum=MIN_MESSAGE_BYTES),
            group_id=config.text(values, "CRM_GROUP_ID"),
            min_interval_s=config.integer(values, "CRM_MIN_INTERVAL_S", minimum=0),
            state_db=Path(config.text(values, "CRM_STATE_DB")),
            batch_size=config.integer(values, "CRM_BATCH_SIZE", minimum=1, maximum=1000),
            max_poll_records=config.integer(values, "CRM_MAX_POLL_RECORDS", minimum=1),
            rate_limit_requests=config.integer(values, "CRM_RATE_LIMIT_REQUESTS", minimum=1),
            rate_limit_window_s=config.integer(
                values, "CRM_RATE_LIMIT_WINDOW_S", minimum=1, maximum=MAX_RATE_LIMIT_WINDOW_S
            ),
            request_timeout_s=config.integer(
                values, "CRM_REQUEST_TIMEOUT_S", minimum=1, maximum=MAX_REQUEST_TIMEOUT_S
            ),
            retry_initial_ms=config.integer(values, "CRM_RETRY_INITIAL_MS", minimum=1),
            retry_max_s=config.integer(values, "CRM_RETRY_MAX_S", minimum=1),
            record_max_attempts=config.integer(values, "CRM_RECORD_MAX_ATTEMPTS", minimum=1),
            split_after_server_errors=config.integer(
                values, "CRM_SPLIT_AFTER_SERVER_ERRORS", minimum=1
            ),
            hubspot_base_url=config.text(values, "CRM_HUBSPOT_BASE_URL").rstrip("/"),
            hubspot_token=config.optional_text(values, "CRM_HUBSPOT_TOKEN"),
            webhook_url=config.optional_text(values, "CRM_WEBHOOK_URL"),
            webhook_secret=config.optional_text(values, "CRM_WEBHOOK_SECRET"),
            metrics_port=config.integer(values, "CRM_METRICS_PORT", minimum=0, maximum=65535),
            log_level=config.log_level(values, "CRM_LOG_LEVEL"),
            log_format=config.text(values, "CRM_LOG_FORMAT"),
        )
        if settings.topic_dlq in settings.topics:
            # The sink would read its own dead letters: an unreadable record, dead-lettered
            # again each time it is read back, would go round for ever.
            raise ConfigError("CRM_TOPIC_DLQ must not be one of CRM_TOPICS")
        if settings.target == "hubspot":
            if not settings.hubspot_token:
                raise ConfigError("CRM_HUBSPOT_TOKEN is required when CRM_TARGET is hubspot")
            if settings.batch_size > 100:
                raise ConfigError("CRM_BATCH_SIZE: HubSpot takes at most 100 contacts a request")
        if not settings.hubspot_base_url.startswith(("http://", "https://")):
            raise ConfigError("CRM_HUBSPOT_BASE_URL: expected an http(s) URL")
        if settings.target == "webhook":
            if not settings.webhook_url or not settings.webhook_url.startswith(
                ("http://", "https://")
            ):
                raise ConfigError("CRM_WEBHOOK_URL: an http(s) URL is required for webhook")
            if not settings.webhook_secret or len(settings.webhook_secret) < 16:
                raise ConfigError("CRM_WEBHOOK_SECRET: 16 characters or more are required")
        if settings.retry_initial_ms > settings.retry_max_s * 1000:
            raise ConfigError("CRM_RETRY_INITIAL_MS cannot exceed CRM_RETRY_MAX_S")
        return settings

    @classmethod
    def load(cls, args: argparse.Namespace | None, environ: Mapping[str, str]) -> CrmSettings:
        return cls.from_values(config.resolve(KAFKA_OPTIONS + CRM_OPTIONS, args, environ))

    @property
    def min_interval_ms(self) -> int:
        return self.min_interval_s * 1000
