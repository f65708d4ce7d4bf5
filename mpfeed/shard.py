"""`Shard`: what a worker's call of the source is told about its share of the work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    """This worker's part of an epoch.

    A source typically takes ``items[shard.index::shard.count]``; with the feeder's ordered round-robin
    that yields the items in their source order.
    """

    index: int
    """This worker's index, ``0 <= index < count``."""
    count: int
    """How many workers share the work."""
    epoch: int
    """The epoch being produced, counting from 0."""
    seed: int
    """A seed in ``[0, 2**32)``: distinct per worker and epoch, the same again for the same ``seed``."""


def shard_seed(base_seed: int, index: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for one worker's epoch (accepted by `random`, numpy and Pillow alike)."""
    return int(np.random.SeedSequence([base_seed, index, epoch]).generate_state(1)[0])
