"""How a worker process comes to life: a fresh interpreter that never imports TensorFlow.

We start workers with `subprocess` rather than `multiprocessing`: a spawned ``multiprocessing`` child
re-runs the user's main module, and with it a top-level ``import tensorflow`` (seconds and hundreds of MB
per worker, and TensorFlow's threads). Here the child imports the main module only when the source or its
arguments live there, and always with a guard that answers ``import tensorflow`` (and Keras) with an inert
stand-in, so a training script can import TensorFlow at the top and still define its source beside it.

Parent side: `launch` checks that everything pickles, starts the interpreter with one end of a socket
pair, and sends it two messages: the bootstrap (sys.path, cwd, main module) and then the pickled work.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import pickle
import signal
import socket
import subprocess
import sys
import types
from multiprocessing.connection import Connection
from typing import Any

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_PROGRAM = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from mpfeed.spawn import child_main; child_main(int(sys.argv[1]))"
)
GUARDED_MODULES = ("tensorflow", "keras", "tf_keras")
importing_main = False  # true in a worker while it imports the user's main script


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
                f"mpfeed runs `source` in spawned worker processes, so {what} must be picklable; "
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
    if path:
        return {"main_path": os.path.abspath(path)}
    raise TypeError(
        "mpfeed's source (or an argument) is defined in an interactive session's __main__, which "
        "spawned worker processes cannot import: define it in a module (a .py file) and import it"
    )


# Math libraries start a thread per core in every process that loads them: N workers would start N x
# cores threads (which spin at start-up, doubling a worker's start-up CPU) and then oversubscribe the
# machine. Workers get one each, unless the user set these variables.
SINGLE_THREADED = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_environment() -> dict[str, str]:
    """The consumer's environment, with math libraries single-threaded unless the user said otherwise."""
    return {**{name: "1" for name in SINGLE_THREADED}, **os.environ}


def launch(work: bytes, main_spec: dict, config: dict) -> tuple[subprocess.Popen, Connection]:
    """Start one worker interpreter; returns its process and the parent's end of its pipe.

    ``work`` is `pickle_work`'s result, the same for every worker; ``config`` is this worker's own (or
    ``{"role": "forkserver"}`` for a fork server, see `mpfeed.forkserver`)."""
    parent_end, child_end = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_PROGRAM, str(child_end.fileno()), _PACKAGE_PARENT],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
            env=worker_environment(),
        )
    finally:
        child_end.close()
    connection = Connection(parent_end.detach())
    bootstrap = {"sys_path": list(sys.path), "cwd": os.getcwd(), **main_spec}
    try:
        connection.send_bytes(pickle.dumps(bootstrap))
        connection.send_bytes(work)
        connection.send_bytes(pickle.dumps(config))
    except OSError:
        pass  # the child died at once; the supervisor reports its exit
    return process, connection


class _InertModule(types.ModuleType):
    """What ``import tensorflow`` gives inside a worker: every attribute is an inert stand-in."""

    def __getattr__(self, name: str) -> Any:
        if name == "__version__":
            return "0+inert"
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{self.__name__}.{name}")


class _StandIn(type):
    """An inert stand-in for a TensorFlow or Keras object. Stand-ins are classes, so a script may
    subclass them at its top level (``class Clock(keras.callbacks.Callback)``), decorate with them, call
    them and read their attributes; each of those gives another stand-in."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return _stand_in(f"{cls.__qualname__}()")

    # Enough of the container and context protocols for the usual top-level lines of a training
    # script: `for gpu in tf.config.list_physical_devices("GPU")`, `len(...)`, `with strategy.scope():`.
    def __iter__(cls):
        return iter(())

    def __len__(cls) -> int:
        return 0

    def __getitem__(cls, key: Any) -> Any:
        return _stand_in(f"{cls.__qualname__}[]")

    def __enter__(cls) -> Any:
        return cls

    def __exit__(cls, *exc_info: Any) -> None:
        return None

    def __repr__(cls) -> str:
        return (
            f"<inert stand-in for {cls.__qualname__}: mpfeed workers never load TensorFlow; "
            "do the work with numpy or Pillow>"
        )


def _stand_in(name: str) -> type:
    stand_in = _StandIn(name.rsplit(".", 1)[-1], (), {"__module__": name.rsplit(".", 1)[0]})
    stand_in.__qualname__ = name
    return stand_in


class _TensorFlowGuard(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of TensorFlow and Keras (and their submodules) with `_InertModule`s."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in GUARDED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def child_main(fd: int) -> None:
    """Interpreter entry point: read everything the parent sends, set up like the parent, then become a
    worker or a fork server. Reading first means a slow main-module import never blocks the parent."""
    # Ctrl-C reaches the whole process group; the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_inheritable(fd, False)  # a subprocess of the source must not keep our pipe open
    connection = Connection(fd)
    bootstrap = pickle.loads(connection.recv_bytes())
    work = connection.recv_bytes()
    config = pickle.loads(connection.recv_bytes())
    sys.path[:] = bootstrap["sys_path"]
    os.chdir(bootstrap["cwd"])
    sys.meta_path.insert(0, _TensorFlowGuard())
    if config.get("role") == "forkserver":
        from . import forkserver

        sys.exit(forkserver.serve(connection, bootstrap, work))
    sys.exit(start_worker(connection, bootstrap, work, config))


def start_worker(connection: Connection, bootstrap: dict, work: bytes, config: dict) -> int:
    """In a new worker process (spawned, or just forked): import what the work needs, unpickle it, run.
    Each worker does this itself, so nothing the user's modules create at import is shared."""
    from . import worker

    global importing_main
    try:
        if "main_name" in bootstrap or "main_path" in bootstrap:
            importing_main = True
            try:
                _import_main(bootstrap)
            finally:
                importing_main = False
        source, args, kwargs = pickle.loads(work)
    except BaseException as error:
        worker.report_failure(connection, "start", error, element=None, epoch=0)
        return worker.EXIT_FAILED
    return worker.run(connection, source, args, kwargs, config)


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
