"""What a source is told about its share of the work: `Shard` for generator sources, and the per-element
seeds of random-access sources (`element_seed`, `element_rng`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Shard:
    """This worker's part of an epoch.

    A source typically takes ``items[shard.index::shard.count]``; with the feeder's ordered round-robin
    that yields the items in their source order.
    """

    index: int
    """This worker's index, ``0 <= index < count`` (numbered across every partition)."""
    count: int
    """How many shards share the work (workers x partitions)."""
    epoch: int
    """The epoch being produced, counting from 0."""
    seed: int
    """A seed in ``[0, 2**32)``: distinct per worker and epoch, the same again for the same ``seed``."""
    start: int = 0
    """After a resume, the shard's first element that is still wanted: the worker drops the ones before it
    without sending them, or a source marked `seekable` starts there itself."""


def shard_seed(base_seed: int, index: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for one worker's epoch (accepted by `random`, numpy and Pillow alike)."""
    return int(np.random.SeedSequence([base_seed, index, epoch]).generate_state(1)[0])


def _mix(value: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def element_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of element ``index`` of a random-access source in ``epoch``, for a feeder's ``seed``: a
    32-bit value that depends on these three alone, never on which worker runs the element or how many
    there are. Inside ``source[index]`` in a worker, `element_rng` gives a generator seeded with it."""
    return _mix(_mix(_mix(seed & _MASK) ^ epoch) ^ index) >> 32


_current: tuple[int, int, int] | None = None  # (seed, epoch, index) of the element a worker is making


def element_rng() -> np.random.Generator:
    """Inside a random-access source's ``__getitem__`` in a worker: a numpy generator for this element's
    augmentation, seeded with `element_seed` (so the same element gets the same draws in the same epoch,
    whichever worker makes it, and new ones each epoch)."""
    if _current is None:
        raise RuntimeError(
            "mpfeed.element_rng() works inside a random-access source's __getitem__ while an mpfeed "
            "worker calls it; elsewhere use np.random.default_rng(mpfeed.element_seed(seed, epoch, index))"
        )
    return np.random.default_rng(element_seed(*_current))


Source = TypeVar("Source", bound=Callable[..., Any])


def seekable(source: Source) -> Source:
    """Mark a generator source that honours ``shard.start`` (it begins its shard there itself), so that
    after a resume the worker need not drop the elements before it."""
    source.mpfeed_seekable = True  # type: ignore[attr-defined]
    return source
