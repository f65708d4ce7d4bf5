"""A fork server per feeder: one fresh interpreter imports mpfeed and numpy, then forks every worker.

A spawned worker pays for starting an interpreter and importing numpy; forked from a server that has
done that already, it starts in milliseconds. The server never runs user code: each forked worker
imports the user's modules and unpickles the source itself, so nothing created at import (an open
file, a random generator, a thread pool) is shared between workers, and the server stays
single-threaded, which is what makes forking it safe. It never touches the rings.

Consumer to server:  FORK + pickled worker config, then the worker's pipe end as an SCM_RIGHTS fd
Server to consumer:  PID + pid (one per FORK, in order); EXITED + pid + exit code (as workers end)
When the consumer's end closes (close(), or the consumer died) the server terminates the workers it
still has, reaps them and exits.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import psutil

from . import protocol, spawn
from .errors import WorkerError, describe_exit

FORK, PID, EXITED = b"K", b"P", b"Q"
_PID = struct.Struct("<I")
_EXIT = struct.Struct("<Ii")
_REAP_INTERVAL_S = 0.05
_SERVER_EXIT_WAIT_S = 5.0
_SERVER_ANSWER_S = 30.0  # for the server to report the pids of the workers it forked
_CHILDREN_GRACE_S = 2.0


# -- the server process ------------------------------------------------------------------------------


def serve(connection: Connection, bootstrap: dict, work: bytes) -> int:
    """The server's loop: fork workers on request, report their exits, end with the consumer."""
    from . import worker  # noqa: F401  (preloaded for every worker: numpy and mpfeed's worker side)

    channel = socket.socket(fileno=os.dup(connection.fileno()))
    children: set[int] = set()
    try:
        while True:
            _report_exits(connection, children)
            try:
                if not connection.poll(_REAP_INTERVAL_S):
                    continue
                message = connection.recv_bytes()
            except (EOFError, OSError):
                break
            config = pickle.loads(message[1:])
            _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            config["parent_pid"] = os.getpid()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    connection.close()
                    channel.close()
                    os.set_inheritable(fds[0], False)
                    code = spawn.start_worker(Connection(fds[0]), bootstrap, work, config)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            os.close(fds[0])
            children.add(pid)
            connection.send_bytes(PID + _PID.pack(pid))
    finally:
        _end_children(children)
    return 0


def _end_children(children: set[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL: a worker that handles SIGTERM cannot keep us alive."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _CHILDREN_GRACE_S
        while children and time.monotonic() < deadline:
            for pid in list(children):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        children.discard(pid)
                except ChildProcessError:
                    children.discard(pid)
            time.sleep(0.01)


def _report_exits(connection: Connection, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            connection.send_bytes(EXITED + _EXIT.pack(pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass


# -- the consumer's side -----------------------------------------------------------------------------


class ForkServer:
    """The consumer's handle on its fork server."""

    def __init__(self, work: bytes, main_spec: dict) -> None:
        self.process, self.connection = spawn.launch(work, main_spec, {"role": "forkserver"})
        self._channel = socket.socket(fileno=os.dup(self.connection.fileno()))
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}
        self.gone = False
        self._failure: dict | None = None  # why the server could not start, as it reported

    def fork_all(self, configs: list[dict]) -> list[tuple[ForkedProcess, Connection]]:
        """Fork one worker per config; returns each one's process and the consumer's end of its pipe."""
        ends = []
        for config in configs:
            parent_end, child_end = socket.socketpair()
            try:
                self.connection.send_bytes(FORK + pickle.dumps(config))
                socket.send_fds(self._channel, [b"\0"], [child_end.fileno()])
            except OSError:
                parent_end.close()
                raise self._died() from None
            finally:
                child_end.close()
            ends.append(Connection(parent_end.detach()))
        deadline = time.monotonic() + _SERVER_ANSWER_S
        while len(self._pids) < len(configs):
            self.read(timeout=_REAP_INTERVAL_S)
            if self.gone or time.monotonic() > deadline:
                for end in ends:
                    end.close()
                raise self._died()
        pids, self._pids = self._pids, []
        return [(ForkedProcess(self, pid), end) for pid, end in zip(pids, ends)]

    def read(self, timeout: float = 0.0) -> None:
        """Take the server's news: pids of new workers, exit codes of ended ones."""
        try:
            if not self.connection.poll(timeout):
                return
            while True:
                message = self.connection.recv_bytes()
                if message[:1] == PID:
                    self._pids.append(_PID.unpack_from(message, 1)[0])
                elif message[:1] == EXITED:
                    pid, code = _EXIT.unpack_from(message, 1)
                    self.exits[pid] = code
                elif message[:1] == protocol.FAILED:
                    self._failure = pickle.loads(message[1:])
                if not self.connection.poll(0):
                    return
        except (EOFError, OSError):
            self.gone = True

    def _died(self) -> WorkerError:
        self.read(timeout=_REAP_INTERVAL_S)  # its last words
        try:
            code = self.process.wait(_SERVER_EXIT_WAIT_S if self.gone else 0)
            state = describe_exit(code)
        except subprocess.TimeoutExpired:
            state = f"did not answer within {_SERVER_ANSWER_S:g} s"
        who = f"mpfeed's fork server (pid {self.process.pid})"
        if self._failure is None:
            return WorkerError(
                f"{who} {state} before starting the workers", worker=None, pid=self.process.pid
            )
        info = self._failure
        return WorkerError(
            f"{who} could not start: {info['type']}: {info['message']}\n\n"
            f"Worker traceback:\n{info['traceback']}",
            worker=None,
            pid=self.process.pid,
            remote_traceback=info["traceback"],
        )

    def close(self) -> None:
        """Close our end: the server terminates what is left of its workers, reaps them and exits."""
        self._channel.close()
        self.connection.close()
        try:
            self.process.wait(_SERVER_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedProcess:
    """A worker forked by the server: the parts of `subprocess.Popen` the supervisor uses."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid

    def poll(self) -> int | None:
        self.server.read()
        return self.server.exits.get(self.pid)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; None when the server died before reporting it and the process is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pid not in self.server.exits:
            if self.server.gone and not _alive(self.pid):
                return None
            remaining = _REAP_INTERVAL_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            if self.server.gone:
                time.sleep(min(remaining, _REAP_INTERVAL_S))
            else:
                self.server.read(min(remaining, _REAP_INTERVAL_S))
        return self.server.exits[self.pid]

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.pid not in self.server.exits:  # once reaped, the pid may belong to someone else
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
