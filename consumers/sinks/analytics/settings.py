"""Settings of ``wifi-bridge sink analytics``, declared once as :data:`ANALYTICS_OPTIONS`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge import config
from bridge.config import Option
from bridge.errors import ConfigError
from bridge.settings import KAFKA_OPTIONS, KafkaSettings
from consumers.sinks.crm_dlq import MIN_MESSAGE_BYTES

__all__ = ["ANALYTICS_OPTIONS", "AnalyticsSettings", "StoreUrl", "parse_store_url"]

ANALYTICS_OPTIONS: tuple[Option, ...] = (
    Option(
        "ANALYTICS_URL",
        "duckdb:///.data/analytics.duckdb",
        "where the tables live: postgresql://user@host:5432/db (password: PGPASSWORD or "
        "~/.pgpass; without a host, PGHOST or the local Unix socket) or "
        "duckdb:///relative/path.duckdb (duckdb:////absolute/path.duckdb; not :memory:, "
        "whose rows would go with the process)",
    ),
    Option(
        "ANALYTICS_TOPICS",
        "wifi.auth.visits,wifi.auth.late",
        "topics of canonical login records to store, comma-separated",
    ),
    Option(
        "ANALYTICS_TOPIC_DLQ", "wifi.auth.dlq", "topic for records that are not canonical logins"
    ),
    Option(
        "ANALYTICS_DLQ_MAX_BYTES",
        "1048576",
        "largest dead letter sent (the producer's max_request_size, at least 8192); a record "
        "that does not fit beside the headers is cut and marked dlq-value-truncated, and one "
        "the topic refuses as too large (a smaller max.message.bytes) is cut further",
    ),
    Option(
        "ANALYTICS_GROUP_ID",
        "wifi-sink-analytics",
        "Kafka consumer group; its positions are kept in the database (sink_offsets)",
    ),
    Option("ANALYTICS_BATCH_MAX_RECORDS", "2000", "most records written in one transaction"),
    Option("ANALYTICS_BATCH_WAIT_MS", "200", "how long a batch waits for records to fill it"),
    Option(
        "ANALYTICS_RETRY_MAX_BACKOFF_MS",
        "30000",
        "longest pause between retries while the database (or Kafka) refuses a batch",
    ),
    Option(
        "ANALYTICS_STATEMENT_TIMEOUT_MS",
        "60000",
        "PostgreSQL statement_timeout of the sink's connection",
    ),
    Option(
        "ANALYTICS_COMMIT_KAFKA_OFFSETS",
        "true",
        "also commit offsets to Kafka after each batch, for lag monitoring only "
        "(the database's sink_offsets are what the sink resumes from)",
    ),
    Option("ANALYTICS_METRICS_HOST", "0.0.0.0", "address of the /metrics and /healthz server"),
    Option("ANALYTICS_METRICS_PORT", "9102", "port of the /metrics and /healthz server (0: none)"),
    *config.log_options("ANALYTICS"),
)


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed ``ANALYTICS_URL``: ``kind`` is ``postgresql`` or ``duckdb``."""

    kind: str
    url: str
    path: Path | None = None


def parse_store_url(raw: str) -> StoreUrl:
    """Which database ``ANALYTICS_URL`` names; the error never repeats the URL (passwords)."""
    scheme = raw.partition("://")[0].lower() if "://" in raw else ""
    if scheme in {"postgresql", "postgres"}:
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 (validates the port)
        except ValueError:
            raise ConfigError("ANALYTICS_URL: the postgresql:// URL has a bad port") from None
        # Without a host (postgresql:///db), asyncpg connects as libpq does: to PGHOST, else
        # to the local Unix socket.
        return StoreUrl("postgresql", raw)
    if scheme == "duckdb":
        if not raw.lower().startswith("duckdb:///"):
            raise ConfigError(
                "ANALYTICS_URL: a DuckDB URL is duckdb:///relative/path or duckdb:////absolute/path"
            )
        path = raw[len("duckdb:///") :]
        if not path:
            raise ConfigError("ANALYTICS_URL: the duckdb:/// URL names no file")
        if path.lower().startswith(":memory:"):
            # DuckDB's private in-memory database: every row would be lost when the process
            # ends, and no other process (wifi-bridge report, replay) could read it.
            raise ConfigError(
                "ANALYTICS_URL: duckdb:///:memory: keeps nothing once the sink stops and no "
                "other process can read it; name a file (duckdb:///path/to/file.duckdb)"
            )
        return StoreUrl("duckdb", raw, Path(path))
    shown = f"scheme {scheme!r}" if scheme else "no scheme"
    raise ConfigError(
        "ANALYTICS_URL: expected postgresql://user@host:port/database or "
        f"duckdb:///path/to/file.duckdb, got a URL with {shown}"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalyticsSettings:
    """Settings of ``wifi-bridge sink analytics``; times carry their unit in the name."""

    kafka: KafkaSettings
    store: StoreUrl
    topics: tuple[str, ...] = ("wifi.auth.visits", "wifi.auth.late")
    topic_dlq: str = "wifi.auth.dlq"
    dlq_max_bytes: int = 1_048_576
    group_id: str = "wifi-sink-analytics"
    batch_max_records: int = 2000
    batch_wait_ms: int = 200
    retry_max_backoff_ms: int = 30_000
    statement_timeout_ms: int = 60_000
    commit_kafka_offsets: bool = True
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9102
    log_level: str = "INFO"
    log_format: str = "auto"

    @classmethod
    def from_values(cls, values: config.Values) -> AnalyticsSettings:
        topics = config.topics(values, "ANALYTICS_TOPICS")
        settings = cls(
            kafka=KafkaSettings.from_values(values),
            store=parse_store_url(config.text(values, "ANALYTICS_URL")),
            topics=topics,
            topic_dlq=config.topic(values, "ANALYTICS_TOPIC_DLQ"),
            dlq_max_bytes=config.integer(
                values, "ANALYTICS_DLQ_MAX_BYTES", minimum=MIN_MESSAGE_BYTES
            ),
            group_id=config.text(values, "ANALYTICS_GROUP_ID"),
            batch_max_records=config.integer(
                values, "ANALYTICS_BATCH_MAX_RECORDS", minimum=1, maximum=100_000
            ),
            batch_wait_ms=config.integer(
                values, "ANALYTICS_BATCH_WAIT_MS", minimum=0, maximum=60_000
            ),
            retry_max_backoff_ms=config.integer(
                values, "ANALYTICS_RETRY_MAX_BACKOFF_MS", minimum=100, maximum=240_000
            ),
            # PostgreSQL refuses a larger statement_timeout (at every connection).
            statement_timeout_ms=config.integer(
                values, "ANALYTICS_STATEMENT_TIMEOUT_MS", minimum=100, maximum=2_147_483_647
            ),
            commit_kafka_offsets=config.boolean(values, "ANALYTICS_COMMIT_KAFKA_OFFSETS"),
            metrics_host=config.text(values, "ANALYTICS_METRICS_HOST"),
            metrics_port=config.integer(values, "ANALYTICS_METRICS_PORT", minimum=0, maximum=65535),
            log_level=config.log_level(values, "ANALYTICS_LOG_LEVEL"),
            log_format=config.text(values, "ANALYTICS_LOG_FORMAT"),
        )
        if settings.topic_dlq in settings.topics:
            raise ConfigError("ANALYTICS_TOPIC_DLQ must not be one of ANALYTICS_TOPICS")
        return settings

    @classmethod
    def load(cls, args: argparse.Namespace | None, environ: Mapping[str, str]) -> AnalyticsSettings:
        return cls.from_values(config.resolve(KAFKA_OPTIONS + ANALYTICS_OPTIONS, args, environ))

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000
