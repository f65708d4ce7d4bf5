"""Decode once: the samples a random-access source's ``load(i)`` made, kept in memory that every worker
of one feeder maps, so that later epochs only run ``augment(sample, rng)`` on them, read in place.

One anonymous segment (``memfd_create``: no name in ``/dev/shm``, ever) of exactly ``cache_bytes``, made by
the supervisor, its one owner, which keeps its fd open for the feeder's life so that workers started later
(``workers="auto"``) open it too, as ``/proc/<consumer pid>/fd/<fd>``. Nothing can outlive the processes
that map it, not even after a SIGKILL of the whole group. Pages are taken only as samples are written::

    header    64 bytes        magic | entries | counter slots | data start | size | next free byte
    counters  slots x 24      per worker, written by that worker alone: hits | misses | load ns
    index     entries x 24    per element of the source: state | offset | record bytes
    data      records         one `mpfeed.layout` record per stored sample, 64-byte aligned

Policy: no eviction (first come, kept). Space is handed out by a bump pointer and never reused, so an
entry, once READY, never changes while any view reads it; a sample that does not fit is marked REFUSED
with its size (for `report`) and loaded again every epoch.

Concurrency, with POSIX record locks on the segment (``fcntl``), which the kernel drops when their holder
dies, so a SIGKILLed worker can wedge nothing:

- byte 0 guards the header and every state word, for a few memory operations at a time;
- a writer holds its entry's own byte while it writes the record: it reserves (state WRITING), writes
  without the lock, then publishes (state READY, under byte 0). A reader uses an entry only once it has
  seen it READY under byte 0 (the lock orders the record's bytes before the state word). Whoever finds an
  entry WRITING and can take its byte knows the writer died, and writes it again itself.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ShmSpaceError
from .layout import ALIGN, Decoder, Encoder, align, flatten
from .protocol import CacheSpec
from .ring import create_memfd, memfd_supported, memory_available

EMPTY, WRITING, READY, REFUSED = 0, 1, 2, 3
_MAGIC = 0x6D7066646361636B  # "mpfdcack"
_HEADER_WORDS = 8
_MAGIC_W, _ENTRIES_W, _SLOTS_W, _DATA_W, _SIZE_W, _NEXT_W = range(6)
_COUNTER_WORDS = 3  # hits, misses, nanoseconds spent in load()
_ENTRY_WORDS = 3  # state, offset, record bytes
_LABEL = "mpfeed-cache-"
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 1) | getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 16 << 20, 64 << 20


def auto_bytes() -> int:
    """What ``cache_bytes="auto"`` picks: a quarter of the memory available when the feeder starts, the
    tightest of the system's and every cgroup limit's (the rings' default ``shm_budget`` takes another
    quarter). Pages are taken only as samples are stored, so an unfilled cache costs nothing."""
    return memory_available()[0] // 4


def overhead_bytes(entries: int, slots: int) -> int:
    """Bytes the cache takes before its first sample: header, counters and index."""
    return align(8 * (_HEADER_WORDS + _COUNTER_WORDS * slots + _ENTRY_WORDS * entries))


@dataclass(frozen=True)
class CacheSummary:
    """What the cache holds and has done, as the consumer reads it."""

    budget: int
    """``cache_bytes``: the segment's size, which nothing grows."""
    used: int
    """Bytes in use: header, counters and index, and the records stored (or being written)."""
    entries: int
    """Samples stored."""
    held_bytes: int
    """Bytes of the stored samples' records."""
    refused: int
    """Samples that did not fit (loaded again each epoch)."""
    refused_bytes: int
    """Bytes those would take."""
    hits: int
    """Samples served from the cache."""
    misses: int
    """Samples loaded (``load(i)`` called)."""
    load_s: float
    """Seconds the workers spent in ``load(i)``."""
    length: int
    """Elements of the source (the index has one entry for each)."""


class Cache:
    """The shared segment, mapped in this process: the supervisor's (`create`) or a worker's (`attach`)."""

    def __init__(self, fd: int, mapping: mmap.mmap, name: str, slot: int | None) -> None:
        self.fd: int | None = fd
        self.name = name
        self.slot = slot  # a worker's counter slot; None in the supervisor
        self._mmap = mapping
        words: Any = np.frombuffer(mapping, dtype=np.uint64, count=_HEADER_WORDS)
        self._header = words
        if int(words[_MAGIC_W]) != _MAGIC:
            raise ValueError(f"{name} is not an mpfeed cache")
        self.length = int(words[_ENTRIES_W])
        self.slots = int(words[_SLOTS_W])
        self.size = int(words[_SIZE_W])
        self.data_start = int(words[_DATA_W])
        offset = 8 * _HEADER_WORDS
        self._counters: Any = np.frombuffer(mapping, np.uint64, self.slots * _COUNTER_WORDS, offset).reshape(
            self.slots, _COUNTER_WORDS
        )
        offset += 8 * _COUNTER_WORDS * self.slots
        self._index: Any = np.frombuffer(mapping, np.uint64, self.length * _ENTRY_WORDS, offset).reshape(
            self.length, _ENTRY_WORDS
        )
        self._index_at = offset
        self._array: Any = np.frombuffer(mapping, dtype=np.uint8)
        self._readonly = memoryview(mapping).toreadonly()  # views made from it cannot become writable
        self._seen = np.zeros(self.length, dtype=bool)  # entries this process has seen READY
        self._encoder = Encoder()
        self._decoder = Decoder()
        self._hits = self._misses = self._load_ns = 0  # a worker's own counters, copied to its slot
        self._final = CacheSummary(self.size, 0, 0, 0, 0, 0, 0, 0, 0.0, self.length)  # once closed

    # -- making and opening ---------------------------------------------------------------------------

    @classmethod
    def create(cls, budget: int, length: int, slots: int) -> Cache:
        """A new, empty cache of ``budget`` bytes (rounded down to whole pages) for a source of ``length``
        elements and up to ``slots`` workers (supervisor side). Refuses, with `ShmSpaceError`, a budget
        that the memory available (system-wide and under every cgroup limit) could not hold once filled."""
        if not memfd_supported():
            raise OSError(errno.ENOSYS, "cache_bytes needs Linux's memfd_create (Linux 3.17 or later)")
        budget -= budget % mmap.PAGESIZE  # whole pages, so that even resident memory stays within it
        data_start = overhead_bytes(length, slots)
        if budget < data_start + ALIGN:
            raise ValueError(
                f"cache_bytes={budget:,} is too small: the cache's index of a source of {length:,} elements "
                f"for up to {slots} workers takes {data_start:,} bytes before any sample; give it more, or "
                f"no cache"
            )
        available, where = memory_available()
        if budget > available:
            raise ShmSpaceError(
                errno.ENOMEM,
                f"cache_bytes={budget:,} is more than the {available:,} bytes of memory available ({where}): "
                f"a full cache would wake the OOM killer. Fixes: a smaller cache_bytes, cache_bytes='auto' "
                f"(a quarter of what is available), or more memory (docker run --memory=...)",
            )
        fd, _ = create_memfd(_LABEL)
        try:
            os.ftruncate(fd, budget)  # no pages yet: they come as samples are written
            fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)  # nobody can shrink it, so no mapping can SIGBUS
            mapping = mmap.mmap(fd, budget)
            header: Any = np.frombuffer(mapping, dtype=np.uint64, count=_HEADER_WORDS)
            header[_ENTRIES_W], header[_SLOTS_W], header[_DATA_W] = length, slots, data_start
            header[_SIZE_W], header[_NEXT_W] = budget, data_start
            header[_MAGIC_W] = _MAGIC
            del header
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mapping, f"/proc/{os.getpid()}/fd/{fd}", None)

    def spec(self, slot: int) -> CacheSpec:
        """What worker ``slot`` needs to open the cache; ``slot`` numbers its counters."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"the cache has counters for {self.slots} workers, not for worker {slot}")
        return CacheSpec(self.name, self.size, slot)

    @classmethod
    def attach(cls, spec: CacheSpec) -> Cache:
        """Open and map the supervisor's cache (worker side), and set this process's malloc to keep freed
        memory (`keep_freed_memory`). The fd stays open: its record locks are this worker's part in the
        cache's concurrency."""
        try:
            fd = os.open(spec.name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "the feeder's cache was closed", spec.name) from None
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{_LABEL}"):
                raise FileNotFoundError(errno.ENOENT, "the feeder's cache was closed", spec.name)
            mapping = mmap.mmap(fd, spec.size)
            cache = cls(fd, mapping, spec.name, spec.slot)
        except BaseException:
            os.close(fd)
            raise
        keep_freed_memory()
        return cache

    def close(self) -> None:
        """Close the fd and unmap (unless views still hold the mapping: the last one unmaps it), keeping
        the last `summary`. Idempotent; the memory is freed once no process maps it."""
        if self._index is not None:
            self._final = self.summary()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._header = self._counters = self._index = self._array = None
        try:
            self._readonly.release()
            self._mmap.close()
        except BufferError:
            pass

    # -- worker side ----------------------------------------------------------------------------------

    def get(self, index: int) -> Any | None:
        """The stored sample ``index`` as a nest of read-only views into the cache, or None."""
        if not self._seen[index]:
            if self._index[index, 0] != READY:  # a miss needs no lock: put() looks again under it
                return None
            with self._locked():  # orders the record's bytes after the state word seen READY
                self._seen[index] = self._index[index, 0] == READY
        _, offset, nbytes = (int(word) for word in self._index[index])
        base = np.frombuffer(self._readonly, dtype=np.uint8, count=nbytes, offset=offset)
        return self._decoder.decode(base)[0]

    def put(self, index: int, sample: Any) -> Any | None:
        """Store ``sample`` as entry ``index`` and return it as `get` would; None when it is not stored
        (no room, or another worker has it in hand). `TypeError` for a sample mpfeed cannot carry."""
        record = self._prepare(index, sample)
        nbytes = record.nbytes
        with self._locked():
            state, offset, reserved = (int(word) for word in self._index[index])
            if state == READY:
                self._seen[index] = True
            elif state == REFUSED:
                return None
            elif state == WRITING and not self._lock_entry(index):
                return None  # a live worker writes it
            if state == READY:
                return self.get(index)
            if state == EMPTY:
                self._lock_entry(index)
            if state == EMPTY or reserved < nbytes:  # new, or taken over from a dead writer too small
                start = align(int(self._header[_NEXT_W]))
                if start + nbytes > self.size:
                    self._index[index] = (REFUSED, 0, nbytes)
                    self._unlock_entry(index)
                    return None
                self._header[_NEXT_W] = start + nbytes
                offset = start
            self._index[index, 1], self._index[index, 2] = offset, nbytes
            self._index[index, 0] = WRITING
        try:
            if not self._reserve(offset, nbytes):
                with self._locked():
                    self._index[index] = (REFUSED, 0, nbytes)
                return None
            record.write(self._array[offset : offset + nbytes])
            with self._locked():
                self._index[index, 0] = READY
        finally:
            self._unlock_entry(index)  # on an exception it stays WRITING, and the next writer takes it over
        self._seen[index] = True
        return self.get(index)

    def _reserve(self, offset: int, nbytes: int) -> bool:
        """Give the record's pages memory before writing it: a shortage refuses the sample here instead
        of failing the write, and one call costs less than a page fault per page (about a quarter less
        for a 150 KB record, measured here)."""
        assert self.fd is not None, "the cache is closed"
        try:
            os.posix_fallocate(self.fd, offset, nbytes)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.ENOMEM):
                return False
            raise
        return True

    def count(self, hit: bool, load_s: float = 0.0) -> None:
        """Count a sample served from the cache (``hit``) or loaded, in this worker's own counters."""
        assert self.slot is not None, "only workers count"
        if hit:
            self._hits += 1
        else:
            self._misses += 1
            self._load_ns += int(load_s * 1e9)
        self._counters[self.slot] = (self._hits, self._misses, self._load_ns)

    def _prepare(self, index: int, sample: Any):
        try:
            return self._encoder.prepare([flatten(sample)], index, False)
        except ValueError:  # another structure than the samples before: records carry their own
            self._encoder = Encoder()
            return self._encoder.prepare([flatten(sample)], index, False)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Held for a few memory operations, and dropped by the kernel if its holder dies: a bounded wait.
        assert self.fd is not None, "the cache is closed"
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def _lock_entry(self, index: int) -> bool:
        """Take entry ``index``'s write lock without waiting; False while a live process holds it."""
        assert self.fd is not None, "the cache is closed"
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._index_at + 8 * _ENTRY_WORDS * index)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _unlock_entry(self, index: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._index_at + 8 * _ENTRY_WORDS * index)

    # -- consumer side --------------------------------------------------------------------------------

    def summary(self) -> CacheSummary:
        """The cache's figures now (a snapshot: workers may be writing)."""
        if self._index is None:
            return self._final
        states, sizes = self._index[:, 0], self._index[:, 2]
        ready, refused = states == READY, states == REFUSED
        counters = self._counters.sum(axis=0)
        return CacheSummary(
            budget=self.size,
            used=int(self._header[_NEXT_W]),
            entries=int(ready.sum()),
            held_bytes=int(sizes[ready].sum()),
            refused=int(refused.sum()),
            refused_bytes=int(sizes[refused].sum()),
            hits=int(counters[0]),
            misses=int(counters[1]),
            load_s=int(counters[2]) / 1e9,
            length=self.length,
        )


def keep_freed_memory() -> None:
    """In a worker with a cache, make glibc's malloc keep freed memory for the next sample instead of
    handing it back to the kernel and faulting in fresh pages for every ``load`` (its dynamic mmap
    threshold did so once samples went to the cache: decoding the bench's JPEG took 2.8 ms of CPU instead
    of 1.7 ms here). Allocations under 16 MiB come from the heap, and up to 64 MiB free at its top stay.
    A no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def serve(source: Any, cache: Cache | None, index: int, rng: np.random.Generator) -> Any:
    """``source.augment(source.load(index), rng)``, with ``load`` skipped when the cache holds the sample
    (then ``augment`` reads it in place, as read-only views)."""
    if cache is None:
        return source.augment(source.load(index), rng)
    sample = cache.get(index)
    if sample is not None:
        cache.count(hit=True)
        return source.augment(sample, rng)
    began = time.perf_counter()
    sample = source.load(index)
    cache.count(hit=False, load_s=time.perf_counter() - began)
    try:
        stored = cache.put(index, sample)
    except TypeError as error:
        raise TypeError(
            f"load({index}) returned a sample the cache cannot hold: {error}. Return numpy arrays, "
            "scalars, bytes or str (in tuples, lists or dicts) from load(), or drop cache_bytes"
        ) from None
    return source.augment(sample if stored is None else stored, rng)


def splits(source: Any) -> bool:
    """Whether a random-access source splits loading from augmenting: ``load(i)`` and
    ``augment(sample, rng)``, which the feeder then calls instead of ``source[i]``."""
    return callable(getattr(source, "load", None)) and callable(getattr(source, "augment", None))
