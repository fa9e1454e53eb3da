"""A candidate's circuit breaker: opens after failures within a window, skips during the cool-down, one trial decides."""

from __future__ import annotations

from releasegate.serving.breaker import Breaker


def test_failures_within_the_window_open_it_and_older_ones_do_not_count():
    changes: list[bool] = []
    breaker = Breaker(3, window=10, cooldown=30, on_change=changes.append)
    for t in (0, 1):
        breaker.record(False, now=t)
    breaker.record(False, now=12)  # the first two are older than the window by now
    assert breaker.allow(now=12) and not breaker.is_open
    breaker.record(False, now=13)
    breaker.record(True, now=13.5)  # a success in between does not reset a closed breaker's window
    breaker.record(False, now=14)
    assert breaker.is_open and changes == [True] and breaker.opened == 1
    assert not breaker.allow(now=14) and not breaker.allow(now=43.9)


def test_after_the_cooldown_one_trial_goes_through_and_its_success_closes_it():
    changes: list[bool] = []
    breaker = Breaker(1, window=10, cooldown=30, on_change=changes.append)
    breaker.record(False, now=0)
    assert breaker.allow(now=30)  # the trial
    assert not breaker.allow(now=30.1)  # the others wait for its outcome
    breaker.record(True, now=30.2)
    assert not breaker.is_open and breaker.allow(now=30.3) and changes == [True, False]


def test_a_failed_trial_opens_it_for_another_cooldown():
    breaker = Breaker(1, window=10, cooldown=30, on_change=None)
    breaker.record(False, now=0)
    assert breaker.allow(now=31)
    breaker.record(False, now=31.5)
    assert breaker.is_open and not breaker.allow(now=61) and breaker.allow(now=61.6) and breaker.opened == 2


def test_a_trial_whose_outcome_never_comes_is_replaced_after_a_cooldown():
    breaker = Breaker(1, window=10, cooldown=30)
    breaker.record(False, now=0)
    assert breaker.allow(now=30)  # its request was cancelled: no outcome
    assert not breaker.allow(now=59) and breaker.allow(now=60.1)


def test_a_late_outcome_of_a_call_from_before_it_opened_changes_nothing():
    breaker = Breaker(1, window=10, cooldown=30)
    breaker.record(False, now=0)
    breaker.record(True, now=1)  # a call let through while closed, ending after the circuit opened
    assert breaker.is_open and not breaker.allow(now=2)
