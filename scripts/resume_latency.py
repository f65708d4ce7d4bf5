"""Time to the first element after a resume deep into an epoch, against a cold start of the same feeder.

A random-access source resumes at its position without making anything before it, so the first element
after a resume at 90% of a 100,000-element epoch should come about as fast as at a cold start.

    python scripts/resume_latency.py            # median of 7, interleaved
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mpfeed


class Images:
    """A random-access source of 224x224x3 uint8 images (made, not decoded: the cost is mpfeed's)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return np.full((224, 224, 3), index % 251, dtype=np.uint8), index


def first_element_s(length: int, position: int | None) -> float:
    started = time.perf_counter()
    with mpfeed.Feeder(Images(length), workers=2, shuffle=True, seed=1) as feeder:
        if position is not None:
            feeder.load_state_dict({**feeder.state_dict(), "position": position, "done": ""})
        next(iter(feeder))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    position = args.length * 9 // 10
    cold, resumed = [], []
    for _ in range(args.reps):
        cold.append(first_element_s(args.length, None))
        resumed.append(first_element_s(args.length, position))
    for name, times in (("cold start", cold), (f"resume at {position:,}", resumed)):
        print(
            f"{name:>20}: first element after {statistics.median(times) * 1000:.0f} ms "
            f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; feeder start-up included)"
        )


if __name__ == "__main__":
    main()
