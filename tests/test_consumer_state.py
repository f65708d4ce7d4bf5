"""The consumer's state under real concurrency: stats() and close() from other threads, Ctrl-C at any moment,
two iterations at once, errors that arrive before the shutdown, and a fork server killed under the feeder."""

from __future__ import annotations

import os
import random
import signal
import threading

import numpy as np
import psutil
import pytest
import sources

import mpfeed

HANG_BOUND_S = 30  # generous: each of these answers in about a second; the bound only catches hangs


def _in_thread(target, *args):
    """Run ``target`` in a thread; a hang fails the test by HANG_BOUND_S instead of hanging the suite."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target(*args)
        except BaseException as error:  # noqa: BLE001  (handed to the test)
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_BOUND_S)
    assert not thread.is_alive(), f"{getattr(target, '__name__', target)} hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize("monitors", [1, 2])
def test_stats_from_other_threads_never_hangs_a_feeder_whose_worker_dies(start_method, monitors):
    """stats() used to read the fork server's pipe beside the consumer: a split message blocked forever."""
    for _ in range(4):
        feeder = mpfeed.Feeder(
            sources.exits_mid_stream, args=(4000, 300), workers=2, start_method=start_method
        )
        stop = threading.Event()
        seen = []

        threads = [threading.Thread(target=_monitor, args=(feeder, stop, seen)) for _ in range(monitors)]
        for thread in threads:
            thread.start()
        try:
            with pytest.raises(mpfeed.WorkerDiedError, match="exited with code 0"):
                _in_thread(list, feeder)
            _in_thread(feeder.close)
        finally:
            stop.set()
            for thread in threads:
                thread.join(HANG_BOUND_S)
            feeder.close()
        assert seen and max(seen) > 0


def _monitor(feeder, stop, seen):
    while not stop.is_set():
        seen.append(feeder.stats().items)


def test_close_from_another_thread_gives_the_consumer_closed_error(start_method):
    for trial in range(8):
        feeder = mpfeed.Feeder(sources.slow, args=(100_000, 0.0005), workers=2, start_method=start_method)
        iterator = iter(feeder)
        next(iterator)
        threading.Timer(0.01 + trial * 0.005, feeder.close).start()
        with pytest.raises(mpfeed.ClosedError):
            _in_thread(list, iterator)
        feeder.close()


def test_a_ctrl_c_at_any_moment_leaves_the_feeder_consistent_or_broken_never_wrong():
    """SIGALRM raises KeyboardInterrupt every few hundred microseconds while the user keeps iterating."""
    n = 60
    expected = [np.arange(i, i + 64).reshape(8, 8) for i in range(n)]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    rng = random.Random(1)
    complete = broken = interrupted = 0
    held = []
    try:
        for _ in range(4):  # a broken feeder is done with: the user makes another
            with mpfeed.Feeder(sources.pairs, args=(n,), workers=3, depth=2, timeout=60) as feeder:
                for _ in range(30):
                    got = []
                    try:
                        signal.setitimer(signal.ITIMER_REAL, rng.choice([0.0005, 0.002, 0.008, 0.05, 2.0]))
                        for array, label in feeder:
                            got.append((array, label))
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    except KeyboardInterrupt:
                        interrupted += 1
                        held.extend(got[:2])
                        continue
                    except mpfeed.BrokenError:
                        broken += 1
                        with pytest.raises(mpfeed.BrokenError):
                            iter(feeder)
                        break
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    complete += 1
                    assert [label for _, label in got] == list(range(n)), "an epoch out of order"
                    for array, label in got:
                        np.testing.assert_array_equal(array, expected[label])
        for array, label in held:
            np.testing.assert_array_equal(array, expected[label], err_msg="a held view was rewritten")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 0 and complete > 0, (interrupted, complete, broken)


def test_a_superseded_iteration_never_takes_an_element_of_the_new_pass():
    with mpfeed.Feeder(sources.epochs_and_seeds, args=(30,), workers=2) as feeder:
        first = iter(feeder)
        assert next(first)["i"] == 0
        second = iter(feeder)
        with pytest.raises(mpfeed.SupersededError, match="one pass at a time"):
            next(first)
        elements = list(second)
    assert [e["i"] for e in elements] == list(range(30))
    assert {e["epoch"] for e in elements} == {1}


def test_a_superseded_iteration_in_another_thread_neither_steals_nor_breaks_the_new_one():
    """The old iterator keeps pulling from a thread (as TensorFlow's would) while a new pass starts."""
    for _ in range(5):
        with mpfeed.Feeder(sources.epochs_and_seeds, args=(200,), workers=2) as feeder:
            old = iter(feeder)
            next(old)
            outcome: list = []

            def pull(old=old, outcome=outcome):
                try:
                    for _ in old:
                        pass
                    outcome.append("ended")
                except mpfeed.SupersededError:
                    outcome.append("superseded")

            puller = threading.Thread(target=pull)
            puller.start()
            new = [e["i"] for e in feeder if e["epoch"] == 1]
            puller.join(HANG_BOUND_S)
        assert new == list(range(200))
        assert outcome in (["superseded"], ["ended"])


def test_zipping_a_feeders_dataset_with_itself_is_refused_not_mixed():
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.pairs, args=(20,), workers=2) as feeder:
        ds = feeder.dataset(chunk_size=1)
        with pytest.raises(tf.errors.OpError, match="one pass at a time"):
            for _ in tf.data.Dataset.zip((ds, ds)):
                pass


# Keras says this for a plain tf.data.Dataset of unknown length as well, at the end of each pass.
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_fit_with_the_same_dataset_for_validation_sees_every_element_each_pass():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    n, epochs = 64, 3
    with mpfeed.Feeder(sources.numbered, args=(n,), kwargs={"shape": (4,)}, workers=2) as feeder:
        ds = feeder.dataset().map(lambda e: (e["x"], e["i"] % 2)).batch(8)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        history = model.fit(ds, validation_data=ds, epochs=epochs, shuffle=False, verbose=0)
        assert len(history.history["val_loss"]) == epochs
        assert feeder.stats().items == n * epochs * 2, "every training and validation pass is whole"


@pytest.mark.parametrize("how", ["asarray", "len", "bool", "iter", "arithmetic", "yield"])
def test_tensorflow_used_in_a_source_fails_loudly_instead_of_giving_empty_data(how):
    with mpfeed.Feeder(sources.uses_tensorflow, args=(how,), workers=1) as feeder:
        with pytest.raises(mpfeed.WorkerError, match="TensorFlow cannot run in mpfeed workers") as caught:
            for array, label in feeder:
                assert label == 0, f"element {label} arrived: {array!r}"
    assert isinstance(caught.value, mpfeed.ElementError if how == "yield" else mpfeed.SourceError)


@pytest.mark.parametrize("stalled_raises", [False, True])
def test_the_error_arrives_before_the_other_workers_are_shut_down(stalled_raises):
    """Worker 0 sleeps and ignores SIGTERM, so shutting it down takes its full grace periods: the error must
    not wait for that."""
    feeder = mpfeed.Feeder(
        sources.healthy_but_deaf, args=(40, stalled_raises), workers=2, timeout=None if stalled_raises else 1
    )
    processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
    try:
        expected = mpfeed.SourceError if stalled_raises else mpfeed.WorkerTimeoutError
        with pytest.raises(expected):
            _in_thread(lambda: list(feeder))
        assert processes[0].is_running() and processes[0].status() != psutil.STATUS_ZOMBIE, (
            "the feeder shut its workers down before raising"
        )
    finally:
        _in_thread(feeder.close)
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive


def test_a_killed_fork_server_and_workers_get_no_signal_by_pid(monkeypatch):
    """Once the fork server is gone nobody reaps its workers for us: a pid could be reused, so signals
    go through pidfds, never os.kill."""
    sent = []
    real_kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: (sent.append((pid, sig)), real_kill(pid, sig))[1])
    feeder = mpfeed.Feeder(sources.slow, args=(1000, 0.01), workers=2, start_method="forkserver")
    server = feeder._supervisor.server.process
    pids = [w.pid for w in feeder.stats().workers]
    real_kill(server.pid, signal.SIGKILL)
    for pid in pids:
        real_kill(pid, signal.SIGKILL)
    with pytest.raises(
        mpfeed.WorkerDiedError, match=f"fork server \\(pid {server.pid}\\) was killed by SIGKILL"
    ):
        _in_thread(lambda: list(feeder))
    _in_thread(feeder.close)
    assert not [(pid, sig) for pid, sig in sent if pid in pids or pid == server.pid]
