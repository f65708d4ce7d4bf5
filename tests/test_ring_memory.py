"""Rings in memfd segments, for real: shared with child processes through inherited fds, SCM_RIGHTS and
/proc; chosen when /dev/shm is small (a private 32 MiB tmpfs); and refused with a clear error, not an OOM
kill, when memory or a cgroup's limit cannot hold them."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import can_mount_a_private_tmpfs

from mpfeed.errors import ShmSpaceError
from mpfeed.ring import ALIGN, Ring, _memory_cgroup_dirs

MIB = 1 << 20

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux-only")


def dev_shm() -> list[str]:
    return sorted(os.listdir("/dev/shm"))


def run_python(code: str, *args, pass_fds=(), shell_prefix: str = "") -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python that imports mpfeed from this checkout, with ``args`` as sys.argv[1:].
    ``shell_prefix`` runs first in the same process (``sh -c '<prefix> exec python ...'``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    if shell_prefix:
        command = ["sh", "-c", f'{shell_prefix} exec "$0" "$@"', *command]
    return subprocess.run(command, pass_fds=pass_fds, capture_output=True, text=True, env=env, timeout=60)


# A worker's side: map the ring (from an inherited fd, an fd received over a socket, or a name), check what
# the parent wrote, write something back.
CHILD = """
    import os, socket, sys
    from mpfeed.ring import Ring
    how, where, depth, slot_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if how == "fd":
        fd = int(where)
        ring = Ring.attach_fd(fd, depth, slot_bytes)
    elif how == "socket":
        with socket.socket(fileno=int(where)) as sock:
            _, (fd,), _, _ = socket.recv_fds(sock, 16, 1)
        ring = Ring.attach_fd(fd, depth, slot_bytes)
    else:
        fd = None
        ring = Ring.attach(where, depth, slot_bytes)
    if fd is not None:
        try:
            os.fstat(fd)
            sys.exit("the fd is still open after attach_fd")
        except OSError:
            pass
    assert ring.kind == "memfd" and ring.fd is None and ring.name.startswith("memfd:mpfeed-"), ring.name
    for i in range(depth):
        assert (ring.slot(i) == i + 1).all(), f"slot {i} does not hold what the parent wrote"
        ring.slot(i)[:] = 100 + i
    ring.close()
    print("ok")
"""


def fill(ring: Ring) -> None:
    for i in range(ring.depth):
        ring.slot(i)[:] = i + 1


def check_written_by_child(ring: Ring) -> None:
    for i in range(ring.depth):
        view = ring.slot_view(i)
        assert view.min() == view.max() == 100 + i


def test_a_child_that_inherits_the_fd_shares_the_ring_and_dev_shm_never_sees_it():
    before = dev_shm()
    ring = Ring.create(depth=3, slot_bytes=MIB, memory="memfd")
    assert ring.kind == "memfd" and dev_shm() == before
    assert os.readlink(f"/proc/self/fd/{ring.fd}").startswith("/memfd:mpfeed-")
    fill(ring)
    child = run_python(CHILD, "fd", ring.fd, 3, MIB, pass_fds=(ring.fd,))
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr
    ring.close_fd()
    ring.close_fd()
    assert ring.fd is None and ring.name.startswith("memfd:mpfeed-")
    check_written_by_child(ring)
    assert dev_shm() == before
    ring.close()


def test_a_child_that_receives_the_fd_over_a_unix_socket_shares_the_ring():
    ring = Ring.create(depth=2, slot_bytes=MIB, memory="memfd")
    fill(ring)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), "socket", str(theirs.fileno()), "2", str(MIB)],
            pass_fds=(theirs.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        socket.send_fds(ours, [b"r"], [ring.fd])
        ring.close_fd()  # the child holds its own copy now
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out == "ok\n", err
    check_written_by_child(ring)
    ring.close()


def test_a_child_can_attach_by_the_proc_name_until_the_supervisor_closes_its_fd():
    ring = Ring.create(depth=2, slot_bytes=MIB, memory="memfd")
    name = ring.name
    assert name == f"/proc/{os.getpid()}/fd/{ring.fd}"
    fill(ring)
    child = run_python(CHILD, "name", name, 2, MIB)
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr
    check_written_by_child(ring)
    ring.unlink()  # for a memfd ring: closes the fd, its last way in
    assert ring.fd is None and ring.name.startswith("memfd:mpfeed-")
    with pytest.raises(FileNotFoundError, match="closed before the attach"):
        Ring.attach(name, 2, MIB)
    ring.close()


def test_a_memfd_ring_cannot_shrink_or_grow_so_no_mapping_of_it_can_sigbus():
    ring = Ring.create(depth=2, slot_bytes=4096, memory="memfd")
    for change in (0, 4096, 3 * 4096):
        with pytest.raises(PermissionError):
            os.ftruncate(ring.fd, change)
    assert os.fstat(ring.fd).st_size == 2 * 4096
    ring.close()


def test_attach_fd_refuses_a_segment_smaller_than_the_ring_and_still_closes_the_fd():
    ring = Ring.create(depth=2, slot_bytes=4096, memory="memfd")
    fd = os.dup(ring.fd)
    with pytest.raises(ValueError, match="holds 8,192 bytes, fewer than depth 3"):
        Ring.attach_fd(fd, 3, 4096)
    with pytest.raises(OSError):
        os.fstat(fd)
    ring.close()


def test_auto_takes_dev_shm_while_it_has_room_for_every_worker_ring():
    ring = Ring.create(depth=2, slot_bytes=4096, workers=4)
    assert ring.kind == "posix" and ring.fd is None
    assert ring.name.lstrip("/") in dev_shm()
    ring.close()
    with pytest.raises(ValueError, match="memory must be one of"):
        Ring.create(depth=2, slot_bytes=4096, memory="shm")


def test_a_ring_beyond_the_memory_available_is_refused_before_reserving_anything():
    before = dev_shm()
    available = psutil.virtual_memory().available
    slot_bytes = (available // ALIGN + 1) * ALIGN
    with pytest.raises(ShmSpaceError) as refused:
        Ring.create(depth=1, slot_bytes=slot_bytes, memory="memfd")
    assert refused.value.errno == errno.ENOMEM
    message = str(refused.value)
    assert f"needs {slot_bytes:,} bytes of memory" in message and "available" in message
    assert "--memory" in message and "fewer workers" in message and "--shm-size" not in message
    with pytest.raises(ShmSpaceError) as nowhere:  # auto: too big for /dev/shm, and for memory
        Ring.create(depth=1, slot_bytes=slot_bytes, workers=2)
    assert "room for it nowhere" in str(nowhere.value)
    assert "--memory" in str(nowhere.value) and "--shm-size" in str(nowhere.value)
    assert dev_shm() == before


SMALL_DEV_SHM = """
    import json, os, subprocess, sys
    from mpfeed.ring import Ring
    MIB = 1 << 20
    seen = {"start": os.listdir("/dev/shm")}
    big = Ring.create(depth=8, slot_bytes=8 * MIB)  # 64 MiB: cannot fit a 32 MiB /dev/shm
    seen["created"] = os.listdir("/dev/shm")
    for i in range(big.depth):
        big.slot(i)[:] = i + 1
    child = subprocess.run(
        [sys.executable, "-c", sys.argv[1], "fd", str(big.fd), "8", str(8 * MIB)],
        pass_fds=(big.fd,), capture_output=True, text=True,
    )
    big.close_fd()
    seen["attached"] = os.listdir("/dev/shm")
    read_back = all(
        int(big.slot_view(i).min()) == int(big.slot_view(i).max()) == 100 + i for i in range(big.depth)
    )
    fits = Ring.create(depth=1, slot_bytes=8 * MIB, workers=2)  # 2 x 8 MiB fit in 32 MiB
    in_dev_shm = fits.name.lstrip("/") in os.listdir("/dev/shm")
    crowded = Ring.create(depth=1, slot_bytes=8 * MIB, workers=8)  # this one fits, all eight would not
    kinds = [big.kind, fits.kind, crowded.kind]
    for ring in (big, fits, crowded):
        ring.close()
    seen["closed"] = os.listdir("/dev/shm")
    print(json.dumps({"kinds": kinds, "child": [child.returncode, child.stdout, child.stderr[-2000:]],
                      "read_back": read_back, "fits_in_dev_shm": in_dev_shm, "seen": seen}))
"""


@pytest.mark.skipif(
    not can_mount_a_private_tmpfs(), reason="needs root and unshare -m to mount a small tmpfs"
)
def test_auto_puts_rings_that_a_32_mib_dev_shm_cannot_hold_in_memfds_and_leaves_dev_shm_untouched():
    mount = "mount -t tmpfs -o size=32m tmpfs /dev/shm &&"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code, child = textwrap.dedent(SMALL_DEV_SHM), textwrap.dedent(CHILD)
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{mount} exec "$0" "$@"', sys.executable, "-c", code, child],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    assert outcome["child"][:2] == [0, "ok\n"], outcome["child"][2]
    assert outcome["kinds"] == ["memfd", "posix", "memfd"]
    assert outcome["read_back"] and outcome["fits_in_dev_shm"]
    assert outcome["seen"] == {"start": [], "created": [], "attached": [], "closed": []}


# -- cgroups ---------------------------------------------------------------------------------------------


def _make_memory_cgroup(limit: int) -> str | None:
    """A new memory cgroup limited to ``limit`` bytes (swap included), inside our own where possible; None
    where this machine lets us make none."""
    if os.geteuid() != 0:
        return None
    for parent, version in _memory_cgroup_dirs():
        if version == 2:
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as file:
                    if "memory" not in file.read().split():
                        continue
            except OSError:
                continue
        directory = os.path.join(parent, f"mpfeed-test-{os.getpid()}")
        try:
            os.mkdir(directory)
        except OSError:
            continue
        try:
            if version == 2:
                _write(directory, "memory.max", limit)
                _write(directory, "memory.swap.max", 0, optional=True)
            else:
                _write(directory, "memory.limit_in_bytes", limit)
                _write(directory, "memory.memsw.limit_in_bytes", limit, optional=True)
        except OSError:
            os.rmdir(directory)
            continue
        return directory
    return None


def _write(directory: str, name: str, value: int, optional: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as file:
            file.write(str(value))
    except OSError:
        if not optional:
            raise


@pytest.fixture
def cgroup_64m():
    directory = _make_memory_cgroup(64 * MIB)
    if directory is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a writable cgroup v1 or v2 memory)")
    yield directory
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(directory)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


IN_A_64M_CGROUP = """
    import errno, json, os
    from mpfeed.errors import ShmSpaceError
    from mpfeed.ring import Ring
    MIB = 1 << 20
    before = os.listdir("/dev/shm")
    outcome = {}
    for memory in ("memfd", "posix", "auto"):
        try:
            Ring.create(depth=4, slot_bytes=64 * MIB, memory=memory).close()  # 256 MiB
            outcome[memory] = "created"
        except ShmSpaceError as error:
            outcome[memory] = [error.errno, str(error)]
    small = Ring.create(depth=2, slot_bytes=4 * MIB, memory="memfd")
    small.slot(1)[:] = 7
    outcome["small"] = [small.kind, int(small.slot_view(1).sum()) == 7 * 4 * MIB]
    small.close()
    outcome["dev_shm_unchanged"] = os.listdir("/dev/shm") == before
    print(json.dumps(outcome))
"""


def test_a_ring_beyond_a_cgroup_memory_limit_is_a_clear_error_and_no_oom_kill(cgroup_64m):
    result = run_python(IN_A_64M_CGROUP, shell_prefix=f"echo $$ > {cgroup_64m}/cgroup.procs &&")
    assert result.returncode == 0, f"{result.returncode}: {result.stderr[-3000:]}"
    outcome = json.loads(result.stdout)
    for memory in ("memfd", "posix", "auto"):
        code, message = outcome[memory]
        assert code == errno.ENOMEM, message
        assert f"needs {256 * MIB:,} bytes of memory" in message
        assert f"the cgroup {cgroup_64m} allows {64 * MIB:,} bytes" in message
        assert "--memory" in message and "fewer workers" in message
    assert outcome["small"] == ["memfd", True]
    assert outcome["dev_shm_unchanged"]


RAW_FALLOCATE = """
    import os
    fd = os.memfd_create("mpfeed-probe")
    try:
        os.posix_fallocate(fd, 0, 256 << 20)
        print("reserved")
    except OSError as error:
        print("error", error.errno)
"""


def test_the_kernel_answers_a_reservation_past_a_cgroup_limit_with_the_oom_killer(cgroup_64m):
    """Why the check above must come first: posix_fallocate past the limit does not fail, the OOM killer
    ends the process (or, with a bystander in the cgroup, the largest one first)."""
    result = run_python(RAW_FALLOCATE, shell_prefix=f"echo $$ > {cgroup_64m}/cgroup.procs &&")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stdout == ""
