"""The consumer side's state and its one owner: passes (epochs), taking elements, waiting, positions,
breaking and closing. `Feeder` is its public face.

One lock owns the consumer's state (the supervisor's pipes, inboxes, credits and leases, the dispatcher,
the position): the thread that takes an element holds it while it reads pipes and hands out views, and
lets go of it while it waits, so `close()` and a new iteration from another thread get in. Every state
change runs under a guard: an exception escaping from the middle of one (a Ctrl-C) leaves the consumer
broken (`BrokenError`), never silently wrong. Ordering policies live in `mpfeed.ordering`, dispatch in
`mpfeed.dispatch`, views in `mpfeed.leases`, processes and pipes in `mpfeed.supervisor`.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .autotune import Autotuner
from .diagnosis import CallClock
from .dispatch import Dispatcher, EpochOrder, decode_done, encode_done
from .errors import BrokenError, ClosedError, ShmSpaceError, SupersededError, WorkerError, WorkerTimeoutError
from .leases import Leases, Releases
from .ordering import FirstReady, RoundRobin, Window
from .state import FORMAT, check_state
from .supervisor import Record, Supervisor, WorkerConfig, WorkerHandle

if TYPE_CHECKING:
    from .ray_backend import RayBackend

_WAIT_SLICE_S = 1.0  # longest single wait before re-checking liveness, closing and timeouts
# Tasks a worker of a random-access source may hold unanswered: first-ready, a ring's worth; ordered, two,
# since a worker stuck on a slow element holds what is queued behind it and the order soon needs that
# (measured with scripts/straggler.py: lognormal costs at depth 8 went from 60% of ideal to 72%).
_ORDERED_LOOKAHEAD = 2
_REMOTE_WAIT_SLICE_S = 0.1  # remote workers are waited for in slices, since close() cannot wake that wait
_LOCK_WAIT_S = 10.0  # for the thread taking an element to let go (it does within a wait slice)
_SHUTDOWN_JOIN_S = 15.0  # for a background shutdown to finish its grace periods
EPOCH_END = object()
_SUPERSEDED = (
    "this iteration of the feeder was superseded by a newer one: a feeder serves one pass at a time (each "
    "new iteration of it, or of its dataset(), starts the next epoch). For two streams at once "
    "(Dataset.zip((ds, ds)), or validation_data=ds while the training pass is unfinished), create a second "
    "Feeder"
)


class Consumer:
    """Everything the consumer side knows and does, under one lock. ``owner`` is the `Feeder`: when it is
    collected, or the interpreter exits, the workers stop."""

    def __init__(
        self,
        owner: Any,
        source: Any,
        args: tuple,
        kwargs: dict[str, Any],
        workers: WorkerConfig,
        *,
        ordered: bool,
        timeout: float | None,
        length: int | None,
        shuffle: bool,
        autotune: tuple[int, int] | None = None,
        backend: RayBackend | None = None,
    ) -> None:
        """``autotune``: ``(usable cores, max_workers)`` to adjust the workers of a random-access source;
        ``backend``: where the workers run (None: local processes)."""
        self.depth = workers.depth
        self.dispatcher: Dispatcher | None = None
        self._ordering: RoundRobin | FirstReady | Window
        if workers.indexed:
            assert length is not None
            order = EpochOrder(
                length, workers.seed, shuffle, workers.partition, workers.batch_size, workers.drop_remainder
            )
            # A remote worker's answer takes a round trip: it gets as many tasks ahead as it has room for.
            lookahead = _ORDERED_LOOKAHEAD if ordered and backend is None else workers.depth
            self.dispatcher = Dispatcher(order, workers.depth, lookahead=lookahead, ordered=ordered)
            self._ordering = Window(self.dispatcher, ordered)
        else:
            self._ordering = RoundRobin() if ordered else FirstReady()
        self.config = {  # what a saved position must match (see `mpfeed.state`)
            "source": "random-access" if workers.indexed else "generator",
            "length": length,
            "workers": None if workers.indexed else workers.workers,
            "seed": workers.seed,
            "shuffle": shuffle,
            "batch_size": workers.batch_size,
            "drop_remainder": workers.drop_remainder,
            "partition": list(workers.partition),
        }
        self._delivered_from: list[int] = []  # generators: the worker of each record delivered this run
        self._resume_base: tuple[list[int], int] = ([0] * workers.workers, 0)  # generators: starts, cursor
        self._resume: dict | None = None  # a loaded state, for the next pass
        self._epoch_complete = False
        self._timeout = timeout
        self._ordered = ordered
        self._lock = threading.RLock()
        self.life = _Life()
        self.releases = Releases()
        self.leases = Leases(self.releases)
        self._waiters = threading.local()  # each thread that waits keeps its own poll object
        self._shutdown_thread: threading.Thread | None = None
        self.epoch = 0
        self.pass_number = 0  # numbers the iterations; only the newest may take elements
        self._epoch_taken = False  # whether an iteration already serves the current epoch
        self._peeked: list = []
        self.wait_s = 0.0
        self.head_of_line_s = 0.0  # ordered: waiting for the next element while others were ready
        self.clock = CallClock()
        try:
            if backend is None:
                self.supervisor = Supervisor(source, args, kwargs, workers)
            else:
                from .ray_backend import RaySupervisor

                self.supervisor = RaySupervisor(source, args, kwargs, workers, backend)
        except BaseException:
            self.releases.close()
            raise
        self.tuner: Autotuner | None = None
        if autotune is not None and self.dispatcher is not None:
            self.dispatcher.active = workers.workers
            cores, max_workers = autotune
            self.tuner = Autotuner(self.supervisor, self.dispatcher, self.clock, cores, max_workers)
        self._owner = weakref.ref(owner)
        self._creator = os.getpid()  # only this process may stop the workers (not a child forked from it)
        self._finalizer = self._arm_finalizer()

    def _arm_finalizer(self) -> weakref.finalize:
        """Shut down when the owner is collected or the interpreter exits, if close() did not."""
        return weakref.finalize(
            self._owner(), _shutdown, self.life, self._lock, self.supervisor, self.releases, self._creator
        )

    def active_workers(self) -> int:
        """Workers being given work."""
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.active is not None:
            return dispatcher.active
        return len(self.supervisor.handles)

    def open_pass(self) -> int:
        """Start the next pass (an iteration): a loaded position's epoch, or the next epoch once the
        current one was taken. Returns the pass's number, which `next` checks."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                self._open_epoch()
                self._epoch_taken = True
                self.pass_number += 1
            return self.pass_number

    def position(self, consumed: int | None) -> dict[str, Any]:
        """`Feeder.state_dict`: the position after the first ``consumed`` elements of the epoch (all
        handed out so far when None), with the configuration it belongs to."""
        with self._lock:
            if self._resume is not None:  # loaded, and not yet iterated: that is where we stand
                return dict(self._resume)
            dispatcher = self.dispatcher
            if dispatcher is not None:
                before = dispatcher.base_position + len(dispatcher.base_done)
                delivered = len(dispatcher.log)
            else:
                before, delivered = sum(self._resume_base[0]), len(self._delivered_from)
            _check(
                consumed is None or before <= consumed <= before + delivered,
                f"consumed={consumed}, but this epoch has handed out {before + delivered} elements so far"
                + (f", {before} of them before the resume" if before else ""),
            )
            in_run = None if consumed is None else consumed - before  # consumed since this run began
            state: dict[str, Any] = {"mpfeed": FORMAT, **self.config, "epoch": self.epoch}
            if self._epoch_complete and (in_run is None or in_run == delivered):
                # The epoch is over: the next one starts from its beginning.
                return {**state, "epoch": self.epoch + 1, **self._fresh_position()}
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

    def resume(self, state: dict[str, Any]) -> None:
        """`Feeder.load_state_dict`: the next pass continues from ``state``."""
        check_state(state, self.config)
        with self._lock:
            self._check_usable()
            self._resume = dict(state)

    def _fresh_position(self) -> dict[str, Any]:
        if self.dispatcher is not None:
            return {"position": 0, "done": ""}
        return {"position": 0, "starts": [0] * len(self.supervisor.handles), "cursor": 0}

    def _open_epoch(self) -> None:
        """Start the epoch the next iteration serves: a loaded state's, the next one, or (untaken) this."""
        resume, self._resume = self._resume, None
        if resume is not None:
            self._start_epoch(resume["epoch"], resume)
        elif self._epoch_taken:
            self._start_epoch(self.epoch + 1)

    def close(self) -> None:
        """`Feeder.close`: stop the workers and release every segment, from any thread, once. In a child
        forked from the process that made the feeder, nothing: the workers are its parent's."""
        if os.getpid() != self._creator:
            return
        self.life.closed = True
        self.releases.wake()  # a thread waiting for workers returns, and sees it
        thread = self._shutdown_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_SHUTDOWN_JOIN_S)
        try:
            self._finalizer()
            # Finish a shutdown that an exception interrupted, or wait for one under way in another thread.
            acquired = self._lock.acquire(timeout=_LOCK_WAIT_S)
            try:
                self.supervisor.close()
            finally:
                if acquired:
                    self._lock.release()
        except BaseException:  # interrupted: whatever is left still goes when the owner does
            if self._owner() is not None:
                self._finalizer = self._arm_finalizer()
            raise

    # -- epochs --------------------------------------------------------------------------------------

    def _start_epoch(self, number: int, resume: dict[str, Any] | None = None) -> None:
        self._peeked.clear()
        self.epoch = number
        self._epoch_taken = False
        self._epoch_complete = False
        self._ordering.reset()
        self._delivered_from = []
        self.leases.collect(self.supervisor)
        dispatcher = self.dispatcher
        position = resume or self._fresh_position()
        if dispatcher is not None:
            self.supervisor.start_epoch(number)
            start = position["position"]
            dispatcher.start(number, start, decode_done(start, position["done"]))
            return
        starts, cursor = list(position["starts"]), position["cursor"]
        self._resume_base = (starts, cursor)
        if isinstance(self._ordering, RoundRobin):
            self._ordering.cursor = cursor
        batch = self.supervisor.config.batch_size or 1
        self.supervisor.start_epoch(number, [records * batch for records in starts])

    def peek(self) -> Any:
        """The first element of a fresh epoch, kept to be served first (for signature inference). Only a
        failure that stands in the way of that element is raised here; others surface while iterating."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                if self._epoch_taken or self._resume is not None:
                    self._open_epoch()
            serial = self.pass_number  # a peek belongs to no iteration, but a new iteration must not lose it
        if not self._peeked:
            element = self.next(serial, 0, strict=False, peeking=True)
            with self._lock:
                if not self._epoch_taken and not self._peeked:
                    self._peeked.append(element)
        if self._peeked[-1] is EPOCH_END:
            raise ValueError(
                "the source produced no elements in this epoch: check it first (an empty glob or file "
                "list, a len() of 0, a partition with nothing in it). If an empty epoch is what you "
                "meant, pass output_signature, since there is no element to infer it from"
            )
        return self._peeked[-1]

    # -- the consumer's loop -------------------------------------------------------------------------

    def next(self, serial: int, copy_below: int, strict: bool = True, peeking: bool = False) -> Any:
        """The next element of iteration ``serial`` (or `EPOCH_END`), timed for the diagnosis."""
        entered, waited = time.monotonic(), self.wait_s
        try:
            return self._next(serial, copy_below, strict, peeking)
        finally:
            self.clock.note(entered, time.monotonic(), self.wait_s - waited)

    def _next(self, serial: int, copy_below: int, strict: bool, peeking: bool) -> Any:
        """Holds the lock while it reads pipes and hands out views; waits for workers without it."""
        since = time.monotonic()
        idle = False  # whether the last wait ended with nothing to read
        while True:
            self._check_usable()
            with self._lock:
                self._check_usable()
                if serial != self.pass_number:
                    raise SupersededError(_SUPERSEDED)
                if self._peeked and not peeking:
                    return self._peeked.pop()
                with self._guard("taking an element"):
                    if self.tuner is not None:
                        self.tuner.tick()
                    if idle:
                        self.supervisor.check_processes()
                    awaited, element = self._step(copy_below, strict)
                    if awaited is None:
                        return element
                    self.supervisor.flush_credits()
                    slice_s = _WAIT_SLICE_S
                    if self._timeout is not None:
                        slice_s = min(slice_s, self._timeout - (time.monotonic() - since))
                        if slice_s <= 0:
                            raise self._timed_out(awaited)
                    version, fds = self.supervisor.version, self.supervisor.watched()
                    behind_head = self._ordered and any(
                        h is not awaited and any(type(e) is Record for e in h.inbox)
                        for h in self.supervisor.handles
                    )
            waited = self.wait_s
            idle = not self._wait(version, fds, slice_s)
            if behind_head:  # others had elements ready: the next one in order held them up
                self.head_of_line_s += self.wait_s - waited

    def _step(self, copy_below: int, strict: bool) -> tuple[WorkerHandle | None, Any]:
        """Take the next element if one is ready: ``(None, element)``, ``(None, EPOCH_END)``, or
        ``(handle, None)`` when the consumer must wait (for ``handle``, when ordered)."""
        supervisor, dispatcher = self.supervisor, self.dispatcher
        self.leases.collect(supervisor)
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
            return None, self.leases.open(supervisor, handle, record, copy_below)
        if handle is None:
            self._epoch_complete = True
            return None, EPOCH_END
        return handle, None

    def _wait(self, version: int, fds: list[int], seconds: float) -> bool:
        """Wait (without the lock) until a pipe has news, a view died or someone wakes us; False when the
        time ran out with nothing."""
        waiter = self._waiters
        if getattr(waiter, "version", None) != version or getattr(waiter, "owner", None) is not self:
            waiter.poll = select.poll()
            for fd in [*fds, self.releases.reader.fileno()]:
                waiter.poll.register(fd, select.POLLIN)
            waiter.version, waiter.owner = version, self
        started = time.monotonic()
        releases = self.releases
        releases.waiting = True
        try:
            if releases.slots or self.life.closed:  # a release came before (or instead of) its wake-up
                return True
            if self.supervisor.remote:
                return self.supervisor.wait(min(seconds, _REMOTE_WAIT_SLICE_S))
            ready = waiter.poll.poll(max(0, int(seconds * 1000 + 0.999)))
            if ready:
                releases.clear_wakeups()
            return bool(ready)
        finally:
            releases.waiting = False
            self.wait_s += time.monotonic() - started

    def _timed_out(self, awaited: WorkerHandle) -> WorkerTimeoutError:
        if self._ordered:
            what = f"worker {awaited.index} (pid {awaited.pid}) produced nothing"
            where = f"while producing element {awaited.produced} of its shard"
        else:
            what, where = "no worker produced anything", "while the consumer waited"
        return WorkerTimeoutError(
            f"{what} for {self._timeout:g} s (the feeder's timeout) {where} (epoch {self.epoch})",
            worker=awaited.index,
            pid=awaited.pid,
            element=awaited.produced,
            epoch=self.epoch,
        )

    # -- state ---------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        life = self.life
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
            if self.life.closed:
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
        if self.life.broken is not None:
            return
        self.life.broken = error
        self.leases.forget()
        self.releases.wake()
        self._shutdown_thread = threading.Thread(target=self._finalizer, name="mpfeed-shutdown", daemon=True)
        self._shutdown_thread.start()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class _Life:
    """Whether the feeder was closed or broken: shared with its finalizer and read without the lock."""

    __slots__ = ("closed", "broken")

    def __init__(self) -> None:
        self.closed = False
        self.broken: BaseException | None = None


def _shutdown(
    life: _Life, lock: threading.RLock, supervisor: Supervisor, releases: Releases, creator: int
) -> None:
    """Stop the workers and release everything, once the thread that may be taking an element lets go of
    the lock (it does within a wait slice, since it sees ``closed``). Only in the process that made the
    feeder: a forked child that exits (and runs its finalizers) must not stop its parent's workers."""
    if os.getpid() != creator:
        return
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
