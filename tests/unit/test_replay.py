"""What ``wifi-bridge replay`` reads from ``--to`` / ``--ago``, and how it counts a move."""

from __future__ import annotations

import pytest

from bridge import cli
from bridge.errors import ConfigError
from consumers.replay import Move, Target, parse_target, skip_refusal

NOW_MS = 1_764_600_000_000  # 2025-12-01T14:40:00Z


@pytest.mark.parametrize(
    ("to", "ago", "expected"),
    [
        ("beginning", None, Target("beginning")),
        ("end", None, Target("end")),
        ("2025-12-01T14:00:00Z", None, Target("time", NOW_MS - 40 * 60_000)),
        ("2025-12-01T15:00:00+01:00", None, Target("time", NOW_MS - 40 * 60_000)),
        (None, "3h", Target("time", NOW_MS - 3 * 3_600_000)),
        (None, "90m", Target("time", NOW_MS - 90 * 60_000)),
        (None, "2d", Target("time", NOW_MS - 2 * 86_400_000)),
        (None, "45s", Target("time", NOW_MS - 45_000)),
    ],
)
def test_targets_are_read_as_documented(to: str | None, ago: str | None, expected: Target) -> None:
    assert parse_target(to, ago, now_ms=NOW_MS) == expected


@pytest.mark.parametrize(
    ("to", "ago", "message"),
    [
        ("2025-12-01T14:00:00", None, "--to must be beginning, end or a time with its offset"),
        ("yesterday", None, "--to must be"),
        ("-3h", None, "use --ago 3h"),
        (None, "3", "--ago must be a duration"),
        (None, "3 weeks", "--ago must be a duration"),
    ],
)
def test_an_unreadable_target_names_the_option(
    to: str | None, ago: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_target(to, ago, now_ms=NOW_MS)


def test_a_move_counts_the_records_read_again_or_skipped() -> None:
    assert Move("t", 0, current=10, new=4, low=0, high=12).rereads == 6
    assert Move("t", 0, current=None, new=4, low=2, high=12).rereads == -2  # from the start: 2
    assert Move("t", 0, current=12, new=None, low=3, high=12).rereads == 9
    assert Move("t", 0, current=4, new=12, low=0, high=12).rereads == -8
    # A stored position past the end (a topic created again) counts from the end.
    assert Move("t", 0, current=50, new=0, low=0, high=12).rereads == 12


def test_a_position_retention_deleted_the_records_of_moves_to_the_start_skipping_nothing() -> None:
    behind = Move("t", 0, current=5, new=None, low=100, high=200)  # --to beginning
    assert (behind.rereads, behind.skips) == (0, 0)
    assert skip_refusal([behind]) is None
    assert Move("t", 0, current=5, new=150, low=100, high=200).skips == 50  # these exist


def test_a_plan_that_skips_unread_records_is_refused_naming_how_many_and_where() -> None:
    moves = [
        Move("visits", 0, current=4, new=12, low=0, high=12),  # 8 never read
        Move("visits", 1, current=10, new=4, low=0, high=12),  # read again: fine
        Move("late", 2, current=None, new=3, low=1, high=9),  # from the start: 2 never read
    ]
    refusal = skip_refusal(moves)
    assert refusal is not None
    assert "skip 10 records not read yet" in refusal
    assert "visits[0] 8" in refusal
    assert "late[2] 2" in refusal
    assert "visits[1]" not in refusal
    assert "--allow-skip" in refusal
    assert skip_refusal(moves[1:2]) is None
    assert skip_refusal([Move("t", 0, current=12, new=12, low=0, high=12)]) is None


@pytest.mark.parametrize(
    ("group", "environ"),
    [
        ("wifi-sink-analytics", {}),
        ("analytics-eu", {"ANALYTICS_GROUP_ID": "analytics-eu"}),
    ],
)
def test_replay_group_refuses_the_analytics_sinks_group_and_names_replay_analytics(
    group: str,
    environ: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its offsets in Kafka are for lag monitoring: moved, the sink would still resume from the
    # positions in its database, and the command's "moved" would have replayed nothing.
    monkeypatch.delenv("ANALYTICS_GROUP_ID", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    arguments = ["replay", "group", group, "--topics", "t", "--to", "beginning", "--execute"]
    assert cli.main([*arguments, "--kafka-bootstrap-servers", "127.0.0.1:1"]) == 2
    error = capsys.readouterr().err
    assert "the analytics sink's group" in error
    assert "wifi-bridge replay analytics" in error
