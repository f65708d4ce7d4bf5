"""Start, watch and stop the worker processes; own their pipes and rings; turn what they say into typed
inbox entries (`Record`, `End`, a `WorkerError`, `Exited`) and their failures into errors.

The supervisor is the mechanism under `Feeder`: it knows processes, pipes and segments, never arrays. It
has one owner (the feeder, under its lock): nothing here is thread-safe, and nothing here blocks without a
deadline. Reads never block (`mpfeed.channel`); a worker that dies closes its pipe, which wakes the
consumer's wait at once.
"""

from __future__ import annotations

import errno
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import launcher, protocol
from .cache import Cache
from .channel import Channel
from .errors import ElementError, ShmSpaceError, SourceError, WorkerDiedError, WorkerError, describe_exit
from .process import Process
from .ring import Ring, check_memory_space, check_shm_space, choose_memory, remove_names, slot_size_for

_STOP_GRACE_S = 2.0  # for workers to finish the element in hand and exit on STOP
_TERMINATE_GRACE_S = 1.0  # after SIGTERM, before SIGKILL
_KILL_WAIT_S = 5.0  # after SIGKILL, for the kernel to end it
_EXIT_CODE_WAIT_S = 2.0  # for the exit code of a worker whose pipe closed
_DRAIN_SLICE_S = 0.02
_SPARE_FACTOR = 2  # a ring has this many times depth slots: the rest is granted when views linger
# The weight of each task in a worker's smoothed pace: a long memory, so one slow element barely moves it.
_PACE_WEIGHT = 0.05
_BATCH_SHOWN = 8  # the source indices a dead worker's batch is named by, at most


@dataclass(slots=True)
class Record:
    """Inbox entry: a record of the current run, in a ring slot, carried in the pipe (``inline``), or in
    memory that stays valid while referenced (``shared``: a Ray object)."""

    key: int  # generator: the shard's elements up to and including this record; random access: its task
    slot: int | None  # the ring slot it holds (an inline record may hold one too, for the credit)
    inline: Any = None  # memoryview of the record's bytes, for a record that came through the pipe
    shared: Any = None  # a read-only uint8 array holding the record, handed out without a copy


@dataclass(frozen=True)
class End:
    """Inbox entry: the worker's shard of the epoch ended after ``count`` elements."""

    count: int


@dataclass(frozen=True)
class Exited:
    """Inbox entry: the worker's process ended with this exit code (None: unknown)."""

    exitcode: int | None


@dataclass(frozen=True)
class WorkerConfig:
    """The feeder's options that shape its workers."""

    workers: int
    depth: int
    slot_bytes: int | None
    batch_size: int | None
    drop_remainder: bool
    seed: int
    start_method: str
    ring_memory: str = "auto"  # "auto" (posix while /dev/shm has room, else memfd), "posix" or "memfd"
    indexed: bool = False  # a random-access source: workers make the tasks they are sent
    partition: tuple[int, int] = (0, 1)
    shm_budget: int | None = None  # bytes of ring memory for the whole feeder (None: no limit)
    max_workers: int | None = None  # the most workers it may have (autotuning): the budget is shared so
    dtypes: Any = None  # a nest of numpy dtypes the workers convert every element to (`mpfeed.conform`)
    cache_bytes: int | None = None  # random access: the size of the workers' shared cache of loaded samples


@dataclass(eq=False)
class WorkerHandle:
    """The consumer's view of one worker: its process, pipe, ring and the entries it has sent."""

    index: int
    process: Process
    channel: Channel | None  # None for a worker that is not a local process (a Ray actor)
    ring: Ring | None
    # Entries of the current epoch, oldest first; a worker's failure or exit is its last entry, so the
    # consumer meets it exactly where that worker's next element would have been.
    inbox: deque = field(default_factory=deque)
    gone: bool = False  # failed or exited: its pipe is done with
    ended: bool = False  # this epoch's End has been taken from the inbox
    produced: int = 0  # generator: elements of its shard it announced in the current run
    pending_tasks: int = 0  # random access: tasks sent in the current run and not yet answered
    unanswered: deque = field(default_factory=deque)  # local random access: those tasks, (task, indices)
    service_s: float | None = None  # random access: how long it takes per task, smoothed
    busy_since: float = 0.0  # when it last started on a task with none before it (or answered one)
    items: int = 0  # elements delivered over the feeder's life
    bytes: int = 0
    held: int = 0  # slots whose views the user still holds
    granted: int = 0  # slots of its ring the worker may use (see `Supervisor.grant`)
    reserve: list = field(default_factory=list)  # the ring's other slots, granted when views linger
    exitcode: int | None = None
    credits: list = field(default_factory=list)  # freed slots not yet sent back
    outgoing: list = field(default_factory=list)  # (task, indices) sent with the next `flush_tasks`
    times: tuple[float, float, float] = (0.0, 0.0, 0.0)  # busy, blocked, idle seconds, as it last said
    # ``times`` as first said once the consumer began taking elements (see `Supervisor.measure_from_now`)
    times_base: tuple[float, float, float] | None = None
    born: float = field(default_factory=time.monotonic)  # no later than the worker's own start
    node: str | None = None  # where a remote worker runs (a Ray node's address); None: this host
    usage: tuple[float, int] | None = None  # a remote worker's CPU seconds and resident bytes, as it said

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def failed(self) -> bool:
        """Whether its inbox ends in a failure (what comes before it is still delivered)."""
        return bool(self.inbox) and isinstance(self.inbox[-1], (WorkerError, Exited))


class Supervisor:
    remote = False  # local workers are waited for through their pipes (`watched`), remote ones by `wait`
    measuring = 0.0  # when the consumer began taking elements (`measure_from_now`); 0: not yet
    cache: Cache | None = None  # the workers' shared cache of loaded samples (see `mpfeed.cache`)

    def __init__(self, source: Any, args: tuple, kwargs: dict, config: WorkerConfig) -> None:
        self.config = config
        self._credit_batch = max(1, config.depth // 2)
        self.epoch = 0
        self.run = 0  # the current run (see `mpfeed.protocol`); workers start run 0 by themselves
        self.overflow = 0
        self.depth_grows = 0  # slots granted beyond depth because views lingered
        self.closed = False
        self.handles: list[WorkerHandle] = []
        self._outgoing: list[WorkerHandle] = []  # workers with tasks for `flush_tasks` to send
        self.task_messages = 0  # TASK messages sent (each carries one or more tasks)
        self.server: launcher.ForkServer | None = None
        self.version = 0  # changes whenever the set of pipes to watch changes
        self.ring_memory: str | None = None  # the kind of the rings, decided with the first one
        self.owner = f"{os.urandom(3).hex()}-"  # in the names of our POSIX rings (see `close`)
        self._work = launcher.pickle_work(source, args, kwargs)
        self._main_spec = launcher.main_module_spec(self._work)
        try:
            if config.slot_bytes is not None:
                self._check_space(config.slot_bytes)
            launcher.check_limits(config.workers, config.start_method)
            if config.cache_bytes is not None:
                slots = config.max_workers or config.workers
                self.cache = Cache.create(config.cache_bytes, len(source), slots)
            if config.start_method == "forkserver":
                try:
                    self.server = launcher.ForkServer(self._work, self._main_spec)
                except OSError as error:
                    if error.errno not in launcher.REFUSALS:
                        raise
                    how = "spawning its interpreter"
                    raise launcher.start_refused(
                        error.errno, worker=None, asked=config.workers, started=0, more=False, how=how
                    ) from error
            self.add_workers(config.workers)
        except BaseException:
            self.close()
            raise

    def add_workers(self, count: int) -> None:
        """Start ``count`` more workers (the feeder starts with ``config.workers``; autotuning may add more
        for a random-access source, whose data does not depend on them). They join the current run."""
        config = self.config
        first = len(self.handles)
        if first:  # more, while running (autotuning); the feeder's own workers were checked before the server
            launcher.check_limits(count, config.start_method, count_threads=True)
        launched = time.monotonic()
        rings: list[Ring | None] = [None] * count
        try:
            if config.slot_bytes is not None:
                for offset in range(count):  # one at a time, so a failure closes those made
                    rings[offset] = self._new_ring(config.slot_bytes)
            setups = [
                protocol.WorkerSetup(
                    index=config.partition[0] * config.workers + first + offset,
                    count=config.partition[1] * config.workers,
                    seed=config.seed,
                    depth=config.depth,
                    batch_size=config.batch_size,
                    drop_remainder=config.drop_remainder,
                    ring=None if ring is None else _spec(ring, min(config.depth, ring.depth)),
                    parent_pid=os.getpid(),
                    consumer_pid=os.getpid(),
                    indexed=config.indexed,
                    dtypes=config.dtypes,
                    cache=None if self.cache is None else self.cache.spec(first + offset),
                )
                for offset, ring in enumerate(rings)
            ]
            refusal: tuple[int, OSError] | None = None
            if self.server is not None:
                started, refusal = self.server.fork_all(setups)
                for offset, process, channel in started:
                    self._adopt(WorkerHandle(first + offset, process, channel, rings[offset], born=launched))
                how = "the fork server's os.fork()"
            else:
                how = "spawning its interpreter"
                for offset, setup in enumerate(setups):
                    try:
                        spawned, channel = launcher.launch(self._work, self._main_spec, setup)
                    except OSError as error:
                        if error.errno not in launcher.REFUSALS:
                            raise
                        refusal = offset, error
                        break
                    self._adopt(WorkerHandle(first + offset, spawned, channel, rings[offset], born=launched))
            if refusal is not None:
                offset, cause = refusal
                refused = launcher.start_refused(
                    cause.errno or 0,
                    worker=setups[offset].index,
                    asked=count,
                    started=len(self.handles) - first,
                    more=bool(first),
                    how=how,
                )
                self._stop(self.handles[first:])  # the feeder keeps the workers it had, and only those
                del self.handles[first:]  # after: interrupted, close() stops those left here
                raise refused from cause
        finally:
            for ring in rings[len(self.handles) - first :]:
                if ring is not None:
                    ring.close()
            self.version += 1
        if self.run:
            for handle in self.handles[first:]:
                self._send(handle, protocol.epoch(self.run, self.epoch))

    def _adopt(self, handle: WorkerHandle) -> None:
        if handle.ring is not None:
            self._give_ring(handle)
        self.handles.append(handle)

    # -- epochs --------------------------------------------------------------------------------------

    def start_epoch(self, number: int, starts: list[int] | None = None) -> None:
        """Start a new run of epoch ``number`` (workers start run 0, epoch 0, by themselves); a generator
        worker ``k`` begins its shard at element ``starts[k]``. Records still queued from the old run give
        their slots back."""
        self.epoch = number
        self.run += 1
        for handle in self.handles:
            handle.ended = False
            handle.produced = 0
            handle.pending_tasks = 0
            handle.unanswered.clear()
            failure = handle.inbox[-1] if handle.failed else None
            for entry in handle.inbox:
                if isinstance(entry, Record):
                    self.release(handle, entry)
            handle.inbox.clear()
            if failure is not None:  # keep it: the new epoch meets it
                handle.inbox.append(failure)
            elif not handle.gone:
                start = starts[handle.index] if starts else 0
                self._send(handle, protocol.epoch(self.run, number, start))
        self.flush_credits()

    def send_task(self, handle: WorkerHandle, task: int, indices: list[int]) -> None:
        """Ask a worker of a random-access source to make task ``task`` of the current run. The task
        waits with the worker's others until `flush_tasks`, which sends them in one message."""
        if not handle.outgoing:
            self._outgoing.append(handle)
        handle.outgoing.append((task, indices))
        handle.unanswered.append((task, indices))  # a worker answers its tasks in the order sent
        if not handle.pending_tasks:
            handle.busy_since = time.monotonic()
        handle.pending_tasks += 1

    def flush_tasks(self) -> None:
        """Send every task `send_task` holds: one message per worker, whose every message wakes it."""
        outgoing, self._outgoing = self._outgoing, []
        for handle in outgoing:
            batch, handle.outgoing = handle.outgoing, []
            self._send(handle, protocol.tasks(self.run, batch))
            self.task_messages += 1

    def release(self, handle: WorkerHandle, record: Record) -> None:
        """Give back the slot credit a record holds, if any."""
        if record.slot is not None:
            self.credit(handle, record.slot)

    def credit(self, handle: WorkerHandle, slot: int) -> None:
        """Give a slot back to its worker. Credits go in batches of half a ring: each message wakes the
        worker, and waking it costs more than the message; `flush_credits` sends the rest."""
        handle.credits.append(slot)
        if len(handle.credits) >= self._credit_batch:
            self._send(handle, protocol.credit(handle.credits))
            handle.credits.clear()

    def flush_credits(self) -> None:
        """Send every credit held back (before the consumer waits, so no worker starves)."""
        for handle in self.handles:
            if handle.credits:
                self._send(handle, protocol.credit(handle.credits))
                handle.credits.clear()

    def _send(self, handle: WorkerHandle, message: bytes) -> None:
        if not handle.gone:
            _channel(handle).send(message)  # a worker that is gone is reported by its pipe and process

    # -- watching ------------------------------------------------------------------------------------

    def wait(self, seconds: float) -> bool:
        """Wait for news from remote workers (see `remote`); local ones are waited for through `watched`."""
        raise NotImplementedError("local workers are waited for through their pipes")

    def watched(self) -> list[int]:
        """The file descriptors whose readiness means news: live workers' pipes and the fork server's."""
        fds = [_channel(h).fileno() for h in self.handles if not h.gone]
        if self.server is not None and not self.server.gone:
            fds.append(self.server.channel.fileno())
        return fds

    def read(self, handle: WorkerHandle) -> None:
        """Take every message that has arrived from a worker; queue its failure or exit when that comes."""
        if handle.gone:
            return
        channel = _channel(handle)
        for message in channel.receive():
            self._dispatch(handle, message)
            if handle.gone:
                return
        if channel.eof:
            self.mark_exited(handle)

    def read_all(self) -> None:
        for handle in self.handles:
            self.read(handle)
        if self.server is not None and not self.server.gone:
            self.server.read()
            if self.server.gone:
                self.version += 1

    def check_processes(self) -> None:
        """Workers whose process ended while their pipe stays open (a child of the source may hold it)."""
        for handle in self.handles:
            if not handle.gone and handle.process.exited():
                self.read(handle)  # its last words first
                self.mark_exited(handle)

    def mark_exited(self, handle: WorkerHandle) -> None:
        """The worker's process ended (its pipe closed, or it is seen dead): queue that, once."""
        if handle.gone:
            return
        self._forget(handle)
        handle.exitcode = self._exit_code(handle.process)
        handle.inbox.append(Exited(handle.exitcode))

    def _exit_code(self, process: Process) -> int | None:
        """The exit code, waiting a little for the process to end and (for a forked worker) for the fork
        server to report it; None if it does not come."""
        deadline = time.monotonic() + _EXIT_CODE_WAIT_S
        process.wait(_EXIT_CODE_WAIT_S)
        while process.exit_code() is None and self.server is not None and not self.server.gone:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.server.read(min(remaining, _DRAIN_SLICE_S))
        return process.exit_code()

    def _forget(self, handle: WorkerHandle) -> None:
        handle.gone = True
        self.version += 1

    def _dispatch(self, handle: WorkerHandle, message: bytes) -> None:
        tag = message[:1]
        if tag == protocol.FILLED:
            slot, run, key = protocol.read_filled(message)
            self._queue(handle, run, Record(key, slot))
        elif tag == protocol.INLINE:
            run, key, slot = protocol.read_inline(message)
            if handle.ring is None:
                self._create_ring(handle, len(message) - protocol.INLINE_HEADER)
            if slot != protocol.NO_SLOT:  # a record too big for its slot (the first one only sizes the ring)
                self.overflow += 1
            inline = memoryview(message)[protocol.INLINE_HEADER :]
            self._queue(handle, run, Record(key, None if slot == protocol.NO_SLOT else slot, inline))
        elif tag == protocol.END:
            run, count = protocol.read_end(message)
            if run == self.run:
                handle.inbox.append(End(count))
        elif tag == protocol.TIMES:
            self.note_times(handle, protocol.read_times(message))
        elif tag == protocol.ATTACHED:
            if handle.ring is not None:
                handle.ring.unlink()
        elif tag == protocol.FAILED:
            self._forget(handle)
            handle.inbox.append(self._failure(handle, pickle.loads(message[1:])))

    def measure_from_now(self) -> None:
        """The consumer begins taking elements: the workers' shares of time are measured from each one's
        first report made since, so that the time before (a model being built) does not count as idle."""
        self.measuring = time.monotonic()
        for handle in self.handles:
            handle.times_base = None

    def note_times(self, handle: WorkerHandle, times: tuple[float, float, float]) -> None:
        """A worker's busy, blocked and idle seconds since its start, which add up to its age when it said
        so: a report read now may have waited in the pipe, and only one made since `measure_from_now` is
        a base."""
        handle.times = times
        if self.measuring and handle.times_base is None and handle.born + sum(times) >= self.measuring:
            handle.times_base = times

    def _queue(self, handle: WorkerHandle, run: int, record: Record) -> None:
        """Queue a record of the current run; give back the slot of one from an abandoned run."""
        if run == self.run:
            if handle.unanswered:
                handle.unanswered.popleft()
            queue_record(handle, record)
        else:
            self.release(handle, record)

    def _create_ring(self, handle: WorkerHandle, record_bytes: int) -> None:
        handle.ring = self._new_ring(slot_size_for(record_bytes))
        self._give_ring(handle)
        self._send(handle, protocol.RING + pickle.dumps(self._spec(handle)))

    def _give_ring(self, handle: WorkerHandle) -> None:
        """The worker may use ``depth`` slots of its ring (fewer when the budget cut the ring shorter)."""
        assert handle.ring is not None
        handle.granted = min(self.config.depth, handle.ring.depth)
        handle.reserve = list(range(handle.ring.depth - 1, handle.granted - 1, -1))

    def grant(self, handle: WorkerHandle) -> bool:
        """One more slot for a worker whose views linger (TensorFlow holds them, or the user does), instead
        of copying records out; False when its ring has none left."""
        if not handle.reserve:
            return False
        handle.granted += 1
        self._send(handle, protocol.credit([handle.reserve.pop()]))
        self.depth_grows += 1
        return True

    def _spec(self, handle: WorkerHandle) -> protocol.RingSpec:
        ring = handle.ring
        assert ring is not None
        return protocol.RingSpec(ring.kind, ring.name, ring.depth, ring.slot_bytes, handle.granted)

    def _check_space(self, slot_bytes: int) -> None:
        """Refuse up front when the whole feeder's rings cannot fit where they would go."""
        config = self.config
        slots = self.ring_slots(slot_bytes)
        total = config.workers * slots * slot_bytes
        kind = self._memory_for(slot_bytes)
        if kind == "posix":
            check_shm_space(total, total, config.workers, slots, slot_bytes)
        check_memory_space(total, total, config.workers, slots, slot_bytes)

    def _memory_for(self, slot_bytes: int) -> str:
        """The kind of shared memory for every ring of this feeder, decided once."""
        if self.ring_memory is None:
            config = self.config
            total = config.workers * self.ring_slots(slot_bytes) * slot_bytes
            self.ring_memory = choose_memory(total) if config.ring_memory == "auto" else config.ring_memory
        return self.ring_memory

    def ring_slots(self, slot_bytes: int) -> int:
        """How many slots a ring of this slot size gets: twice ``depth``, room for views that linger,
        within each worker's share of the budget; `ShmSpaceError` when not even one slot fits."""
        config = self.config
        slots = _SPARE_FACTOR * config.depth
        if config.shm_budget is not None:
            share = config.shm_budget // (config.max_workers or config.workers)
            slots = min(slots, share // slot_bytes)
            if slots < 1:
                raise ShmSpaceError(
                    errno.ENOMEM,
                    f"the feeder's shm_budget of {config.shm_budget:,} bytes leaves each of its up to "
                    f"{config.max_workers or config.workers} workers {share:,} bytes, less than one slot of "
                    f"{slot_bytes:,}: raise shm_budget, or use fewer workers or smaller elements",
                )
        return slots

    def _new_ring(self, slot_bytes: int) -> Ring:
        memory = self._memory_for(slot_bytes)
        config = self.config
        return Ring.create(
            self.ring_slots(slot_bytes), slot_bytes, workers=config.workers, memory=memory, owner=self.owner
        )

    # -- failures ------------------------------------------------------------------------------------

    def _failure(self, handle: WorkerHandle, failure: protocol.Failure) -> WorkerError:
        return failure_error(
            failure, handle, f"worker {handle.index} (pid {handle.pid})", self.config.indexed
        )

    def error(self, handle: WorkerHandle, entry: WorkerError | Exited) -> WorkerError:
        """The error for a failure entry met in a worker's inbox."""
        if isinstance(entry, WorkerError):
            return entry
        exitcode = entry.exitcode
        ended = handle.ended or any(isinstance(e, End) for e in handle.inbox)
        element = None if ended else handle.produced
        state = (
            f"after its shard of epoch {self.epoch} ended"
            if ended
            else f"while producing element {handle.produced} of its shard (epoch {self.epoch})"
        )
        if self.config.indexed:
            element, state = self._task_in_hand(handle)
        how = describe_exit(exitcode)
        if exitcode is None and self.server is not None and self.server.gone:
            how += f": {self.server.describe()}"
        error = WorkerDiedError(
            f"worker {handle.index} (pid {handle.pid}) {how} {state}",
            worker=handle.index,
            pid=handle.pid,
            element=element,
            epoch=self.epoch,
        )
        error.exitcode = exitcode
        return error

    def _task_in_hand(self, handle: WorkerHandle) -> tuple[int | None, str]:
        """A random-access worker that ended: ``(source index, words)`` for the task it was making, the
        oldest it had not answered (a batch's element is one of the task's, and the index is None)."""
        if not handle.unanswered:
            return None, f"while it held no task (epoch {self.epoch})"
        task, indices = handle.unanswered[0]
        return describe_task(task, indices, self.config.batch_size, self.epoch)

    # -- stopping ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (STOP, then SIGTERM, then SIGKILL, each with a deadline; processes already
        known to have ended get no grace), reap them, and release every segment. Idempotent, and safe to
        call again after an exception interrupted it."""
        if self.closed:
            return
        self._stop(self.handles)
        for handle in self.handles:
            if handle.ring is not None:
                handle.ring.close()
        if self.server is not None:
            self.server.close()
        if self.cache is not None:
            self.cache.close()
        remove_names(self.owner)
        self.closed = True

    def _stop(self, handles: list[WorkerHandle]) -> None:
        """Stop these workers and reap them (their rings stay with the caller)."""
        for handle in handles:
            self._send(handle, protocol.STOP)
        self._wait_all(handles, _STOP_GRACE_S)
        for handle in _running(handles):
            handle.process.terminate()
        self._wait_all(handles, _TERMINATE_GRACE_S)
        for handle in _running(handles):
            handle.process.kill()
        self._wait_all(handles, _KILL_WAIT_S)
        for handle in handles:
            handle.gone = True
            _channel(handle).close()
            handle.inbox.clear()
            handle.process.release()

    def _wait_all(self, handles: list[WorkerHandle], seconds: float) -> None:
        """Wait for the processes to exit, draining their pipes meanwhile: a worker blocked sending a large
        record could not otherwise read its STOP."""
        deadline = time.monotonic() + seconds
        while True:
            running = _running(handles)
            remaining = deadline - time.monotonic()
            if not running or remaining <= 0:
                return
            for handle in running:
                _channel(handle).receive()
            running[0].process.wait(min(remaining, _DRAIN_SLICE_S))
            if self.server is not None:
                self.server.read()


def _running(handles: list[WorkerHandle]) -> list[WorkerHandle]:
    return [h for h in handles if not h.process.exited()]


def _spec(ring: Ring, credits: int) -> protocol.RingSpec:
    return protocol.RingSpec(ring.kind, ring.name, ring.depth, ring.slot_bytes, credits)


def failure_error(failure: protocol.Failure, handle: WorkerHandle, who: str, indexed: bool) -> WorkerError:
    """The typed error for what a worker said when it failed; ``who`` names it in the message."""
    where = f"while producing element {failure.element} of its shard (epoch {failure.epoch})"
    if indexed:
        where = (
            f"while producing source[{failure.element}] (position {failure.position} of epoch "
            f"{failure.epoch})"
        )
        if failure.type == "IndexError" and failure.where == "source":
            where += (
                ": the source's __getitem__ raised IndexError for an index below its len(), which "
                "mpfeed takes as the source's own error (check __len__ and __getitem__ agree)"
            )
    details: dict[str, Any] = dict(
        worker=handle.index, pid=handle.pid, node=handle.node, element=failure.element, epoch=failure.epoch
    )
    trace = f"\n\nWorker traceback:\n{failure.traceback}"
    if failure.where == "element":
        return ElementError(f"{who} produced a bad element {where}: {failure.message}", **details)
    if failure.type == "SystemExit":
        died = WorkerDiedError(
            f"{who} exited with code {failure.exit_code}: the source called "
            f"sys.exit({failure.exit_code!r}) {where}",
            **details,
        )
        died.exitcode = failure.exit_code
        return died
    if failure.where == "start":
        return WorkerError(
            f"{who} could not start: {failure.type}: {failure.message}{trace}",
            remote_traceback=failure.traceback,
            **details,
        )
    if failure.where == "worker":
        return WorkerError(
            f"{who} failed in mpfeed's own worker code, not in your source: {failure.type}: "
            f"{failure.message} (epoch {failure.epoch}). This is a bug in mpfeed; please report it "
            f"with this traceback.{trace}",
            remote_traceback=failure.traceback,
            **details,
        )
    error = SourceError(
        f"{who} raised {failure.type}: {failure.message} {where}{trace}",
        remote_traceback=failure.traceback,
        **details,
    )
    error.exc_type = failure.type
    return error


def describe_task(
    task: int, indices: list[int], batch_size: int | None, epoch: int
) -> tuple[int | None, str]:
    """``(source index, words)`` for a random-access task a worker died making: ``source[i]`` and its
    position, or for a batch, its indices (the index is then None: which of them is not known)."""
    position = task * (batch_size or 1)
    if len(indices) == 1:
        return indices[0], f"while producing source[{indices[0]}] (position {position} of epoch {epoch})"
    shown = ", ".join(f"source[{i}]" for i in indices[:_BATCH_SHOWN])
    more = f" and {len(indices) - _BATCH_SHOWN} more" if len(indices) > _BATCH_SHOWN else ""
    return None, (
        f"while producing one of the batch {shown}{more} (positions {position} to "
        f"{position + len(indices) - 1} of epoch {epoch})"
    )


def queue_record(handle: WorkerHandle, record: Record) -> None:
    """Queue a record of the current run; for a task's answer, update the worker's smoothed pace."""
    handle.inbox.append(record)
    handle.produced = record.key
    if handle.pending_tasks:
        handle.pending_tasks -= 1
        now = time.monotonic()
        took = now - handle.busy_since
        smoothed = handle.service_s
        handle.service_s = took if smoothed is None else smoothed + _PACE_WEIGHT * (took - smoothed)
        handle.busy_since = now


def _channel(handle: WorkerHandle) -> Channel:
    assert handle.channel is not None, "a local worker has a pipe"
    return handle.channel
