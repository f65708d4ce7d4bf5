"""The contenders of docs/benchmarks.md: what a user would otherwise feed `tf.data` with, mpfeed's own
rows, and the optional peers (PyTorch's DataLoader, Grain) when they are installed.

Each contender builds a `harness.Pipeline` for one workload and worker count. This module imports
TensorFlow, and Keras itself only where `keras-pydataset` runs (TensorFlow >= 2.16 loads part of Keras on
import regardless). `mp-pool`, `keras-pydataset` and `torch-dataloader` start their processes the way
their users get them by default (multiprocessing's default start method: fork on Linux with Python <
3.14); Grain always spawns its workers, which load no TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import queue
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

import mpfeed

from .harness import Contender, Pipeline
from .workloads import ENDLESS, WORKLOADS, IndexedItems, Workload, item_row

QUEUE_SIZE = 10  # thread-queue's queue.Queue(maxsize=...)
CEILING_ELEMENTS = 8  # distinct elements in the from_generator-ceiling's list
POOL_IN_FLIGHT = 4  # mp-pool: tasks in flight per worker (as mpfeed's default depth)


# -- helpers -------------------------------------------------------------------------------------------------


@functools.cache
def signature(workload: Workload) -> Any:
    """The `tf.TensorSpec` nest of one element of ``workload``."""
    return tf.nest.map_structure(
        lambda leaf: tf.TensorSpec(np.shape(leaf), tf.as_dtype(np.asarray(leaf).dtype)), workload.item(0)
    )


def batch_in_graph(dataset: tf.data.Dataset, workload: Workload) -> tf.data.Dataset:
    return dataset.batch(workload.batch_size) if workload.batch_size else dataset


def from_generator_over(generator: Callable[[], Iterable[Any]], workload: Workload) -> Pipeline:
    dataset = tf.data.Dataset.from_generator(generator, output_signature=signature(workload))
    return Pipeline(batch_in_graph(dataset, workload), batched=workload.batch_size is not None)


# -- contenders 1-6 of docs/benchmarks.md --------------------------------------------------------------------


def ceiling(workload: Workload) -> Pipeline:
    """The `from_generator-ceiling` limit: `from_generator` over a prebuilt in-memory list of the
    workload's elements, no work at all."""
    prebuilt = [workload.item(i) for i in range(CEILING_ELEMENTS)]

    def cycle() -> Iterable[Any]:
        for i in range(ENDLESS):
            yield prebuilt[i % CEILING_ELEMENTS]

    return from_generator_over(cycle, workload)


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


def tf_decode_cache_augment(n: int) -> tf.data.Dataset:
    """`decode-cached`'s peer, as a tf.data user writes it: ``map(decode).cache().map(augment)`` over
    ``n`` elements, both maps the workload's own numpy work (`tf.numpy_function`), ``AUTOTUNE`` parallel.
    The first pass decodes and fills the cache; each later pass augments what it holds."""
    from .workloads import CACHED_CROP, IMAGE_SHAPE, crop_and_flip, decode_item

    def decode(i: np.int64) -> list:
        image, label = decode_item(int(i))
        return [image, label]

    def augment(image: np.ndarray, label: np.int64) -> list:
        return [np.ascontiguousarray(crop_and_flip(image, np.random.default_rng())), label]

    def load(i: tf.Tensor) -> Any:
        image, label = tf.numpy_function(decode, [i], [tf.uint8, tf.int64], stateful=False)
        return tf.ensure_shape(image, IMAGE_SHAPE), tf.ensure_shape(label, ())

    def augmented(image: tf.Tensor, label: tf.Tensor) -> Any:
        crop, label = tf.numpy_function(augment, [image, label], [tf.uint8, tf.int64])
        return tf.ensure_shape(crop, (CACHED_CROP, CACHED_CROP, 3)), tf.ensure_shape(label, ())

    dataset = tf.data.Dataset.range(n).map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
    return dataset.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)


@functools.cache
def keras_items_class() -> type:
    """`keras.utils.PyDataset` over a workload, made on first use: Keras loads only where it runs. Keras
    wants batches, so an element comes as a batch of one where the workload does not batch."""
    import keras

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


# -- the Ray backend and Ray Data (scale_ray.py, on a cluster it connected to) -------------------------------


def mpfeed_ray_dataset(workload: Workload, workers: int, batch_size: int | None = None) -> Pipeline:
    """``mpfeed.Feeder(source, workers=N, backend=RayBackend(scheduling_strategy="SPREAD")).dataset()``:
    the workers are Ray actors spread over the cluster's nodes."""
    feeder = mpfeed.Feeder(
        workload.source,
        args=(ENDLESS,),
        workers=workers,
        batch_size=batch_size or workload.batch_size,
        backend=mpfeed.RayBackend(scheduling_strategy="SPREAD"),
    )
    batched = (batch_size or workload.batch_size) is not None
    return Pipeline(feeder.dataset(), batched=batched, close=feeder.close, notes=mpfeed_notes(feeder))


def ray_data_to_tf(workload: Workload, rows: int) -> Pipeline:
    """Ray Data as its documentation shows it: ``ray.data.range(rows).map(row -> {"image", "label"})`` then
    ``to_tf("image", "label", batch_size=...)``. Ray Data runs the row function in Ray tasks over blocks of
    rows, as many at once as the cluster's CPUs allow (its defaults: blocks, concurrency, prefetch_batches
    =1), and `to_tf` wraps its batches in `from_generator`. ``rows`` is finite, as a Ray dataset is."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.range(rows).map(functools.partial(item_row, workload.item))
    batch_size = workload.batch_size or 1
    tf_dataset = dataset.to_tf(feature_columns="image", label_columns="label", batch_size=batch_size)
    return Pipeline(tf_dataset, batched=True)


# -- optional peers: only when importable --------------------------------------------------------------------


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
    docs/benchmarks.md compares) and keeps ``per_worker_buffer_size`` elements ready, the same depth as
    the others.
    Grain always spawns its workers, and a spawned worker imports the main script again (`bench.py` and
    `scale.py` load TensorFlow only outside such workers, as a careful training script would) and, to
    unpickle the items, `workloads`."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags in its workers; no main() parsed them
        flags.FLAGS.mark_as_parsed()
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


# -- the registry --------------------------------------------------------------------------------------------


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
