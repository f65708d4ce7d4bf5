"""Test hygiene: a check that each test leaves no child process, no thread and no /dev/shm entry of ours
behind. (A test that hangs is ended by pytest's faulthandler_timeout, see pyproject.toml.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import psutil
import pytest

LEAK_GRACE_S = 10.0


def shm_entries() -> set[str]:
    """Our names in /dev/shm: ring segments (mpfeed-*) and any multiprocessing semaphores (sem.mp-*)."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    return {name for name in names if name.startswith(("mpfeed-", "sem.mp-"))}


def live_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


@pytest.fixture(autouse=True)
def no_leaks(request):
    shm_before = shm_entries()
    threads_before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        children = live_children()
        shm_left = shm_entries() - shm_before
        threads_left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not (children or shm_left or threads_left) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not children, f"child processes left behind: {[(c.pid, c.cmdline()) for c in children]}"
    assert not shm_left, f"/dev/shm entries left behind: {sorted(shm_left)}"
    assert not threads_left, f"threads left behind: {threads_left}"


@pytest.fixture(params=["spawn", "forkserver"])
def start_method(request):
    """Run the test under each way mpfeed starts its workers."""
    return request.param


def can_mount_a_private_tmpfs() -> bool:
    """Whether a test may mount a small tmpfs on /dev/shm in a private mount namespace (root, unshare -m)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True
    )
    return probe.returncode == 0
