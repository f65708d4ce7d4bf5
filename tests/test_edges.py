"""Edges that once gave the wrong error, or none: seeds, odd strings, stdin scripts, varying shapes, where a
failure surfaces, overflow counting, a Ctrl-C during dataset() iteration, and Docker's 64 MiB /dev/shm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import sources
from conftest import can_mount_a_private_tmpfs

import mpfeed

HANG_BOUND_S = 30


@pytest.mark.parametrize("seed", [-1, 1.5, True, "7"])
def test_a_bad_seed_is_refused_before_any_worker_starts(seed):
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        mpfeed.Feeder(sources.numbered, args=(4,), workers=1, seed=seed)
    assert not psutil.Process().children()


def test_a_str_leaf_that_is_not_utf8_is_refused_naming_the_leaf():
    with mpfeed.Feeder(sources.leaf_values, args=(["fine", "\ud800"],), workers=1) as feeder:
        with pytest.raises(mpfeed.ElementError, match=r"element\['text'\] is a str that cannot be encoded"):
            list(feeder)


def test_numpy_strings_of_changing_length_are_carried_as_str_and_bytes():
    leaves = [np.str_("ab"), np.str_("abcd"), np.str_("")]
    with mpfeed.Feeder(sources.leaf_values, args=(leaves,), workers=1) as feeder:
        assert [e["text"] for e in feeder] == ["ab", "abcd", ""]
    with mpfeed.Feeder(
        sources.leaf_values, args=([np.bytes_(b"x"), np.bytes_(b"xyz")],), workers=1
    ) as feeder:
        assert [e["text"] for e in feeder] == [b"x", b"xyz"]


def test_a_source_in_a_script_read_from_stdin_is_refused_before_any_worker_starts():
    script = textwrap.dedent(
        """
        import psutil, mpfeed
        def source(shard):
            yield 1
        try:
            mpfeed.Feeder(source, workers=1)
        except TypeError as error:
            print("refused:", error, "children:", len(psutil.Process().children()))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60, env=env
    )
    assert "refused: mpfeed's source (or an argument) is defined in a script read from standard input" in (
        result.stdout
    ), result.stdout + result.stderr[-2000:]
    assert "children: 0" in result.stdout


@pytest.mark.parametrize("size", [8, 300])  # chunked small elements, and large ones one by one
def test_a_shape_that_changes_after_the_first_element_names_the_leaf_and_the_signature_to_pass(size):
    tf = pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.growing_image, args=(6, size), workers=1) as feeder:
        with pytest.raises(tf.errors.OpError) as caught:
            list(feeder.dataset())
    message = str(caught.value)
    assert f"element['image'] has shape ({size + 1}, {size}, 3)" in message
    assert f"tf.TensorSpec(shape=(None, {size}, 3), ...)" in message
    assert f"(2, {size + 1}" not in message, "the chunk's leading dimension must not leak into the message"


def test_from_generator_raises_only_when_the_first_element_itself_fails():
    tf = pytest.importorskip("tensorflow")
    for _ in range(4):  # worker 1 fails while worker 0 still makes element 0
        ds = mpfeed.from_generator(sources.first_fails_elsewhere, args=(10,), workers=2)
        with pytest.raises(tf.errors.OpError, match="worker 1 cannot start its shard"):
            list(ds)
        ds._mpfeed_feeder.close()
    with pytest.raises(mpfeed.SourceError, match="bad record 0"):
        mpfeed.from_generator(sources.raise_at, args=(10, 0), workers=2)


def test_the_record_that_sizes_a_ring_is_no_overflow():
    with mpfeed.Feeder(sources.same_size, args=(200,), workers=2) as feeder:
        assert len(list(feeder)) == 200
        assert len(list(feeder)) == 200
        assert feeder.stats().overflow == 0


def test_ctrl_c_during_dataset_iteration_prints_nothing_more_and_stops(tmp_path):
    pytest.importorskip("tensorflow")
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, sources, mpfeed
            import tensorflow as tf
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if __name__ == "__main__":
                with mpfeed.Feeder(sources.slow, args=(100000, 0.005), workers=2) as feeder:
                    print(" ".join(str(w.pid) for w in feeder.stats().workers), flush=True)
                    try:
                        for _ in feeder.dataset().batch(4).prefetch(2):
                            pass
                    except KeyboardInterrupt:
                        print("interrupted", flush=True)
                print("closed", flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TF_CPP_MIN_LOG_LEVEL": "2"}
    consumer = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        time.sleep(2.0)
        os.killpg(consumer.pid, signal.SIGINT)
        out, err = consumer.communicate(timeout=HANG_BOUND_S)
        assert consumer.returncode == 0, err[-3000:]
        assert out.split() == ["interrupted", "closed"]
        for word in ("Error", "Traceback", "exited with code"):
            assert word not in err, err[-3000:]
        _, alive = psutil.wait_procs(
            [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=10
        )
        assert not alive
    finally:
        consumer.kill()
        consumer.wait()


_DOCKER_SCRIPT = textwrap.dedent(
    """
    import json, os, numpy as np, mpfeed, sources
    epochs = []
    with mpfeed.Feeder(sources.images, args=(512,), workers=8, batch_size=64) as feeder:
        for _ in range(2):
            labels = []
            for images, batch_labels in feeder:
                assert images.shape[1:] == (224, 224, 3)
                for image, label in zip(images, batch_labels):
                    assert (image == label % 251).all()
                labels.extend(int(label) for label in batch_labels)
            epochs.append(sorted(labels))
        kind = feeder.stats().ring_memory
        during = os.listdir("/dev/shm")
    after = os.listdir("/dev/shm")
    print(json.dumps({"epochs": epochs, "ring_memory": kind, "during": during, "after": after}))
    """
)


@pytest.mark.skipif(not can_mount_a_private_tmpfs(), reason="needs root and unshare -m to mount a tmpfs")
def test_dockers_64_mib_dev_shm_just_works():
    """8 workers x depth 4 x batches of 64 images (9.6 MiB each) need 300 MiB of rings."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = f'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "{sys.executable}" -c "$0"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, _DOCKER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    assert outcome["epochs"] == [list(range(512))] * 2
    assert outcome["ring_memory"] == "memfd"
    assert outcome["during"] == [] and outcome["after"] == []


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
