"""The fork server's side: one fresh interpreter per feeder imports mpfeed and numpy, then forks every worker.

A spawned worker pays for starting an interpreter and importing numpy; forked from a server that has
done that already, it starts in milliseconds. A fork the kernel refuses is answered with its errno, and
the server goes on. The server never runs user code: each forked worker
imports the user's modules and unpickles the source itself (`mpfeed.bootstrap.start_worker`), so nothing
created at import is shared between workers, and the server stays single-threaded, which is what makes
forking it safe. It never touches the rings. Messages: see `mpfeed.protocol`; the consumer's handle is
`mpfeed.launcher.ForkServer`. When the consumer's end closes (close(), or the consumer died) the server
terminates the workers it still has, reaps them and exits.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from . import protocol

_REAP_INTERVAL_S = 0.05
_CHILDREN_GRACE_S = 2.0


def serve(connection: Connection, start_worker: Callable[[Connection, protocol.WorkerSetup], int]) -> int:
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
            setup = replace(pickle.loads(message[1:]), parent_pid=os.getpid())
            _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as error:  # EAGAIN (a limit on processes), ENOMEM: the consumer says which
                os.close(fds[0])
                try:
                    connection.send_bytes(protocol.refused(error.errno or 0))
                except OSError:
                    break
                continue
            if pid == 0:
                code = 1
                try:
                    connection.close()
                    channel.close()
                    os.set_inheritable(fds[0], False)
                    code = start_worker(Connection(fds[0]), setup)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            os.close(fds[0])
            children.add(pid)
            try:
                connection.send_bytes(protocol.pid(pid))
            except OSError:
                break  # the consumer's end is gone (it gave up, or died): end with it, quietly
    finally:
        _end_children(children)
    return 0


def _end_children(children: set[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL: a worker that handles SIGTERM cannot keep us alive."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            try:
                os.kill(pid, signum)  # safe: we are their parent and have not reaped them
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
            connection.send_bytes(protocol.exited(pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass
