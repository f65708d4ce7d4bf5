"""The workloads of docs/benchmarks.md, shared by every contender.

Each workload has a plain per-item function, ``item(i) -> element``, for the contenders that call the
work themselves (`from_generator`, threads, `tf-map`, pools), and ``Workload.source``, mpfeed's source
``source(n, shard)`` (`shard_items` bound to the item function), that yields this shard's items
``i = index, index + count, ...`` below ``n``. Everything here is picklable and imports neither
TensorFlow nor Keras, so worker processes of any kind stay light.
"""

from __future__ import annotations

import functools
import io
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SHAPE = (224, 224, 3)
IO_SLEEP_S = 0.010
JPEG_SIZE = (500, 375)
JPEG_QUALITY = 90
TRANSFER_FLOATS = 2 * 1024 * 1024  # 8 MiB of float32
TINY_VALUES = 10
DECODE_BATCH = 64
ENDLESS = 10**9  # items offered to every pipeline; a measurement stops on time, not on exhaustion

# How many annotation records the `python` workload parses per element: about 5 ms of GIL-holding work
# on one core of the 2-core AMD EPYC it was tuned on (the benchmark measures and reports the real rate).
PYTHON_RECORDS = 6000


def _image(i: int) -> np.ndarray:
    """A fresh 224x224x3 uint8 image, as a loader would allocate one per element."""
    return np.full(IMAGE_SHAPE, i % 256, dtype=np.uint8)


# -- io: slow storage ----------------------------------------------------------------------------------------


def io_item(i: int) -> tuple[np.ndarray, np.int64]:
    time.sleep(IO_SLEEP_S)
    return _image(i), np.int64(i)


# -- decode: JPEG decode and resize (Pillow releases the GIL) ------------------------------------------------


@functools.cache
def jpeg_bytes() -> bytes:
    """One ~500x375 JPEG (quality 90) of smooth random content, the same in every process."""
    rng = np.random.default_rng(20240601)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize(JPEG_SIZE, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode_item(i: int) -> tuple[np.ndarray, np.int64]:
    with Image.open(io.BytesIO(jpeg_bytes())) as picture:
        resized = picture.convert("RGB").resize(IMAGE_SHAPE[:2], Image.Resampling.BILINEAR)
    return np.asarray(resized), np.int64(i)


# -- python: pure-Python work that holds the GIL -------------------------------------------------------------


@functools.cache
def _annotation() -> str:
    """A text annotation of boxes, the kind of thing a loader parses per element."""
    return ";".join(
        f"{k % 91},{k * 7 % 224},{k * 13 % 224},{k * 3 % 97},{k * 5 % 89}" for k in range(PYTHON_RECORDS)
    )


def python_item(i: int) -> tuple[np.ndarray, np.int64]:
    boxes = []
    for record in _annotation().split(";"):
        label, x, y, w, h = (int(field) for field in record.split(","))
        if w and h:
            boxes.append((label, x / 224, y / 224, (x + w) / 224, (y + h) / 224))
    area = sum((x1 - x0) * (y1 - y0) for _, x0, y0, x1, y1 in boxes)
    return _image(i + int(area)), np.int64(i)


# -- transfer: bytes through the transport -------------------------------------------------------------------


@functools.cache
def _big_array() -> np.ndarray:
    array = np.arange(TRANSFER_FLOATS, dtype=np.float32)
    array.flags.writeable = False
    return array


def transfer_item(i: int) -> np.ndarray:
    """No work: the same 8 MiB array every time (ready in memory, as after a cache hit)."""
    return _big_array()


# -- tiny: the per-element overhead --------------------------------------------------------------------------


def tiny_item(i: int) -> tuple[np.ndarray, np.int64]:
    return np.full(TINY_VALUES, i, dtype=np.float32), np.int64(i)


# -- straggler: uneven I/O-like waits (docs/benchmarks.md) ---------------------------------------------------
#
# Every element sleeps; what varies is how long. Costs are fixed by the element's index (and, in
# `half-speed`, by the process that makes it), so every contender meets the same costs.

STRAGGLER_SLEEP_S = 0.004  # the usual cost of one element, and the mean cost in `lognormal`
STRAGGLER_WORKERS = 8
# Elements in one pass: far more than a measurement takes (2,000/s for a few seconds; a no-wait ceiling
# stays under 30,000/s), yet not ENDLESS: mpfeed builds a random-access epoch's order as an array up front
# (1e9 positions take 8 GB and 20 s here), and every loader gets the same length.
STRAGGLER_LENGTH = 10**6
STRAGGLER_BYTES = 64
LOGNORMAL_SIGMA = 1.0
RARE_EVERY, RARE_AT, RARE_FACTOR = 100, 37, 50  # `one-in-100`: one index in each 100 costs 50x
STRAGGLER_PATTERNS = ("half-speed", "lognormal", "one-in-100")
NO_WAIT = "no-wait"  # the same elements at no cost: what a loader's own per-element overhead allows


def straggler_cost(pattern: str, i: int) -> float:
    """Seconds element ``i`` costs a worker at full speed. `half-speed`: 4 ms each (its slow worker
    takes twice that); `lognormal`: lognormal with sigma 1 and mean 4 ms, drawn from a generator seeded by
    ``i``; `one-in-100`: 200 ms for one index in each block of 100, else 4 ms.

    In `one-in-100` the slow index moves along by one from block to block (37, 138, 239, ...: position
    ``(37 + block) % 100``), so that the slow elements fall evenly on every one of 8 strided shards. A
    fixed position (``i % 100 == 37``) would put them all on shards 1 and 5 (100 is 4 mod 8): six
    generator shards would never meet one, and would run ahead of the rest at full speed."""
    if pattern == "half-speed":
        return STRAGGLER_SLEEP_S
    if pattern == "lognormal":
        mu = math.log(STRAGGLER_SLEEP_S) - LOGNORMAL_SIGMA**2 / 2  # so that the mean is 4 ms
        return float(np.random.default_rng(i).lognormal(mu, LOGNORMAL_SIGMA))
    if pattern == "one-in-100":
        block, position = divmod(i, RARE_EVERY)
        return STRAGGLER_SLEEP_S * (RARE_FACTOR if position == (RARE_AT + block) % RARE_EVERY else 1)
    if pattern == NO_WAIT:
        return 0.0
    raise ValueError(f"unknown straggler pattern {pattern!r}; choose from {(*STRAGGLER_PATTERNS, NO_WAIT)}")


def straggler_item(pattern: str, i: int, slow: bool = False) -> tuple[np.ndarray, np.int64]:
    """Waits element ``i``'s cost (twice as long on a ``slow`` worker), then gives 64 bytes and a label."""
    time.sleep(straggler_cost(pattern, i) * (2 if slow else 1))
    return np.full(STRAGGLER_BYTES, i % 256, dtype=np.uint8), np.int64(i)


def straggler_shard(pattern: str, n: int, shard: Any) -> Iterator[tuple[np.ndarray, np.int64]]:
    """The generator source: fixed strided shards, ``shard.index, shard.index + shard.count, ...`` below
    ``n``. In `half-speed` the worker of shard 0 is the slow one."""
    slow = pattern == "half-speed" and shard.index == 0
    for i in range(shard.index, n, shard.count):
        yield straggler_item(pattern, i, slow)


_FIRST_INDEX: dict[int, int] = {}  # process id -> the first index that process was asked for


class _Items:
    """Random access (``len`` and ``[i]``) over ``length`` items that `item` makes."""

    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.item(index)

    def item(self, index: int) -> tuple[np.ndarray, np.int64]:
        raise NotImplementedError


class StragglerItems(_Items):
    """The random-access source (``len`` and ``[i]``), for mpfeed and PyTorch's DataLoader alike.

    With random access a loader may send any index to any worker, so `half-speed`'s slow worker cannot be
    "the worker that makes elements 0, 8, 16, ...": it is a slow *process*. The process whose first
    request is index 0 runs at half speed for every element it makes from then on. Exactly one process
    is first asked for index 0 (every pass here starts at 0 and asks for each index once), whichever
    loader hands the indices out and however it does, and that process is fixed before any rate is
    measured. The first index is kept per process id, so a worker forked from a process that already
    answered requests still decides for itself."""

    def __init__(self, pattern: str, length: int = STRAGGLER_LENGTH) -> None:
        straggler_cost(pattern, 0)  # rejects an unknown pattern here, not in a worker
        self.pattern = pattern
        self.length = length

    def item(self, index: int) -> tuple[np.ndarray, np.int64]:
        first = _FIRST_INDEX.setdefault(os.getpid(), index)
        return straggler_item(self.pattern, index, slow=self.pattern == "half-speed" and first == 0)


# -- autotune: random-access forms of io and python, and a cheap source for a slow consumer ------------------

# Elements in one pass: far more than an autotune row takes (io reaches about 3,000/s for about 25 s), yet
# not ENDLESS, for the same reason as STRAGGLER_LENGTH: a random-access epoch's order is built up front.
AUTOTUNE_LENGTH = 10**6
CHEAP_COST_S = 0.001  # `consumer-bound`: what one element costs a worker


def cheap_item(i: int) -> tuple[np.ndarray, np.int64]:
    """1 ms of CPU work (a busy loop that holds the GIL), then io's element: a source far cheaper than
    the consumer that takes it."""
    deadline = time.perf_counter() + CHEAP_COST_S
    while time.perf_counter() < deadline:
        pass
    return _image(i), np.int64(i)


AUTOTUNE_ITEMS: dict[str, Callable[[int], Any]] = {
    "io": io_item,
    "python": python_item,
    "consumer-bound": cheap_item,
}


class AutotuneItems(_Items):
    """Random access (``len`` and ``[i]``) to one of `AUTOTUNE_ITEMS`: what ``workers="auto"`` needs, as
    it adjusts only random-access sources. Defined here so that workers unpickle it without importing the
    benchmark script."""

    def __init__(self, name: str, length: int = AUTOTUNE_LENGTH) -> None:
        if name not in AUTOTUNE_ITEMS:
            raise ValueError(f"unknown autotune source {name!r}; choose from {list(AUTOTUNE_ITEMS)}")
        self.name = name
        self.length = length

    def item(self, index: int) -> tuple[np.ndarray, np.int64]:
        return AUTOTUNE_ITEMS[self.name](index)


# -- the mpfeed source: this shard's items, in the signature mpfeed calls ------------------------------------


def shard_items(item: Callable[[int], Any], n: int, shard: Any) -> Iterator[Any]:
    """Items ``shard.index, shard.index + shard.count, ...`` below ``n``: strided sharding, so mpfeed's
    ordered round-robin gives them in source order."""
    for i in range(shard.index, n, shard.count):
        yield item(i)


# -- the table of workloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    item: Callable[[int], Any]
    batch_size: int | None
    """Elements per batch: worker-side in mpfeed, ``.batch()`` elsewhere; None for single elements."""
    limit: str
    """What bounds it: ``ideal-io`` (workers / sleep), ``ideal-cpu`` (one core's rate x cores),
    ``memcpy`` or ``ceiling`` (from_generator over an in-memory list)."""
    what: str
    in_graph: bool = False
    """Consumed inside the `tf.data` graph, as training consumes large elements, rather than by a Python
    loop, whose ``EagerTensor.numpy()`` would copy each one."""

    @property
    def source(self) -> Callable[..., Iterator[Any]]:
        """The mpfeed source, ``source(n, shard=...)``; picklable, as workers need."""
        return functools.partial(shard_items, self.item)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("io", io_item, None, "ideal-io", "sleeps 10 ms per element"),
        Workload("decode", decode_item, None, "ideal-cpu", "JPEG 500x375 -> 224x224"),
        Workload("python", python_item, None, "ideal-cpu", "~5 ms of GIL-holding Python"),
        Workload("transfer", transfer_item, None, "memcpy", "one 8 MiB float32 array", in_graph=True),
        Workload("tiny", tiny_item, None, "ceiling", "10 float32 + label, no work"),
        Workload("decode-batched", decode_item, DECODE_BATCH, "ideal-cpu", "decode, batches of 64"),
    ]
}


# -- the Ray backend's workloads (scale_ray.py): kept out of WORKLOADS, which bench.py runs whole ------------

IO_5MS_SLEEP_S = 0.005
RAY_BATCH = 16  # `io-5ms` comes in batches of this many: mpfeed's worker-side batches, to_tf's, .batch()'s


def io_5ms_item(i: int) -> tuple[np.ndarray, np.int64]:
    """`io` at half the wait: 5 ms, then the same 224x224x3 image and label."""
    time.sleep(IO_5MS_SLEEP_S)
    return _image(i), np.int64(i)


def image_item(i: int) -> tuple[np.ndarray, np.int64]:
    """`io`'s element with no work: what moving one 150 KB image costs a pipeline."""
    return _image(i), np.int64(i)


def item_row(item: Callable[[int], Any], row: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data row function: ``{"id": i}`` (``ray.data.range``) to ``{"image": ..., "label": ...}``."""
    image, label = item(int(row["id"]))
    return {"image": image, "label": label}


class ItemServer:
    """A bare Ray actor (``ray.remote(ItemServer)``): one call, one element, no mpfeed. The floor of any
    design that makes one actor call per record."""

    def __init__(self, item: Callable[[int], Any]) -> None:
        self.item = item

    def call(self, i: int) -> Any:
        return self.item(i)

    def pid(self) -> int:
        return os.getpid()


RAY_WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("io-5ms", io_5ms_item, RAY_BATCH, "ideal-io", "sleeps 5 ms per element, batches of 16"),
        Workload("image", image_item, None, "ceiling", "io's 150 KB image + label, no work"),
    ]
}


def leaves(element: Any) -> list[Any]:
    """The arrays of one element (tuples, lists and dicts of them) in `tf.nest.flatten`'s order, without
    TensorFlow."""
    if isinstance(element, dict):
        return [leaf for key in sorted(element) for leaf in leaves(element[key])]
    if isinstance(element, (tuple, list)):
        return [leaf for part in element for leaf in leaves(part)]
    return [element]


def element_bytes(workload: Workload) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in leaves(workload.item(0)))


class IndexedItems:
    """Random access to a workload's items (or batches of them), for the index-based loaders. Plain numpy,
    and defined here rather than beside those loaders: Grain's spawned workers unpickle it by importing
    this module, which loads no TensorFlow."""

    def __init__(self, name: str, length: int = ENDLESS) -> None:
        self.name = name
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        workload = WORKLOADS[self.name]
        if not workload.batch_size:
            return workload.item(index)
        first = index * workload.batch_size
        items = [workload.item(i) for i in range(first, first + workload.batch_size)]
        return tuple(np.stack(column) for column in zip(*items))  # every batched workload is a tuple


def calls_per_second(call: Callable[[int], Any], seconds: float) -> float:
    """How often ``call(i)`` (i = 0, 1, ...) runs per second over ``seconds``, after one call to warm up."""
    call(0)
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        call(count)
        count += 1
    return count / (time.perf_counter() - started)


def one_core_rate(name: str, seconds: float) -> float:
    """Elements per second of ``name``'s work alone, in this process."""
    return calls_per_second(WORKLOADS[name].item, seconds)


if __name__ == "__main__":
    # `python -m benchlib.workloads [seconds] [names...]` (from scripts/): one core's rate of each, as JSON.
    import json
    import sys

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    names = sys.argv[2:] or list(WORKLOADS)
    print(json.dumps({name: one_core_rate(name, seconds) for name in names}))


# -- decode-cached (decode_cached.py): decode once in load(i), crop and flip in augment every epoch --------

CACHED_CROP = 192  # augment's random crop of the 224x224 decoded image


def crop_and_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 192x192 crop, flipped left-right half the time: a view, no copy."""
    top, left = (int(v) for v in rng.integers(0, IMAGE_SHAPE[0] - CACHED_CROP + 1, size=2))
    crop = image[top : top + CACHED_CROP, left : left + CACHED_CROP]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


class DecodedImages:
    """`decode-cached`'s source: ``load(i)`` decodes the `decode` workload's JPEG and resizes it to
    224x224 (all its cost); ``augment`` crops and flips the sample at random."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[np.ndarray, np.int64]:
        return decode_item(index)

    def augment(self, sample: tuple, rng: np.random.Generator) -> tuple[np.ndarray, np.int64]:
        image, label = sample
        return crop_and_flip(image, rng), label


@functools.cache
def _held_images(n: int) -> list[np.ndarray]:
    """``n`` decoded images, each in memory of its own (as many bytes as the data set), made in a worker
    from one decode: what a worker that held the whole data set would read from."""
    image = decode_item(0)[0]
    return [image.copy() for _ in range(n)]


class HeldImages(DecodedImages):
    """The augment-only ceiling: ``load`` returns a sample that each worker already holds in its own
    memory (the whole data set, copied from one decode at its first call), so an epoch costs what
    ``augment``, the transport and the consumer cost."""

    def load(self, index: int) -> tuple[np.ndarray, np.int64]:
        return _held_images(self.n)[index], np.int64(index)
