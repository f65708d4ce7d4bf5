"""Module-level sources for the hardening tests: spawned workers import them by name."""

from __future__ import annotations

import os
import time

import numpy as np


def exits_mid_stream(n, at, how, shard):
    """Worker 1 ends itself at its element ``at`` (``how``: "exit0" for os._exit(0), "sigkill")."""
    for k, i in enumerate(range(shard.index, n, shard.count)):
        if shard.index == 1 and k == at:
            if how == "exit0":
                os._exit(0)
            os.kill(os.getpid(), 9)
        time.sleep(0.0005)
        yield np.full((8, 8), i, dtype=np.int64), i


def several_exit(n, at, victims, shard):
    """Workers whose index is in ``victims`` call os._exit(0) at their element ``at``."""
    for k, i in enumerate(range(shard.index, n, shard.count)):
        if shard.index in victims and k == at:
            os._exit(0)
        yield np.full((8, 8), i, dtype=np.int64), i


def leaf_values(leaves, shard):
    """Yields {"text": leaf} for each leaf (worker 0 only)."""
    if shard.index == 0:
        for leaf in leaves:
            yield {"text": leaf}


def growing_image(n, size, shard):
    """{"image": (size + i, size + 2 i, 3) uint8, "label": i}: the image's shape changes every element."""
    for i in range(shard.index, n, shard.count):
        yield {"image": np.full((size + i, size + 2 * i, 3), i % 251, dtype=np.uint8), "label": i}
