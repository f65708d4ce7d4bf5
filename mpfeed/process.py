"""A worker process as the supervisor sees it, however it was started: one small interface (`Process`) over
a spawned interpreter (`SpawnedProcess`) and a child of the fork server (`ForkedProcess`).

Both hold a pidfd where the kernel offers one (Linux 5.3+): it becomes readable when the process ends, and
a signal sent through it can never reach another process that reused the pid.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Protocol

_POLL_SLICE_S = 0.02


class Process(Protocol):
    """What the supervisor needs of a worker process."""

    pid: int

    def exited(self) -> bool:
        """Whether the process has ended (never blocks)."""

    def exit_code(self) -> int | None:
        """Its exit code (negative: killed by that signal); None while running or when unknown."""

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the process to end; whether it has."""

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def release(self) -> None:
        """Give back what watching it took (its pidfd), once it has ended."""


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _pidfd_ended(pidfd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _signal(pidfd: int | None, pid: int, signum: int) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, OSError):
        pass  # already gone


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


class SpawnedProcess:
    """A worker interpreter we started ourselves: we are its parent and reap it."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._pidfd = _open_pidfd(popen.pid)

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def exit_code(self) -> int | None:
        return self.popen.returncode

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def terminate(self) -> None:
        if self.popen.returncode is None:  # once reaped, the pid may belong to someone else
            _signal(self._pidfd, self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.popen.returncode is None:
            _signal(self._pidfd, self.pid, signal.SIGKILL)

    def release(self) -> None:
        """Reap it if it ended and close the pidfd (after `wait`)."""
        self.popen.poll()
        if self._pidfd is not None and self.popen.returncode is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ForkedProcess:
    """A worker forked by the fork server, which reaps it and reports its exit code. The pidfd, opened as
    soon as the pid is known, still tells its end (and signals it safely) once the server is gone."""

    def __init__(self, pid: int, exits: dict[int, int]) -> None:
        self.pid = pid
        self._exits = exits  # the fork server's reports, filled by its owner
        self._pidfd = _open_pidfd(pid)

    def exited(self) -> bool:
        if self.pid in self._exits:
            return True
        if self._pidfd is None:  # no pidfds here (or it was gone before we asked): ask the kernel by pid
            return not _running(self.pid)
        return _pidfd_ended(self._pidfd)

    def exit_code(self) -> int | None:
        return self._exits.get(self.pid)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exited():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._pidfd is not None:
                _pidfd_ended(self._pidfd, min(remaining, _POLL_SLICE_S))
            else:
                time.sleep(min(remaining, _POLL_SLICE_S))
        return True

    def terminate(self) -> None:
        if not self.exited():
            _signal(self._pidfd, self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if not self.exited():
            _signal(self._pidfd, self.pid, signal.SIGKILL)

    def release(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
