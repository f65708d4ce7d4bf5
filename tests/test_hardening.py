"""Regression tests for races, interrupts and edge cases found in review. Each reproduces its failure for
real (worker processes, shared memory, TensorFlow) and is named after the failure it guards. A test that
could hang runs the consumer in its own interpreter, or in a thread, and fails by a bound instead."""

from __future__ import annotations

import ast
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import hardening_sources
import numpy as np
import psutil
import pytest
import sources
from conftest import shm_entries

import mpfeed

HANG_BOUND_S = 30  # generous: these must answer in about a second; the bound only catches hangs
_RACE_BUDGET_S = 8  # how long a race test keeps starting trials (each trial is a fraction of a second)


# -- consumer scripts --------------------------------------------------------------------------------


def _run_script(body: str) -> subprocess.Popen:
    """A consumer script in its own interpreter and session; SIGUSR1 makes it print every thread's stack."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = _DUMP_ON_SIGUSR1 + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _run_code(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh interpreter that imports what the tests import; waits for it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


_DUMP_ON_SIGUSR1 = "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def _finish(process: subprocess.Popen, bound_s: float = HANG_BOUND_S) -> tuple[int | str, str, str]:
    """The script's exit status, stdout and stderr; a script still running after ``bound_s`` prints its
    stacks (into the stderr returned) and is killed with its whole session, and its status is "hung"."""
    try:
        out, err = process.communicate(timeout=bound_s)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        _kill_session(process)
        out, err = process.communicate()
        return "hung", out, err


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _assert_stopped(pids) -> None:
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    running = [p.pid for p in alive if _lives(p.pid)]
    assert not running, f"workers still running: {running}"


def _bounded(call, feeder):
    """``call()`` in a thread, bounded by HANG_BOUND_S; on a hang, the feeder's workers are killed so that
    the test fails alone instead of leaving them to the tests after it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(HANG_BOUND_S)
    if thread.is_alive():
        for child in psutil.Process().children(recursive=True):
            child.kill()
        pytest.fail(f"hung for {HANG_BOUND_S} s with {feeder!r}")
    value, error = result[0]
    if error is not None:
        raise error
    return value


def _outcome(call):
    try:
        return call(), None
    except BaseException as error:
        return None, error


def _lives(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie), read from /proc without signalling."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


# -- stats() from other threads ----------------------------------------------------------------------

_STATS_RACE = """
    import faulthandler, os, sys, threading, time
    import mpfeed, hardening_sources

    # Switch threads as often as the interpreter allows: the same code, with its race windows wide open.
    sys.setswitchinterval(1e-6)
    SCENARIO, START_METHOD, MONITORS, WORKERS = {scenario!r}, {start_method!r}, {monitors}, {workers}
    BUDGET_S, BOUND_S = {budget}, {bound}

    def fail(what):
        print(what, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        sys.stdout.flush()
        os._exit(3)

    def bounded(target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        thread.join(BOUND_S)
        if thread.is_alive():
            fail(f"HANG: {{name}} did not return within {{BOUND_S}} s in trial {{trial}}")

    started = time.monotonic()
    trial = 0
    while time.monotonic() - started < BUDGET_S:
        victims = (1,) if SCENARIO == "exit" else ()
        feeder = mpfeed.Feeder(
            hardening_sources.exits_mid_stream,
            args=(10**6, 20, victims, "exit0"),
            workers=WORKERS,
            start_method=START_METHOD,
        )
        stop = threading.Event()
        problems = []

        def monitor():
            while not stop.is_set():
                try:
                    feeder.stats()
                except mpfeed.MpfeedError:
                    pass  # a closed or broken feeder may say so; anything else is a fault
                except BaseException as error:
                    problems.append(f"stats() raised {{type(error).__name__}}: {{error}}")
                    return

        monitors = [threading.Thread(target=monitor, daemon=True) for _ in range(MONITORS)]
        for thread in monitors:
            thread.start()
        outcome = []

        def consume():
            try:
                for k, _ in enumerate(feeder):
                    if SCENARIO == "close" and k == 40:
                        break
                outcome.append("done")
            except BaseException as error:
                outcome.append(error)

        bounded(consume, "the consumer")
        if SCENARIO == "exit" and not isinstance(outcome[0], mpfeed.WorkerDiedError):
            fail(f"WRONG: trial {{trial}}: the consumer got {{outcome[0]!r}}, not WorkerDiedError")
        if SCENARIO == "close" and outcome[0] != "done":
            fail(f"WRONG: trial {{trial}}: the consumer got {{outcome[0]!r}}")
        bounded(feeder.close, "close()")
        stop.set()
        for thread in monitors:
            thread.join(BOUND_S)
            if thread.is_alive():
                fail(f"HANG: a stats() thread did not return within {{BOUND_S}} s in trial {{trial}}")
        if problems:
            fail(f"WRONG: trial {{trial}}: {{problems[0]}}")
        trial += 1
    print(f"OK {{trial}} trials", flush=True)
"""


@pytest.mark.parametrize(
    "scenario, monitors, workers, budget",
    [("exit", 1, 2, 1.5 * _RACE_BUDGET_S), ("close", 2, 10, 1.5 * _RACE_BUDGET_S)],
    ids=["a worker exits mid-stream, one stats() thread", "close() while two stats() threads run"],
)
def test_stats_from_other_threads_never_hangs_or_disturbs_the_consumer(
    scenario, monitors, workers, budget, start_method
):
    """The fork server's pipe had two readers (the consumer and stats()), so under forkserver a length
    header read by one and its payload by the other left both blocked forever. Old code: the consumer
    or close() hung within a few trials, or stats() raised TypeError."""
    if start_method == "spawn":
        budget = 3  # no fork server pipe to share: a short run checks that stats() disturbs nothing else
    script = _STATS_RACE.format(
        scenario=scenario,
        start_method=start_method,
        monitors=monitors,
        workers=workers,
        budget=budget,
        bound=HANG_BOUND_S,
    )
    status, out, err = _finish(_run_script(script), budget + 2 * HANG_BOUND_S)
    assert status == 0 and out.startswith("OK"), f"{status}\n{out}\n{err[-6000:]}"


# -- KeyboardInterrupt at any moment -----------------------------------------------------------------

_INTERRUPTED = """
    import json, random, signal, sys, time
    import numpy as np, psutil, mpfeed, sources
    {setup}

    N, BUDGET_S, BOUND_S, SEED = 30, {budget}, {bound}, {seed}
    BrokenError = getattr(mpfeed, "BrokenError", ())  # absent: anything but KeyboardInterrupt is wrong
    rng = random.Random(SEED)
    armed = [False]

    def interrupt(signum, frame):
        if armed[0]:  # one interrupt per attempt, raised wherever the main thread is
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)

    def disarm():
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def content_ok(array, label):
        return np.array_equal(array, np.arange(label, label + 64).reshape(8, 8))

    problems, counts, held = [], {{"complete": 0, "interrupted": 0}}, []
    broken = None
    feeder = mpfeed.Feeder(sources.pairs, args=(N,), workers=3, depth=2{backend})
    pids = [w.pid for w in feeder.stats().workers]
    started = time.monotonic()
    try:
        attempt = 0
        while time.monotonic() - started < BUDGET_S and not problems and broken is None:
            got, state = [], "interrupted"
            # Mostly 0.3-3 ms (mid-transition), now and then late enough for whole epochs to complete.
            delay = rng.uniform(0.0003, 0.003) if attempt % 4 else rng.uniform(0.01, 0.05)
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, delay)
                try:
                    for array, label in feeder:  # a new for loop: a new epoch
                        got.append(label)
                        if not content_ok(array, label):
                            problems.append(f"attempt {{attempt}}: element {{label}} has wrong content")
                        if label % 7 == 0:
                            held.append((array, label))
                    state = "complete"
                finally:
                    disarm()
            except KeyboardInterrupt:
                pass
            except Exception as error:
                if isinstance(error, BrokenError):
                    broken = error
                else:
                    problems.append(f"attempt {{attempt}}: {{type(error).__name__}}: {{error}}")
            counts[state] += 1
            if got != list(range(len(got))):
                problems.append(f"attempt {{attempt}} ({{state}}): elements {{got[:12]}}, not 0, 1, 2, ...")
            if state == "complete" and len(got) != N:
                problems.append(f"attempt {{attempt}}: a completed epoch had {{len(got)}} of {{N}} elements")
            for array, label in held:
                if not content_ok(array, label):
                    problems.append(f"after attempt {{attempt}}: a held view of element {{label}} changed")
                    break
            del held[:-6]
            attempt += 1
        if broken is None and not problems:
            # After all that, an epoch nobody interrupts must complete (a lost credit would stall it).
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, BOUND_S)
                try:
                    got = [label for _, label in feeder]
                finally:
                    disarm()
                if got != list(range(N)):
                    problems.append(f"the last epoch, not interrupted, gave {{got[:12]}}...")
            except KeyboardInterrupt:
                problems.append(f"an epoch nobody interrupted did not end within {{BOUND_S}} s")
            except Exception as error:
                if isinstance(error, BrokenError):
                    broken = error
                else:
                    problems.append(f"the last epoch: {{type(error).__name__}}: {{error}}")
        if broken is not None:
            for call in (lambda: next(iter(feeder)), lambda: list(feeder)):
                try:
                    call()
                    problems.append("a broken feeder served another epoch")
                except BrokenError:
                    pass
                except Exception as error:
                    problems.append(f"a broken feeder raised {{type(error).__name__}}: {{error}}")
    finally:
        disarm()
        feeder.close()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    if alive:
        problems.append(f"workers still running after close(): {{alive}}")
    print(json.dumps({{"counts": counts, "broken": repr(broken), "problems": problems[:5]}}), flush=True)
"""


def interrupted_script(budget: float, seed: int, setup: str = "", backend: str = "") -> str:
    """The consumer script of the KeyboardInterrupt race: ``setup`` runs first, ``backend`` (an expression)
    goes to the feeder."""
    return _INTERRUPTED.format(
        budget=budget,
        bound=HANG_BOUND_S / 2,
        seed=seed,
        setup=setup,
        backend=f", backend={backend}" if backend else "",
    )


def test_a_keyboard_interrupt_at_any_moment_leaves_the_feeder_consistent_or_broken():
    """SIGALRM raises KeyboardInterrupt in the main thread every 0.3-3 ms, wherever the feeder is, and the
    user starts a new epoch after each. Old code: epochs out of order, a held view's slot rewritten,
    EOFError from a half-read message."""
    before = shm_entries()
    seed = random.randrange(1 << 30)
    script = interrupted_script(budget=6, seed=seed)
    status, out, err = _finish(_run_script(script), _RACE_BUDGET_S + HANG_BOUND_S)
    assert status == 0, f"seed {seed}: {status}\n{out}\n{err[-6000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["problems"] == [], f"seed {seed}: {result}"
    assert result["counts"]["interrupted"] > 0
    assert hasattr(mpfeed, "BrokenError") and issubclass(mpfeed.BrokenError, mpfeed.MpfeedError)
    assert issubclass(mpfeed.BrokenError, RuntimeError)
    assert not shm_entries() - before


# -- one pass at a time ------------------------------------------------------------------------------


def test_a_superseded_iterator_raises_superseded_error_and_the_new_pass_is_whole():
    with mpfeed.Feeder(sources.epochs_and_seeds, args=(40,), workers=2) as feeder:
        first = iter(feeder)
        assert next(first)["i"] == 0
        second = iter(feeder)
        assert [(e["epoch"], e["i"]) for e in second] == [(0, i) for i in range(40)]  # 0: nothing moved
        with pytest.raises(mpfeed.SupersededError, match="one pass at a time"):
            next(first)
    assert issubclass(mpfeed.SupersededError, mpfeed.MpfeedError)
    assert issubclass(mpfeed.SupersededError, RuntimeError)


def test_a_superseded_iterator_in_another_thread_never_takes_an_element_of_the_new_pass():
    """A thread pulls from the first iterator while the main thread starts a second. Old code: the
    second pass lost element 0 to the first iterator or came out of order, or either iterator got
    "RuntimeError: concurrent poll() invocation"."""
    n = 3000
    for trial in range(6):
        with mpfeed.Feeder(sources.epochs_and_seeds, args=(n,), workers=2) as feeder:
            first = iter(feeder)
            next(first)
            taken, ended = [], []
            pulling = threading.Event()

            def pull(first=first, taken=taken, ended=ended, pulling=pulling):
                try:
                    for element in first:
                        pulling.set()
                        taken.append((int(element["epoch"]), int(element["i"])))
                    ended.append("the epoch ended")
                except BaseException as error:
                    ended.append(error)
                pulling.set()

            thread = threading.Thread(target=pull)
            thread.start()
            assert pulling.wait(HANG_BOUND_S)
            second = _bounded(lambda feeder=feeder: [(int(e["epoch"]), int(e["i"])) for e in feeder], feeder)
            thread.join(HANG_BOUND_S)
            assert not thread.is_alive(), f"trial {trial}: the superseded iterator hangs"
            assert all(epoch == 0 for epoch, _ in taken), f"trial {trial}: the old iterator took {taken[-3:]}"
            assert [i for _, i in taken] == list(range(1, len(taken) + 1))
            # It may have finished its epoch before the new pass began; if not, it was told why it stopped,
            # and the new pass serves the same epoch again (a pass that stopped early moves nothing).
            finished = ended[0] == "the epoch ended" and len(taken) == n - 1
            assert finished or isinstance(ended[0], mpfeed.SupersededError), f"trial {trial}: {ended[0]!r}"
            epoch = 1 if finished else 0
            assert second == [(epoch, i) for i in range(n)], (
                f"trial {trial}: the new pass was {second[:5]}..."
            )


@pytest.mark.parametrize("n, chunk_size", [(50, None), (50, 1), (3000, None)])
def test_zipping_a_feeder_dataset_with_itself_never_mixes_epochs_within_a_stream(n, chunk_size):
    """Old code: with one chunk, the zip paired epoch 0 with epoch 1 (each whole); with more, TensorFlow's
    UnknownError said "this iteration of the feeder was superseded", with no way forward. Each dataset
    iterator is its own pass, and passes run one at a time: when the two overlap, the older is refused
    with a message that says what to do; when one pass is over before the other starts (the whole epoch
    fit in one chunk), each side is one whole epoch, never a mixture."""
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.epochs_and_seeds, args=(n,), workers=2) as feeder:
        ds = feeder.dataset(chunk_size=chunk_size)
        pairs = []
        try:
            for a, b in tf.data.Dataset.zip((ds, ds)):
                pairs.append((int(a["epoch"]), int(a["i"]), int(b["epoch"]), int(b["i"])))
        except (tf.errors.OpError, mpfeed.MpfeedError) as error:
            assert "one pass at a time" in str(error), (pairs[:3], str(error)[:500])
            assert n > 256 or chunk_size == 1, "the epoch fit in one chunk, so the passes did not overlap"
            return
    assert len(pairs) == n
    assert [(ea, ia) for ea, ia, _, _ in pairs] == [(0, i) for i in range(n)]
    assert [(eb, ib) for _, _, eb, ib in pairs] == [(1, i) for i in range(n)]


def _tiny_model(keras):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


class _BatchCounter:
    """A Keras callback's hooks, counting the batches each training epoch and each validation saw."""

    def __init__(self, keras):
        counter = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                counter.train = batch + 1

            def on_epoch_end(self, epoch, logs=None):
                counter.log.append(("train", counter.train))

            def on_test_batch_end(self, batch, logs=None):
                counter.test = batch + 1

            def on_test_end(self, logs=None):
                counter.log.append(("validation", counter.test))

        self.log: list = []
        self.train = self.test = 0
        self.callback = Callback()


def _pairs_for_keras(tf, feeder, n: int, batch: int):
    """The feeder's `sources.pairs` as (features, binary label) batches for `_tiny_model`."""
    return (
        feeder.dataset()
        .batch(batch)
        .map(lambda x, y: (tf.reshape(tf.cast(x, tf.float32), (-1, 64)) / n, tf.cast(y % 2, tf.float32)))
    )


def test_model_fit_with_the_same_dataset_for_validation_works():
    """Plain tf.data allows ``fit(ds, validation_data=ds)``: Keras runs each epoch's training iterator to
    its end, then a fresh iterator for validation. (This passed on the old code too: it guards a fix
    against refusing it.)"""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    n, batch = 2000, 32  # 63 batches, the last one short
    with mpfeed.Feeder(sources.pairs, args=(n,), workers=2) as feeder:
        ds = _pairs_for_keras(tf, feeder, n, batch)
        counter = _BatchCounter(keras)
        with _keras_warnings_ignored():
            history = _tiny_model(keras).fit(
                ds, validation_data=ds, epochs=3, verbose=0, shuffle=False, callbacks=[counter.callback]
            )
        assert len(history.history["val_loss"]) == 3
        assert counter.log == [("validation", 63), ("train", 63)] * 3
        assert feeder.stats().items == 6 * n


def test_model_fit_with_steps_per_epoch_and_the_same_validation_dataset_works_or_says_one_pass_at_a_time():
    """With ``steps_per_epoch``, Keras keeps one training iterator across epochs while each validation
    makes a new one: two passes over one feeder at once. Old code: TensorFlow's UnknownError "this
    iteration of the feeder was superseded: a newer iteration started the next epoch" at the first step of
    the second epoch."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    n, batch = 2000, 32
    with mpfeed.Feeder(sources.pairs, args=(n,), workers=2) as feeder:
        ds = _pairs_for_keras(tf, feeder, n, batch)
        counter = _BatchCounter(keras)
        try:
            with _keras_warnings_ignored():
                _tiny_model(keras).fit(
                    ds,
                    validation_data=ds,
                    epochs=3,
                    steps_per_epoch=20,
                    verbose=0,
                    shuffle=False,
                    callbacks=[counter.callback],
                )
        except (tf.errors.OpError, mpfeed.MpfeedError) as error:
            assert "one pass at a time" in str(error), str(error)[:1000]
        else:
            assert counter.log == [("validation", 63), ("train", 20)] * 3


class _keras_warnings_ignored:
    """Keras 3 warns "Your input ran out of data" at the end of every epoch of a dataset of unknown
    length, plain tf.data included; the test suite turns warnings into errors."""

    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.filterwarnings("ignore", message="Your input ran out of data")

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info)


# -- TensorFlow inside a source ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["asarray", "len", "bool", "iter", "add", "multiply", "numpy_ufunc", "eq", "ne", "str", "format"]
)
def test_tensorflow_used_inside_a_source_fails_loudly(how):
    """Workers get an inert stand-in for TensorFlow. Old code: ``np.asarray(tf.zeros(3))`` was an empty
    float64 array, ``len`` 0, ``bool`` False and iteration empty, all silently; arithmetic failed
    without saying why."""
    with mpfeed.Feeder(hardening_sources.uses_tensorflow, args=(how,), workers=1) as feeder:
        with pytest.raises(mpfeed.SourceError) as caught:
            delivered = list(feeder)
            pytest.fail(f"the source's use of TensorFlow ({how}) delivered {delivered!r}")
    assert "TensorFlow cannot run in mpfeed workers" in str(caught.value)


def test_tensorflow_conversion_at_the_top_of_the_main_script_fails_in_workers(tmp_path):
    """Top-level lines that only touch TensorFlow still import in a worker; converting a stand-in to an
    array does not. Old code: the worker computed with an empty array."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import numpy as np
            import tensorflow as tf
            import mpfeed

            GPUS = tf.config.list_physical_devices("GPU")
            for gpu in GPUS:
                tf.config.experimental.set_memory_growth(gpu, True)
            REPLICAS = max(1, len(GPUS))
            with tf.device("/cpu:0"):
                MEAN = np.asarray(tf.constant([0.5, 0.5, 0.5]))

            def source(shard):
                yield MEAN

            if __name__ == "__main__":
                try:
                    with mpfeed.Feeder(source, workers=1) as feeder:
                        print("delivered", [e.tolist() for e in feeder])
                except mpfeed.WorkerError as error:
                    print(type(error).__name__, str(error).replace(chr(10), " "))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_BOUND_S * 2, env=env
    )
    assert "TensorFlow cannot run in mpfeed workers" in result.stdout, result.stdout + result.stderr[-3000:]


# -- Ctrl-C through TensorFlow -----------------------------------------------------------------------

_CTRL_C = """
    import signal
    # As in a terminal: a shell that runs the tests in the background would have us ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import warnings
    warnings.filterwarnings("ignore")
    import tensorflow as tf
    import mpfeed, sources

    feeder = mpfeed.Feeder(sources.slow, args=(100000, 0.002), workers=2, start_method={start_method!r})
    ds = feeder.dataset()
    print(" ".join(str(w.pid) for w in feeder.stats().workers), flush=True)
    if {how!r} == "dataset":
        for _ in ds:
            pass
    else:
        import keras
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y % 2, tf.float32)))
        ds = ds.batch(8).prefetch(tf.data.AUTOTUNE)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(ds, epochs=1000, verbose=0)
"""


@pytest.mark.parametrize("how", ["dataset", "fit"])
def test_ctrl_c_during_tensorflow_iteration_prints_only_the_keyboard_interrupt(how, start_method):
    """Ctrl-C reaches the whole foreground process group while TensorFlow pulls from the feeder, and the
    KeyboardInterrupt ends the script. Old code: "WorkerDiedError: worker 0 ... exited with code 0" logged
    after the KeyboardInterrupt, or an interpreter that never exited."""
    consumer = _run_script(_CTRL_C.format(start_method=start_method, how=how))
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        assert len(pids) == 2, consumer.communicate()
        time.sleep(2.0)  # well into the stream
        interrupted = time.monotonic()
        os.killpg(consumer.pid, signal.SIGINT)  # the terminal sends it to the whole foreground group
        status, out, err = _finish(consumer)
        took = time.monotonic() - interrupted
        assert status != "hung", f"still running {HANG_BOUND_S} s after Ctrl-C:\n{err[-6000:]}"
        assert status == -signal.SIGINT or status == 1, (status, err[-3000:])
        assert "KeyboardInterrupt" in err
        for words in ("WorkerDiedError", "exited with code", "WorkerError", "ClosedError"):
            assert words not in out + err, f"{words!r} printed after Ctrl-C:\n{err[-3000:]}"
        assert took < HANG_BOUND_S
        _assert_stopped(pids)
    finally:
        _kill_session(consumer)
        consumer.wait()


# -- raise first, shut down after --------------------------------------------------------------------


@pytest.mark.parametrize("how, kind", [("stall", "WorkerTimeoutError"), ("raise", "SourceError")])
def test_a_worker_error_is_raised_before_the_shutdown_finishes(how, kind, start_method, tmp_path):
    """Worker 1 fails; worker 0 is healthy but deep in a sleep that ignores SIGTERM, so stopping it takes
    the whole shutdown (STOP grace, SIGTERM, grace, SIGKILL). Old code ran all of that before raising:
    the error arrived only once worker 0 was dead, seconds later."""
    timeout = 1.0 if how == "stall" else None
    feeder = mpfeed.Feeder(
        hardening_sources.outlives_the_error,
        args=(how, str(tmp_path / "worker-0-sleeps")),
        workers=2,
        timeout=timeout,
        start_method=start_method,
    )
    try:
        pids = [w.pid for w in feeder.stats().workers]
        started = time.monotonic()
        with pytest.raises(getattr(mpfeed, kind)) as caught:
            for _ in feeder:
                pass
        worker_0_lived = _lives(pids[0])
        assert time.monotonic() - started < HANG_BOUND_S
        assert caught.value.worker == 1
        assert worker_0_lived, f"the {kind} was raised only after worker 0 had been killed"
    finally:
        feeder.close()
    _assert_stopped(pids)


# -- a killed fork server ----------------------------------------------------------------------------


def test_a_killed_fork_server_never_gets_signals_sent_to_its_dead_workers(monkeypatch):
    """The fork server and its workers are SIGKILLed: their pids are free for reuse. Old code: close()
    still sent SIGTERM and SIGKILL to each dead worker's pid, which could by then be anyone's."""
    sent = []
    real_kill = os.kill

    def recording_kill(pid, signum):
        if signum != 0:
            sent.append((pid, signal.Signals(signum).name, _lives(pid)))
        return real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", recording_kill)
    if hasattr(signal, "pidfd_send_signal"):
        real_pidfd_send_signal = signal.pidfd_send_signal

        def recording_pidfd_send_signal(pidfd, signum, *args):
            sent.append((f"pidfd {pidfd}", signal.Signals(signum).name, True))
            return real_pidfd_send_signal(pidfd, signum, *args)

        monkeypatch.setattr(signal, "pidfd_send_signal", recording_pidfd_send_signal)
    feeder = mpfeed.Feeder(sources.slow, args=(1000, 0.01), workers=2, start_method="forkserver")
    try:
        iterator = iter(feeder)
        for _ in range(5):
            next(iterator)
        workers = [w.pid for w in feeder.stats().workers]
        server = psutil.Process(workers[0]).parent()  # the fork server forked them
        assert server.ppid() == os.getpid()
        everyone = [server.pid, *workers]
        for pid in everyone:
            real_kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + HANG_BOUND_S  # dead; the server is left for the feeder to reap
        while any(_lives(pid) for pid in everyone) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(_lives(pid) for pid in everyone)
        started = time.monotonic()
        with pytest.raises(mpfeed.WorkerDiedError) as caught:
            for _ in iterator:
                pass
        assert time.monotonic() - started < HANG_BOUND_S
        assert f"mpfeed's fork server (pid {server.pid}) was killed by SIGKILL" in str(caught.value)
    finally:
        feeder.close()
    to_the_dead = [(pid, name) for pid, name, alive in sent if not alive]
    assert not to_the_dead, f"signals sent to processes that had already exited: {to_the_dead}"


# -- where the error of a failing source appears -----------------------------------------------------


def test_a_source_failing_after_its_first_element_always_fails_during_iteration_not_in_from_generator():
    """Old code inferred the signature from the first element and met another worker's failure while
    waiting for it: SourceError from from_generator() in some runs, an OpError while iterating in others."""
    tf = pytest.importorskip("tensorflow")
    outcomes = []
    for trial in range(10):
        workers = 2 + trial % 3
        try:
            ds = mpfeed.from_generator(
                hardening_sources.fails_after_a_slow_start, args=(40, 0.3, False), workers=workers
            )
        except mpfeed.MpfeedError as error:
            outcomes.append(f"trial {trial} ({workers} workers): from_generator raised {error!r:.200}")
            continue
        labels = []
        try:
            with pytest.raises(tf.errors.OpError, match="element 1 is bad"):
                for _, label in ds:
                    labels.append(int(label))
            assert labels == list(range(len(labels))) and len(labels) <= 1
        finally:
            ds._mpfeed_feeder.close()
            del ds
    assert not outcomes, f"{len(outcomes)} of 10 trials: {outcomes[:2]}"


def test_a_source_failing_on_its_very_first_element_raises_source_error_from_from_generator():
    """The other side of the rule: with no signature, nothing can be inferred, so from_generator() itself
    raises. (This passed on the old code too.)"""
    with pytest.raises(mpfeed.SourceError, match="element 0 is bad"):
        mpfeed.from_generator(hardening_sources.fails_after_a_slow_start, args=(40, 0.0, True), workers=2)


# -- smaller ones ------------------------------------------------------------------------------------


def test_close_from_another_thread_gives_the_consumer_closed_error_never_os_error():
    """close() stops the workers and closes their pipes while the consumer thread is reading the news of
    their exits. Old code: "OSError: handle is closed" from the consumer in about one trial in five
    (spawn, eight workers), never under forkserver, whose exit news comes later through the server."""
    rng = random.Random()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the same code, with its race windows wide open
    started, trial = time.monotonic(), 0
    try:
        while trial < 5 or (time.monotonic() - started < _RACE_BUDGET_S and trial < 30):
            feeder = mpfeed.Feeder(sources.slow, args=(10**6, 0.001), workers=8, start_method="spawn")
            iterator = iter(feeder)
            next(iterator)
            outcome = []

            def consume(iterator=iterator, outcome=outcome):
                try:
                    for _ in iterator:
                        pass
                    outcome.append("the epoch ended")
                except BaseException as error:
                    outcome.append(error)

            thread = threading.Thread(target=consume)
            thread.start()
            time.sleep(rng.uniform(0.0, 0.005))
            feeder.close()
            thread.join(HANG_BOUND_S)
            assert not thread.is_alive(), f"trial {trial}: the consumer hangs after close()"
            assert isinstance(outcome[0], mpfeed.ClosedError), f"trial {trial}: {outcome[0]!r}"
            trial += 1
    finally:
        sys.setswitchinterval(switch_interval)


def test_overflow_does_not_count_the_record_that_sizes_the_ring():
    """The first record of each worker travels through its pipe by design, to size the ring; only records
    too big for their slot are overflow. (Passed on the old code: a guard.)"""
    with mpfeed.Feeder(sources.pairs, args=(200,), workers=2) as feeder:
        for _ in range(2):
            assert [label for _, label in feeder] == list(range(200))
        assert feeder.stats().overflow == 0


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_seed_that_is_not_a_non_negative_int_is_refused_before_any_worker_starts(seed):
    """Old code accepted ``seed=-1`` and ``seed=1.5``, then every worker failed and the SourceError blamed
    the source."""
    with pytest.raises(ValueError, match="seed"):
        mpfeed.Feeder(sources.pairs, args=(4,), workers=1, seed=seed).close()
    assert not psutil.Process().children()


def test_a_lone_surrogate_string_is_an_element_error_naming_the_leaf():
    """Old code: "'utf-8' codec can't encode character '\\ud800'", without the leaf."""
    with mpfeed.Feeder(hardening_sources.leaf_values, args=(["fine", "\ud800"],), workers=1) as feeder:
        with pytest.raises(mpfeed.ElementError) as caught:
            list(feeder)
    message = str(caught.value)
    assert "element['text']" in message and "element 1 of its shard" in message


def test_numpy_strings_of_changing_length_are_carried():
    """Old code: "element['text'] changed mid-stream from a numpy <U2 scalar to a numpy <U4 scalar"."""
    leaves = [np.str_("ab"), np.str_("abcd"), np.str_(""), np.str_("ünï")]
    with mpfeed.Feeder(hardening_sources.leaf_values, args=(leaves,), workers=1) as feeder:
        got = [element["text"] for element in feeder]
    assert got == ["ab", "abcd", "", "ünï"]
    assert all(isinstance(text, str) for text in got)


def test_a_source_in_a_script_read_from_stdin_is_refused_before_any_worker_starts():
    """``python - <<EOF``: there is no file that workers could import. Old code started them, and each
    failed with "FileNotFoundError: ... '<stdin>'"."""
    script = textwrap.dedent(
        """
        import psutil, mpfeed

        def source(shard):
            yield 1

        if __name__ == "__main__":
            try:
                with mpfeed.Feeder(source, workers=2) as feeder:
                    print("delivered", list(feeder))
            except TypeError as error:
                print("TypeError", len(psutil.Process().children()), error)
            except Exception as error:
                print(type(error).__name__, str(error).replace(chr(10), " "))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=HANG_BOUND_S, env=env
    )
    assert result.stdout.startswith("TypeError 0 "), result.stdout + result.stderr[-3000:]
    assert "module" in result.stdout


@pytest.mark.parametrize("size", [4, 600], ids=["small elements, in chunks", "large elements, one by one"])
def test_a_shape_change_through_dataset_names_the_leaf_and_suggests_none_dimensions(size):
    """Old code: "`generator` yielded an element of shape (1, 5, 6, 3) where an element of shape (None, 4,
    4, 3) was expected": mpfeed's chunk dimension, and no leaf."""
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(hardening_sources.growing_image, args=(6, size), workers=2) as feeder:
        with pytest.raises(tf.errors.OpError) as caught:
            list(feeder.dataset())
    message = str(caught.value)
    assert "element['image']" in message, message[:1500]
    assert "output_signature" in message and "None" in message, message[:1500]
    assert f"(1, {size + 1}, {size + 2}, 3)" not in message and f"(None, {size}, {size}, 3)" not in message


def _can_mount_a_private_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True
    )
    return probe.returncode == 0


_DOCKER_SHM = """
    import json, os
    import numpy as np
    import hardening_sources, mpfeed

    n = 8 * 64 * 2
    rows = np.arange(224)[:, None, None]
    results = {"epochs": [], "bad": []}
    with mpfeed.Feeder(hardening_sources.images, args=(n,), batch_size=64, workers=8) as feeder:
        for epoch in range(2):
            labels = []
            for batch in feeder:
                for image, label in zip(batch["image"], batch["label"]):
                    labels.append(int(label))
                    if not np.array_equal(image, np.broadcast_to((label + rows) % 251, (224, 224, 3))):
                        results["bad"].append(int(label))
            results["epochs"].append(sorted(labels) == list(range(n)))
        stats = feeder.stats()
        results["ring_memory"] = getattr(stats, "ring_memory", None)
        results["dev_shm_while_running"] = os.listdir("/dev/shm")
    results["dev_shm_after"] = os.listdir("/dev/shm")
    print(json.dumps(results))
"""


@pytest.mark.skipif(
    not _can_mount_a_private_tmpfs(), reason="needs root and unshare -m to mount a small tmpfs"
)
def test_docker_s_64_mib_dev_shm_runs_with_rings_in_memfd():
    """Docker's default /dev/shm is 64 MiB; eight workers' rings of 64-image batches need ~400 MiB. Old
    code: ShmSpaceError."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = f'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "{sys.executable}" -c "$0"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, textwrap.dedent(_DOCKER_SHM)],
        capture_output=True,
        text=True,
        timeout=HANG_BOUND_S * 2,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    assert results["epochs"] == [True, True] and results["bad"] == []
    assert results["ring_memory"] == "memfd"
    assert results["dev_shm_while_running"] == [] and results["dev_shm_after"] == []


_FORKS_A_CHILD = """
    import os, sys, sources, mpfeed
    feeder = mpfeed.Feeder(sources.slow, args=(400, 0.002), workers=2, start_method=START_METHOD)
    iterator = iter(feeder)
    taken = [next(iterator)[1] for _ in range(10)]
    pid = os.fork()
    if pid == 0:
        if CLOSE_IN_CHILD:
            feeder.close()
        sys.exit(0)  # a normal exit: the child's finalizers run
    assert os.waitpid(pid, 0)[1] == 0
    taken += [element[1] for element in iterator]
    assert taken == list(range(400)), taken[:20]
    feeder.close()
    print("whole")
"""


@pytest.mark.parametrize("close_in_child", [False, True])
def test_a_forked_child_exiting_does_not_stop_the_parents_feeder(close_in_child, start_method):
    """Only the process that made a feeder may close it: a child forked from it that exits (or even
    calls close()) leaves the parent's workers running."""
    code = textwrap.dedent(_FORKS_A_CHILD).replace("START_METHOD", repr(start_method))
    code = code.replace("CLOSE_IN_CHILD", repr(close_in_child))
    done = _run_code(code, 120)
    assert done.returncode == 0 and done.stdout.split() == ["whole"], done.stderr[-3000:]


@pytest.mark.parametrize("workers", [500])
def test_hundreds_of_workers_start_under_the_fork_server_instead_of_timing_out(workers):
    """Every fork request was once sent before any answer was read: past about 300 workers the pipes
    filled both ways and the send deadline fired ("did not answer within 30 s")."""
    started = time.monotonic()
    with mpfeed.Feeder(sources.Numbers(20), workers=workers, depth=1, start_method="forkserver") as feeder:
        assert feeder.workers == workers
        assert sorted(element["i"] for element in feeder) == list(range(20))
    assert time.monotonic() - started < 300  # generous: a hang bound, not a timing


_ROOM_FOR = """
    import os, resource, psutil

    def leave_room_for(tasks):
        # RLIMIT_NPROC: the processes and threads this user has now, and ``tasks`` more
        mine = sum(p.info["num_threads"] for p in psutil.process_iter(["uids", "num_threads"])
                   if p.info["uids"] and p.info["uids"].real == os.getuid())
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        resource.setrlimit(resource.RLIMIT_NPROC, (mine + tasks, hard))
"""


_PAST_A_LIMIT = (
    _ROOM_FOR
    + """
    import errno, os, resource, sys, time, psutil, sources, mpfeed
    limit = THE_LIMIT
    if limit == "RLIMIT_NOFILE":
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    else:
        leave_room_for(40)
    started = time.monotonic()
    try:
        feeder = mpfeed.Feeder(sources.Numbers(10), workers=200, start_method=START_METHOD)
    except OSError as error:  # EAGAIN makes a BlockingIOError
        print("refused", errno.errorcode[error.errno], type(error).__name__, time.monotonic() - started)
        print(error)
    else:
        print("started")
        feeder.close()
"""
)


_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE, _PR_CAPBSET_DROP, _NOBODY = 21, 24, 24, 65534


def _held_to_nproc_though_root() -> None:
    """A preexec_fn holding root's child to RLIMIT_NPROC: real uid nobody, no SYS_ADMIN/RESOURCE, euid 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    os.setresgid(_NOBODY, 0, 0)
    os.setresuid(_NOBODY, 0, 0)


def _run_held_to_nproc(code: str, timeout: float) -> tuple[int, str, str]:
    """Run ``code`` in its own session, held to RLIMIT_NPROC even as root (skip where root can't be held);
    fails if any process of the session outlives it: a worker left behind is no longer our descendant."""
    preexec = None
    if os.getuid() == 0:
        preexec = _held_to_nproc_though_root
        try:
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=preexec, check=True)
        except subprocess.SubprocessError as error:  # no CAP_SETPCAP or CAP_SETUID: a sandbox
            pytest.skip(f"root is not held to RLIMIT_NPROC, and prctl/setresuid to nobody failed: {error}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=preexec,
    )
    status, out, err = _finish(process, timeout)
    deadline = time.monotonic() + 10  # generous: the script closes its workers before it exits
    while (left := _session(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_session(process)
    assert not left, f"processes left behind: {left}\n{out}\n{err[-3000:]}"
    return status, out, err


@pytest.mark.parametrize("limit", ["RLIMIT_NOFILE", "RLIMIT_NPROC"])
def test_workers_past_a_process_limit_are_refused_at_once_naming_it(limit, start_method):
    code = _PAST_A_LIMIT.replace("START_METHOD", repr(start_method)).replace("THE_LIMIT", repr(limit))
    if limit == "RLIMIT_NPROC":
        status, out, err = _run_held_to_nproc(code, 300)
    else:
        done = _run_code(code, 300)
        status, out, err = done.returncode, done.stdout, done.stderr
    assert status == 0, err[-3000:]
    kind, _, message = out.partition("\n")
    assert kind.split()[:2] == ["refused", {"RLIMIT_NOFILE": "EMFILE", "RLIMIT_NPROC": "EAGAIN"}[limit]], (
        out + err[-3000:]
    )
    assert f"({limit}, `ulimit" in message and "200 worker" in message, message


_REFUSED_FORK = (
    _ROOM_FOR
    + """
    import errno, psutil, sources, mpfeed
    from mpfeed.ring import Ring

    made = []  # the rings' names, to look for in /dev/shm afterwards
    create = Ring.create

    def recording(*args, **kwargs):
        ring = create(*args, **kwargs)
        made.append(ring.name)
        return ring

    Ring.create = recording
    leave_room_for(4)  # 8 workers need 16 more (a process and a thread each): one is refused part way
    try:
        feeder = mpfeed.Feeder(
            sources.Numbers(10), workers=8, slot_bytes=4096, ring_memory="posix", start_method=START_METHOD
        )
    except OSError as error:
        print("refused", type(error).__name__, errno.errorcode[error.errno],
              getattr(error, "worker", None), getattr(error, "started", None))
        print("message", " ".join(str(error).split()))
    else:
        print("started", "-")
        feeder.close()
    print("children", [p.pid for p in psutil.Process().children(recursive=True)])
    print("rings", made)
"""
)


def test_a_fork_the_kernel_refuses_part_way_is_one_error_naming_the_limit_and_leaves_nothing(start_method):
    """Under a limit on processes too low for 8 workers yet too high for the up-front check (only from 64
    workers) to see, the fork server died with "exited with code 1 before starting the workers" and spawn
    raised a bare BlockingIOError, while the workers started printed "can't start new thread"."""
    code = _REFUSED_FORK.replace("START_METHOD", repr(start_method))
    status, out, err = _run_held_to_nproc(code, 120)
    assert status == 0, err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert "refused" in lines, out + err[-3000:]
    name, code_name, worker, started = lines["refused"].split()
    assert (name, code_name) == ("WorkerStartError", "EAGAIN"), out + err[-3000:]
    message = lines["message"]
    assert 0 < int(worker) < 8 and 0 < int(started) < 8, message
    assert f"could not start worker {worker} of 8 ({started} of them had started" in message, message
    assert "EAGAIN" in message and "RLIMIT_NPROC" in message and "ulimit -u" in message, message
    assert "pids.max" in message and "use fewer workers, or raise" in message, message
    assert lines["children"] == "[]", out
    rings = ast.literal_eval(lines["rings"])
    assert len(rings) == 8, out
    left_in_shm = [name for name in rings if os.path.exists(f"/dev/shm/{name.lstrip('/')}")]
    assert not left_in_shm, f"rings left in /dev/shm: {left_in_shm}"
    assert "Traceback" not in err and "can't start new thread" not in err, err[-3000:]


_CTRL_C_IN_THE_FINALIZER = """
    import os, signal, time, sources, mpfeed
    from mpfeed.ring import owner_prefix

    feeder = mpfeed.Feeder(sources.Numbers(50), workers=4, ring_memory="posix", slot_bytes=4096)
    print(owner_prefix(feeder._consumer.supervisor.owner), flush=True)
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, DELAY)
    try:
        del feeder  # its finalizer stops the workers here, in this thread
        time.sleep(1)
    except KeyboardInterrupt:
        pass
"""


@pytest.mark.parametrize("delay", [0.002, 0.005, 0.02])
def test_a_ctrl_c_while_a_dropped_feeder_shuts_down_still_leaves_nothing_at_exit(delay):
    """A weakref finalizer runs once and swallows what interrupts it: a Ctrl-C in the middle of the
    shutdown left the rings' names in /dev/shm after the process had exited."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CTRL_C_IN_THE_FINALIZER).replace("DELAY", repr(delay))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    _, out, err = _finish(process, 120)
    prefix = out.split()[0] if out.strip() else "?"
    deadline = time.monotonic() + 10
    while (left := _session(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_session(process)
    names = [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    for name in names:  # not to leave them to the next test
        os.unlink(f"/dev/shm/{name}")
    assert prefix != "?", err[-3000:]
    assert not names and not left, f"left in /dev/shm: {names}; processes: {left}"


def test_a_child_interpreter_whose_consumer_gave_up_before_it_began_exits_quietly():
    """A Ctrl-C in the consumer while it started a worker's interpreter closed the pipe before the worker
    had its setup: the worker printed an EOFError traceback, and was left unreaped."""
    from mpfeed import launcher

    parent_end, child_end = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", launcher._CHILD_PROGRAM, str(child_end.fileno()), launcher._PACKAGE_PARENT],
        pass_fds=(child_end.fileno(),),
        stderr=subprocess.PIPE,
        text=True,
    )
    child_end.close()
    parent_end.close()  # what the consumer's clean-up does when interrupted mid-start
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "Traceback" not in err, err


_IN_A_USER_NAMESPACE = """
    import ctypes, os

    # before any import starts a thread: a multithreaded process can't enter a new user namespace
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        print("unshare failed", os.strerror(ctypes.get_errno()))
    else:
        from mpfeed import limits

        print("held", limits.held_to_nproc())
"""


def test_root_in_a_user_namespace_is_known_to_be_held_to_rlimit_nproc():
    """A new user namespace gives its process every capability, counted there only: the kernel still holds
    it to RLIMIT_NPROC, but mpfeed read its full CapEff as an exemption and explained a refused fork as
    "RLIMIT_NPROC does not apply"."""
    done = _run_code(_IN_A_USER_NAMESPACE, 60)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("unshare failed"):
        pytest.skip(f"no user namespace can be made here: {done.stdout.strip()}")
    assert done.stdout.split() == ["held", "True"], done.stdout


_SERVER_REFUSED = """
    import resource, sources, mpfeed

    resource.setrlimit(resource.RLIMIT_NPROC, (1, resource.getrlimit(resource.RLIMIT_NPROC)[1]))  # no more
    try:
        mpfeed.Feeder(sources.Numbers(10), workers=8, start_method="forkserver")
    except mpfeed.WorkerStartError as error:
        print("refused", error.worker, error.started, " ".join(str(error).split()))
"""


def test_a_fork_server_the_kernel_refuses_is_named_as_such():
    status, out, err = _run_held_to_nproc(_SERVER_REFUSED, 120)
    assert status == 0, out + err[-3000:]
    assert (
        out.startswith("refused None 0 ") and "could not start its fork server, for 8 workers (none" in out
    ), out
    assert "spawning its interpreter failed with EAGAIN" in out, out


_THREAD_REFUSED = (
    _ROOM_FOR
    + """
    import glob, psutil, sources, mpfeed

    # room for the 8 workers' processes (and the fork server), none for their threads
    leave_room_for(8 + (START_METHOD == "forkserver"))
    before = set(glob.glob("/dev/shm/*"))
    feeder = mpfeed.Feeder(
        sources.Numbers(50), workers=8, slot_bytes=4096, ring_memory="posix", start_method=START_METHOD
    )
    try:
        list(feeder)
    except Exception as error:
        print("raised", type(error).__name__, " ".join(str(error).split()))
    else:
        print("raised nothing")
    feeder.close()
    print("children", [p.pid for p in psutil.Process().children(recursive=True)])
    print("left", sorted(set(glob.glob("/dev/shm/*")) - before))
"""
)


def test_a_worker_that_cannot_start_its_watch_thread_breaks_the_feeder_with_its_error_and_close_cleans_up(
    start_method,
):
    """The worker's typed failure reached the consumer, whose own shutdown thread the same limit refused:
    next() raised a bare "can't start new thread", and close() "cannot join thread before it is
    started", leaving the workers running and their rings in /dev/shm."""
    code = _THREAD_REFUSED.replace("START_METHOD", repr(start_method))
    status, out, err = _run_held_to_nproc(code, 120)
    assert status == 0, out + err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    kind, _, message = lines["raised"].partition(" ")
    assert kind == "WorkerError", out + err[-3000:]
    assert "can't start new thread, to watch its parent" in message and "RLIMIT_NPROC" in message, message
    assert lines["children"] == "[]" and lines["left"] == "[]", out


_WARNINGS_KEPT = """
    import logging

    refusals = []  # what mpfeed logs at WARNING and above
    handler = logging.Handler()
    handler.emit = lambda record: refusals.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    logging.getLogger("mpfeed").addHandler(handler)
"""

_AUTOTUNE_REFUSED = (
    _WARNINGS_KEPT
    + _ROOM_FOR
    + """
    import psutil, sources, mpfeed
    # room for the feeder's first 2 workers (a process and a thread each), its server and threads, and
    # a few more; an I/O-bound source then asks for more than that
    leave_room_for(12)
    labels, seen = [], None
    with mpfeed.Feeder(
        sources.Waits(10**6, 0.01), workers="auto", max_workers=32, start_method=START_METHOD
    ) as feeder:
        for _, label in feeder:
            labels.append(int(label))
            if refusals and seen is None:
                seen = len(labels)
            if seen is not None and len(labels) > seen + 300 or len(labels) > 60_000:
                break
        stats = feeder.stats()
        children = len(psutil.Process().children(recursive=True))
    print("refusals", refusals)
    print("delivered", len(labels), labels == list(range(len(labels))), "after", seen)
    print("workers", stats.active_workers, len(stats.workers), children)
"""
)


def test_autotuning_past_a_limit_on_processes_keeps_the_workers_it_has_and_warns(start_method):
    """A refusal to start one more worker while autotuning reached the training loop's next() as an
    error; the feeder now stays at the workers it could start, and says so once."""
    code = _AUTOTUNE_REFUSED.replace("START_METHOD", repr(start_method))
    status, out, err = _run_held_to_nproc(code, 240)
    assert status == 0, out + err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    refusals = ast.literal_eval(lines["refusals"])
    assert len(refusals) == 1, refusals
    assert "workers stay at most" in refusals[0] and "RLIMIT_NPROC" in refusals[0], refusals
    count, in_order, _, seen = lines["delivered"].split()
    assert in_order == "True" and seen != "None" and int(count) > int(seen) + 300, out
    active, started, children = map(int, lines["workers"].split())
    assert 2 <= active <= started < 32, out
    assert children == started + (start_method == "forkserver"), out  # those refused left nothing


_AUTOTUNE_IN_A_PIDS_CGROUP = (
    _WARNINGS_KEPT
    + """
    import os, time, psutil, sources, mpfeed
    with open(os.path.join(GROUP, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    labels, seen = [], None
    with mpfeed.Feeder(
        sources.Waits(10**6, 0.01), workers="auto", max_workers=32, start_method=START_METHOD
    ) as feeder:
        iterator = iter(feeder)
        labels = [int(next(iterator)[1]) for _ in range(50)]  # every worker has started, and its thread
        with open(os.path.join(GROUP, "pids.current")) as current:
            tasks = int(current.read())
        with open(os.path.join(GROUP, "pids.max"), "w") as limit:  # room for one more process, no thread
            limit.write(str(tasks + 1))
        started = time.monotonic()
        for _, label in iterator:
            labels.append(int(label))
            if refusals and seen is None:
                seen = len(labels)
            if seen is not None and len(labels) > seen + 300 or time.monotonic() - started > 60:
                break
        stats = feeder.stats()
    print("refusals", refusals)
    print("delivered", len(labels), labels == list(range(len(labels))), "after", seen)
    print("workers", stats.active_workers, len(stats.workers))
"""
)


def _pids_cgroup() -> str:
    """A new cgroup (v1's pids controller) for a test to move a process into; skips where none can be made."""
    group = f"/sys/fs/cgroup/pids/mpfeed-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.mkdir(group)
    except OSError as error:
        pytest.skip(f"no cgroup v1 pids controller to make a group in ({error})")
    return group


def test_autotuning_inside_a_cgroup_pids_limit_keeps_the_workers_it_has_and_warns(start_method):
    """Only RLIMIT_NPROC was checked before growing: under a cgroup's pids.max a worker forked into the last
    free task and could not start its thread, and its failure ended the training loop."""
    group = _pids_cgroup()
    code = _AUTOTUNE_IN_A_PIDS_CGROUP.replace("START_METHOD", repr(start_method)).replace(
        "GROUP", repr(group)
    )
    try:
        done = _run_code(code, 240)
    finally:
        with open(os.path.join(group, "cgroup.procs")) as procs:
            left = [int(pid) for pid in procs.read().split()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.rmdir(group)
                break
            time.sleep(0.05)
    assert not left, f"processes left behind: {left}"
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    refusals = ast.literal_eval(lines["refusals"])
    assert len(refusals) == 1 and "pids.max" in refusals[0], refusals
    count, in_order, _, seen = lines["delivered"].split()
    assert in_order == "True" and seen != "None" and int(count) > int(seen) + 300, done.stdout


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies aside)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(process.pid) == sid:
                members.append(process.pid)
        except OSError:
            pass
    return members


def test_a_generator_source_with_many_more_workers_than_cores_is_warned_about():
    cores = len(os.sched_getaffinity(0))
    with pytest.warns(
        RuntimeWarning, match=rf"workers={4 * cores + 1} for a generator source on {cores} usable"
    ):
        feeder = mpfeed.Feeder(sources.numbered, args=(4,), workers=4 * cores + 1, start_method="forkserver")
    with feeder:
        assert len(list(feeder)) == 4
    with mpfeed.Feeder(
        sources.numbered, args=(4,), workers=4 * cores
    ) as feeder:  # no warning: it is an error
        assert len(list(feeder)) == 4
