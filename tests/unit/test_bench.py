"""The receiver benchmark posts valid, distinct logins (a broken body would take slow paths)."""

from __future__ import annotations

import orjson

from bench.__main__ import _LUA, _sample_template
from bridge.event import identify, parse_time_ms


def test_the_load_script_fills_the_minute_first_then_the_user_id() -> None:
    template = _sample_template()
    assert "string.format(template, counter % 60, counter)" in _LUA % template
    bodies = [orjson.loads(template % (n % 60, n)) for n in (1, 59, 7852)]
    assert [body["user"]["id"] for body in bodies] == [1, 59, 7852]
    assert all(parse_time_ms(body["session"]["authenticationTime"]) for body in bodies)
    assert len({identify(body).event_id for body in bodies}) == 3


def test_the_pipeline_input_is_distinct_logins_with_a_share_of_redeliveries() -> None:
    from bench.pipeline import make_records

    records = make_records(records=2000)
    event_ids = [dict(record.headers)["event-id"] for record in records]
    redeliveries = len(event_ids) - len(set(event_ids))
    assert 40 <= redeliveries <= 160  # about 5%
    for record in records[:50]:
        body = orjson.loads(record.value)
        assert record.key == str(body["user"]["id"]).encode()
        assert dict(record.headers)["event-id"] == identify(body).event_id.encode()
