"""The position after any of the recent records, rebuilt from the window of recent deliveries: exact, and
found by walking back from the latest delivery, so that going back a whole window costs a walk of that
window (indexing a deque costs a walk to the middle each time: 30 ms for a whole window of 65,536)."""

from __future__ import annotations

from collections import deque

import pytest

from mpfeed import progress

WINDOW = 1_000


class IndexCountingDeque(deque):
    """A deque that counts reads by index."""

    indexed = 0

    def __getitem__(self, index):
        self.indexed += 1
        return super().__getitem__(index)


def expected_task_position(deliveries: list[int]) -> tuple[int, frozenset[int]]:
    position = 0
    delivered = set(deliveries)
    while position in delivered:
        position += 1
    return position, frozenset(t for t in delivered if t > position)


@pytest.mark.parametrize("order", ["in order", "pairs swapped"])
def test_the_position_after_any_record_of_the_window_is_exact_and_found_without_indexing(order, monkeypatch):
    monkeypatch.setattr(progress, "HISTORY", WINDOW)
    tasks = list(range(5 * WINDOW))
    if order == "pairs swapped":  # first-ready delivery: a few tasks delivered above the low-water mark
        tasks = [t ^ 1 for t in tasks]
    tracker = progress.TaskProgress(0, frozenset())
    for task in tasks:
        tracker.delivered(task)
    tracker.recent = IndexCountingDeque(tracker.recent, maxlen=WINDOW)
    for back in (0, 1, 2, 3, WINDOW // 2, WINDOW - 1, WINDOW):
        consumed = len(tasks) - back
        assert tracker.after(consumed) == expected_task_position(tasks[:consumed]), back
    assert tracker.recent.indexed == 0  # the old code read `back` entries by index, each a walk
    with pytest.raises(progress.TooFarBack, match=f"the feeder remembers the last {WINDOW}"):
        tracker.after(len(tasks) - WINDOW - 1)


def test_a_generator_sources_position_after_any_record_of_the_window_is_exact(monkeypatch):
    monkeypatch.setattr(progress, "HISTORY", WINDOW)
    workers, deliveries = 3, 5 * WINDOW + 1
    tracker = progress.ShardProgress([0] * workers, 0)
    for k in range(deliveries):
        tracker.delivered(k % workers)
    tracker.recent = IndexCountingDeque(tracker.recent, maxlen=WINDOW)
    for back in (0, 1, 2, WINDOW // 2, WINDOW - 1):
        consumed = deliveries - back
        starts = [len(range(w, consumed, workers)) for w in range(workers)]
        assert tracker.after(consumed) == (starts, consumed % workers), back
    assert tracker.recent.indexed <= 5  # one read per call: the worker of the last record kept
