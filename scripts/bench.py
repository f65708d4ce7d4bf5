"""`make bench`: every workload of BENCH.md against every contender, beside the limits of this machine.

Each measurement builds one pipeline, consumes it with a Python loop over the `tf.data.Dataset` that
touches every element, and reports three things apart: start-up (building the pipeline: processes,
pools, datasets), time to the first element (from the start of building), and the steady-state rate (the
elements that arrive after a warm-up, over a fixed time). Repetitions are interleaved: every repetition
runs every row once, in an order rotated between repetitions, and the report gives the median with the
min-max spread.

    python scripts/bench.py                      # full run, ~6 minutes on 2 cores (~7 with the peers)
    python scripts/bench.py --quick              # smoke run, under 2 minutes with the peers
    python scripts/bench.py --workloads io,tiny --contenders from_generator,mpfeed --reps 5

The optional peers `torch-dataloader` and `grain` run when their packages are installed (`make
bench-peers`). `mp-pool`, `keras-pydataset` and `torch-dataloader` start their processes the way their
users get them by default (multiprocessing's default start method: fork on Linux with Python < 3.14);
Grain always spawns its workers.

Output: progress on stderr, a table on stdout, JSON and a PNG plot under ``bench-results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from workloads import ENDLESS, IO_SLEEP_S, WORKLOADS, IndexedItems, Workload, calls_per_second  # noqa: E402

if __name__ != "__mp_main__":
    # A spawned process (Grain's workers) imports the main script again, as __mp_main__; those workers
    # need only the workloads, so TensorFlow and Keras load in the benchmark's own process alone.
    import keras
    import tensorflow as tf

import mpfeed  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench-results"
QUEUE_SIZE = 10  # thread-queue's queue.Queue(maxsize=...)
POOL_IN_FLIGHT = 4  # mp-pool: tasks in flight per worker (as mpfeed's default depth)
MEMCPY_MIN_SPAN_BYTES = 64 * 2**20  # the memcpy limits rotate over at least this, and 4x the last-level cache
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold, before it adapts to freed blocks
CEILING_ELEMENTS = 8  # distinct elements in the from_generator-ceiling's list
SETTLE_S = 10  # longest wait for one pipeline's processes to exit before the next measurement
HANG_S = 180  # a measurement that takes longer than this dumps every stack and ends the run


@dataclass
class Pipeline:
    """What a contender built: something to iterate, how to stop it, and what to add to the report."""

    elements: Iterable[Any]
    batched: bool = False
    close: Callable[[], None] = lambda: None
    notes: Callable[[], dict] = dict


# -- helpers -------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@functools.cache
def signature(workload: Workload) -> Any:
    """The `tf.TensorSpec` nest of one element of ``workload``."""
    return tf.nest.map_structure(
        lambda leaf: tf.TensorSpec(np.shape(leaf), tf.as_dtype(np.asarray(leaf).dtype)), workload.item(0)
    )


def element_bytes(workload: Workload) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in tf.nest.flatten(workload.item(0)))


def batch_in_graph(dataset: tf.data.Dataset, workload: Workload) -> tf.data.Dataset:
    return dataset.batch(workload.batch_size) if workload.batch_size else dataset


def from_generator_over(generator: Callable[[], Iterable[Any]], workload: Workload) -> Pipeline:
    dataset = tf.data.Dataset.from_generator(generator, output_signature=signature(workload))
    return Pipeline(batch_in_graph(dataset, workload), batched=workload.batch_size is not None)


def touch(element: Any, batched: bool) -> int:
    """Read one value of every element (every row of a batch); returns how many elements that was."""
    count = 1
    for leaf in tf.nest.flatten(element):
        array = leaf.numpy() if hasattr(leaf, "numpy") else np.asarray(leaf)
        if batched:
            count = len(array)
            array.reshape(count, -1)[:, :1].sum()
        else:
            array.reshape(-1)[:1].sum()
    return count


# -- contenders 1-6 of BENCH.md --------------------------------------------------------------------------


def from_generator(workload: Workload, workers: int) -> Pipeline:
    return from_generator_over(lambda: map(workload.item, range(ENDLESS)), workload)


def thread_queue(workload: Workload, workers: int) -> Pipeline:
    """One background thread fills a bounded queue; `from_generator` drains it."""
    elements: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    stop = threading.Event()

    def fill() -> None:
        for i in range(ENDLESS):
            element = workload.item(i)
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    elements.put(element, timeout=0.1)
                    break
            if stop.is_set():
                return

    def drain() -> Iterable[Any]:
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                yield elements.get(timeout=0.1)

    thread = threading.Thread(target=fill, name="thread-queue", daemon=True)
    thread.start()
    pipeline = from_generator_over(drain, workload)

    def close() -> None:
        stop.set()
        thread.join()

    pipeline.close = close
    return pipeline


def tf_map(workload: Workload, workers: int, parallel: int | None = None) -> Pipeline:
    """``Dataset.range(n).map(tf.numpy_function(work))``, ``num_parallel_calls=AUTOTUNE`` unless given."""
    spec = signature(workload)
    leaf_specs = tf.nest.flatten(spec)

    def work(i: np.int64) -> list:
        return tf.nest.flatten(workload.item(int(i)))

    def call(i: tf.Tensor) -> Any:
        leaves = tf.numpy_function(work, [i], [s.dtype for s in leaf_specs], stateful=False)
        leaves = [tf.ensure_shape(leaf, s.shape) for leaf, s in zip(leaves, leaf_specs)]
        return tf.nest.pack_sequence_as(spec, leaves)

    dataset = tf.data.Dataset.range(ENDLESS).map(call, num_parallel_calls=parallel or tf.data.AUTOTUNE)
    return Pipeline(batch_in_graph(dataset, workload), batched=workload.batch_size is not None)


@functools.cache
def keras_items_class() -> type:
    """`keras.utils.PyDataset` over a workload, made on first use: Keras loads only where it runs. Keras
    wants batches, so an element comes as a batch of one where the workload does not batch."""

    class KerasItems(keras.utils.PyDataset):
        def __init__(self, name: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.items = IndexedItems(name)
            self.single = not WORKLOADS[name].batch_size

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int) -> Any:
            batch = self.items[index]
            if self.single:
                batch = tf.nest.map_structure(lambda leaf: np.expand_dims(leaf, 0), batch)
            return batch

    return KerasItems


def keras_pydataset(workload: Workload, workers: int) -> Pipeline:
    """Iterated as `Model.fit` does: Keras' adapter turns the PyDataset into a `tf.data.Dataset`."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    items = keras_items_class()(workload.name, workers=workers, use_multiprocessing=True)
    adapter = PyDatasetAdapter(items, shuffle=False)
    return Pipeline(adapter.get_tf_dataset(), batched=True, close=adapter.on_epoch_end)


def mp_pool(workload: Workload, workers: int) -> Pipeline:
    """``multiprocessing.Pool(N).imap`` (results pickled) under `from_generator`. Tasks are handed to the
    pool only as results are consumed, a few per worker, so memory stays bounded and it can stop early."""
    pool = multiprocessing.Pool(workers)
    credits = threading.Semaphore(POOL_IN_FLIGHT * workers)
    stop = threading.Event()

    def tasks() -> Iterable[int]:
        for i in range(ENDLESS):
            while not credits.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            yield i

    def results() -> Iterable[Any]:
        for element in pool.imap(workload.item, tasks()):
            credits.release()
            yield element

    pipeline = from_generator_over(results, workload)

    def close() -> None:
        stop.set()
        pool.close()
        pool.join()

    pipeline.close = close
    return pipeline


def mpfeed_feeder(workload: Workload, workers: int, batch_size: int | None = None) -> mpfeed.Feeder:
    return mpfeed.Feeder(
        workload.source, args=(ENDLESS,), workers=workers, batch_size=batch_size or workload.batch_size
    )


def mpfeed_notes(feeder: mpfeed.Feeder) -> Callable[[], dict]:
    def notes() -> dict:
        stats = feeder.stats()
        return {"wait_s": stats.wait_s, "overflow": stats.overflow, "copies": stats.copies}

    return notes


def mpfeed_dataset(workload: Workload, workers: int, batch_size: int | None = None) -> Pipeline:
    """``mpfeed.Feeder(source, workers=N).dataset()``: batches made in the workers when the workload
    batches."""
    feeder = mpfeed_feeder(workload, workers, batch_size)
    batched = (batch_size or workload.batch_size) is not None
    return Pipeline(feeder.dataset(), batched=batched, close=feeder.close, notes=mpfeed_notes(feeder))


def mpfeed_direct(workload: Workload, workers: int) -> Pipeline:
    """Iterating the feeder itself: numpy views, no TensorFlow. mpfeed's own ceiling."""
    feeder = mpfeed_feeder(workload, workers)
    return Pipeline(
        feeder, batched=workload.batch_size is not None, close=feeder.close, notes=mpfeed_notes(feeder)
    )


def mpfeed_b256(workload: Workload, workers: int) -> Pipeline:
    return mpfeed_dataset(workload, workers, batch_size=256)


# -- optional peers: only when importable ---------------------------------------------------------------


def to_numpy(nest: Any) -> Any:
    if isinstance(nest, (tuple, list)):
        return tuple(to_numpy(x) for x in nest)
    return nest.numpy() if hasattr(nest, "numpy") else nest


def torch_dataloader(workload: Workload, workers: int) -> Pipeline:
    """``torch.utils.data.DataLoader(num_workers=N)`` over the items, under `from_generator`. One item per
    index (``batch_size=None``; the workload's batches where it batches), ``prefetch_factor`` items in
    flight per worker, and the default conversion to tensors, which come back through torch's shared
    memory and leave as numpy arrays."""
    import torch.utils.data

    with warnings.catch_warnings():  # forked workers inherit these filters
        # more workers than cores is the point of `io`; the workloads' arrays are read-only on purpose
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        loader = torch.utils.data.DataLoader(
            IndexedItems(workload.name), batch_size=None, num_workers=workers, prefetch_factor=POOL_IN_FLIGHT
        )
        held = [iter(loader)]  # starts the workers

    def close() -> None:
        """Stop and join the workers, as the iterator's own finalizer would at garbage collection, and drop
        the iterator, which `from_generator` would otherwise keep alive."""
        held.pop()._shutdown_workers()

    dataset = tf.data.Dataset.from_generator(
        lambda: map(to_numpy, held[0]), output_signature=batched_signature(workload)
    )
    return Pipeline(dataset, batched=workload.batch_size is not None, close=close)


def grain_loader(workload: Workload, workers: int) -> Pipeline:
    """Grain's ``MapDataset.source(items).to_iter_dataset().mp_prefetch(N workers)``, under
    `from_generator`. Each worker process makes one element at a time (``ReadOptions(num_threads=0)``; by
    default each would run 16 reading threads, which would make it a thread pool, not the N workers
    BENCH.md compares) and keeps ``per_worker_buffer_size`` elements ready, the same depth as the others.
    Grain always spawns its workers, and a spawned worker imports the main script again (this one loads
    TensorFlow only outside such workers, as a careful training script would)."""
    import grain

    dataset = (
        grain.MapDataset.source(IndexedItems(workload.name))
        .to_iter_dataset(grain.ReadOptions(num_threads=0))
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=POOL_IN_FLIGHT))
    )
    held = [iter(dataset)]

    def close() -> None:
        """Stop and join the worker processes, then drop the iterator, which `from_generator` would
        otherwise keep alive: its queues' and events' named semaphores (spawn's) leave /dev/shm only when
        they are garbage-collected."""
        held.pop().close()

    return Pipeline(
        tf.data.Dataset.from_generator(lambda: held[0], output_signature=batched_signature(workload)),
        batched=workload.batch_size is not None,
        close=close,
    )


def batched_signature(workload: Workload) -> Any:
    spec = signature(workload)
    if not workload.batch_size:
        return spec
    return tf.nest.map_structure(lambda s: tf.TensorSpec((None, *s.shape), s.dtype), spec)


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- the rows of the report --------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[Workload, int], Pipeline]
    workloads: tuple[str, ...] | None = None  # None: every workload
    batch_size: int | None = None  # items a worker makes at a time, when not the workload's batch_size

    def round_items(self, workload: Workload, workers: int) -> int:
        """Items in one delivery of every worker: what `measure` counts its warm-up and window in."""
        return workers * (self.batch_size or workload.batch_size or 1)


CONTENDERS = [
    Contender("from_generator", from_generator),
    Contender("thread-queue", thread_queue),
    Contender("tf-map", tf_map),
    Contender("keras-pydataset", keras_pydataset),
    Contender("mp-pool", mp_pool),
    Contender("mpfeed", mpfeed_dataset),
    Contender("mpfeed-direct", mpfeed_direct),
    Contender("mpfeed-b256", mpfeed_b256, workloads=("tiny",), batch_size=256),
]
PEERS = [Contender("torch-dataloader", torch_dataloader), Contender("grain", grain_loader)]
PEER_MODULES = {"torch-dataloader": "torch", "grain": "grain"}


def available_contenders() -> list[Contender]:
    return CONTENDERS + [peer for peer in PEERS if importable(PEER_MODULES[peer.name])]


# -- the limits of this machine ------------------------------------------------------------------------


def one_core(workload: Workload, duration: float) -> float:
    """Elements per second of the work alone, no pipeline, in a fresh interpreter (like a worker's, and
    untouched by TensorFlow's threads or this process' heap)."""
    command = [sys.executable, str(Path(__file__).with_name("workloads.py")), str(duration), workload.name]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)[workload.name]


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine, from sysfs (32 MiB where it says nothing)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)


def memcpy_span(element_bytes: int) -> int:
    """How many distinct arrays the memcpy limits rotate over: together far larger than the last-level
    cache, so that every copy reads (and, preallocated, writes) memory, not cache."""
    span = max(MEMCPY_MIN_SPAN_BYTES, 4 * last_level_cache_bytes())
    return max(2, span // element_bytes)


# Run by `memcpy` in a fresh interpreter: argv is the scripts folder, seconds, count, dtype, shape...;
# prints copies per second.
MEMCPY_NEW_ARRAY = """
import sys
import numpy as np
scripts, seconds, count, dtype, *shape = sys.argv[1:]
sys.path.insert(0, scripts)
from workloads import calls_per_second
sources = [np.ones(tuple(map(int, shape)), dtype) for _ in range(int(count))]
for source in sources:
    np.copy(source)
print(calls_per_second(lambda i: np.copy(sources[i % len(sources)]), float(seconds)))
"""


def memcpy(workload: Workload, duration: float) -> float:
    """Elements per second of one thread running ``np.copy(element)``: a copy into a new array, freshly
    allocated memory each time, which is what a feeder that hands out new arrays pays per element (the
    kernel's page faults and zeroing of the new pages included, numpy's transparent huge pages too).

    It runs in a fresh interpreter whose glibc mmap threshold stays at its initial 128 KiB, so that every
    new 8 MiB array is mapped from the kernel and unmapped when freed. Left to adapt, glibc raises the
    threshold after the first free and hands the same block back on every copy, still in cache: that
    measures the cache, not a feeder (about 33 GB/s on the 2-core EPYC, faster even than the
    `memcpy-preallocated` row). The sources rotate over a span far larger than the last-level cache."""
    source = np.asarray(tf.nest.flatten(workload.item(0))[0])
    shape = [str(n) for n in source.shape]
    scripts = str(Path(__file__).parent)
    command = [
        sys.executable,
        "-c",
        MEMCPY_NEW_ARRAY,
        scripts,
        str(duration),
        str(memcpy_span(source.nbytes)),
    ]
    command += [source.dtype.str, *shape]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(output)


def memcpy_preallocated(workload: Workload, duration: float) -> float:
    """Elements per second of one thread running ``np.copyto(target, source)`` into arrays allocated
    beforehand: copy bandwidth alone, with no new memory. Sources and targets each rotate over a span far
    larger than the last-level cache, so that both are memory, not cache. Shown beside `memcpy` for
    reference; no ratio is taken against it."""
    source = np.asarray(tf.nest.flatten(workload.item(0))[0])
    count = memcpy_span(source.nbytes)
    sources = [source.copy() for _ in range(count)]
    targets = [np.empty_like(source) for _ in range(count)]
    for target, origin in zip(targets, sources):
        np.copyto(target, origin)
    return calls_per_second(lambda i: np.copyto(targets[i % count], sources[i % count]), duration)


def ceiling(workload: Workload, workers: int) -> Pipeline:
    """`from_generator` over a prebuilt in-memory list of the workload's elements: no work at all."""
    prebuilt = [workload.item(i) for i in range(CEILING_ELEMENTS)]

    def cycle() -> Iterable[Any]:
        for i in range(ENDLESS):
            yield prebuilt[i % CEILING_ELEMENTS]

    return from_generator_over(cycle, workload)


LIMIT_ROWS = {"ideal", "one-core", "memcpy", "memcpy-preallocated", "from_generator-ceiling"}


# -- measuring -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    duration_s: float  # steady-state window, at least
    warmup_s: float  # after the first element, before the window opens, at least
    warmup_rounds: int = 2  # the warm-up also lasts this many rounds (see measure)
    window_rounds: int = 4  # and the window this many
    rounds_cap_s: float = 30.0  # rounds stretch a warm-up or a window at most this long


def measure(build: Callable[[], Pipeline], timing: Timing, round_items: int = 0) -> dict:
    """Start-up, time to first element and steady-state rate of one pipeline.

    ``round_items`` is one round: every worker delivering once (workers x the items one worker makes at a
    time: 1, or its batch). The warm-up lasts ``timing.warmup_s`` and ``timing.warmup_rounds`` rounds after
    the first element, so that the window opens only once every worker has started and delivered (a
    worker may take seconds to start, while the first element comes from the fastest); the window lasts
    ``timing.duration_s`` and ``timing.window_rounds`` rounds, so that it spans several of each worker's
    batches however long one worker needs for a batch. Rounds stretch neither beyond
    ``timing.rounds_cap_s``."""
    started = time.perf_counter()
    pipeline = build()
    built = time.perf_counter()

    def over(elapsed: float, items: int, seconds: float, rounds: int) -> bool:
        return elapsed >= seconds and (items >= rounds * round_items or elapsed >= timing.rounds_cap_s)

    try:
        iterator = iter(pipeline.elements)
        count = first_count = touch(next(iterator), pipeline.batched)
        first = now = time.perf_counter()
        window_start, window_count = None, 0
        for element in iterator:
            count += touch(element, pipeline.batched)
            now = time.perf_counter()
            if window_start is None:
                if over(now - first, count - first_count, timing.warmup_s, timing.warmup_rounds):
                    window_start, window_count = now, count
            elif over(now - window_start, count - window_count, timing.duration_s, timing.window_rounds):
                break
        if window_start is None:
            raise RuntimeError(f"the pipeline ended after {count} elements, before the warm-up was over")
        rate = (count - window_count) / (now - window_start)
        del iterator
        notes = pipeline.notes()
    finally:
        pipeline.close()
    return {
        "rate": rate,
        "startup_s": built - started,
        "first_s": first - started,
        "elements": count,
        **notes,
    }


def settle(timeout_s: float = SETTLE_S) -> None:
    """Wait until the processes a pipeline started have exited, so that they cannot slow the next one
    (Keras closes its pool without joining it)."""
    import psutil

    def running(child: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in str(child.cmdline())
        return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(running, psutil.Process().children(recursive=True))):
        time.sleep(0.02)


def measure_call(function: Callable[[Workload, float], float], workload: Workload, timing: Timing) -> dict:
    return {"rate": function(workload, timing.duration_s)}


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    workloads: list[Workload]
    contenders: list[Contender]
    workers: dict[str, int]
    reps: int
    timing: Timing
    results: dict = field(default_factory=dict)  # workload -> row -> [measurement per repetition]

    def rows(self, workload: Workload) -> list[tuple[str, Callable[[], dict]]]:
        """Every measurement one repetition makes for ``workload``: (row name, thunk)."""
        workers = self.workers[workload.name]
        rows = [
            (
                c.name,
                lambda c=c: measure(
                    lambda: c.build(workload, workers), self.timing, c.round_items(workload, workers)
                ),
            )
            for c in self.contenders
            if c.workloads is None or workload.name in c.workloads
        ]
        rows.append(("from_generator-ceiling", lambda: measure(lambda: ceiling(workload, 0), self.timing)))
        if workload.limit == "ideal-cpu":
            rows.append(("one-core", lambda: measure_call(one_core, workload, self.timing)))
        if workload.limit == "memcpy":
            rows.append(("memcpy", lambda: measure_call(memcpy, workload, self.timing)))
            rows.append(
                ("memcpy-preallocated", lambda: measure_call(memcpy_preallocated, workload, self.timing))
            )
        return rows


def run(plan: Plan) -> None:
    from tqdm import tqdm

    schedule = {w.name: plan.rows(w) for w in plan.workloads}
    total = plan.reps * sum(len(rows) for rows in schedule.values())
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        for rep in range(plan.reps):
            for workload in plan.workloads:
                rows = schedule[workload.name]
                shift = rep % len(rows)
                for name, thunk in rows[shift:] + rows[:shift]:
                    progress.set_postfix_str(f"rep {rep + 1}/{plan.reps} {workload.name} {name}")
                    faulthandler.dump_traceback_later(HANG_S, exit=True)
                    try:
                        result = thunk()
                    except Exception as error:  # one broken contender must not hide the others
                        result = {"error": f"{type(error).__name__}: {error}"}
                        progress.write(f"{workload.name} / {name}: {result['error']}", file=sys.stderr)
                    finally:
                        settle()
                        faulthandler.cancel_dump_traceback_later()
                    plan.results.setdefault(workload.name, {}).setdefault(name, []).append(result)
                    progress.update()


# -- the report ------------------------------------------------------------------------------------------


def summarize(plan: Plan) -> dict:
    """Median and spread of every row, the limit of every workload, and the ratios."""
    cores = usable_cores()
    summary = {}
    for workload in plan.workloads:
        measured = plan.results.get(workload.name, {})
        rows: dict[str, dict] = {}
        for name, reps in measured.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                rows[name] = {"error": reps[0]["error"]}
                continue
            row = {"reps": len(ok)}
            for key in ("rate", "startup_s", "first_s"):
                values = [r[key] for r in ok if key in r]
                if values:
                    row[key] = statistics.median(values)
                    row[key + "_min"], row[key + "_max"] = min(values), max(values)
            errors = [r["error"] for r in reps if "error" in r]
            if errors:
                row["errors"] = errors
            rows[name] = row
        limit_name, limit = limit_of(workload, rows, plan.workers[workload.name], cores)
        if workload.limit in ("ideal-io", "ideal-cpu") and limit:
            rows["ideal"] = {"rate": limit}
        contenders = [
            row["rate"]
            for name, row in rows.items()
            if "rate" in row and not name.startswith("mpfeed") and name not in LIMIT_ROWS
        ]
        best = max(contenders) if contenders else None
        for name, row in rows.items():
            if "rate" in row and name not in LIMIT_ROWS:
                row["vs_best"] = row["rate"] / best if best else None
                row["vs_limit"] = row["rate"] / limit if limit else None
        summary[workload.name] = {
            "workers": plan.workers[workload.name],
            "limit": limit_name,
            "limit_rate": limit,
            "best_other_rate": best,
            "element_bytes": element_bytes(workload),
            "rows": rows,
        }
    return summary


def limit_of(workload: Workload, rows: dict, workers: int, cores: int) -> tuple[str, float | None]:
    def rate(name: str) -> float | None:
        return rows.get(name, {}).get("rate")

    if workload.limit == "ideal-io":
        return "ideal", workers / IO_SLEEP_S
    if workload.limit == "ideal-cpu":
        one = rate("one-core")
        return "ideal", one * cores if one else None
    if workload.limit == "memcpy":
        return "memcpy", rate("memcpy")
    return "from_generator-ceiling", rate("from_generator-ceiling")


ROW_ORDER = [
    "from_generator",
    "thread-queue",
    "tf-map",
    "keras-pydataset",
    "mp-pool",
    "torch-dataloader",
    "grain",
]


def ordered_rows(rows: dict) -> list[str]:
    first = [n for n in ROW_ORDER if n in rows]
    mine = sorted(n for n in rows if n.startswith("mpfeed"))
    limits = [
        n
        for n in ("ideal", "one-core", "memcpy", "memcpy-preallocated", "from_generator-ceiling")
        if n in rows
    ]
    return first + mine + limits + [n for n in rows if n not in first + mine + limits]


def table(summary: dict) -> str:
    header = (
        f"{'workload':<15} {'row':<23} {'elem/s':>10} {'min-max':>19} {'MB/s':>8} "
        f"{'start s':>8} {'first s':>8} {'x best':>7} {'vs limit':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, entry in summary.items():
        limit = entry["limit_rate"]
        limit_text = f"{limit:,.0f}/s" if limit else "n/a"
        lines.append(f"{name} ({entry['workers']} workers; limit: {entry['limit']} = {limit_text})")
        for row_name in ordered_rows(entry["rows"]):
            row = entry["rows"][row_name]
            if "rate" not in row:
                lines.append(f"{'':<15} {row_name:<23} error: {row.get('error', '?')[:70]}")
                continue
            spread = f"{row['rate_min']:,.0f}-{row['rate_max']:,.0f}" if "rate_min" in row else ""
            mbs = row["rate"] * entry["element_bytes"] / 1e6
            lines.append(
                f"{'':<15} {row_name:<23} {row['rate']:>10,.0f} {spread:>19} {mbs:>8,.0f} "
                f"{_num(row.get('startup_s'), 3):>8} {_num(row.get('first_s'), 3):>8} "
                f"{_num(row.get('vs_best'), 2, 'x'):>7} {_num(row.get('vs_limit'), 0, '%', 100):>8}"
            )
    return "\n".join(lines)


def _num(value: float | None, digits: int, suffix: str = "", scale: float = 1) -> str:
    return "" if value is None else f"{value * scale:.{digits}f}{suffix}"


def machine() -> dict:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import PIL

    return {
        "usable_cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "pillow": PIL.__version__,
        "mpfeed": mpfeed.__version__,
        **engine_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def engine_version() -> dict:
    """Which mpfeed ran: where it was imported from, its git commit, and a digest of its sources."""
    package = Path(mpfeed.__file__).resolve().parent
    sources = b"".join(path.read_bytes() for path in sorted(package.glob("*.py")))

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    return {
        "mpfeed_path": str(package),
        "mpfeed_commit": commit,
        "mpfeed_modified": bool(git("status", "--porcelain", "--", ".")) if commit else None,
        "mpfeed_sources_sha256": hashlib.sha256(sources).hexdigest()[:16],
    }


def warn_if_engine_changed(info: dict) -> None:
    """Note in ``info``, and say, when mpfeed's sources changed since ``info`` was taken."""
    now = engine_version()
    if now["mpfeed_sources_sha256"] != info["mpfeed_sources_sha256"]:
        info["warning"] = "mpfeed's sources changed during the run: figures may mix two versions"
        print(f"WARNING: {info['warning']}", file=sys.stderr)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(summary)
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, summary.items()):
        names = [n for n in ordered_rows(entry["rows"]) if "rate_min" in entry["rows"][n]]
        rates = [entry["rows"][n]["rate"] for n in names]
        low = [entry["rows"][n]["rate"] - entry["rows"][n]["rate_min"] for n in names]
        high = [entry["rows"][n]["rate_max"] - entry["rows"][n]["rate"] for n in names]
        colors = [
            "tab:orange" if n.startswith("mpfeed") else "tab:gray" if n in LIMIT_ROWS else "tab:blue"
            for n in names
        ]
        ax.barh(names, rates, xerr=[low, high], color=colors, capsize=2)
        if rates and max(rates) > 50 * min(rates):
            ax.set_xscale("log")
        if entry["limit_rate"]:
            ax.axvline(entry["limit_rate"], color="tab:red", linestyle="--", label=entry["limit"])
            ax.legend(loc="best", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{name} ({entry['workers']} workers)", fontsize=10)
        ax.set_xlabel("elements/s (median, min-max)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save(plan: Plan, summary: dict, info: dict, args: argparse.Namespace, prefix: str = "bench") -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"{prefix}-{stamp}"
    document = {
        "machine": info,
        "command": " ".join(sys.argv),
        "options": vars(args),
        "timing": vars(plan.timing),
        "summary": summary,
        "raw": plan.results,
    }
    base.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str))
    title = f"mpfeed bench: {info['cpu_model']}, {info['usable_cores']} cores, TF {info['tensorflow']}"
    plot(summary, base.with_suffix(".png"), title)
    return base


# -- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows and fewer repetitions")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    parser.add_argument("--contenders", default=None, help="comma-separated (default: all available)")
    parser.add_argument(
        "--workers", type=int, default=None, help="workers for every workload (default: cores; 8 for io)"
    )
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    contenders = available_contenders()
    if args.contenders:
        wanted = [n.strip() for n in args.contenders.split(",") if n.strip()]
        known = {c.name for c in CONTENDERS + PEERS}
        if set(wanted) - known:
            raise SystemExit(f"unknown contenders {sorted(set(wanted) - known)}; choose from {sorted(known)}")
        contenders = [c for c in contenders if c.name in wanted]
    cores = usable_cores()
    workers = {n: args.workers or (8 if n == "io" else cores) for n in names}
    timing = Timing(duration_s=0.12, warmup_s=0.05) if args.quick else Timing(duration_s=1.5, warmup_s=0.3)
    reps = args.reps or 3
    return Plan([WORKLOADS[n] for n in names], contenders, workers, reps, timing)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = make_plan(args)
    info = machine()
    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores; python {info['python']}, "
        f"TF {info['tensorflow']}, keras {info['keras']}, numpy {info['numpy']}; {info['date']}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    run(plan)
    warn_if_engine_changed(info)
    summary = summarize(plan)
    base = save(plan, summary, info, args)
    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores, TF {info['tensorflow']}, {info['date']}"
    )
    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# mpfeed {engine} from {info['mpfeed_path']}, sources {info['mpfeed_sources_sha256']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(table(summary))
    print(f"\nresults: {base}.json, {base}.png")


if __name__ == "__main__":
    main()
