"""The settings of each process, read once in ``main()`` and passed down.

Each option is declared once in :data:`KAFKA_OPTIONS` or :data:`BRIDGE_OPTIONS`; the CLI flags
and the README's settings table come from these declarations.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge import config
from bridge.config import Option
from bridge.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

KAFKA_OPTIONS: tuple[Option, ...] = (
    Option("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka brokers, comma-separated host:port"),
    Option(
        "KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "how to talk to the brokers",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ),
    Option(
        "KAFKA_SASL_MECHANISM",
        "PLAIN",
        "SASL mechanism when the protocol is SASL_*",
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ),
    Option("KAFKA_SASL_USERNAME", None, "SASL user name"),
    Option("KAFKA_SASL_PASSWORD", None, "SASL password", secret=True),
    Option("KAFKA_SSL_CAFILE", None, "PEM file of the CA that signed the brokers' certificates"),
    Option("KAFKA_SSL_CERTFILE", None, "PEM client certificate, for mutual TLS"),
    Option("KAFKA_SSL_KEYFILE", None, "PEM private key of the client certificate"),
    Option("KAFKA_SSL_KEY_PASSWORD", None, "password of the client key", secret=True),
    Option("KAFKA_CLIENT_ID", "wifi-bridge", "client id the brokers see in their logs and quotas"),
    Option(
        "KAFKA_CREATE_TOPICS", "true", "create missing topics on start (false: they must exist)"
    ),
    Option("KAFKA_TOPIC_PARTITIONS", "12", "partitions of a topic this service creates"),
    Option("KAFKA_REPLICATION_FACTOR", "1", "replication factor of a topic this service creates"),
    Option("KAFKA_MIN_INSYNC_REPLICAS", "1", "min.insync.replicas of a topic this service creates"),
)

BRIDGE_OPTIONS: tuple[Option, ...] = (
    Option("BRIDGE_HOST", "0.0.0.0", "address the webhook server listens on"),
    Option("BRIDGE_PORT", "8080", "port the webhook server listens on"),
    Option("BRIDGE_WEBHOOK_PATH", "/webhooks/bt-wifi", "URL path of the webhook"),
    Option("BRIDGE_TOPIC_RAW", "wifi.auth.raw", "topic every accepted body is published to"),
    Option(
        "BRIDGE_TOPIC_DLQ", "wifi.auth.dlq", "topic for authenticated bodies that cannot be read"
    ),
    Option(
        "BRIDGE_TOKEN",
        None,
        "secret path segment: the webhook URL becomes <path>/<token>, anything else is 404",
        secret=True,
    ),
    Option("BRIDGE_BASIC_AUTH_USERNAME", None, "require HTTP basic auth with this user name"),
    Option("BRIDGE_BASIC_AUTH_PASSWORD", None, "password for HTTP basic auth", secret=True),
    Option("BRIDGE_ALLOWED_CIDRS", None, "accept webhooks only from these CIDRs (comma-separated)"),
    Option(
        "BRIDGE_TRUSTED_PROXIES",
        None,
        "CIDRs of proxies whose X-Forwarded-For names the real client (comma-separated)",
    ),
    Option("BRIDGE_TLS_CERTFILE", None, "PEM certificate chain: serve HTTPS natively"),
    Option("BRIDGE_TLS_KEYFILE", None, "PEM private key of the TLS certificate"),
    Option(
        "BRIDGE_MAX_BODY_BYTES",
        "65536",
        "largest body accepted, on the wire and decompressed (at most 983040: a record must fit "
        "Kafka's default message size limit with its key and headers)",
    ),
    Option(
        "BRIDGE_ACK_TIMEOUT_MS",
        "5000",
        "how long a request waits for Kafka's acknowledgement before its record is spooled",
    ),
    Option(
        "BRIDGE_READ_TIMEOUT_MS",
        "5000",
        "how long a request's head may take to arrive once its connection is open (the "
        "connection is closed) and its body once its head has (answered 408)",
    ),
    Option(
        "BRIDGE_SPOOL_DIR",
        ".spool",
        "directory of the local spool that takes records while Kafka does not acknowledge",
    ),
    Option("BRIDGE_SPOOL_MAX_BYTES", "1073741824", "size cap of the spool; past it: 503"),
    Option("BRIDGE_SPOOL_FSYNC", "true", "fsync spooled records (false only for tests)"),
    Option("BRIDGE_LINGER_MS", "1", "producer linger: how long a batch waits to fill"),
    Option(
        "BRIDGE_PRODUCER",
        "librdkafka",
        "producer client: librdkafka (confluent-kafka) or aiokafka",
        choices=("librdkafka", "aiokafka"),
    ),
    Option(
        "BRIDGE_EVENT_LOOP",
        "auto",
        "asyncio, uvloop, or auto (uvloop when installed)",
        choices=("auto", "asyncio", "uvloop"),
    ),
    Option("BRIDGE_SHUTDOWN_TIMEOUT_S", "20", "on SIGTERM, how long in-flight requests may finish"),
    *config.log_options("BRIDGE"),
)

_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")

#: The largest body a record can carry within Kafka's default limits: librdkafka refuses a
#: record whose value, key and headers pass its message.max.bytes (1,000,000 bytes), the
#: broker a batch past max.message.bytes (1 MiB). 960 KiB leaves room for the key and headers.
MAX_BODY_BYTES_LIMIT = 960 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class KafkaSettings:
    """How to reach Kafka and how to shape topics this project creates."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: str | None = None
    client_id: str = "wifi-bridge"
    create_topics: bool = True
    topic_partitions: int = 12
    replication_factor: int = 1
    min_insync_replicas: int = 1

    @classmethod
    def from_values(cls, values: config.Values) -> KafkaSettings:
        settings = cls(
            bootstrap_servers=config.text(values, "KAFKA_BOOTSTRAP_SERVERS"),
            security_protocol=config.text(values, "KAFKA_SECURITY_PROTOCOL"),
            sasl_mechanism=config.text(values, "KAFKA_SASL_MECHANISM"),
            sasl_username=config.optional_text(values, "KAFKA_SASL_USERNAME"),
            sasl_password=config.optional_text(values, "KAFKA_SASL_PASSWORD"),
            ssl_cafile=config.optional_file(values, "KAFKA_SSL_CAFILE"),
            ssl_certfile=config.optional_file(values, "KAFKA_SSL_CERTFILE"),
            ssl_keyfile=config.optional_file(values, "KAFKA_SSL_KEYFILE"),
            ssl_key_password=config.optional_text(values, "KAFKA_SSL_KEY_PASSWORD"),
            client_id=config.text(values, "KAFKA_CLIENT_ID"),
            create_topics=config.boolean(values, "KAFKA_CREATE_TOPICS"),
            topic_partitions=config.integer(values, "KAFKA_TOPIC_PARTITIONS", minimum=1),
            replication_factor=config.integer(values, "KAFKA_REPLICATION_FACTOR", minimum=1),
            min_insync_replicas=config.integer(values, "KAFKA_MIN_INSYNC_REPLICAS", minimum=1),
        )
        if settings.security_protocol.startswith("SASL") and not (
            settings.sasl_username and settings.sasl_password
        ):
            raise ConfigError(
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required when "
                f"KAFKA_SECURITY_PROTOCOL is {settings.security_protocol}"
            )
        if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
            raise ConfigError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together")
        if settings.min_insync_replicas > settings.replication_factor:
            raise ConfigError(
                f"KAFKA_MIN_INSYNC_REPLICAS ({settings.min_insync_replicas}) cannot exceed "
                f"KAFKA_REPLICATION_FACTOR ({settings.replication_factor})"
            )
        return settings


@dataclass(frozen=True, kw_only=True, slots=True)
class BridgeSettings:
    """Settings of ``wifi-bridge serve``; times carry their unit in the name."""

    kafka: KafkaSettings
    host: str = "0.0.0.0"
    port: int = 8080
    webhook_path: str = "/webhooks/bt-wifi"
    topic_raw: str = "wifi.auth.raw"
    topic_dlq: str = "wifi.auth.dlq"
    token: str | None = None
    basic_auth_username: str | None = None
    basic_auth_password: str | None = None
    allowed_networks: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    max_body_bytes: int = 65536
    ack_timeout_ms: int = 5000
    read_timeout_ms: int = 5000
    spool_dir: Path = Path(".spool")
    spool_max_bytes: int = 1 << 30
    spool_fsync: bool = True
    linger_ms: int = 1
    producer: str = "librdkafka"
    event_loop: str = "auto"
    shutdown_timeout_s: int = 20
    log_level: str = "INFO"
    log_format: str = "auto"

    @classmethod
    def from_values(cls, values: config.Values) -> BridgeSettings:
        path = config.text(values, "BRIDGE_WEBHOOK_PATH").rstrip("/")
        if (
            not path.startswith("/")
            or path in {"", "/healthz", "/readyz", "/metrics"}
            # { } are refused as route patterns always were; ? # and spaces never reach a path
            or any(c in "{}?#" or c.isspace() for c in path)
        ):
            raise ConfigError(
                "BRIDGE_WEBHOOK_PATH: expected a path such as /webhooks/bt-wifi (starting with /, "
                f"without {{ }} ? # or spaces, not /healthz, /readyz or /metrics), got {path!r}"
            )
        token = config.optional_text(values, "BRIDGE_TOKEN")
        if token is not None and not _TOKEN.fullmatch(token):
            raise ConfigError(
                "BRIDGE_TOKEN: expected 16 to 256 URL-safe characters (letters, digits, . _ ~ -)"
            )
        settings = cls(
            kafka=KafkaSettings.from_values(values),
            host=config.host(values, "BRIDGE_HOST"),
            port=config.integer(values, "BRIDGE_PORT", minimum=0, maximum=65535),
            webhook_path=path,
            topic_raw=config.topic(values, "BRIDGE_TOPIC_RAW"),
            topic_dlq=config.topic(values, "BRIDGE_TOPIC_DLQ"),
            token=token,
            basic_auth_username=config.optional_text(values, "BRIDGE_BASIC_AUTH_USERNAME"),
            basic_auth_password=config.optional_text(values, "BRIDGE_BASIC_AUTH_PASSWORD"),
            allowed_networks=config.networks(values, "BRIDGE_ALLOWED_CIDRS"),
            trusted_proxies=config.networks(values, "BRIDGE_TRUSTED_PROXIES"),
            tls_certfile=config.optional_file(values, "BRIDGE_TLS_CERTFILE"),
            tls_keyfile=config.optional_file(values, "BRIDGE_TLS_KEYFILE"),
            max_body_bytes=_max_body_bytes(values),
            ack_timeout_ms=config.integer(
                values, "BRIDGE_ACK_TIMEOUT_MS", minimum=100, maximum=9000
            ),
            read_timeout_ms=config.integer(
                values, "BRIDGE_READ_TIMEOUT_MS", minimum=100, maximum=60_000
            ),
            spool_dir=Path(config.text(values, "BRIDGE_SPOOL_DIR")),
            spool_max_bytes=config.integer(values, "BRIDGE_SPOOL_MAX_BYTES", minimum=1 << 20),
            spool_fsync=config.boolean(values, "BRIDGE_SPOOL_FSYNC"),
            linger_ms=config.integer(values, "BRIDGE_LINGER_MS", minimum=0, maximum=1000),
            producer=config.text(values, "BRIDGE_PRODUCER"),
            event_loop=config.text(values, "BRIDGE_EVENT_LOOP"),
            # aiohttp takes 0 for "no limit": SIGTERM would wait for in-flight requests unbounded.
            shutdown_timeout_s=config.integer(values, "BRIDGE_SHUTDOWN_TIMEOUT_S", minimum=1),
            log_level=config.log_level(values, "BRIDGE_LOG_LEVEL"),
            log_format=config.text(values, "BRIDGE_LOG_FORMAT"),
        )
        if (settings.basic_auth_username is None) != (settings.basic_auth_password is None):
            raise ConfigError(
                "BRIDGE_BASIC_AUTH_USERNAME and BRIDGE_BASIC_AUTH_PASSWORD go together"
            )
        if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
            raise ConfigError("BRIDGE_TLS_CERTFILE and BRIDGE_TLS_KEYFILE go together")
        if settings.tls_certfile is not None and settings.tls_keyfile is not None:
            server_tls_context(settings.tls_certfile, settings.tls_keyfile)  # refuses bad PEMs
        return settings

    @classmethod
    def load(cls, args: argparse.Namespace | None, environ: Mapping[str, str]) -> BridgeSettings:
        values = config.resolve(KAFKA_OPTIONS + BRIDGE_OPTIONS, args, environ)
        return cls.from_values(values)

    @property
    def webhook_url_path(self) -> str:
        """The full path the sender posts to (with the token segment when one is set)."""
        return f"{self.webhook_path}/{self.token}" if self.token else self.webhook_path

    @property
    def ack_timeout_s(self) -> float:
        return self.ack_timeout_ms / 1000

    @property
    def read_timeout_s(self) -> float:
        return self.read_timeout_ms / 1000


def _max_body_bytes(values: config.Values) -> int:
    size = config.integer(values, "BRIDGE_MAX_BODY_BYTES", minimum=1024)
    if size > MAX_BODY_BYTES_LIMIT:
        raise ConfigError(
            f"BRIDGE_MAX_BODY_BYTES: at most {MAX_BODY_BYTES_LIMIT} bytes, got {size}: Kafka "
            "refuses larger records by default (the producer's message.max.bytes is 1000000 "
            "bytes with key and headers, the broker's max.message.bytes 1 MiB)"
        )
    return size


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for the key's password.
    raise _EncryptedKey


def server_tls_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """The webhook server's HTTPS context (TLS 1.2 or later) from PEM files.

    Raises :class:`ConfigError` naming BRIDGE_TLS_CERTFILE or BRIDGE_TLS_KEYFILE when a file
    cannot be read, holds no PEM certificate, or the key is encrypted or not the certificate's.
    """
    try:
        ssl.create_default_context().load_verify_locations(cafile=certfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"BRIDGE_TLS_CERTFILE: {str(certfile)!r} is not a readable PEM certificate: "
            f"{_ssl_reason(exc)}"
        ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"BRIDGE_TLS_KEYFILE: {str(keyfile)!r} is encrypted; the bridge takes an "
            "unencrypted PEM key"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"BRIDGE_TLS_KEYFILE: {str(keyfile)!r} is not a readable PEM private key of the "
            f"certificate in BRIDGE_TLS_CERTFILE: {_ssl_reason(exc)}"
        ) from None
    return context


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
