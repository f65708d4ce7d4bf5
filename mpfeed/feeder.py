"""`Feeder`: the consumer side. Ordering, zero-copy views and their lifetimes, epochs, stats.

A record's slot goes back to its worker only when the last view into it dies: every slot is read through
its own base array, and a weak reference on that base array returns the slot when the array is collected
(TensorFlow keeps the array alive for as long as a tensor aliases it). When the user holds all but one
slot of a ring, the next record from that ring is copied out instead, so holding everything never
deadlocks.
"""

from __future__ import annotations

import inspect
import os
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from . import protocol, spawn
from .errors import ClosedError, ShmSpaceError, WorkerError, WorkerTimeoutError
from .layout import Decoder, align
from .supervisor import Supervisor, WorkerConfig, WorkerHandle

_WAIT_SLICE_S = 1.0  # longest single wait before re-checking liveness, closing and timeouts
_EPOCH_END = object()
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
    workers: tuple[WorkerStats, ...]
    """Per-worker figures, by shard index."""


class _Releases:
    """Slots whose views died, queued from any thread (the garbage collector's or TensorFlow's) for the
    consumer thread, which alone talks to workers. A byte on a socket wakes the consumer while it waits
    (``waiting``); a release at any other time only queues, since the consumer looks at the queue before
    it waits."""

    def __init__(self) -> None:
        self.slots: deque = deque()
        self.waiting = False
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.RLock()
        self._closed = False

    def put(self, key: tuple[int, int]) -> None:
        # Append, then read the flag: the consumer sets the flag, then reads the queue, so one of the two
        # always sees the other.
        self.slots.append(key)
        if not self.waiting:
            return
        with self._lock:
            if not self._closed:
                try:
                    self._writer.send(b"\0")
                except OSError:
                    pass  # full: the consumer has wake-ups pending anyway

    def clear_wakeups(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.reader.close()
            self._writer.close()


def _shutdown(supervisor: Supervisor, releases: _Releases) -> None:
    supervisor.close()
    releases.close()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Feeder:
    """Runs ``source`` in worker processes and hands out its elements as read-only numpy views.

    ``source(*args, shard=Shard, **kwargs)`` is called in every worker and returns an iterable of
    elements; each worker takes its share (``items[shard.index::shard.count]``). Iterating the feeder
    gives one epoch; iterating again starts the next epoch on the same processes. See the README.
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
    ) -> None:
        if spawn.importing_main:
            raise RuntimeError(
                "a Feeder was created while a worker imported your main script: workers import it to find "
                'the source, so put the code that creates the feeder under `if __name__ == "__main__":`'
            )
        if not callable(source):
            raise TypeError(f"source must be callable (a generator function), got {type(source).__name__}")
        _check_call(source, args, kwargs)
        workers = _usable_cpus() if workers is None else workers
        _require(isinstance(workers, int) and workers >= 1, f"workers must be an int >= 1, got {workers!r}")
        _require(isinstance(depth, int) and depth >= 1, f"depth must be an int >= 1, got {depth!r}")
        _require(
            slot_bytes is None or (isinstance(slot_bytes, int) and slot_bytes > 0),
            f"slot_bytes must be a positive int or None, got {slot_bytes!r}",
        )
        _require(
            batch_size is None or (isinstance(batch_size, int) and batch_size >= 1),
            f"batch_size must be an int >= 1 or None, got {batch_size!r}",
        )
        _require(timeout is None or timeout > 0, f"timeout must be positive seconds or None, got {timeout!r}")
        _require(
            start_method in (None, "spawn", "forkserver"),
            f"start_method must be 'spawn' or 'forkserver', got {start_method!r}: forking the consumer "
            "itself ('fork') is not offered, since a process that has loaded TensorFlow can deadlock",
        )
        self._ordered = ordered
        self._timeout = timeout
        self._depth = depth
        self._decoder = Decoder()
        self._releases = _Releases()
        self._leases: dict[tuple[int, int], weakref.ref] = {}
        self._closed = False
        self._broken: BaseException | None = None
        self._epoch = 0
        self._epoch_taken = False  # whether an iterator already serves the current epoch
        self._peeked: list = []
        self._cursor = 0
        self._wait_s = 0.0
        self._copies = 0
        self._started = time.monotonic()
        config = WorkerConfig(
            workers=workers,
            depth=depth,
            slot_bytes=None if slot_bytes is None else align(slot_bytes),
            batch_size=batch_size,
            drop_remainder=drop_remainder,
            seed=seed if seed is not None else secrets.randbits(63),
            start_method=start_method or DEFAULT_START_METHOD,
        )
        try:
            self._supervisor = Supervisor(source, args, dict(kwargs or {}), config)
        except BaseException:
            self._releases.close()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._supervisor, self._releases)

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
        if self._epoch_taken:
            self._start_epoch(self._epoch + 1)
        self._epoch_taken = True
        return self._serve(self._epoch, copy_below)

    def dataset(self, output_signature: Any = None, *, chunk_size: int | None = None):
        """A `tf.data.Dataset` over this feeder; each pass over it is one epoch.

        The signature is inferred from the first element when not given. Small elements reach TensorFlow
        in chunks that the dataset unbatches in the graph (see `mpfeed.tf.feeder_dataset`)."""
        from .tf import feeder_dataset

        return feeder_dataset(self, output_signature, chunk_size)

    def stats(self) -> FeederStats:
        """Counters since the feeder started: throughput, waiting, overflow, copies, per-worker use."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        released = list(self._releases.slots)  # views already dead, their credits not yet sent
        workers = tuple(
            _worker_stats(handle, sum(1 for index, _ in released if index == handle.index))
            for handle in self._supervisor.handles
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
            copies=self._copies,
            epoch=self._epoch,
            shm_bytes=sum(w.slot_bytes * self._depth for w in workers),
            workers=workers,
        )

    def close(self) -> None:
        """Stop the workers and release every segment. Views already handed out stay valid. Idempotent."""
        self._closed = True
        self._leases.clear()
        self._finalizer()

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else f"epoch {self._epoch}"
        return f"<mpfeed.Feeder workers={self.workers} depth={self._depth} {state}>"

    # -- epochs --------------------------------------------------------------------------------------

    def _serve(self, epoch: int, copy_below: int) -> Iterator[Any]:
        while True:
            if epoch != self._epoch:
                raise RuntimeError(
                    "this iteration of the feeder was superseded: a newer iteration started the next epoch"
                )
            element = self._peeked.pop() if self._peeked else self._next_element(copy_below)
            if element is _EPOCH_END:
                return
            yield element

    def _start_epoch(self, number: int) -> None:
        self._peeked.clear()
        self._epoch = number
        self._epoch_taken = False
        self._cursor = 0
        self._apply_releases()
        self._supervisor.start_epoch(number)

    def _peek(self) -> Any:
        """The first element of a fresh epoch, kept to be served first (for signature inference)."""
        self._check_usable()
        if self._epoch_taken:
            self._start_epoch(self._epoch + 1)
        if not self._peeked:
            self._peeked.append(self._next_element())
        if self._peeked[-1] is _EPOCH_END:
            raise ValueError(
                "the source produced no elements, so there is nothing to infer a signature from: "
                "pass output_signature"
            )
        return self._peeked[-1]

    # -- the consumer's loop -------------------------------------------------------------------------

    def _next_element(self, copy_below: int = 0) -> Any:
        started = time.monotonic()
        try:
            while True:
                self._check_usable()
                self._apply_releases()
                handle, message = self._take()
                if handle is None:
                    return _EPOCH_END
                if message is not None:
                    return self._open(handle, message, copy_below)
                self._wait(handle, started)
        except (WorkerError, ShmSpaceError) as error:
            self._break(error)
            raise

    def _take(self) -> tuple[WorkerHandle | None, bytes | None]:
        """The next record by the ordering rule: ``(handle, message)``; ``(handle, None)`` when we must
        wait for ``handle`` (ordered) or for anyone (unordered, ``handle`` is any unfinished worker);
        ``(None, None)`` at the end of the epoch. Raises a worker's failure where the order meets it, or
        as soon as the consumer would have to wait."""
        handles = self._supervisor.handles
        count = len(handles)
        waiting_for = None
        for step in range(count):
            handle = handles[(self._cursor + step) % count]
            inbox = handle.inbox
            while inbox and isinstance(inbox[0], bytes) and inbox[0][:1] == protocol.END:
                inbox.popleft()
                handle.ended = True
            if inbox and not isinstance(inbox[0], bytes):
                raise self._supervisor.error(handle, inbox[0])
            if handle.ended:
                continue
            if inbox:
                self._cursor = (handle.index + 1) % count
                return handle, inbox.popleft()
            if self._ordered:
                self._cursor = handle.index
                waiting_for = handle
                break
            waiting_for = waiting_for or handle
        if waiting_for is not None:
            # Deliver what is ready, but never wait once a worker has failed.
            for handle in handles:
                if handle.inbox and not isinstance(handle.inbox[-1], bytes):
                    raise self._supervisor.error(handle, handle.inbox[-1])
        return waiting_for, None

    def _wait(self, awaited: WorkerHandle, since: float) -> None:
        """Wait for any news: a worker's message or death, or a released slot. ``since`` is when the
        consumer started waiting for this element (for ``timeout``)."""
        supervisor = self._supervisor
        supervisor.flush_credits()
        started = time.monotonic()
        self._releases.waiting = True
        try:
            while True:
                if self._releases.slots:  # a release came before (or instead of) its wake-up byte
                    return
                self._check_usable()
                slice_s = _WAIT_SLICE_S
                if self._timeout is not None:
                    slice_s = min(slice_s, self._timeout - (time.monotonic() - since))
                    if slice_s <= 0:
                        raise self._timed_out(awaited)
                ready = supervisor.wait([self._releases.reader], slice_s)
                if self._releases.reader in ready:
                    self._releases.clear_wakeups()
                if ready:
                    return
                exited = [h for h in supervisor.handles if not h.gone and h.process.poll() is not None]
                for handle in exited:
                    supervisor.read(handle)  # its last words first
                    supervisor.mark_exited(handle)
                if exited:
                    return
        finally:
            self._releases.waiting = False
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

    def _open(self, handle: WorkerHandle, message: bytes, copy_below: int) -> Any:
        """Decode one record into the element the user gets."""
        if message[:1] == protocol.INLINE:
            base = _readonly_copy(memoryview(message)[protocol.INLINE_HEADER :])
            element, _, count, nbytes = self._decoder.decode(base)
            self._supervisor.release(handle, message)
        else:
            slot = protocol.read_filled(message)[0]
            base = handle.ring.slot_view(slot)
            record_bytes = Decoder.header(base)[5]
            # When every other slot of this ring is held, copy: otherwise the worker could never write again.
            ring_full = handle.held >= self._depth - 1
            copied = ring_full or record_bytes <= copy_below
            if copied:
                base = _readonly_copy(base[:record_bytes])
                self._copies += ring_full
            element, views, count, nbytes = self._decoder.decode(base)
            if views and not copied:
                key = (handle.index, slot)
                self._leases[key] = weakref.ref(base, _release_callback(self._releases, key))
                handle.held += 1
            else:
                self._supervisor.credit(handle, slot)
        delivered = count or 1
        handle.items += delivered
        handle.bytes += nbytes
        return element

    def _apply_releases(self) -> None:
        slots = self._releases.slots
        handles = self._supervisor.handles
        while slots:
            key = slots.popleft()
            if self._leases.pop(key, None) is None:
                continue
            handle = handles[key[0]]
            handle.held -= 1
            self._supervisor.credit(handle, key[1])

    # -- state ---------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            # The same error each time, without the frames of earlier raises (they would pin memory).
            raise self._broken.with_traceback(None)
        if self._closed:
            raise ClosedError("the feeder is closed")

    def _break(self, error: BaseException) -> None:
        """Broken stays broken: remember the error, stop the other workers, release every segment."""
        self._broken = error
        self._leases.clear()
        self._finalizer()


def _release_callback(releases: _Releases, key: tuple[int, int]) -> Callable[[Any], None]:
    def release(_weakref: Any) -> None:
        releases.put(key)

    return release


def _readonly_copy(data) -> np.ndarray:
    """A 64-byte-aligned copy of a record that stays read-only, like views of a slot."""
    raw = np.empty(len(data) + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    copy = raw[start : start + len(data)]
    copy[:] = np.frombuffer(data, dtype=np.uint8)
    return np.frombuffer(memoryview(copy).toreadonly(), dtype=np.uint8)


def _worker_stats(handle: WorkerHandle, released: int) -> WorkerStats:
    alive = handle.process.poll() is None
    cpu_s, rss = 0.0, 0
    if alive:
        try:
            process = psutil.Process(handle.pid)
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


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
