"""Work, not processes: random-access sources, shuffle, batches, balanced dispatch, exact resume and
partitions, with real workers and shared memory."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest
import sources

import mpfeed

HANG_BOUND_S = 30


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_random_access_sources_deliver_the_order_and_content(workers):
    with mpfeed.Feeder(sources.Numbers(37), workers=workers) as feeder:
        for _ in range(2):
            got = [(e["i"], e["x"].copy()) for e in feeder]
            assert [i for i, _ in got] == list(range(37))
            for i, x in got:
                np.testing.assert_array_equal(x, np.full((3, 4), i, dtype=np.float32))


def test_a_list_is_a_random_access_source():
    with mpfeed.Feeder([np.arange(3) * k for k in range(10)], workers=2) as feeder:
        assert [int(e[1]) for e in feeder] == list(range(10))


def test_unordered_random_access_delivers_every_element_once():
    with mpfeed.Feeder(sources.Numbers(50), workers=3, ordered=False) as feeder:
        assert sorted(e["i"] for e in feeder) == list(range(50))


def test_shuffle_depends_on_seed_and_epoch_only_never_on_the_worker_count():
    def epochs(workers, seed):
        with mpfeed.Feeder(sources.Numbers(40), workers=workers, shuffle=True, seed=seed) as feeder:
            return [[e["i"] for e in feeder] for _ in range(3)]

    runs = [epochs(workers, 5) for workers in (1, 2, 4)]
    assert runs[0] == runs[1] == runs[2]
    first = runs[0]
    assert all(sorted(epoch) == list(range(40)) for epoch in first)
    assert first[0] != list(range(40)) and first[0] != first[1] != first[2], "a new order each epoch"
    assert epochs(2, 6) != first


def test_batches_hold_consecutive_positions_of_the_order():
    with mpfeed.Feeder(sources.Numbers(10), workers=3, batch_size=4) as feeder:
        assert [b["i"].tolist() for b in feeder] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with mpfeed.Feeder(
        sources.Numbers(10), workers=3, batch_size=4, drop_remainder=True, shuffle=True, seed=1
    ) as feeder:
        batches = [b["i"].tolist() for b in feeder]
        with mpfeed.Feeder(sources.Numbers(10), workers=1, shuffle=True, seed=1) as plain:
            order = [e["i"] for e in plain]
    assert batches == [order[0:4], order[4:8]]


def test_element_rng_depends_on_seed_epoch_and_index_not_on_the_worker():
    def draws(workers):
        with mpfeed.Feeder(sources.Augmented(), workers=workers, seed=9) as feeder:
            epochs = [list(feeder) for _ in range(2)]
        return epochs

    one, three = draws(1), draws(3)
    assert [[e["draw"] for e in epoch] for epoch in one] == [[e["draw"] for e in epoch] for epoch in three]
    assert len({e["pid"] for e in three[0]}) > 1, "several workers made the elements"
    assert [e["draw"] for e in one[0]] != [e["draw"] for e in one[1]], "new draws each epoch"
    expected = np.random.default_rng(mpfeed.element_seed(9, 0, 5)).random()
    assert one[0][5]["draw"] == expected
    with pytest.raises(RuntimeError, match="inside a random-access source"):
        mpfeed.element_rng()


def test_a_slow_element_holds_up_only_what_is_queued_behind_it():
    """Element 3 takes 3 s; the others 2 ms each over 4 workers. First-ready delivers nearly everything
    while it waits; ordered delivery waits, with every ring (spare slots too) as its window, no more."""
    n = 400
    with mpfeed.Feeder(sources.Slow(n, 3, 3.0), workers=4, ordered=False) as feeder:
        started = time.monotonic()
        order = [int(label) for _, label in feeder]
        elapsed = time.monotonic() - started
    assert sorted(order) == list(range(n))
    assert order.index(3) > n - 10, "first-ready: the slow element came last, nothing waited for it"
    assert elapsed < HANG_BOUND_S
    with mpfeed.Feeder(sources.Slow(n, 3, 3.0), workers=4, depth=4) as feeder:
        labels, most_queued = [], 0
        for _, label in feeder:  # while element 3 is made, the others fill their rings and no more
            labels.append(int(label))
            most_queued = max(most_queued, *(w.queued for w in feeder.stats().workers))
        assert labels == list(range(n))
        # The window may grow into each ring's spare slots (twice depth), never past them: fixed memory.
        assert 4 < most_queued <= 2 * 4 + 1, most_queued


def _resumed(make, cut, epochs=2, consumed=None):
    """Elements of a run interrupted after ``cut`` elements of epoch 0 (saving ``consumed`` of them) and
    resumed in a new feeder, against an uninterrupted run."""
    with make() as feeder:
        whole = [[e[1] if isinstance(e, tuple) else e["i"] for e in feeder] for _ in range(epochs)]
    with make() as feeder:
        iterator = iter(feeder)
        before = [next(iterator) for _ in range(cut)]
        before = [e[1] if isinstance(e, tuple) else e["i"] for e in before]
        state = json.loads(json.dumps(feeder.state_dict(consumed=consumed)))
    kept = before if consumed is None else before[:consumed]
    with make() as feeder:
        feeder.load_state_dict(state)
        after = [[e[1] if isinstance(e, tuple) else e["i"] for e in feeder] for _ in range(epochs)]
    return whole, kept, after, state


@pytest.mark.parametrize("cut", [0, 17, 39])
@pytest.mark.parametrize("kind", ["random-access", "generator"])
def test_resume_continues_exactly_where_the_state_was_saved(kind, cut):
    def make():
        if kind == "random-access":
            return mpfeed.Feeder(sources.Numbers(40), workers=3, shuffle=True, seed=4)
        return mpfeed.Feeder(sources.numbered, args=(40,), workers=3, seed=4)

    whole, kept, after, state = _resumed(make, cut)
    assert len(json.dumps(state)) < 1024
    assert kept + after[0] == whole[0], "the elements before the save and after the resume make the epoch"
    assert after[1] == whole[1], "and the epochs after it are the same"


@pytest.mark.parametrize("kind", ["random-access", "generator"])
def test_resume_after_unordered_delivery_gives_every_element_once(kind):
    def make():
        if kind == "random-access":
            return mpfeed.Feeder(sources.Slow(60, 7, 0.3), workers=3, ordered=False, seed=1)
        return mpfeed.Feeder(sources.pairs, args=(60,), workers=3, ordered=False, seed=1)

    whole, kept, after, _ = _resumed(make, 25)
    assert sorted(kept + after[0]) == sorted(whole[0]) == list(range(60))


def test_resume_at_a_consumed_count_behind_the_feeder():
    def make():
        return mpfeed.Feeder(sources.Numbers(40), workers=2, shuffle=True, seed=2)

    whole, kept, after, _ = _resumed(make, 30, consumed=12)
    assert kept + after[0] == whole[0]


def test_a_seekable_generator_resumes_without_making_what_was_consumed():
    def make():
        return mpfeed.Feeder(sources.seeks, args=(30,), workers=3, seed=1)

    whole, kept, after, state = _resumed(make, 10)
    assert kept + after[0] == whole[0]
    assert state["starts"] == [4, 3, 3]


@pytest.mark.parametrize("prefetch", [1, 16])
def test_resume_through_a_prefetching_dataset_at_what_the_model_consumed(prefetch):
    tf = pytest.importorskip("tensorflow")
    n, cut = 300, 120

    def make():
        return mpfeed.Feeder(sources.Numbers(n), workers=2, shuffle=True, seed=7)

    with make() as feeder:
        whole = [int(e["i"]) for e in feeder.dataset()]
    with make() as feeder:
        iterator = iter(feeder.dataset().prefetch(prefetch))
        before = [int(next(iterator)["i"]) for _ in range(cut)]
        state = feeder.state_dict(consumed=cut)  # the feeder has handed out more than the model took
        del iterator
    with make() as feeder:
        feeder.load_state_dict(state)
        after = [int(e["i"]) for e in feeder.dataset()]
    assert before + after == whole
    assert tf is not None


@pytest.mark.parametrize(
    "other, named",
    [
        ({"length": 41}, "length"),
        ({"seed": 5}, "seed"),
        ({"shuffle": False}, "shuffle"),
        ({"batch_size": 2}, "batch_size"),
        ({"drop_remainder": True}, "drop_remainder"),
        ({"partition": (1, 2)}, "partition"),
        ({"source": "generator"}, "source"),
    ],
)
def test_a_state_from_another_configuration_is_refused_naming_what_differs(other, named):
    base = {"seed": 4, "shuffle": True, "batch_size": 4, "drop_remainder": False, "partition": None}
    with mpfeed.Feeder(sources.Numbers(40), workers=1, **base) as feeder:
        state = feeder.state_dict()
    options = {**base, **{k: v for k, v in other.items() if k not in ("length", "source")}}
    if "length" in other:
        source, extra = sources.Numbers(other["length"]), {}
    elif "source" in other:
        source, extra = sources.numbered, {"args": (40,)}
        options["shuffle"] = False
    else:
        source, extra = sources.Numbers(40), {}
    with mpfeed.Feeder(source, workers=1, **extra, **options) as feeder:
        with pytest.raises(ValueError, match=f"{named} is"):
            feeder.load_state_dict(state)


def test_resuming_at_90_percent_recomputes_nothing_before_the_position():
    n = 100_000
    with mpfeed.Feeder(sources.Numbers(n), workers=2, seed=1, shuffle=True) as feeder:
        state = {**feeder.state_dict(), "position": 90_000}
        feeder.load_state_dict(state)
        elements = list(feeder)
        assert len(elements) == 10_000
        assert feeder.stats().items == 10_000, "nothing before the position was made or sent"


@pytest.mark.parametrize(
    "kind, shuffle", [("random-access", False), ("random-access", True), ("generator", False)]
)
def test_uneven_partitions_are_disjoint_and_cover_every_element_once(kind, shuffle):
    parts = []
    for index in range(3):
        if kind == "random-access":
            feeder = mpfeed.Feeder(
                sources.Numbers(50),
                workers=2,
                partition=(index, 3),
                shuffle=shuffle,
                seed=3,
                partition_remainder="uneven",
            )
        else:
            feeder = mpfeed.Feeder(sources.numbered, args=(50,), workers=2, partition=(index, 3))
        with feeder:
            parts.append([[e["i"] for e in feeder] for _ in range(2)])
    for epoch in range(2):
        seen = [i for part in parts for i in part[epoch]]
        assert sorted(seen) == list(range(50))
    if kind == "random-access":  # the epoch's order is split as evenly as it goes
        assert all(len(part[0]) in (16, 17) for part in parts)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("remainder, size", [("pad", 27), ("drop", 26)])
def test_partitions_are_equal_so_that_every_host_runs_the_same_steps(shuffle, remainder, size):
    """105 elements over 4 hosts: 27/26/26/26 left a host in lockstep training one step alone, waiting on
    the others' collective forever. Padded parts repeat the order's first elements (PyTorch's default);
    dropped parts leave out its last ones."""
    parts, orders = [], []
    for index in range(4):
        with mpfeed.Feeder(
            sources.Numbers(105),
            workers=2,
            partition=(index, 4),
            shuffle=shuffle,
            seed=5,
            partition_remainder=remainder,
        ) as feeder:
            assert len(feeder) == size
            parts.append([[int(e["i"]) for e in feeder] for _ in range(2)])
    with mpfeed.Feeder(sources.Numbers(105), workers=1, shuffle=shuffle, seed=5) as whole:
        orders = [[int(e["i"]) for e in whole] for _ in range(2)]
    for epoch in range(2):
        assert [len(part[epoch]) for part in parts] == [size] * 4
        dealt = [parts[i % 4][epoch][i // 4] for i in range(4 * size)]  # the parts deal the order out
        order = orders[epoch]
        assert dealt == (order + order)[: 4 * size]
        if remainder == "pad":
            assert set(dealt) == set(range(105))
        else:
            assert len(set(dealt)) == len(dealt) == 104


def test_shuffle_and_bad_partitions_are_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="shuffle=True needs a random-access source"):
        mpfeed.Feeder(sources.numbered, args=(4,), shuffle=True)
    for partition in [(2, 2), (-1, 2), (0,), [0, 1]]:
        with pytest.raises(ValueError, match="partition must be"):
            mpfeed.Feeder(sources.Numbers(4), partition=partition)
    assert not psutil.Process().children()


def test_from_generator_maps_an_input_context_onto_a_partition():
    tf = pytest.importorskip("tensorflow")
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        ds = mpfeed.from_generator(sources.Numbers(21), input_context=context, workers=2)
        seen.append([int(e["i"]) for e in ds])
        ds._mpfeed_feeder.close()
    assert len(seen[0]) == len(seen[1]) == 11  # equal parts: the order's first element pads the second
    assert set(seen[0]) | set(seen[1]) == set(range(21)) and set(seen[0]) & set(seen[1]) == {0}
    with pytest.raises(ValueError, match="input_context or partition, not both"):
        mpfeed.from_generator(sources.Numbers(21), input_context=context, partition=(0, 2))


def test_a_checkpoint_saves_and_restores_the_position_with_the_model(tmp_path):
    tf = pytest.importorskip("tensorflow")
    import mpfeed.tf

    def make():
        return mpfeed.Feeder(sources.Numbers(30), workers=2, shuffle=True, seed=8)

    with make() as feeder:
        whole = [e["i"] for e in feeder]
    with make() as feeder:
        state = mpfeed.tf.FeederState(feeder)
        step = tf.Variable(0)
        checkpoint = tf.train.Checkpoint(step=step, feeder=state)
        iterator = iter(feeder)
        before = [next(iterator)["i"] for _ in range(11)]
        step.assign(11)
        with pytest.raises(
            ValueError, match="consumed is not set, and the feeder is part way through epoch 0"
        ):
            checkpoint.save(str(tmp_path / "refused"))  # the handed-out position could skip buffered ones
        state.consumed = 11
        path = checkpoint.save(str(tmp_path / "ckpt"))
    with make() as feeder:
        restored = tf.train.Checkpoint(step=tf.Variable(0), feeder=mpfeed.tf.FeederState(feeder))
        restored.restore(path)
        assert int(restored.step) == 11
        after = [e["i"] for e in feeder]
    assert before + after == whole


def test_shuffled_partitions_without_a_seed_are_refused_since_their_parts_would_overlap():
    children = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match=r"partition=\(0, 2\) .* needs a seed"):
        mpfeed.Feeder(sources.Numbers(8), partition=(0, 2), shuffle=True)
    assert set(psutil.Process().children(recursive=True)) <= children, "refused before any worker started"
    with mpfeed.Feeder(sources.Numbers(8), partition=(0, 2), shuffle=True, seed=1, workers=1) as feeder:
        assert len(list(feeder)) == 4
