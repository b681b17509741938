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
