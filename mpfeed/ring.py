"""One shared-memory ring: a POSIX segment cut into ``depth`` slots of ``slot_bytes`` each.

The supervisor creates a ring; its one worker attaches to it by name; then the name is removed from
``/dev/shm`` (by both sides, whichever comes first) so that no crash, not even a SIGKILL of the whole
process group, can leave it behind: the memory lives exactly as long as a process maps it.

We use ``_posixshmem`` and ``mmap`` directly rather than `multiprocessing.shared_memory.SharedMemory`:
SharedMemory registers every attach with the resource tracker (CPython gh-82300, before 3.13) and its
``close()`` raises `BufferError` while views exist. Here the mapping is freed by the last view that holds it.

Free slots travel as credits over the worker's pipe (see `mpfeed.protocol`), so the ring needs no
semaphores: a worker writes only into a slot it holds a credit for, and the consumer returns the credit
when the last view of that slot dies.
"""

from __future__ import annotations

import _posixshmem
import errno
import mmap
import os

import numpy as np

from .errors import ShmSpaceError
from .layout import ALIGN

SHM_DIR = "/dev/shm"
NAME_PREFIX = "mpfeed-"
_MIN_SLOT_BYTES = 4096


def slot_size_for(record_bytes: int) -> int:
    """A slot size for records like this one: a quarter of headroom, rounded up to whole pages."""
    wanted = max(record_bytes + record_bytes // 4, _MIN_SLOT_BYTES)
    return -(-wanted // mmap.PAGESIZE) * mmap.PAGESIZE


def shm_free_bytes() -> int | None:
    """Bytes free in ``/dev/shm``, or None where it cannot be read."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def check_shm_space(needed: int, total: int, workers: int, depth: int, slot_bytes: int) -> None:
    """Refuse with a clear message when ``/dev/shm`` cannot hold ``needed`` more bytes."""
    free = shm_free_bytes()
    if free is not None and needed > free:
        raise ShmSpaceError(errno.ENOSPC, _space_message(needed, free, total, workers, depth, slot_bytes))


def _space_message(needed: int, free: int, total: int, workers: int, depth: int, slot_bytes: int) -> str:
    return (
        f"mpfeed needs {needed:,} bytes of shared memory in {SHM_DIR} but only {free:,} are free "
        f"(the whole feeder needs {total:,} = {workers} workers x depth {depth} "
        f"x slot_bytes {slot_bytes:,}). "
        f"Fixes: give the container more shared memory (docker run --shm-size=1g ...), "
        f"use fewer workers or a smaller depth, or a smaller slot_bytes."
    )


class Ring:
    """A mapped ring segment: slot addressing, and the one name it may still have in ``/dev/shm``."""

    def __init__(self, name: str, depth: int, slot_bytes: int, mapping: mmap.mmap, named: bool) -> None:
        self.name = name
        self.depth = depth
        self.slot_bytes = slot_bytes
        self._mmap = mapping
        self._named = named
        self._array = np.frombuffer(mapping, dtype=np.uint8)
        # Views built on a read-only memoryview cannot be made writable again (on the mmap they could).
        self._readonly = memoryview(mapping).toreadonly()

    @classmethod
    def create(cls, depth: int, slot_bytes: int, *, workers: int = 1) -> Ring:
        """Create and reserve a new segment (supervisor side). Reserving now turns a later SIGBUS into
        a clear `ShmSpaceError` here."""
        if slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a multiple of {ALIGN}, got {slot_bytes}")
        size = depth * slot_bytes
        check_shm_space(size, size * workers, workers, depth, slot_bytes)
        name = f"/{NAME_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                _posixshmem.shm_unlink(name)
                if error.errno in (errno.ENOSPC, errno.ENOMEM):
                    free = shm_free_bytes() or 0
                    message = _space_message(size, free, size * workers, workers, depth, slot_bytes)
                    raise ShmSpaceError(error.errno, message) from None
                raise
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, depth, slot_bytes, mapping, named=True)

    @classmethod
    def attach(cls, name: str, depth: int, slot_bytes: int) -> Ring:
        """Map an existing segment (worker side) and remove its name: nothing needs it any more."""
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            mapping = mmap.mmap(fd, depth * slot_bytes)
        finally:
            os.close(fd)
        ring = cls(name, depth, slot_bytes, mapping, named=True)
        ring.unlink()
        return ring

    def slot(self, index: int) -> np.ndarray:
        """Slot ``index`` as a writable uint8 array (worker side)."""
        start = index * self.slot_bytes
        return self._array[start : start + self.slot_bytes]

    def slot_view(self, index: int) -> np.ndarray:
        """Slot ``index`` as a new read-only uint8 array (consumer side); views made from it keep it alive."""
        start = index * self.slot_bytes
        return np.frombuffer(self._readonly, dtype=np.uint8, count=self.slot_bytes, offset=start)

    def unlink(self) -> None:
        """Remove the segment's name from ``/dev/shm``; the memory stays mapped. Idempotent."""
        if self._named:
            self._named = False
            try:
                _posixshmem.shm_unlink(self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unlink, and unmap unless views still hold the mapping (then the last view unmaps it)."""
        self.unlink()
        self._array = None
        try:
            self._readonly.release()
            self._mmap.close()
        except BufferError:
            pass  # views still hold the mapping; the last one to go unmaps it
