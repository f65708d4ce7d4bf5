"""One shared-memory ring: a segment cut into ``depth`` slots of ``slot_bytes`` each.

A ring lives in one of two kinds of shared memory (``ring.kind``):

- ``"posix"``: a named segment in ``/dev/shm``. Its one worker attaches to it by name; then the name is
  removed (by both sides, whichever comes first) so that no crash, not even a SIGKILL of the whole process
  group, can leave it behind: the memory lives exactly as long as a process maps it. The one window is
  start-up, between creation and the worker's attach.
- ``"memfd"``: an anonymous file from ``memfd_create``, which has no name anywhere and no size limit but
  memory (and the cgroup's). The worker gets the supervisor's fd (``ring.fd``, sent over a Unix socket with
  SCM_RIGHTS, or inherited) and maps it with `Ring.attach_fd`; the supervisor then closes its copy with
  `Ring.close_fd`. While that fd is open, ``ring.name`` is ``/proc/<pid>/fd/<fd>``, which `Ring.attach`
  opens too. Nothing is ever left behind, not even at start-up. Docker's 64 MiB ``/dev/shm`` does not
  limit it.

Either way the space is reserved up front (``posix_fallocate``), so that a shortage is a clear
`ShmSpaceError` at creation and never a SIGBUS later. Both kinds are charged to the cgroup's memory, and
reserving past a cgroup's limit does not fail: the kernel's OOM killer kills the largest process of the
cgroup (measured here with cgroup v1: SIGKILL, even for a bystander). So before reserving we compare the
ring with the memory available, system-wide and under every cgroup limit above us, and refuse instead.

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
import fcntl
import mmap
import os
import weakref
from typing import Any

import numpy as np
import psutil

from .errors import ShmSpaceError
from .layout import ALIGN

SHM_DIR = "/dev/shm"
NAME_PREFIX = "mpfeed-"
MEMORY_KINDS = ("auto", "posix", "memfd")
_MIN_SLOT_BYTES = 4096
_MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)  # Linux 6.3+; spares a warning in the kernel log
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 1) | getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
)
_NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


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


def owner_prefix(owner: str) -> str:
    """The start of the names of the POSIX rings that ``owner`` (a feeder's supervisor) creates."""
    return f"{NAME_PREFIX}{os.getpid()}-{owner}"


def remove_names(owner: str) -> None:
    """Remove from ``/dev/shm`` every name ``owner`` may still have there: those an exception (a Ctrl-C)
    cut off between a segment's creation and the moment its ring object held it."""
    if not owner:
        return
    prefix = owner_prefix(owner)
    try:
        names = [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        try:
            _posixshmem.shm_unlink(f"/{name}")
        except OSError:
            pass


def create_memfd(prefix: str) -> tuple[int, str]:
    """A new sealable, close-on-exec memfd and its label: ``prefix``, this pid and a random tag (labels
    show in /proc/<pid>/fd, never in /dev/shm)."""
    label = f"{prefix}{os.getpid()}-{os.urandom(6).hex()}"
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(label, flags | _MFD_NOEXEC_SEAL), label
    except OSError as error:  # a kernel before 6.3
        if error.errno != errno.EINVAL:
            raise
        return os.memfd_create(label, flags), label


def memfd_supported() -> bool:
    """Whether this OS gives ``memfd_create`` (Linux 3.17+)."""
    return hasattr(os, "memfd_create")


def choose_memory(total: int) -> str:
    """Where rings of ``total`` bytes in all should live: ``"posix"`` while ``/dev/shm`` has room for all
    of them, else ``"memfd"`` (where the OS has it). The supervisor may decide once for a whole feeder."""
    free = shm_free_bytes()
    if not memfd_supported() or (free is not None and total <= free):
        return "posix"
    return "memfd"


def cgroup_memory_limits() -> list[tuple[str, int, int]]:
    """Every cgroup memory limit over this process, its own cgroup's and its ancestors' (v2 or v1):
    ``(directory, limit, usage)``, the usage without the inactive page cache that the kernel reclaims
    before it runs out. Empty where no limit applies or none can be read."""
    limits = []
    for directory, version in _memory_cgroup_dirs():
        if version == 2:
            limit, usage = _read_int(directory, "memory.max"), _read_int(directory, "memory.current")
            cache = _read_stat(directory, "inactive_file")
        else:
            limit, usage = (
                _read_int(directory, "memory.limit_in_bytes"),
                _read_int(directory, "memory.usage_in_bytes"),
            )
            cache = _read_stat(directory, "total_inactive_file")
        if limit is None or usage is None or limit >= _NO_CGROUP_LIMIT:
            continue
        limits.append((directory, limit, max(usage - (cache or 0), 0)))
    return limits


def memory_available() -> tuple[int, str]:
    """Bytes that new shared memory can take before the OOM killer steps in, the tightest of the system's
    available memory and every cgroup limit, and words that say where that number comes from."""
    available = psutil.virtual_memory().available
    where = f"the system has {available:,} bytes available"
    for directory, limit, usage in cgroup_memory_limits():
        if limit - usage < available:
            available = max(limit - usage, 0)
            where = f"the cgroup {directory} allows {limit:,} bytes and {usage:,} are in use"
    return available, where


def check_shm_space(needed: int, total: int, workers: int, depth: int, slot_bytes: int) -> None:
    """Refuse with a clear message when ``/dev/shm`` cannot hold ``needed`` more bytes."""
    free = shm_free_bytes()
    if free is not None and needed > free:
        raise ShmSpaceError(errno.ENOSPC, _space_message(needed, free, total, workers, depth, slot_bytes))


def check_memory_space(needed: int, total: int, workers: int, depth: int, slot_bytes: int) -> None:
    """Refuse with a clear message when memory (the system's, or a cgroup's) cannot hold ``needed`` more
    bytes: reserving them would wake the OOM killer, not fail."""
    available, where = memory_available()
    if needed > available:
        message = _memory_message(needed, available, where, total, workers, depth, slot_bytes)
        raise ShmSpaceError(errno.ENOMEM, message)


def _feeder_words(total: int, workers: int, depth: int, slot_bytes: int) -> str:
    return f"the whole feeder needs {total:,} = {workers} workers x depth {depth} x slot_bytes {slot_bytes:,}"


def _space_message(needed: int, free: int, total: int, workers: int, depth: int, slot_bytes: int) -> str:
    return (
        f"mpfeed needs {needed:,} bytes of shared memory in {SHM_DIR} but only {free:,} are free "
        f"({_feeder_words(total, workers, depth, slot_bytes)}). "
        f"Fixes: give the container more shared memory (docker run --shm-size=1g ...), "
        f"use fewer workers or a smaller depth, or a smaller slot_bytes."
    )


def _memory_message(
    needed: int, available: int, where: str, total: int, workers: int, depth: int, slot_bytes: int
) -> str:
    return (
        f"mpfeed needs {needed:,} bytes of memory for a ring but only {available:,} are available: "
        f"{where} ({_feeder_words(total, workers, depth, slot_bytes)}). "
        f"Fixes: use fewer workers, a smaller depth or a smaller slot_bytes, "
        f"or give the container more memory (docker run --memory=...)."
    )


def _nowhere_message(
    needed: int, free: int, available: int, where: str, total: int, workers: int, depth: int, slot_bytes: int
) -> str:
    return (
        f"mpfeed needs {needed:,} bytes for a ring and has room for it nowhere: {SHM_DIR} has {free:,} bytes "
        f"free, and memory has {available:,} available, as {where} "
        f"({_feeder_words(total, workers, depth, slot_bytes)}). "
        f"Fixes: use fewer workers, a smaller depth or a smaller slot_bytes, or give the container more "
        f"memory (docker run --memory=...) and, for rings in {SHM_DIR}, more shared memory "
        f"(docker run --shm-size=1g ...)."
    )


class Ring:
    """A mapped ring segment: slot addressing, and the one way in that it may still have (a name in
    ``/dev/shm``, or the memfd's fd in the supervisor)."""

    def __init__(
        self,
        name: str,
        depth: int,
        slot_bytes: int,
        mapping: mmap.mmap,
        named: bool,
        *,
        kind: str = "posix",
        fd: int | None = None,
    ) -> None:
        self.name = name
        self.depth = depth
        self.slot_bytes = slot_bytes
        self.kind = kind
        self.fd = fd
        self._label = name  # a memfd ring's name once its fd is closed: "memfd:mpfeed-<pid>-<random>"
        self._mmap = mapping
        self._named = named
        self._fd_closer = None if fd is None else weakref.finalize(self, os.close, fd)
        self._array: Any = np.frombuffer(mapping, dtype=np.uint8)  # None once closed
        # Views built on a read-only memoryview cannot be made writable again (on the mmap they could).
        self._readonly = memoryview(mapping).toreadonly()

    @classmethod
    def create(
        cls, depth: int, slot_bytes: int, *, workers: int = 1, memory: str = "auto", owner: str = ""
    ) -> Ring:
        """Create, reserve and map a new ring (supervisor side). ``memory`` is ``"posix"`` (a named segment
        in ``/dev/shm``), ``"memfd"``, or ``"auto"``: posix while ``/dev/shm`` has room for all
        ``workers`` rings of this size, else memfd. Reserving now turns a later SIGBUS, and checking the
        memory first a later OOM kill, into a clear `ShmSpaceError` here."""
        if slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a multiple of {ALIGN}, got {slot_bytes}")
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_KINDS))}, got {memory!r}")
        size = depth * slot_bytes
        total = size * workers
        kind = choose_memory(total) if memory == "auto" else memory
        if kind == "posix":
            check_shm_space(size, total, workers, depth, slot_bytes)
            check_memory_space(size, total, workers, depth, slot_bytes)
            return cls._create_posix(depth, slot_bytes, workers, owner)
        if not memfd_supported():
            raise OSError(errno.ENOSYS, "memory='memfd' needs Linux's memfd_create; use memory='posix'")
        available, where = memory_available()
        if size > available:
            free = shm_free_bytes()
            if memory == "auto" and free is not None:
                message = _nowhere_message(size, free, available, where, total, workers, depth, slot_bytes)
            else:
                message = _memory_message(size, available, where, total, workers, depth, slot_bytes)
            raise ShmSpaceError(errno.ENOMEM, message)
        return cls._create_memfd(depth, slot_bytes, workers)

    @classmethod
    def _create_posix(cls, depth: int, slot_bytes: int, workers: int, owner: str) -> Ring:
        size = depth * slot_bytes
        name = f"/{owner_prefix(owner)}{os.urandom(6).hex()}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            try:
                _reserve(fd, depth, slot_bytes, workers, in_shm=True)
            except BaseException:
                _posixshmem.shm_unlink(name)
                raise
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, depth, slot_bytes, mapping, named=True)

    @classmethod
    def _create_memfd(cls, depth: int, slot_bytes: int, workers: int) -> Ring:
        fd, label = create_memfd(NAME_PREFIX)
        try:
            _reserve(fd, depth, slot_bytes, workers, in_shm=False)
            # Nobody can shrink it now, so no mapping of it can ever SIGBUS.
            fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
            mapping = mmap.mmap(fd, depth * slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        ring = cls(f"/proc/{os.getpid()}/fd/{fd}", depth, slot_bytes, mapping, False, kind="memfd", fd=fd)
        ring._label = f"memfd:{label}"
        return ring

    @classmethod
    def attach(cls, name: str, depth: int, slot_bytes: int) -> Ring:
        """Map an existing ring by its ``name`` (worker side): a POSIX segment, whose name is then removed
        since nothing needs it any more, or a memfd ring's ``/proc/<pid>/fd/<fd>`` while the supervisor
        still holds that fd."""
        if name.startswith("/proc/"):
            try:
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, "the ring's memfd was closed before the attach", name
                ) from None
            if not _fd_label(fd).startswith(f"/memfd:{NAME_PREFIX}"):  # the fd was closed and reused
                os.close(fd)
                raise FileNotFoundError(errno.ENOENT, "the ring's memfd was closed before the attach", name)
            return cls.attach_fd(fd, depth, slot_bytes)
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            mapping = mmap.mmap(fd, depth * slot_bytes)
        finally:
            os.close(fd)
        ring = cls(name, depth, slot_bytes, mapping, named=True)
        ring.unlink()
        return ring

    @classmethod
    def attach_fd(cls, fd: int, depth: int, slot_bytes: int) -> Ring:
        """Map a memfd ring from an fd this process received (worker side), and close the fd, which this
        call owns from now on, whatever happens."""
        size = depth * slot_bytes
        try:
            held = os.fstat(fd).st_size
            if held < size:
                wanted = f"depth {depth} x slot_bytes {slot_bytes:,}"
                raise ValueError(f"the ring's memory holds {held:,} bytes, fewer than {wanted}")
            mapping = mmap.mmap(fd, size)
            name = _fd_label(fd).lstrip("/").removesuffix(" (deleted)")
        finally:
            os.close(fd)
        return cls(name, depth, slot_bytes, mapping, named=False, kind="memfd")

    def slot(self, index: int) -> np.ndarray:
        """Slot ``index`` as a writable uint8 array (worker side)."""
        start = index * self.slot_bytes
        return self._array[start : start + self.slot_bytes]

    def slot_view(self, index: int) -> np.ndarray:
        """Slot ``index`` as a new read-only uint8 array (consumer side); views made from it keep it alive."""
        start = index * self.slot_bytes
        return np.frombuffer(self._readonly, dtype=np.uint8, count=self.slot_bytes, offset=start)

    def close_fd(self) -> None:
        """Close a memfd ring's fd (supervisor side, once the worker has it); the memory stays mapped.
        Idempotent; nothing to do for a POSIX ring."""
        if self._fd_closer is not None and self._fd_closer.alive:
            self._fd_closer()
            self.name = self._label
        self.fd = None

    def unlink(self) -> None:
        """Remove the last way into the ring but its mappings: the name in ``/dev/shm``, or a memfd ring's
        fd (`close_fd`). Idempotent."""
        self.close_fd()
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


def _reserve(fd: int, depth: int, slot_bytes: int, workers: int, *, in_shm: bool) -> None:
    """Allocate every page now, so a shortage is an error here and not a SIGBUS on some later write."""
    size = depth * slot_bytes
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC and in_shm:
            message = _space_message(size, shm_free_bytes() or 0, size * workers, workers, depth, slot_bytes)
        elif error.errno in (errno.ENOSPC, errno.ENOMEM):
            available, where = memory_available()
            message = _memory_message(size, available, where, size * workers, workers, depth, slot_bytes)
        else:
            raise
        raise ShmSpaceError(error.errno, message) from None


def _fd_label(fd: int) -> str:
    """What ``/proc`` says an fd of ours is: ``/memfd:mpfeed-... (deleted)`` for a memfd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _memory_cgroup_dirs() -> list[tuple[str, int]]:
    """This process's memory cgroup directories, its own first, then each parent up to the mount's root:
    ``(directory, 2 or 1)`` for cgroup v2 and v1. Empty where /proc tells nothing."""
    try:
        with open("/proc/self/cgroup") as file:
            memberships = file.read().splitlines()
        with open("/proc/self/mountinfo") as file:
            mounts = file.read().splitlines()
    except OSError:
        return []
    paths = {}
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            paths["cgroup2"] = path
        elif "memory" in controllers.split(","):
            paths["cgroup"] = path
    dirs: list[tuple[str, int]] = []
    for mount in mounts:
        before, _, after = mount.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in paths:
            continue
        if tail[0] == "cgroup" and "memory" not in tail[2].split(","):
            continue
        root, mountpoint, path = fields[3], fields[4], paths[tail[0]]
        if root != "/" and (path == root or path.startswith(root + "/")):
            path = path[len(root) :]  # a container that sees its own cgroup mounted as the root
        directory = os.path.normpath(f"{mountpoint}/{path}")
        while directory.startswith(mountpoint):
            if (directory, 2) not in dirs and (directory, 1) not in dirs:
                dirs.append((directory, 2 if tail[0] == "cgroup2" else 1))
            if directory == mountpoint:
                break
            directory = os.path.dirname(directory)
    return dirs


def _read_int(directory: str, name: str) -> int | None:
    try:
        with open(os.path.join(directory, name)) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(directory: str, key: str) -> int | None:
    try:
        with open(os.path.join(directory, "memory.stat")) as file:
            for line in file:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None
