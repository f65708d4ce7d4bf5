"""`Feeder`: the public face of the consumer side: options, passes over the data (epochs), stats, closing.

One lock owns the consumer's state (the supervisor's pipes, inboxes, credits and leases): the thread that
takes an element holds it while it reads pipes and hands out views, and lets go of it while it waits, so
`close()` and a new iteration from another thread get in. `stats()` reads snapshots and never a pipe.
Every state change runs under a guard: an exception escaping from the middle of one (a Ctrl-C) leaves the
feeder broken (`BrokenError`), never silently wrong. Ordering policies live in `mpfeed.ordering`, views
and their lifetimes in `mpfeed.leases`, processes and pipes in `mpfeed.supervisor`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from . import bootstrap
from .dispatch import Dispatcher, EpochOrder, decode_done, encode_done
from .errors import BrokenError, ClosedError, ShmSpaceError, SupersededError, WorkerError, WorkerTimeoutError
from .layout import align
from .leases import Leases, Releases
from .ordering import FirstReady, RoundRobin, Window
from .state import FORMAT, check_state
from .supervisor import Supervisor, WorkerConfig, WorkerHandle

_WAIT_SLICE_S = 1.0  # longest single wait before re-checking liveness, closing and timeouts
# Tasks a worker of a random-access source may hold unanswered: first-ready, a ring's worth; ordered, two,
# since a worker stuck on a slow element holds what is queued behind it and the order soon needs that
# (measured with scripts/straggler.py: lognormal costs at depth 8 went from 60% of ideal to 72%).
_ORDERED_LOOKAHEAD = 2
_LOCK_WAIT_S = 10.0  # for the thread taking an element to let go (it does within a wait slice)
_SHUTDOWN_JOIN_S = 15.0  # for a background shutdown to finish its grace periods
_EPOCH_END = object()
_SUPERSEDED = (
    "this iteration of the feeder was superseded by a newer one: a feeder serves one pass at a time (each "
    "new iteration of it, or of its dataset(), starts the next epoch). For two streams at once "
    "(Dataset.zip((ds, ds)), or validation_data=ds while the training pass is unfinished), create a second "
    "Feeder"
)
DEFAULT_START_METHOD = "forkserver"


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
    cpu_s: float
    """CPU seconds the worker process has used (user + system)."""
    rss_bytes: int
    """The worker's resident memory."""


@dataclass(frozen=True)
class FeederStats:
    """A snapshot of a feeder's counters (`Feeder.stats`)."""

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
    overflow: int
    """Records too big for their slot, carried through the worker's pipe instead."""
    copies: int
    """Records copied out of their slot because the user held all the others of that ring."""
    epoch: int
    """The epoch being served, counting from 0."""
    shm_bytes: int
    """Shared memory mapped for rings (workers x depth x slot_bytes, for rings sized so far)."""
    ring_memory: str | None
    """Where the rings live: "posix" (/dev/shm) or "memfd"; None until the first ring is made."""
    workers: tuple[WorkerStats, ...]
    """Per-worker figures, by shard index."""


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Feeder:
    """Runs ``source`` in worker processes and hands out its elements as read-only numpy views.

    ``source`` is either random access, an object with ``__len__`` and ``__getitem__(index)`` (a PyTorch
    map dataset, Grain's RandomAccessDataSource, a list), whose workers make ``source[i]`` for the indices
    the feeder hands them, in an order it owns; or a generator function, called in every worker as
    ``source(*args, shard=Shard, **kwargs)``, where each worker takes its share
    (``items[shard.index::shard.count]``). Iterating the feeder gives one epoch; iterating again starts
    the next epoch on the same processes. A feeder serves one pass at a time: a new iteration supersedes
    an unfinished one.

    Args:
        source: a random-access object, or a module-level generator function (either is pickled and
            sent to every worker).
        args, kwargs: any picklable objects, sent once to every worker and passed to a generator source.
        workers: worker processes; default: the CPUs this process may use.
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
        partition: ``(index, count)``: serve part ``index`` of ``count`` (one per host); the parts are
            disjoint and together cover every element once per epoch.
        start_method: "forkserver" (default: one fresh interpreter forks every worker) or "spawn" (a
            fresh interpreter per worker). The consumer itself is never forked.
        timeout: seconds the consumer may wait for a worker before `WorkerTimeoutError`; None: no limit.
        ring_memory: where the rings live: "posix" (named segments in /dev/shm, their names removed as
            soon as each worker has attached), "memfd" (anonymous memory, limited only by RAM and the
            cgroup: a container's small /dev/shm does not matter), or "auto" (the default: posix while
            /dev/shm has room for every ring, else memfd).
    """

    def __init__(
        self,
        source: Callable[..., Iterable[Any]],
        *,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        workers: int | None = None,
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
    ) -> None:
        if bootstrap.importing_main:
            raise RuntimeError(
                "a Feeder was created while a worker imported your main script: workers import it to find "
                'the source, so put the code that creates the feeder under `if __name__ == "__main__":`'
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
        workers = _usable_cpus() if workers is None else workers
        _require(_is_int(workers) and workers >= 1, f"workers must be an int >= 1, got {workers!r}")
        _require(_is_int(depth) and depth >= 1, f"depth must be an int >= 1, got {depth!r}")
        _require(
            slot_bytes is None or (_is_int(slot_bytes) and slot_bytes > 0),
            f"slot_bytes must be a positive int or None, got {slot_bytes!r}",
        )
        _require(
            batch_size is None or (_is_int(batch_size) and batch_size >= 1),
            f"batch_size must be an int >= 1 or None, got {batch_size!r}",
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
        self._ordered = bool(ordered)
        seed = seed if seed is not None else secrets.randbits(63)
        self._dispatcher: Dispatcher | None = None
        self._ordering: RoundRobin | FirstReady | Window
        if indexed:
            order = EpochOrder(length, seed, bool(shuffle), partition, batch_size, drop_remainder)
            lookahead = _ORDERED_LOOKAHEAD if self._ordered else depth
            self._dispatcher = Dispatcher(order, depth, lookahead=lookahead, ordered=self._ordered)
            self._ordering = Window(self._dispatcher, self._ordered)
        else:
            self._ordering = RoundRobin() if self._ordered else FirstReady()
        self._config = {
            "source": "random-access" if indexed else "generator",
            "length": length if indexed else None,
            "workers": None if indexed else workers,
            "seed": seed,
            "shuffle": bool(shuffle),
            "batch_size": batch_size,
            "drop_remainder": bool(drop_remainder),
            "partition": list(partition),
        }
        self._delivered_from: list[int] = []  # generators: the worker of each record delivered this run
        self._resume_base: tuple[list[int], int] = ([0] * workers, 0)  # generators: starts, cursor
        self._resume: dict | None = None  # a loaded state, for the next iteration
        self._epoch_complete = False
        self._timeout = timeout
        self._depth = depth
        self._lock = threading.RLock()
        self._life = _Life()
        self._releases = Releases()
        self._leases = Leases(self._releases, depth)
        self._waiters = threading.local()  # each thread that waits keeps its own poll object
        self._shutdown_thread: threading.Thread | None = None
        self._epoch = 0
        self._pass = 0  # numbers the iterations; only the newest may take elements
        self._epoch_taken = False  # whether an iteration already serves the current epoch
        self._peeked: list = []
        self._wait_s = 0.0
        self._started = time.monotonic()
        config = WorkerConfig(
            workers=workers,
            depth=depth,
            slot_bytes=None if slot_bytes is None else align(slot_bytes),
            batch_size=batch_size,
            drop_remainder=drop_remainder,
            seed=seed,
            start_method=start_method or DEFAULT_START_METHOD,
            ring_memory=ring_memory,
            indexed=indexed,
            partition=partition,
        )
        try:
            self._supervisor = Supervisor(source, args, dict(kwargs or {}), config)
        except BaseException:
            self._releases.close()
            raise
        self._finalizer = self._arm_finalizer()

    def _arm_finalizer(self) -> weakref.finalize:
        return weakref.finalize(self, _shutdown, self._life, self._lock, self._supervisor, self._releases)

    # -- public face ---------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """How many worker processes feed this feeder."""
        return self._supervisor.config.workers

    def __iter__(self) -> Iterator[Any]:
        """One epoch of elements, in source order when ``ordered`` (round-robin over shards)."""
        return self._iterate()

    def _iterate(self, copy_below: int = 0) -> Iterator[Any]:
        """`__iter__`, copying records of up to ``copy_below`` bytes out of their slot (`dataset()`)."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                self._open_epoch()
                self._epoch_taken = True
                self._pass += 1
            return self._serve(self._pass, copy_below)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The feeder's position, small and JSON-ready: the epoch, and how far into it the feeder has handed
        out elements (a batch counts as one), or, with ``consumed``, where it stood after the first
        ``consumed`` of them in this epoch. Save what the model consumed: tf.data prefetches ahead."""
        with self._lock:
            _require(
                consumed is None or (_is_int(consumed) and consumed >= 0),
                f"consumed must be an int >= 0 or None, got {consumed!r}",
            )
            if self._resume is not None:  # loaded, and not yet iterated: that is where we stand
                return dict(self._resume)
            dispatcher = self._dispatcher
            if dispatcher is not None:
                before = dispatcher.base_position + len(dispatcher.base_done)
                delivered = len(dispatcher.log)
            else:
                before, delivered = sum(self._resume_base[0]), len(self._delivered_from)
            _require(
                consumed is None or before <= consumed <= before + delivered,
                f"consumed={consumed}, but this epoch has handed out {before + delivered} elements so far"
                + (f", {before} of them before the resume" if before else ""),
            )
            in_run = None if consumed is None else consumed - before  # consumed since this run began
            state: dict[str, Any] = {"mpfeed": FORMAT, **self._config, "epoch": self._epoch}
            if self._epoch_complete and (in_run is None or in_run == delivered):
                # The epoch is over: the next one starts from its beginning.
                return {**state, "epoch": self._epoch + 1, **self._fresh_position()}
            if dispatcher is not None:
                position, done = dispatcher.done_after(in_run)
                return {**state, "position": position, "done": encode_done(position, done)}
            starts, cursor = self._resume_base
            starts = list(starts)
            log = self._delivered_from if in_run is None else self._delivered_from[:in_run]
            for worker in log:
                starts[worker] += 1
            if log:
                cursor = (log[-1] + 1) % len(starts)
            return {**state, "position": sum(starts), "starts": starts, "cursor": cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next iteration goes on with that epoch at that position.
        `ValueError` when the state comes from a feeder configured differently."""
        check_state(state, self._config)
        with self._lock:
            self._check_usable()
            self._resume = dict(state)

    def _fresh_position(self) -> dict[str, Any]:
        if self._dispatcher is not None:
            return {"position": 0, "done": ""}
        return {"position": 0, "starts": [0] * self.workers, "cursor": 0}

    def _open_epoch(self) -> None:
        """Start the epoch the next iteration serves: a loaded state's, the next one, or (untaken) this."""
        resume, self._resume = self._resume, None
        if resume is not None:
            self._start_epoch(resume["epoch"], resume)
        elif self._epoch_taken:
            self._start_epoch(self._epoch + 1)

    def dataset(self, output_signature: Any = None, *, chunk_size: int | None = None):
        """A `tf.data.Dataset` over this feeder; each pass over it is one epoch.

        The signature is inferred from the first element when not given. Small elements reach TensorFlow
        in chunks that the dataset unbatches in the graph (see `mpfeed.tf.feeder_dataset`)."""
        from .tf import feeder_dataset

        return feeder_dataset(self, output_signature, chunk_size)

    def stats(self) -> FeederStats:
        """Counters since the feeder started: throughput, waiting, overflow, copies, per-worker use.

        Safe from any thread at any time: it reads snapshots, never a pipe."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        workers = tuple(
            _worker_stats(handle, self._releases.pending(handle.index)) for handle in self._supervisor.handles
        )
        items = sum(w.items for w in workers)
        nbytes = sum(w.bytes for w in workers)
        return FeederStats(
            items=items,
            bytes=nbytes,
            elapsed_s=elapsed,
            items_per_s=items / elapsed,
            bytes_per_s=nbytes / elapsed,
            wait_s=self._wait_s,
            overflow=self._supervisor.overflow,
            copies=self._leases.copies,
            epoch=self._epoch,
            shm_bytes=sum(w.slot_bytes * self._depth for w in workers),
            ring_memory=self._supervisor.ring_memory,
            workers=workers,
        )

    def close(self) -> None:
        """Stop the workers and release every segment. Views already handed out stay valid. Idempotent,
        and safe from any thread: an iteration in progress elsewhere gets `ClosedError`."""
        self._life.closed = True
        self._releases.wake()  # a thread waiting for workers returns, and sees it
        thread = self._shutdown_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_SHUTDOWN_JOIN_S)
        try:
            self._finalizer()
            # Finish a shutdown that an exception interrupted, or wait for one under way in another thread.
            acquired = self._lock.acquire(timeout=_LOCK_WAIT_S)
            try:
                self._supervisor.close()
            finally:
                if acquired:
                    self._lock.release()
        except BaseException:
            self._finalizer = self._arm_finalizer()
            raise

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        life = self._life
        state = "closed" if life.closed else "broken" if life.broken else f"epoch {self._epoch}"
        return f"<mpfeed.Feeder workers={self.workers} depth={self._depth} {state}>"

    # -- epochs --------------------------------------------------------------------------------------

    def _serve(self, serial: int, copy_below: int) -> Iterator[Any]:
        while True:
            element = self._next(serial, copy_below)
            if element is _EPOCH_END:
                return
            yield element

    def _start_epoch(self, number: int, resume: dict[str, Any] | None = None) -> None:
        self._peeked.clear()
        self._epoch = number
        self._epoch_taken = False
        self._epoch_complete = False
        self._ordering.reset()
        self._delivered_from = []
        self._leases.collect(self._supervisor)
        dispatcher = self._dispatcher
        position = resume or self._fresh_position()
        if dispatcher is not None:
            self._supervisor.start_epoch(number)
            start = position["position"]
            dispatcher.start(number, start, decode_done(start, position["done"]))
            return
        starts, cursor = list(position["starts"]), position["cursor"]
        self._resume_base = (starts, cursor)
        if isinstance(self._ordering, RoundRobin):
            self._ordering.cursor = cursor
        batch = self._supervisor.config.batch_size or 1
        self._supervisor.start_epoch(number, [records * batch for records in starts])

    def _peek(self) -> Any:
        """The first element of a fresh epoch, kept to be served first (for signature inference). Only a
        failure that stands in the way of that element is raised here; others surface while iterating."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                if self._epoch_taken or self._resume is not None:
                    self._open_epoch()
            serial = self._pass  # a peek belongs to no iteration, but a new iteration must not lose it
        if not self._peeked:
            element = self._next(serial, 0, strict=False, peeking=True)
            with self._lock:
                if not self._epoch_taken and not self._peeked:
                    self._peeked.append(element)
        if self._peeked[-1] is _EPOCH_END:
            raise ValueError(
                "the source produced no elements, so there is nothing to infer a signature from: "
                "pass output_signature"
            )
        return self._peeked[-1]

    # -- the consumer's loop -------------------------------------------------------------------------

    def _next(self, serial: int, copy_below: int, strict: bool = True, peeking: bool = False) -> Any:
        """The next element of iteration ``serial`` (or `_EPOCH_END`). Holds the lock while it reads pipes
        and hands out views; waits for workers without it."""
        since = time.monotonic()
        idle = False  # whether the last wait ended with nothing to read
        while True:
            self._check_usable()
            with self._lock:
                self._check_usable()
                if serial != self._pass:
                    raise SupersededError(_SUPERSEDED)
                if self._peeked and not peeking:
                    return self._peeked.pop()
                with self._guard("taking an element"):
                    if idle:
                        self._supervisor.check_processes()
                    awaited, element = self._step(copy_below, strict)
                    if awaited is None:
                        return element
                    self._supervisor.flush_credits()
                    slice_s = _WAIT_SLICE_S
                    if self._timeout is not None:
                        slice_s = min(slice_s, self._timeout - (time.monotonic() - since))
                        if slice_s <= 0:
                            raise self._timed_out(awaited)
                    version, fds = self._supervisor.version, self._supervisor.watched()
            idle = not self._wait(version, fds, slice_s)

    def _step(self, copy_below: int, strict: bool) -> tuple[WorkerHandle | None, Any]:
        """Take the next element if one is ready: ``(None, element)``, ``(None, _EPOCH_END)``, or
        ``(handle, None)`` when the consumer must wait (for ``handle``, when ordered)."""
        supervisor, dispatcher = self._supervisor, self._dispatcher
        self._leases.collect(supervisor)
        if dispatcher is not None:
            dispatcher.assign(supervisor)
        handle, record = self._ordering.take(supervisor, strict)
        if record is None and handle is not None:
            supervisor.read_all()  # whatever has arrived since
            if dispatcher is not None:
                dispatcher.assign(supervisor)
            handle, record = self._ordering.take(supervisor, strict)
        if record is not None and handle is not None:
            if dispatcher is None:
                self._delivered_from.append(handle.index)
            return None, self._leases.open(supervisor, handle, record, copy_below)
        if handle is None:
            self._epoch_complete = True
            return None, _EPOCH_END
        return handle, None

    def _wait(self, version: int, fds: list[int], seconds: float) -> bool:
        """Wait (without the lock) until a pipe has news, a view died or someone wakes us; False when the
        time ran out with nothing."""
        waiter = self._waiters
        if getattr(waiter, "version", None) != version or getattr(waiter, "owner", None) is not self:
            waiter.poll = select.poll()
            for fd in [*fds, self._releases.reader.fileno()]:
                waiter.poll.register(fd, select.POLLIN)
            waiter.version, waiter.owner = version, self
        started = time.monotonic()
        releases = self._releases
        releases.waiting = True
        try:
            if releases.slots or self._life.closed:  # a release came before (or instead of) its wake-up
                return True
            ready = waiter.poll.poll(max(0, int(seconds * 1000 + 0.999)))
            if ready:
                releases.clear_wakeups()
            return bool(ready)
        finally:
            releases.waiting = False
            self._wait_s += time.monotonic() - started

    def _timed_out(self, awaited: WorkerHandle) -> WorkerTimeoutError:
        if self._ordered:
            what = f"worker {awaited.index} (pid {awaited.pid}) produced nothing"
            where = f"while producing element {awaited.produced} of its shard"
        else:
            what, where = "no worker produced anything", "while the consumer waited"
        return WorkerTimeoutError(
            f"{what} for {self._timeout:g} s (the feeder's timeout) {where} (epoch {self._epoch})",
            worker=awaited.index,
            pid=awaited.pid,
            element=awaited.produced,
            epoch=self._epoch,
        )

    # -- state ---------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        life = self._life
        if life.broken is not None:
            # The same error each time, without the frames of earlier raises (they would pin memory).
            raise life.broken.with_traceback(None)
        if life.closed:
            raise ClosedError("the feeder is closed")

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Run a state change: a worker's failure breaks the feeder; so does any other exception that
        escapes from its middle (a Ctrl-C), since the state may then be half changed."""
        try:
            yield
        except (WorkerError, ShmSpaceError) as error:
            self._break(error)
            raise
        except BaseException as error:
            if self._life.closed:
                raise  # closed meanwhile: the ClosedError, not a broken state, is the news
            self._break(
                BrokenError(
                    f"the feeder was interrupted by {type(error).__name__} while {doing}, so its state can "
                    "no longer be trusted; it stopped its workers. Create a new Feeder to go on"
                )
            )
            raise

    def _break(self, error: BaseException) -> None:
        """Broken stays broken: remember the error, and stop the workers and release every segment in the
        background, so the error reaches the user now rather than after the shutdown's grace periods."""
        if self._life.broken is not None:
            return
        self._life.broken = error
        self._leases.forget()
        self._releases.wake()
        self._shutdown_thread = threading.Thread(target=self._finalizer, name="mpfeed-shutdown", daemon=True)
        self._shutdown_thread.start()


class _Life:
    """Whether the feeder was closed or broken: shared with its finalizer and read without the lock."""

    __slots__ = ("closed", "broken")

    def __init__(self) -> None:
        self.closed = False
        self.broken: BaseException | None = None


def _shutdown(life: _Life, lock: threading.RLock, supervisor: Supervisor, releases: Releases) -> None:
    """Stop the workers and release everything, once the thread that may be taking an element lets go of
    the lock (it does within a wait slice, since it sees ``closed``)."""
    if life.broken is None:
        life.closed = True
    releases.wake()
    acquired = lock.acquire(timeout=_LOCK_WAIT_S)
    try:
        supervisor.close()
    finally:
        releases.close()
        if acquired:
            lock.release()


def _worker_stats(handle: WorkerHandle, released: int) -> WorkerStats:
    alive = not handle.gone
    cpu_s, rss = 0.0, 0
    if alive:
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
        cpu_s=cpu_s,
        rss_bytes=rss,
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
    """Whether ``source`` is a random-access source (``__len__`` and ``__getitem__``), not a function."""
    return hasattr(source, "__len__") and hasattr(source, "__getitem__") and not inspect.isroutine(source)


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
