"""Start, watch and stop the worker processes; own their rings; turn their failures into errors.

The supervisor is the mechanism under `Feeder`: it knows processes, pipes and segments, never arrays.
One poll object covers every worker's pipe and the consumer's wake-up socket; a worker that dies closes
its pipe, so its death wakes that wait at once.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from . import protocol, spawn
from .errors import ElementError, SourceError, WorkerDiedError, WorkerError, describe_exit
from .forkserver import ForkServer
from .ring import Ring, check_shm_space, slot_size_for

_STOP_GRACE_S = 2.0  # for workers to finish the element in hand and exit on STOP
_TERMINATE_GRACE_S = 1.0  # after SIGTERM, before SIGKILL
_EXIT_STATUS_WAIT_S = 5.0  # for a worker whose pipe closed to be reaped


@dataclass(eq=False)
class WorkerHandle:
    """The consumer's view of one worker: its process, pipe, ring and the records it has announced."""

    index: int
    process: subprocess.Popen
    connection: Connection
    ring: Ring | None
    # Messages of the current epoch, oldest first; a worker's failure or exit is queued as its last entry
    # (a WorkerError, or an `Exited`), so the consumer meets it exactly where that worker's next element
    # would have been, after everything it delivered before.
    inbox: deque = field(default_factory=deque)
    gone: bool = False  # failed or exited: its pipe is done with
    ended: bool = False  # this epoch's END has been taken from the inbox
    produced: int = 0  # elements it announced in the current epoch (delivered or queued)
    items: int = 0  # elements delivered over the feeder's life
    bytes: int = 0
    held: int = 0  # slots whose views the user still holds
    credits: list = field(default_factory=list)  # freed slots not yet sent back

    def __post_init__(self) -> None:
        self.readable = protocol.Readable(self.connection)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True)
class Exited:
    """Inbox entry: the worker's process ended with this exit code (None: could not be reaped)."""

    exitcode: int | None


@dataclass(frozen=True)
class WorkerConfig:
    workers: int
    depth: int
    slot_bytes: int | None
    batch_size: int | None
    drop_remainder: bool
    seed: int
    start_method: str


class Supervisor:
    def __init__(self, source: Any, args: tuple, kwargs: dict, config: WorkerConfig) -> None:
        self.config = config
        self._credit_batch = max(1, config.depth // 2)
        self.epoch = 0
        self.overflow = 0
        self.closed = False
        self.handles: list[WorkerHandle] = []
        self.server: ForkServer | None = None
        self._poller: select.poll | None = None
        self._polled: dict[int, Any] = {}
        work = spawn.pickle_work(source, args, kwargs)
        main_spec = spawn.main_module_spec(work)
        rings: list[Ring | None] = [None] * config.workers
        try:
            if config.slot_bytes is not None:
                total = config.workers * config.depth * config.slot_bytes
                check_shm_space(total, total, config.workers, config.depth, config.slot_bytes)
                for index in range(config.workers):  # one at a time, so a failure closes those made
                    rings[index] = Ring.create(config.depth, config.slot_bytes, workers=config.workers)
            configs = [
                {
                    "index": index,
                    "count": config.workers,
                    "seed": config.seed,
                    "depth": config.depth,
                    "batch_size": config.batch_size,
                    "drop_remainder": config.drop_remainder,
                    "ring": None if ring is None else (ring.name, ring.depth, ring.slot_bytes),
                    "parent_pid": os.getpid(),
                    "consumer_pid": os.getpid(),
                }
                for index, ring in enumerate(rings)
            ]
            if config.start_method == "forkserver":
                self.server = ForkServer(work, main_spec)
                started = self.server.fork_all(configs)
            else:
                started = [spawn.launch(work, main_spec, worker_config) for worker_config in configs]
            for index, (process, connection) in enumerate(started):
                self.handles.append(WorkerHandle(index, process, connection, rings[index]))
        except BaseException:
            for ring in rings[len(self.handles) :]:
                if ring is not None:
                    ring.close()
            self.close()
            raise

    # -- epochs --------------------------------------------------------------------------------------

    def start_epoch(self, number: int) -> None:
        """Ask every worker for epoch ``number`` (they start epoch 0 by themselves)."""
        self.epoch = number
        for handle in self.handles:
            handle.ended = False
            handle.produced = 0
            if handle.gone:  # keep its failure: the new epoch meets it
                while handle.inbox and isinstance(handle.inbox[0], bytes):
                    handle.inbox.popleft()
                continue
            for message in handle.inbox:
                self.release(handle, message)
            handle.inbox.clear()
            if number > 0:
                self._send(handle, protocol.epoch(number))
        self.flush_credits()

    def release(self, handle: WorkerHandle, message: bytes) -> None:
        """Give back the slot credit a FILLED or INLINE message holds, if any."""
        tag = message[:1]
        if tag == protocol.FILLED:
            self.credit(handle, protocol.read_filled(message)[0])
        elif tag == protocol.INLINE:
            slot = protocol.read_inline(message)[2]
            if slot != protocol.NO_SLOT:
                self.credit(handle, slot)

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
        try:
            handle.connection.send_bytes(message)
        except OSError:
            pass  # the worker is gone; reading its pipe reports how

    # -- watching ------------------------------------------------------------------------------------

    def wait(self, extra: list, timeout: float | None) -> list:
        """Wait until a worker says something (or dies) or an ``extra`` object is ready; read every worker
        that spoke into its inbox. Returns what was ready: workers' handles and ``extra`` objects."""
        if self._poller is None:
            # One poll object for the feeder's life: building a selector per wait cost more than the wait.
            self._poller = select.poll()
            self._polled = {}
            for item in [*(h for h in self.handles if not h.gone), *extra]:
                fd = item.connection.fileno() if isinstance(item, WorkerHandle) else item.fileno()
                self._poller.register(fd, select.POLLIN)
                self._polled[fd] = item
        milliseconds = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        ready = [self._polled[fd] for fd, _ in self._poller.poll(milliseconds)]
        for item in ready:
            if isinstance(item, WorkerHandle):
                self.read(item)
        return ready

    def _forget(self, handle: WorkerHandle) -> None:
        """The worker failed or exited: stop polling its pipe (a closed pipe is always readable)."""
        handle.gone = True
        if self._poller is not None:
            fd = handle.connection.fileno()
            if self._polled.pop(fd, None) is not None:
                self._poller.unregister(fd)

    def read(self, handle: WorkerHandle) -> None:
        """Take every message waiting in a worker's pipe; queue its failure or exit when that comes."""
        connection = handle.connection
        while not handle.gone:
            try:
                if not handle.readable():
                    return
                message = connection.recv_bytes()
            except (EOFError, OSError):
                self.mark_exited(handle)
                return
            self._dispatch(handle, message)

    def mark_exited(self, handle: WorkerHandle) -> None:
        """The worker's process ended (its pipe closed, or it is seen dead): queue that, once."""
        if not handle.gone:
            self._forget(handle)
            try:
                exitcode = handle.process.wait(_EXIT_STATUS_WAIT_S)
            except subprocess.TimeoutExpired:
                exitcode = None
            handle.inbox.append(Exited(exitcode))

    def _dispatch(self, handle: WorkerHandle, message: bytes) -> None:
        tag = message[:1]
        if tag == protocol.FILLED:
            _, epoch, produced = protocol.read_filled(message)
            self._queue_record(handle, message, epoch, produced)
        elif tag == protocol.INLINE:
            if handle.ring is None:
                self._create_ring(handle, len(message) - protocol.INLINE_HEADER)
            else:
                self.overflow += 1
            epoch, produced, _ = protocol.read_inline(message)
            self._queue_record(handle, message, epoch, produced)
        elif tag == protocol.END:
            if protocol.read_end(message)[0] == self.epoch:
                handle.inbox.append(message)
        elif tag == protocol.ATTACHED:
            if handle.ring is not None:
                handle.ring.unlink()
        elif tag == protocol.FAILED:
            self._forget(handle)
            handle.inbox.append(self._failure(handle, pickle.loads(message[1:])))

    def _queue_record(self, handle: WorkerHandle, message: bytes, epoch: int, produced: int) -> None:
        """Queue a record of the current epoch; give back the slot of one from an abandoned epoch."""
        if epoch == self.epoch:
            handle.inbox.append(message)
            handle.produced = produced
        else:
            self.release(handle, message)

    def _create_ring(self, handle: WorkerHandle, record_bytes: int) -> None:
        slot_bytes = slot_size_for(record_bytes)
        handle.ring = Ring.create(self.config.depth, slot_bytes, workers=self.config.workers)
        self._send(handle, protocol.RING + pickle.dumps((handle.ring.name, handle.ring.depth, slot_bytes)))

    # -- failures ------------------------------------------------------------------------------------

    def _who(self, handle: WorkerHandle) -> str:
        return f"worker {handle.index} (pid {handle.pid})"

    def _failure(self, handle: WorkerHandle, info: dict) -> WorkerError:
        where = f"while producing element {info['element']} of its shard (epoch {info['epoch']})"
        details = dict(worker=handle.index, pid=handle.pid, element=info["element"], epoch=info["epoch"])
        if info["where"] == "element":
            return ElementError(
                f"{self._who(handle)} produced a bad element {where}: {info['message']}", **details
            )
        if info["exit_code"] is not None or info["type"] == "SystemExit":
            error = WorkerDiedError(
                f"{self._who(handle)} exited with code {info['exit_code']}: the source called "
                f"sys.exit({info['exit_code']!r}) {where}",
                **details,
            )
            error.exitcode = info["exit_code"]
            return error
        if info["where"] == "start":
            return WorkerError(
                f"{self._who(handle)} could not start: {info['type']}: {info['message']}\n\n"
                f"Worker traceback:\n{info['traceback']}",
                remote_traceback=info["traceback"],
                **details,
            )
        error = SourceError(
            f"{self._who(handle)} raised {info['type']}: {info['message']} {where}\n\n"
            f"Worker traceback:\n{info['traceback']}",
            remote_traceback=info["traceback"],
            **details,
        )
        error.exc_type = info["type"]
        return error

    def error(self, handle: WorkerHandle, entry: WorkerError | Exited) -> WorkerError:
        """The error for a failure entry met in a worker's inbox."""
        if isinstance(entry, WorkerError):
            return entry
        exitcode = entry.exitcode
        ended = handle.ended or any(isinstance(m, bytes) and m[:1] == protocol.END for m in handle.inbox)
        state = (
            f"after its shard of epoch {self.epoch} ended"
            if ended
            else f"while producing element {handle.produced} of its shard (epoch {self.epoch})"
        )
        how = describe_exit(exitcode)
        if exitcode is None and self.server is not None and self.server.gone:
            server_code = self.server.process.poll()
            how += f": mpfeed's fork server (pid {self.server.process.pid}) {describe_exit(server_code)}"
        error = WorkerDiedError(
            f"{self._who(handle)} {how} {state}",
            worker=handle.index,
            pid=handle.pid,
            element=None if ended else handle.produced,
            epoch=self.epoch,
        )
        error.exitcode = exitcode
        return error

    # -- stopping ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (STOP, then SIGTERM, then SIGKILL, each with a deadline), reap them, and
        release every segment. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self.handles:
            self._send(handle, protocol.STOP)
        _wait_all(self.handles, _STOP_GRACE_S)
        for handle in self.handles:
            if handle.process.poll() is None:
                handle.process.terminate()
        _wait_all(self.handles, _TERMINATE_GRACE_S)
        for handle in self.handles:
            if handle.process.poll() is None:
                handle.process.kill()
            handle.process.wait()
            handle.connection.close()
            handle.inbox.clear()
            if handle.ring is not None:
                handle.ring.close()
        if self.server is not None:
            self.server.close()


def _wait_all(handles: list[WorkerHandle], seconds: float) -> None:
    """Wait for the processes to exit, draining their pipes meanwhile: a worker blocked sending a large
    record could not otherwise read its STOP."""
    deadline = time.monotonic() + seconds
    while True:
        running = [h for h in handles if h.process.poll() is None]
        remaining = deadline - time.monotonic()
        if not running or remaining <= 0:
            return
        readable = []
        for handle in running:
            try:
                while handle.connection.poll(0):
                    handle.connection.recv_bytes()
                readable.append(handle.connection)
            except (EOFError, OSError):
                pass  # its pipe is closed: the process is on its way out
        wait(readable, min(remaining, 0.02))
