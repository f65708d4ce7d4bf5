"""Faults caused for real: a source that raises, workers killed or exiting, bad elements, stalls,
unpicklable sources, a too-small /dev/shm, and a consumer that dies. Nothing may hang or leak."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import psutil
import pytest
import sources
from conftest import shm_entries

import mpfeed

HANG_BOUND_S = 30  # generous: these must answer in about a second; the bound only catches hangs


def _consume(feeder):
    """Iterate until the feeder fails; what came before the failure must be a prefix of the source order."""
    started = time.monotonic()
    delivered = []
    with pytest.raises(mpfeed.WorkerError) as caught:
        for element in feeder:
            delivered.append(element[1] if isinstance(element, tuple) else None)
    assert time.monotonic() - started < HANG_BOUND_S
    if delivered and delivered[0] is not None:
        assert delivered == list(range(len(delivered)))
    caught.value.delivered = delivered
    return caught.value


def _assert_stopped(processes):
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"workers still running: {alive}"


def test_an_exception_in_the_source_reaches_the_consumer_with_its_traceback():
    feeder = mpfeed.Feeder(sources.raise_at, args=(20, 7), workers=2)
    processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
    error = _consume(feeder)
    assert isinstance(error, mpfeed.SourceError)
    assert error.worker == 1 and error.element == 3 and error.pid == processes[1].pid
    assert error.exc_type == "ValueError"
    assert len(error.delivered) <= 7, "nothing at or after the failing element"
    message = str(error)
    assert f"worker 1 (pid {error.pid}) raised ValueError: bad record 7" in message
    assert "element 3 of its shard" in message
    assert "raise_at" in error.remote_traceback and 'raise ValueError(f"bad record {i}")' in message
    # Broken stays broken: the same error again, every worker stopped, every segment released.
    with pytest.raises(mpfeed.SourceError, match="bad record 7"):
        iter(feeder)
    _assert_stopped(processes)
    feeder.close()


def test_a_worker_killed_from_outside_wakes_a_waiting_consumer(start_method):
    with mpfeed.Feeder(sources.slow, args=(10, 60.0), workers=2, start_method=start_method) as feeder:
        victim = feeder.stats().workers[1].pid
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        started = time.monotonic()
        error = _consume(feeder)
        assert time.monotonic() - started < HANG_BOUND_S
    assert isinstance(error, mpfeed.WorkerDiedError) and error.pid == victim
    assert "SIGKILL (-9)" in str(error)


# Long enough that a worker's start on a loaded machine is not taken for a stall.
STALL_TIMEOUT_S = 3.0
FAULTS = {
    "raise": (mpfeed.SourceError, "raised ValueError: injected fault"),
    "exit3": (mpfeed.WorkerDiedError, "exited with code 3: the source called sys.exit(3)"),
    "exit0": (mpfeed.WorkerDiedError, "exited with code 0"),
    "sigkill": (mpfeed.WorkerDiedError, "was killed by SIGKILL (-9)"),
    "sigsegv": (mpfeed.WorkerDiedError, "was killed by SIGSEGV (-11)"),
    "stall": (mpfeed.WorkerTimeoutError, "produced nothing for 3 s (the feeder's timeout)"),
}
WHERE = {  # where the fault strikes worker 1, and the element of its shard it was producing
    "start": 0,
    "mid": 5,
    "holding": 5,  # while the consumer holds every view it was given
    "epoch": 0,  # as epoch 1 starts
}


@pytest.mark.parametrize("how", FAULTS)
@pytest.mark.parametrize("where", WHERE)
def test_crash_matrix(where, how, start_method):
    kind, words = FAULTS[how]
    source_where = "mid" if where == "holding" else where
    with mpfeed.Feeder(
        sources.faulty,
        args=(40, source_where, how),
        workers=2,
        depth=3,
        timeout=STALL_TIMEOUT_S if how == "stall" else None,
        start_method=start_method,
    ) as feeder:
        if where == "epoch":
            assert [label for _, label in feeder] == list(range(40))
        held = []
        started = time.monotonic()
        with pytest.raises(mpfeed.WorkerError) as caught:
            for element in feeder:
                if where == "holding":
                    held.append(element)
        assert time.monotonic() - started < HANG_BOUND_S
        error = caught.value
        assert isinstance(error, kind), error
        assert words in str(error)
        assert error.worker == 1 and error.pid == feeder.stats().workers[1].pid
        assert f"worker 1 (pid {error.pid})" in str(error)
        assert f"element {WHERE[where]} of its shard (epoch {1 if where == 'epoch' else 0})" in str(error)
        for array, label in held:  # views handed out before the failure stay intact
            np.testing.assert_array_equal(array, np.full((8, 8), label))
        with pytest.raises(kind):  # broken stays broken
            next(iter(feeder))
        processes = [psutil.Process(w.pid) for w in feeder.stats().workers if w.alive]
    _assert_stopped(processes)


@pytest.mark.parametrize("how", FAULTS)
@pytest.mark.parametrize("at", [0, 17])  # the first element, and one mid-epoch
def test_crash_matrix_for_random_access_sources(at, how, start_method):
    """Whichever worker makes element ``at`` meets the fault: the error names the worker, and for a
    source's own exception the index and its position in the epoch; what came before arrives in order."""
    kind, words = FAULTS[how]
    with mpfeed.Feeder(
        sources.Faulty(60, at, how),
        workers=2,
        depth=3,
        timeout=STALL_TIMEOUT_S if how == "stall" else None,
        start_method=start_method,
    ) as feeder:
        error = _consume(feeder)
        assert isinstance(error, kind), error
        assert words in str(error)
        assert error.worker in (0, 1) and f"worker {error.worker} (pid {error.pid})" in str(error)
        assert len(error.delivered) <= at, "nothing at or after the failing element"
        if how == "raise":
            assert f"source[{at}] (position {at} of epoch 0)" in str(error)
        with pytest.raises(kind):  # broken stays broken
            next(iter(feeder))
        processes = [psutil.Process(w.pid) for w in feeder.stats().workers if w.alive]
    _assert_stopped(processes)


def test_a_random_access_source_that_raises_index_error_below_its_length_is_told_so():
    with mpfeed.Feeder(sources.ShortBy(10), workers=2) as feeder:
        error = _consume(feeder)
    assert isinstance(error, mpfeed.SourceError) and error.exc_type == "IndexError"
    assert "raised IndexError for an index below its len()" in str(error)
    assert "source[9] (position 9 of epoch 0)" in str(error)


@pytest.mark.parametrize("how", FAULTS)
def test_a_fault_while_closing_neither_raises_nor_hangs(how, start_method):
    feeder = mpfeed.Feeder(sources.faulty, args=(10_000, "close", how), workers=2, start_method=start_method)
    iterator = iter(feeder)
    for _ in range(10):
        next(iterator)
    started = time.monotonic()
    feeder.close()
    assert time.monotonic() - started < HANG_BOUND_S


def test_a_worker_dying_while_it_writes_a_slot_is_reported(tmp_path, start_method):
    """The element's memory vanishes mid-copy: SIGBUS in the worker, halfway through writing its slot."""
    path = tmp_path / "vanishing.bin"
    path.write_bytes(bytes(8 << 20))
    with mpfeed.Feeder(
        sources.vanishing_memory, args=(str(path),), workers=1, slot_bytes=16 << 20, start_method=start_method
    ) as feeder:
        error = _consume(feeder)
    assert isinstance(error, mpfeed.WorkerDiedError)
    assert "was killed by SIGBUS (-7) while producing element 1 of its shard" in str(error)
    assert error.delivered == [0], "the half-written slot is never handed out"


def test_a_broken_feeder_raises_the_same_error_without_piling_up_tracebacks():
    with mpfeed.Feeder(sources.raise_at, args=(20, 3), workers=2) as feeder:
        first = _consume(feeder)
        for _ in range(50):
            with pytest.raises(mpfeed.SourceError) as caught:
                iter(feeder)
        assert caught.value is first
        assert len(traceback.extract_tb(caught.value.__traceback__)) < 10


def test_elements_before_a_failure_still_reach_a_chunked_dataset():
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.raise_at, args=(400, 300), workers=2) as feeder:
        labels = []
        with pytest.raises(tf.errors.OpError, match="bad record 300"):
            for _, label in feeder.dataset():
                labels.append(int(label))
    assert labels == list(range(len(labels))) and len(labels) >= 200


def test_a_killed_fork_server_is_named_in_the_error():
    with mpfeed.Feeder(sources.slow, args=(1000, 0.01), workers=2, start_method="forkserver") as feeder:
        server = feeder._consumer.supervisor.server.process
        threading.Timer(0.3, server.kill).start()
        error = _consume(feeder)
    assert isinstance(error, mpfeed.WorkerDiedError)
    assert f"mpfeed's fork server (pid {server.pid}) was killed by SIGKILL (-9)" in str(error)


@pytest.mark.parametrize(
    "leaf, kind, words",
    [
        (None, TypeError, "element['image'] is a builtins.NoneType"),
        (np.array([1, "a"], dtype=object), TypeError, "element['image'] is a numpy array of dtype object"),
        (
            np.zeros(3, dtype=np.int32),
            ValueError,
            "element['image'] changed mid-stream from a 1-d array of float64",
        ),
        ((np.zeros(3),), ValueError, "structure changed mid-stream"),
    ],
)
def test_a_bad_element_gets_an_error_naming_the_leaf(leaf, kind, words):
    with mpfeed.Feeder(sources.yields_leaf, args=(leaf,), workers=1) as feeder:
        error = _consume(feeder)
    assert isinstance(error, mpfeed.ElementError) and isinstance(error, kind)
    assert words in str(error)
    assert "worker 0" in str(error) and "element 1 of its shard" in str(error)


def test_ragged_nested_lists_are_refused_when_their_structure_changes():
    with mpfeed.Feeder(sources.ragged, workers=1) as feeder:
        error = _consume(feeder)
    assert isinstance(error, mpfeed.ElementError)
    assert "structure changed mid-stream: [[leaf], [leaf, leaf]] after [[leaf, leaf], [leaf]]" in str(error)


def test_an_element_that_does_not_match_the_given_signature_names_the_leaf():
    tf = pytest.importorskip("tensorflow")
    spec = (tf.TensorSpec((4,), tf.float32), tf.TensorSpec((), tf.int64))
    with mpfeed.Feeder(sources.pairs, args=(10,), workers=2) as feeder:
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            list(feeder.dataset(spec))
    assert "element[0] has shape (8, 8) and dtype int64, but output_signature expects" in str(caught.value)


def test_an_exception_in_the_training_loop_leaves_nothing_behind(start_method):
    with pytest.raises(ZeroDivisionError):
        with mpfeed.Feeder(sources.pairs, args=(1000,), workers=2, start_method=start_method) as feeder:
            processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
            for _, label in feeder:
                if label == 10:
                    1 / 0  # noqa: B018
    _assert_stopped(processes)


def test_an_unpicklable_source_or_argument_is_refused_before_any_worker_starts():
    with pytest.raises(
        TypeError, match=r"source must be picklable; '.*<lambda>' can't be pickled.*define it at module level"
    ):
        mpfeed.Feeder(lambda shard: iter(()), workers=1)
    with pytest.raises(
        TypeError, match=r"args\[1\] must be picklable; 'lock'.*a path instead of an open file"
    ):
        mpfeed.Feeder(sources.raise_at, args=(4, threading.Lock()), workers=1)
    with open(__file__) as file, pytest.raises(TypeError, match=r"kwargs\['shape'\] must be picklable"):
        mpfeed.Feeder(sources.numbered, args=(4,), kwargs={"shape": file}, workers=1)
    assert not psutil.Process().children()


@pytest.mark.parametrize("ring_memory, fix", [("posix", "--shm-size"), ("auto", "--memory")])
def test_rings_too_big_for_dev_shm_or_memory_are_refused_before_any_worker_starts(ring_memory, fix):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    slot_bytes = max(free, psutil.virtual_memory().total)  # 2 workers x depth 2: four times too much
    with pytest.raises(mpfeed.ShmSpaceError) as caught:
        mpfeed.Feeder(
            sources.numbered,
            args=(4,),
            workers=2,
            depth=1,  # rings of 2 slots: room for views that linger
            slot_bytes=slot_bytes,
            ring_memory=ring_memory,
            shm_budget=1 << 60,
        )
    message = str(caught.value)
    assert fix in message and "fewer workers" in message and "slot_bytes" in message
    assert f"{4 * mpfeed.layout.align(slot_bytes):,}" in message
    assert not psutil.Process().children()
    assert isinstance(caught.value, OSError)


@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_the_error_survives_the_trip_through_tensorflow(how):
    tf = pytest.importorskip("tensorflow")
    spec = (tf.TensorSpec((8, 8), tf.int64), tf.TensorSpec((), tf.int64))
    with mpfeed.Feeder(sources.faulty, args=(40, "mid", how), workers=2) as feeder:
        ds = feeder.dataset(spec)
        with pytest.raises(tf.errors.OpError) as caught:
            for _ in ds:
                pass
        pid = feeder.stats().workers[1].pid
    kind, words = FAULTS[how]
    message = str(caught.value)
    assert f"worker 1 (pid {pid})" in message and words in message
    assert "element 5 of its shard (epoch 0)" in message
    assert kind.__name__ in message


def _run_script(body: str, start_method: str, **popen_options) -> subprocess.Popen:
    """A consumer script in its own interpreter; SIGUSR1 makes it print every thread's stack."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = _DUMP_ON_SIGUSR1 + textwrap.dedent(body).replace("START_METHOD", repr(start_method))
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, **popen_options
    )


_DUMP_ON_SIGUSR1 = "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def _wait_or_dump(process: subprocess.Popen) -> int:
    """The script's exit status; if it hangs, its stacks go to the test's captured stderr first."""
    try:
        return process.wait(HANG_BOUND_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        raise


_CONSUMER = """
    import sys, time, sources, mpfeed
    feeder = mpfeed.Feeder(sources.slow, args=(100000, 0.001), workers=2, start_method=START_METHOD)
    iterator = iter(feeder)
    next(iterator)  # every worker has sent its first element; rings are attached once this flows
    for _ in range(50):
        next(iterator)
    print(" ".join(str(w.pid) for w in feeder.stats().workers), flush=True)
    time.sleep(120)
"""


def test_workers_exit_when_the_consumer_is_killed(start_method):
    before = shm_entries()  # another program's leftovers are not ours
    consumer = _run_script(_CONSUMER, start_method)
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        assert len(pids) == 2
        workers = [psutil.Process(pid) for pid in pids]
        consumer.kill()
        consumer.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive
        assert not shm_entries() - before
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()


def test_sigkill_of_the_whole_process_group_leaves_nothing_in_dev_shm(start_method):
    before = shm_entries()
    consumer = _run_script(_CONSUMER, start_method, start_new_session=True)
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        assert len(pids) == 2
        os.killpg(consumer.pid, signal.SIGKILL)
        consumer.wait(10)
        _, alive = psutil.wait_procs(
            [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=15
        )
        assert not alive
        assert not shm_entries() - before, "names must be gone once workers attached"
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()


def test_workers_that_ignore_sigterm_still_end_when_the_consumer_is_killed(start_method):
    consumer = _run_script(
        """
        import time, sources, mpfeed
        feeder = mpfeed.Feeder(sources.ignores_sigterm, workers=2, start_method=START_METHOD)
        next(iter(feeder))
        print(" ".join(str(w.pid) for w in feeder.stats().workers), flush=True)
        time.sleep(120)
        """,
        start_method,
    )
    try:
        processes = [psutil.Process(int(pid)) for pid in consumer.stdout.readline().split()]
        assert len(processes) == 2
        consumer.kill()
        consumer.wait(10)
        _, alive = psutil.wait_procs(processes, timeout=15)
        assert not alive
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()


def test_ctrl_c_reaches_the_user_and_leaves_nothing_behind(start_method):
    consumer = _run_script(
        """
        import signal, sources, mpfeed
        # As in a terminal: a shell that runs the tests in the background would have us ignore SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with mpfeed.Feeder(sources.slow, args=(100000, 0.01), workers=2, start_method=START_METHOD) as feeder:
            print(" ".join(str(w.pid) for w in feeder.stats().workers), flush=True)
            try:
                for _ in feeder:
                    pass
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        print("closed", flush=True)
        """,
        start_method,
        start_new_session=True,
    )
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        time.sleep(1.0)
        os.killpg(consumer.pid, signal.SIGINT)  # the terminal sends it to the whole foreground group
        assert _wait_or_dump(consumer) == 0
        assert consumer.stdout.read().split() == ["interrupted", "closed"]
        _, alive = psutil.wait_procs(
            [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=10
        )
        assert not alive
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()


def test_a_main_script_that_cannot_be_imported_in_a_worker_is_reported(tmp_path, start_method):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import mpfeed, sources

            if __name__ == "__mp_main__":  # what workers import the script as
                raise RuntimeError("this script refuses to be imported by a worker")

            def source(shard):
                yield 1

            if __name__ == "__main__":
                try:
                    feeder = mpfeed.Feeder(source, workers=2, start_method={start_method!r})
                    for _ in feeder:
                        pass
                except mpfeed.WorkerError as error:
                    print(type(error).__name__, str(error).splitlines()[0])
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert "could not start: RuntimeError: this script refuses to be imported by a worker" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_a_script_without_the_main_guard_gets_told_to_add_it(tmp_path, start_method):
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import mpfeed

            def source(shard):
                yield 1

            feeder = mpfeed.Feeder(source, workers=1, start_method={start_method!r})
            try:
                print(list(feeder))
            except mpfeed.WorkerError as error:
                print(str(error).splitlines()[0])
            feeder.close()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert (
        "could not start: RuntimeError: a Feeder was created while a worker imported your main"
        in result.stdout
    )
    assert 'under `if __name__ == "__main__":`' in result.stdout


def test_a_fault_in_mpfeeds_own_worker_code_is_not_blamed_on_the_source(start_method):
    import steals_ring_names

    with mpfeed.Feeder(
        steals_ring_names.source, workers=1, slot_bytes=4096, ring_memory="posix", start_method=start_method
    ) as feeder:
        with pytest.raises(mpfeed.WorkerError) as caught:
            list(feeder)
    error = caught.value
    assert not isinstance(error, mpfeed.SourceError)
    assert "failed in mpfeed's own worker code, not in your source: FileNotFoundError" in str(error)


@pytest.mark.parametrize(
    "source, args", [(sources.raise_at, (20, 7)), (sources.faulty, (40, "mid", "sigkill"))]
)
def test_an_iterator_that_raised_raises_the_same_error_again_instead_of_ending(source, args):
    """A loop that catches errors per step must not see a short epoch as complete: every later next()
    on the same iterator raises the same error (a generator would end with StopIteration)."""
    with mpfeed.Feeder(source, args=args, workers=2) as feeder:
        iterator = iter(feeder)
        with pytest.raises(mpfeed.WorkerError) as caught:
            for _ in iterator:
                pass
        for _ in range(3):
            with pytest.raises(type(caught.value)) as again:
                next(iterator)
            assert again.value is caught.value


def test_a_dataset_iterator_that_raised_keeps_raising_instead_of_ending():
    tf = pytest.importorskip("tensorflow")
    spec = (tf.TensorSpec((4,), tf.int64), tf.TensorSpec((), tf.int64))
    for chunk_size in (1, 4):
        with mpfeed.Feeder(sources.raise_at, args=(20, 7), workers=2) as feeder:
            iterator = iter(feeder.dataset(spec, chunk_size=chunk_size))
            with pytest.raises(tf.errors.OpError, match="bad record 7"):
                for _ in iterator:
                    pass
            for _ in range(2):
                with pytest.raises(tf.errors.OpError, match="bad record 7"):
                    next(iterator)


def _positions(n, seed, shuffle):
    """The epoch-0 order of an ``n``-element random-access source, as the feeder draws it."""
    from mpfeed.dispatch import EpochOrder

    return [int(i) for i in EpochOrder(n, seed, shuffle, (0, 1), None, False).positions(0)]


def _consume_any_order(feeder):
    with pytest.raises(mpfeed.WorkerError) as caught:
        for _ in feeder:
            pass
    return caught.value


@pytest.mark.parametrize("how", ["exit0", "sigkill"])
@pytest.mark.parametrize("shuffle, batch_size", [(False, None), (True, None), (True, 4)])
def test_a_dead_worker_of_a_random_access_source_is_named_at_the_source_index_it_was_making(
    how, shuffle, batch_size
):
    """``os._exit`` or SIGKILL in ``source[50]``: the error says source[50], not the worker's count."""
    with mpfeed.Feeder(
        sources.Faulty(60, 50, how), workers=2, depth=3, shuffle=shuffle, seed=7, batch_size=batch_size
    ) as feeder:
        error = _consume_any_order(feeder)
    assert isinstance(error, mpfeed.WorkerDiedError), error
    position = _positions(60, 7, shuffle).index(50)
    message = str(error)
    if batch_size is None:
        assert error.element == 50
        assert f"while producing source[50] (position {position} of epoch 0)" in message, message
    else:
        first = position - position % batch_size
        assert error.element is None
        assert "while producing one of the batch" in message and "source[50]" in message, message
        assert f"(positions {first} to {first + batch_size - 1} of epoch 0)" in message, message


@pytest.mark.parametrize("shuffle, batch_size", [(False, None), (True, None), (True, 4), (False, 5)])
def test_a_bad_element_of_a_random_access_source_is_named_by_its_index_and_position(shuffle, batch_size):
    """The element at source[13] is bad: the error names source[13] and its place in the order, not the
    task (a batch's number, or a position) nor "position None"."""
    with mpfeed.Feeder(
        sources.BadAt(40, 13), workers=2, shuffle=shuffle, seed=3, batch_size=batch_size
    ) as feeder:
        error = _consume_any_order(feeder)
    assert isinstance(error, mpfeed.ElementError), error
    position = _positions(40, 3, shuffle).index(13)
    assert error.element == 13
    assert f"source[13] (position {position} of epoch 0)" in str(error), str(error)
    assert "element[0] is a builtins.object" in str(error)


def test_a_bad_element_in_a_generator_batch_is_named_by_its_own_number():
    with mpfeed.Feeder(sources.yields_leaf, args=(object(),), workers=1, batch_size=2) as feeder:
        error = _consume_any_order(feeder)
    assert isinstance(error, mpfeed.ElementError) and error.element == 1, error
    assert "element 1 of its shard" in str(error)
