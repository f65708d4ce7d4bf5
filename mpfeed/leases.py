"""Views and their lifetimes: a record's slot goes back to its worker only when the last view into it dies.

Every slot is read through its own base array, and a weak reference on that base array queues the slot
for release when the array is collected (TensorFlow keeps the array alive for as long as a tensor aliases
it). Releases may come from any thread (the garbage collector's, TensorFlow's); only the consumer, under
the feeder's lock, turns them into credits. When the user holds all but one slot of a ring, the next
record from that ring is copied out instead, so holding everything never deadlocks.
"""

from __future__ import annotations

import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .layout import Decoder, aligned_empty
from .supervisor import Record, Supervisor, WorkerHandle


class Releases:
    """Slots whose views died, queued from any thread for the consumer. A byte on a socket wakes the
    consumer while it waits (``waiting``); a release at any other time only queues, since the consumer
    looks at the queue before it waits. `wake` wakes it for any other reason (close)."""

    def __init__(self) -> None:
        self.slots: deque = deque()
        self.waiting = False
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False

    def put(self, key: tuple[int, int]) -> None:
        # Append, then read the flag: the consumer sets the flag, then reads the queue, so one of the two
        # always sees the other.
        self.slots.append(key)
        if self.waiting:
            self.wake()

    def wake(self) -> None:
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

    def pending(self, index: int) -> int:
        """Released slots of worker ``index`` not yet credited (a snapshot, from any thread)."""
        return sum(1 for worker, _ in list(self.slots) if worker == index)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.reader.close()
            self._writer.close()


class Leases:
    """The slots whose views are out, and the decoding that hands a record out as views or as a copy."""

    def __init__(self, releases: Releases) -> None:
        self.releases = releases
        self.decoder = Decoder()
        self.copies = 0  # records copied because the user held all the other slots of their ring
        self._leases: dict[tuple[int, int], weakref.ref] = {}

    def open(self, supervisor: Supervisor, handle: WorkerHandle, record: Record, copy_below: int) -> Any:
        """Decode one record into the element the user gets; count it as delivered."""
        if record.shared is not None:  # a Ray object: its views keep it alive, no slot to give back
            base = np.frombuffer(memoryview(record.shared).toreadonly(), dtype=np.uint8)
            element, _, count, nbytes = self.decoder.decode(base)
            supervisor.release(handle, record)
        elif record.inline is not None:
            base = readonly_copy(record.inline)
            element, _, count, nbytes = self.decoder.decode(base)
            supervisor.release(handle, record)
        else:
            slot, ring = record.slot, handle.ring
            assert slot is not None and ring is not None, "a record in a slot has a ring"
            base = ring.slot_view(slot)
            record_bytes = Decoder.header(base)[5]
            # When every other slot of this ring is held, copy: otherwise the worker could never write again.
            # When every other slot the worker may use is held, grant it another, or copy: otherwise it could
            # never write again.
            ring_full = handle.held >= handle.granted - 1 and not supervisor.grant(handle)
            copied = ring_full or record_bytes <= copy_below
            if copied:
                base = readonly_copy(base[:record_bytes])
                self.copies += ring_full
            element, views, count, nbytes = self.decoder.decode(base)
            if views and not copied:
                key = (handle.index, slot)
                self._leases[key] = weakref.ref(base, _release_callback(self.releases, key))
                handle.held += 1
            else:
                supervisor.credit(handle, slot)
        handle.items += count or 1
        handle.bytes += nbytes
        return element

    def collect(self, supervisor: Supervisor) -> None:
        """Credit the slots whose views died."""
        slots = self.releases.slots
        handles = supervisor.handles
        while slots:
            key = slots[0]
            if self._leases.pop(key, None) is not None:
                handle = handles[key[0]]
                handle.held -= 1
                supervisor.credit(handle, key[1])
            slots.popleft()

    def forget(self) -> None:
        """The feeder stopped: views already out stay valid, but their slots go nowhere."""
        self._leases.clear()


def _release_callback(releases: Releases, key: tuple[int, int]) -> Callable[[Any], None]:
    def release(_weakref: Any) -> None:
        releases.put(key)

    return release


def readonly_copy(data) -> np.ndarray:
    """A 64-byte-aligned copy of a record that stays read-only, like views of a slot."""
    copy = aligned_empty(len(data))
    copy[:] = np.frombuffer(data, dtype=np.uint8)
    return np.frombuffer(copy.data.toreadonly(), dtype=np.uint8)
