"""The deadline the pipeline puts around a librdkafka call that can ignore its own timeout."""

from __future__ import annotations

import threading
import time

import pytest

from consumers.pipeline.service import CallHung, call_with_deadline


def test_a_call_that_returns_in_time_is_waited_for() -> None:
    done: list[str] = []
    call_with_deadline(lambda: done.append("sent"), deadline_s=5, name="send_offsets")
    assert done == ["sent"]


def test_what_the_call_raises_reaches_the_caller() -> None:
    def refuse() -> None:
        raise ValueError("coordinator says no")

    with pytest.raises(ValueError, match="coordinator says no"):
        call_with_deadline(refuse, deadline_s=5, name="send_offsets")


def test_a_call_still_blocked_at_the_deadline_is_reported_hung_and_left_running() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(CallHung, match=r"send_offsets did not return within 0\.2 s"):
        call_with_deadline(release.wait, deadline_s=0.2, name="send_offsets")
    assert time.monotonic() - started < 5
    (left,) = [t for t in threading.enumerate() if t.name == "send_offsets"]
    assert left.daemon  # it cannot hold up the exit
    release.set()
    left.join(timeout=5)
    assert not left.is_alive()
