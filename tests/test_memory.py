"""Memory stays fixed over a long run: the rings bound it, and nothing accumulates per element."""

from __future__ import annotations

import psutil
import sources

import mpfeed

ELEMENTS = 100_000
RSS_GROWTH_BOUND = 4 << 20  # measured growth is 0 here from 10,000 to 100,000 elements


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
