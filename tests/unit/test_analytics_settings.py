"""Settings of ``wifi-bridge sink analytics``: safe defaults, errors that name the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import build_parser, main, settings_markdown
from bridge.errors import ConfigError
from consumers.sinks.analytics.settings import ANALYTICS_OPTIONS, AnalyticsSettings

ROOT = Path(__file__).resolve().parents[2]


def load(**env: str) -> AnalyticsSettings:
    return AnalyticsSettings.load(None, env)


def test_defaults_need_nothing_running_but_kafka() -> None:
    settings = load()
    assert settings.store.kind == "duckdb"
    assert settings.store.path == Path(".data/analytics.duckdb")
    assert settings.topics == ("wifi.auth.visits", "wifi.auth.late")
    assert settings.topic_dlq == "wifi.auth.dlq"
    assert settings.group_id == "wifi-sink-analytics"
    assert settings.metrics_port == 9102


@pytest.mark.parametrize(
    ("url", "kind", "path"),
    [
        ("postgresql://sink@db.internal:5432/analytics", "postgresql", None),
        ("postgres://sink@db/analytics", "postgresql", None),
        # No host: PGHOST, else the local Unix socket, as libpq does.
        ("postgresql:///analytics", "postgresql", None),
        ("postgresql://sink@/analytics", "postgresql", None),
        ("duckdb:///data/a.duckdb", "duckdb", Path("data/a.duckdb")),
        ("duckdb:////var/lib/a.duckdb", "duckdb", Path("/var/lib/a.duckdb")),
    ],
)
def test_analytics_url_selects_the_store(url: str, kind: str, path: Path | None) -> None:
    store = load(ANALYTICS_URL=url).store
    assert (store.kind, store.path) == (kind, path)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ANALYTICS_URL": "mysql://root:hunter2@db/x"}, "ANALYTICS_URL"),
        ({"ANALYTICS_URL": "analytics.duckdb"}, "ANALYTICS_URL"),
        ({"ANALYTICS_URL": "duckdb://relative.duckdb"}, "ANALYTICS_URL"),
        # In memory, everything written would be lost at exit, and unreadable to the report.
        ({"ANALYTICS_URL": "duckdb:///:memory:"}, "ANALYTICS_URL"),
        ({"ANALYTICS_URL": "duckdb:///:MEMORY:analytics"}, "ANALYTICS_URL"),
        ({"ANALYTICS_URL": "postgresql://u:hunter2@db:port/x"}, "ANALYTICS_URL"),
        ({"ANALYTICS_TOPICS": " , "}, "ANALYTICS_TOPICS"),
        ({"ANALYTICS_TOPIC_DLQ": "wifi.auth.late"}, "ANALYTICS_TOPIC_DLQ"),
        ({"ANALYTICS_BATCH_MAX_RECORDS": "0"}, "ANALYTICS_BATCH_MAX_RECORDS"),
        ({"ANALYTICS_METRICS_PORT": "http"}, "ANALYTICS_METRICS_PORT"),
        ({"ANALYTICS_COMMIT_KAFKA_OFFSETS": "perhaps"}, "ANALYTICS_COMMIT_KAFKA_OFFSETS"),
        ({"ANALYTICS_LOG_LEVEL": "chatty"}, "ANALYTICS_LOG_LEVEL"),
        # PostgreSQL's largest statement_timeout is 2147483647 ms: a larger one made every
        # connection fail with a parameter error, retried for ever without naming the setting.
        ({"ANALYTICS_STATEMENT_TIMEOUT_MS": "2147483648"}, "ANALYTICS_STATEMENT_TIMEOUT_MS"),
    ],
)
def test_bad_setting_error_names_the_setting_and_hides_passwords(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        load(**env)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ANALYTICS_TOPICS": "wifi auth visits"}, "ANALYTICS_TOPICS"),
        ({"ANALYTICS_TOPICS": "wifi.auth.visits,visits/late"}, "ANALYTICS_TOPICS"),
        ({"ANALYTICS_TOPIC_DLQ": "dead letters"}, "ANALYTICS_TOPIC_DLQ"),
    ],
)
def test_a_topic_name_kafka_would_refuse_is_a_setting_error(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{named}: expected a Kafka topic name"):
        load(**env)


def test_a_topic_named_twice_is_read_once_in_the_order_given() -> None:
    settings = load(ANALYTICS_TOPICS="wifi.auth.visits, wifi.auth.late,wifi.auth.visits")
    assert settings.topics == ("wifi.auth.visits", "wifi.auth.late")


def test_flag_wins_over_environment() -> None:
    args = build_parser().parse_args(["sink", "analytics", "--analytics-group-id", "replay-1"])
    settings = AnalyticsSettings.load(args, {"ANALYTICS_GROUP_ID": "from-env"})
    assert settings.group_id == "replay-1"


def test_cli_reports_a_bad_analytics_url_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANALYTICS_URL", "sqlite:///x.db")
    assert main(["sink", "analytics"]) == 2
    assert "ANALYTICS_URL" in capsys.readouterr().err


def test_readme_documents_every_analytics_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in ANALYTICS_OPTIONS:
        assert re.search(rf"`{option.env}`", readme), f"{option.env} missing from README"
    assert settings_markdown().strip() in readme
