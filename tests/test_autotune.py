"""workers="auto" for real: an I/O-bound source grows its workers, a slow consumer shrinks them, the data
never changes, and adjusting survives closing and a worker's death. Behaviour only; speed is make bench's."""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil
import pytest
import sources

import mpfeed

HANG_BOUND_S = 30


def _iterate_for(feeder, seconds, step_s=0.0, labels=None):
    started = time.monotonic()
    iterator = iter(feeder)
    for _, label in iterator:
        if labels is not None:
            labels.append(int(label))
        if step_s:
            time.sleep(step_s)
        if time.monotonic() - started > seconds:
            return iterator
    return iterator


def test_an_io_bound_source_grows_its_workers_to_a_stable_count_and_logs_why(caplog):
    caplog.set_level(logging.INFO, logger="mpfeed")
    with mpfeed.Feeder(sources.Waits(10**6, 0.01), workers="auto", max_workers=8) as feeder:
        assert feeder.stats().active_workers == min(len(os.sched_getaffinity(0)), 8)
        _iterate_for(feeder, 12)
        stats = feeder.stats()
    assert stats.active_workers == 8, stats.worker_changes
    assert all(change.after > change.before for change in stats.worker_changes)
    assert all("waiting on I/O" in change.reason for change in stats.worker_changes)
    assert len(stats.workers) == 8, "workers start as they are needed"
    assert any("mpfeed autotune: workers" in record.getMessage() for record in caplog.records)


def test_a_slow_consumer_keeps_at_most_two_workers_busy():
    with mpfeed.Feeder(sources.Waits(10**6, 0.001), workers="auto") as feeder:
        _iterate_for(feeder, 6, step_s=0.02)
        stats = feeder.stats()
    assert stats.active_workers <= 2
    assert all(change.after < change.before for change in stats.worker_changes)


def test_adjusting_never_changes_what_is_delivered():
    n = 1500
    with mpfeed.Feeder(sources.Waits(n, 0.01), workers=3, shuffle=True, seed=5) as fixed:
        expected = [int(label) for _, label in fixed]
    with mpfeed.Feeder(sources.Waits(n, 0.01), workers="auto", max_workers=12, shuffle=True, seed=5) as auto:
        got = [int(label) for _, label in auto]
        changes = auto.stats().worker_changes
    assert changes, "the worker count changed during the epoch"
    assert got == expected


def test_closing_while_adjusting_stops_cleanly():
    feeder = mpfeed.Feeder(sources.Waits(10**6, 0.01), workers="auto", max_workers=16)
    try:
        _iterate_for(feeder, 4)
        assert feeder.stats().worker_changes
        processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
        started = time.monotonic()
    finally:
        feeder.close()  # a failed check above must not leave workers to the next test
    assert time.monotonic() - started < HANG_BOUND_S
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive


def test_a_worker_killed_while_the_count_grows_is_reported():
    with mpfeed.Feeder(sources.Waits(10**6, 0.01), workers="auto", max_workers=16) as feeder:
        iterator = _iterate_for(feeder, 3)
        victim = feeder.stats().workers[-1]
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(mpfeed.WorkerDiedError, match=f"pid {victim.pid}.*SIGKILL"):
            for _ in iterator:
                pass


def test_a_generator_source_keeps_its_shards():
    with mpfeed.Feeder(sources.numbered, args=(40,), workers="auto") as feeder:
        assert [e["i"] for e in feeder] == list(range(40))
        stats = feeder.stats()
    assert stats.active_workers == len(os.sched_getaffinity(0)) and stats.worker_changes == ()


def test_max_workers_needs_auto():
    with pytest.raises(ValueError, match='max_workers goes with workers="auto"'):
        mpfeed.Feeder(sources.Numbers(4), workers=2, max_workers=4)
    with pytest.raises(ValueError, match="workers must be"):
        mpfeed.Feeder(sources.Numbers(4), workers="many")


def test_growing_never_takes_the_rings_past_the_budget():
    budget = 8 * 3 * 4096  # 8 workers at most, 3 one-page slots each (a record of Waits is tiny)
    with mpfeed.Feeder(
        sources.Waits(10**6, 0.01), workers="auto", max_workers=8, shm_budget=budget
    ) as feeder:
        _iterate_for(feeder, 8)
        stats = feeder.stats()
    assert stats.active_workers > 2 and len(stats.workers) > 2
    assert 0 < stats.shm_bytes <= stats.shm_budget == budget
