"""Work for random-access sources: the epoch's order, cut into tasks, handed to whichever worker has room.

The order of an epoch is ``range(len(source))`` or, with shuffle, a permutation drawn from ``(seed,
epoch)`` alone; a partition takes every ``count``-th position of it from ``index``. Task ``k`` is the
partition's positions ``[k * batch, (k + 1) * batch)``: one element, or the consecutive elements of one
batch. Which worker makes a task never changes what is delivered, only when.

A worker holds at most ``lookahead`` tasks it has not answered yet, and never more than its ring can take
(answered records wait in slots): so a slow element holds up only the few tasks queued behind it, and
memory stays fixed. Ordered delivery waits for the lowest task not yet delivered; the reorder window is
every worker's ring. First-ready tops a worker up only once half of what it may hold is free, so that
tasks travel several to a message: each message wakes the worker, and waking it costs more than the
message. Policies only: the supervisor sends what `Dispatcher.assign` decides, a message per worker
for each `assign`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from .progress import TaskProgress
from .supervisor import Supervisor, WorkerHandle

_MUCH_LATER = 1.5  # ordered: a task waits rather than go to a worker expected to finish it this much later


@dataclass(frozen=True)
class EpochOrder:
    """Which source indices an epoch serves, in what order, and how they group into tasks."""

    length: int
    seed: int
    shuffle: bool
    partition: tuple[int, int]
    batch_size: int | None
    drop_remainder: bool
    remainder: str = "pad"

    def positions(self, epoch: int) -> np.ndarray | range:
        """The source indices this partition serves in ``epoch``, in order: a range without shuffle (no
        memory, whatever the length), else a permutation of 4 bytes an element (8 past 2**31).

        Parts are equal by default (``remainder="pad"``): the order is padded with its own first elements,
        as PyTorch's DistributedSampler does, so every part serves ``ceil(length / count)``; ``"drop"``
        leaves out the order's last ``length % count``; ``"uneven"`` serves every element exactly once, in
        parts that differ by one."""
        index, count = self.partition
        length = self.length
        stop = self._stop()  # past the length when padded: positions there wrap to the order's start
        if not self.shuffle:
            if stop <= length:
                return range(index, stop, count)
            return np.arange(index, stop, count, dtype=np.int64) % length
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        dtype = np.int32 if length < 2**31 else np.int64
        order = rng.permutation(np.arange(length, dtype=dtype))
        if stop <= length:
            return order[index:stop:count]
        return order[np.arange(index, stop, count, dtype=np.int64) % length]

    def _stop(self) -> int:
        """Where the dealing of the order into parts stops."""
        length, count = self.length, self.partition[1]
        if self.remainder == "uneven" or length % count == 0:
            return length
        per = -(-length // count) if self.remainder == "pad" else length // count
        return per * count

    def records(self) -> int:
        """Records (tasks) of each epoch of this partition, without making its order."""
        index, count = self.partition
        return self.tasks(len(range(index, self._stop(), count)))

    def tasks(self, served: int) -> int:
        """How many tasks (records) an epoch of ``served`` positions makes."""
        batch = self.batch_size or 1
        return served // batch if self.drop_remainder else -(-served // batch)


class Dispatcher:
    """Hands an epoch's tasks to workers and remembers what was delivered, for ordering and resume."""

    def __init__(self, order: EpochOrder, depth: int, lookahead: int, ordered: bool) -> None:
        self.order = order
        self.ordered = ordered
        self.active: int | None = None  # tasks go to the first ``active`` workers (all when None)
        self.depth = depth
        self.lookahead = lookahead
        self.start(0)

    def start(self, epoch: int, position: int = 0, done: frozenset[int] = frozenset()) -> None:
        """Begin ``epoch`` with tasks below ``position`` and those in ``done`` already delivered."""
        self.epoch = epoch
        self.positions = self.order.positions(epoch)
        self.count = self.order.tasks(len(self.positions))
        self.base_done = done
        self.next_task = position  # the lowest task not yet sent
        self.assigned: dict[int, int] = {}  # task -> worker index, until delivered
        self.progress = TaskProgress(position, done)
        self.remaining = self.count - position - len(done)
        while self.next_task in done:
            self.next_task += 1

    @property
    def next_delivery(self) -> int:
        """Ordered: the lowest task not yet delivered."""
        return self.progress.low

    def indices(self, task: int) -> list[int]:
        batch = self.order.batch_size or 1
        return [int(i) for i in self.positions[task * batch : (task + 1) * batch]]

    def assign(self, supervisor: Supervisor) -> None:
        """Send tasks to the workers with room, every worker's in one message. Ordered, each task goes to
        the worker expected to finish it first, by its measured pace, and waits when that worker has no
        room: a slow worker then takes a share that matches its pace, instead of holding up the order.
        First-ready, to the least busy."""
        handles = [h for h in supervisor.handles[: self.active] if not h.gone]
        if self.next_task >= self.count or not handles:
            return
        try:
            if self.ordered:
                self._assign_ordered(supervisor, handles)
            else:
                self._assign_first_ready(supervisor, handles)
        finally:
            supervisor.flush_tasks()

    def _assign_ordered(self, supervisor: Supervisor, handles: list[WorkerHandle]) -> None:
        while self.next_task < self.count:
            handle = self._fastest_with_room(supervisor, handles)
            if handle is None:
                return
            self._send(supervisor, handle)

    def _assign_first_ready(self, supervisor: Supervisor, handles: list[WorkerHandle]) -> None:
        """Least busy first, a worker gets tasks once it has as many free places as taken ones, and then
        as many as it may hold, in one message: it wakes for every other task instead of every one."""
        depth, lookahead = self.depth, self.lookahead
        hungry = []
        for handle in handles:  # live workers: their inboxes hold records only (see `_load`)
            pending = handle.pending_tasks
            load = pending + len(handle.inbox)
            free = min((handle.granted or depth) - load, lookahead - pending)
            if free >= load and free > 0:
                hungry.append((load, handle.index, free, handle))
        hungry.sort()
        for _, _, free, handle in hungry:
            for _ in range(free):
                if self.next_task >= self.count:
                    return
                self._send(supervisor, handle)

    def _send(self, supervisor: Supervisor, handle: WorkerHandle) -> None:
        task = self.next_task
        supervisor.send_task(handle, task, self.indices(task))
        self.assigned[task] = handle.index
        self.next_task += 1
        while self.next_task in self.base_done:
            self.next_task += 1

    def _fastest_with_room(self, supervisor: Supervisor, handles: list[WorkerHandle]) -> WorkerHandle | None:
        """The worker expected to finish a new task first, by its pace. When its ring is full of records
        that wait for the head of the line, the reorder window grows into the ring's spare slots; once
        those are gone, the task waits for it, unless another worker with room is about as fast."""
        paces = [h.service_s for h in handles if h.service_s is not None]
        usual = sum(paces) / len(paces) if paces else 1.0
        finish = {h.index: (h.pending_tasks + 1) * (h.service_s or usual) for h in handles}
        free = [h for h in handles if h.pending_tasks < self.lookahead]
        if not free:
            return None
        fastest = min(free, key=lambda h: finish[h.index])
        if _load(fastest) < _room(fastest, self.depth) or (fastest.granted and supervisor.grant(fastest)):
            return fastest
        ready = [h for h in free if _load(h) < _room(h, self.depth)]
        if not ready:
            return None
        best = min(ready, key=lambda h: finish[h.index])
        if finish[best.index] > _MUCH_LATER * finish[fastest.index]:
            return None
        return best

    def delivered(self, task: int) -> None:
        self.assigned.pop(task, None)
        self.progress.delivered(task)
        self.remaining -= 1


def _room(handle: WorkerHandle, depth: int) -> int:
    """The slots the worker may use (its first record, which sizes its ring, comes before any)."""
    return handle.granted or depth


def _load(handle: WorkerHandle) -> int:
    """Tasks the worker still holds plus records of it waiting in the consumer: slots it needs. (A
    random-access worker's inbox holds only records, but for a failure or exit, which comes last.)"""
    return handle.pending_tasks + len(handle.inbox) - handle.failed


def encode_done(position: int, done: frozenset[int]) -> str:
    """Tasks delivered beyond ``position`` as a compact bitmask (unordered delivery leaves a few)."""
    if not done:
        return ""
    bits = bytearray((max(done) - position) // 8 + 1)
    for task in done:
        offset = task - position - 1
        bits[offset // 8] |= 1 << (offset % 8)
    return base64.b64encode(bytes(bits)).decode("ascii")


def decode_done(position: int, text: str) -> frozenset[int]:
    bits = base64.b64decode(text.encode("ascii"), validate=True) if text else b""
    return frozenset(
        position + 1 + 8 * byte + bit
        for byte, value in enumerate(bits)
        for bit in range(8)
        if value >> bit & 1
    )
