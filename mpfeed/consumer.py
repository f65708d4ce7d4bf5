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

import atexit
import contextlib
import logging
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
from .progress import ShardProgress, TaskProgress, TooFarBack
from .state import FORMAT, check_position, check_state
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
_EPOCHS_KEPT = 4  # epochs whose positions stay known: tf.data may prefetch a few epochs ahead of the model
_log = logging.getLogger("mpfeed")
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
        remainder: str = "pad",
    ) -> None:
        """``autotune``: ``(usable cores, max_workers)`` to adjust the workers of a random-access source;
        ``backend``: where the workers run (None: local processes); ``remainder``: how partitions of a
        random-access source share what does not divide evenly (see `EpochOrder.positions`)."""
        self.depth = workers.depth
        self.dispatcher: Dispatcher | None = None
        self._ordering: RoundRobin | FirstReady | Window
        if workers.indexed:
            assert length is not None
            order = EpochOrder(
                length,
                workers.seed,
                shuffle,
                workers.partition,
                workers.batch_size,
                workers.drop_remainder,
                remainder,
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
            "partition_remainder": remainder if workers.indexed and workers.partition[1] > 1 else None,
        }
        self._resume: dict | None = None  # a loaded state, for the next pass
        self._named_epoch: int | None = None  # set_epoch's, for the next pass
        self._served: dict[int, _Served] = {}  # the latest pass over each recent epoch, oldest first
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
        self._current = self._track(0, None, [0] * workers.workers, 0)  # the workers start epoch 0 themselves
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
        """Start the next pass (an iteration) over the epoch `_target` names. Returns the pass's number,
        which `next` checks."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                self._open(self._target())
                self._resume = self._named_epoch = None  # taken by this pass
                self._epoch_taken = True
                self.pass_number += 1
            return self.pass_number

    def set_epoch(self, epoch: int) -> None:
        """`Feeder.set_epoch`: the next pass serves ``epoch``. A loaded position for another epoch is
        dropped, with a warning: the loop has moved elsewhere."""
        with self._lock:
            self._check_usable()
            resume = self._resume
            if resume is not None and resume["epoch"] != epoch:
                _log.warning(
                    "set_epoch(%d) drops the loaded position, which is in epoch %d", epoch, resume["epoch"]
                )
                self._resume = None
            self._named_epoch = epoch

    def _target(self) -> tuple[int, dict | None]:
        """The epoch and loaded position (None: its start) the next pass serves: set_epoch's epoch, from a
        position loaded for it (even if earlier passes took it); else a loaded position; else,
        once a pass has handed out its whole epoch, the next epoch; else the same epoch again, from where
        the last pass over it began (a pass that stopped early, a peek or a `take`, moves nothing)."""
        named, loaded, current = self._named_epoch, self._resume, self._current
        if named is not None:
            if loaded is not None and loaded["epoch"] == named:
                return named, loaded
            if current.number == named:
                return named, current.start  # a loaded position stands until another epoch is served
            return named, None
        if loaded is not None:
            return loaded["epoch"], loaded
        if self._epoch_taken and current.complete:
            return current.number + 1, None
        return current.number, current.start

    def _open(self, target: tuple[int, dict | None]) -> None:
        """Make ``target`` the epoch being produced, unless it already is and no pass has taken it."""
        current = self._current
        if self._epoch_taken or target != (current.number, current.start):
            self._start_epoch(*target)

    def position(self, consumed: int | None, epoch: int | None = None) -> dict[str, Any]:
        """`Feeder.state_dict`: the position after the first ``consumed`` records of ``epoch`` (all that
        were handed out when None), with the configuration it belongs to."""
        with self._lock:
            pending = None
            if self._named_epoch is not None or self._resume is not None:
                pending = self._target()
            if epoch is None:
                epoch = pending[0] if pending is not None else self.epoch
            if pending is not None and pending[0] == epoch:
                start = pending[1] or self._start_state(epoch)
                if consumed is None or consumed == _before(start):
                    return dict(start)
            served = self._served.get(epoch)
            if served is None:
                return self._unserved_position(epoch, consumed)
            progress = served.progress
            handed = progress.count - (len(self._peeked) if served is self._current else 0)
            before = progress.before
            if consumed is not None and (
                consumed == self.records_per_epoch() or (served.complete and consumed > before + handed)
            ):
                # The whole epoch (a count past the end of an epoch that ended: its short last batch).
                return self._start_state(epoch + 1)
            _check(
                consumed is None or before <= consumed <= before + handed,
                f"consumed={consumed}, but epoch {epoch} has handed out {before + handed} records so far"
                + (f", {before} of them before the resume" if before else ""),
            )
            count = handed if consumed is None else consumed - before
            if served.complete and count == handed:  # the epoch is over: the next one starts afresh
                return self._start_state(epoch + 1)
            state = self._start_state(epoch)
            try:
                if isinstance(progress, ShardProgress):
                    starts, cursor = progress.after(count)
                    return {**state, "position": sum(starts), "starts": starts, "cursor": cursor}
                position, done = progress.after(count)
            except TooFarBack as error:
                raise ValueError(f"epoch {epoch}: {error}") from None
            return {**state, "position": position, "done": encode_done(position, done)}

    def _unserved_position(self, epoch: int, consumed: int | None) -> dict[str, Any]:
        """A position in an epoch no recent pass served: its start or end, or, for an ordered
        random-access feeder, any point of its order."""
        total = self.records_per_epoch()
        if not consumed:
            return self._start_state(epoch)
        if consumed == total:
            return self._start_state(epoch + 1)
        _check(
            self.dispatcher is not None and self._ordered and total is not None and 0 < consumed < total,
            f"consumed={consumed} in epoch {epoch}, which the feeder has not served recently: only "
            "an ordered random-access feeder knows where a record of an unserved epoch lies (others "
            "can name an epoch's start, consumed=0, or its end)",
        )
        return {**self._start_state(epoch), "position": consumed, "done": ""}

    def records_per_epoch(self) -> int | None:
        """Records (elements, or batches) of an epoch of a random-access source; None for generators."""
        return self.dispatcher.order.records() if self.dispatcher is not None else None

    def resume(self, state: dict[str, Any]) -> None:
        """`Feeder.load_state_dict`: the next pass continues from ``state``."""
        check_state(state, self.config)
        check_position(state, self.records_per_epoch(), len(self.supervisor.handles))
        with self._lock:
            self._check_usable()
            self._resume = dict(state)

    def _start_state(self, epoch: int) -> dict[str, Any]:
        """The state at the start of ``epoch``."""
        state: dict[str, Any] = {"mpfeed": FORMAT, **self.config, "epoch": epoch}
        if self.dispatcher is not None:
            return {**state, "position": 0, "done": ""}
        return {**state, "position": 0, "starts": [0] * len(self.supervisor.handles), "cursor": 0}

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
        self._ordering.reset()
        self.leases.collect(self.supervisor)
        dispatcher = self.dispatcher
        position = resume or self._start_state(number)
        if dispatcher is not None:
            self.supervisor.start_epoch(number)
            start = position["position"]
            dispatcher.start(number, start, decode_done(start, position["done"]))
            self._current = self._track(number, resume)
            return
        starts, cursor = list(position["starts"]), position["cursor"]
        self._current = self._track(number, resume, starts, cursor)
        if isinstance(self._ordering, RoundRobin):
            self._ordering.cursor = cursor
        batch = self.supervisor.config.batch_size or 1
        self.supervisor.start_epoch(number, [records * batch for records in starts])

    def _track(
        self, number: int, resume: dict | None, starts: list[int] | None = None, cursor: int = 0
    ) -> _Served:
        """Remember the pass now serving epoch ``number``, among the last few epochs: what it delivers is
        tracked by the dispatcher (random access), or here from each shard's ``starts`` and the ``cursor``."""
        if self.dispatcher is not None:
            served = _Served(number, resume, self.dispatcher.progress, self.dispatcher.count)
        else:
            served = _Served(number, resume, ShardProgress(starts or [], cursor))
        history = self._served
        history.pop(served.number, None)
        history[served.number] = served
        while len(history) > _EPOCHS_KEPT:
            del history[next(iter(history))]
        return served

    def peek(self) -> Any:
        """The first element of a fresh epoch, kept to be served first (for signature inference). Only a
        failure that stands in the way of that element is raised here; others surface while iterating."""
        self._check_usable()
        with self._lock:
            self._check_usable()
            with self._guard("starting an epoch"):
                self._open(self._target())
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
                # `_guard`, written out: this runs once per element, and a generator-based context
                # manager costs about a microsecond of the consumer's twenty.
                try:
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
                except BaseException as error:
                    self._interrupted(error, "taking an element")
                    raise
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
                self._current.progress.delivered(handle.index)
            return None, self.leases.open(supervisor, handle, record, copy_below)
        if handle is None:
            self._current.ended = True
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
        except BaseException as error:
            self._interrupted(error, doing)
            raise

    def _interrupted(self, error: BaseException, doing: str) -> None:
        """What `_guard` does with an exception that escaped from a state change, before it goes on up."""
        if isinstance(error, (WorkerError, ShmSpaceError)):
            self._break(error)
        elif not self.life.closed:  # closed meanwhile: the ClosedError, not a broken state, is the news
            self._break(
                BrokenError(
                    f"the feeder was interrupted by {type(error).__name__} while {doing}, so its state can "
                    "no longer be trusted; it stopped its workers. Create a new Feeder to go on"
                )
            )

    def _break(self, error: BaseException) -> None:
        """Broken stays broken: remember the error, and stop the workers and release every segment in the
        background, so the error reaches the user now rather than after the shutdown's grace periods."""
        if self.life.broken is not None:
            return
        self.life.broken = error
        self.leases.forget()
        self.releases.wake()
        thread = threading.Thread(target=self._finalizer, name="mpfeed-shutdown", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": the very limit that broke it, often; stop them here
            with contextlib.suppress(Exception):  # the error to raise is ``error``; close() finishes
                self._finalizer()
        else:
            self._shutdown_thread = thread


class _Served:
    """The latest pass over one epoch: where it began (a loaded position, or None for the start), what it
    delivered, and whether it handed out the whole epoch."""

    __slots__ = ("number", "start", "progress", "total", "ended")

    def __init__(
        self,
        number: int,
        start: dict | None,
        progress: TaskProgress | ShardProgress,
        total: int | None = None,
    ) -> None:
        self.number = number
        self.start = start
        self.progress = progress
        self.total = total  # random access: the epoch's records
        self.ended = False  # the pass reached the epoch's end

    @property
    def complete(self) -> bool:
        if self.total is not None:
            return self.progress.before + self.progress.count >= self.total
        return self.ended


def _before(state: dict[str, Any]) -> int:
    """Records of the epoch delivered before ``state``'s position (for random access, ``done`` counts)."""
    if "starts" in state:
        return sum(state["starts"])
    position = state["position"]
    return position + len(decode_done(position, state["done"]))


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
    except BaseException:
        # A Ctrl-C in the middle: a weakref finalizer runs once and swallows it, so nothing would finish the
        # rest (the workers, the rings' names); the interpreter's exit does.
        atexit.register(supervisor.close)
        raise
    finally:
        releases.close()
        if acquired:
            lock.release()
