"""The kernel's limits on new processes and threads, in words for an error: when a fork or a thread start
is refused, say which limit this process is held to, how full it is, and what to do.

Light on purpose (standard library only): workers import it too, to explain a thread they cannot start.
"""

from __future__ import annotations

import errno
import os
import resource

_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE = 21, 24  # capability bits (linux/capability.h)
_CGROUP_ROOT = "/sys/fs/cgroup"


def held_to_nproc() -> bool:
    """Whether fork is held to RLIMIT_NPROC: the kernel exempts a real uid of root and a process with
    CAP_SYS_RESOURCE or CAP_SYS_ADMIN, not an effective uid of root (a set-uid program), and only in the
    initial user namespace: root in a rootless container is held."""
    if not _in_initial_user_namespace():
        return True
    if os.getuid() == 0:
        return False
    try:
        with open("/proc/self/status") as status:
            effective = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return True
    return not effective & (1 << _CAP_SYS_RESOURCE | 1 << _CAP_SYS_ADMIN)


def _in_initial_user_namespace() -> bool:
    """The initial namespace maps every uid to itself; a container's maps a range, or nothing."""
    try:
        with open("/proc/self/uid_map") as file:
            return file.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True  # no user namespaces in this kernel


def refused(code: int, in_use: int | None = None) -> str:
    """Why the kernel refused a new process or thread with ``code`` (EAGAIN, ENOMEM) and what to do.
    ``in_use``: this user's processes and threads now, when the caller counted them."""
    name = f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
    if code == errno.ENOMEM:
        return f"{name}: the kernel had no memory for another process: use fewer workers, or free memory"
    limits = []
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if not held_to_nproc():
        limits.append("RLIMIT_NPROC does not apply (this process is root, or has CAP_SYS_RESOURCE)")
    elif soft == resource.RLIM_INFINITY:
        limits.append("RLIMIT_NPROC (`ulimit -u`) is unlimited")
    else:
        used = "" if in_use is None else f", {in_use} in use now"
        limits.append(f"this user may have {soft} processes and threads (RLIMIT_NPROC, `ulimit -u`{used})")
    pids = cgroup_pids()
    if pids is None:
        limits.append("no cgroup pids.max holds this process")
    else:
        limit, current, where = pids
        limits.append(f"its cgroup {where} allows {limit} (pids.max; {current} in use now)")
    return (
        f"{name}: the kernel refused another process or thread, past a limit on them; "
        f"{'; '.join(limits)}: use fewer workers, or raise the limit (`ulimit -u`, resource.setrlimit "
        "before the feeder starts, or the cgroup's pids.max)"
    )


def cgroup_pids() -> tuple[int, int, str] | None:
    """The tightest pids.max over this process's cgroup and its ancestors (v2, or v1's pids controller):
    ``(limit, tasks in it now, cgroup path)``, the one with the least room; None when none is set (or
    none can be read)."""
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            bases = [_CGROUP_ROOT, f"{_CGROUP_ROOT}/unified"]
        elif "pids" in controllers.split(","):
            bases = [f"{_CGROUP_ROOT}/{controllers}"]
        else:
            continue
        for base in bases:
            found.extend(_limits_up(base, path))
    return min(found, key=lambda limit: limit[0] - limit[1], default=None)


def _limits_up(base: str, path: str) -> list[tuple[int, int, str]]:
    """Every pids.max set from ``path`` up to the root of the hierarchy at ``base``, with its use."""
    limits = []
    while True:
        try:
            with open(f"{base}{path.rstrip('/')}/pids.max") as file:
                limit = file.read().strip()
            with open(f"{base}{path.rstrip('/')}/pids.current") as file:
                current = int(file.read())
            if limit != "max":
                limits.append((int(limit), current, path or "/"))
        except (OSError, ValueError):
            pass
        if path in ("", "/"):
            return limits
        path = os.path.dirname(path.rstrip("/")) or "/"
