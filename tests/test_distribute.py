"""Multi-worker tf.distribute for real: two `MultiWorkerMirroredStrategy` workers, each its own process
running scripts/distributed_fit.py on 127.0.0.1, train one model from mpfeed pipelines that
`strategy.distribute_datasets_from_function` makes with `mpfeed.from_generator(..., input_context=ctx)`.
Each worker records which elements its pipeline delivered in every epoch, its losses and its final
weights; the tests compare the two records."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import sources
from conftest import LEAK_GRACE_S, shm_entries

import mpfeed

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distributed_fit.py"
PAGE = ROOT / "docs" / "tf-distribute.md"  # its example is an excerpt of SCRIPT
# Both shuffled runs use the same seed: their orders must be the same.
RUNS = ["ordered", "shuffled", "generator", "shuffled"]
EPOCHS = 2
LENGTH = 100  # scripts/distributed_fit.py's LENGTH
# Generous (about 15 s here), yet below pytest's faulthandler_timeout, so that a hung cluster is killed
# and reported here, with both workers' output, instead of ending the whole run.
CLUSTER_BOUND_S = 80.0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _in_sessions(sessions: set[int]) -> list[psutil.Process]:
    """Live processes of these sessions: the workers' own children (fork server, mpfeed's workers)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return found


def _kill(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for worker in workers:
        worker.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Run both workers once; the records, and what they left behind."""
    pytest.importorskip("tensorflow")
    directory = tmp_path_factory.mktemp("cluster")
    shm_before = shm_entries()
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    workers, logs = [], []
    for index in range(2):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(config),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        log = open(directory / f"worker{index}.log", "w+")
        logs.append(log)
        command = [sys.executable, str(SCRIPT), "--epochs", str(EPOCHS), "--runs", *RUNS]
        command += ["--record", str(directory / f"worker{index}.json")]
        workers.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        )

    def output() -> str:
        text = ""
        for index, log in enumerate(logs):
            log.seek(0)
            text += f"\n--- worker {index} ---\n" + log.read()[-3000:]
        return text

    try:
        deadline = time.monotonic() + CLUSTER_BOUND_S
        # A worker that fails leaves the other waiting for it forever: stop both at the first failure.
        while any(w.poll() is None for w in workers):
            failed = any(w.returncode not in (None, 0) for w in workers)
            if failed or time.monotonic() > deadline:
                _kill(workers)
                what = "a worker failed" if failed else f"still running after {CLUSTER_BOUND_S:.0f} s"
                pytest.fail(f"{what}; both were killed{output()}")
            time.sleep(0.1)
        assert all(w.returncode == 0 for w in workers), output()
        sessions = {w.pid for w in workers}
        deadline = time.monotonic() + LEAK_GRACE_S
        while (_in_sessions(sessions) or shm_entries() - shm_before) and time.monotonic() < deadline:
            time.sleep(0.05)
        records = [json.loads((directory / f"worker{index}.json").read_text()) for index in range(2)]
        yield {
            "records": records,
            "processes_left": [(p.pid, p.cmdline()) for p in _in_sessions(sessions)],
            "shm_left": sorted(shm_entries() - shm_before),
        }
    finally:
        _kill(workers)
        for log in logs:
            log.close()


def _epochs(cluster, run_index: int) -> list[list[list[int]]]:
    """For one run: each worker's list of epochs, each the indices its pipeline delivered."""
    records = cluster["records"]
    for record in records:
        assert record["runs"][run_index]["run"] == RUNS[run_index]
    return [record["runs"][run_index]["epochs"] for record in records]


@pytest.mark.parametrize("run_index", range(len(RUNS)), ids=RUNS)
def test_the_workers_pipelines_are_disjoint_and_cover_every_element_once_per_epoch(cluster, run_index):
    first, second = _epochs(cluster, run_index)
    assert len(first) == len(second) == EPOCHS
    for epoch in range(EPOCHS):
        assert first[epoch] and second[epoch], "each worker must get a part"
        assert not set(first[epoch]) & set(second[epoch])
        assert sorted(first[epoch] + second[epoch]) == list(range(LENGTH))
    if RUNS[run_index] == "ordered":
        assert all(part == sorted(part) for part in first + second)


def test_shuffled_epochs_differ_and_the_same_seed_gives_the_same_orders(cluster):
    shuffled = [index for index, run in enumerate(RUNS) if run == "shuffled"]
    once, again = (_epochs(cluster, index) for index in shuffled)
    assert once == again  # new feeders, the same seed: the same order, epoch by epoch, on each worker
    for parts in once:
        assert parts[0] != parts[1]
        assert parts[0] != sorted(parts[0])


def test_both_workers_train_to_the_same_weights(cluster):
    first, second = cluster["records"]
    assert first["task"] == 0 and second["task"] == 1
    # Each worker's gradients come from its own part of the data: the weights agree only if every step
    # summed the gradients of both (the all-reduce), and they moved to the weights the targets came from.
    assert first["weights"] == second["weights"]
    kernel, bias = (np.array(w) for w in first["weights"])
    np.testing.assert_allclose(kernel[:, 0], np.linspace(-1.0, 1.0, 8), atol=0.05)
    np.testing.assert_allclose(bias, 0.0, atol=0.05)
    losses = first["runs"][0]["losses"]
    assert losses[-1] < losses[0] / 2


def test_the_workers_leave_no_process_and_no_shared_memory_name(cluster):
    assert not cluster["processes_left"]
    assert not cluster["shm_left"]


def test_the_docs_show_the_code_the_workers_run():
    """docs/tf-distribute.md's example is an excerpt of scripts/distributed_fit.py: its lines appear
    there in the same order ("..." marks what it leaves out)."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert blocks
    script = [line.strip() for line in SCRIPT.read_text().splitlines()]
    position = 0
    for block in blocks:
        for line in (line.strip() for line in block.splitlines()):
            if not line or line == "...":
                continue
            assert line in script[position:], f"{PAGE.name} line not in {SCRIPT.name} (in order): {line!r}"
            position = script.index(line, position) + 1


def test_a_partitioned_dataset_is_not_sharded_again_by_tensorflows_auto_sharding():
    """`strategy.experimental_distribute_dataset` (and Keras' fit) apply TensorFlow's auto-sharding on
    each worker: it found no files in a feeder's dataset, sharded its elements instead, and each host
    kept half of its own partition."""
    pytest.importorskip("tensorflow")
    from tensorflow.python.distribute import input_ops  # the rewrite those apply on each worker

    with mpfeed.Feeder(sources.Numbers(16), workers=1, partition=(1, 2)) as feeder:
        dataset = input_ops.auto_shard_dataset(feeder.dataset().batch(2), 2, 1, 2)
        seen = [int(i) for batch in dataset for i in batch["i"]]
    assert seen == list(range(1, 16, 2))


def test_shuffled_input_pipelines_without_a_seed_are_refused_since_their_parts_would_overlap():
    tf = pytest.importorskip("tensorflow")
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
    children = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match="needs a seed"):
        mpfeed.from_generator(sources.Numbers(8), input_context=context, shuffle=True)
    assert set(psutil.Process().children(recursive=True)) <= children, "refused before any worker started"
    one = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0)
    dataset = mpfeed.from_generator(sources.Numbers(8), input_context=one, shuffle=True, workers=1)
    assert sorted(int(e["i"]) for e in dataset) == list(range(8))
    dataset._mpfeed_feeder.close()
