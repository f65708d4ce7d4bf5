"""Module-level sources for the tests: spawned workers import them by name, as users' sources are."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import OrderedDict, namedtuple

import numpy as np

import mpfeed


def numbered(n, shard, shape=(3, 4)):
    """Element i is {"x": an array full of i, "i": i}; strided sharding keeps source order."""
    for i in range(shard.index, n, shard.count):
        yield {"x": np.full(shape, i, dtype=np.float32), "i": i}


def pairs(n, shard):
    """(array, label) pairs whose content identifies the element: for corruption checks."""
    for i in range(shard.index, n, shard.count):
        yield np.arange(i, i + 64, dtype=np.int64).reshape(8, 8), i


def every_leaf_type(n, shard):
    """Nested elements that use every kind of leaf mpfeed carries."""
    for i in range(shard.index, n, shard.count):
        yield {
            "arrays": (
                np.array([True, False, i % 2 == 0]),
                np.arange(6, dtype=np.int8).reshape(2, 3) + i,
                np.arange(3, dtype=np.int16) * i,
                np.arange(3, dtype=np.int32) - i,
                np.arange(3, dtype=np.int64) << i,
                np.arange(4, dtype=np.uint8) + i,
                np.arange(4, dtype=np.uint16) + i,
                np.arange(4, dtype=np.uint32) + i,
                np.arange(4, dtype=np.uint64) + i,
                np.linspace(0, 1, 5, dtype=np.float16) + i,
                np.linspace(0, 1, 5, dtype=np.float32) + i,
                np.linspace(0, 1, 5, dtype=np.float64) + i,
                np.array([1 + 2j, i], dtype=np.complex64),
                np.array([3 - 4j, i], dtype=np.complex128),
                np.zeros((0, 3), dtype=np.float32),
                np.float32(i) * np.ones((2, 2, 2), dtype=np.float32)[:, ::2],  # not contiguous
            ),
            "scalars": [np.int32(i), np.float64(i / 2), np.bool_(i % 2), np.uint8(i)],
            "python": (i, i / 3, i % 2 == 1, f"text {i} ünïcode", b"bytes\x00" + bytes([i % 256])),
            "empty": ("", b""),
        }


def sizes(sizes_list, shard):
    """Element k has sizes_list[k] bytes of uint8 data, each byte the element's index mod 251."""
    for k in range(shard.index, len(sizes_list), shard.count):
        yield np.full(sizes_list[k], k % 251, dtype=np.uint8), k


def epochs_and_seeds(n, shard):
    """Reports the shard it was given, the process it runs in, and draws from every seeded RNG."""
    for i in range(shard.index, n, shard.count):
        yield {
            "i": i,
            "epoch": shard.epoch,
            "index": shard.index,
            "seed": shard.seed,
            "pid": os.getpid(),
            "random": random.random(),
            "np_random": np.random.random(),
            "rng": np.random.default_rng(shard.seed).random(),
        }


def raise_at(n, at, shard):
    """Raises ValueError at element ``at`` (global index)."""
    for i in range(shard.index, n, shard.count):
        if i == at:
            raise ValueError(f"bad record {i}")
        yield np.full(4, i), i


def slow(n, delay, shard):
    """Each element takes ``delay`` seconds."""
    for i in range(shard.index, n, shard.count):
        time.sleep(delay)
        yield np.full(4, i), i


def yields_leaf(leaf, shard):
    """Yields one good element, then ``leaf`` inside a nest."""
    yield {"image": np.zeros(3), "label": 0}
    yield {"image": leaf, "label": 1}


def environment(names, shard):
    """The worker's values of these environment variables (None where unset)."""
    yield {name: os.environ.get(name, "unset") for name in names}


def tensorflow_state(shard):
    """What the worker's interpreter has loaded."""
    module = sys.modules.get("tensorflow")
    yield {
        "tensorflow_in_modules": module is not None,
        "tensorflow_is_real": module is not None and hasattr(module, "__file__"),
        "tensorflow_python_loaded": "tensorflow.python" in sys.modules
        and hasattr(sys.modules["tensorflow.python"], "__file__"),
    }


def strike(how):
    """Cause one kind of fault in the calling worker, for real."""
    import faulthandler

    if how == "raise":
        raise ValueError("injected fault")
    if how == "exit3":
        sys.exit(3)
    if how == "exit0":
        os._exit(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigsegv":
        faulthandler._sigsegv()
    if how == "stall":
        time.sleep(3600)


def faulty(n, where, how, shard):
    """Worker 1 meets a fault ``how`` at ``where``: "start" (before its first element), "mid" (at its
    sixth element), "epoch" (when epoch 1 starts) or "close" (when the source is closed)."""
    victim = shard.index == 1
    if victim and (where == "start" or (where == "epoch" and shard.epoch == 1)):
        strike(how)
    try:
        for k, i in enumerate(range(shard.index, n, shard.count)):
            if victim and where == "mid" and k == 5:
                strike(how)
            yield np.full((8, 8), i, dtype=np.int64), i
    except GeneratorExit:
        if victim and where == "close":
            strike(how)
        raise


def vanishing_memory(path, shard):
    """Yields an array backed by a file that is truncated before the worker copies it into its slot:
    the copy faults with SIGBUS halfway through writing the slot."""
    import mmap

    yield np.zeros(4, dtype=np.uint8), 0
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0)
        array = np.frombuffer(mapping, dtype=np.uint8)
        file.truncate(0)
        yield array, 1


def tiny(n, shard):
    """Small elements, as fast as the worker can make them."""
    x = np.arange(10, dtype=np.float32)
    for i in range(shard.index, n, shard.count):
        yield x, i


def ragged(shard):
    """Nested lists whose lengths change: a structure that changes mid-stream."""
    yield [[1, 2], [3]]
    yield [[1], [2, 3]]


_IMPORT_TIME_RNG = np.random.default_rng()  # state created when a worker imports this module


def import_time_draws(shard):
    """A draw from a generator made at import: distinct per worker only if each imported on its own."""
    yield _IMPORT_TIME_RNG.random()


def small_then_large(n, size, slow_worker, shard):
    """A small first element (it sizes the ring), then ``size``-byte ones that overflow their slots;
    worker ``slow_worker`` takes two seconds before its first element."""
    if shard.index == slow_worker:
        time.sleep(2.0)
    for k, i in enumerate(range(shard.index, n, shard.count)):
        yield np.full(8 if k == 0 else size, i % 251, dtype=np.uint8), i


def ignores_sigterm(shard):
    """Handles SIGTERM by ignoring it, then produces very slowly: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    while True:
        yield np.zeros(4), 0
        time.sleep(3600)


def no_shard_parameter(n):
    """A plain generator function that forgot the ``shard`` keyword."""
    yield from range(n)


class Numbers:
    """A random-access source: element i is {"x": an array full of i, "i": i}."""

    def __init__(self, n, shape=(3, 4)):
        self.n = n
        self.shape = shape

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return {"x": np.full(self.shape, index, dtype=np.float32), "i": index}


class Faulty:
    """A random-access source whose element ``at`` meets the fault ``how`` (see `strike`), whichever
    worker makes it."""

    def __init__(self, n, at, how):
        self.n, self.at, self.how = n, at, how

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index == self.at:
            strike(self.how)
        return np.full((8, 8), index, dtype=np.int64), index


class Slow:
    """A random-access source: element ``slow_index`` takes ``slow_s`` seconds, every other one ``fast_s``."""

    def __init__(self, n, slow_index, slow_s, fast_s=0.002):
        self.n, self.slow_index, self.slow_s, self.fast_s = n, slow_index, slow_s, fast_s

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        time.sleep(self.slow_s if index == self.slow_index else self.fast_s)
        return np.full(4, index, dtype=np.int64), index


class Augmented:
    """Draws from `mpfeed.element_rng()` and reports the worker that made the element."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return {"i": index, "draw": mpfeed.element_rng().random(), "pid": os.getpid()}


class ShortBy:
    """Claims ``n`` elements but raises IndexError for index ``n - 1``."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index >= self.n - 1:
            raise IndexError(f"list index {index} out of range")
        return np.zeros(2), index


@mpfeed.seekable
def seeks(n, shard):
    """A generator source that starts its shard at ``shard.start`` itself (marked seekable)."""
    for i in list(range(shard.index, n, shard.count))[shard.start :]:
        yield np.full(4, i, dtype=np.int64), i


class Waits:
    """A random-access source whose every element waits ``seconds`` (I/O-like, no CPU)."""

    def __init__(self, n, seconds):
        self.n, self.seconds = n, seconds

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return np.full(4, index, dtype=np.int64), index


class Arrays:
    """A random-access source of ``n`` float32 arrays of ``megabytes`` MiB, each full of its index."""

    def __init__(self, n, megabytes):
        self.n, self.size = n, megabytes << 18

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return np.full(self.size, index, dtype=np.float32)


def logs_what_it_makes(n, path, shard, seconds=0.0):
    """Appends "epoch index" to ``path`` for every element it makes (each taking ``seconds``): how far a
    worker runs ahead, and what it makes for an epoch that was abandoned."""
    for i in range(shard.index, n, shard.count):
        time.sleep(seconds)
        with open(path, "a") as log:
            log.write(f"{shard.epoch} {i}\n")
        yield np.full(4, i, dtype=np.int64), i


class LogsWhatItMakes:
    """The random-access form of `logs_what_it_makes` (it logs the index alone)."""

    def __init__(self, n, path, seconds=0.0):
        self.n, self.path, self.seconds = n, path, seconds

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        time.sleep(self.seconds)
        with open(self.path, "a") as log:
            log.write(f"{index}\n")
        return np.full(4, index, dtype=np.int64), index


class BadAt:
    """A random-access source whose element ``at`` has a leaf mpfeed cannot carry (an ``object()``)."""

    def __init__(self, n, at):
        self.n, self.at = n, at

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return (object() if index == self.at else np.full(2, index)), index


Pair = namedtuple("Pair", "positive negative")
Labelled = namedtuple("Labelled", "data label")


def named_pairs(n, shard):
    """Element i is Labelled(Pair(array of i, -i), i): namedtuples nested in a namedtuple."""
    for i in range(shard.index, n, shard.count):
        yield Labelled(Pair(np.full(3, i), -i), i)


class NamedPairs:
    """Random access: element i is Labelled(Pair(array of i, -i), i)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return Labelled(Pair(np.full(3, index), -index), index)


class Tagged(dict):
    """A dict subclass, which mpfeed cannot rebuild."""


class Items(list):
    """A list subclass, which mpfeed cannot rebuild."""


def yields_nest(kind, shard):
    """Elements whose nest is of type ``kind``: "dict_subclass", "list_subclass", "ordered_dict" or
    "local_namedtuple" (a namedtuple defined in this function, so not importable by name)."""
    local = namedtuple("Local", "x y")
    for i in range(4):
        if kind == "dict_subclass":
            yield Tagged(x=np.full(2, i), y=i)
        elif kind == "list_subclass":
            yield Items([np.full(2, i), i])
        elif kind == "ordered_dict":
            yield {"outer": OrderedDict(x=np.full(2, i), y=i)}
        else:
            yield local(np.full(2, i), i)


def keys_in_turns(n, shard):
    """Dicts with the same keys, their insertion order changing from one element to the next."""
    for i in range(shard.index, n, shard.count):
        if i % 2:
            yield {"image": np.full(2, i), "label": i, "meta": {"a": i, "b": float(i)}}
        else:
            yield {"label": i, "meta": {"b": float(i), "a": i}, "image": np.full(2, i)}


def masked(shard):
    """One masked array: its second entry is masked."""
    yield np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])


class Spins:
    """A random-access source whose every element keeps a core busy for ``seconds`` (CPU-bound)."""

    def __init__(self, n, seconds):
        self.n, self.seconds = n, seconds

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:
            pass
        return np.full(4, index, dtype=np.int64), index
