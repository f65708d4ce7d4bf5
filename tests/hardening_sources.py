"""Module-level sources for tests/test_hardening.py: workers import them by name, as users' sources are."""

from __future__ import annotations

import os
import signal
import time

import numpy as np


def exits_mid_stream(n, at, victims, how, shard):
    """Element i is an 8x8 array full of i; workers in ``victims`` end themselves at their element ``at``
    (``how``: "exit0" for os._exit(0), "sigkill" for a SIGKILL to themselves)."""
    for k, i in enumerate(range(shard.index, n, shard.count)):
        if shard.index in victims and k == at:
            if how == "exit0":
                os._exit(0)
            os.kill(os.getpid(), signal.SIGKILL)
        yield np.full((8, 8), i, dtype=np.int64), i


def uses_tensorflow(how, shard):
    """A source that uses TensorFlow, which workers only have as a stand-in: each ``how`` is one use."""
    import tensorflow as tf

    zeros = tf.zeros(3)
    if how == "asarray":
        yield np.asarray(zeros)
    elif how == "len":
        yield len(zeros)
    elif how == "bool":
        yield bool(tf.constant(1))
    elif how == "iter":
        yield [float(x) for x in zeros]
    elif how == "add":
        yield zeros + 1
    elif how == "multiply":
        yield 2.0 * zeros
    elif how == "numpy_ufunc":
        yield np.add(zeros, 1)
    elif how == "eq":
        yield zeros == 0
    elif how == "ne":
        yield tf.constant(1) != 1
    elif how == "str":
        yield str(zeros)
    elif how == "format":
        yield f"{zeros}"


def outlives_the_error(how, ready_path, shard):
    """Worker 0 delivers its first element, then sleeps for an hour and ignores SIGTERM (only SIGKILL
    ends it). Worker 1 waits until worker 0 is in that sleep (``ready_path`` exists), then meets ``how``:
    "stall" (produces nothing, for a feeder ``timeout``) or "raise"."""
    if shard.index == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        yield np.zeros(4), 0
        with open(ready_path, "w"):
            pass
        time.sleep(3600)
    elif shard.index == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        if how == "raise":
            raise ValueError("worker 1 fails")
        time.sleep(3600)
    yield np.zeros(4), shard.index


def fails_after_a_slow_start(n, delay, fail_first, shard):
    """Worker 0 takes ``delay`` seconds over its first element; worker 1 raises at once on its first
    element (global element 1), or, with ``fail_first``, worker 0 raises on element 0 instead."""
    if shard.index == 0:
        if fail_first:
            raise ValueError("element 0 is bad")
        time.sleep(delay)
    elif shard.index == 1 and not fail_first:
        raise ValueError("element 1 is bad")
    for i in range(shard.index, n, shard.count):
        yield np.full(4, i, dtype=np.int64), i


def leaf_values(leaves, shard):
    """Worker 0 yields {"text": leaf, "i": k} for each leaf; other workers yield nothing."""
    if shard.index == 0:
        for k, leaf in enumerate(leaves):
            yield {"text": leaf, "i": k}


def growing_image(n, size, shard):
    """{"image": (size + i, size + 2 i, 3) uint8, "label": i}: the image's shape changes every element."""
    for i in range(shard.index, n, shard.count):
        yield {"image": np.full((size + i, size + 2 * i, 3), i % 251, dtype=np.uint8), "label": i}


def images(n, shard):
    """224x224x3 uint8 images whose every pixel row says which element it is: row r of image i holds
    (i + r) % 251."""
    rows = np.arange(224, dtype=np.int64)[:, None, None]
    for i in range(shard.index, n, shard.count):
        yield {"image": np.broadcast_to((i + rows) % 251, (224, 224, 3)).astype(np.uint8), "label": i}
