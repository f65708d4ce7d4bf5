"""The worker main loop: run the source (a generator for this shard, or ``source[i]`` for the tasks the
consumer sends), write records into ring slots, report the end of each epoch or the first failure, and
exit when told to or when the parent dies.

A worker never imports TensorFlow (`mpfeed.spawn` guards against it) and never creates shared memory: the
supervisor creates its ring, the worker only attaches.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import numpy as np

from . import limits, protocol, shard
from .cache import Cache, serve, splits
from .conform import conform_items
from .layout import BadElement, Encoder, flatten
from .ring import Ring
from .shard import Shard, shard_seed

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ORPHANED = 2

_PARENT_CHECK_S = 0.5
_CONTROL_POLL_S = 0.5
_CONTROL_CHECK_S = 0.01
_REPORT_S = 0.5  # how often a worker tells the consumer how it spends its time


class _Restart(Exception):
    """The consumer asked for another run (an epoch, or a resume) while this one was going."""

    def __init__(self, run: int, epoch: int, start: int) -> None:
        self.run = run
        self.epoch = epoch
        self.start = start


class _Stop(Exception):
    """The consumer asked the worker to stop."""


class _Failed(Exception):
    """The failure was reported; the worker exits with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code


def run(connection: Connection, source: Any, args: tuple, kwargs: dict, setup: protocol.WorkerSetup) -> int:
    """Produce epochs until stopped; returns the process exit code."""
    try:
        _watch_parent(setup.parent_pid, setup.consumer_pid)
    except RuntimeError as error:  # "can't start new thread": pthread_create's EAGAIN, nearly always
        cause = RuntimeError(f"{error}, to watch its parent: {limits.refused(errno.EAGAIN)}")
        report_failure(connection, "start", cause, element=None, epoch=0)
        return EXIT_FAILED
    try:
        worker = _Worker(connection, source, args, kwargs, setup)
    except BaseException as error:  # a fault of mpfeed's own (attaching the ring): say so
        report_failure(connection, "worker", error, element=None, epoch=0)
        return EXIT_FAILED
    return worker.run()


def _watch_parent(parent_pid: int, consumer_pid: int) -> None:
    """Exit when our parent (the consumer, or the fork server) or the consumer dies, even while the source
    computes. We compare ``os.getppid()`` instead of using PR_SET_PDEATHSIG, which fires when the
    *thread* that started us ends."""

    def watch() -> None:
        while os.getppid() == parent_pid and _alive(consumer_pid):
            time.sleep(_PARENT_CHECK_S)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="mpfeed-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_failure(
    where: str, error: BaseException, *, element: int | None, epoch: int, position: int | None = None
) -> protocol.Failure:
    """An exception as the consumer is told of it: text only, frames dropped."""
    kind = type(error)
    qualname = (
        kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    )
    try:
        message = str(error)
    except Exception as unprintable:  # an exception whose __str__ itself fails
        message = f"<{kind.__name__}, which could not be printed: {unprintable!r}>"
    return protocol.Failure(
        where=where,
        type=qualname,
        message=message,
        traceback="".join(traceback.format_exception(kind, error, error.__traceback__)),
        element=element,
        epoch=epoch,
        exit_code=error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else None,
        position=position,
    )


def report_failure(
    connection: Connection,
    where: str,
    error: BaseException,
    *,
    element: int | None,
    epoch: int,
    position: int | None = None,
) -> None:
    """Tell the consumer why this worker is about to exit."""
    failure = describe_failure(where, error, element=element, epoch=epoch, position=position)
    try:
        connection.send_bytes(protocol.FAILED + pickle.dumps(failure))
    except OSError:
        pass


class SourceFailed(Exception):
    """The user's source raised: ``error`` while making ``element`` (the shard's element for generators,
    the source's index for random access; ``position`` is then its place in the epoch's order)."""

    def __init__(self, error: BaseException, element: int, position: int | None = None) -> None:
        self.error = error
        self.element = element
        self.position = position


class ShardEpoch:
    """One epoch of a generator source's shard, as the records to send, whatever carries them.

    ``steps()`` yields after every element the source makes: ``(items, key, first, batched)`` when a
    record is complete, None when not (an element dropped before ``shard.start``, or one of an unfinished
    batch), so the caller can look for control messages between elements. ``produced`` counts the shard's
    elements so far. The source's exceptions come out as `SourceFailed`."""

    def __init__(
        self,
        source: Any,
        args: tuple,
        kwargs: dict,
        shard: Shard,
        batch_size: int | None,
        drop_remainder: bool,
    ) -> None:
        random.seed(shard.seed)
        np.random.seed(shard.seed)
        self.start = shard.start
        self.produced = shard.start if getattr(source, "mpfeed_seekable", False) else 0
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder
        try:
            self.iterator = iter(source(*args, shard=shard, **kwargs))
        except BaseException as error:
            raise SourceFailed(error, self.produced) from None

    def steps(self) -> Generator[tuple[list, int, int, bool] | None, None, None]:
        batch: list = []
        try:
            while True:
                try:
                    element = next(self.iterator)
                except StopIteration:
                    break
                except BaseException as error:
                    raise SourceFailed(error, self.produced) from None
                self.produced += 1
                produced = self.produced
                if produced <= self.start:
                    yield None  # consumed before the resume: dropped, never sent
                elif self.batch_size is None:
                    yield [flatten(element)], produced, produced - 1, False
                else:
                    batch.append(flatten(element))
                    if len(batch) == self.batch_size:
                        items, batch = batch, []
                        yield items, produced, produced - len(items), True
                    else:
                        yield None
            if batch and not self.drop_remainder:
                yield batch, self.produced, self.produced - len(batch), True
        finally:
            close = getattr(self.iterator, "close", None)
            if close is not None:
                close()


def task_items(
    source: Any,
    seed: int,
    epoch: int,
    indices: Iterable[int],
    first_position: int,
    cache: Cache | None = None,
) -> list:
    """``source[index]`` for one task's indices, flattened, each made with its element seed set (see
    `mpfeed.element_rng`); for a source with ``load`` and ``augment``, ``augment(load(index), rng)`` with
    ``rng`` from that seed, ``load`` skipped where ``cache`` holds the sample. The source's exceptions
    come out as `SourceFailed`."""
    items = []
    split = splits(source)
    for offset, index in enumerate(indices):
        shard._current = (seed, epoch, index)
        try:
            element = serve(source, cache, index, shard.element_rng()) if split else source[index]
        except BaseException as error:
            raise SourceFailed(error, index, first_position + offset) from None
        finally:
            shard._current = None
        items.append(flatten(element))
    return items


def refused_element(
    error: BaseException, first: int, indices: Sequence[int] | None, batch_size: int | None
) -> tuple[int, int | None]:
    """``(element, position)`` of the element the encoder refused in a record: the shard's element for a
    generator (``first`` is the record's first); for a random-access task (``first`` is its number), the
    source's index and its place in the epoch's order."""
    item = error.item if isinstance(error, BadElement) else 0
    if indices is None:
        return first + item, None
    return int(indices[item]), first * (batch_size or 1) + item


class _Worker:
    def __init__(
        self, connection: Connection, source: Any, args: tuple, kwargs: dict, setup: protocol.WorkerSetup
    ) -> None:
        self.connection = connection
        self.readable = protocol.Readable(connection)
        self.source = source
        self.args = args
        self.kwargs = kwargs
        self.index = setup.index
        self.count = setup.count
        self.seed = setup.seed
        self.depth = setup.depth
        self.batch_size = setup.batch_size
        self.drop_remainder = setup.drop_remainder
        self.indexed = setup.indexed
        self.dtypes = setup.dtypes
        self.run_number = 0
        self.epoch = 0
        self.tasks: deque[tuple[int, tuple[int, ...]]] = deque()  # (seq, indices) of the current run
        self.ring: Ring | None = None
        self.free: deque[int] = deque()
        self.started = self.reported = time.monotonic()
        self.blocked_s = 0.0  # waiting for a free slot: the consumer is behind
        self.idle_s = 0.0  # waiting for work: a task, or the next epoch
        self.encoder = Encoder()
        self.cache = None if setup.cache is None else Cache.attach(setup.cache)
        if setup.ring is not None:
            self._attach(setup.ring)

    def run(self) -> int:
        try:
            if self.indexed:
                self._serve_tasks()
            restart = _Restart(0, 0, 0)  # generator workers start epoch 0 by themselves
            while True:
                try:
                    self._run_epoch(restart.run, restart.epoch, restart.start)
                    self._idle()
                except _Restart as new:
                    restart = new
        except _Stop:
            return EXIT_OK
        except _Failed as failed:
            return failed.code
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return EXIT_ORPHANED  # the consumer's end of the pipe is gone
        except BaseException as error:  # a fault of mpfeed's own: say so
            report_failure(self.connection, "worker", error, element=None, epoch=self.epoch)
            return EXIT_FAILED

    # -- a generator source: one epoch of this shard ---------------------------------------------------

    def _run_epoch(self, run: int, epoch: int, start: int) -> None:
        self.run_number, self.epoch = run, epoch
        shard = Shard(self.index, self.count, epoch, shard_seed(self.seed, self.index, epoch), start)
        try:
            production = ShardEpoch(
                self.source, self.args, self.kwargs, shard, self.batch_size, self.drop_remainder
            )
            next_check = 0.0
            with contextlib.closing(production.steps()) as steps:
                for step in steps:
                    # Between elements, look for a stop or a new epoch now and then, not every time: a
                    # poll per element costs more than a small element's whole record.
                    now = time.monotonic()
                    if now >= next_check:
                        self._handle_control(block=False)
                        next_check = now + _CONTROL_CHECK_S
                    if step is not None:
                        self._emit(*step)
        except SourceFailed as failed:
            raise self._fail("source", failed.error, failed.element, epoch) from None
        self.connection.send_bytes(protocol.end(run, production.produced))

    # -- a random-access source: the tasks the consumer sends ------------------------------------------

    def _serve_tasks(self) -> NoReturn:
        batched = self.batch_size is not None
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:  # as for generators: a stop or new tasks, now and then
                self._handle_control(block=False)
                next_check = now + _CONTROL_CHECK_S
            if not self.tasks:
                self._wait_until(lambda: bool(self.tasks), blocked=False)
            seq, indices = self.tasks.popleft()
            epoch = self.epoch
            try:
                first = seq * (self.batch_size or 1)
                items = task_items(self.source, self.seed, epoch, indices, first, self.cache)
            except SourceFailed as failed:
                raise self._fail("source", failed.error, failed.element, epoch, failed.position) from None
            self._emit(items, seq, seq, batched, indices)

    def _emit(
        self, items: list, key: int, first: int, batched: bool, indices: tuple[int, ...] | None = None
    ) -> None:
        """Send one record of ``items``: ``key`` identifies it to the consumer (see `mpfeed.protocol`),
        ``first`` is its first element's number, or, for a random-access task, the task's number with its
        source ``indices`` (for errors)."""
        run = self.run_number
        try:
            if self.dtypes is not None:
                items = conform_items(items, self.dtypes)
            record = self.encoder.prepare(items, first, batched)
        except (TypeError, ValueError) as error:
            element, position = refused_element(error, first, indices, self.batch_size)
            raise self._fail("element", error, element, self.epoch, position) from None
        if self.ring is None:  # the first record: the consumer sizes our ring from it
            self._send_inline(record, run, key, protocol.NO_SLOT)
            self._wait_until(lambda: self.ring is not None, blocked=True)
            return
        if not self.free:
            self._wait_until(lambda: bool(self.free), blocked=True)
        slot = self.free.popleft()
        if record.nbytes > self.ring.slot_bytes:
            self._send_inline(record, run, key, slot)
            return
        record.write(self.ring.slot(slot))
        self.connection.send_bytes(protocol.filled(slot, run, key))

    def _send_inline(self, record, run: int, key: int, slot: int) -> None:
        message = bytearray(protocol.INLINE_HEADER + record.nbytes)
        message[: protocol.INLINE_HEADER] = protocol.inline_prefix(run, key, slot)
        record.write(memoryview(message)[protocol.INLINE_HEADER :])
        self.connection.send_bytes(message)

    def _fail(
        self, where: str, error: BaseException, element: int, epoch: int, position: int | None = None
    ) -> _Failed:
        report_failure(self.connection, where, error, element=element, epoch=epoch, position=position)
        if isinstance(error, SystemExit) and isinstance(error.code, int):
            return _Failed(error.code)
        return _Failed(EXIT_FAILED)

    # -- control messages ----------------------------------------------------------------------------

    def _idle(self) -> NoReturn:
        """Between epochs: wait for the consumer to ask for the next one (or to stop)."""
        self._wait_until(lambda: False, blocked=False)
        raise AssertionError("unreachable: only a restart or a stop ends the wait")

    def _wait_until(self, ready, *, blocked: bool) -> None:
        """Handle control messages until ``ready()``, counting the time as blocked (the consumer is behind:
        no free slot) or idle (no work)."""
        last = time.monotonic()
        try:
            while not ready():
                self._handle_control(block=True)
                now = time.monotonic()
                if blocked:
                    self.blocked_s += now - last
                else:
                    self.idle_s += now - last
                last = now
        finally:
            now = time.monotonic()
            if blocked:
                self.blocked_s += now - last
            else:
                self.idle_s += now - last

    def _report_time(self) -> None:
        """Now and then, tell the consumer how this worker spent its time: busy, blocked, idle."""
        now = time.monotonic()
        if now - self.reported >= _REPORT_S:
            self.reported = now
            busy = now - self.started - self.blocked_s - self.idle_s
            self.connection.send_bytes(protocol.times(busy, self.blocked_s, self.idle_s))

    def _handle_control(self, block: bool) -> None:
        """Apply every waiting control message; with ``block``, wait (a while) for at least one.

        Raises `_Restart` or `_Stop` when the consumer asks for that."""
        connection = self.connection
        self._report_time()
        if block and not self.readable(_CONTROL_POLL_S):
            return
        while self.readable():
            message = connection.recv_bytes()
            tag = message[:1]
            if tag == protocol.CREDIT:
                self.free.extend(protocol.read_credit(message))
            elif tag == protocol.TASK:
                run, batch = protocol.read_tasks(message)
                if run == self.run_number:
                    self.tasks.extend(batch)
            elif tag == protocol.EPOCH:
                run, epoch, start = protocol.read_epoch(message)
                if not self.indexed:
                    raise _Restart(run, epoch, start)
                self.run_number, self.epoch = run, epoch
                self.tasks.clear()
            elif tag == protocol.RING:
                self._attach(pickle.loads(message[1:]))
            elif tag == protocol.STOP:
                raise _Stop

    def _attach(self, spec: protocol.RingSpec) -> None:
        self.ring = Ring.attach(spec.name, spec.depth, spec.slot_bytes)
        self.free = deque(range(spec.credits))
        self.connection.send_bytes(protocol.ATTACHED)
