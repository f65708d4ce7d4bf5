"""The diagnosis for real: scripted sources and consumers that are input-bound, consumer-bound, or held up
by a slow element, each with the verdict and the advice `report()` must give."""

from __future__ import annotations

import time

import pytest
import sources

import mpfeed


def _drain(feeder, step_s=0.0):
    for _ in feeder:
        if step_s:
            time.sleep(step_s)
    time.sleep(0.6)  # the workers' last report of their time


def test_an_io_bound_source_is_input_bound_and_wants_more_workers_than_cores():
    with mpfeed.Feeder(sources.Waits(120, 0.02), workers=2) as feeder:
        _drain(feeder)
        stats, report = feeder.stats(), feeder.report()
    assert stats.wait_fraction > 0.5 and 0 <= stats.recent_wait_fraction <= 1
    assert all(w.busy_s > w.idle_s for w in stats.workers)
    first, *advice = report.splitlines()
    assert first.startswith("input-bound: the consumer waited for input")
    assert any("wait on I/O" in line and "add workers, beyond the" in line for line in advice), report


def test_a_slow_consumer_is_told_the_model_is_the_limit():
    with mpfeed.Feeder(sources.Waits(60, 0.001), workers=2) as feeder:
        _drain(feeder, step_s=0.02)
        stats, report = feeder.stats(), feeder.report()
    assert stats.wait_fraction < 0.05
    assert stats.step_s >= 60 * 0.02 * 0.9
    assert report.startswith("bound by the consumer (the model is the limit)")
    assert "fewer workers would do" in report
    assert all(w.idle_s + w.blocked_s > w.busy_s for w in stats.workers)


def test_a_slow_element_in_ordered_delivery_is_named_as_holding_the_line():
    with mpfeed.Feeder(sources.Slow(200, 5, 1.5, 0.002), workers=3) as feeder:
        _drain(feeder)
        stats, report = feeder.stats(), feeder.report()
    assert stats.head_of_line_s >= 0.5
    assert "input-bound" in report.splitlines()[0]
    assert "slow elements hold the line" in report and "ordered=False" in report


def test_before_any_element_the_report_says_it_cannot_tell_yet():
    with mpfeed.Feeder(sources.Waits(4, 0.0), workers=1) as feeder:
        assert feeder.report() == "not enough elements yet to say what limits training"
        assert feeder.stats().calls == 0


@pytest.mark.parametrize("ordered", [True, False])
def test_stats_account_for_the_consumers_calls(ordered):
    with mpfeed.Feeder(sources.Waits(50, 0.002), workers=2, ordered=ordered) as feeder:
        assert len(list(feeder)) == 50
        stats = feeder.stats()
    assert stats.calls == 51  # 50 elements and the end of the epoch
    assert stats.overhead_s >= 0 and stats.active_workers == 2
    assert stats.wait_s > 0 and 0 < stats.wait_fraction <= 1


# The feeder made well before the first element (a model is built meanwhile): the verdicts must not change.
EARLY_S = 3.0


@pytest.mark.parametrize("through_dataset", [False, True])
def test_a_cpu_bound_worker_is_the_limit_even_when_the_feeder_was_made_early(through_dataset):
    """One worker at 5 ms of CPU an element and a fast consumer: the worker is the limit. Its idle time
    before the first element must not count against it (it once said "busy 21%, idle 79%: the workers are
    not the limit"), nor, through dataset(), the time between its signature peek and the first step."""
    with mpfeed.Feeder(sources.Spins(300, 0.005), workers=1) as feeder:
        if through_dataset:
            pytest.importorskip("tensorflow")
            dataset = feeder.dataset()
            time.sleep(EARLY_S)
            _drain(dataset)
        else:
            time.sleep(EARLY_S)
            _drain(feeder)
        report = feeder.report()
    first, workers, *advice = report.splitlines()
    assert first.startswith("input-bound"), report
    assert workers.startswith("the worker was busy"), report
    assert any(line.startswith("the workers are the limit") for line in advice), report
    assert not any("not the limit" in line for line in advice), report


def test_an_io_bound_source_made_early_still_wants_more_workers():
    with mpfeed.Feeder(sources.Waits(120, 0.02), workers=2) as feeder:
        time.sleep(EARLY_S)
        _drain(feeder)
        report = feeder.report()
    assert report.startswith("input-bound: the consumer waited for input"), report
    assert "wait on I/O" in report and "add workers, beyond the" in report, report


def test_a_slow_consumer_made_early_is_still_told_the_model_is_the_limit():
    with mpfeed.Feeder(sources.Waits(60, 0.001), workers=2) as feeder:
        time.sleep(EARLY_S)
        _drain(feeder, step_s=0.02)
        report = feeder.report()
    assert report.startswith("bound by the consumer (the model is the limit)"), report
    assert "fewer workers would do" in report


def test_a_slow_element_made_early_is_still_named_as_holding_the_line():
    with mpfeed.Feeder(sources.Slow(200, 5, 1.5, 0.002), workers=3) as feeder:
        time.sleep(EARLY_S)
        _drain(feeder)
        report = feeder.report()
    assert "input-bound" in report.splitlines()[0], report
    assert "slow elements hold the line" in report, report
