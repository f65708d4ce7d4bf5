"""The messages a worker and the consumer exchange over the worker's pipe, one tag byte each.

Worker to consumer, in the order they happen (one pipe per worker keeps them ordered):
    FILLED   slot u32, epoch u32, produced u64
                                       a record waits in that slot; ``produced`` counts the shard's
                                       elements up to and including it
    INLINE   epoch u32, produced u64, slot u32, record bytes
                                       a record that travels in the pipe: the first one (it sizes the
                                       ring; slot is NO_SLOT) or one too big for a slot (it still holds a
                                       slot's credit, so the consumer never queues more than a ring's worth)
    END      epoch u32, count u64      the shard's epoch is over after ``count`` elements
    ATTACHED                           the worker mapped its ring; the name can go
    FAILED   pickled dict              the source raised, or an element was refused; the worker exits

Consumer to worker:
    CREDIT   slot u32 ...              these slots are free again
    RING     pickled (name, depth, slot_bytes)
    EPOCH    epoch u32                 start (or restart at) this epoch
    STOP                               close the source and exit
"""

from __future__ import annotations

import select
import struct
from multiprocessing.connection import Connection

FILLED, INLINE, END, ATTACHED, FAILED = b"F", b"I", b"E", b"A", b"X"
CREDIT, RING, EPOCH, STOP = b"C", b"R", b"N", b"S"

_U32 = struct.Struct("<I")
_FILLED = struct.Struct("<IIQ")
_END = struct.Struct("<IQ")
_INLINE = struct.Struct("<IQI")
NO_SLOT = 0xFFFFFFFF


def filled(slot: int, epoch: int, produced: int) -> bytes:
    return FILLED + _FILLED.pack(slot, epoch, produced)


def read_filled(message: bytes) -> tuple[int, int, int]:
    """``(slot, epoch, produced)``."""
    return _FILLED.unpack_from(message, 1)


def inline_prefix(epoch: int, produced: int, slot: int) -> bytes:
    return INLINE + _INLINE.pack(epoch, produced, slot)


def read_inline(message: bytes) -> tuple[int, int, int]:
    """``(epoch, produced, slot)``."""
    return _INLINE.unpack_from(message, 1)


INLINE_HEADER = 1 + _INLINE.size  # the record starts this far into an INLINE message


def end(epoch: int, count: int) -> bytes:
    return END + _END.pack(epoch, count)


def read_end(message: bytes) -> tuple[int, int]:
    """``(epoch, count)``."""
    return _END.unpack_from(message, 1)


def credit(slots: list[int]) -> bytes:
    return CREDIT + struct.pack(f"<{len(slots)}I", *slots)


def read_credit(message: bytes) -> tuple[int, ...]:
    return struct.unpack_from(f"<{(len(message) - 1) // 4}I", message, 1)


def epoch(number: int) -> bytes:
    return EPOCH + _U32.pack(number)


def read_epoch(message: bytes) -> int:
    """The number after the tag of an EPOCH message."""
    return _U32.unpack_from(message, 1)[0]


class Readable:
    """Whether a connection has something to read, waiting up to ``timeout`` seconds. One persistent poll
    object per connection: `Connection.poll` builds a new selector on every call, which cost more than
    the rest of handling a small message."""

    def __init__(self, connection: Connection) -> None:
        self._poll = select.poll()
        self._poll.register(connection.fileno(), select.POLLIN)

    def __call__(self, timeout: float = 0.0) -> bool:
        return bool(self._poll.poll(max(0, int(timeout * 1000 + 0.999))))
