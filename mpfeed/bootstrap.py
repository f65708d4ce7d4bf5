"""The child's side of starting: a fresh interpreter reads what the parent sent, sets itself up like the
parent (sys.path, cwd, the TensorFlow guard), then becomes a worker or a fork server.

Reading everything first means a slow import of the user's main module never blocks the parent.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import types
from multiprocessing.connection import Connection

from . import tfguard

importing_main = False  # true in a worker while it imports the user's main script


def child_main(fd: int) -> None:
    """Interpreter entry point (see `mpfeed.launcher`)."""
    # Ctrl-C reaches the whole process group; the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_inheritable(fd, False)  # a subprocess of the source must not keep our pipe open
    connection = Connection(fd)
    try:
        bootstrap = pickle.loads(connection.recv_bytes())
        work = connection.recv_bytes()
        setup = pickle.loads(connection.recv_bytes())
    except EOFError:  # the consumer gave up on us before we began (a Ctrl-C mid-start): nothing to say
        sys.exit(0)
    sys.path[:] = bootstrap["sys_path"]
    os.chdir(bootstrap["cwd"])
    tfguard.install()
    if setup == "forkserver":
        from . import forkserver

        sys.exit(forkserver.serve(connection, lambda conn, setup: start_worker(conn, bootstrap, work, setup)))
    sys.exit(start_worker(connection, bootstrap, work, setup))


def start_worker(connection: Connection, bootstrap: dict, work: bytes, setup) -> int:
    """In a new worker process (spawned, or just forked): import what the work needs, unpickle it, run.
    Each worker does this itself, so nothing the user's modules create at import is shared."""
    from . import worker

    global importing_main
    try:
        if "main_name" in bootstrap or "main_path" in bootstrap:
            importing_main = True
            try:
                with tfguard.lenient():
                    _import_main(bootstrap)
            finally:
                importing_main = False
        source, args, kwargs = pickle.loads(work)
    except BaseException as error:
        worker.report_failure(connection, "start", error, element=None, epoch=0)
        return worker.EXIT_FAILED
    return worker.run(connection, source, args, kwargs, setup)


def _import_main(bootstrap: dict) -> None:
    """Import the parent's main module as ``__mp_main__`` (its ``if __name__ == "__main__":`` block does
    not run) and make it ``__main__`` for unpickling, as multiprocessing's spawn does."""
    import runpy

    module = types.ModuleType("__mp_main__")
    if "main_name" in bootstrap:
        content = runpy.run_module(bootstrap["main_name"], run_name="__mp_main__", alter_sys=True)
    else:
        content = runpy.run_path(bootstrap["main_path"], run_name="__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
