"""Settings of ``wifi-bridge pipeline``, from environment variables mirrored by flags."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge import config
from bridge.config import Option
from bridge.errors import ConfigError
from bridge.settings import KAFKA_OPTIONS, KafkaSettings
from consumers.pipeline.partition import WindowConfig

PIPELINE_OPTIONS: tuple[Option, ...] = (
    Option("PIPELINE_GROUP_ID", "wifi-pipeline", "consumer group of the pipeline instances"),
    Option(
        "PIPELINE_INSTANCE_ID",
        None,
        "this instance's stable name (default: the host name); its transactional id is "
        "`<group>-<instance>`, so a restarted instance fences its predecessor at once. Two "
        "instances running at the same time need different names",
    ),
    Option("PIPELINE_TOPIC_RAW", "wifi.auth.raw", "input: the bridge's raw topic"),
    Option("PIPELINE_TOPIC_VISITS", "wifi.auth.visits", "output: clean records in order"),
    Option("PIPELINE_TOPIC_LATE", "wifi.auth.late", "output: records past the reorder window"),
    Option("PIPELINE_TOPIC_DLQ", "wifi.auth.dlq", "output: bodies that cannot be normalised"),
    Option(
        "PIPELINE_TOPIC_CHANGELOG",
        None,
        "compacted topic holding the window state (default: `<group>-changelog`)",
    ),
    Option(
        "PIPELINE_DEDUP_WINDOW_S",
        "86400",
        "a redelivered event id is dropped for this long after its first sighting, and for as "
        "long as its record waits in the reorder buffer (covers the sender's 3-hour retry); at "
        "least PIPELINE_LATENESS_S",
    ),
    Option(
        "PIPELINE_VISIT_GAP_S",
        "1800",
        "logins of one user at one venue closer than this form one visit",
    ),
    Option(
        "PIPELINE_VISIT_RETENTION_S",
        "86400",
        "how long a visit is kept to join later logins (at least the visit gap)",
    ),
    Option(
        "PIPELINE_LATENESS_S",
        "120",
        "records wait this long (event time) to be released in authenticationTime order; "
        "an older record goes to the late topic",
    ),
    Option(
        "PIPELINE_MAX_BUFFERED",
        "10000",
        "per partition: at this many waiting records the partition pauses and the oldest "
        "are released early",
    ),
    Option(
        "PIPELINE_COMMIT_INTERVAL_MS",
        "1000",
        "a transaction (outputs, state, input offsets) commits at least this often; readers "
        "see records once committed, and ordered records wait PIPELINE_LATENESS_S anyway",
    ),
    Option(
        "PIPELINE_TRANSACTION_TIMEOUT_MS",
        "30000",
        "the broker aborts a transaction left open longer (a crashed instance's), which "
        "bounds how long read_committed readers can stall",
    ),
    Option(
        "PIPELINE_TICK_MS",
        "500",
        "wall-clock timer: how often quiet, caught-up partitions release waiting records",
    ),
    Option("PIPELINE_METRICS_HOST", "0.0.0.0", "address of the Prometheus /metrics endpoint"),
    Option("PIPELINE_METRICS_PORT", "9101", "port of /metrics; 0 turns it off"),
    *config.log_options("PIPELINE"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineSettings:
    """Settings of ``wifi-bridge pipeline``; times carry their unit in the name."""

    kafka: KafkaSettings
    group_id: str = "wifi-pipeline"
    instance_id: str = "local"
    topic_raw: str = "wifi.auth.raw"
    topic_visits: str = "wifi.auth.visits"
    topic_late: str = "wifi.auth.late"
    topic_dlq: str = "wifi.auth.dlq"
    topic_changelog: str = "wifi-pipeline-changelog"
    windows: WindowConfig = field(default_factory=WindowConfig)
    commit_interval_ms: int = 1000
    transaction_timeout_ms: int = 30_000
    tick_ms: int = 500
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9101
    log_level: str = "INFO"
    log_format: str = "auto"

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.instance_id}"

    @classmethod
    def from_values(cls, values: config.Values) -> PipelineSettings:
        group_id = config.text(values, "PIPELINE_GROUP_ID")
        gap_s = config.integer(values, "PIPELINE_VISIT_GAP_S", minimum=1)
        retention_s = config.integer(values, "PIPELINE_VISIT_RETENTION_S", minimum=1)
        if retention_s < gap_s:
            raise ConfigError(
                f"PIPELINE_VISIT_RETENTION_S ({retention_s}) must be at least "
                f"PIPELINE_VISIT_GAP_S ({gap_s})"
            )
        dedup_window_s = config.integer(values, "PIPELINE_DEDUP_WINDOW_S", minimum=1)
        lateness_s = config.integer(values, "PIPELINE_LATENESS_S", minimum=0)
        if dedup_window_s < lateness_s:
            # Shorter would forget an id while copies of its login can still be arriving within
            # the normal delay the reorder buffer waits for.
            raise ConfigError(
                f"PIPELINE_DEDUP_WINDOW_S ({dedup_window_s}) must be at least "
                f"PIPELINE_LATENESS_S ({lateness_s})"
            )
        commit_interval_ms = config.integer(
            values, "PIPELINE_COMMIT_INTERVAL_MS", minimum=1, maximum=60_000
        )
        transaction_timeout_ms = config.integer(
            values, "PIPELINE_TRANSACTION_TIMEOUT_MS", minimum=1000, maximum=900_000
        )
        if transaction_timeout_ms < 5 * commit_interval_ms:
            raise ConfigError(
                f"PIPELINE_TRANSACTION_TIMEOUT_MS ({transaction_timeout_ms}) must be at least five "
                f"times PIPELINE_COMMIT_INTERVAL_MS ({commit_interval_ms}), or healthy "
                "transactions would time out"
            )
        return cls(
            kafka=KafkaSettings.from_values(values),
            group_id=group_id,
            instance_id=config.optional_text(values, "PIPELINE_INSTANCE_ID")
            or socket.gethostname(),
            topic_raw=config.text(values, "PIPELINE_TOPIC_RAW"),
            topic_visits=config.text(values, "PIPELINE_TOPIC_VISITS"),
            topic_late=config.text(values, "PIPELINE_TOPIC_LATE"),
            topic_dlq=config.text(values, "PIPELINE_TOPIC_DLQ"),
            topic_changelog=config.optional_text(values, "PIPELINE_TOPIC_CHANGELOG")
            or f"{group_id}-changelog",
            windows=WindowConfig(
                dedup_window_ms=dedup_window_s * 1000,
                visit_gap_ms=gap_s * 1000,
                visit_retention_ms=retention_s * 1000,
                lateness_ms=lateness_s * 1000,
                max_buffered=config.integer(values, "PIPELINE_MAX_BUFFERED", minimum=1),
            ),
            commit_interval_ms=commit_interval_ms,
            transaction_timeout_ms=transaction_timeout_ms,
            tick_ms=config.integer(values, "PIPELINE_TICK_MS", minimum=10, maximum=60_000),
            metrics_host=config.text(values, "PIPELINE_METRICS_HOST"),
            metrics_port=config.integer(values, "PIPELINE_METRICS_PORT", minimum=0, maximum=65535),
            log_level=config.log_level(values, "PIPELINE_LOG_LEVEL"),
            log_format=config.text(values, "PIPELINE_LOG_FORMAT"),
        )

    @classmethod
    def load(cls, args: argparse.Namespace | None, environ: Mapping[str, str]) -> PipelineSettings:
        return cls.from_values(config.resolve(KAFKA_OPTIONS + PIPELINE_OPTIONS, args, environ))
