"""Which CRM request to send next, and when a contact the CRM answers 5xx for is given up."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from consumers.sinks.crm_requests import Outcome, RequestQueue

Fails = Callable[[list[str], int], bool]


def queue_of(
    items: list[str], *, size: int = 100, split_after: int = 3, max_attempts: int = 8
) -> RequestQueue[str]:
    return RequestQueue(
        items, max_batch_size=size, split_after=split_after, max_attempts=max_attempts
    )


def drive(
    queue: RequestQueue[str],
    fails: Fails,
    *,
    max_steps: int = 10_000,
    given_up_at: dict[str, tuple[int, bool]] | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """Send every request until the queue is empty (or ``max_steps``): what the CRM accepted,
    what was given up (into ``given_up_at``: at which step, and whether nothing else was
    waiting then), and the size of each request sent. ``fails(items, step)`` is the CRM."""
    accepted: list[str] = []
    given_up: list[str] = []
    sizes: list[int] = []
    for step in range(max_steps):
        if not queue:
            break
        request = queue.pop()
        sizes.append(len(request.items))
        if fails(request.items, step):
            if queue.server_error(request) is Outcome.GIVE_UP:
                given_up += request.items
                if given_up_at is not None:
                    given_up_at |= dict.fromkeys(request.items, (step, not queue))
        else:
            queue.accepted(request)
            accepted += request.items
    return accepted, given_up, sizes


def contacts(count: int) -> list[str]:
    return [f"c{n}" for n in range(count)]


def test_requests_hold_at_most_the_batch_size() -> None:
    queue = queue_of(contacts(250), size=100)
    assert [len(queue.pop().items) for _ in range(len(queue))] == [100, 100, 50]


def test_a_request_the_crm_answers_5xx_waits_behind_the_others() -> None:
    queue = queue_of(contacts(4), size=2)
    first = queue.pop()
    assert queue.server_error(first) is Outcome.RETRY
    assert queue.pop().items == ["c2", "c3"]
    assert queue.pop() is first


def test_a_request_of_several_is_split_in_halves_after_repeated_5xx() -> None:
    queue = queue_of(contacts(5), split_after=3)
    for _ in range(2):
        request = queue.pop()
        assert queue.server_error(request) is Outcome.RETRY
    assert queue.pop() is request
    assert queue.server_error(request) is Outcome.SPLIT
    assert [queue.pop().items for _ in range(len(queue))] == [["c0", "c1"], ["c2", "c3", "c4"]]


def test_a_contact_the_crm_fails_on_is_isolated_and_alone_given_up_while_others_sync() -> None:
    items = contacts(10)
    batch = queue_of(items, split_after=3, max_attempts=8)
    accepted, given_up, sizes = drive(batch, lambda part, _: "c6" in part)
    assert sorted(accepted) == sorted(set(items) - {"c6"})
    assert given_up == ["c6"]
    assert not batch
    # the requests of 10, 5 and 2 holding it fail 3 times each; alone, its partner is
    # accepted and it fails 8 times
    assert sizes.count(1) == 1 + 8


def test_a_lone_contact_failing_from_the_start_waits_for_other_work_to_show_the_crm_up() -> None:
    batch = queue_of(["alone"], max_attempts=3)
    accepted, given_up, _ = drive(batch, lambda part, _: "alone" in part, max_steps=100)
    assert (accepted, given_up) == ([], [])
    stuck = batch.needs_other_work
    assert stuck
    batch.add(["later0", "later1"])
    assert not batch.needs_other_work
    accepted, given_up, sizes = drive(batch, lambda part, _: "alone" in part)
    assert (accepted, given_up, sizes) == (["later0", "later1"], ["alone"], [2, 1])


def test_an_outage_gives_nothing_up_however_long_it_lasts() -> None:
    items = contacts(12)
    queue = queue_of(items, split_after=1, max_attempts=1)
    accepted, given_up, sizes = drive(queue, lambda part, step: step < 5_000)
    assert given_up == []
    assert sorted(accepted) == sorted(items)
    # by the end of it every contact was sent alone, and each was accepted once
    assert sizes[-12:] == [1] * 12


def test_a_lone_contact_is_given_up_once_the_crm_took_another_after_its_first_failure() -> None:
    queue = queue_of(["p", "a", "b"], size=1, max_attempts=2)
    p = queue.pop()
    assert queue.server_error(p) is Outcome.RETRY  # first failure
    queue.accepted(queue.pop())
    queue.accepted(queue.pop())
    assert queue.pop() is p
    assert queue.server_error(p) is Outcome.GIVE_UP


def test_a_contact_whose_failures_all_follow_the_last_acceptance_is_never_given_up() -> None:
    # The CRM took a request, then went down: the acceptance is older than the contact's
    # previous attempt, so it says nothing about the CRM now.
    queue = queue_of(["a", "p"], size=1, max_attempts=2)
    queue.accepted(queue.pop())
    for _ in range(50):
        p = queue.pop()
        assert queue.server_error(p) is Outcome.RETRY
    assert queue.needs_other_work


def test_a_contact_is_not_given_up_when_another_request_failed_after_the_acceptance() -> None:
    queue = queue_of(["p", "q", "ok"], size=1, max_attempts=1)
    p, q, ok = queue.pop(), queue.pop(), queue.pop()
    queue.accepted(ok)
    queue.unavailable(q)  # a timeout: the CRM may be going down
    assert queue.server_error(p) is Outcome.RETRY
    assert queue.pop() is q
    queue.accepted(q)
    assert queue.pop() is p
    assert queue.server_error(p) is Outcome.GIVE_UP


def test_two_contacts_the_crm_fails_on_are_both_given_up_once_other_work_shows_it_up() -> None:
    queue = queue_of(["good", "bad1", "bad2"], split_after=1, max_attempts=2)
    _, given_up, _ = drive(queue, lambda part, _: bool({"bad1", "bad2"} & set(part)))
    assert given_up == []
    assert queue.needs_other_work
    for n in range(4):
        queue.add([f"later{n}"])
        _, more, _ = drive(queue, lambda part, _: bool({"bad1", "bad2"} & set(part)))
        given_up += more
    assert sorted(given_up) == ["bad1", "bad2"]


def test_a_4xx_splits_at_once_and_a_lone_contact_is_refused() -> None:
    queue = queue_of(contacts(3))
    request = queue.pop()
    assert queue.refused(request)
    halves = [queue.pop(), queue.pop()]
    assert [h.items for h in halves] == [["c0"], ["c1", "c2"]]
    assert not queue.refused(halves[0])


def test_a_rate_limited_request_is_sent_first_again_and_never_split() -> None:
    queue = queue_of(contacts(4), size=2, split_after=1)
    request = queue.pop()
    for _ in range(10):
        queue.unavailable(request)
        assert queue.pop() is request
    assert request.items == ["c0", "c1"]


def test_a_request_the_rate_limit_held_back_goes_first_and_counts_as_no_failure() -> None:
    # Held back by the client's own limiter, it never reached the CRM: the lone contact
    # that failed alone is still given up once the CRM takes the other request.
    queue = queue_of(["p", "a"], size=1, max_attempts=1)
    p = queue.pop()
    assert queue.server_error(p) is Outcome.RETRY
    held = queue.pop()
    queue.deferred(held)
    assert queue.pop() is held
    queue.accepted(held)
    assert queue.pop() is p
    assert queue.server_error(p) is Outcome.GIVE_UP


def test_items_a_taken_request_answered_retryable_are_retried_for_as_long_as_the_crm_fails() -> (
    None
):
    # The CRM took the others of the request; it goes on failing on these, and on everything
    # else: an outage, never given up however many tries.
    queue = queue_of(["a", "b", "c"], max_attempts=2)
    request = queue.pop()
    queue.accepted(request)
    assert queue.failed_in_part(request, ["b", "c"]) is Outcome.RETRY
    accepted, given_up, sizes = drive(queue, lambda part, _: True, max_steps=200)
    assert (accepted, given_up) == ([], [])
    assert sizes[-2:] == [1, 1]  # split, but each still waits for the CRM
    assert queue.needs_other_work


def test_a_contact_answered_retryable_alone_is_given_up_once_the_crm_takes_other_work() -> None:
    queue = queue_of(["a", "p"], max_attempts=2)
    request = queue.pop()
    queue.accepted(request)
    assert queue.failed_in_part(request, ["p"]) is Outcome.RETRY
    p = queue.pop()
    assert queue.server_error(p) is Outcome.RETRY  # still nothing else taken since
    queue.add(["later"])
    queue.accepted(queue.pop())
    assert queue.pop() is p
    assert queue.server_error(p) is Outcome.GIVE_UP


def test_items_to_retry_go_first_in_one_request() -> None:
    queue = queue_of(contacts(2))
    queue.pop()
    queue.add_first(["c1"])
    queue.add_first([])
    assert [queue.pop().items for _ in range(len(queue))] == [["c1"]]


@pytest.mark.parametrize("seed", range(200))
def test_a_good_contact_is_given_up_only_when_an_outage_starts_after_its_turn_came(
    seed: int,
) -> None:
    draw = random.Random(seed)
    items = contacts(draw.randrange(1, 40))
    poison = set(draw.sample(items, k=min(len(items), draw.randrange(0, 4))))
    outages = [(s, s + draw.randrange(1, 300)) for s in sorted(draw.sample(range(1000), 3))]

    def down(step: int) -> bool:
        return any(start <= step < end for start, end in outages)

    def fails(part: list[str], step: int) -> bool:
        return down(step) or bool(poison & set(part))

    queue = queue_of(
        items,
        size=draw.randrange(1, 30),
        split_after=draw.randrange(1, 4),
        max_attempts=draw.randrange(1, 9),
    )
    given_up_at: dict[str, tuple[int, bool]] = {}
    accepted, given_up, _ = drive(queue, fails, max_steps=3000, given_up_at=given_up_at)
    # Every contact ends once: accepted, given up, or (one the CRM fails on, with nothing
    # left that could show the CRM up) waiting for other work.
    waiting = list(queue.items())
    assert sorted(accepted + given_up + waiting) == sorted(items)
    assert set(accepted).isdisjoint(poison)
    assert set(waiting) <= poison
    assert not waiting or queue.needs_other_work
    # A good contact is given up only in what no observer could tell from a contact the CRM
    # chokes on: an outage begins right after the CRM accepted the others, and this contact
    # (which failed before) is the first one sent, or the only one left. Never later in an
    # outage while others wait, and never while the CRM is up.
    for contact in set(given_up) - poison:
        step, alone = given_up_at[contact]
        assert down(step), (contact, step, outages)
        assert alone or not down(step - 1), (contact, step, outages)
