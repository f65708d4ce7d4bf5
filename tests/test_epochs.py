"""The loop owns the epoch: which epoch a pass serves, positions that survive tf.data's prefetch across
epoch boundaries, and a known length; each found wrong by training the way Keras and tf.data users do."""

from __future__ import annotations

import pytest
import sources

import mpfeed

tf = pytest.importorskip("tensorflow")


def _indices(dataset) -> list[int]:
    return [int(i) for i in dataset.map(lambda e: e["i"]).as_numpy_iterator()]


def test_take_twice_serves_the_same_elements_since_a_pass_that_stopped_early_moves_nothing():
    """Old code: the second take(10) was epoch 1 (another shuffle), so an evaluation shifted training.
    (A pass that hands out its whole epoch does move on: small elements reach TensorFlow in chunks of up
    to 256, so the epoch here is longer than a chunk.)"""
    with mpfeed.Feeder(sources.Numbers(600, shape=(2,)), workers=2, shuffle=True, seed=3) as feeder:
        dataset = feeder.dataset()
        first, second = _indices(dataset.take(10)), _indices(dataset.take(10))
        whole = _indices(dataset)
        assert first == second == whole[:10]
        assert feeder.stats().epoch == 0
        assert _indices(dataset) != whole  # a whole pass moved the feeder to epoch 1
        assert feeder.stats().epoch == 1


def test_set_epoch_names_the_next_pass_and_keeps_a_position_loaded_for_it():
    with mpfeed.Feeder(sources.Numbers(600, shape=(2,)), workers=2, shuffle=True, seed=1) as feeder:
        orders = [[int(e["i"]) for e in feeder] for _ in range(3)]
        feeder.set_epoch(2)
        assert [int(e["i"]) for e in feeder] == orders[2]
        feeder.load_state_dict(feeder.state_dict(consumed=12, epoch=1))
        for _ in feeder.dataset().take(3):  # a peek and a partial pass move nothing
            pass
        feeder.set_epoch(1)
        assert [int(e["i"]) for e in feeder] == orders[1][12:]
        feeder.set_epoch(0)  # a position loaded for another epoch is dropped
        feeder.load_state_dict(feeder.state_dict(consumed=5, epoch=2))
        feeder.set_epoch(0)
        assert [int(e["i"]) for e in feeder] == orders[0]
        with pytest.raises(ValueError, match="epoch must be an int >= 0"):
            feeder.set_epoch(-1)


def test_state_dict_right_after_dataset_is_the_start_since_the_peek_is_not_handed_out():
    """Old code: dataset() peeked one element to infer the signature, state_dict() said position 1, and
    resuming from it skipped element 0."""
    for make in (
        lambda: mpfeed.Feeder(sources.Numbers(20), workers=2, seed=0),
        lambda: mpfeed.Feeder(sources.numbered, args=(20,), workers=2, seed=0),
    ):
        with make() as feeder:
            feeder.dataset()
            state = feeder.state_dict()
            assert state["position"] == 0
        with make() as feeder:
            feeder.load_state_dict(state)
            assert [int(e["i"]) for e in feeder] == list(range(20))


@pytest.mark.parametrize("ordered", [True, False])
def test_positions_stay_exact_after_prefetch_moved_into_the_next_epoch(ordered):
    """Old code: with .repeat() and prefetch, saving the model's position raised "consumed=1920, but this
    epoch has handed out 199 elements so far", which ended training."""

    def make():
        return mpfeed.Feeder(
            sources.Numbers(50, shape=(2,)), workers=2, shuffle=True, seed=4, ordered=ordered
        )

    with make() as feeder:
        iterator = iter(feeder.dataset().repeat().batch(8).prefetch(4))
        stream = [int(i) for _ in range(9) for i in next(iterator)["i"]]  # 50 of epoch 0, 22 of epoch 1
        assert feeder.stats().epoch >= 1  # the pipeline has moved on: the model is still in epoch 0
        states = {key: feeder.state_dict(consumed=key[1], epoch=key[0]) for key in [(0, 40), (1, 16)]}
        assert feeder.state_dict(consumed=50, epoch=0) == feeder.state_dict(consumed=0, epoch=1)
        del iterator
    for (epoch, consumed), state in states.items():
        assert state["epoch"] == epoch
        with make() as fresh:
            fresh.load_state_dict(state)
            rest = [int(e["i"]) for e in fresh]
        begin = epoch * 50 + consumed
        assert len(rest) == 50 - consumed
        assert not set(rest) & set(stream[epoch * 50 : begin])  # nothing the model consumed comes again
        if ordered:  # and, in order, what it had not consumed comes next
            shown = min(len(rest), 72 - begin)
            assert rest[:shown] == stream[begin : begin + shown]


def test_a_count_past_the_end_of_an_epoch_that_ended_is_that_epochs_end():
    """Old code: the README's recipe, consumed = (step + 1) * batch, overshot on a short last batch and
    state_dict raised ValueError: consumed=2016, but this epoch has handed out 2000 elements so far."""
    with mpfeed.Feeder(sources.Numbers(20), workers=2) as feeder:
        list(feeder)
        assert feeder.state_dict(consumed=24)["epoch"] == 1
        assert feeder.state_dict(consumed=24)["position"] == 0


def test_the_dataset_declares_the_feeders_length_and_keras_counts_its_steps():
    """Old code: cardinality -2, so Keras showed no steps, warned "ran out of data" every epoch and counted
    192 optimizer iterations after 189 steps. Generator sources have no length, and say why."""
    keras = pytest.importorskip("keras")
    with mpfeed.Feeder(sources.Numbers(50), workers=2, batch_size=8) as feeder:
        assert len(feeder) == 7
        assert int(feeder.dataset().cardinality()) == 7
    with mpfeed.Feeder(sources.Numbers(50), workers=2, partition=(1, 3)) as feeder:
        assert len(feeder) == 17
        assert int(feeder.dataset().batch(5).cardinality()) == 4
    with mpfeed.Feeder(sources.numbered, args=(5,), workers=1) as feeder:
        with pytest.raises(TypeError, match="generator source has no length"):
            len(feeder)
    with mpfeed.Feeder(sources.Numbers(70, shape=(4,)), workers=2, shuffle=True, seed=0) as feeder:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        dataset = feeder.dataset().map(
            lambda e: (tf.cast(e["x"], "float32") / 70, tf.cast(e["i"], "float32"))
        )
        dataset = dataset.batch(16)
        history = model.fit(dataset, epochs=3, verbose=0, shuffle=False)
        assert int(model.optimizer.iterations) == 3 * 5
        assert len(history.history["loss"]) == 3


def test_a_resumed_short_pass_ends_where_its_epoch_ends_and_the_next_is_whole():
    """A pass that began at a loaded position is shorter than the declared length: it ends there (no
    assert_cardinality error), and the next pass is a whole epoch."""
    with mpfeed.Feeder(sources.Numbers(30), workers=2, shuffle=True, seed=2) as feeder:
        whole = [[int(e["i"]) for e in feeder] for _ in range(2)]
        feeder.load_state_dict(feeder.state_dict(consumed=18, epoch=0))
        dataset = feeder.dataset()
        assert _indices(dataset) == whole[0][18:]
        assert _indices(dataset) == whole[1]


@pytest.mark.parametrize(
    "field, value",
    [
        ("position", 31),
        ("position", -1),
        ("done", "/////w=="),  # records 1 to 32 of 30
        ("done", "not base64!"),
        ("epoch", -2),
        ("epoch", "1"),
    ],
)
def test_load_state_dict_refuses_a_position_that_cannot_belong_to_this_feeder(field, value):
    """Old code checked the configuration only: an out-of-range position or done gave an empty epoch,
    and a negative one a raw struct.error."""
    with mpfeed.Feeder(sources.Numbers(30), workers=1, seed=0) as feeder:
        state = {**feeder.state_dict(), field: value}
        with pytest.raises(ValueError, match=f"this state's {field} is"):
            feeder.load_state_dict(state)
        assert [int(e["i"]) for e in feeder] == list(range(30))  # nothing was loaded


@pytest.mark.parametrize(
    "field, value", [("starts", [1]), ("starts", [0, -1]), ("cursor", 2), ("position", 3)]
)
def test_load_state_dict_refuses_a_generator_position_that_cannot_belong_to_this_feeder(field, value):
    with mpfeed.Feeder(sources.numbered, args=(10,), workers=2, seed=0) as feeder:
        state = {**feeder.state_dict(), field: value}
        with pytest.raises(ValueError, match=f"this state's {field} is"):
            feeder.load_state_dict(state)


def test_a_py_dataset_needs_a_batching_feeder():
    import mpfeed.keras

    with mpfeed.Feeder(sources.Numbers(8), workers=1) as feeder:
        with pytest.raises(ValueError, match="the feeder must batch"):
            mpfeed.keras.PyDataset(feeder)
    with mpfeed.Feeder(sources.Numbers(8), workers=1, batch_size=4) as feeder:
        dataset = mpfeed.keras.PyDataset(feeder)
        assert len(dataset) == 2 and feeder.batch_size == 4
        assert [int(i) for i in dataset[5]["i"]] == [0, 1, 2, 3]  # Keras's index changes nothing
