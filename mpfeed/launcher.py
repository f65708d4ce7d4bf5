"""The parent's side of starting workers: check that the work pickles, start a fresh interpreter (one per
worker, or one fork server per feeder that forks them), and hand it what it needs.

We start interpreters with `subprocess` rather than `multiprocessing`: a spawned ``multiprocessing`` child
re-runs the user's main module, and with it a top-level ``import tensorflow`` (seconds and hundreds of MB
per worker, and TensorFlow's threads). Our child (`mpfeed.bootstrap`) imports the main module only when
the source or its arguments live there, behind `mpfeed.tfguard`.

Parent to child, three messages: the bootstrap (sys.path, cwd, main module), the pickled work (the same
for every worker), and the child's `WorkerSetup` (or the string "forkserver").
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import select
import socket
import subprocess
import sys
import time
from typing import Any

import psutil

from . import limits, protocol
from .channel import Channel
from .errors import WorkerError, WorkerStartError, describe_exit
from .process import ForkedProcess, SpawnedProcess

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_PROGRAM = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from mpfeed.bootstrap import child_main; child_main(int(sys.argv[1]))"
)
FORKSERVER_ROLE = "forkserver"
_SERVER_ANSWER_S = 30.0  # for the fork server to report the pid of another worker it forked
_FORKS_IN_FLIGHT = 16  # fork requests sent to the server and not yet answered, at most
_SERVER_EXIT_WAIT_S = 5.0
REFUSALS = (errno.EAGAIN, errno.ENOMEM)  # the errnos of a fork or thread the kernel refused
_READ_SLICE_S = 0.05

# What each worker costs this process and the machine, at the least, for `check_limits`.
_MANY_WORKERS = 64
_FDS_PER_WORKER = 2  # its pipe, and its ring's memfd
_TASKS_PER_WORKER = 2  # what RLIMIT_NPROC counts: its process, and the thread that watches its parent
_FD_MARGIN = 64  # for the user's own files, TensorFlow's, and the fork server
_FORKED_WORKER_BYTES = 8 << 20  # measured: a worker forked from the server, before the source loads anything
_SPAWNED_WORKER_BYTES = 19 << 20  # a spawned one, with its own interpreter and numpy

# Math libraries start a thread per core in every process that loads them: N workers would start N x
# cores threads (which spin at start-up, doubling a worker's start-up CPU) and then oversubscribe the
# machine. Workers get one each, unless the user set these variables.
SINGLE_THREADED = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def check_limits(adding: int, start_method: str, *, count_threads: bool = False) -> None:
    """Refuse at once, naming the limit, to start ``adding`` more workers past this process's limits on
    processes (RLIMIT_NPROC), open files (RLIMIT_NOFILE) or the memory available, instead of failing
    part way with a misleading error. ``count_threads``: check RLIMIT_NPROC however few are added."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    # Counting the user's threads reads all of /proc: only for many workers (a few more fail to fork),
    # or when asked (autotuning, whose workers would otherwise fail after the feeder has started)
    many = adding >= _MANY_WORKERS or count_threads
    if soft != resource.RLIM_INFINITY and many and limits.held_to_nproc():
        used = _threads_of_user()
        if used + adding * _TASKS_PER_WORKER + 1 > soft:
            raise OSError(
                errno.EAGAIN,
                f"starting {adding} worker processes would take this user past its limit of {soft} processes "
                f"and threads (RLIMIT_NPROC, `ulimit -u`; {used} in use now): raise the limit, or use fewer "
                "workers",
            )
    pids = limits.cgroup_pids()  # a few small files: checked however few are added
    if pids is not None and pids[1] + adding * _TASKS_PER_WORKER + 1 > pids[0]:
        limit, current, where = pids
        raise OSError(
            errno.EAGAIN,
            f"starting {adding} worker processes (a process and a thread each) would take this process's "
            f"cgroup {where} past its limit of {limit} processes and threads (pids.max; {current} in use "
            "now): raise the cgroup's pids.max (`docker run --pids-limit`), or use fewer workers",
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = adding * _FDS_PER_WORKER + _open_fds() + _FD_MARGIN
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise OSError(
            errno.EMFILE,
            f"{adding} workers need about {needed} open files in this process (a pipe and a ring each), past "
            f"its limit of {soft} (RLIMIT_NOFILE, `ulimit -n`, or resource.setrlimit): raise the limit, or "
            "use fewer workers",
        )
    each = _FORKED_WORKER_BYTES if start_method == "forkserver" else _SPAWNED_WORKER_BYTES
    available = psutil.virtual_memory().available
    if adding * each > available:
        raise OSError(
            errno.ENOMEM,
            f"{adding} workers need at least {adding * each / 2**30:.1f} GiB of memory ({each >> 20} MiB "
            f"each before the source loads anything), but {available / 2**30:.1f} GiB is available: use "
            "fewer workers",
        )


def start_refused(
    code: int, *, worker: int | None, asked: int, started: int, more: bool, how: str
) -> WorkerStartError:
    """The error for a worker (or the fork server: ``worker`` None) the kernel refused to start: how many
    of the ``asked`` workers had started (``more``: added to those running), which one failed, the limit
    and what to do."""
    in_use = _threads_of_user() if code == errno.EAGAIN and limits.held_to_nproc() else None
    if worker is None:
        what = f"its fork server, for {asked} workers (none had started)"
    else:
        of = f", one of {asked} more" if more else f" of {asked}"
        what = f"worker {worker}{of} ({started} of them had started, and were stopped)"
    return WorkerStartError(
        code,
        f"mpfeed could not start {what}: {how} failed with {limits.refused(code, in_use)}",
        worker=worker,
        started=started,
    )


def _threads_of_user() -> int:
    """Processes and threads of this user (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for process in psutil.process_iter(["uids", "num_threads"]):
        uids, threads = process.info["uids"], process.info["num_threads"]
        if uids is not None and uids.real == uid:
            count += threads or 1
    return count


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def pickle_work(source: Any, args: tuple, kwargs: dict) -> bytes:
    """Pickle what every worker needs, naming the culprit when something can't travel."""
    for what, value in [
        ("source", source),
        *[(f"args[{i}]", a) for i, a in enumerate(args)],
        *[(f"kwargs[{k!r}]", v) for k, v in kwargs.items()],
    ]:
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            name = getattr(value, "__qualname__", type(value).__name__)
            hint = (
                "define it at module level"
                if what == "source"
                else "pass something picklable (a path instead of an open file, a config instead of a lock)"
            )
            raise TypeError(
                "mpfeed sends `source` to its worker processes (fresh interpreters, never copies of this "
                f"one), so {what} must be picklable; "
                f"{name!r} can't be pickled ({type(error).__name__}: {error}): {hint}"
            ) from error
    return pickle.dumps((source, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)


def main_module_spec(work: bytes) -> dict:
    """How the child should set up ``__main__``: only when the pickled work refers to it."""
    if b"__main__" not in work:
        return {}
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name and spec_name != "__main__":
        return {"main_name": spec_name}
    path = getattr(main, "__file__", None)
    if path and os.path.isfile(path):
        return {"main_path": os.path.abspath(path)}
    where = "a script read from standard input" if path == "<stdin>" else "an interactive session's __main__"
    raise TypeError(
        f"mpfeed's source (or an argument) is defined in {where}, which mpfeed's worker processes (fresh "
        "interpreters) cannot "
        "import: define it in a module (a .py file) and import it"
    )


def worker_environment() -> dict[str, str]:
    """The consumer's environment, with math libraries single-threaded unless the user said otherwise."""
    return {**{name: "1" for name in SINGLE_THREADED}, **os.environ}


def launch(work: bytes, main_spec: dict, setup: protocol.WorkerSetup | str) -> tuple[SpawnedProcess, Channel]:
    """Start one interpreter (a worker, or a fork server for ``setup == "forkserver"``); returns its process
    and the consumer's end of its pipe."""
    parent_end, child_end = socket.socketpair()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", _CHILD_PROGRAM, str(child_end.fileno()), _PACKAGE_PARENT],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
            env=worker_environment(),
        )
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    channel = Channel(parent_end)
    try:
        bootstrap = {"sys_path": list(sys.path), "cwd": os.getcwd(), **main_spec}
        for message in (pickle.dumps(bootstrap), work, pickle.dumps(setup)):
            if not channel.send(message):
                break  # the child died at once; the supervisor reports its exit
    except BaseException:  # a Ctrl-C before the caller holds the child: no one else would stop and reap it
        channel.close()
        popen.kill()
        popen.wait(_SERVER_EXIT_WAIT_S)
        raise
    return SpawnedProcess(popen), channel


class ForkServer:
    """The consumer's handle on its fork server (`mpfeed.forkserver` is the server's side)."""

    def __init__(self, work: bytes, main_spec: dict) -> None:
        self.process, self.channel = launch(work, main_spec, FORKSERVER_ROLE)
        self.exits: dict[int, int] = {}  # worker pid -> exit code, as the server reports them
        self.gone = False
        self._answers: list[int | OSError] = []  # to this fork_all's requests: a pid, or the refusal
        self._failure: protocol.Failure | None = None  # why the server could not start, as it said

    def fork_all(
        self, setups: list[protocol.WorkerSetup]
    ) -> tuple[list[tuple[int, ForkedProcess, Channel]], tuple[int, OSError] | None]:
        """Fork one worker per setup. Returns, for each worker started, its offset in ``setups``, its
        process and the consumer's end of its pipe; and ``(offset, error)`` for the first fork the kernel
        refused (no more are asked for then; the caller stops those started), or None.

        Requests are pipelined, at most `_FORKS_IN_FLIGHT` unanswered: sent all at once, the server's
        answers would fill the pipe back while we still send, and each side would wait for the other."""
        ends = []
        try:
            for sent_so_far, setup in enumerate(setups):
                self._await_answers(sent_so_far - _FORKS_IN_FLIGHT + 1)
                if any(isinstance(answer, OSError) for answer in self._answers):
                    break
                parent_end, child_end = socket.socketpair()
                ends.append(Channel(parent_end))
                try:
                    sent = self.channel.send(protocol.FORK + pickle.dumps(setup))
                    if sent:
                        socket.send_fds(self.channel.socket, [b"\0"], [child_end.fileno()])
                except OSError:
                    sent = False
                finally:
                    child_end.close()
                if not sent:
                    raise self.died()
            self._await_answers(len(ends))
        except BaseException:
            for end in ends:
                end.close()
            raise
        answers, self._answers = self._answers, []
        started, refusal = [], None
        for offset, (answer, end) in enumerate(zip(answers, ends)):
            if isinstance(answer, OSError):
                end.close()
                refusal = refusal or (offset, answer)
            else:
                started.append((offset, ForkedProcess(answer, self.exits), end))
        return started, refusal

    def _await_answers(self, count: int) -> None:
        """Wait until the server has answered ``count`` requests of this `fork_all`, as long as it keeps
        answering: `_SERVER_ANSWER_S` without a new answer is a server that stopped."""
        self.read()
        deadline = time.monotonic() + _SERVER_ANSWER_S
        answered = len(self._answers)
        while len(self._answers) < count:
            self.read(_READ_SLICE_S)
            if len(self._answers) > answered:
                answered, deadline = len(self._answers), time.monotonic() + _SERVER_ANSWER_S
            if self.gone or time.monotonic() > deadline:
                raise self.died()

    def read(self, timeout: float = 0.0) -> None:
        """Take the server's news (pids of new workers or refused forks, exit codes of ended ones),
        waiting at most ``timeout`` seconds for some."""
        if timeout > 0 and not self.gone:
            _wait_readable(self.channel, timeout)
        for message in self.channel.receive():
            tag = message[:1]
            if tag == protocol.PID:
                self._answers.append(protocol.read_pid(message))
            elif tag == protocol.REFUSED:
                code = protocol.read_refused(message)
                self._answers.append(OSError(code, os.strerror(code)))
            elif tag == protocol.EXITED:
                pid, code = protocol.read_exited(message)
                self.exits[pid] = code
            elif tag == protocol.FAILED:
                self._failure = pickle.loads(message[1:])
        self.gone = self.channel.eof

    def describe(self) -> str:
        """``mpfeed's fork server (pid N) was killed by SIGKILL (-9)``, or how else it ended."""
        self.process.wait(_READ_SLICE_S)  # it is gone: this reaps it
        return f"mpfeed's fork server (pid {self.process.pid}) {describe_exit(self.process.exit_code())}"

    def died(self) -> WorkerError:
        """The error for a server that ended (or stopped answering) before starting every worker."""
        self.read(_READ_SLICE_S)  # its last words
        if self.process.wait(_SERVER_EXIT_WAIT_S if self.gone else 0):
            state = describe_exit(self.process.exit_code())
        else:
            state = f"did not answer within {_SERVER_ANSWER_S:g} s"
        who = f"mpfeed's fork server (pid {self.process.pid})"
        failure = self._failure
        if failure is None:
            return WorkerError(
                f"{who} {state} before starting the workers", worker=None, pid=self.process.pid
            )
        trace = f"\n\nWorker traceback:\n{failure.traceback}"
        return WorkerError(
            f"{who} could not start: {failure.type}: {failure.message}{trace}",
            worker=None,
            pid=self.process.pid,
            remote_traceback=failure.traceback,
        )

    def close(self) -> None:
        """Close our end: the server terminates what is left of its workers, reaps them and exits."""
        self.channel.close()
        if not self.process.wait(_SERVER_EXIT_WAIT_S):
            self.process.kill()
            self.process.wait(_SERVER_EXIT_WAIT_S)
        self.process.release()


def _wait_readable(channel: Channel, seconds: float) -> None:
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.poll(max(0, int(seconds * 1000 + 0.999)))
