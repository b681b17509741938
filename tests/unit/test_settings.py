from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import build_parser, main, settings_markdown
from bridge.errors import ConfigError
from bridge.settings import BRIDGE_OPTIONS, KAFKA_OPTIONS, MAX_BODY_BYTES_LIMIT, BridgeSettings
from consumers.pipeline.settings import PIPELINE_OPTIONS, PipelineSettings

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
