from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import build_parser, main, settings_markdown
from bridge.errors import ConfigError
from bridge.settings import BRIDGE_OPTIONS, KAFKA_OPTIONS, MAX_BODY_BYTES_LIMIT, BridgeSettings
from consumers.pipeline.settings import PIPELINE_OPTIONS, PipelineSettings
from devkafka.broker import ensure_tls_material, free_port

ROOT = Path(__file__).resolve().parents[2]


def load(**env: str) -> BridgeSettings:
    return BridgeSettings.load(None, env)


def test_defaults_are_safe_for_local_use() -> None:
    settings = load()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.webhook_url_path == "/webhooks/bt-wifi"
    assert settings.topic_raw == "wifi.auth.raw"
    assert settings.max_body_bytes == 65536
    assert settings.ack_timeout_ms < 10000


def test_flag_wins_over_environment() -> None:
    args = build_parser().parse_args(["serve", "--bridge-port", "9001"])
    settings = BridgeSettings.load(args, {"BRIDGE_PORT": "9000", "BRIDGE_HOST": "127.0.0.1"})
    assert settings.port == 9001
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_PORT": "eighty"}, "BRIDGE_PORT"),
        ({"BRIDGE_PORT": "70000"}, "BRIDGE_PORT"),
        ({"BRIDGE_ACK_TIMEOUT_MS": "15000"}, "BRIDGE_ACK_TIMEOUT_MS"),
        ({"BRIDGE_SHUTDOWN_TIMEOUT_S": "0"}, "BRIDGE_SHUTDOWN_TIMEOUT_S: expected at least 1"),
        ({"BRIDGE_TOKEN": "short"}, "BRIDGE_TOKEN"),
        ({"BRIDGE_WEBHOOK_PATH": "webhooks"}, "BRIDGE_WEBHOOK_PATH"),
        ({"BRIDGE_ALLOWED_CIDRS": "10.0.0.0/8,nonsense"}, "BRIDGE_ALLOWED_CIDRS"),
        ({"BRIDGE_BASIC_AUTH_USERNAME": "u"}, "BRIDGE_BASIC_AUTH_PASSWORD"),
        ({"BRIDGE_TLS_CERTFILE": "/nonexistent.pem"}, "BRIDGE_TLS_CERTFILE"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_MIN_INSYNC_REPLICAS": "2"}, "KAFKA_MIN_INSYNC_REPLICAS"),
        ({"KAFKA_CREATE_TOPICS": "maybe"}, "KAFKA_CREATE_TOPICS"),
    ],
)
def test_bad_setting_error_names_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(**env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_TOPIC_RAW": "wifi auth raw"}, "BRIDGE_TOPIC_RAW"),
        ({"BRIDGE_TOPIC_RAW": "."}, "BRIDGE_TOPIC_RAW"),
        ({"BRIDGE_TOPIC_RAW": ".."}, "BRIDGE_TOPIC_RAW"),
        ({"BRIDGE_TOPIC_RAW": "t" * 250}, "BRIDGE_TOPIC_RAW"),
        ({"BRIDGE_TOPIC_DLQ": "wifi/dlq"}, "BRIDGE_TOPIC_DLQ"),
        ({"BRIDGE_TOPIC_DLQ": "wifi.dlq\u00e9"}, "BRIDGE_TOPIC_DLQ"),
        ({"BRIDGE_WEBHOOK_PATH": "/webhooks/{token}"}, "BRIDGE_WEBHOOK_PATH"),
        ({"BRIDGE_WEBHOOK_PATH": "/webhooks}"}, "BRIDGE_WEBHOOK_PATH"),
        ({"BRIDGE_WEBHOOK_PATH": "/webhooks?x=1"}, "BRIDGE_WEBHOOK_PATH"),
        ({"BRIDGE_WEBHOOK_PATH": "/web hooks"}, "BRIDGE_WEBHOOK_PATH"),
        ({"BRIDGE_HOST": "not a host"}, "BRIDGE_HOST"),
        ({"BRIDGE_HOST": "-bad.example.org"}, "BRIDGE_HOST"),
        ({"BRIDGE_HOST": "bad..example.org"}, "BRIDGE_HOST"),
        ({"BRIDGE_HOST": "127.0.0.1:8080"}, "BRIDGE_HOST"),
    ],
)
def test_topic_path_and_host_are_checked_when_the_settings_load(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load(**env)


def test_legal_topics_paths_and_hosts_load() -> None:
    settings = load(
        BRIDGE_TOPIC_RAW="t" * 249,
        BRIDGE_TOPIC_DLQ="wifi_auth-dlq.v1",
        BRIDGE_WEBHOOK_PATH="/hooks/bt-wifi.v1/",
        BRIDGE_HOST="[::1]",
    )
    assert (settings.topic_raw, settings.topic_dlq) == ("t" * 249, "wifi_auth-dlq.v1")
    assert settings.webhook_path == "/hooks/bt-wifi.v1"
    assert settings.host == "::1"
    assert load(BRIDGE_HOST="bridge-0.bridge.wifi.svc.cluster.local").host.startswith("bridge-0")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certificate with its key (broker.*), another key (client.key), an encrypted key."""
    directory = tmp_path_factory.mktemp("tls")
    ensure_tls_material(directory, "localhost")
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            "broker.key",
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            "enc.key",
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    (directory / "junk.pem").write_text("not a PEM file\n")
    return directory


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("junk.pem", "broker.key", "BRIDGE_TLS_CERTFILE: .* is not a readable PEM certificate"),
        ("broker.key", "broker.key", "BRIDGE_TLS_CERTFILE: .* is not a readable PEM certificate"),
        ("broker.pem", "junk.pem", "BRIDGE_TLS_KEYFILE: .* is not a readable PEM private key"),
        ("broker.pem", "client.key", "BRIDGE_TLS_KEYFILE: .* of the certificate.*MISMATCH"),
        ("broker.pem", "enc.key", "BRIDGE_TLS_KEYFILE: .* is encrypted"),
    ],
)
def test_tls_files_that_cannot_serve_https_are_refused_naming_the_setting(
    tls_files: Path, cert: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(BRIDGE_TLS_CERTFILE=str(tls_files / cert), BRIDGE_TLS_KEYFILE=str(tls_files / key))


def test_a_certificate_with_its_key_loads(tls_files: Path) -> None:
    cert, key = tls_files / "broker.pem", tls_files / "broker.key"
    settings = load(BRIDGE_TLS_CERTFILE=str(cert), BRIDGE_TLS_KEYFILE=str(key))
    assert settings.tls_certfile == cert


def serve_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        "BRIDGE_PORT": str(free_port()),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing there: not needed
        "BRIDGE_LOG_FORMAT": "text",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_TOPIC_RAW": "wifi raw"}, "BRIDGE_TOPIC_RAW: expected a Kafka topic name"),
        ({"BRIDGE_WEBHOOK_PATH": "/hooks/{id}"}, "BRIDGE_WEBHOOK_PATH: expected a path"),
        ({"BRIDGE_TLS_CERTFILE": "junk.pem", "BRIDGE_TLS_KEYFILE": "broker.key"}, "CERTFILE"),
        # Well formed, but it resolves to nothing: found only when the server binds.
        ({"BRIDGE_HOST": "no-such-host.invalid"}, "BRIDGE_HOST: cannot listen on"),
    ],
)
def test_serve_prints_a_bad_setting_with_its_flag_and_exits_2_without_a_traceback(
    tmp_path: Path, tls_files: Path, env: dict[str, str], named: str
) -> None:
    env = {k: str(tls_files / v) if "TLS" in k else v for k, v in env.items()}
    result = serve_process(tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    flag = "--" + next(iter(env)).lower().replace("_", "-")
    assert f"(flag {flag}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_refuses_a_spool_whose_corrupt_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "corrupt").write_text("not a directory")
    result = serve_process(tmp_path)
    assert result.returncode == 2, result.stderr
    assert "BRIDGE_SPOOL_DIR: cannot use" in result.stderr
    assert "corrupt is not a directory (flag --bridge-spool-dir)" in result.stderr


def test_a_body_limit_past_what_kafka_takes_by_default_is_refused() -> None:
    assert load(BRIDGE_MAX_BODY_BYTES=str(MAX_BODY_BYTES_LIMIT)).max_body_bytes == 983040
    with pytest.raises(ConfigError, match=r"BRIDGE_MAX_BODY_BYTES: at most 983040 .*max\.bytes"):
        load(BRIDGE_MAX_BODY_BYTES=str(16 * 1024 * 1024))


def test_cli_reports_a_configuration_error_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_PORT", "eighty")
    assert main(["serve"]) == 2
    assert "BRIDGE_PORT" in capsys.readouterr().err


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in KAFKA_OPTIONS + BRIDGE_OPTIONS + PIPELINE_OPTIONS:
        assert re.search(rf"`{option.env}`", readme), f"{option.env} missing from README"
    assert settings_markdown().strip() in readme


def test_pipeline_defaults_follow_the_issue_and_name_the_changelog_after_the_group() -> None:
    settings = PipelineSettings.load(None, {"PIPELINE_INSTANCE_ID": "p-0"})
    assert settings.group_id == "wifi-pipeline"
    assert settings.topic_changelog == "wifi-pipeline-changelog"
    assert settings.transactional_id == "wifi-pipeline-p-0"
    assert settings.windows.dedup_window_ms == 24 * 3600 * 1000
    assert settings.windows.lateness_ms == 120_000
    assert settings.windows.visit_gap_ms == 30 * 60 * 1000


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PIPELINE_LATENESS_S": "-1"}, "PIPELINE_LATENESS_S"),
        ({"PIPELINE_DEDUP_WINDOW_S": "a day"}, "PIPELINE_DEDUP_WINDOW_S"),
        ({"PIPELINE_VISIT_GAP_S": "100000"}, "PIPELINE_VISIT_RETENTION_S"),
        (
            {"PIPELINE_DEDUP_WINDOW_S": "60", "PIPELINE_LATENESS_S": "120"},
            r"PIPELINE_DEDUP_WINDOW_S \(60\) must be at least PIPELINE_LATENESS_S \(120\)",
        ),
        ({"PIPELINE_COMMIT_INTERVAL_MS": "0"}, "PIPELINE_COMMIT_INTERVAL_MS"),
        ({"PIPELINE_COMMIT_INTERVAL_MS": "10000"}, "PIPELINE_TRANSACTION_TIMEOUT_MS"),
        ({"PIPELINE_LOG_LEVEL": "LOUD"}, "PIPELINE_LOG_LEVEL"),
    ],
)
def test_bad_pipeline_setting_error_names_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        PipelineSettings.load(None, env)
