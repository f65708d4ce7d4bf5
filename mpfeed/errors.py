"""The exception types mpfeed raises, one per cause.

`ClosedError` means you closed the feeder; `WorkerError` means a worker broke it (and the feeder stays
broken); `StopIteration` ends an epoch. Where a familiar built-in fits, the type subclasses it so that
existing ``except`` clauses keep working.
"""

from __future__ import annotations

import signal


class MpfeedError(Exception):
    """Base class of every error mpfeed raises itself."""


class ClosedError(MpfeedError, RuntimeError):
    """The feeder was closed; it hands out nothing more."""


class BrokenError(MpfeedError, RuntimeError):
    """An exception (a Ctrl-C, say) escaped in the middle of one of the feeder's state changes, so its
    state can no longer be trusted: the feeder stopped its workers instead of handing out wrong data."""


class SupersededError(MpfeedError, RuntimeError):
    """This iteration was superseded by a newer pass over the same feeder, which serves one pass at a time."""


class ShmSpaceError(MpfeedError, OSError):
    """`/dev/shm` has too little free space for the ring buffers the feeder needs."""


class WorkerStartError(MpfeedError, OSError):
    """The kernel refused to start a worker process: ``errno`` EAGAIN (a limit on processes and threads:
    RLIMIT_NPROC, a cgroup's pids.max) or ENOMEM. The workers already started were stopped.

    Attributes: ``worker`` (the index of the worker that could not start; None for the fork server),
    ``started`` (how many of the workers asked for had started).
    """

    def __init__(self, code: int, message: str, *, worker: int | None = None, started: int = 0) -> None:
        super().__init__(code, message)
        self.worker = worker
        self.started = started


class WorkerError(MpfeedError, RuntimeError):
    """A worker process failed; the message names the worker, its pid, the element and the cause.

    Attributes: ``worker`` (shard index; None for the fork server), ``pid``, ``element`` (the element it
    was producing: for a generator source, its index within the worker's shard; for a random-access one,
    the ``i`` of ``source[i]``; None when not known, e.g. which of a batch), ``epoch``,
    ``remote_traceback`` (text, or None), and ``node`` (the Ray node a remote worker ran on; None for
    local processes).
    """

    def __init__(
        self,
        message: str,
        *,
        worker: int | None,
        pid: int | None,
        element: int | None = None,
        epoch: int | None = None,
        remote_traceback: str | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.node = node
        self.element = element
        self.epoch = epoch
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return _rebuild, (type(self), str(self), dict(self.__dict__))


def _rebuild(cls, message, state):
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class SourceError(WorkerError):
    """The user's source raised an exception inside a worker.

    ``exc_type`` is the qualified name of the exception's type; ``remote_traceback`` its traceback.
    """

    exc_type: str = ""


class ElementError(WorkerError, TypeError, ValueError):
    """The source produced an element mpfeed cannot carry (a bad leaf, a changed structure or dtype).

    It is both a `TypeError` and a `ValueError`, so either ``except`` clause catches it.
    """


class WorkerDiedError(WorkerError):
    """A worker process ended without being asked to: killed by a signal or exited on its own.

    ``exitcode`` is the process's exit code (negative for a signal, as in `subprocess`).
    """

    exitcode: int | None = None


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A worker produced nothing for longer than the feeder's ``timeout``."""


def describe_exit(exitcode: int | None) -> str:
    """Words for a process exit code: ``killed by SIGKILL (-9)`` or ``exited with code 3``."""
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} ({exitcode})"
    return f"exited with code {exitcode}"
