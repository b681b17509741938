from __future__ import annotations

import orjson
import pytest

from bridge.event import FALLBACK_KEY, identify, normalise_mac, parse_time_ms
from tests.fixtures.samples import DOCUMENTED_SAMPLE, TABLE_VARIANT


def test_both_sender_layouts_give_key_888_and_the_same_event_id() -> None:
    documented = identify(orjson.loads(DOCUMENTED_SAMPLE))
    table = identify(orjson.loads(TABLE_VARIANT))
    assert documented.key == b"888"
    assert table.key == b"888"
    assert documented.event_id == table.event_id
    assert len(documented.event_id) == 32


def test_another_login_time_is_another_event() -> None:
    body = orjson.loads(DOCUMENTED_SAMPLE)
    first = identify(body)
    body["session"]["authenticationTime"] = "2018-01-18T13:27:09+0000"
    assert identify(body).event_id != first.event_id


def test_time_spellings_of_one_instant_are_one_event() -> None:
    body = orjson.loads(DOCUMENTED_SAMPLE)
    first = identify(body)
    body["session"]["authenticationTime"] = "2018-01-18T13:27:08Z"
    assert identify(body).event_id == first.event_id


def test_mac_separators_do_not_change_the_event() -> None:
    body = orjson.loads(DOCUMENTED_SAMPLE)
    first = identify(body)
    body["client"]["mac"] = "00:01:02:03:04:05"
    assert identify(body).event_id == first.event_id


def test_key_falls_back_to_mac_then_constant() -> None:
    body = orjson.loads(DOCUMENTED_SAMPLE)
    del body["user"]["id"]
    assert identify(body).key == b"00:01:02:03:04:05"
    del body["client"]
    assert identify(body).key == FALLBACK_KEY.encode()
    assert identify({}).key == FALLBACK_KEY.encode()


@pytest.mark.parametrize("spelling", ["888", " 888 ", 888.0, "888.0", "888.00"])
def test_spellings_of_one_id_are_one_key_and_one_event(spelling: object) -> None:
    body = orjson.loads(DOCUMENTED_SAMPLE)
    first = identify(body)
    body["user"]["id"] = spelling
    body["user"]["venue"]["id"] = spelling
    assert identify(body) == first


@pytest.mark.parametrize("text", ["888.5", "0888", "888.", ".0", "A1.0"])
def test_other_texts_are_ids_as_written(text: str) -> None:
    assert identify({"user": {"id": text}}).key == text.encode()


def test_boolean_is_not_an_id() -> None:
    assert identify({"user": {"id": True}}).key == FALLBACK_KEY.encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-01-18T13:27:08+0000", 1516282028000),
        ("2018-01-18T13:27:08+00:00", 1516282028000),
        ("2018-01-18T14:27:08+0100", 1516282028000),
        ("2018-01-18T13:27:08", None),
        ("yesterday", None),
        (12, None),
    ],
)
def test_parse_time_ms(text: object, expected: int | None) -> None:
    assert parse_time_ms(text) == expected


def test_normalise_mac_keeps_odd_values_as_they_are() -> None:
    assert normalise_mac("00-01-02-03-04-05") == "00:01:02:03:04:05"
    assert normalise_mac("not-a-mac") == "not-a-mac"
    assert normalise_mac(5) is None


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("2038-10-10T19:46:22.357+0000", 2170352782357),
        ("1952-10-04T08:04:16.988+0000", -544118143012),
        ("1969-12-31T23:59:59.999Z", -1),
        ("0001-01-01T00:00:00.001Z", -62135596799999),
    ],
)
def test_login_times_are_exact_to_the_millisecond_in_any_year(text: str, expected_ms: int) -> None:
    assert parse_time_ms(text) == expected_ms


def test_a_mac_with_surrounding_whitespace_is_the_same_mac() -> None:
    assert normalise_mac("AA-BB-CC-DD-EE-FF\t") == "aa:bb:cc:dd:ee:ff"
    assert normalise_mac(" aa:bb:cc:dd:ee:ff\n") == "aa:bb:cc:dd:ee:ff"
