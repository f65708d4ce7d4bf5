"""What the diagnosis costs the consumer: the timing added to every call for an element, against the
consumer's whole CPU time per call, iterated directly and through dataset(), with tiny elements (where
any per-call cost shows most).

    python scripts/diagnosis_overhead.py
"""

from __future__ import annotations

import os
import sys
import time
import timeit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import mpfeed  # noqa: E402
from mpfeed.diagnosis import CallClock  # noqa: E402


class Tiny:
    """10 float32 values and a label, no work: the consumer's cost per element is all there is."""

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int):
        return np.arange(10, dtype=np.float32), index


def timing_cost_us() -> float:
    """One call's timing: two clock reads and `CallClock.note`, as `Consumer.next` does them."""
    clock, monotonic = CallClock(), time.monotonic

    def one() -> None:
        entered = monotonic()
        clock.note(entered, monotonic(), 0.0)

    runs = 200_000
    return min(timeit.repeat(one, number=runs, repeat=5)) / runs * 1e6


def consumer_cpu_us(elements: int, through_dataset: bool) -> float:
    with mpfeed.Feeder(Tiny(), workers=2) as feeder:
        if through_dataset:
            iterator = iter(feeder.dataset(chunk_size=1))
        else:
            iterator = iter(feeder)
        for _ in range(2000):
            next(iterator)
        started = time.process_time()
        for _ in range(elements):
            next(iterator)
        return (time.process_time() - started) / elements * 1e6


def main() -> None:
    cost = timing_cost_us()
    print(f"timing per call: {cost:.2f} us")
    for name, through, count in (("iterated directly", False, 100_000), ("through dataset()", True, 10_000)):
        whole = consumer_cpu_us(count, through)
        print(f"{name:>18}: consumer CPU {whole:7.2f} us per call; the timing is {cost / whole:.1%} of it")


if __name__ == "__main__":
    main()
