"""Memory stays fixed over a long run: the rings bound it, and nothing accumulates per element."""

from __future__ import annotations

import tracemalloc

import psutil
import pytest
import sources

import mpfeed
from mpfeed import progress

ELEMENTS = 100_000
RSS_GROWTH_BOUND = 4 << 20  # a leak bound, with room for the allocator; results.md has the growth measured


def test_rss_stays_flat_over_100000_elements(start_method):
    me = psutil.Process()
    with mpfeed.Feeder(sources.tiny, args=(ELEMENTS,), workers=2, start_method=start_method) as feeder:
        for k, _ in enumerate(feeder):
            if k == 10_000:
                consumer_start = me.memory_info().rss
                workers_start = [w.rss_bytes for w in feeder.stats().workers]
        consumer_end = me.memory_info().rss
        workers_end = [w.rss_bytes for w in feeder.stats().workers]
        assert feeder.stats().items == ELEMENTS
    assert consumer_end - consumer_start <= RSS_GROWTH_BOUND
    for start, end in zip(workers_start, workers_end):
        assert 0 < start and end - start <= RSS_GROWTH_BOUND


@pytest.mark.parametrize("ordered", [True, False])
def test_the_consumer_keeps_nothing_per_record_of_a_random_access_epoch(ordered, monkeypatch):
    """Old code: the consumer kept an entry per record delivered until the next epoch (63.5 B a record
    ordered, 81 B first-ready): a 100-million-record epoch needed 6-7.5 GiB. It keeps a window of recent
    records now (shortened here, so that the test passes it soon), and nothing it allocates past that
    window stays: the traced memory is as flat over 20,000 records as over none."""
    monkeypatch.setattr(progress, "HISTORY", 2_000)
    with mpfeed.Feeder(sources.Numbers(40_000, shape=(1,)), workers=2, ordered=ordered) as feeder:
        iterator = iter(feeder)
        for _ in range(1_000):
            next(iterator)
        tracemalloc.start()
        try:
            for _ in range(5_000):  # past the window: it is full of records traced from here on
                next(iterator)
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20_000):
                next(iterator)
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        state = feeder.state_dict(consumed=26_000 - 1_500)  # within the window: still exact
        with pytest.raises(ValueError, match="the feeder remembers the last 2000"):
            feeder.state_dict(consumed=26_000 - 2_500)
    assert kept < 100_000, f"{kept} bytes kept over 20,000 records"  # old code: 1,270,000 and more
    assert state["position"] == 24_500 or not ordered
