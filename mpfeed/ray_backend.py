"""The Ray backend: the feeder's workers as Ray actors on a cluster, its records as Ray objects.

`RayBackend` is the public option (``Feeder(..., backend=mpfeed.RayBackend(...))``); `RaySupervisor` is
the consumer side's mechanism, in the place of `mpfeed.supervisor.Supervisor` and with the same face:
handles with inboxes of typed entries, epochs, tasks, failures, closing. Ordering, dispatch, resume,
leases and ``dataset()`` above it are the local engine's.

Each call to an actor answers one record (see `mpfeed.ray_worker`); the consumer keeps at most ``depth``
records per actor in flight or waiting, and maps each answered record read-only without a copy (Ray keeps
the object while any view of it lives). Actors are created with no restarts and no task retries, so
nothing is replayed or duplicated: a dead actor or node is a `WorkerDiedError` that names both.

Importing this module does not import Ray; making a `RaySupervisor` does.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .errors import WorkerDiedError, WorkerError
from .ray_worker import END, FAILED, RECORD, STALE, ActorWorker
from .supervisor import (
    End,
    Record,
    Supervisor,
    WorkerConfig,
    WorkerHandle,
    describe_task,
    failure_error,
    queue_record,
)

_PLACE_WAIT_S = 0.05  # a slice of the wait for actors to be placed
_CLOSE_WAIT_S = 5.0  # for killed actors to be seen dead


@dataclass(frozen=True)
class RayBackend:
    """Run the feeder's workers as Ray actors (``pip install mpfeed[ray]``).

    Args:
        address: the cluster to connect to when Ray is not initialised yet (``"auto"``, ``"ray://..."``,
            ``"host:port"``); None uses Ray's own default (``RAY_ADDRESS``, or a running local cluster).
            When this process already called ``ray.init``, that connection is used. mpfeed never shuts
            Ray down: views it handed out live in Ray's object store.
        num_cpus: CPUs each worker actor reserves.
        resources: other resources each actor reserves (``{"memory": ..., "custom": 1}``).
        scheduling_strategy: where actors go, as Ray takes it: ``"SPREAD"`` (over the nodes),
            ``"DEFAULT"``, or a placement-group or node-affinity strategy object.
        runtime_env: Ray's runtime environment for the actors, to ship the user's code and packages
            (``{"working_dir": ".", "pip": [...]}``); mpfeed itself must be importable there.
        start_timeout: seconds to wait for every actor to be placed and started before giving up with
            a `WorkerError` (Ray would otherwise wait for resources forever).
    """

    address: str | None = None
    num_cpus: float = 1.0
    resources: dict[str, float] | None = None
    scheduling_strategy: Any = None
    runtime_env: dict[str, Any] | None = None
    start_timeout: float = 120.0

    def check(self) -> None:
        """Refuse bad values at once, naming them."""
        if not (isinstance(self.num_cpus, (int, float)) and self.num_cpus >= 0):
            raise ValueError(f"num_cpus must be a number >= 0, got {self.num_cpus!r}")
        if not (isinstance(self.start_timeout, (int, float)) and self.start_timeout > 0):
            raise ValueError(f"start_timeout must be positive seconds, got {self.start_timeout!r}")

    def connect(self) -> Any:
        """The ``ray`` module, connected."""
        try:
            import ray
        except ImportError as error:
            raise ImportError(
                "the Ray backend needs Ray: pip install 'mpfeed[ray]' (or 'ray' itself)"
            ) from error
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=True)
        return ray

    def default_workers(self) -> int:
        """Workers when the feeder is not told: as many as the cluster's CPUs hold at ``num_cpus`` each."""
        ray = self.connect()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus // self.num_cpus) if self.num_cpus else int(cpus))


@dataclass(eq=False)
class ActorHandle(WorkerHandle):
    """A worker that is a Ray actor: its calls in flight, oldest first, and where it runs."""

    actor: Any = None
    calls: deque = field(default_factory=deque)  # ObjectRefs of unanswered calls, in the order made
    tasks: dict = field(default_factory=dict)  # random access: ObjectRef of a task's call -> (task, indices)
    node_id: str = ""
    start: int = 0  # generator: the shard's first element wanted in this run (a resume)
    ended_run: bool = False  # generator: this run's END came (later calls only repeat it)


class _ActorProcess:
    """The `mpfeed.process.Process` face of an actor, for stats and messages: its pid on its node."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def exited(self) -> bool:
        return False

    def exit_code(self) -> int | None:
        return None

    def wait(self, timeout: float) -> bool:
        return False

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def release(self) -> None:
        pass


class RaySupervisor(Supervisor):
    """Start, feed, watch and stop the actors; turn their answers into inbox entries. The local
    supervisor's face over another mechanism: one owner (the consumer, under its lock), and no wait
    without a deadline."""

    remote = True

    def __init__(  # the local supervisor's start-up (processes, rings) does not apply
        self, source: Any, args: tuple, kwargs: dict, config: WorkerConfig, backend: RayBackend
    ) -> None:
        self.config = config
        self.backend = backend
        self.epoch = 0
        self.run = 0
        self.overflow = 0
        self.depth_grows = 0
        self.closed = False
        self.version = 0
        self.ring_memory: str | None = None
        self.server = None
        self.handles = []
        self._ray = ray = backend.connect()
        work = ray.put(_pickle_work(ray, source, args, kwargs))
        try:
            self._start_actors(work)
        except BaseException:
            self.close()
            raise
        if not config.indexed:
            for handle in self.handles:
                self._top_up(handle)

    def _start_actors(self, work: Any) -> None:
        ray, config, backend = self._ray, self.config, self.backend
        options: dict[str, Any] = dict(
            num_cpus=backend.num_cpus, max_restarts=0, max_task_retries=0, max_concurrency=1
        )
        if backend.resources:
            options["resources"] = dict(backend.resources)
        if backend.scheduling_strategy is not None:
            options["scheduling_strategy"] = backend.scheduling_strategy
        if backend.runtime_env is not None:
            options["runtime_env"] = backend.runtime_env
        # "control": a thread of its own, so that a new run is heard while the queued calls wait.
        actor_class = ray.remote(concurrency_groups={"control": 1})(ActorWorker).options(**options)
        for offset in range(config.workers):
            setup = protocol.WorkerSetup(
                index=config.partition[0] * config.workers + offset,
                count=config.partition[1] * config.workers,
                seed=config.seed,
                depth=config.depth,
                batch_size=config.batch_size,
                drop_remainder=config.drop_remainder,
                ring=None,
                parent_pid=os.getpid(),
                consumer_pid=os.getpid(),
                indexed=config.indexed,
                dtypes=config.dtypes,
            )
            actor = actor_class.remote(work, setup)
            self.handles.append(ActorHandle(offset, _ActorProcess(0), None, None, actor=actor))
        where = [h.actor.where.remote() for h in map(_actor, self.handles)]
        deadline = time.monotonic() + backend.start_timeout
        pending = list(where)
        while pending:
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"Ray placed only {len(where) - len(pending)} of {len(where)} worker actors within "
                    f"{backend.start_timeout:g} s (each asks for num_cpus={backend.num_cpus:g}"
                    f"{', resources=' + repr(backend.resources) if backend.resources else ''}; the cluster "
                    f"has {ray.available_resources()} free): use fewer workers, or a bigger cluster",
                    worker=None,
                    pid=None,
                )
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_PLACE_WAIT_S)
        for handle, ref in zip(map(_actor, self.handles), where):
            try:
                node_id, address, pid = ray.get(ref)
            except ray.exceptions.RayError as error:
                raise WorkerDiedError(
                    f"worker {handle.index} (a Ray actor) could not start: {error}",
                    worker=handle.index,
                    pid=None,
                ) from None
            handle.process = _ActorProcess(pid)
            handle.node, handle.node_id = address, node_id
            handle.granted = config.depth

    # -- epochs and work -----------------------------------------------------------------------------

    def start_epoch(self, number: int, starts: list[int] | None = None) -> None:
        """Start a new run of epoch ``number``; a generator actor ``k`` begins at element ``starts[k]``.
        The actor hears of the new run at once, beside the calls queued for it: those of the old run are
        then answered STALE without any work (the one it is on finishes), and they count against
        ``depth`` until they are answered."""
        self.epoch = number
        self.run += 1
        for worker in self.handles:
            handle = _actor(worker)
            handle.ended_run = handle.ended = False
            handle.produced = 0
            if handle.calls and not handle.gone:  # the actor answers them STALE instead of working
                handle.actor.begin_run.options(concurrency_group="control").remote(self.run)
            handle.pending_tasks = len(handle.calls)  # random access: the room they take (see `read_all`)
            failure = handle.inbox[-1] if handle.failed else None
            handle.inbox.clear()
            if failure is not None:
                handle.inbox.append(failure)
            elif not handle.gone and not self.config.indexed:
                handle.start = starts[handle.index] if starts else 0
                self._top_up(handle)

    def _top_up(self, worker: WorkerHandle) -> None:
        """Generator: keep ``depth`` records of this run in flight or waiting."""
        handle = _actor(worker)
        if handle.gone or handle.ended_run:
            return
        waiting = sum(1 for entry in handle.inbox if type(entry) is Record)
        while len(handle.calls) + waiting < self.config.depth:
            handle.calls.append((self.run, handle.actor.next.remote(self.run, self.epoch, handle.start)))

    def send_task(self, worker: WorkerHandle, task: int, indices: list[int]) -> None:
        """Ask an actor of a random-access source to make task ``task`` of the current run."""
        handle = _actor(worker)
        ref = handle.actor.task.remote(self.run, self.epoch, task, indices)
        handle.calls.append((self.run, ref))
        handle.tasks[ref] = (task, indices)
        if not handle.pending_tasks:
            handle.busy_since = time.monotonic()
        handle.pending_tasks += 1

    def flush_tasks(self) -> None:
        pass  # each task is its own call, made by `send_task`

    def release(self, handle: WorkerHandle, record: Record) -> None:
        """A record was taken: its actor may make another."""
        if not self.config.indexed:
            self._top_up(handle)

    def credit(self, handle: WorkerHandle, slot: int) -> None:
        raise AssertionError("Ray records hold no ring slots")

    def grant(self, handle: WorkerHandle) -> bool:
        return False  # no ring: a record held by the user holds only its object

    def flush_credits(self) -> None:
        pass  # nothing is held back: `release` and `start_epoch` make each actor's calls as room appears

    # -- watching ------------------------------------------------------------------------------------

    def watched(self) -> list[int]:
        return []

    def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for any call in flight to be answered (and its object local)."""
        refs = [h.calls[0][1] for h in map(_actor, self.handles) if h.calls and not h.gone]
        if not refs:
            time.sleep(seconds)
            return False
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=seconds)
        return bool(ready)

    def check_processes(self) -> None:
        self.read_all()

    def read_all(self) -> None:
        """Take every answer that has arrived, oldest first per actor."""
        ray = self._ray
        refs = [ref for h in map(_actor, self.handles) if not h.gone for _, ref in h.calls]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            return
        done = set(ready)
        for handle in map(_actor, self.handles):
            while handle.calls and not handle.gone and handle.calls[0][1] in done:
                run, ref = handle.calls.popleft()
                task = handle.tasks.pop(ref, None)
                if run != self.run:  # an abandoned run's call (answered STALE, or made before): room
                    if self.config.indexed:
                        handle.pending_tasks -= 1
                    else:
                        self._top_up(handle)
                    continue  # a dead actor shows in the current run's calls
                try:
                    answer = ray.get(ref)
                except ray.exceptions.RayError as error:
                    self._died(handle, error, task)
                    break
                self._take(handle, answer)

    def _take(self, handle: ActorHandle, answer: tuple) -> None:
        kind = answer[0]
        if kind == RECORD:
            _, key, record, usage = answer
            queue_record(handle, Record(key, None, shared=record))
            if usage is not None:
                self.note_times(handle, usage[:3])
                handle.usage = usage[3:]
        elif kind == END:
            if not handle.ended_run:  # the calls made after the end repeat it
                handle.inbox.append(End(answer[1]))
                handle.ended_run = True
        elif kind == FAILED:
            handle.gone = True
            handle.inbox.append(failure_error(answer[1], handle, self._who(handle), self.config.indexed))
        elif kind != STALE:
            raise AssertionError(f"unknown answer {kind!r}")

    def _died(self, handle: ActorHandle, error: BaseException, task: tuple | None = None) -> None:
        """The actor (or its node) is gone: its error takes the place of its next record. ``task``: the
        random-access task whose call failed, ``(task, indices)``."""
        handle.gone = True
        lines = [line.strip() for line in str(error).splitlines()]
        reason = " ".join(line for line in lines if line.startswith("The actor")) or (
            lines[0] if lines else ""
        )
        element = None if self.config.indexed else handle.produced
        if self.config.indexed and task is not None:
            element, state = describe_task(task[0], task[1], self.config.batch_size, self.epoch)
        elif self.config.indexed:
            state = f"while it held {handle.pending_tasks} task(s) of epoch {self.epoch}"
        else:
            state = f"while producing element {handle.produced} of its shard (epoch {self.epoch})"
        died = WorkerDiedError(
            f"{self._who(handle)} died {state}: {type(error).__name__}: {reason}",
            worker=handle.index,
            pid=handle.pid,
            node=handle.node,
            element=element,
            epoch=self.epoch,
        )
        handle.inbox.append(died)

    def _who(self, handle: WorkerHandle) -> str:
        node_id = _actor(handle).node_id[:8]
        return f"worker {handle.index} (Ray actor, pid {handle.pid} on node {handle.node} {node_id})"

    def add_workers(self, count: int) -> None:
        raise NotImplementedError("the Ray backend has a fixed number of workers")

    # -- stopping ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every actor (no restart), and wait (with a deadline) until Ray reports each one dead, so
        that their resources are back when this returns. Idempotent."""
        if self.closed:
            return
        ray = self._ray
        actors = []
        for handle in map(_actor, self.handles):
            handle.gone = True
            handle.calls.clear()
            handle.tasks.clear()
            handle.inbox.clear()
            if handle.actor is not None:
                ray.kill(handle.actor, no_restart=True)
                actors.append(handle.actor)
        _await_deaths(ray, actors, time.monotonic() + _CLOSE_WAIT_S)
        for handle in map(_actor, self.handles):
            handle.actor = None
        self.closed = True


def _await_deaths(ray: Any, actors: list, deadline: float) -> None:
    """Wait until a call to each killed actor fails (one made before the kill took effect may still be
    answered: ask again), or the deadline passes."""
    while actors and time.monotonic() < deadline:
        probes = {actor.where.remote(): actor for actor in actors}
        ready, _ = ray.wait(
            list(probes), num_returns=len(probes), timeout=max(0.0, deadline - time.monotonic())
        )
        actors = []
        for probe in ready:
            try:
                ray.get(probe)
            except ray.exceptions.RayActorError:
                continue  # dead
            actors.append(probes[probe])
        actors += [probes[p] for p in probes if p not in ready]
        if actors:
            time.sleep(_PLACE_WAIT_S)


def _actor(handle: WorkerHandle) -> ActorHandle:
    assert isinstance(handle, ActorHandle), "the Ray backend's workers are actors"
    return handle


def _pickle_work(ray: Any, source: Any, args: tuple, kwargs: dict) -> bytes:
    """Pickle the work with Ray's cloudpickle (a source defined in the main script travels by value),
    naming the culprit when something can't travel."""
    for what, value in [
        ("source", source),
        *[(f"args[{i}]", a) for i, a in enumerate(args)],
        *[(f"kwargs[{k!r}]", v) for k, v in kwargs.items()],
    ]:
        try:
            ray.cloudpickle.dumps(value)
        except Exception as error:
            raise TypeError(
                f"the feeder's {what} cannot be sent to Ray actors: {type(error).__name__}: {error}"
            ) from None
    return ray.cloudpickle.dumps((source, args, kwargs))
