"""`Feeder`: the public face of the consumer side: its options, iteration, stats, position and closing.

The state behind it, and the one lock that owns it, live in `mpfeed.consumer`; `stats()` reads snapshots
and never a pipe.
"""

from __future__ import annotations

import inspect
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import psutil

from . import bootstrap
from .autotune import Change
from .cache import auto_bytes, splits
from .consumer import EPOCH_END, Consumer
from .diagnosis import Picture, cache_verdict, verdict
from .layout import align
from .supervisor import Supervisor, WorkerConfig, WorkerHandle

if TYPE_CHECKING:
    from .ray_backend import RayBackend

DEFAULT_START_METHOD = "forkserver"
_AUTO_MAX_WORKERS = 32
# A generator source with more workers than this many per usable core gets a warning: unless it waits on
# I/O, which nothing tells before it runs, they only compete for the cores.
_OVERSUBSCRIBED = 4


@dataclass(frozen=True)
class WorkerStats:
    """One worker's share."""

    index: int
    """The worker's shard index."""
    pid: int
    """Its process id."""
    alive: bool
    """Whether the process is still running."""
    items: int
    """Elements delivered from this worker over the feeder's life."""
    bytes: int
    """Leaf bytes delivered from this worker."""
    held_slots: int
    """Slots of its ring whose views the user (or TensorFlow) still holds."""
    queued: int
    """Records announced by the worker that the consumer has not taken yet."""
    slot_bytes: int
    """Size of each slot in its ring (0 until the ring is sized from the first element)."""
    slots: int
    """Slots of its ring it may use now: ``depth``, more while views linger."""
    cpu_s: float
    """CPU seconds the worker process has used (user + system)."""
    busy_s: float
    """Seconds it spent making elements (the source's work and writing records), as it last reported."""
    blocked_s: float
    """Seconds it waited for a free slot: the consumer was behind."""
    idle_s: float
    """Seconds it waited for work: a task, or the next epoch."""
    rss_bytes: int
    """The worker's resident memory."""
    node: str | None = None
    """Where the worker runs: the address of its Ray node; None for a local process."""


@dataclass(frozen=True, repr=False)
class FeederStats:
    """A snapshot of a feeder's counters (`Feeder.stats`). Its repr puts a field on each line, and each
    worker's figures on one line."""

    items: int
    """Elements delivered over the feeder's life (a batch counts as its size)."""
    bytes: int
    """Leaf bytes delivered over the feeder's life."""
    elapsed_s: float
    """Seconds since the feeder started its workers."""
    items_per_s: float
    """``items / elapsed_s``."""
    bytes_per_s: float
    """``bytes / elapsed_s``."""
    wait_s: float
    """Seconds the consumer spent waiting for workers."""
    wait_fraction: float
    """The share of the consumer's time spent waiting for input, over the feeder's life: its own work
    between calls (the training step) plus its calls for elements. Above 0.2, training is input-bound."""
    recent_wait_fraction: float
    """The same over the last 10 seconds."""
    step_s: float
    """Seconds the consumer spent between its calls for elements: its own work (the training step)."""
    overhead_s: float
    """Seconds inside the calls for elements, not waiting: mpfeed's own cost to the consumer."""
    calls: int
    """Calls for elements (a batch, or a chunk through dataset(), is one)."""
    head_of_line_s: float
    """Ordered delivery: seconds waiting for the next element in order while other workers had theirs
    ready."""
    active_workers: int
    """Workers being given work (``workers="auto"`` adjusts it)."""
    worker_changes: tuple[Change, ...]
    """With ``workers="auto"``: every change of the worker count, with when and why (also logged at INFO by
    the "mpfeed" logger)."""
    overflow: int
    """Records too big for their slot, carried through the worker's pipe instead."""
    copies: int
    """Records copied out of their slot because the user held all the others of that ring."""
    epoch: int
    """The epoch being served, counting from 0."""
    shm_bytes: int
    """Shared memory reserved for rings (slots x slot_bytes, for the rings made so far)."""
    ring_memory: str | None
    """Where the rings live: "posix" (/dev/shm) or "memfd"; None until the first ring is made."""
    shm_budget: int
    """The most bytes the rings may take (``shm_bytes`` never exceeds it)."""
    depth_grows: int
    """Slots given to workers beyond ``depth`` because views lingered (instead of copies)."""
    workers: tuple[WorkerStats, ...]
    """Per-worker figures, by shard index."""
    cache_hits: int = 0
    """With ``cache_bytes``: samples served from the cache (``load`` skipped)."""
    cache_misses: int = 0
    """With ``cache_bytes``: samples loaded (``load(i)`` called), stored or not."""
    cache_bytes: int = 0
    """With ``cache_bytes``: bytes of the cache in use, its index and the samples stored (never more than
    ``cache_budget``)."""
    cache_entries: int = 0
    """With ``cache_bytes``: samples the cache holds."""
    cache_budget: int = 0
    """The ``cache_bytes`` the feeder was given (or ``"auto"`` picked), in whole pages; 0 without a
    cache."""

    def __repr__(self) -> str:
        lines = [f"  {f.name}={getattr(self, f.name)!r}," for f in fields(self) if f.name != "workers"]
        lines += ["  workers=(", *[f"    {worker!r}," for worker in self.workers], "  ),"]
        return "\n".join(["FeederStats(", *lines, ")"])


class RandomAccessSource(Protocol):
    """A source with ``__len__`` and ``__getitem__(index)``: a PyTorch map dataset, Grain's
    RandomAccessDataSource, a list."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def _dtype_nest(node: Any) -> Any:
    """``dtypes`` with numpy dtypes at its leaves (tuples and dicts kept); `TypeError` for anything else."""
    if isinstance(node, dict):
        return {key: _dtype_nest(child) for key, child in node.items()}
    if isinstance(node, (tuple, list)):
        return tuple(_dtype_nest(child) for child in node)
    try:
        if node is None:
            raise TypeError
        return np.dtype(node)
    except TypeError:
        raise TypeError(f"dtypes must be a nest (tuples, dicts) of numpy dtypes, found {node!r}") from None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Feeder:
    """Runs ``source`` in worker processes and hands out its elements as read-only numpy views.

    ``source`` is either random access, an object with ``__len__`` and ``__getitem__(index)`` (a PyTorch
    map dataset, Grain's RandomAccessDataSource, a list), whose workers make ``source[i]`` for the indices
    the feeder hands them, in an order it owns (a source with ``load(i)`` and ``augment(sample, rng)``
    is served ``augment(load(i), rng)`` instead, ``rng`` drawn from ``(seed, epoch, i)`` as
    `mpfeed.element_rng`, and can keep its loaded samples in a shared cache: ``cache_bytes``); or a
    generator function, called in every worker as ``source(*args, shard=Shard, **kwargs)``, where each
    worker takes its share
    (``items[shard.index::shard.count]``). Iterating the feeder gives one epoch; iterating again starts
    the next epoch on the same processes. A feeder serves one pass at a time: a new iteration supersedes
    an unfinished one.

    Args:
        source: a random-access object, or a module-level generator function (either is pickled and
            sent to every worker).
        args, kwargs: any picklable objects, sent once to every worker and passed to a generator source.
        workers: worker processes; default: the CPUs this process may use. A generator source with more
            than four per usable core gets a `RuntimeWarning` (whether it waits on I/O, and so gains from
            them, cannot be told before it runs); a random-access one can use ``"auto"``, which measures.
            ``"auto"``: for a random-access source, adjusted while the feeder runs, to the fewest that keep
            the consumer from waiting (see `mpfeed.autotune`; ``stats().active_workers``,
            ``stats().worker_changes``); a generator source's shards cannot change without changing its
            data, so there it means the usable CPUs.
        shm_budget: the most bytes the feeder's rings may take, all workers together (default: a quarter
            of the memory available when it starts). Each ring has room for twice ``depth`` records
            within its worker's share: the slots beyond ``depth`` are given to a worker only while the
            consumer (TensorFlow's prefetch, say) holds its views, instead of copying records out.
        max_workers: with ``workers="auto"``, the most workers it may start (default: 32, or twice the
            usable CPUs where that is more): I/O-bound sources want many more workers than cores.
        depth: slots per worker ring, i.e. how many records each worker may have ready ahead.
        slot_bytes: slot size; default: sized from each worker's first record with 25% headroom. A
            bigger record still arrives intact through the worker's pipe (``stats().overflow``).
        batch_size: workers stack this many elements into one record; the feeder yields batches.
        drop_remainder: drop the last, short batch (of each worker, for generator sources).
        ordered: True to deliver in order (random access: the epoch's order; generators: round-robin
            over the shards, which with strided shards is the source order); False for first ready.
        seed: a non-negative int (random when None): the base of the shuffle, of `mpfeed.element_rng`
            and of every ``shard.seed``; generator workers also seed ``random`` and ``numpy.random`` from
            it at every epoch.
        shuffle: random access only: each epoch's order is a permutation drawn from ``(seed, epoch)``.
        partition: ``(index, count)``: serve part ``index`` of ``count`` (one per host). For a
            random-access source every part serves ``ceil(len(source) / count)`` elements, so that every
            host runs the same number of steps: the epoch's order is padded with its own first elements
            (as PyTorch's DistributedSampler does), and the parts together cover every element at least
            once; see ``partition_remainder``. A generator source's parts are its shards'.
        partition_remainder: how a random-access source's parts share a length that ``count`` does not
            divide: "pad" (the default, above), "drop" (leave out the order's last ``len % count``
            elements: equal parts, each element at most once) or "uneven" (every element exactly once;
            parts differ by one element, so hosts in lockstep can wait on each other forever).
        start_method: "forkserver" (default: one fresh interpreter forks every worker) or "spawn" (a
            fresh interpreter per worker). The consumer itself is never forked.
        timeout: seconds the consumer may wait for a worker before `WorkerTimeoutError`; None: no limit.
        ring_memory: where the rings live: "posix" (named segments in /dev/shm, their names removed as
            soon as each worker has attached), "memfd" (anonymous memory, limited only by RAM and the
            cgroup: a container's small /dev/shm does not matter), or "auto" (the default: posix while
            /dev/shm has room for every ring, else memfd).
        cache_bytes: random access, for a source with ``load(i)`` and ``augment(sample, rng)``: keep the
            loaded samples in memory shared by all the workers, at most this many bytes (index included),
            so that later epochs run only ``augment``, on the sample read in place (read-only views: an
            ``augment`` must not modify its sample). No eviction: a sample that does not fit is loaded
            every epoch. ``"auto"``: a quarter of the memory available at start (see `mpfeed.cache`).
            None (the default): no cache. Not with the Ray backend.
        backend: where the workers run: None for local processes, or `mpfeed.RayBackend(...)` for Ray
            actors on a cluster, each record a Ray object mapped here without a copy. Everything else
            (order, shuffle, seeds, batches, resume, partitions, errors) is the same; ``workers``
            defaults to the cluster's CPUs, and the local engine's own options (``start_method``,
            ``ring_memory``, ``slot_bytes``, ``shm_budget``, ``workers="auto"``) do not apply.
        dtypes: a nest (tuples, dicts) of numpy dtypes, ``object`` for text: the workers convert every
            element to it as `tf.data.Dataset.from_generator` converts to its signature (see
            `mpfeed.conform`); `mpfeed.from_generator` passes its signature's (``dtypes=
            mpfeed.tf.numpy_dtypes(signature)`` does the same for ``dataset(signature)``). None: as made.
    """

    def __init__(
        self,
        source: RandomAccessSource | Callable[..., Iterable[Any]],
        *,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        workers: int | str | None = None,
        depth: int = 4,
        slot_bytes: int | None = None,
        batch_size: int | None = None,
        drop_remainder: bool = False,
        ordered: bool = True,
        seed: int | None = None,
        start_method: str | None = None,
        timeout: float | None = None,
        ring_memory: str = "auto",
        shuffle: bool = False,
        partition: tuple[int, int] | None = None,
        max_workers: int | None = None,
        shm_budget: int | None = None,
        backend: RayBackend | None = None,
        partition_remainder: str = "pad",
        dtypes: Any = None,
        cache_bytes: int | str | None = None,
    ) -> None:
        if bootstrap.importing_main:
            raise RuntimeError(
                "a Feeder was created while a worker imported your main script: workers import it to find "
                'the source, so put the code that creates the feeder under `if __name__ == "__main__":`'
            )
        if inspect.isclass(source) and hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            raise TypeError(
                f"source is the class {source.__qualname__}, not an instance of it: pass "
                f"{source.__qualname__}(...), the random-access object itself"
            )
        indexed = _random_access(source)
        if indexed:
            length = _length_of(source)
            _require(
                not args and not kwargs,
                "args and kwargs go to generator sources; a random-access source carries its own state",
            )
        elif callable(source):
            _check_call(source, args, kwargs)
            _require(
                not shuffle,
                "shuffle=True needs a random-access source (an object with __len__ and __getitem__): a "
                "generator source shuffles its own shard, e.g. with random.Random(shard.seed)",
            )
        else:
            raise TypeError(
                "source must be a random-access object (with __len__ and __getitem__) or a generator "
                f"function, got {type(source).__name__}"
            )
        partition = (0, 1) if partition is None else partition
        _require(
            isinstance(partition, tuple)
            and len(partition) == 2
            and all(_is_int(v) for v in partition)
            and 0 <= partition[0] < partition[1],
            f"partition must be (index, count) with 0 <= index < count, got {partition!r}",
        )
        _require(
            partition_remainder in ("pad", "drop", "uneven"),
            f"partition_remainder must be 'pad', 'drop' or 'uneven', got {partition_remainder!r}",
        )
        if backend is not None:
            _check_backend(backend, workers, start_method, ring_memory, slot_bytes, shm_budget)
            _require(
                cache_bytes is None,
                "cache_bytes keeps loaded samples in memory shared by local worker processes; the Ray "
                "backend's actors run on other hosts and have no such cache: drop cache_bytes (each actor "
                "then loads every sample every epoch)",
            )
        cache_bytes = _cache_size(cache_bytes, source, indexed)
        _require(
            not (shuffle and partition[1] > 1 and seed is None),
            f"shuffle=True with partition={partition} (or an input_context of several pipelines) needs a "
            "seed: each part takes its share of one permutation, and without a seed each would draw its own "
            "(parts that overlap and miss elements). Pass the same seed on every host",
        )
        cores = _usable_cpus() if backend is None else backend.default_workers()
        autotune = None
        if workers == "auto":
            max_workers = max(_AUTO_MAX_WORKERS, 2 * cores) if max_workers is None else max_workers
            _require(
                _is_int(max_workers) and max_workers >= 1,
                f"max_workers must be an int >= 1, got {max_workers!r}",
            )
            count = min(cores, max_workers)
            autotune = (cores, max_workers) if indexed else None
        else:
            _require(max_workers is None, 'max_workers goes with workers="auto"')
            count = cores if workers is None else workers if isinstance(workers, int) else 0
            _require(
                _is_int(count) and count >= 1, f'workers must be an int >= 1, "auto" or None, got {workers!r}'
            )
        if not indexed and backend is None and count > _OVERSUBSCRIBED * cores:
            warnings.warn(
                f"workers={count} for a generator source on {cores} usable cores: mpfeed cannot tell whether "
                "the source waits on I/O (then many workers help) or computes (then more workers than cores "
                "only compete for them, and for memory, and each shard gets smaller). If it computes, use "
                "workers=None (one per core); if it waits on I/O, silence this with warnings.filterwarnings",
                RuntimeWarning,
                stacklevel=2,
            )
        _require(_is_int(depth) and depth >= 1, f"depth must be an int >= 1, got {depth!r}")
        if shm_budget is None:
            shm_budget = psutil.virtual_memory().available // 4
        _require(
            _is_int(shm_budget) and shm_budget > 0, f"shm_budget must be positive bytes, got {shm_budget!r}"
        )
        _require(
            slot_bytes is None or (_is_int(slot_bytes) and slot_bytes > 0),
            f"slot_bytes must be a positive int or None, got {slot_bytes!r}",
        )
        _require(
            batch_size is None or (_is_int(batch_size) and batch_size >= 1),
            f"batch_size must be an int >= 1 or None, got {batch_size!r}",
        )
        _require(
            not drop_remainder or batch_size is not None,
            "drop_remainder=True drops the last, short batch, so it needs batch_size",
        )
        _require(
            seed is None or (_is_int(seed) and seed >= 0), f"seed must be an int >= 0 or None, got {seed!r}"
        )
        _require(
            timeout is None or (isinstance(timeout, (int, float)) and timeout > 0),
            f"timeout must be positive seconds or None, got {timeout!r}",
        )
        _require(
            ring_memory in ("auto", "posix", "memfd"),
            f"ring_memory must be 'auto', 'posix' or 'memfd', got {ring_memory!r}",
        )
        _require(
            start_method in (None, "spawn", "forkserver"),
            f"start_method must be 'spawn' or 'forkserver', got {start_method!r}: forking the consumer "
            "itself ('fork') is not offered, since a process that has loaded TensorFlow can deadlock",
        )
        seed = seed if seed is not None else secrets.randbits(63)
        workers_config = WorkerConfig(
            workers=count,
            depth=depth,
            slot_bytes=None if slot_bytes is None else align(slot_bytes),
            batch_size=batch_size,
            drop_remainder=bool(drop_remainder),
            seed=seed,
            start_method=start_method or DEFAULT_START_METHOD,
            ring_memory=ring_memory,
            indexed=indexed,
            partition=partition,
            shm_budget=shm_budget,
            max_workers=autotune[1] if autotune is not None else count,
            dtypes=None if dtypes is None else _dtype_nest(dtypes),
            cache_bytes=cache_bytes,
        )
        self._started = time.monotonic()
        self._consumer = Consumer(
            self,
            source,
            args,
            dict(kwargs or {}),
            workers_config,
            ordered=bool(ordered),
            timeout=timeout,
            length=length if indexed else None,
            shuffle=bool(shuffle),
            autotune=autotune,
            backend=backend,
            remainder=partition_remainder,
        )

    # -- public face ---------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """How many worker processes feed this feeder."""
        return self._consumer.supervisor.config.workers

    @property
    def batch_size(self) -> int | None:
        """Elements the workers stack into one record, or None: each record is one element."""
        return self._consumer.supervisor.config.batch_size

    def __iter__(self) -> Iterator[Any]:
        """One epoch of elements, in the epoch's order (random access) or source order (generators) when
        ``ordered``, else first ready. Which epoch, and from where, is `set_epoch`'s rule."""
        return self._iterate()

    def __len__(self) -> int:
        """Records per epoch of a random-access source: elements, or batches with ``batch_size``, of this
        partition. A generator source has no length: its shards end when they end."""
        records = self._consumer.records_per_epoch()
        if records is None:
            raise TypeError(
                "a feeder of a generator source has no length: each worker's shard ends when its generator "
                "does. A random-access source (with __len__ and __getitem__) gives the feeder one"
            )
        return records

    def set_epoch(self, epoch: int) -> None:
        """Name the epoch the next pass (iteration) serves, as a training loop counts them (PyTorch's
        ``DistributedSampler.set_epoch``): from a position loaded for that epoch (`load_state_dict`), else
        from its start. The epoch decides the shuffle, ``shard.epoch`` and `mpfeed.element_rng`.

        Without it the feeder picks the next pass's epoch itself, by one rule: a loaded position's epoch;
        else, after a pass that handed out its whole epoch, the next epoch; else (a pass that stopped
        early: a `take`, a peek, a ``break``) the same epoch again, from where that pass began. So the
        feeder advances its epoch by itself only when a pass has handed out every record of the last one.
        The `mpfeed.keras` callbacks call this from Keras's own epoch."""
        _require(_is_int(epoch) and epoch >= 0, f"epoch must be an int >= 0, got {epoch!r}")
        self._consumer.set_epoch(epoch)

    def dataset(self, output_signature: Any = None, *, chunk_size: int | None = None):
        """A `tf.data.Dataset` over this feeder; each pass over it is one epoch.

        The signature is inferred from the first element when not given. Small elements reach TensorFlow
        in chunks that the dataset unbatches in the graph (see `mpfeed.tf.feeder_dataset`)."""
        try:
            from .tf import feeder_dataset
        except ModuleNotFoundError as error:  # name the extra, not just the missing module
            if (error.name or "").partition(".")[0] != "tensorflow":
                raise
            raise ModuleNotFoundError(
                "Feeder.dataset() needs TensorFlow, which is not installed here: install mpfeed with its tf "
                "extra, pip install '/path/to/mpfeed[tf]' (or iterate the feeder without TensorFlow)",
                name="tensorflow",
            ) from error
        config = self._consumer.supervisor.config
        return feeder_dataset(
            self,
            self._iterate,
            self._consumer.peek,
            output_signature,
            chunk_size,
            batched=config.batch_size is not None,
            partitioned=config.partition[1] > 1,
            records=self._consumer.records_per_epoch(),
        )

    def state_dict(self, consumed: int | None = None, *, epoch: int | None = None) -> dict[str, Any]:
        """The feeder's position, small and JSON-ready: an epoch, and how far into it.

        Without arguments: where the next pass starts when nothing is being served (a position loaded or
        named by `set_epoch`), else how far the current epoch has been handed out. ``consumed``: the
        position after the first ``consumed`` records of ``epoch`` (default: the current one), counted
        from the epoch's start (records before a resume included): save what the model consumed, since
        tf.data prefetches ahead of it, even into the next epochs. A record is an element, or a batch
        with ``batch_size``. ``consumed`` may lie up to `mpfeed.progress.HISTORY` records behind what was
        handed out, in any of the last few epochs served; ``len(self)`` (the whole epoch) gives the next
        epoch's start."""
        _require(
            consumed is None or (_is_int(consumed) and consumed >= 0),
            f"consumed must be an int >= 0 or None, got {consumed!r}",
        )
        _require(
            epoch is None or (_is_int(epoch) and epoch >= 0), f"epoch must be an int >= 0, got {epoch!r}"
        )
        return self._consumer.position(consumed, epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next iteration goes on with that epoch at that position.
        `ValueError` naming what differs when the state comes from a feeder configured differently."""
        self._consumer.resume(state)

    def stats(self) -> FeederStats:
        """Counters since the feeder started: throughput, waiting, overflow, copies, per-worker use.

        Safe from any thread at any time: it reads snapshots, never a pipe."""
        consumer = self._consumer
        supervisor, clock = consumer.supervisor, consumer.clock
        elapsed = max(time.monotonic() - self._started, 1e-9)
        workers = tuple(
            _worker_stats(handle, consumer.releases.pending(handle.index)) for handle in supervisor.handles
        )
        items = sum(w.items for w in workers)
        nbytes = sum(w.bytes for w in workers)
        return FeederStats(
            items=items,
            bytes=nbytes,
            elapsed_s=elapsed,
            items_per_s=items / elapsed,
            bytes_per_s=nbytes / elapsed,
            wait_s=consumer.wait_s,
            wait_fraction=clock.wait_fraction(),
            recent_wait_fraction=clock.recent_wait_fraction(),
            step_s=clock.between_s,
            overhead_s=max(0.0, clock.inside_s - clock.waited_s),
            calls=clock.calls,
            head_of_line_s=consumer.head_of_line_s,
            active_workers=consumer.active_workers(),
            worker_changes=tuple(consumer.tuner.history) if consumer.tuner is not None else (),
            overflow=supervisor.overflow,
            copies=consumer.leases.copies,
            epoch=consumer.epoch,
            shm_bytes=sum(h.ring.depth * h.ring.slot_bytes for h in supervisor.handles if h.ring is not None),
            shm_budget=supervisor.config.shm_budget or 0,
            depth_grows=supervisor.depth_grows,
            ring_memory=supervisor.ring_memory,
            workers=workers,
            **_cache_stats(supervisor),
        )

    def report(self) -> str:
        """What limits training, in a few plain lines: input-bound (the consumer waits for input more than
        20% of its time), moderately (over 5%) or bound by the consumer, and what to do about it."""
        stats = self.stats()
        busy, blocked, idle = _shares_since_the_first_element(self._consumer.supervisor.handles)
        picture = Picture(
            calls=stats.calls,
            wait_fraction=stats.wait_fraction,
            recent_wait_fraction=stats.recent_wait_fraction,
            step_s=stats.step_s,
            overhead_s=stats.overhead_s,
            head_of_line_s=stats.head_of_line_s,
            wait_s=stats.wait_s,
            workers=stats.active_workers,
            cores=_usable_cpus(),
            ordered=self._consumer._ordered,
            batched=self._consumer.supervisor.config.batch_size is not None,
            busy=busy,
            blocked=blocked,
            idle=idle,
            cpu_while_busy=sum(w.cpu_s for w in stats.workers)
            / (sum(w.busy_s for w in stats.workers) or 1.0),
        )
        lines = verdict(picture)
        cache = self._consumer.supervisor.cache
        if cache is not None:
            part, parts = self._consumer.supervisor.config.partition
            # Shuffled, each epoch's permutation is cut into parts anew: over epochs a part meets them all.
            shuffled = self._consumer.config["shuffle"]
            wanted = cache.length if shuffled else len(range(part, cache.length, parts))
            lines += cache_verdict(cache.summary(), wanted)
        return "\n".join(lines)

    def close(self) -> None:
        """Stop the workers and release every segment. Views already handed out stay valid. Idempotent,
        and safe from any thread: an iteration in progress elsewhere gets `ClosedError`."""
        self._consumer.close()

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        consumer = self._consumer
        life = consumer.life
        state = "closed" if life.closed else "broken" if life.broken else f"epoch {consumer.epoch}"
        return f"<mpfeed.Feeder workers={self.workers} depth={consumer.depth} {state}>"

    # -- for dataset() ------------------------------------------------------------------------------

    def _iterate(self, copy_below: int = 0) -> Iterator[Any]:
        """`__iter__`, copying records of up to ``copy_below`` bytes out of their slot (`dataset()`)."""
        return self._serve(self._consumer.open_pass(), copy_below)

    def _serve(self, serial: int, copy_below: int) -> Iterator[Any]:
        return _Pass(self, serial, copy_below)


def _shares_since_the_first_element(handles: list[WorkerHandle]) -> tuple[float, float, float]:
    """The workers' busy, blocked and idle shares of their time since the consumer took its first element
    (the consumer's wait is measured over the same window); over their whole life while too little time
    has passed for every worker to have reported since."""
    spent = np.array([handle.times for handle in handles], dtype=np.float64).reshape(-1, 3)
    if all(handle.times_base is not None for handle in handles):
        window = spent - np.array([handle.times_base for handle in handles], dtype=np.float64).reshape(-1, 3)
        if window.sum() > 0:
            spent = window
    busy, blocked, idle = spent.sum(axis=0) / (spent.sum() or 1.0)
    return float(busy), float(blocked), float(idle)


class _Pass:
    """One iteration. Not a generator: one is finished once an exception escapes it, and its next call
    would end the epoch; here every later call asks the consumer again, which raises the same error
    (broken stays broken). It holds the feeder: while anyone iterates, the feeder (and its workers) lives."""

    __slots__ = ("_feeder", "_serial", "_copy_below", "_ended")

    def __init__(self, feeder: Feeder, serial: int, copy_below: int) -> None:
        self._feeder = feeder
        self._serial = serial
        self._copy_below = copy_below
        self._ended = False

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        consumer = self._feeder._consumer
        if not consumer.supervisor.measuring:  # the feeder's first element: the diagnosis starts now
            consumer.clock.begin_iteration()
            consumer.supervisor.measure_from_now()
        element = consumer.next(self._serial, self._copy_below)
        if element is EPOCH_END:
            self._ended = True
            raise StopIteration
        return element


def _worker_stats(handle: WorkerHandle, released: int) -> WorkerStats:
    alive = not handle.gone
    cpu_s, rss = handle.usage or (0.0, 0)
    if alive and handle.node is None:
        try:
            process = psutil.Process(handle.pid)
            with process.oneshot():
                alive = process.status() != psutil.STATUS_ZOMBIE
                times = process.cpu_times()
                cpu_s, rss = times.user + times.system, process.memory_info().rss
        except psutil.Error:
            alive = False
    return WorkerStats(
        index=handle.index,
        pid=handle.pid,
        alive=alive,
        items=handle.items,
        bytes=handle.bytes,
        held_slots=handle.held - released,
        queued=len(handle.inbox),
        slot_bytes=handle.ring.slot_bytes if handle.ring is not None else 0,
        slots=handle.granted,
        cpu_s=cpu_s,
        busy_s=handle.times[0],
        blocked_s=handle.times[1],
        idle_s=handle.times[2],
        rss_bytes=rss,
        node=handle.node,
    )


def _check_backend(
    backend: Any, workers: Any, start_method: Any, ring_memory: Any, slot_bytes: Any, shm_budget: Any
) -> None:
    """Refuse the local engine's own options with a remote backend, instead of ignoring them."""
    from .ray_backend import RayBackend

    if not isinstance(backend, RayBackend):
        raise TypeError(f"backend must be None or a mpfeed.RayBackend, got {type(backend).__name__}")
    backend.check()
    local_only = {
        "start_method": start_method is not None,
        "ring_memory": ring_memory != "auto",
        "slot_bytes": slot_bytes is not None,
        "shm_budget": shm_budget is not None,
        'workers="auto"': workers == "auto",
    }
    given = [name for name, set_ in local_only.items() if set_]
    _require(
        not given,
        f"{', '.join(given)} applies to local worker processes, not to Ray actors (RayBackend): Ray places "
        "the actors and keeps the records in its object store",
    )


def _check_call(source: Callable[..., Any], args: tuple, kwargs: dict[str, Any] | None) -> None:
    """Refuse a source that cannot be called as ``source(*args, shard=..., **kwargs)`` before any worker
    starts, instead of failing in every worker."""
    try:
        signature = inspect.signature(source)
    except (TypeError, ValueError):
        return  # a builtin or an extension type: nothing to check
    try:
        signature.bind(*args, shard=None, **(kwargs or {}))
    except TypeError as error:
        name = getattr(source, "__qualname__", repr(source))
        raise TypeError(
            f"mpfeed calls source(*args, shard=Shard, **kwargs) in every worker, but {name}{signature} "
            f"does not take that: {error}"
        ) from None


def _random_access(source: Any) -> bool:
    """Whether ``source`` is a random-access source (``__len__``, and ``__getitem__`` or ``load`` and
    ``augment``), not a function."""
    readable = hasattr(source, "__getitem__") or splits(source)
    return hasattr(source, "__len__") and readable and not inspect.isroutine(source)


def _cache_size(cache_bytes: Any, source: Any, indexed: bool) -> int | None:
    """The cache's size in bytes (None: no cache), after checking that the source can use one."""
    if cache_bytes is None:
        return None
    _require(
        cache_bytes == "auto" or (_is_int(cache_bytes) and cache_bytes > 0),
        f'cache_bytes must be positive bytes, "auto" or None, got {cache_bytes!r}',
    )
    _require(
        indexed and splits(source),
        "cache_bytes needs a random-access source that splits loading from augmenting: __len__, load(i) "
        "(deterministic: read and decode) and augment(sample, rng) (every epoch); "
        f"{type(source).__name__} has no load and augment",
    )
    return auto_bytes() if cache_bytes == "auto" else cache_bytes


def _cache_stats(supervisor: Supervisor) -> dict[str, int]:
    cache = supervisor.cache
    if cache is None:
        return {}
    summary = cache.summary()
    return dict(
        cache_hits=summary.hits,
        cache_misses=summary.misses,
        cache_bytes=summary.used,
        cache_entries=summary.entries,
        cache_budget=summary.budget,
    )


def _length_of(source: Any) -> int:
    try:
        length = len(source)
    except Exception as error:
        raise TypeError(
            f"len() of the random-access source failed: {type(error).__name__}: {error}"
        ) from None
    return length


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
