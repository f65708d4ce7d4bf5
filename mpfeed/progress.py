"""What one pass over an epoch has delivered, in memory bounded by the window of recent records rather than
by the epoch, and the position after any of those recent records (what `Feeder.state_dict(consumed=...)`
needs when tf.data has prefetched past what the model consumed).

Random access (`TaskProgress`): every task below ``low`` was delivered, and ``ahead`` holds the delivered
tasks above it (first-ready delivery and resumed first-ready states leave a few). Generator sources
(`ShardProgress`): how many records each worker has delivered, and whose record comes next. Both keep the
last `HISTORY` deliveries, so that the position after any of them can be rebuilt by undoing the ones after.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

HISTORY = 1 << 16  # records that a consumed count may lie behind what the feeder has handed out


class TooFarBack(ValueError):
    """A consumed count older than the history the feeder keeps."""


class TaskProgress:
    """Delivered tasks of a random-access epoch: a low-water mark, the few delivered above it, and the
    recent deliveries in order."""

    def __init__(self, position: int, done: frozenset[int]) -> None:
        self.before = position + len(done)  # tasks delivered before this pass began
        self.low = position
        self.ahead = set(done)
        self.count = 0  # deliveries in this pass
        self.recent: deque[int] = deque(maxlen=HISTORY)
        self._advance()

    def _advance(self) -> None:
        ahead = self.ahead
        while self.low in ahead:
            ahead.discard(self.low)
            self.low += 1

    def delivered(self, task: int) -> None:
        self.count += 1
        self.recent.append(task)
        if task == self.low:
            self.low += 1
            self._advance()
        else:
            self.ahead.add(task)

    def is_delivered(self, task: int) -> bool:
        return task < self.low or task in self.ahead

    def after(self, count: int) -> tuple[int, frozenset[int]]:
        """``(position, done)`` after the first ``count`` deliveries of this pass."""
        undone = set(_undo(self.recent, self.count, count))
        if not undone:
            return self.low, frozenset(self.ahead)
        position = min(self.low, min(undone))
        done = {t for t in range(position + 1, self.low) if t not in undone}
        done.update(t for t in self.ahead if t not in undone)
        return position, frozenset(done)


class ShardProgress:
    """Records delivered by each worker of a generator source's epoch, and the round-robin cursor."""

    def __init__(self, starts: list[int], cursor: int) -> None:
        self.before = sum(starts)
        self.starts = list(starts)
        self.base_cursor = cursor
        self.count = 0
        self.recent: deque[int] = deque(maxlen=HISTORY)

    def delivered(self, worker: int) -> None:
        self.count += 1
        self.recent.append(worker)
        self.starts[worker] += 1

    def after(self, count: int) -> tuple[list[int], int]:
        """``(starts, cursor)`` after the first ``count`` deliveries of this pass."""
        whole = self.count == len(self.recent)
        # The cursor after a delivery is the worker after it: keep one delivery before the undone ones.
        undo = self.count - count
        if not whole and undo >= len(self.recent):
            raise _too_far(self.count, count)
        starts = list(self.starts)
        for worker in _undo(self.recent, self.count, count):
            starts[worker] -= 1
        if count == 0:
            return starts, self.base_cursor
        last = self.recent[len(self.recent) - undo - 1]
        return starts, (last + 1) % len(starts)


def _undo(recent: deque[int], count: int, target: int) -> list[int]:
    """The deliveries after the first ``target`` of ``count``, from the recent history, latest first.
    Walked from the end: indexing a deque costs up to a walk to the middle (30 ms for a whole window)."""
    undo = count - target
    if undo < 0 or undo > len(recent):
        raise _too_far(count, target)
    return list(islice(reversed(recent), undo))


def _too_far(count: int, target: int) -> TooFarBack:
    return TooFarBack(
        f"consumed={target} lies {count - target} records behind what this pass has handed out ({count}); "
        f"the feeder remembers the last {HISTORY}"
    )
