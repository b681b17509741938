"""Settings of ``wifi-bridge sink crm``: defaults, flags, errors that name the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import build_parser, main
from bridge.errors import ConfigError
from consumers.sinks.crm_settings import CRM_OPTIONS, CrmSettings

ROOT = Path(__file__).resolve().parents[2]


def load(**env: str) -> CrmSettings:
    return CrmSettings.load(None, env)


def test_defaults_need_no_crm_and_run_anywhere() -> None:
    settings = load()
    assert settings.target == "outbox"
    assert settings.topics == ("wifi.auth.visits", "wifi.auth.late")
    assert settings.topic_dlq == "wifi.auth.dlq"
    assert settings.group_id == "wifi-sink-crm"
    assert settings.min_interval_ms == 86_400_000
    assert settings.state_db == Path(".data/crm-sink.db")
    assert (settings.rate_limit_requests, settings.rate_limit_window_s) == (190, 10)
    assert settings.batch_size == 100
    assert settings.metrics_port == 9103
    assert settings.dlq_max_bytes == 1_048_576
    assert (settings.split_after_server_errors, settings.record_max_attempts) == (3, 8)


def test_sink_crm_flag_wins_over_environment() -> None:
    args = build_parser().parse_args(["sink", "crm", "--crm-min-interval-s", "60"])
    settings = CrmSettings.load(args, {"CRM_MIN_INTERVAL_S": "120", "CRM_GROUP_ID": "g"})
    assert settings.min_interval_s == 60
    assert settings.group_id == "g"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CRM_TARGET": "salesforce"}, "CRM_TARGET"),
        ({"CRM_TARGET": "hubspot"}, "CRM_HUBSPOT_TOKEN"),
        ({"CRM_TARGET": "hubspot", "CRM_HUBSPOT_TOKEN": "t", "CRM_BATCH_SIZE": "101"}, "BATCH"),
        ({"CRM_TARGET": "webhook"}, "CRM_WEBHOOK_URL"),
        ({"CRM_TARGET": "webhook", "CRM_WEBHOOK_URL": "http://x/"}, "CRM_WEBHOOK_SECRET"),
        ({"CRM_HUBSPOT_BASE_URL": "api.hubapi.com"}, "CRM_HUBSPOT_BASE_URL"),
        ({"CRM_TOPICS": " , "}, "CRM_TOPICS"),
        ({"CRM_TOPIC_DLQ": "wifi.auth.late"}, "CRM_TOPIC_DLQ"),
        ({"CRM_TOPICS": "a,b", "CRM_TOPIC_DLQ": "b"}, "CRM_TOPIC_DLQ"),
        ({"CRM_MIN_INTERVAL_S": "-1"}, "CRM_MIN_INTERVAL_S"),
        ({"CRM_RATE_LIMIT_REQUESTS": "0"}, "CRM_RATE_LIMIT_REQUESTS"),
        ({"CRM_RETRY_INITIAL_MS": "5000", "CRM_RETRY_MAX_S": "1"}, "CRM_RETRY_INITIAL_MS"),
        ({"CRM_LOG_LEVEL": "LOUD"}, "CRM_LOG_LEVEL"),
        ({"CRM_DLQ_MAX_BYTES": "4096"}, "CRM_DLQ_MAX_BYTES"),
        ({"CRM_SPLIT_AFTER_SERVER_ERRORS": "0"}, "CRM_SPLIT_AFTER_SERVER_ERRORS"),
    ],
)
def test_bad_setting_error_names_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(**env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CRM_TOPICS": "wifi.auth.visits typo"}, "CRM_TOPICS"),
        ({"CRM_TOPICS": "wifi.auth.visits,visits/late"}, "CRM_TOPICS"),
        ({"CRM_TOPICS": ".."}, "CRM_TOPICS"),
        ({"CRM_TOPIC_DLQ": "dead letters"}, "CRM_TOPIC_DLQ"),
        ({"CRM_TOPIC_DLQ": "d" * 250}, "CRM_TOPIC_DLQ"),
    ],
)
def test_a_topic_name_kafka_would_refuse_is_a_setting_error(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{named}: expected a Kafka topic name"):
        load(**env)


def test_topic_names_are_read_trimmed_and_once_each() -> None:
    settings = load(CRM_TOPICS=" a.visits , a_late ,a.visits", CRM_TOPIC_DLQ="a-dlq")
    assert (settings.topics, settings.topic_dlq) == (("a.visits", "a_late"), "a-dlq")


@pytest.mark.parametrize(
    ("name", "largest"), [("CRM_REQUEST_TIMEOUT_S", 240), ("CRM_RATE_LIMIT_WINDOW_S", 300)]
)
def test_a_wait_longer_than_the_consumer_may_go_without_polling_is_refused(
    name: str, largest: int
) -> None:
    assert getattr(load(**{name: str(largest)}), name.removeprefix("CRM_").lower()) == largest
    with pytest.raises(ConfigError, match=rf"{name}: expected at least 1 and at most {largest}"):
        load(**{name: str(largest + 1)})


def test_sink_crm_reports_a_configuration_error_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_TARGET", "hubspot")
    monkeypatch.delenv("CRM_HUBSPOT_TOKEN", raising=False)
    assert main(["sink", "crm"]) == 2
    assert "CRM_HUBSPOT_TOKEN" in capsys.readouterr().err


def test_readme_documents_every_crm_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in CRM_OPTIONS:
        assert re.search(rf"`{option.env}`", readme), f"{option.env} missing from README"
