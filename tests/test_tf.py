"""The tf.data face with real TensorFlow: signatures, epochs, aliasing, prefetch while holding tensors."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
import sources

import mpfeed

tf = pytest.importorskip("tensorflow")


def test_dataset_infers_the_signature_and_gives_epochs_in_order():
    with mpfeed.Feeder(sources.numbered, args=(12,), workers=3) as feeder:
        ds = feeder.dataset()
        assert ds.element_spec == {
            "x": tf.TensorSpec((3, 4), tf.float32),
            "i": tf.TensorSpec((), tf.int64),
        }
        for _ in range(2):
            got = [(int(e["i"]), float(e["x"][0, 0])) for e in ds]
            assert got == [(i, float(i)) for i in range(12)]
        assert feeder.stats().items == 24


def test_inferred_signature_covers_strings_scalars_and_lists():
    with mpfeed.Feeder(sources.every_leaf_type, args=(4,), workers=2) as feeder:
        ds = feeder.dataset()
        spec = ds.element_spec
        assert spec["python"] == (
            tf.TensorSpec((), tf.int64),
            tf.TensorSpec((), tf.float64),
            tf.TensorSpec((), tf.bool),
            tf.TensorSpec((), tf.string),
            tf.TensorSpec((), tf.string),
        )
        assert spec["scalars"] == (  # a list in the element, a tuple in the signature
            tf.TensorSpec((), tf.int32),
            tf.TensorSpec((), tf.float64),
            tf.TensorSpec((), tf.bool),
            tf.TensorSpec((), tf.uint8),
        )
        elements = list(ds)
    assert [e["python"][3].numpy().decode() for e in elements] == [f"text {i} ünïcode" for i in range(4)]
    assert [int(e["scalars"][0]) for e in elements] == [0, 1, 2, 3]
    assert elements[2]["arrays"][13].dtype == tf.complex128


def test_an_explicit_signature_is_used_as_given():
    spec = (tf.TensorSpec((8, 8), tf.int64), tf.TensorSpec((), tf.int64))
    with mpfeed.Feeder(sources.pairs, args=(10,), workers=2) as feeder:
        ds = feeder.dataset(output_signature=spec)
        assert ds.element_spec == spec
        assert [int(label) for _, label in ds] == list(range(10))


def test_batched_feeder_gives_batches_with_an_unknown_leading_axis():
    with mpfeed.Feeder(sources.numbered, args=(10,), workers=2, batch_size=4) as feeder:
        ds = feeder.dataset()
        assert ds.element_spec["x"] == tf.TensorSpec((None, 3, 4), tf.float32)
        sizes = [int(b["i"].shape[0]) for b in ds]
    assert sizes == [4, 4, 1, 1]


def test_tensors_alias_the_ring_and_stay_intact_under_prefetch_while_all_are_held():
    """prefetch(64) over depth-2 rings, every tensor kept: each one checked for corruption at the end."""
    n = 300
    with mpfeed.Feeder(sources.pairs, args=(n,), workers=2, depth=2, timeout=60) as feeder:
        held = list(feeder.dataset(chunk_size=1).prefetch(64))  # zero-copy: every tensor aliases a slot
        for i, (array, label) in enumerate(held):
            assert int(label) == i
            np.testing.assert_array_equal(array.numpy(), np.arange(i, i + 64).reshape(8, 8))
        stats = feeder.stats()
    assert stats.items == n
    assert stats.copies > 0, "holding everything must make the feeder copy instead of waiting"


def test_tensorflow_aliases_slot_views_without_copying():
    with mpfeed.Feeder(sources.pairs, args=(6,), workers=1, depth=4) as feeder:
        tensors = [array for array, _ in feeder.dataset(chunk_size=1)]
        # The tensors keep the slots' views alive: their slots are held, not returned.
        assert feeder.stats().workers[0].held_slots >= 1
        del tensors
        gc.collect()
        assert feeder.stats().workers[0].held_slots == 0


def test_small_batches_reach_tensorflow_as_copies_and_large_ones_as_views():
    """TensorFlow lets go of aliased arrays late, so small batches are copied and free their slot at once."""
    for shape, aliased in [((3, 4), False), ((128, 256), True)]:  # batches of 4 rows of 48 B or 128 KiB
        with mpfeed.Feeder(
            sources.numbered, args=(12,), kwargs={"shape": shape}, workers=1, batch_size=4
        ) as feeder:
            batches = list(feeder.dataset())  # the first travels in the pipe, the other two in slots
            assert feeder.stats().workers[0].held_slots == (2 if aliased else 0)
            assert [[int(i) for i in batch["i"]] for batch in batches] == [
                [0, 1, 2, 3],
                [4, 5, 6, 7],
                [8, 9, 10, 11],
            ]
            np.testing.assert_array_equal(batches[2]["x"].numpy()[:, -1, -1], [8, 9, 10, 11])
            del batches


def test_the_copies_are_the_datasets_own_and_iterating_the_feeder_still_gives_views():
    with mpfeed.Feeder(sources.numbered, args=(12,), workers=1, batch_size=4) as feeder:
        assert len(list(feeder.dataset())) == 3  # small batches: copied
        held = list(feeder)  # the next epoch, iterated directly: every batch in a slot, held
        assert feeder.stats().workers[0].held_slots == 3
        assert [batch["i"].tolist() for batch in held] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        del held


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_small_elements_travel_in_chunks_and_arrive_in_order(chunk_size):
    n = 101  # shards of 34, 34 and 33: the last chunk is short
    with mpfeed.Feeder(sources.pairs, args=(n,), workers=3, depth=2) as feeder:
        ds = feeder.dataset(chunk_size=chunk_size)
        assert ds.element_spec == (tf.TensorSpec((8, 8), tf.int64), tf.TensorSpec((), tf.int64))
        for _ in range(2):
            held = list(ds)
            assert [int(label) for _, label in held] == list(range(n))
            for i, (array, _) in enumerate(held):
                np.testing.assert_array_equal(array.numpy(), np.arange(i, i + 64).reshape(8, 8))


def test_an_empty_source_needs_an_explicit_signature():
    spec = (tf.TensorSpec((8, 8), tf.int64), tf.TensorSpec((), tf.int64))
    with mpfeed.Feeder(sources.pairs, args=(0,), workers=2) as feeder:
        with pytest.raises(ValueError, match="produced no elements.*pass output_signature"):
            feeder.dataset()
        assert list(feeder.dataset(spec)) == []
        assert list(feeder) == []


def test_chunks_need_fixed_shapes():
    spec = (tf.TensorSpec((None, 8), tf.int64), tf.TensorSpec((), tf.int64))
    with mpfeed.Feeder(sources.pairs, args=(4,), workers=1) as feeder:
        with pytest.raises(ValueError, match="chunk_size needs elements of fixed, non-empty shapes"):
            feeder.dataset(spec, chunk_size=4)
        assert [int(label) for _, label in feeder.dataset(spec)] == [0, 1, 2, 3]  # element by element


def test_dataset_pipelines_batch_and_map():
    with mpfeed.Feeder(sources.pairs, args=(20,), workers=2) as feeder:
        ds = feeder.dataset().map(lambda x, y: (tf.reduce_sum(x), y)).batch(5).prefetch(2)
        labels = [label.numpy().tolist() for _, label in ds]
    assert labels == [list(range(k, k + 5)) for k in range(0, 20, 5)]


def test_from_generator_is_shaped_like_tensorflows_and_owns_its_feeder():
    ds = mpfeed.from_generator(sources.numbered, args=(9,), workers=2)
    assert [int(e["i"]) for e in ds] == list(range(9))
    assert [int(e["i"]) for e in ds.take(3)] == [0, 1, 2]
    processes = [psutil.Process(w.pid) for w in ds._mpfeed_feeder.stats().workers]
    del ds
    gc.collect()
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive, "the feeder's workers must stop once its dataset is gone"


def test_workers_never_import_tensorflow_even_when_the_main_script_does(tmp_path):
    """A training script imports TensorFlow at the top and defines its source beside it."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import tensorflow as tf
            import numpy as np
            import mpfeed

            import keras
            from tensorflow.keras import layers

            AUTOTUNE = tf.data.AUTOTUNE  # top-level uses of TensorFlow, common in training scripts


            class Clock(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    pass


            @tf.function
            def augment(x):
                return tf.image.flip_left_right(x)


            DENSE = layers.Dense(4, activation="relu")
            print("TensorFlow", tf.__version__)
            GPUS = tf.config.list_physical_devices("GPU")
            for gpu in GPUS:
                tf.config.experimental.set_memory_growth(gpu, True)
            REPLICAS = max(1, len(GPUS))
            with tf.device("/cpu:0"):
                SCALE = tf.constant(2.0)

            def source(shard):
                module = sys.modules.get("tensorflow")
                yield {
                    "real": module is not None and hasattr(module, "__file__"),
                    "python_loaded": "tensorflow.python.framework.ops" in sys.modules,
                }

            if __name__ == "__main__":
                with mpfeed.Feeder(source, workers=2) as feeder:
                    results = list(feeder)
                assert len(results) == 2, results
                assert not any(r["real"] or r["python_loaded"] for r in results), results
                assert "tensorflow.python.framework.ops" in sys.modules  # the parent has it for real
                print("workers-clean")
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert "workers-clean" in result.stdout, result.stderr[-3000:]


def test_import_mpfeed_does_not_import_tensorflow():
    code = "import sys, mpfeed; assert 'tensorflow' not in sys.modules; print('light')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.strip() == "light", result.stderr


@pytest.mark.parametrize("room_for_lingering_views", [True, False])
def test_large_elements_consumed_in_a_graph_need_no_ring_full_copies_with_default_options(
    room_for_lingering_views,
):
    """TensorFlow holds aliased 8 MiB arrays past the generator call (and prefetch holds more): with the
    default options the ring grants slots beyond depth instead of copying. A budget of two slots a ring
    shows the copies they avoid."""
    n, slot = 120, 8 << 20
    budget = None if room_for_lingering_views else 2 * 2 * (slot + (2 << 20))  # two slots a ring
    with mpfeed.Feeder(sources.Arrays(n, 8), workers=2, shm_budget=budget) as feeder:
        ds = feeder.dataset().prefetch(4)  # TensorFlow holds these four, the one in hand and the last one
        total = ds.reduce(tf.constant(0.0), lambda acc, x: acc + x[0])
        stats = feeder.stats()
    assert float(total) == sum(range(n))
    if room_for_lingering_views:
        assert stats.copies == 0  # (slots are granted only as views linger: how many varies with TensorFlow)
    else:
        assert stats.copies > 0 and stats.depth_grows == 0
    assert stats.shm_bytes <= stats.shm_budget
