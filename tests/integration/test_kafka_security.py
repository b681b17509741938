"""The bridge against a broker that requires authentication or TLS: real broker, no mocks.

One local broker (devkafka) for the module, with a PLAINTEXT listener (used by the tests to
read back what the bridge wrote) and three listeners the bridge is pointed at through its
``KAFKA_*`` security settings:

* SASL_PLAINTEXT with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, where PLAIN knows another
  user than SCRAM, so a client that falls back to the wrong mechanism is refused;
* SSL (one-way TLS: the broker's certificate is signed by a CA of its own);
* SASL_SSL that also requires a client certificate signed by that CA (mutual TLS).

Each publishing test runs once per producer client, since both (librdkafka, the default,
and aiokafka) take the security options; topic creation always goes through aiokafka.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkafka.broker import LocalKafka, free_port
from tests.fixtures.bridge import RunningBridge, StartBridge, metric
from tests.fixtures.kafka import consume
from tests.fixtures.samples import DOCUMENTED_SAMPLE

pytestmark = pytest.mark.kafka

USER = "bridge"
PASSWORD = "bridge-secret"
PLAIN_USER = "plain-bridge"
PLAIN_PASSWORD = "plain-secret"
KEY_PASSWORD = "key-secret"
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PRODUCERS = ("librdkafka", "aiokafka")
RETRY_MESSAGE = "Kafka not reachable yet, retrying"


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker of its own with PLAINTEXT, SASL_PLAINTEXT, SSL and SASL_SSL (+ mTLS)."""
    port, sasl_port, ssl_port, sasl_ssl_port = distinct_free_ports(4)
    broker = LocalKafka(
        data_dir=tmp_path_factory.mktemp("secured-kafka") / "kafka",
        port=port,
        sasl_port=sasl_port,
        ssl_port=ssl_port,
        sasl_ssl_port=sasl_ssl_port,
        sasl_users={USER: PASSWORD, "other": "other-secret"},
        extra_properties={
            # On SASL_PLAINTEXT only PLAIN_USER can log in with PLAIN (and only USER with
            # SCRAM, whose credentials were set at format time).
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'user_{PLAIN_USER}="{PLAIN_PASSWORD}";'
            ),
            "listener.name.sasl_ssl.ssl.client.auth": "required",
        },
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def encrypted_client_key(
    secured_kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The broker's client key, encrypted (PKCS#8, AES-256) with :data:`KEY_PASSWORD`."""
    out = tmp_path_factory.mktemp("client-key") / "client-encrypted.key"
    openssl(
        "pkcs8", "-topk8", "-v2", "aes-256-cbc",
        "-in", str(secured_kafka.ssl_client_keyfile), "-out", str(out),
        "-passout", f"pass:{KEY_PASSWORD}",
        cwd=out.parent,
    )  # fmt: skip
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in out.read_bytes()
    return out


def sasl_env(
    servers: str,
    protocol: str,
    mechanism: str,
    *,
    user: str = USER,
    password: str = PASSWORD,
) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": servers,
        "KAFKA_SECURITY_PROTOCOL": protocol,
        "KAFKA_SASL_MECHANISM": mechanism,
        "KAFKA_SASL_USERNAME": user,
        "KAFKA_SASL_PASSWORD": password,
    }


def sasl_plaintext_env(
    broker: LocalKafka, mechanism: str, *, wrong: bool = False
) -> dict[str, str]:
    """Settings for the SASL_PLAINTEXT listener: the user that ``mechanism`` knows there."""
    user, password = (PLAIN_USER, PLAIN_PASSWORD) if mechanism == "PLAIN" else (USER, PASSWORD)
    return sasl_env(
        broker.sasl_bootstrap_servers,
        "SASL_PLAINTEXT",
        mechanism,
        user=user,
        password="wrong" if wrong else password,
    )


async def post(url: str, body: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/json"}) as response,
    ):
        return response.status, await response.read()


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def assert_published(bridge: RunningBridge, broker: LocalKafka) -> None:
    """POST the documented sample; it must be acknowledged and land in Kafka unchanged."""
    status, payload = await post(bridge.webhook_url, DOCUMENTED_SAMPLE)
    assert status == 200, payload
    # Read back over the broker's PLAINTEXT listener: independent of the bridge's settings.
    records = await consume(broker.bootstrap_servers, bridge.topic_raw, count=1, settle_s=0.5)
    assert len(records) == 1
    assert records[0].key == b"888"
    assert records[0].value == DOCUMENTED_SAMPLE
    # Straight through the secured producer, not the spool's detour.
    assert await metric(bridge, "wifi_bridge_spooled_records_total") == 0


async def wait_for_retry_logged(caplog: pytest.LogCaptureFixture, timeout_s: float) -> str:
    """Wait until the bridge's connect loop tried Kafka and failed; the error type logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name.startswith("bridge.") and record.getMessage() == RETRY_MESSAGE:
                return str(getattr(record, "error", ""))
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {RETRY_MESSAGE!r} logged within {timeout_s} s")


async def assert_refused_but_alive(
    bridge: RunningBridge, caplog: pytest.LogCaptureFixture, *, timeout_s: float = 30.0
) -> str:
    """Kafka refused the bridge's client: it retries, and the sender never sees an error.

    The bridge stays up and ready (/readyz 200, ``"kafka": false``) and answers a POST 200
    after writing the record to its local spool instead of Kafka.  Returns the error type
    the connect loop logged; the ``start_bridge`` teardown then checks a clean exit (0).
    """
    error = await wait_for_retry_logged(caplog, timeout_s)
    status, ready = await get_json(f"{bridge.base_url}/readyz")
    assert (status, ready["kafka"]) == (200, False), ready
    status, payload = await post(bridge.webhook_url, DOCUMENTED_SAMPLE)
    assert status == 200, payload
    assert await metric(bridge, "wifi_bridge_spooled_records_total") == 1
    assert await metric(bridge, "wifi_bridge_spool_records") == 1
    status, ready = await get_json(f"{bridge.base_url}/readyz")
    assert (status, ready["kafka"]) == (200, False), ready
    status, _ = await get_json(f"{bridge.base_url}/healthz")
    assert status == 200
    return error


# ------------------------------------------------------------------ accepted


@pytest.mark.parametrize("producer", PRODUCERS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_bridge_publishes_over_sasl_plaintext(
    start_bridge: StartBridge,
    secured_kafka: LocalKafka,
    caplog: pytest.LogCaptureFixture,
    mechanism: str,
    producer: str,
) -> None:
    caplog.set_level(logging.INFO, logger="aiokafka.conn")
    env = sasl_plaintext_env(secured_kafka, mechanism)
    bridge = await start_bridge(BRIDGE_PRODUCER=producer, **env)
    await assert_published(bridge, secured_kafka)
    # Topic creation (always aiokafka) says how it logged in.
    assert f"Authenticated as {env['KAFKA_SASL_USERNAME']} via {mechanism}" in caplog.text


@pytest.mark.parametrize("producer", PRODUCERS)
async def test_bridge_publishes_over_ssl_verifying_the_broker_with_the_ca_file(
    start_bridge: StartBridge, secured_kafka: LocalKafka, producer: str
) -> None:
    bridge = await start_bridge(
        BRIDGE_PRODUCER=producer,
        KAFKA_BOOTSTRAP_SERVERS=secured_kafka.ssl_bootstrap_servers,
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CAFILE=str(secured_kafka.ssl_cafile),
    )
    await assert_published(bridge, secured_kafka)


@pytest.mark.parametrize("producer", PRODUCERS)
async def test_bridge_publishes_over_sasl_ssl_with_a_client_certificate_and_encrypted_key(
    start_bridge: StartBridge,
    secured_kafka: LocalKafka,
    encrypted_client_key: Path,
    producer: str,
) -> None:
    """SCRAM over TLS, and mutual TLS: the listener requires a client certificate."""
    bridge = await start_bridge(
        BRIDGE_PRODUCER=producer,
        KAFKA_SSL_CAFILE=str(secured_kafka.ssl_cafile),
        KAFKA_SSL_CERTFILE=str(secured_kafka.ssl_client_certfile),
        KAFKA_SSL_KEYFILE=str(encrypted_client_key),
        KAFKA_SSL_KEY_PASSWORD=KEY_PASSWORD,
        **sasl_env(secured_kafka.sasl_ssl_bootstrap_servers, "SASL_SSL", "SCRAM-SHA-512"),
    )
    await assert_published(bridge, secured_kafka)


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_wrong_password_is_refused_and_the_bridge_spools_instead(
    start_bridge: StartBridge,
    secured_kafka: LocalKafka,
    caplog: pytest.LogCaptureFixture,
    mechanism: str,
) -> None:
    """Topic creation (aiokafka) is the first client, and the broker refuses it."""
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = await start_bridge(
        kafka=False,
        BRIDGE_ACK_TIMEOUT_MS="500",
        **sasl_plaintext_env(secured_kafka, mechanism, wrong=True),
    )
    await assert_refused_but_alive(bridge, caplog)
    assert "SaslAuthenticationFailed" in caplog.text


async def test_wrong_password_is_refused_to_the_librdkafka_producer_too(
    start_bridge: StartBridge, secured_kafka: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Without topic creation the producer (librdkafka) is the first client to be refused."""
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = await start_bridge(
        kafka=False,
        BRIDGE_ACK_TIMEOUT_MS="500",
        BRIDGE_PRODUCER="librdkafka",
        KAFKA_CREATE_TOPICS="false",
        **sasl_plaintext_env(secured_kafka, "SCRAM-SHA-256", wrong=True),
    )
    assert await assert_refused_but_alive(bridge, caplog) == "PublishError"


async def test_ssl_without_the_ca_file_does_not_trust_the_broker(
    start_bridge: StartBridge, secured_kafka: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's CA is not trusted by default: the bridge does verify certificates."""
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = await start_bridge(
        kafka=False,
        BRIDGE_ACK_TIMEOUT_MS="500",
        KAFKA_BOOTSTRAP_SERVERS=secured_kafka.ssl_bootstrap_servers,
        KAFKA_SECURITY_PROTOCOL="SSL",
    )
    await assert_refused_but_alive(bridge, caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
