"""The messages a worker and the consumer exchange over the worker's pipe, one tag byte each.

A *run* is one start of an epoch (a restart, or a resume, is a new run of the same epoch): every record
carries its run, so records of an abandoned run are recognised and their slots given back.

Worker to consumer, in the order they happen (one pipe per worker keeps them ordered):
    FILLED   slot u32, run u32, key u64
                                       a record waits in that slot; ``key`` is, for a generator source,
                                       the shard's elements up to and including it; for a random-access
                                       source, the sequence number of the task it answers
    INLINE   run u32, key u64, slot u32, record bytes
                                       a record that travels in the pipe: the first one (it sizes the
                                       ring; slot is NO_SLOT) or one too big for a slot (it still holds a
                                       slot's credit, so the consumer never queues more than a ring's worth)
    END      run u32, count u64        the shard's epoch is over after ``count`` elements (generators)
    ATTACHED                           the worker mapped its ring; the name can go
    TIMES    busy f64, blocked f64, idle f64
                                       seconds so far making elements, waiting for a free slot, and
                                       waiting for work (sent every half second or so)
    FAILED   pickled Failure           the source raised, or an element was refused; the worker exits

Consumer to worker:
    CREDIT   slot u32 ...              these slots are free again
    RING     pickled RingSpec          the ring to attach
    EPOCH    run u32, epoch u32, start u64
                                       start epoch ``epoch`` as run ``run``; a generator source's shard
                                       begins at its element ``start`` (a resume), the ones before unsent
    TASK     run u32, then for each task: seq u64, count u32, index u64 x count
                                       random access: for each task, make one record of
                                       ``source[index]`` for its indices (one element, or one batch);
                                       ``seq`` orders the records. One message carries every task the
                                       consumer hands the worker at once: each message wakes the worker
    STOP                               close the source and exit

Consumer to fork server:  FORK + pickled WorkerSetup, then the worker's pipe end as an SCM_RIGHTS fd
Fork server to consumer:  PID pid u32 or REFUSED errno u32 (one per FORK, in order: the worker's pid, or
                          the errno of the fork the kernel refused); EXITED pid u32, exit code i32 (as
                          workers end); FAILED pickled Failure (the server could not start)

The consumer reads every pipe through `mpfeed.channel` (never blocking); the other ends use
`multiprocessing.connection.Connection`, whose framing the channel speaks.
"""

from __future__ import annotations

import select
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

FILLED, INLINE, END, ATTACHED, FAILED, TIMES = b"F", b"I", b"E", b"A", b"X", b"M"
CREDIT, RING, EPOCH, TASK, STOP = b"C", b"R", b"N", b"T", b"S"

_U32 = struct.Struct("<I")
_FILLED = struct.Struct("<IIQ")
_END = struct.Struct("<IQ")
_INLINE = struct.Struct("<IQI")
_EPOCH = struct.Struct("<IIQ")
_TASK_RUN = struct.Struct("<I")
_TASK = struct.Struct("<QI")
_TIMES = struct.Struct("<ddd")
NO_SLOT = 0xFFFFFFFF
FORK, PID, EXITED, REFUSED = b"K", b"P", b"Q", b"D"
_PID = struct.Struct("<I")
_EXIT = struct.Struct("<Ii")


@dataclass(frozen=True)
class RingSpec:
    """Where a worker's ring is: a named POSIX segment, or a memfd that the consumer holds open (its name
    is then ``/proc/<consumer pid>/fd/<fd>`` until the worker has attached; see `mpfeed.ring`)."""

    kind: str  # "posix" or "memfd"
    name: str
    depth: int  # slots in the ring
    slot_bytes: int
    credits: int  # slots the worker may use from the start; the consumer grants the rest when views linger


@dataclass(frozen=True)
class CacheSpec:
    """Where a feeder's cache of loaded samples is (``/proc/<consumer pid>/fd/<fd>``, held open by the
    consumer for the feeder's life; see `mpfeed.cache`), and which of its counter slots is this worker's."""

    name: str
    size: int
    slot: int


@dataclass(frozen=True)
class WorkerSetup:
    """Everything one worker is told at start, besides the pickled source."""

    index: int  # the worker's shard, numbered across every partition
    count: int  # shards in all partitions
    seed: int
    depth: int
    batch_size: int | None
    drop_remainder: bool
    ring: RingSpec | None
    indexed: bool  # a random-access source: the worker makes records of the tasks it is sent
    parent_pid: int  # the process that started it: the consumer, or the fork server (set there)
    consumer_pid: int
    dtypes: Any = None  # a nest of numpy dtypes every element is converted to (see `mpfeed.conform`)
    cache: CacheSpec | None = None  # random access with cache_bytes: the shared cache of loaded samples


@dataclass(frozen=True)
class Failure:
    """Why a worker (or the fork server) is about to exit, as it tells the consumer.

    ``where`` is "start" (importing or unpickling the work), "source" (the user's source raised),
    "element" (an element mpfeed cannot carry) or "worker" (mpfeed's own worker code failed)."""

    where: str
    type: str
    message: str
    traceback: str
    element: int | None  # the element of the shard (generator) or the source's index (random access)
    epoch: int
    exit_code: int | None  # the code of a SystemExit the source raised
    position: int | None = None  # random access: where the element stands in the epoch's order


def pid(number: int) -> bytes:
    return PID + _PID.pack(number)


def read_pid(message: bytes) -> int:
    return _PID.unpack_from(message, 1)[0]


def refused(code: int) -> bytes:
    return REFUSED + _PID.pack(code)


def read_refused(message: bytes) -> int:
    """The errno of the refused fork."""
    return _PID.unpack_from(message, 1)[0]


def exited(number: int, exit_code: int) -> bytes:
    return EXITED + _EXIT.pack(number, exit_code)


def read_exited(message: bytes) -> tuple[int, int]:
    """``(pid, exit_code)``."""
    return _EXIT.unpack_from(message, 1)


def filled(slot: int, run: int, key: int) -> bytes:
    return FILLED + _FILLED.pack(slot, run, key)


def read_filled(message: bytes) -> tuple[int, int, int]:
    """``(slot, run, key)``."""
    return _FILLED.unpack_from(message, 1)


def inline_prefix(run: int, key: int, slot: int) -> bytes:
    return INLINE + _INLINE.pack(run, key, slot)


def read_inline(message: bytes) -> tuple[int, int, int]:
    """``(run, key, slot)``."""
    return _INLINE.unpack_from(message, 1)


INLINE_HEADER = 1 + _INLINE.size  # the record starts this far into an INLINE message


def end(run: int, count: int) -> bytes:
    return END + _END.pack(run, count)


def read_end(message: bytes) -> tuple[int, int]:
    """``(run, count)``."""
    return _END.unpack_from(message, 1)


def times(busy: float, blocked: float, idle: float) -> bytes:
    return TIMES + _TIMES.pack(busy, blocked, idle)


def read_times(message: bytes) -> tuple[float, float, float]:
    """``(busy, blocked, idle)`` seconds."""
    return _TIMES.unpack_from(message, 1)


def credit(slots: list[int]) -> bytes:
    return CREDIT + struct.pack(f"<{len(slots)}I", *slots)


def read_credit(message: bytes) -> tuple[int, ...]:
    return struct.unpack_from(f"<{(len(message) - 1) // 4}I", message, 1)


def epoch(run: int, number: int, start: int = 0) -> bytes:
    return EPOCH + _EPOCH.pack(run, number, start)


def read_epoch(message: bytes) -> tuple[int, int, int]:
    """``(run, epoch, start)``."""
    return _EPOCH.unpack_from(message, 1)


def tasks(run: int, batch: list[tuple[int, list[int]]]) -> bytes:
    """One TASK message for ``batch``, a list of ``(seq, indices)``."""
    parts = [TASK, _TASK_RUN.pack(run)]
    for seq, indices in batch:
        parts.append(_TASK.pack(seq, len(indices)))
        parts.append(struct.pack(f"<{len(indices)}Q", *indices))
    return b"".join(parts)


def read_tasks(message: bytes) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """``(run, [(seq, indices), ...])``."""
    (run,) = _TASK_RUN.unpack_from(message, 1)
    batch = []
    offset = 1 + _TASK_RUN.size
    while offset < len(message):
        seq, count = _TASK.unpack_from(message, offset)
        offset += _TASK.size
        batch.append((seq, struct.unpack_from(f"<{count}Q", message, offset)))
        offset += 8 * count
    return run, batch


class Readable:
    """Whether a connection has something to read, waiting up to ``timeout`` seconds. One persistent poll
    object per connection: `Connection.poll` builds a new selector on every call, which cost more than
    the rest of handling a small message."""

    def __init__(self, connection: Connection) -> None:
        self._poll = select.poll()
        self._poll.register(connection.fileno(), select.POLLIN)

    def __call__(self, timeout: float = 0.0) -> bool:
        return bool(self._poll.poll(max(0, int(timeout * 1000 + 0.999))))
