"""``make run``'s summary table: what makes a row, and the whole run, not reconciled."""

from __future__ import annotations

from typing import Any

from devstack.__main__ import summary

SENT: dict[str, Any] = {
    "sent": {"accepted": 400},
    "expected": {
        "posts": 400,
        "unique_logins": 385,
        "redeliveries": 15,
        "visits": 282,
        "outage_failed": 77,
        "visitors": 164,
    },
}
LANDED: dict[str, Any] = {
    "logins": 385,
    "duplicates": 15,
    "visits": 282,
    "late": 21,
    "dead_letters": 0,
    "crm": 164,
    "missing": [],
    "unexpected": [],
    "ok": True,
}


def row(table: str, label: str) -> str:
    (line,) = (line for line in table.splitlines() if line.startswith(label))
    return line


def test_a_reconciled_run_marks_every_countable_row_ok() -> None:
    table = summary(SENT, LANDED)

    assert row(table, "posts answered 200 by the bridge").split()[-3:] == ["400", "400", "ok"]
    assert row(table, "late logins").split()[-3:] == ["<=", "77", "21"]  # a bound, no mark
    assert table.rstrip().endswith("reconciled: every login once")


def test_a_refused_post_shows_against_what_the_simulator_meant_to_send() -> None:
    sent = {**SENT, "sent": {"accepted": 399}}

    table = summary(sent, {**LANDED, "ok": False})

    assert row(table, "posts answered 200").split()[-3:] == ["400", "399", "MISMATCH"]
    assert table.rstrip().endswith("NOT reconciled")


def test_the_same_number_of_other_logins_is_a_mismatch_and_names_the_ids() -> None:
    landed = {**LANDED, "missing": ["e1", "e2"], "unexpected": ["x9"], "ok": False}

    table = summary(SENT, landed)

    assert row(table, "unique logins").split()[-3:] == ["385", "385", "MISMATCH"]
    assert "  event ids sent, not in the store: 2 (first: e1, e2)" in table
    assert "  event ids in the store, not sent: 1 (first: x9)" in table


def test_dead_letters_that_could_not_be_counted_are_unknown_not_zero() -> None:
    table = summary(SENT, {**LANDED, "dead_letters": None, "ok": False})

    assert row(table, "dead letters").split()[-3:] == ["0", "unknown", "MISMATCH"]
