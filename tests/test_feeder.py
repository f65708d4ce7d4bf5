"""The consumer side with real workers: order, content, views, batching, epochs, seeds, stats."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
import sources

import mpfeed


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_ordered_iteration_gives_source_order_and_content(workers):
    with mpfeed.Feeder(sources.numbered, args=(37,), workers=workers) as feeder:
        got = [(element["i"], element["x"].copy()) for element in feeder]
    assert [i for i, _ in got] == list(range(37))
    for i, x in got:
        np.testing.assert_array_equal(x, np.full((3, 4), i, dtype=np.float32))


def test_unordered_iteration_delivers_every_element_once():
    with mpfeed.Feeder(sources.numbered, args=(50,), workers=3, ordered=False) as feeder:
        got = [(element["i"], float(element["x"][0, 0])) for element in feeder]
    assert sorted(i for i, _ in got) == list(range(50))
    assert all(i == x for i, x in got)


def test_every_leaf_type_survives_the_trip_in_nested_structures():
    n = 6
    expected = [e for shard in _shards(2) for e in sources.every_leaf_type(n, shard)]
    expected.sort(key=lambda e: e["python"][0])
    with mpfeed.Feeder(sources.every_leaf_type, args=(n,), workers=2) as feeder:
        got = list(feeder)
    assert len(got) == n
    for want, have in zip(expected, got):
        _assert_same(want, have)


def test_elements_from_3_bytes_to_8_mib_in_one_stream_arrive_intact():
    sizes = [3, 7, 8 << 20, 1 << 20, 100, 8 << 20, 64, 4096, 3, 2 << 20]  # both rings sized small
    with mpfeed.Feeder(sources.sizes, args=(sizes,), workers=2, depth=2) as feeder:
        for k, (data, index) in enumerate(feeder):
            assert index == k
            assert data.shape == (sizes[k],)
            assert data.dtype == np.uint8
            assert (data == k % 251).all()
        stats = feeder.stats()
    assert stats.overflow > 0, "elements larger than the slot sized from the first one must overflow"
    assert stats.items == len(sizes)


def test_views_are_read_only_aligned_and_point_into_the_ring():
    with mpfeed.Feeder(sources.pairs, args=(8,), workers=2) as feeder:
        for array, _ in feeder:
            assert not array.flags.writeable
            assert array.ctypes.data % 64 == 0
            slot = array.base
            assert isinstance(slot, np.ndarray) and slot.dtype == np.uint8, "a view, not a copy"
            with pytest.raises(ValueError):
                array[0, 0] = 1
            with pytest.raises(ValueError):
                array.flags.writeable = True


def test_holding_every_element_of_a_depth_2_ring_neither_deadlocks_nor_corrupts():
    n = 200
    with mpfeed.Feeder(sources.pairs, args=(n,), workers=2, depth=2, timeout=60) as feeder:
        held = list(feeder)
        for i, (array, label) in enumerate(held):
            assert label == i
            np.testing.assert_array_equal(array, np.arange(i, i + 64).reshape(8, 8))
        assert feeder.stats().copies > 0
        # Everything is still held; a new epoch must still flow.
        assert [label for _, label in feeder] == list(range(n))


def test_a_held_view_keeps_its_data_while_later_elements_flow():
    with mpfeed.Feeder(sources.pairs, args=(100,), workers=1, depth=3) as feeder:
        iterator = iter(feeder)
        first, _ = next(iterator)
        snapshot = first.copy()
        for _ in iterator:
            pass
        np.testing.assert_array_equal(first, snapshot)
        for _ in feeder:  # and through another epoch
            pass
        np.testing.assert_array_equal(first, snapshot)


def test_released_views_return_their_slots():
    with mpfeed.Feeder(sources.pairs, args=(300,), workers=2, depth=4) as feeder:
        for array, _ in feeder:
            del array
        stats = feeder.stats()
    assert stats.copies == 0, "views dropped at once must never force copies"
    assert all(worker.held_slots == 0 for worker in stats.workers)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_batches_stack_elements_in_the_workers(drop_remainder):
    n, batch = 22, 4  # worker 0 gets 11 elements, worker 1 gets 11: 2 full batches + 3 left each
    with mpfeed.Feeder(
        sources.numbered, args=(n,), workers=2, batch_size=batch, drop_remainder=drop_remainder
    ) as feeder:
        batches = [(b["x"].copy(), b["i"].copy()) for b in feeder]
        stats = feeder.stats()
    sizes = [len(i) for _, i in batches]
    assert sizes == ([4, 4, 4, 4] if drop_remainder else [4, 4, 4, 4, 3, 3])
    for x, i in batches:
        assert x.shape == (len(i), 3, 4)
        assert i.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0, 0], i)
    seen = sorted(int(v) for _, i in batches for v in i)
    assert seen == list(range(16 if drop_remainder else n))
    assert stats.items == sum(sizes)


def test_batches_of_strings_and_python_scalars():
    with mpfeed.Feeder(sources.every_leaf_type, args=(8,), workers=2, batch_size=4) as feeder:
        batches = list(feeder)
    assert len(batches) == 2
    texts = batches[0]["python"][3]
    assert texts.dtype == object and list(texts) == [f"text {i} ünïcode" for i in (0, 2, 4, 6)]
    assert batches[0]["python"][0].tolist() == [0, 2, 4, 6]
    assert batches[1]["python"][2].tolist() == [True, True, True, True]
    assert list(batches[1]["python"][4]) == [b"bytes\x00" + bytes([i]) for i in (1, 3, 5, 7)]


def test_epochs_rerun_the_source_on_the_same_processes():
    with mpfeed.Feeder(sources.epochs_and_seeds, args=(6,), workers=2) as feeder:
        runs = [list(feeder) for _ in range(3)]
        assert feeder.stats().items == 18
    for epoch, run in enumerate(runs):
        assert [e["i"] for e in run] == list(range(6))
        assert {e["epoch"] for e in run} == {epoch}
    assert {e["pid"] for run in runs for e in run} == {e["pid"] for e in runs[0]}
    assert len({e["pid"] for e in runs[0]}) == 2


def test_breaking_out_of_an_epoch_then_iterating_again_serves_that_epoch_again_cleanly():
    """A pass that stopped early (a break, a take, Keras's peek) moves nothing: the next pass is the same
    epoch from its start, unless the loop names another with set_epoch."""
    with mpfeed.Feeder(sources.epochs_and_seeds, args=(40,), workers=2, depth=2) as feeder:
        for element in feeder:
            if element["i"] == 3:
                break
        second = list(feeder)
        for element in feeder:
            if element["i"] == 3:
                break
        feeder.set_epoch(1)
        third = list(feeder)
    assert [e["i"] for e in second] == [e["i"] for e in third] == list(range(40))
    assert {e["epoch"] for e in second} == {0}
    assert {e["epoch"] for e in third} == {1}


def test_seeds_are_distinct_per_shard_and_epoch_and_reproducible():
    def draw(seed):
        with mpfeed.Feeder(sources.epochs_and_seeds, args=(4,), workers=2, seed=seed) as feeder:
            return [
                [(e["index"], e["seed"], e["random"], e["np_random"], e["rng"]) for e in feeder]
                for _ in range(2)
            ]

    first, again, other = draw(7), draw(7), draw(8)
    assert first == again
    assert first != other
    seeds = {(epoch, index): seed for epoch, run in enumerate(first) for index, seed, *_ in run}
    assert len(set(seeds.values())) == 4, "each worker and epoch gets its own seed"
    for generator in range(2):  # the seeded global generators of random and numpy
        draws = [values[generator] for run in first for _, _, *values in run]
        assert len(set(draws)) == len(draws), "no two shards or epochs draw the same random numbers"
    rngs = {(epoch, index): rng for epoch, run in enumerate(first) for index, _, _, _, rng in run}
    assert len(set(rngs.values())) == 4, "default_rng(shard.seed) differs per shard and epoch"


def test_workers_import_the_source_module_each_on_its_own(start_method):
    """Nothing a module creates at import (a random generator, an open file) is shared between workers."""
    with mpfeed.Feeder(sources.import_time_draws, workers=4, start_method=start_method) as feeder:
        draws = list(feeder)
    assert len(set(draws)) == 4


def test_workers_run_math_libraries_single_threaded_unless_told_otherwise(start_method, monkeypatch):
    names = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    with mpfeed.Feeder(sources.environment, args=(names,), workers=2, start_method=start_method) as feeder:
        seen = list(feeder)
    assert seen == [{"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}] * 2


def test_records_too_big_for_their_slot_still_count_against_the_ring():
    """While the consumer waits for a slow worker, a fast one's oversized records must not pile up."""
    depth = 2
    with mpfeed.Feeder(sources.small_then_large, args=(60, 1 << 20, 0), workers=2, depth=depth) as feeder:
        iterator = iter(feeder)
        next(iterator)  # waits about two seconds for worker 0, while worker 1 produces
        queued = feeder.stats().workers[1].queued
        # At most a ring's worth, plus the first record (it sized the ring and holds no slot).
        assert queued <= depth + 1, f"{queued} records of worker 1 queued in the consumer"
        rest = list(iterator)
        assert [int(x[0]) for x, _ in rest] == [i % 251 for i in range(1, 60)]
        assert feeder.stats().overflow > 0


def test_a_source_that_cannot_take_shard_is_refused_before_any_worker_starts():
    with pytest.raises(
        TypeError, match=r"calls source\(\*args, shard=Shard, \*\*kwargs\).*no_shard_parameter"
    ):
        mpfeed.Feeder(sources.no_shard_parameter, args=(3,), workers=1)
    assert not psutil.Process().children()


def test_stats_count_what_was_delivered():
    with mpfeed.Feeder(sources.pairs, args=(30,), workers=3) as feeder:
        for _ in feeder:
            pass
        stats = feeder.stats()
    assert stats.items == 30
    assert stats.bytes == 30 * (64 * 8 + 8)
    assert [w.items for w in stats.workers] == [10, 10, 10]
    assert all(w.alive and w.pid > 0 and w.rss_bytes > 0 and w.cpu_s >= 0 for w in stats.workers)
    # Each ring has room for twice depth: the slots beyond depth wait for views that linger.
    assert stats.shm_bytes == sum(w.slot_bytes for w in stats.workers) * 8 > 0
    assert all(w.slots == 4 for w in stats.workers) and stats.shm_bytes <= stats.shm_budget
    assert stats.wait_s >= 0 and stats.items_per_s > 0
    with pytest.raises(AttributeError):
        stats.items = 0  # frozen


def test_close_mid_epoch_stops_workers_and_keeps_held_views_valid():
    feeder = mpfeed.Feeder(sources.pairs, args=(1000,), workers=2, depth=2)
    iterator = iter(feeder)
    held = [next(iterator) for _ in range(3)]
    processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
    feeder.close()
    feeder.close()  # idempotent
    assert not any(process.is_running() for process in processes)
    for i, (array, label) in enumerate(held):
        assert label == i
        np.testing.assert_array_equal(array, np.arange(i, i + 64).reshape(8, 8))
    with pytest.raises(mpfeed.ClosedError):
        next(iterator)
    with pytest.raises(mpfeed.ClosedError):
        iter(feeder)


def test_a_dropped_feeder_stops_its_workers():
    feeder = mpfeed.Feeder(sources.pairs, args=(1000,), workers=2)
    next(iter(feeder))
    processes = [psutil.Process(w.pid) for w in feeder.stats().workers]
    del feeder
    gc.collect()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive


def test_workers_default_to_usable_cpus():
    with mpfeed.Feeder(sources.numbered, args=(4,)) as feeder:
        assert feeder.workers == len(psutil.Process().cpu_affinity())
        assert len(list(feeder)) == 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": 0}, "workers"),
        ({"depth": 0}, "depth"),
        ({"batch_size": 0}, "batch_size"),
        ({"slot_bytes": -1}, "slot_bytes"),
        ({"timeout": 0}, "timeout"),
        ({"start_method": "fork"}, "fork"),
    ],
)
def test_bad_options_are_refused_before_any_worker_starts(options, message):
    with pytest.raises(ValueError, match=message):
        mpfeed.Feeder(sources.numbered, args=(4,), **options)


def _shards(count):
    return [mpfeed.Shard(index, count, 0, 0) for index in range(count)]


def _assert_same(want, have):
    assert type(want) is type(have), (want, have)
    if isinstance(want, dict):
        assert list(have) == sorted(want), "keys come back sorted, as tf.nest orders them"
        for key in want:
            _assert_same(want[key], have[key])
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(have)
        for a, b in zip(want, have):
            _assert_same(a, b)
    elif isinstance(want, np.ndarray):
        assert want.dtype == have.dtype and want.shape == have.shape
        np.testing.assert_array_equal(want, have)
    elif isinstance(want, np.generic):
        assert want.dtype == have.dtype and want == have
    else:
        assert want == have


def test_rings_stay_within_the_budget_and_a_budget_too_small_for_a_slot_is_refused():
    slot = 4096
    with mpfeed.Feeder(sources.pairs, args=(300,), workers=3, depth=4, shm_budget=3 * 3 * slot) as feeder:
        held = list(feeder)  # everything held: only copies can go on once the budget's slots are out
        stats = feeder.stats()
    assert [int(label) for _, label in held] == list(range(300))
    assert stats.shm_bytes <= stats.shm_budget == 9 * slot
    assert stats.copies > 0
    with pytest.raises(mpfeed.ShmSpaceError, match="shm_budget of 1,000 bytes"):
        mpfeed.Feeder(sources.pairs, args=(3,), workers=2, slot_bytes=4096, shm_budget=1000)
    assert not psutil.Process().children()


def test_drop_remainder_without_batch_size_is_refused_instead_of_ignored():
    with pytest.raises(ValueError, match="drop_remainder=True .* needs batch_size"):
        mpfeed.Feeder(sources.numbered, args=(10,), workers=1, drop_remainder=True)


def test_a_random_access_class_instead_of_an_instance_is_told_to_pass_an_instance():
    with pytest.raises(
        TypeError, match=r"source is the class Numbers, not an instance of it: pass Numbers\(\.\.\.\)"
    ):
        mpfeed.Feeder(sources.Numbers, workers=1)


def test_help_of_feeder_types_source_as_random_access_or_a_generator_function():
    annotation = mpfeed.Feeder.__init__.__annotations__["source"]
    assert "RandomAccessSource" in annotation and "Callable" in annotation


def test_an_empty_source_points_at_the_likely_cause_before_output_signature():
    pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.numbered, args=(0,), workers=1) as feeder:
        with pytest.raises(ValueError) as caught:
            feeder.dataset()
    message = str(caught.value)
    assert "an empty glob" in message
    assert message.index("an empty glob") < message.index("output_signature")


def test_the_pickling_error_names_no_start_method_the_fork_server_does_not_use():
    with pytest.raises(TypeError, match="must be picklable") as caught:
        mpfeed.Feeder(sources.numbered, args=(10,), kwargs={"shape": lambda: None}, workers=1)
    assert "in spawned worker processes" not in str(caught.value)


def test_feeder_stats_prints_a_field_per_line():
    with mpfeed.Feeder(sources.numbered, args=(10,), workers=2) as feeder:
        list(feeder)
        text = str(feeder.stats())
    lines = text.splitlines()
    assert lines[0] == "FeederStats(" and lines[-1] == ")"
    assert any(line.startswith("  items=10") for line in lines)
    assert max(len(line) for line in lines) < 400, "one worker per line at most"


def test_mpfeed_tf_is_an_attribute_after_a_plain_import_mpfeed_without_loading_tensorflow_at_import():
    code = (
        "import sys, mpfeed; assert 'tensorflow' not in sys.modules; "
        "assert not hasattr(mpfeed, 'no_such_module'); "
        "print(mpfeed.tf.FeederState.__name__, 'tensorflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["FeederState", "True"]
