"""The Ray backend on a real cluster: a head and two worker nodes on this machine, bound to loopback,
started once for the module. Every feeder's data is checked against the local engine's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind the nodes to 127.0.0.1, not the host's address

import sources  # noqa: E402
from conftest import shm_entries  # noqa: E402

import mpfeed  # noqa: E402

ray = pytest.importorskip("ray", reason="the Ray backend's tests need ray: make test installs it")
from ray.cluster_utils import Cluster  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
NODE_CPUS = 3
STORE_BYTES = 100 * 2**20
SETTLE_S = 30.0  # generous: for Ray to report actors dead and resources back


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=STORE_BYTES)
    cluster.wait_for_nodes()
    # The actors import the tests' sources by name, as a user's code ships with runtime_env.
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """The suite's hygiene check, for a cluster that outlives each test: after it, no actor of ours is
    left running, the cluster's resources are all back, and /dev/shm has nothing new of ours."""
    shm_before = shm_entries()
    yield
    if "cluster" in request.fixturenames:
        total = _cpus(ray.cluster_resources())
        assert _settles(lambda: not _actor_processes() and _cpus(ray.available_resources()) == total), (
            f"left running: {_actor_processes()}; CPUs free {ray.available_resources().get('CPU')} of {total}"
        )
    assert not shm_entries() - shm_before


def _cpus(resources: dict) -> float:
    return resources.get("CPU", 0.0)


def _actor_processes() -> list[int]:
    """Pids of mpfeed's actors on this machine (every node of the test cluster is here)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("ActorWorker" in part for part in process.info["cmdline"] or ()):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process.info["pid"])
        except psutil.Error:
            pass
    return found


def _settles(condition, seconds: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _on_ray(**options) -> mpfeed.RayBackend:
    return mpfeed.RayBackend(scheduling_strategy="SPREAD", **options)


def _ints(elements, key="i") -> list[int]:
    return [int(e[key]) if isinstance(e, dict) else int(e[1]) for e in elements]


# -- the same data as the local engine ---------------------------------------------------------------


def test_a_generator_source_gives_the_local_engines_elements_epoch_after_epoch(cluster):
    options = dict(args=(40,), workers=3, seed=7)
    with mpfeed.Feeder(sources.epochs_and_seeds, **options) as local:
        expected = [[dict(e) for e in local] for _ in range(2)]
    with mpfeed.Feeder(sources.epochs_and_seeds, backend=_on_ray(), **options) as remote:
        got = [[dict(e) for e in remote] for _ in range(2)]
        nodes = {w.node for w in remote.stats().workers}
        pids = {w.pid for w in remote.stats().workers}
    for local_epoch, remote_epoch in zip(expected, got):
        assert [e["i"] for e in remote_epoch] == list(range(40))
        for mine, theirs in zip(local_epoch, remote_epoch):
            same = ("i", "epoch", "index", "seed", "random", "np_random", "rng")
            assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}
    # Epochs run on the same actors: one process per shard, across both epochs.
    by_shard = {}
    for epoch in got:
        for e in epoch:
            by_shard.setdefault(int(e["index"]), set()).add(int(e["pid"]))
    assert all(len(p) == 1 for p in by_shard.values()) and {p.pop() for p in by_shard.values()} == pids
    assert nodes == {"127.0.0.1"}


@pytest.mark.parametrize("ordered", [True, False])
def test_a_shuffled_batched_random_access_source_matches_the_local_engine(cluster, ordered):
    options = dict(workers=2, seed=11, shuffle=True, batch_size=4, ordered=ordered)
    with mpfeed.Feeder(sources.Numbers(30), **options) as local:
        expected = [[b["i"].tolist() for b in local] for _ in range(2)]
    with mpfeed.Feeder(sources.Numbers(30), backend=_on_ray(), **options) as remote:
        got = [[b["i"].tolist() for b in remote] for _ in range(2)]
    if not ordered:  # first ready: the same batches, in any order
        expected = [sorted(epoch) for epoch in expected]
        got = [sorted(epoch) for epoch in got]
    assert got == expected
    assert got[0] != got[1]  # a new permutation each epoch


def test_partitions_cover_every_element_once(cluster):
    parts = []
    for index in range(2):
        with mpfeed.Feeder(
            sources.numbered, args=(25,), workers=2, partition=(index, 2), backend=_on_ray()
        ) as feeder:
            parts.append(_ints(feeder))
    assert sorted(parts[0] + parts[1]) == list(range(25))
    assert not set(parts[0]) & set(parts[1])


@pytest.mark.parametrize("kind", ["generator", "random-access"])
def test_resume_in_the_middle_of_an_epoch_gives_the_rest_of_it(cluster, kind):
    source, args = (sources.numbered, (30,)) if kind == "generator" else (sources.Numbers(30), ())
    options = dict(args=args, workers=2, seed=3, shuffle=kind == "random-access")
    with mpfeed.Feeder(source, backend=_on_ray(), **options) as first:
        stream = iter(first)
        before = [int(next(stream)["i"]) for _ in range(11)]
        state = first.state_dict()
    with mpfeed.Feeder(source, backend=_on_ray(), **options) as second:
        second.load_state_dict(state)
        after = _ints(second)
    with mpfeed.Feeder(source, **options) as local:
        whole = _ints(local)
    assert before + after == whole


def _mapping_of(address: int) -> str:
    """The line of /proc/self/maps that holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line
    raise AssertionError(f"{address:#x} is not mapped")


def test_records_are_read_only_views_of_the_object_store_that_outlive_the_feeder(cluster):
    with mpfeed.Feeder(sources.Arrays(6, 1), workers=2, backend=_on_ray()) as feeder:
        held = list(feeder)
    for index, array in enumerate(held):
        assert not array.flags.writeable and not array.flags.owndata
        assert array.ctypes.data % 64 == 0  # aligned, so TensorFlow can alias it
        # In the object store's shared mapping (a copy would be in this process's private memory).
        assert "plasma" in _mapping_of(array.ctypes.data)
        with pytest.raises(ValueError):
            array[0] = -1
        assert np.all(array == index)


def test_dataset_through_tensorflow_with_prefetch(cluster):
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.Numbers(24, shape=(64, 64)), workers=2, batch_size=4, backend=_on_ray()) as f:
        ds = f.dataset().prefetch(3)
        for _ in range(2):
            got = [int(i) for batch in ds for i in batch["i"].numpy()]
            assert got == list(range(24))
        sums = ds.map(lambda b: tf.reduce_sum(b["x"])).reduce(np.float32(0), lambda a, b: a + b)
        assert float(sums) == float(sum(range(24)) * 64 * 64)


def test_actors_convert_elements_to_the_feeders_dtypes(cluster):
    """``dtypes`` (what from_generator derives from its signature) applies on the actors too."""
    items = [([i, i + 0.5], np.float64(i)) for i in range(6)]
    dtypes = (np.int32, np.float32)
    with mpfeed.Feeder(items, workers=2, dtypes=dtypes, backend=_on_ray()) as feeder:
        got = list(feeder)
    assert [(x.dtype, x.tolist(), y.dtype, float(y)) for x, y in got] == [
        (np.dtype(np.int32), [i, i], np.dtype(np.float32), float(i)) for i in range(6)
    ]


@pytest.mark.parametrize("kind", ["generator", "random-access"])
def test_an_actor_runs_at_most_depth_records_ahead_of_the_consumer(cluster, tmp_path, kind):
    log = tmp_path / "made"
    log.touch()
    if kind == "generator":
        feeder = mpfeed.Feeder(
            sources.logs_what_it_makes, args=(1000, str(log)), workers=2, depth=3, backend=_on_ray()
        )
    else:
        feeder = mpfeed.Feeder(sources.LogsWhatItMakes(1000, str(log)), workers=2, depth=3, backend=_on_ray())
    with feeder:
        stream = iter(feeder)
        taken = [next(stream) for _ in range(10)]
        time.sleep(2.0)  # room for the actors to run ahead, if anything let them
        made = len(log.read_text().splitlines())
    assert len(taken) == 10
    assert 10 <= made <= 10 + 2 * 3  # what was taken, plus depth per actor


@pytest.mark.parametrize("kind", ["generator", "random-access"])
def test_an_abandoned_epoch_s_queued_work_is_never_made(cluster, tmp_path, kind):
    """Leaving an epoch after one element (a break, take(n), validation on the same dataset): the calls
    still queued at the actor are cancelled, so it makes at most the element it was on, and the next
    epoch does not wait behind a depth's worth of work nobody wants."""
    log = tmp_path / "made"
    log.touch()
    if kind == "generator":
        source, options = sources.logs_what_it_makes, dict(args=(100, str(log)), kwargs={"seconds": 0.3})
    else:
        source, options = sources.LogsWhatItMakes(100, str(log), 0.3), {}
    with mpfeed.Feeder(source, workers=1, depth=6, backend=_on_ray(), **options) as feeder:
        next(iter(feeder))  # epoch 0: one element, then abandoned
        next(iter(feeder))  # epoch 1
        lines = log.read_text().split()
    if kind == "generator":
        made_for_epoch_0 = sum(1 for line in log.read_text().splitlines() if line.startswith("0 "))
    else:  # the random-access order is 0, 1, 2, ... again in epoch 1: count the first pass's run
        made_for_epoch_0 = lines.index("0", 1) if lines.count("0") > 1 else len(lines)
    assert 1 <= made_for_epoch_0 <= 3, f"{made_for_epoch_0} elements made for an abandoned epoch at depth 6"


def test_a_source_that_exits_while_its_epoch_is_abandoned_is_a_worker_died_error(cluster):
    with mpfeed.Feeder(sources.faulty, args=(40, "close", "exit3"), workers=2, backend=_on_ray()) as feeder:
        stream = iter(feeder)
        [next(stream) for _ in range(3)]
        with pytest.raises(mpfeed.WorkerDiedError, match=r"worker 1 .* exited with code 3"):
            list(feeder)  # the next epoch closes the old one's generator, which calls sys.exit(3)


# -- failures -----------------------------------------------------------------------------------------


def test_a_raising_source_is_a_source_error_with_the_remote_traceback(cluster):
    with mpfeed.Feeder(sources.raise_at, args=(20, 9), workers=2, backend=_on_ray()) as feeder:
        got = []
        with pytest.raises(mpfeed.SourceError) as caught:
            for element in feeder:
                got.append(int(element[1]))
        # In order, and nothing at or after the failure; what was ready before it (the contract says no
        # more: the consumer never waits once a worker has failed).
        assert got == list(range(len(got))) and len(got) <= 9
        error = caught.value
        assert error.worker == 1 and error.node == "127.0.0.1" and error.epoch == 0
        assert "ValueError: bad record 9" in str(error) and "Ray actor" in str(error)
        assert "raise_at" in error.remote_traceback and "sources.py" in error.remote_traceback
        with pytest.raises(mpfeed.SourceError):
            next(iter(feeder))  # broken stays broken


def test_a_random_access_source_that_raises_names_the_index_and_position(cluster):
    with mpfeed.Feeder(sources.Faulty(12, 5, "raise"), workers=2, backend=_on_ray()) as feeder:
        with pytest.raises(mpfeed.SourceError, match=r"source\[5\] \(position 5 of epoch 0\)"):
            list(feeder)


def test_a_bad_element_of_a_shuffled_batched_source_on_ray_is_named_by_its_index_and_position(cluster):
    from mpfeed.dispatch import EpochOrder

    position = [int(i) for i in EpochOrder(40, 3, True, (0, 1), None, False).positions(0)].index(13)
    feeder = mpfeed.Feeder(
        sources.BadAt(40, 13), workers=2, shuffle=True, seed=3, batch_size=4, backend=_on_ray()
    )
    with feeder, pytest.raises(mpfeed.ElementError) as caught:
        list(feeder)
    assert caught.value.element == 13
    assert f"source[13] (position {position} of epoch 0)" in str(caught.value), str(caught.value)


def test_an_actor_dying_in_a_random_access_source_is_named_at_the_source_index(cluster):
    with mpfeed.Feeder(sources.Faulty(12, 7, "exit0"), workers=2, backend=_on_ray()) as feeder:
        with pytest.raises(mpfeed.WorkerDiedError) as caught:
            list(feeder)
    # Ray may lose the answer of a call the actor finished just before it died (source[5], which worker 1
    # made before source[7]), so it can name the call before the one that killed it; never another's.
    assert caught.value.element in (5, 7), str(caught.value)
    element = caught.value.element
    assert f"while producing source[{element}] (position {element} of epoch 0)" in str(caught.value)


def test_tensorflow_inside_a_source_fails_loudly_on_ray_too(cluster):
    import hardening_sources

    feeder = mpfeed.Feeder(hardening_sources.uses_tensorflow, args=("asarray",), workers=1, backend=_on_ray())
    with feeder, pytest.raises(mpfeed.SourceError, match="TensorFlow cannot run in mpfeed workers"):
        list(feeder)


def test_a_keyboard_interrupt_at_any_moment_leaves_a_ray_feeder_consistent_or_broken(cluster):
    """The race of the local engine's test, with Ray's calls (ray.wait, ray.get) in the middle of it."""
    from test_hardening import HANG_BOUND_S, _finish, _run_script, interrupted_script

    seed = random.randrange(1 << 30)
    environment = {"env_vars": {"PYTHONPATH": TESTS}}
    setup = f"import ray; ray.init(address={cluster.address!r}, runtime_env={environment!r})"
    script = interrupted_script(budget=6, seed=seed, setup=setup, backend="mpfeed.RayBackend()")
    status, out, err = _finish(_run_script(script), 6 + 3 * HANG_BOUND_S)
    assert status == 0, f"seed {seed}: {status}\n{out}\n{err[-6000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["problems"] == [], f"seed {seed}: {result}"
    assert result["counts"]["interrupted"] > 0


def test_a_node_removed_mid_stream_is_a_worker_died_error_naming_it(cluster):
    node = cluster.add_node(num_cpus=2, object_store_memory=STORE_BYTES, resources={"doomed": 2})
    cluster.wait_for_nodes()
    feeder = mpfeed.Feeder(
        sources.slow, args=(10_000, 0.01), workers=2, backend=mpfeed.RayBackend(resources={"doomed": 1})
    )
    with feeder:
        stream = iter(feeder)
        for _ in range(20):
            next(stream)
        removed = time.monotonic()
        threading.Timer(0.2, cluster.remove_node, args=(node,)).start()
        with pytest.raises(mpfeed.WorkerDiedError) as caught:
            for _ in stream:
                pass
        noticed = time.monotonic() - removed
    assert "node 127.0.0.1" in str(caught.value) and "died" in str(caught.value)
    assert caught.value.node == "127.0.0.1"
    assert noticed < SETTLE_S  # a bound on a hang, not a speed claim


def test_an_actor_silent_past_the_timeout_is_a_worker_timeout_error(cluster):
    feeder = mpfeed.Feeder(sources.slow, args=(10, 60.0), workers=2, timeout=1.0, backend=_on_ray())
    with (
        feeder,
        pytest.raises(mpfeed.WorkerTimeoutError, match=r"worker 0 \(pid \d+\) produced nothing for 1 s"),
    ):
        next(iter(feeder))


def test_close_from_another_thread_ends_an_iteration_waiting_on_actors(cluster):
    feeder = mpfeed.Feeder(sources.slow, args=(10, 60.0), workers=2, backend=_on_ray())
    closer = threading.Timer(1.0, feeder.close)
    closer.start()
    began = time.monotonic()
    with pytest.raises(mpfeed.ClosedError):
        next(iter(feeder))
    closer.join()
    assert time.monotonic() - began < SETTLE_S  # a bound on a hang: actors busy for a minute were killed


def test_close_gives_back_every_actor_and_its_resources(cluster):
    total = _cpus(ray.cluster_resources())
    feeder = mpfeed.Feeder(sources.slow, args=(1000, 0.01), workers=4, backend=_on_ray())
    next(iter(feeder))
    pids = [w.pid for w in feeder.stats().workers]
    assert _cpus(ray.available_resources()) == total - 4
    feeder.close()
    assert _settles(lambda: not set(pids) & set(_actor_processes()))
    assert _settles(lambda: _cpus(ray.available_resources()) == total)


def test_more_workers_than_the_cluster_holds_fails_clearly_and_leaves_nothing(cluster):
    with pytest.raises(mpfeed.WorkerError, match=r"Ray placed only \d of 7 worker actors within 10 s"):
        mpfeed.Feeder(sources.numbered, args=(10,), workers=7, backend=mpfeed.RayBackend(start_timeout=10))


def test_the_consumer_killed_with_sigkill_takes_its_actors_with_it(cluster, tmp_path):
    total = _cpus(ray.cluster_resources())
    ready = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {TESTS!r})
        import ray, mpfeed, sources
        ray.init(address={cluster.address!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {TESTS!r}}}}})
        feeder = mpfeed.Feeder(sources.slow, args=(10_000, 0.01), workers=3, backend=mpfeed.RayBackend())
        stream = iter(feeder)
        next(stream)
        open({str(ready)!r}, "w").write(" ".join(str(w.pid) for w in feeder.stats().workers))
        for _ in stream:
            pass
        """
    )
    consumer = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": TESTS})
    try:
        assert _settles(ready.exists, 120), "the consumer never started its feeder"
        pids = {int(p) for p in _settles_read(ready).split()}
        assert pids <= set(_actor_processes())
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait(30)
        assert _settles(lambda: not pids & set(_actor_processes())), "the actors outlived their consumer"
        assert _settles(lambda: _cpus(ray.available_resources()) == total)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()


def _settles_read(path) -> str:
    assert _settles(lambda: path.read_text().strip() != "", 10)
    return path.read_text()


def test_the_training_example_trains_on_the_cluster(cluster):
    script = os.path.join(os.path.dirname(TESTS), "scripts", "ray_fit.py")
    result = subprocess.run(
        [sys.executable, script, "--address", cluster.address, "--images", "96", "--batch", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2 epochs of 96 images" in result.stdout
    assert "on nodes ['127.0.0.1']" in result.stdout


# -- the option itself --------------------------------------------------------------------------------


def test_importing_mpfeed_never_imports_ray():
    code = "import sys, mpfeed; mpfeed.Feeder; mpfeed.RayBackend; assert 'ray' not in sys.modules, 'ray'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "option",
    [
        {"start_method": "spawn"},
        {"ring_memory": "memfd"},
        {"slot_bytes": 4096},
        {"shm_budget": 1 << 20},
        {"workers": "auto"},
    ],
)
def test_options_of_local_processes_are_refused_with_ray(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}.* applies to local worker processes"):
        mpfeed.Feeder(sources.Numbers(4), backend=mpfeed.RayBackend(), **option)
